"""An independent numpy re-derivation of gluonq's documented int8 arithmetic, for the tests.

It does not import gluonq and never reads a block's quantized parameters: a layer is
recomputed from its *float* weight and bias, the calibrated ranges a user hands to
``from_float`` and the public configuration (dtypes, ``per_channel``, ``relu``,
``residual``, geometry, ``flatten``). Integers are int64, reals float64, and float32 only
where the documented arithmetic is float32 (README "The arithmetic", the docstring of
``gluonq/quant.py``, docs/architecture.md "CPUs with and without VNNI"). A design error in
``gluonq.quant`` therefore shows as a mismatch instead of being copied here.

The rules, as documented:

* Activations are symmetric. ``uint8``: range [0, M], ``Q = 255``; ``int8``: [-M, M],
  ``Q = 127``. ``inv = f32(Q / M)`` integer steps per real unit; quantize is
  ``saturate(round_half_even(f32(x * inv)))`` to [0, 255] or [-128, 127].
* Static ranges *snap* (:func:`snap_max`): the float32 M nearest the calibrated magnitude
  (nearest in ulps, ties upward, within 256 ulps) whose ``f32(Q / M)`` MXNet can write as
  ``f32(Q' / R)`` for some float32 R, with MXNet's ``Q' = 127.5`` (int8) / ``255.5`` (uint8);
  an int8 range must be expressible in both conventions. This reference implements that
  rule itself (rather than taking gluonq's snapped ``qparams``) so that the snap is checked
  too; a dynamic range (taken from each batch at run time) does not snap.
* Weights are int8 in [-127, 127], max-abs scale ``s0 = max|w| / 127`` per output channel or
  per tensor, rounded half away from zero. Per channel, gluonq moves a scale by at most 0.3%
  to the float32 nearest ``s0`` for which oneDNN's fused kernels give back the same
  integers (:func:`weight_q`): they see the float image ``q * s`` with one extreme element
  stored as ``+-f32(127.5 s)`` and re-derive ``rint(f32(image * f32(127.5 / max|image|)))``
  (half to even, saturated to [-128, 127]).
* Static bias: int32 ``round_half_away(b / (s_x * s_w))`` (float64), with
  ``s_x = f32(M / Q)``, saturated so that ``acc`` cannot leave int32 (:func:`bias_q`).
  Dynamic bias: ``round_half_away(f32(f32(b * inv_x) * inv_w))`` at the run-time scale,
  saturated to leave room for any accumulator.
* ``acc = sum(q_x * q_w) + q_b`` exactly (int64 here; gluonq promises int32).
* Float output: ``acc * s_x * s_w`` (exact here; gluonq's float32 order is within
  :data:`FLOAT_RTOL` of it). Requantize: ``m = f32(f32(inv_out / inv_x) / inv_w)`` with
  ``inv_w = f32(127.5 / f32(127.5 * s_w))`` (oneDNN's order), ``y = f32(f32(acc) * m)``; a
  fused residual adds ``q_r * f32(inv_out / inv_r)`` with one rounding; then ReLU,
  round half to even, saturate.

Public API
----------
``Q``, ``EPS``, ``FLOAT_RTOL``
``resolve_range(dtype, lo, hi, snap=True)`` -> ``(dtype, lo, hi)`` as a block holds it
``snap_max(m, dtype)``, ``inv_scale(dtype, m)``
``quantize(x, dtype, lo, hi)``, ``dequantize(q, dtype, lo, hi)``
``weight_q(w, per_channel)`` -> ``(q int8, scale float32)``,
``bias_q(b, s_x, s_w, qw=None, in_dtype='int8')``
``conv_int(qx, qw, stride, pad, dilate, groups)``, ``dense_int(qx, qw, flatten)``
``requantize(acc, m, dtype, relu, residual=None, fused=True)``
``layer(kind, w, b, x, in_dtype, in_range, out_dtype, out_range, per_channel, relu,
residual=None, residual_qp=None, geometry=None, flatten=True)`` -> float32 array or
``(q, dtype, lo, hi)``
``onednn_conv_ref(qx, qw, stride, pad, dilate, groups, vnni, halved=None)``,
``onednn_dense_ref(qx, qw, vnni)``: oneDNN's int32 accumulator on CPUs with/without VNNI
``error_bound(kind, w, x, in_dtype, in_range, per_channel, geometry, flatten, bias)``
``affine_qparams(lo, hi)`` -> ``(inv, z)``, ``affine_quantize(x, inv, z)``,
``affine_layer(kind, w, b, x, in_range, per_channel, geometry, flatten)``: a layer whose
input is affine uint8 (float output)

Affine uint8 (README "The arithmetic"): a range [lo, hi] with lo < 0 has the zero point
``z = floor(-lo * 255 / (hi - lo) + 1e-4)`` in [1, 255] and the span ``-lo * 255 / z`` (so
that lo is a whole step), snapped like a uint8 magnitude; ``inv = f32(255 / span)`` and
``q = clip(rne(f32(x * inv)), -z, 255 - z) + z``. A layer computes
``acc = sum(q_w * (q_x - z)) + q_b`` with padding by ``z`` (a real 0), ``q_b`` at
``s_x = f32(span / 255)``, saturated with twice the uint8 headroom.
"""
import os

import numpy as np

#: Largest integer magnitude of each activation dtype's symmetric range.
Q = {'int8': 127, 'uint8': 255}
#: Saturation bounds of each integer dtype.
BOUNDS = {'int8': (-128, 127), 'uint8': (0, 255)}
#: Largest |q| of each activation dtype (int8 saturates at -128).
MAX_ABS = {'int8': 128, 'uint8': 255}
#: MXNet's range constants (its fused kernels take Q' / R steps per real unit).
MX_Q = {'int8': 127.5, 'uint8': 255.5}
#: Smallest range magnitude (an all-zero tensor gets it, so no scale is ever 0).
EPS = 1e-30
INT32_MAX = 2 ** 31 - 1
#: Relative error bound of gluonq's float32 float-output epilogue ``f32(acc) / f32(inv_x *
#: inv_w)`` against the exact ``acc * s_x * s_w``: six float32 roundings (the cast of acc,
#: ``inv_x``, ``127.5 * s_w``, ``127.5 / .``, the product, the division), one more for the
#: float32 result here, and one of margin, each at most 2**-24 relative.
FLOAT_RTOL = 8 * 2.0 ** -24

_f32 = np.float32


def _round_half_away(v):
    v = np.asarray(v, np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _bits(v):
    return np.asarray(v, np.float32).view(np.int32)


def _from_bits(b):
    return np.asarray(b, np.int32).view(np.float32)


# -- ranges -------------------------------------------------------------------------------
def _expressible(inv, q_mx):
    """Per element of float32 ``inv``: is there a float32 R with f32(q_mx / R) == inv?

    ``q_mx / R`` falls monotonically with R, so such an R lies within a couple of ulps of
    ``f32(q_mx / inv)``; seven neighbours are tried."""
    inv = np.asarray(inv, np.float32)
    r0 = _bits((_f32(q_mx) / inv).astype(np.float32))
    rs = _from_bits(r0[..., None] + np.arange(-3, 4, dtype=np.int32))
    with np.errstate(divide='ignore', over='ignore', invalid='ignore'):
        back = (_f32(q_mx) / rs).astype(np.float32)
    return np.any((back == inv[..., None]) & np.isfinite(rs) & (rs > 0), axis=-1)


def snap_max(m, dtype):
    """The snapped float32 range magnitude for magnitude ``m`` (see the module docstring)."""
    q = _f32(Q[dtype])
    k = np.arange(257)
    offsets = np.stack([k, -k], axis=1).ravel()[1:]          # 0, +1, -1, +2, -2, ...
    cand = _from_bits(_bits(_f32(m)) + offsets.astype(np.int32))
    ok = np.isfinite(cand) & (cand > 0)
    with np.errstate(divide='ignore', over='ignore'):
        inv = (q / cand).astype(np.float32)
    for conv in (('int8', 'uint8') if dtype == 'int8' else ('uint8',)):
        ok &= _expressible(inv, MX_Q[conv])
    hit = np.flatnonzero(ok)
    return float(cand[hit[0]]) if hit.size else float(_f32(m))


def resolve_range(dtype, lo, hi, snap=True):
    """``(dtype, lo, hi)`` of a tensor with calibrated range [lo, hi], as a block holds it.

    'auto' is uint8 when ``lo >= 0``; the range is symmetric (int8 ``[-M, M]``, uint8
    ``[0, M]``), ``M = max(|lo|, |hi|, EPS)``, snapped when ``snap``.
    """
    lo, hi = float(lo), float(hi)
    if dtype == 'auto':
        dtype = 'uint8' if lo >= 0 else 'int8'
    if dtype == 'uint8' and lo < 0:
        raise ValueError('uint8 range with min < 0')
    m = max(abs(lo), abs(hi), EPS)
    m = snap_max(m, dtype) if snap else float(_f32(m))
    return dtype, (0.0 if dtype == 'uint8' else -m), m


def inv_scale(dtype, m):
    """float32 integer steps per real unit of a range of magnitude ``m``."""
    return _f32(_f32(Q[dtype]) / _f32(max(abs(float(m)), EPS)))


def _mag(lo, hi):
    return max(abs(float(_f32(lo))), abs(float(_f32(hi))), EPS)


def quantize(x, dtype, lo, hi):
    """``saturate(round_half_even(f32(x * inv)))`` as int8/uint8 (the range is used as given)."""
    y = (np.asarray(x, np.float32) * inv_scale(dtype, _mag(lo, hi))).astype(np.float32)
    a, b = BOUNDS[dtype]
    return np.clip(np.rint(y.astype(np.float64)), a, b).astype(np.dtype(dtype))


def dequantize(q, dtype, lo, hi):
    """Real values of integers ``q`` held with range [lo, hi]: ``f32(q) / inv``."""
    return (np.asarray(q).astype(np.float32) / inv_scale(dtype, _mag(lo, hi))).astype(
        np.float32)


def dynamic_range(x, dtype):
    """Run-time range of float ``x``: ``(0, max x)`` for uint8, ``(-max|x|, max|x|)`` for int8,
    magnitudes at least EPS (no snap)."""
    x = np.asarray(x, np.float32)
    m = float(x.max()) if dtype == 'uint8' else float(np.abs(x).max())
    m = float(_f32(max(m, EPS)))
    return dtype, (0.0 if dtype == 'uint8' else -m), m


# -- weights and bias ---------------------------------------------------------------------
def _weight_inv(s):
    """oneDNN's weight inverse scale ``f32(127.5 / f32(127.5 * s))``."""
    s = np.asarray(s, np.float32)
    return (_f32(127.5) / (s * _f32(127.5)).astype(np.float32)).astype(np.float32)


def _q_rows(rows, s):
    """int64 weights of float64 ``rows`` (K?, n) at float32 scales ``s`` (K?, 1)."""
    return np.clip(_round_half_away(rows / np.asarray(s, np.float64)), -127, 127).astype(
        np.int64)


def _rederives(row, s):
    """For each candidate scale in ``s`` (K,): does oneDNN's re-quantization of the fused
    image of ``row``'s integers give back exactly those integers?"""
    s = np.asarray(s, np.float32)[:, None]
    q = _q_rows(row[None].astype(np.float64), s)                      # (K, n)
    img = (q.astype(np.float32) * s).astype(np.float32)
    m = (_f32(127.5) * s).astype(np.float32)                         # (K, 1)
    # the extreme element: the first +127, else the first -127, is stored as +-m
    pos, neg = q == 127, q == -127
    k = np.where(pos.any(1), pos.argmax(1), neg.argmax(1))
    has = pos.any(1) | neg.any(1)
    rows = np.flatnonzero(has)
    img[rows, k[rows]] = np.sign(q[rows, k[rows]]).astype(np.float32) * m[rows, 0]
    top = np.abs(img).max(axis=1, keepdims=True)
    with np.errstate(divide='ignore'):               # an all-zero row re-derives zeros
        inv = np.where(top > 0, (_f32(127.5) / top).astype(np.float32), _f32(0))
    back = np.clip(np.rint((img * inv).astype(np.float32).astype(np.float64)), -128, 127)
    return np.all(back == q, axis=1)


def _extreme_may_rederive(row, s):
    """A necessary condition of :func:`_rederives`, cheap for many candidate scales: some
    positive weight reaches +127 (its image +m re-derives to 127 after saturation), or the
    image -m of the negative extreme re-derives to -127, not -128."""
    s = np.asarray(s, np.float32)
    top = float(np.max(row)) if row.size else 0.0
    reaches = _round_half_away(top / s.astype(np.float64)) >= 127
    m = (_f32(127.5) * s).astype(np.float32)
    inv = (_f32(127.5) / m).astype(np.float32)
    return reaches | (np.rint((m * inv).astype(np.float32).astype(np.float64)) <= 127)


def _onednn_exact_scale(row, s0):
    """The float32 scale nearest ``s0`` (in ulps, ties upward, within 0.3%) at which oneDNN
    re-derives the same integers; ``s0`` when it already does."""
    base = int(_bits(_f32(s0)))
    start = 0
    for size in (64, 512, 4096, 8192, 16384):        # widening rings of ulps around s0
        k = np.arange(start, start + size)
        offsets = np.stack([k, -k], axis=1).ravel()[(1 if start == 0 else 0):]
        start += size
        cand = _from_bits(base + offsets.astype(np.int32))
        cand = cand[np.abs(cand.astype(np.float64) / float(s0) - 1) <= 3e-3]
        cand = cand[_extreme_may_rederive(row, cand)]
        ok = np.flatnonzero(_rederives(row, cand))
        if ok.size:
            return cand[ok[0]]
    raise AssertionError('no oneDNN-exact weight scale within 0.3%% of %r' % (s0,))


_WEIGHT_CACHE = {}


def weight_q(w, per_channel=True):
    """int8 weights ``q`` (shape of ``w``) and float32 scales (``(O,)`` or ``(1,)``)."""
    w = np.asarray(w, np.float32)
    key = (w.shape, w.tobytes(), bool(per_channel))
    if key not in _WEIGHT_CACHE:
        if len(_WEIGHT_CACHE) > 64:
            _WEIGHT_CACHE.clear()
        _WEIGHT_CACHE[key] = _weight_q(w, per_channel)
    q, s = _WEIGHT_CACHE[key]
    return q.copy(), s.copy()


def _weight_q(w, per_channel):
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    top = np.abs(rows.astype(np.float64)).max(axis=1) if rows.size else np.zeros(len(rows))
    s = (np.where(top > 0, top, 1.0) / 127.0).astype(np.float32)
    if per_channel:
        for c in range(len(rows)):
            if not _rederives(rows[c], s[c:c + 1])[0]:
                s[c] = _onednn_exact_scale(rows[c], s[c])
    q = _q_rows(rows.astype(np.float64), s[:, None]).reshape(w.shape).astype(np.int8)
    return q, s


def weight_q_for_bias(w, b, s_x, in_dtype, per_channel=True, affine=False):
    """:func:`weight_q` of a layer with float bias ``b`` and static input scale ``s_x``: a
    channel whose ``|b| / (s_x * s_w)`` exceeds ``room = 2**31 - 1 - max|q_x| * (sum|q_w| +
    K)`` (``q_w`` the max-abs integers, K weights per channel; doubled for an ``affine``
    input) gets the smallest float32 scale >= ``1.0001 * |b| / (s_x * room)``, per tensor
    the largest of them; its weights are rounded again at that scale."""
    qw, s = weight_q(w, per_channel)
    if b is None:
        return qw, s
    w = np.asarray(w, np.float32)
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    k = rows.shape[1]
    h = (2 if affine else 1) * MAX_ABS[in_dtype] * (
        np.abs(qw.astype(np.int64).reshape(len(rows), -1)).sum(axis=1) + k)
    need = [1.0001 * abs(float(bc)) / (float(s_x) * max(int(INT32_MAX - hc), 1))
            for bc, hc in zip(np.asarray(b, np.float64).reshape(-1), h)]
    if not per_channel:
        need = [max(need)]
    s = s.copy()
    for c, n in enumerate(need):
        if float(s[c]) < n:
            v = np.float32(n)
            while float(v) < n:
                v = np.nextafter(v, np.float32(np.inf))
            s[c] = v
    flat = rows if per_channel else rows.reshape(1, -1)
    return _q_rows(flat, s[:, None]).reshape(w.shape).astype(np.int8), s


def bias_q(b, s_x, s_w, qw=None, in_dtype='int8'):
    """Static int32 bias ``round_half_away(b / (s_x * s_w))`` (float64), saturated so that
    the accumulator cannot leave int32: at ``+-(2**31 - 1 - h)`` with ``h = max|q_x| *
    sum|q_w|`` per channel (``max|q_x|`` 128 for int8, 255 for uint8) when the integer
    weights ``qw`` are given, else at ``+-(2**31 - 1)``."""
    v = _round_half_away(np.asarray(b, np.float64) /
                         (np.float64(s_x) * np.asarray(s_w, np.float64)))
    h = 0 if qw is None else MAX_ABS[in_dtype] * np.abs(
        np.asarray(qw).astype(np.int64).reshape(len(qw), -1)).sum(axis=1)
    lim = INT32_MAX - h
    return np.clip(v, -lim, lim).astype(np.int64)


def _bias_q_dynamic(b, inv_x, inv_w, fan_in, in_dtype):
    """Run-time int32 bias, saturated at the largest float32 that leaves room for any
    accumulator (``max|q_x| * 127 * fan_in``) below 2**31 - 1."""
    y = ((np.asarray(b, np.float32) * _f32(inv_x)).astype(np.float32) *
         np.asarray(inv_w, np.float32)).astype(np.float32)
    room = INT32_MAX - MAX_ABS[in_dtype] * 127 * fan_in
    lim = np.float32(room)
    while int(lim) > room:                        # float32 nearest below
        lim = np.nextafter(lim, np.float32(0))
    return np.clip(_round_half_away(y), -float(lim), float(lim)).astype(np.int64)


# -- integer products ---------------------------------------------------------------------
def _geometry(nd, stride, pad, dilate):
    return [(v,) * nd if np.isscalar(v) else tuple(int(t) for t in v)
            for v in (stride, pad, dilate)]


def _patches(x, kernel, stride, pad, dilate, groups, dtype):
    """Input patches ``(N, G, C/G, taps, L)`` in ``dtype`` and the output spatial shape."""
    nd = x.ndim - 2
    stride, pad, dilate = _geometry(nd, stride, pad, dilate)
    x = np.pad(np.asarray(x).astype(dtype), [(0, 0), (0, 0)] + [(p, p) for p in pad])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilate)]
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    win = win[(Ellipsis,) + tuple(slice(None, None, d) for d in dilate)]   # dilation
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
    out_sp = win.shape[2:2 + nd]
    n, c = x.shape[:2]
    # (N, C, *out, *k) -> (N, G, C/G, taps, L)
    win = np.moveaxis(win.reshape(n, c, int(np.prod(out_sp)), -1), 3, 2)
    return win.reshape(n, groups, c // groups, win.shape[2], win.shape[3]), out_sp


def _conv(qx, qw, stride, pad, dilate, groups, tap_sum, dtype=np.int64):
    qw = np.asarray(qw).astype(dtype)
    o, cg = qw.shape[:2]
    p, out_sp = _patches(qx, qw.shape[2:], stride, pad, dilate, groups, dtype)
    wg = qw.reshape(groups, o // groups, cg, -1)                        # (G, O/G, C/G, taps)
    acc = tap_sum(p, wg)                                                # (N, G, O/G, L)
    return acc.reshape((len(p), o) + tuple(out_sp))


def _exact_sum(p, wg):
    return np.einsum('ngctl,goct->ngol', p, wg)


def _int16_pairs_sum(p, wg):
    """Products of consecutive channels (0+1, 2+3, ...; an odd last one alone) at the same
    tap added in int16 with saturation, then added exactly."""
    if p.shape[2] % 2:
        p = np.concatenate([p, np.zeros_like(p[:, :, :1])], axis=2)
        wg = np.concatenate([wg, np.zeros_like(wg[:, :, :1])], axis=2)
    n, g, c, t, l = p.shape
    p2 = p.reshape(n, g, c // 2, 2, t, l)
    w2 = wg.reshape(g, wg.shape[1], c // 2, 2, t)
    out = np.zeros((n, g, wg.shape[1], l), np.int64)
    for i in range(n):                           # one sample at a time bounds the memory
        pairs = np.einsum('gjptl,gojpt->gojtl', p2[i], w2)
        out[i] = np.clip(pairs, -32768, 32767).sum(axis=(2, 3))
    return out


def conv_int(qx, qw, stride=1, pad=0, dilate=1, groups=1):
    """Exact int64 N-d cross-correlation, NC[D]HW, zero padding; ``qw`` (O, C/G, *k)."""
    return _conv(qx, qw, stride, pad, dilate, groups, _exact_sum)


def dense_int(qx, qw, flatten=True):
    """Exact int64 fully-connected product: ``qx @ qw.T`` (over the last axis with
    ``flatten=False``, over all but the first with ``flatten=True``)."""
    x = np.asarray(qx).astype(np.int64)
    if flatten:
        x = x.reshape(len(x), -1)
    return np.tensordot(x, np.asarray(qw).astype(np.int64), axes=([-1], [1]))


def avx512_isa():
    """Does oneDNN run AVX-512 kernels here? From ``/proc/cpuinfo`` and oneDNN's
    ``DNNL_MAX_CPU_ISA`` (``AVX2`` caps it), not from the code under test."""
    if os.environ.get('DNNL_MAX_CPU_ISA', '').upper().startswith(('AVX2', 'SSE')):
        return False
    try:
        with open('/proc/cpuinfo') as f:
            return 'avx512f' in f.read().split()
    except OSError:
        return False


def onednn_conv_ref(qx, qw, stride=1, pad=0, dilate=1, groups=1, vnni=True, halved=None):
    """oneDNN's int32 accumulator of an int8 convolution on a CPU with or without VNNI.

    With VNNI it is exact. Without: for int8 data the weights are halved (``halved``, by
    default ``round_half_even(qw / 2)``) and the exact product with ``2 * halved`` results;
    for uint8 data the products of consecutive input channels of a group are added in int16
    with saturation, except for depthwise convolutions (one channel per group), which are
    exact, and, with AVX2 kernels (no AVX-512), except where the input or output channels
    of a group are not a multiple of 4 (then oneDNN 2.4.4 runs an exact gemm-based kernel;
    measured on an AVX2 EPYC).
    """
    if vnni:
        return conv_int(qx, qw, stride, pad, dilate, groups)
    qw = np.asarray(qw).astype(np.int64)
    if np.asarray(qx).dtype == np.int8:
        h = np.rint(qw / 2.0) if halved is None else np.asarray(halved).reshape(qw.shape)
        return conv_int(qx, 2 * h.astype(np.int64), stride, pad, dilate, groups)
    if qw.shape[1] == 1 and groups > 1:
        return conv_int(qx, qw, stride, pad, dilate, groups)
    if not avx512_isa() and (qw.shape[1] % 4 or (qw.shape[0] // groups) % 4):
        return conv_int(qx, qw, stride, pad, dilate, groups)
    return _conv(qx, qw, stride, pad, dilate, groups, _int16_pairs_sum)


def onednn_dense_ref(qx, qw, vnni=True):
    """oneDNN's int32 accumulator of an int8 fully-connected layer (``flatten=True``).

    Exact with VNNI. Without, int8 data is first shifted to uint8 (``x + 128``, the shift
    taken back exactly as ``128 * sum(w)``), and products of consecutive input features are
    added in int16 with saturation.
    """
    x = np.asarray(qx)
    x = x.reshape(len(x), -1)
    if vnni:
        return dense_int(x, qw)
    w = np.asarray(qw).astype(np.int64)
    shift = 128 if x.dtype == np.int8 else 0
    xs = x.astype(np.int64) + shift
    # a dense layer is a 1x1 convolution over features
    acc = _conv(xs[:, :, None], w[:, :, None], 1, 0, 1, 1, _int16_pairs_sum)[:, :, 0]
    return acc - shift * w.sum(axis=1)[None]


# -- epilogue -----------------------------------------------------------------------------
def requantize(acc, m, dtype, relu=False, residual=None, fused=True):
    """``saturate(round_half_even(relu(f32(f32(acc) * m) [+ q_r * m_r])))``.

    ``residual`` is ``(q_r, m_r)``, added to the float32 product with one rounding (float64
    is exact for it: an 8-bit integer times a float32), as a layer's fused residual is;
    ``fused=False`` rounds ``q_r * m_r`` to float32 first and adds in float32 (the
    requantize of an int8 add or concat).
    """
    y = (np.asarray(acc).astype(np.float32) * np.asarray(m, np.float32)).astype(np.float32)
    if residual is not None:
        q_r, m_r = residual
        t = np.asarray(q_r).astype(np.float64) * np.float64(_f32(m_r))
        if not fused:
            t = t.astype(np.float32)
        y = (y.astype(np.float64) + t.astype(np.float64)).astype(np.float32)
    if relu:
        y = np.maximum(y, _f32(0))
    a, b = BOUNDS[dtype]
    return np.clip(np.rint(y.astype(np.float64)), a, b).astype(np.dtype(dtype))


def _per_channel(v, units, shape):
    return np.broadcast_to(np.asarray(v).reshape(-1), (units,)).reshape(shape)


def layer(kind, w, b, x, in_dtype='auto', in_range=None, out_dtype='float32', out_range=None,
          per_channel=True, relu=False, residual=None, residual_qp=None, geometry=None,
          flatten=True):
    """A quantized dense (``kind='dense'``) or convolution (``'conv'``) layer.

    Parameters
    ----------
    w, b : float weights (O, I) / (O, C/G, *k) and bias (O,) or None.
    x : float32 input, or ``(q, dtype, lo, hi)`` already quantized.
    in_dtype, in_range : 'auto'/'int8'/'uint8' and the calibrated input range, or None
        (dynamic: the range of ``x``; 'auto' is int8 then).
    out_dtype, out_range : 'float32', or 'auto'/'int8'/'uint8' with the calibrated output
        range (None: dynamic, the range of the float result).
    relu : bool
        Fused ReLU (an output range then starts at 0).
    residual, residual_qp : residual input: float32 (with a float output), or integers with
        ``residual_qp = (dtype, lo, hi)``.
    geometry : dict with 'stride', 'pad', 'dilate', 'groups' (conv).

    Returns
    -------
    float32 array, or ``(q, dtype, lo, hi)`` for int8/uint8 output.
    """
    w = np.asarray(w, np.float32)
    units = w.shape[0]
    if isinstance(x, tuple):
        qx, dt_in, lo, hi = x
        if in_range is not None:
            dt_in, lo, hi = resolve_range(in_dtype, *in_range)
        static = in_range is not None
    elif in_range is not None:
        dt_in, lo, hi = resolve_range(in_dtype, *in_range)
        qx, static = quantize(x, dt_in, lo, hi), True
    else:
        dt_in, lo, hi = dynamic_range(x, 'int8' if in_dtype == 'auto' else in_dtype)
        qx, static = quantize(x, dt_in, lo, hi), False
    m_in = _mag(lo, hi)
    inv_x = inv_scale(dt_in, m_in)
    if static:
        qw, s_w = weight_q_for_bias(w, b, _f32(np.float64(m_in) / Q[dt_in]), dt_in,
                                    per_channel)
    else:
        qw, s_w = weight_q(w, per_channel)
    if kind == 'dense':
        acc = dense_int(qx, qw, flatten)
        shape = (1, -1) if flatten else (-1,)
    else:
        g = geometry or {}
        acc = conv_int(qx, qw, g.get('stride', 1), g.get('pad', 0), g.get('dilate', 1),
                       g.get('groups', 1))
        shape = (1, -1) + (1,) * (acc.ndim - 2)
    inv_w = _weight_inv(s_w)
    if b is not None:
        if static:
            qb = bias_q(b, _f32(np.float64(m_in) / Q[dt_in]), s_w, qw, dt_in)
        else:
            qb = _bias_q_dynamic(b, inv_x, _per_channel(inv_w, units, (-1,)),
                                 int(np.prod(w.shape[1:])), dt_in)
        acc = acc + _per_channel(qb, units, shape)
    s_x = np.float64(m_in) / Q[dt_in]
    real = acc.astype(np.float64) * s_x * _per_channel(s_w, units, shape).astype(np.float64)
    if residual is not None and residual_qp is not None:
        r_dt, r_lo, r_hi = residual_qp
        real_r = np.asarray(residual).astype(np.float64) * _mag(r_lo, r_hi) / Q[r_dt]
    if out_dtype == 'float32' or out_range is None:
        y = real
        if residual is not None:
            y = y + (real_r if residual_qp is not None else
                     np.asarray(residual, np.float32).astype(np.float64))
        if relu:
            y = np.maximum(y, 0)
        if out_dtype == 'float32':
            return y.astype(np.float32)
        dt = out_dtype if out_dtype != 'auto' else ('uint8' if relu else 'int8')
        # dynamic output: gluonq computes the float32 result first and quantizes it with its
        # own range, so the float32 values come from the float epilogue
        y32 = y.astype(np.float32)
        dt, o_lo, o_hi = dynamic_range(y32, dt)
        return quantize(y32, dt, o_lo, o_hi), dt, o_lo, o_hi
    lo_o = 0.0 if relu else min(float(out_range[0]), 0.0)
    dt, o_lo, o_hi = resolve_range(out_dtype, lo_o, max(float(out_range[1]), 0.0))
    inv_out = inv_scale(dt, o_hi)
    m = ((inv_out / inv_x).astype(np.float32) / inv_w).astype(np.float32)
    res = None
    if residual is not None:
        r_dt, r_lo, r_hi = residual_qp
        res = (residual, _f32(inv_out / inv_scale(r_dt, _mag(r_lo, r_hi))))
    return requantize(acc, _per_channel(m, units, shape), dt, relu, res), dt, o_lo, o_hi


# -- error bound --------------------------------------------------------------------------
def error_bound(kind, w, x, in_dtype='auto', in_range=None, per_channel=True, geometry=None,
                flatten=True, bias=True):
    """Per-output bound on |float-output int8 layer - float layer| for inputs in range.

    With ``x = x^ + dx`` (``|dx| <= s_x / 2``) and ``w = w^ + dw`` (``dw`` known exactly from
    :func:`weight_q`): ``|x.w - x^.w^| <= sum |dx| |w| + sum |x^| |dw|``, plus half a bias
    step ``s_x s_w / 2`` and float32 slack (``FLOAT_RTOL`` of the largest partial sum).
    ``x`` is float; ``in_range=None`` means dynamic (the range of ``x``).
    """
    w = np.asarray(w, np.float64)
    if in_range is not None:
        dt, lo, hi = resolve_range(in_dtype, *in_range)
    else:
        dt, lo, hi = dynamic_range(x, 'int8' if in_dtype == 'auto' else in_dtype)
    m = _mag(lo, hi)
    s_x = m / Q[dt]
    x_hat = np.asarray(quantize(x, dt, lo, hi), np.float64) * s_x
    qw, s_w = weight_q(w.astype(np.float32), per_channel)
    sw = _per_channel(s_w, len(w), (-1,) + (1,) * (w.ndim - 1)).astype(np.float64)
    dw = np.abs(w - qw.astype(np.float64) * sw)
    dx = 0.5 * s_x * (1 + 1e-6)                # float32 x * inv may sit a hair off
    if kind == 'dense':
        xf = x_hat.reshape(len(x_hat), -1) if flatten else x_hat
        def prod(a, b_):
            return np.tensordot(a, b_, axes=([-1], [1]))
        shape = (1, -1) if flatten else (-1,)
    else:
        g = geometry or {}
        xf = x_hat

        def prod(a, b_):
            return _float_conv(a, b_, g)
        shape = (1, -1) + (1,) * (w.ndim - 2)
    bound = prod(dx * np.ones_like(xf), np.abs(w)) + prod(np.abs(xf), dw)
    scale = prod(np.abs(xf), np.abs(w))
    if bias:
        bound = bound + 0.5 * s_x * _per_channel(s_w, len(w), shape)
    return bound + FLOAT_RTOL * (scale + 1.0) + 1e-7


def _float_conv(x, w, g):
    """float64 convolution through the same patches as :func:`conv_int`."""
    return _conv(x, w, g.get('stride', 1), g.get('pad', 0), g.get('dilate', 1),
                 g.get('groups', 1), _exact_sum, np.float64)


# -- affine uint8 inputs ----------------------------------------------------------------------
def affine_qparams(lo, hi):
    """``(inv, z)`` of the affine uint8 range [lo, hi] (lo < 0), by the documented rule:
    ``z = floor(-lo * 255 / (hi - lo) + 1e-4)`` (0: plain uint8), the span
    ``-lo * 255 / z`` snapped as a uint8 magnitude, ``inv = f32(255 / span)``."""
    lo, hi = float(lo), float(hi)
    z = int(min(np.floor(-lo * 255 / (hi - lo) + 1e-4), 255))
    if z <= 0:
        return None, 0
    inv = _f32(_f32(255) / _f32(snap_max(-lo * 255 / z, 'uint8')))
    return inv, z


def affine_span(lo, hi):
    """The snapped span ``255 / inv`` of :func:`affine_qparams` (float32)."""
    z = affine_qparams(lo, hi)[1]
    return _f32(snap_max(-float(lo) * 255 / z, 'uint8'))


def affine_quantize(x, inv, z):
    """``clip(rne(f32(x * inv)), -z, 255 - z) + z`` as uint8."""
    y = (np.asarray(x, np.float32) * inv).astype(np.float32).astype(np.float64)
    return (np.rint(np.clip(y, -z, 255 - z)) + z).astype(np.uint8)


def affine_layer(kind, w, b, x, in_range, per_channel=True, geometry=None, flatten=True):
    """Float output of a dense/conv layer with an affine uint8 input (float32 ``x``, the
    calibrated ``in_range``): ``(sum(q_w * (q_x - z)) + q_b) * s_x * s_w``, exact."""
    w = np.asarray(w, np.float32)
    units = w.shape[0]
    inv, z = affine_qparams(*in_range)
    qx = affine_quantize(x, inv, z).astype(np.int64)
    s_x = _f32(np.float64(affine_span(*in_range)) / 255)
    qw, s_w = weight_q_for_bias(w, b, s_x, 'uint8', per_channel, affine=True)
    if kind == 'dense':
        acc = dense_int(qx - z, qw, flatten)
        shape = (1, -1) if flatten else (-1,)
    else:
        g = geometry or {}
        nd = qx.ndim - 2
        pad = _geometry(nd, 1, g.get('pad', 0), 1)[1]
        padded = np.pad(qx, [(0, 0), (0, 0)] + [(p, p) for p in pad], constant_values=z)
        acc = conv_int(padded - z, qw, g.get('stride', 1), 0, g.get('dilate', 1),
                       g.get('groups', 1))
        shape = (1, -1) + (1,) * (acc.ndim - 2)
    if b is not None:
        v = _round_half_away(np.asarray(b, np.float64) /
                             (np.float64(s_x) * np.asarray(s_w, np.float64)))
        h = 2 * MAX_ABS['uint8'] * np.abs(qw.astype(np.int64).reshape(units, -1)).sum(axis=1)
        acc = acc + _per_channel(np.clip(v, -(INT32_MAX - h), INT32_MAX - h), units, shape)
    real = acc.astype(np.float64) * np.float64(s_x) * \
        _per_channel(s_w, units, shape).astype(np.float64)
    return real.astype(np.float32)
