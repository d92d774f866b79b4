"""The quantization math of gluonq, in one place.

A quantized tensor is *symmetric* (``r = q * scale``, no zero point) or, for uint8 activations
with a lopsided range, *affine* (``r = (q - z) * scale``):

* ``int8``: range ``[-M, M]``, ``scale = M / 127``; activations saturate to [-128, 127] (as
  oneDNN and ONNX do), weights are kept in [-127, 127].
* ``uint8``: ``q`` in [0, 255], range ``[0, M]``, ``scale = M / 255``; only for tensors whose
  calibrated minimum is >= 0 (after ReLU, say).
* affine ``uint8``: range ``[lo, hi]`` with ``lo < 0``: ``scale = (hi - lo) / 255`` and the
  zero point ``z = round(-lo / scale)`` in [1, 255], the integer that stands for a real 0.
  A layer reading it computes ``sum(q_w * (q_x - z)) = sum(q_w * q_x) - z * sum(q_w)``: the
  second term is folded into its int32 bias, and padding uses ``z`` (see :class:`QParams`).
* ``int32``: accumulators ``acc = sum(q_x * q_w) + q_b`` at ``scale = s_x * s_w``.

Weights are int8 with ``scale = max|w| / 127`` per tensor or per output channel (max-abs, so
that oneDNN's own weight quantization reproduces the same integers). Biases are int32 at
``s_x * s_w`` (the scheme of TFLite, ONNX QLinearConv and Brevitas' Int8Bias); where a bias is
too large for int32 at that scale (a tiny input range, a channel of near-zero weights), the
channel's weight scale is raised until it fits (:func:`quantize_weight_for_bias`). The epilogue
of a layer turns ``acc`` into its output:

* float output: ``y = float32(acc) * (s_x * s_w)``;
* int8/uint8 output ("requantize"): ``q_y = saturate(round(float32(acc) * m))`` with
  ``m = s_x * s_w / s_y``, plus ``float32(q_r) * (s_r / s_y)`` for a fused residual ``r``.

Rounding of activations is half to even everywhere (quantize and requantize), as oneDNN and
ONNX do. Scales are float32 and always derived here from ranges, never taken from a range an
MXNet operator reports (``quantized_conv`` reports a wrong one for uint8 data). Multipliers
are computed in float32 in the same order as oneDNN's fused kernels compute them from
*inverse* scales (integer steps per real unit, ``inv = Q / M``), so that gluonq's own int8
chain and the fused fast path produce the same integers:
``m = (inv_out / inv_in) / inv_w`` with ``inv_w = 127.5 / (127.5 * s_w)``.

The functions named ``*_f`` build these steps from MXNet operators (``F`` is ``mx.nd`` or
``mx.sym``); the ``*_np`` functions are the numpy reference of the same arithmetic, exact
integer accumulation included, that the tests compare MXNet's results against.

The functions named ``*_np`` are the numpy reference of the integer arithmetic: they are exact
(int64 accumulation) and the tests compare MXNet's int8 results against them.
"""
from __future__ import annotations

import numpy as np

__all__ = ['QRANGE', 'QBOUNDS', 'QParams', 'EPS_RANGE', 'dtype_for_range', 'scale_from_range',
           'scale_from_max', 'quantize_weight', 'quantize_weight_for_bias', 'quantize_bias',
           'bias_headroom',
           'fold_zero_point', 'accumulator_bound',
           'inv_scale_f', 'affine_inv_scale_f', 'quantize_affine_f', 'dequantize_affine_f',
           'affine_inv_scale_np', 'zero_point_np', 'SCHEMES', 'weight_inv_scale_f',
           'requantize_multiplier_f', 'quantize_f',
           'dynamic_range_f', 'dequantize_f', 'dequantize_acc_f', 'requantize_f',
           'bias_to_int32_f', 'round_half_even_f', 'split_operand_f', 'matmul_bound',
           'matmul_int_f',
           'inv_scale_np', 'weight_inv_scale_np', 'requantize_multiplier_np', 'quantize_np',
           'dequantize_np', 'requantize_np', 'conv_int_np', 'conv_np', 'dense_int_np',
           'onednn_conv_np', 'onednn_dense_np', 'sqnr_db']

#: Largest integer magnitude of each quantized dtype (the symmetric ranges used everywhere).
QRANGE = {'int8': 127, 'uint8': 255}
#: Largest |q| of each activation dtype (int8 saturates at -128).
QRANGE_MAX_ABS = {'int8': 128, 'uint8': 255}
#: Saturation bounds of activations of each integer dtype (weights use [-127, 127]).
QBOUNDS = {'int8': (-128, 127), 'uint8': (0, 255), 'int32': (-(2 ** 31 - 1), 2 ** 31 - 1)}
#: Largest float32 below 2**31: float values are clipped to it before a cast to int32.
INT32_FLOAT_MAX = 2147483520.0
#: Adding and subtracting 1.5 * 2**23 rounds a float32 |y| < 2**22 half to even.
_RNE_MAGIC = 12582912.0
#: Smallest range magnitude gluonq uses: an all-zero tensor gets this range instead of 0, so
#: that no scale is ever 0 and nothing divides by zero. Real values this small quantize to 0.
EPS_RANGE = 1e-30


def dtype_for_range(lo, hi, dtype='auto'):
    """Resolve ``dtype`` ('auto', 'int8' or 'uint8') for a tensor with real range [lo, hi].

    'auto' picks uint8 when ``lo >= 0`` (the whole range is then usable) and int8 otherwise.
    Asking for uint8 with ``lo < 0`` is an error: the negative part would be lost.
    """
    if dtype == 'auto':
        return 'uint8' if lo >= 0 else 'int8'
    if dtype not in QRANGE:
        raise ValueError("quantized dtype must be 'auto', 'int8' or 'uint8', got %r" % (dtype,))
    if dtype == 'uint8' and lo < 0:
        raise ValueError('uint8 needs a range with min >= 0, got [%g, %g]' % (lo, hi))
    return dtype


def scale_from_max(max_abs, dtype):
    """float32 scale for a symmetric range of magnitude ``max_abs`` (array or scalar)."""
    m = np.maximum(np.abs(np.asarray(max_abs, dtype=np.float64)), EPS_RANGE)
    return (m / QRANGE[dtype]).astype(np.float32)



def scale_from_range(lo, hi, dtype):
    """float32 scale of the real range [lo, hi] held as ``dtype`` (symmetric, no zero point)."""
    return scale_from_max(max(abs(float(lo)), abs(float(hi))), dtype)


#: MXNet's own range constants (``kInt8Range``, ``kUint8Range``): its fused int8 kernels and
#: ``quantize_v2`` take ``Q' / R`` integer steps per real unit for a range magnitude ``R``.
MX_QRANGE = {'int8': 127.5, 'uint8': 255.5}


def _mx_expressible(inv, mx_dtype):
    """Is there a float32 ``R`` with ``f32(Q' / R) == inv`` (Q' of ``mx_dtype``)?"""
    qm = np.float32(MX_QRANGE[mx_dtype])
    r0 = np.array([np.float32(qm / inv)]).view(np.int32)[0]
    rs = np.arange(r0 - 2, r0 + 3, dtype=np.int32).view(np.float32)
    return bool(np.any((qm / rs).astype(np.float32) == inv))


def snap_range_max(m, dtype, window=256):
    """The float32 range magnitude nearest ``m`` (a few ulps) whose inverse scale
    ``f32(Q / m)`` MXNet can express as ``f32(Q' / R)`` for some float32 ``R``.

    Division by a float32 skips some results, so about 1 range in 7 has no such ``R``; moving
    the range by a few ulps (far below calibration noise) lets the fused kernels of the fast
    path (``gluonq.lower``) use exactly gluonq's scales. An int8 range is made expressible in
    MXNet's uint8 convention too, because a ReLU'd int8 tensor (values 0..127) is typed uint8
    there.
    """
    q = np.float32(QRANGE[dtype])
    conventions = ('int8', 'uint8') if dtype == 'int8' else ('uint8',)
    m0 = np.float32(m)
    bits = np.array([m0]).view(np.int32)[0]
    for k in range(window + 1):
        for cand_bits in ((bits + k, bits - k) if k else (bits,)):
            cand = np.array([cand_bits], np.int32).view(np.float32)[0]
            if not np.isfinite(cand) or cand <= 0:
                continue
            inv = np.float32(q / cand)
            if all(_mx_expressible(inv, c) for c in conventions):
                return float(cand)
    return float(m0)


SCHEMES = ('symmetric', 'affine')


def affine_inv_scale_np(lo, hi):
    """float32 integer steps per real unit of an affine uint8 range: ``255 / (hi - lo)``."""
    span = np.float32(max(float(np.float32(np.float32(hi) - np.float32(lo))), EPS_RANGE))
    return np.float32(np.float32(QRANGE['uint8']) / span)


def zero_point_np(lo, hi):
    """Zero point of the affine uint8 range [lo, hi]: ``round_half_even(-lo * inv)``."""
    inv = affine_inv_scale_np(lo, hi)
    return int(np.clip(np.rint(np.float32(-np.float32(lo) * inv)), 0, 255))


def _affine_range(lo, hi):
    """float32 ``(lo, hi)`` of an affine uint8 range covering [lo, hi] (lo < 0 <= hi).

    The zero point is ``z = floor(-lo * 255 / (hi - lo) + 1e-4)`` (the 1e-4 absorbs float32
    rounding of the bounds) and the scale ``-lo / z``, so that
    ``lo`` itself is an integer step (the minimum is often where many values sit: a
    normalized image's background, the flat end of hardswish or GELU) and ``hi`` stays
    covered. The span ``255 * scale`` is snapped like a symmetric range
    (:func:`snap_range_max`), so that MXNet's fused kernels take the same inverse scale;
    ``lo`` becomes ``-z / inv`` and ``hi`` is chosen so that ``float32(hi - lo)`` is the span
    exactly. Re-deriving from the result gives the same values (the spec round-trips).
    Returns None when ``z`` would be 0 (a plain uint8 range then).
    """
    lo, hi = float(lo), float(hi)
    if _is_affine_range(lo, hi):
        return lo, hi
    z = int(min(np.floor(-lo * QRANGE['uint8'] / max(hi - lo, EPS_RANGE) + 1e-4), 255))
    if z <= 0:
        return None
    span = np.float32(snap_range_max(-lo * QRANGE['uint8'] / z, 'uint8'))
    inv = np.float32(np.float32(QRANGE['uint8']) / span)
    if z == 255:
        return -float(span), 0.0
    lo0 = np.float32(-np.float32(np.float32(z) / inv))
    steps = np.arange(-32, 33, dtype=np.int32)
    for dl in steps[np.argsort(np.abs(steps), kind='stable')]:    # nearest -z / inv first
        lo32 = (np.array([lo0]).view(np.int32) + dl).view(np.float32)[0]
        hi0 = np.float32(lo32 + span)
        for dh in (0, 1, -1, 2, -2):
            hi32 = (np.array([hi0]).view(np.int32) + dh).view(np.float32)[0]
            if np.float32(hi32 - lo32) == span and zero_point_np(lo32, hi32) == z:
                return float(lo32), float(hi32)
    raise ArithmeticError('no float32 affine range for [%r, %r]' % (lo, hi))


def _is_affine_range(lo, hi):
    """Is [lo, hi] already a range :func:`_affine_range` gives (float32 bounds, snapped
    span, ``lo`` within 32 ulps of ``-z / inv``)?"""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if float(lo32) != lo or float(hi32) != hi or not lo < 0 <= hi:
        return False
    span = np.float32(hi32 - lo32)
    if float(span) != snap_range_max(float(span), 'uint8'):
        return False
    z = zero_point_np(lo32, hi32)
    if z == 255:
        return hi == 0.0 and lo32 == -span
    inv = np.float32(np.float32(QRANGE['uint8']) / span)
    lo0 = np.float32(-np.float32(np.float32(z) / inv))
    dist = abs(int(np.array([lo32]).view(np.int32)[0]) - int(np.array([lo0]).view(np.int32)[0]))
    return 0 < z and dist <= 32


class QParams:
    """Quantization parameters of one activation tensor: dtype, real range and scheme.

    ``min``/``max`` are in real units. Symmetric: int8 ranges have ``min == -max``, uint8
    ranges ``min == 0``. Affine (``scheme='affine'``, uint8 only): ``min < 0`` and the zero
    point is :attr:`zero_point`; an affine request for a range with ``min >= 0`` (or whose
    zero point rounds to 0) gives a plain uint8 range. Plain data: ``to_dict``/``from_dict``
    give JSON.
    """
    __slots__ = ('dtype', 'min', 'max', 'scheme')

    def __init__(self, dtype, lo, hi, scheme='symmetric'):
        if scheme not in SCHEMES:
            raise ValueError("quantization scheme must be 'symmetric' or 'affine', got %r"
                             % (scheme,))
        rng = None
        if scheme == 'affine':
            if dtype not in ('uint8', 'auto'):
                raise ValueError("the affine scheme holds uint8 tensors, got dtype %r"
                                 % (dtype,))
            rng = _affine_range(min(float(lo), 0.0), max(float(hi), 0.0)) \
                if float(lo) < 0 else None
            dtype, lo = 'uint8', max(float(lo), 0.0)
        self.scheme = 'symmetric'
        if rng is not None:
            self.dtype, self.scheme = 'uint8', 'affine'
            self.min, self.max = rng
            return
        self.dtype = dtype_for_range(lo, hi, dtype)
        m = snap_range_max(max(abs(float(lo)), abs(float(hi)), EPS_RANGE), self.dtype)
        self.min = 0.0 if self.dtype == 'uint8' else -m
        self.max = m

    @classmethod
    def from_observed(cls, lo, hi, dtype='auto', scheme='symmetric'):
        """QParams covering an observed [lo, hi] (0 is always inside the range)."""
        return cls(dtype, min(float(lo), 0.0), max(float(hi), 0.0), scheme)

    @property
    def is_affine(self):
        return self.scheme == 'affine'

    @property
    def zero_point(self):
        """The integer that holds a real 0: 0 for symmetric tensors."""
        return zero_point_np(self.min, self.max) if self.is_affine else 0

    @property
    def inv_scale(self):
        """Integer steps per real unit (float32)."""
        if self.is_affine:
            return affine_inv_scale_np(self.min, self.max)
        return inv_scale_np(self.min, self.max, self.dtype)

    @property
    def scale(self):
        """Real value of one integer step (float32)."""
        if self.is_affine:
            return np.float32(np.float32(self.max - self.min) / QRANGE['uint8'])
        return scale_from_max(self.max, self.dtype)

    def to_dict(self):
        d = {'dtype': self.dtype, 'min': self.min, 'max': self.max}
        if self.is_affine:
            d['scheme'] = 'affine'
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(d['dtype'], d['min'], d['max'], d.get('scheme', 'symmetric'))

    def __eq__(self, other):
        return isinstance(other, QParams) and self.to_dict() == other.to_dict()

    def __repr__(self):
        if self.is_affine:
            return 'QParams(uint8 affine, [%g, %g], zero_point=%d)' % (
                self.min, self.max, self.zero_point)
        return 'QParams(%s, [%g, %g])' % (self.dtype, self.min, self.max)


def _round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def inv_scale_np(lo, hi, dtype):
    """float32 integer steps per real unit: ``Q / max(|lo|, |hi|)``."""
    m = np.float32(max(abs(float(np.float32(lo))), abs(float(np.float32(hi))), EPS_RANGE))
    if dtype == 'auto':
        dtype = 'uint8' if lo >= 0 else 'int8'
    return np.float32(np.float32(QRANGE[dtype]) / m)


def weight_inv_scale_np(s_w):
    """Weight inverse scale ``127.5 / (127.5 * s_w)`` in float32, as oneDNN's fused kernels
    derive it from :func:`fused_weight_image` (mathematically ``1 / s_w``)."""
    s_w = np.asarray(s_w, np.float32)
    return (np.float32(127.5) / (s_w * np.float32(127.5)).astype(np.float32)).astype(np.float32)


def requantize_multiplier_np(inv_out, inv_in, inv_w):
    """``(inv_out / inv_in) / inv_w`` in float32, oneDNN's order."""
    return (np.float32(np.float32(inv_out) / np.float32(inv_in)) /
            np.asarray(inv_w, np.float32)).astype(np.float32)


def quantize_np(x, qp):
    """Reference of the quantize step: ``saturate(round_half_even(float32(x) * inv))``.

    ``inv = Q / M`` in float32, exactly as MXNet's ``contrib.quantize`` computes it.
    An affine tensor adds its zero point after rounding: ``clip(rne(x * inv), -z, 255 - z) + z``.
    """
    lo, hi = QBOUNDS[qp.dtype]
    z = qp.zero_point
    y = np.clip((np.asarray(x, np.float32) * qp.inv_scale).astype(np.float32), lo - z, hi - z)
    return (np.rint(y) + z).astype(np.int8 if qp.dtype == 'int8' else np.uint8)


def dequantize_np(q, qp):
    """Real values of integers ``q`` held with QParams ``qp``: ``float32(q - z) / inv``."""
    return ((q.astype(np.float32) - np.float32(qp.zero_point)) / qp.inv_scale).astype(
        np.float32)


def quantize_weight(w, per_channel=True, axis=0):
    """Symmetric int8 weights: ``(q, scale)`` with ``q`` in [-127, 127], float32 ``scale``.

    ``scale`` is max|w| / 127 over the whole tensor, or per slice along ``axis`` (the output
    channel) when ``per_channel``; rounding is half away from zero. An all-zero slice gets
    zero integers and scale 1/127 (any scale multiplies zeros; a normal one keeps the int32
    bias ``b / (s_in * s_w)`` of such a channel in range).

    Per channel, the float32 scale is the one nearest max|w| / 127 (within 0.3%) for which
    oneDNN's fused int8 kernels, which re-derive int8 weights from float images
    (``127.5 / max|image|``, half to even), give back exactly these integers from
    :func:`fused_weight_image`; see ``gluonq.lower``.
    """
    w = np.asarray(w, dtype=np.float32)
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
    max_abs = np.max(np.abs(wc), axis=1) if wc.size else np.zeros(wc.shape[0])
    scale = scale_from_max(np.where(max_abs > 0, max_abs, 1.0), 'int8')
    if per_channel:
        scale = _fused_exact_scales(wc, scale)
    q = _quantize_rows(wc, scale)
    if per_channel:
        q = np.moveaxis(q.reshape((w.shape[axis],) + tuple(np.delete(w.shape, axis))), 0, axis)
    else:
        q = q.reshape(w.shape)
    return q, scale.astype(np.float32)


def _quantize_rows(wc, scale):
    q = _round_half_away(wc.astype(np.float64) / scale.astype(np.float64)[:, None])
    return np.clip(q, -127, 127).astype(np.int8)


_GOOD_MANTISSAS = None


def _good_mantissas():
    """Mantissa bits of the float32 ``m`` for which ``f32(m * f32(127.5 / m)) < 127.5``.

    For such ``m``, oneDNN maps a weight image ``-m`` to -127 (not -128). The property only
    depends on the mantissa (scaling by 2 cancels); a minority of mantissas have it, unevenly
    spread over the binade.
    """
    global _GOOD_MANTISSAS
    if _GOOD_MANTISSAS is None:
        bits = np.arange(2 ** 23, dtype=np.uint32)
        m = (bits | np.uint32(0x3F800000)).view(np.float32)
        inv = (np.float32(127.5) / m).astype(np.float32)
        _GOOD_MANTISSAS = bits[(m * inv).astype(np.float32) < np.float32(127.5)].astype(np.int64)
    return _GOOD_MANTISSAS


def _fused_rederive_ok(wc, scale):
    """Per row: do the fused kernel's re-derived integers equal ours at this scale?"""
    q = _quantize_rows(wc, scale)
    img = fused_weight_image(q, scale)
    inv = weight_inv_scale_np(scale)
    back = np.clip(np.rint((img * inv[:, None]).astype(np.float32)), -128, 127)
    return np.all(back == q, axis=1)


def _fused_exact_scales(wc, s0):
    """Per-channel float32 scales near ``s0`` whose weights re-derive exactly in oneDNN.

    A channel whose largest-magnitude weight is negative (no +127) may not re-derive at
    ``s0`` (its image ``-f32(127.5 * s)`` maps to -128 unless ``m = f32(127.5 * s)`` is one
    of :func:`_good_mantissas`, or a positive weight reaches +127 at ``s``). Of the float32
    scales within 0.3% of ``s0``, the one nearest ``s0`` in float32 steps (ties: the larger)
    that re-derives exactly is taken; only scales of those two kinds are tried.
    """
    scale = s0.astype(np.float32).copy()
    for c in np.flatnonzero(~_fused_rederive_ok(wc, scale)):
        s0c = scale[c:c + 1]
        s0b = int(s0c.view(np.int32)[0])
        w_p = float(wc[c].max())
        # the candidates nearest s0 first: a window of float32 steps around it, widened
        # until one re-derives or the window covers the 0.3%
        k = 16
        while True:
            ss, covers = _scale_candidates(s0c, s0b - k, s0b + k, w_p)
            ok = _fused_rederive_ok(np.repeat(wc[c:c + 1], ss.size, axis=0), ss) \
                if ss.size else np.zeros(0, bool)
            if ok.any():
                scale[c] = ss[int(np.argmax(ok))]
                break
            if covers:
                break
            k *= 4
    return scale


def _scale_candidates(s0, lo, hi, w_p):
    """The float32 scales with bits in ``[lo, hi]``, within 0.3% of ``s0`` (shape (1,)), that
    :func:`_fused_exact_scales` tries, nearest ``s0`` first (ties: the larger); and whether
    ``[lo, hi]`` covers every scale within 0.3%.

    They lie within 3 float32 steps of ``f32(m / 127.5)`` for a good ``m`` (the mantissas
    of :func:`_good_mantissas`, ``m`` within 0.31% of ``127.5 * s0``) or of
    ``f32(w_p / 126.5)`` (the largest positive weight ``w_p`` then reaches +127).
    """
    s0c = float(s0[0])
    f = np.float32
    mb = lambda v: int(np.array([v], f).view(np.uint32)[0])   # noqa: E731
    # m = f32(127.5 s) is monotonic in s: the good m whose f32(m / 127.5) can fall within
    # 3 steps of [lo, hi] lie within a few steps of f32(127.5 s) at the window's ends
    ends = np.array([lo - 3, hi + 3], np.int32).view(f)
    m_lo = max(mb(f(127.5) * ends[0]) - 4, mb(127.5 * s0c * (1 - 3.1e-3)))
    m_hi = min(mb(f(127.5) * ends[1]) + 4, mb(127.5 * s0c * (1 + 3.1e-3)))
    mbits = np.arange(m_lo, m_hi + 1, dtype=np.int64)
    good = _good_mantissas()
    mant = mbits & 0x7FFFFF
    at = np.minimum(np.searchsorted(good, mant), good.size - 1)
    ms = mbits[good[at] == mant].astype(np.uint32).view(f)
    near = [(ms / f(127.5)).astype(f)]
    if w_p > 0:
        near.append(np.array([w_p / 126.5], f))
    nb = np.concatenate(near).view(np.int32).astype(np.int64)
    sb = np.unique(nb[:, None] + np.arange(-3, 4))
    sb = sb[(sb >= lo) & (sb <= hi)]
    s0b = int(s0.view(np.int32)[0])
    ss = sb[np.lexsort((-sb, np.abs(sb - s0b)))].astype(np.int32).view(f)
    ss = ss[np.abs(ss.astype(np.float64) / s0c - 1) <= 3e-3]
    edges = np.array([lo, hi], np.int32).view(f).astype(np.float64) / s0c - 1
    return ss, bool(edges[0] < -3e-3 and edges[1] > 3e-3)


def fused_weight_image(q, scale, axis=0):
    """float32 weights that oneDNN's fused kernels re-quantize back into exactly ``q``.

    Each element is ``q * s``, except one extreme element per output channel, stored as
    ``+-f32(127.5 * s)`` so that the kernel's own scale ``127.5 / max|image|`` is
    ``weight_inv_scale_np(s)`` (MXNet's fused ops use 127.5 where gluonq uses 127).
    """
    q = np.asarray(q)
    qc = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1).astype(np.float32)
    s = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (qc.shape[0],))
    img = (qc * s[:, None]).astype(np.float32)
    # per channel, the first +127, else the first -127
    pos, neg = qc == 127, qc == -127
    rows = np.flatnonzero(pos.any(axis=1) | neg.any(axis=1))
    k = np.where(pos.any(axis=1), pos.argmax(axis=1), neg.argmax(axis=1))[rows]
    img[rows, k] = np.sign(qc[rows, k]) * (np.float32(127.5) * s[rows]).astype(np.float32)
    return np.moveaxis(img.reshape((q.shape[axis],) + tuple(np.delete(q.shape, axis))), 0, axis)


def quantize_weight_for_bias(w, b, s_in, in_dtype, zero_point=0, per_channel=True, axis=0):
    """:func:`quantize_weight` for a layer with float bias ``b`` and input scale ``s_in``:
    ``(q, scale, raised)``, ``raised`` the indices of the channels whose scale was raised.

    A channel whose int32 bias ``|b| / (s_in * s_w)`` would exceed the room beside the
    accumulator's headroom (:func:`quantize_bias`) gets the smallest float32 scale at which it
    fits, instead of a bias that saturates (onnxruntime's ``_adjust_weight_scale_for_int32_bias``
    does the same). Such a channel's output is nearly all bias: the coarser weight step moves
    it by at most ``K * Q / (2 * room)`` of ``|b|`` (``K`` weights per channel, ``Q`` the
    input's largest integer; 3e-4 for K = 4608 uint8 inputs, far less in practice), where a
    saturated bias loses all of its excess. The headroom counted is that of the max-abs
    integers plus one step per weight (room for AdaRound's rounding up); with per-tensor
    weights the one scale is raised.
    """
    q, scale = quantize_weight(w, per_channel=per_channel, axis=axis)
    w = np.moveaxis(np.asarray(w, np.float32), axis, 0)
    n_out, k = w.shape[0], w[0].size
    room = QBOUNDS['int32'][1] - bias_headroom(np.moveaxis(q, axis, 0), in_dtype, zero_point) \
        - QRANGE_MAX_ABS[in_dtype] * k * (2 if zero_point else 1)
    need = 1.0001 * np.abs(np.asarray(b, np.float64)).reshape(-1) / \
        (np.float64(s_in) * np.maximum(room, 1))
    if not per_channel:
        need = need.max(keepdims=True)
    low = np.flatnonzero(scale < need)
    if not low.size:
        return q, scale, low
    scale = scale.copy()
    s = need[low].astype(np.float32)
    scale[low] = np.where(s < need[low], np.nextafter(s, np.float32(np.inf)), s)
    wc = w.reshape(scale.size, -1)
    qc = np.moveaxis(q, axis, 0).reshape(wc.shape).copy()
    qc[low] = _quantize_rows(wc[low], scale[low])
    q = np.moveaxis(qc.reshape(w.shape), 0, axis)
    return q, scale, (low if per_channel else np.arange(n_out))


def quantize_bias(b, s_in, s_w, headroom=0):
    """int32 bias at scale ``s_in * s_w`` (per output channel): ``round(b / (s_in * s_w))``.

    Saturates instead of wrapping around, at ``+-(2**31 - 1 - headroom)``: ``headroom`` (per
    channel) is the largest ``|sum(q_x * q_w)|`` the layer can add, so that the accumulator
    ``sum + bias`` never leaves int32 either.
    """
    bias_scale = np.float64(s_in) * np.asarray(s_w, np.float64)
    q = _round_half_away(np.asarray(b, np.float64) / bias_scale)
    lim = QBOUNDS['int32'][1] - np.asarray(headroom, np.int64)
    return np.clip(q, -lim, lim).astype(np.int32)


def bias_headroom(q_w, in_dtype, zero_point=0):
    """Per output channel, the largest ``|sum(q_x * q_w)|`` a layer can add to its bias:
    ``QRANGE_MAX_ABS[in] * sum|q_w|``, twice that for an affine input (whose folded zero
    point term ``z * sum(q_w)`` is as large again)."""
    s = np.abs(np.asarray(q_w).reshape(len(q_w), -1).astype(np.int64)).sum(axis=1)
    return QRANGE_MAX_ABS[in_dtype] * s * (2 if zero_point else 1)


def fold_zero_point(b_q, q_w, zero_point):
    """int32 bias of a layer whose uint8 input has zero point ``z``: ``b_q - z * sum(q_w)``
    per output channel, so that ``sum(q_w * q_x) + bias == sum(q_w * (q_x - z)) + b_q``."""
    wsum = np.asarray(q_w).reshape(len(q_w), -1).astype(np.int64).sum(axis=1)
    return (np.asarray(b_q, np.int64) - int(zero_point) * wsum).astype(np.int32)


def requantize_np(terms, dtype, relu=False, fused_sum=False):
    """Reference requantize: ``saturate(round_half_even(sum(float32(q) * m) [relu]))``.

    ``terms`` are ``(q, multiplier)`` pairs (multipliers float32, broadcastable); for a layer
    the terms are the int32 accumulator with ``m = s_x * s_w / s_y`` per channel and, with a
    fused residual ``r``, ``q_r`` with ``s_r / s_y``. Float32 arithmetic in oneDNN's order:
    each term is rounded to float32 and the terms are added in float32, except that with
    ``fused_sum`` the later terms are added to the first with one rounding, as oneDNN's
    fused residual sum (a fused multiply-add) does.
    """
    y = (np.asarray(terms[0][0]).astype(np.float32) *
         np.asarray(terms[0][1], np.float32)).astype(np.float32)
    for q, m in terms[1:]:
        if fused_sum:
            y = (y.astype(np.float64) + np.asarray(q).astype(np.float64) *
                 np.asarray(m, np.float32).astype(np.float64)).astype(np.float32)
        else:
            t = (np.asarray(q).astype(np.float32) * np.asarray(m, np.float32)).astype(
                np.float32)
            y = (y + t).astype(np.float32)
    if relu:
        y = np.maximum(y, np.float32(0))
    lo, hi = QBOUNDS[dtype]
    return np.clip(np.rint(y), lo, hi).astype(np.int8 if dtype == 'int8' else np.uint8)


def accumulator_bound(fan_in, in_dtype, bias_max=0):
    """Largest |acc| a layer with ``fan_in`` products per output can reach.

    ``fan_in * QRANGE_MAX_ABS[in] * 127 + |bias|`` (int8 activations reach -128); it must
    stay below 2**31 - 1 (int32), and below 2**24 for float32(acc) to be exact in the
    epilogue.
    """
    return int(fan_in) * QRANGE_MAX_ABS[in_dtype] * 127 + int(bias_max)


def matmul_bound(k, a_dtype, b_dtype):
    """Largest |acc| of a matmul of two activations with ``k`` products per output.

    ``k * QRANGE_MAX_ABS[a] * QRANGE_MAX_ABS[b]`` (int8 activations reach -128): it must stay
    below 2**31 - 1 for the int32 accumulator.
    """
    return int(k) * QRANGE_MAX_ABS[a_dtype] * QRANGE_MAX_ABS[b_dtype]


#: A float32 sum of integers is exact while every partial sum stays below this.
FLOAT32_EXACT = 2 ** 24
#: Without a known contraction size, :func:`matmul_int_f` covers this many products with
#: float32 chunks and the rest with one float64 product.
_MATMUL_F32_COVER = 4096


# ---------------------------------------------------------------------------------------
# The same steps as MXNet operators (F is mx.nd or mx.sym); ranges are (1,) float32 tensors.
# ---------------------------------------------------------------------------------------
def inv_scale_f(F, lo, hi, dtype):
    """Integer steps per real unit of a tensor with range [lo, hi]: ``Q / max(|lo|, |hi|)``.

    ``dtype`` 'auto' reads the dtype from the range (uint8 iff lo >= 0).
    """
    m = F.maximum(F.maximum(F.abs(lo), F.abs(hi)), EPS_RANGE)
    if dtype == 'auto':
        q = (lo >= 0) * (QRANGE['uint8'] - QRANGE['int8']) + QRANGE['int8']
        return q / m
    return QRANGE[dtype] / m


def affine_inv_scale_f(F, lo, hi):
    """Integer steps per real unit of an affine uint8 range [lo, hi]: ``255 / (hi - lo)``."""
    return QRANGE['uint8'] / F.maximum(F.broadcast_sub(hi, lo), EPS_RANGE)


def weight_inv_scale_f(F, s_w):
    """``127.5 / (127.5 * s_w)``: the weight inverse scale exactly as oneDNN derives it."""
    return 127.5 / (s_w * 127.5)


def requantize_multiplier_f(F, inv_out, inv_in, inv_w):
    """``(inv_out / inv_in) / inv_w``: per-channel float32 requantize multiplier."""
    return F.broadcast_div(inv_out / inv_in, inv_w)


def dynamic_range_f(F, x, dtype):
    """Run-time range of float ``x`` (dynamic mode): ``(-max|x|, max|x|)`` or ``(0, max x)``."""
    if dtype == 'uint8':
        hi = F.maximum(F.max(x), EPS_RANGE)
        return F.zeros_like(hi), hi
    hi = F.maximum(F.max(F.abs(x)), EPS_RANGE)
    return -hi, hi


def quantize_f(F, x, lo, hi, dtype):
    """float32 ``x`` -> QTensor-like ``(q, lo, hi)`` with MXNet's ``contrib.quantize``.

    It computes ``rint(clip(x * (Q / max(|lo|, |hi|))))`` in float32 with half-to-even
    rounding (see ``quantize_np``).
    """
    q = F.contrib.quantize(x, lo, hi, out_type=dtype)[0]
    return q, lo, hi


def quantize_affine_f(F, x, lo, hi, zero_point):
    """float32 ``x`` -> affine uint8 ``(q, lo, hi)``: ``clip(rne(x * inv), -z, 255 - z) + z``
    with ``inv = 255 / (hi - lo)`` (see ``quantize_np``); ``zero_point`` is the Python int
    ``z`` of the range."""
    y = F.clip(F.broadcast_mul(x, affine_inv_scale_f(F, lo, hi)), -zero_point,
               QRANGE['uint8'] - zero_point)
    return F.cast(round_half_even_f(F, y) + zero_point, 'uint8'), lo, hi


def dequantize_f(F, qt, dtype='auto'):
    """Real values of a quantized tensor ``(q, lo, hi)``: ``float32(q) / inv``.

    MXNet's ``contrib.dequantize`` is not used: it divides by 127.5 / 255.5 instead of
    127 / 255 (a 0.4% gain error against every other int8 operator's convention).
    """
    q, lo, hi = qt
    return F.broadcast_div(F.cast(q, 'float32'), inv_scale_f(F, lo, hi, dtype))


def dequantize_affine_f(F, qt):
    """Real values of an affine uint8 tensor ``(q, lo, hi)``: ``float32(q - z) / inv``, with
    ``z = round_half_even(-lo * inv)`` (see :func:`zero_point_np`)."""
    q, lo, hi = qt
    inv = affine_inv_scale_f(F, lo, hi)
    z = round_half_even_f(F, F.broadcast_mul(-lo, inv))
    return F.broadcast_div(F.broadcast_sub(F.cast(q, 'float32'), z), inv)


def dequantize_acc_f(F, acc, inv_in, inv_w, bshape):
    """Real values of an int32 accumulator at scale ``1 / (inv_in * inv_w)``."""
    return F.broadcast_div(F.cast(acc, 'float32'), F.reshape(F.broadcast_mul(inv_in, inv_w),
                                                             bshape))


def round_half_even_f(F, y):
    """Round float32 ``y`` (|y| < 2**22) half to even: ``(y + 1.5 * 2**23) - 1.5 * 2**23``.

    MXNet's ``round`` rounds half away from zero and its ``rint`` half down; oneDNN and
    ONNX round half to even.
    """
    return (y + _RNE_MAGIC) - _RNE_MAGIC


def requantize_f(F, terms, dtype, relu=False, fused_sum=False):
    """Integer terms -> int8/uint8 output (see ``requantize_np``); saturates, never wraps.

    ``terms`` are ``(q, multiplier)`` pairs, multipliers broadcastable against ``q``. With
    ``fused_sum`` the later terms are added in float64 and rounded once (the product of an
    8-bit integer and a float32 is exact there), which is oneDNN's fused multiply-add.
    """
    q0, m0 = terms[0]
    y = F.broadcast_mul(F.cast(q0, 'float32'), m0)
    for q, m in terms[1:]:
        if fused_sum:
            t = F.broadcast_mul(F.cast(q, 'float64'), F.cast(m, 'float64'))
            y = F.cast(F.broadcast_add(F.cast(y, 'float64'), t), 'float32')
        else:
            y = F.broadcast_add(y, F.broadcast_mul(F.cast(q, 'float32'), m))
    if relu:
        y = F.relu(y)
    lo, hi = QBOUNDS[dtype]
    return F.cast(round_half_even_f(F, F.clip(y, lo, hi)), dtype)


def split_operand_f(F, q, dtype):
    """Two uint8 tensors ``(a, b)`` with values in [0, 128]: ``q = a + b`` for uint8 ``q``,
    ``q = a - b`` for int8 ``q``.

    On CPUs without VNNI, oneDNN's int8 kernels add pairs of u8 * s8 products in int16 with
    saturation (``vpmaddubsw``; 255 * 127 * 2 > 32767), and they shift int8 data to uint8
    first. With operands of at most 128 no pair exceeds 2 * 128 * 127 = 32512, so
    ``W a +- W b`` is the exact int32 product on every CPU.
    """
    x = F.cast(q, 'float32')
    if dtype == 'uint8':
        a = F.floor(x * 0.5)
        b = x - a
    else:
        a = F.relu(x)
        b = F.relu(-x)
    return F.cast(a, 'uint8'), F.cast(b, 'uint8')


def matmul_int_f(F, qa, qb, a_dtype, b_dtype, transpose_a=False, transpose_b=False, k=None):
    """Exact int32 ``op(qa) @ op(qb)`` over the last two axes (batch axes equal).

    The integers are multiplied with the float32 ``linalg_gemm2``: a float32 sum of integer
    products is exact, in any order, while the sum of their magnitudes stays below 2**24,
    that is for ``k * max|a| * max|b| < 2**24`` (int8 x int8: k <= 1023; uint8 x int8:
    514; uint8 x uint8: 258). A longer contraction is cut into chunks that each stay below
    the bound, and the chunks are added in int32. ``k`` is the contraction size when known
    (eager calls); a symbolic graph, which holds for every size, cuts the first
    ``_MATMUL_F32_COVER`` products into float32 chunks (slices past the end are empty) and
    multiplies the rest, if any, in float64 (exact up to 2**53).
    """
    a, b = F.cast(qa, 'float32'), F.cast(qb, 'float32')
    kw = {'transpose_a': bool(transpose_a), 'transpose_b': bool(transpose_b)}
    step = (FLOAT32_EXACT - 1) // matmul_bound(1, a_dtype, b_dtype)
    if k is not None and k <= step:
        return F.cast(F.linalg.gemm2(a, b, **kw), 'int32')
    # 3-d views (batch, rows, cols), so that F.slice (which clamps) can cut the K axis
    a3 = F.reshape(F.expand_dims(a, axis=0), shape=(-1, 0, 0), reverse=True)
    b3 = F.reshape(F.expand_dims(b, axis=0), shape=(-1, 0, 0), reverse=True)
    ka, kb = (1 if transpose_a else 2), (2 if transpose_b else 1)

    def cut(x, axis, c0, c1):
        begin, end = [None] * 3, [None] * 3
        begin[axis], end[axis] = c0, c1
        return F.slice(x, begin=tuple(begin), end=tuple(end))

    cover = k if k is not None else _MATMUL_F32_COVER
    parts = [F.cast(F.linalg.gemm2(cut(a3, ka, c, c + step), cut(b3, kb, c, c + step), **kw),
                    'int32') for c in range(0, cover, step)]
    end = len(parts) * step
    if k is None:
        a64, b64 = cut(a3, ka, end, None), cut(b3, kb, end, None)
        parts.append(F.cast(F.linalg.gemm2(F.cast(a64, 'float64'), F.cast(b64, 'float64'),
                                           **kw), 'int32'))
    acc = F.add_n(*parts)
    # back to the batch axes of the operands: (1, batch..., m, n) -> (batch..., m, n)
    like = F.expand_dims(a, axis=0)
    acc = F.reshape_like(acc, like, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=-2)
    return F.reshape(acc, shape=(-3, -2))


def bias_to_int32_f(F, bias, inv_in, inv_w, headroom=0):
    """Float bias -> int32 at scale ``s_in * s_w`` at run time (dynamic mode).

    Saturates at the largest float32 ``L <= 2**31 - 1 - headroom`` (``headroom``: the
    largest ``|sum(q_x * q_w)|`` the layer can add), so that neither the cast nor the
    accumulator ``sum + bias`` wraps around.
    """
    lim = np.float32(max(INT32_FLOAT_MAX - int(headroom), 0))
    if int(lim) > INT32_FLOAT_MAX - int(headroom):
        lim = np.nextafter(lim, np.float32(0))
    y = F.round(F.broadcast_mul(F.broadcast_mul(bias, inv_in), inv_w))
    return F.cast(F.clip(y, -float(lim), float(lim)), 'int32')



def conv_int_np(qx, qw, stride=1, pad=0, dilate=1, groups=1):
    """Exact integer N-d convolution (cross-correlation), NC[D]HW layout, int64 result.

    ``qx``: (N, C, *spatial) integers, ``qw``: (O, C // groups, *kernel) integers.
    Zero padding is the integer 0 (a real 0 in gluonq's symmetric scheme).
    """
    return conv_np(qx, qw, stride, pad, dilate, groups, np.int64)


def conv_np(x, w, stride=1, pad=0, dilate=1, groups=1, dtype=np.float64, tap_sum=None):
    """N-d convolution (cross-correlation) of ``x`` (N, C, *spatial) with ``w``
    (O, C // groups, *kernel), accumulated in ``dtype``; zero padding.

    ``tap_sum(patch, wk)`` sums one kernel tap over the input channels of a group (default:
    the exact dot product); ``patch`` is (N, C // groups, *out_spatial), ``wk`` (O', C')."""
    nd = x.ndim - 2
    stride, pad, dilate = [(v,) * nd if np.isscalar(v) else tuple(v)
                           for v in (stride, pad, dilate)]
    x = np.pad(x.astype(dtype), [(0, 0), (0, 0)] + [(p, p) for p in pad])
    w = w.astype(dtype)
    n, c = x.shape[:2]
    o, cg = w.shape[:2]
    kernel = w.shape[2:]
    out_sp = [(x.shape[2 + i] - dilate[i] * (kernel[i] - 1) - 1) // stride[i] + 1
              for i in range(nd)]
    og = o // groups
    out = np.zeros((n, o) + tuple(out_sp), dtype=dtype)
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg]
        wg = w[g * og:(g + 1) * og]
        for kidx in np.ndindex(*kernel):
            sl = tuple(slice(kidx[i] * dilate[i],
                             kidx[i] * dilate[i] + stride[i] * (out_sp[i] - 1) + 1, stride[i])
                       for i in range(nd))
            patch = xg[(slice(None), slice(None)) + sl]          # (n, cg, *out_sp)
            wk = wg[(slice(None), slice(None)) + kidx]            # (og, cg)
            out[:, g * og:(g + 1) * og] += (tap_sum or _dot)(patch, wk)
    return out


def _dot(patch, wk):
    return np.einsum('nc...,oc->no...', patch, wk)


def _int16_pair_sum(patch, wk):
    """``sum_j saturate_int16(x[2j] w[2j] + x[2j+1] w[2j+1])`` over the channels (an odd
    last channel pairs with zero): ``vpmaddubsw`` followed by an exact int32 sum."""
    if patch.shape[1] % 2:
        patch = np.concatenate([patch, np.zeros_like(patch[:, :1])], axis=1)
        wk = np.concatenate([wk, np.zeros_like(wk[:, :1])], axis=1)
    pairs = (np.einsum('nc...,oc->noc...', patch[:, 0::2], wk[:, 0::2]) +
             np.einsum('nc...,oc->noc...', patch[:, 1::2], wk[:, 1::2]))
    return np.clip(pairs, -32768, 32767).sum(axis=2)


def onednn_conv_np(qx, qw, stride=1, pad=0, dilate=1, groups=1, vnni=True,
                   halved_weights=None):
    """The int32 accumulator of oneDNN's int8 convolution (MXNet 1.9.1) as the CPU computes it.

    With VNNI (``vpdpbusd``) it is exact: :func:`conv_int_np`. Without VNNI (AVX2, AVX-512
    before VNNI), measured and pinned in tests/test_lower.py:

    * int8 data: oneDNN halves the weights to avoid overflow, so the product is exact with
      weights ``2 * h``, ``h`` the halved weights it derives (depthwise too):
      ``halved_weights``, by default ``rint(qw / 2)`` (half to even: what it derives from an
      exact image; a fused kernel of the fast path derives them from its fp32 image,
      :func:`gluonq.lower.halved_weights`);
    * uint8 data (not depthwise): ``vpmaddubsw`` adds the products of consecutive input
      channels (0 and 1, 2 and 3, ... of each group, at the same kernel tap) in int16 with
      saturation before the int32 accumulation;
    * uint8 data, depthwise: exact.
    """
    if vnni:
        return conv_int_np(qx, qw, stride, pad, dilate, groups)
    qw = np.asarray(qw).astype(np.int64)
    if np.asarray(qx).dtype == np.int8:
        h = np.rint(qw / 2.0) if halved_weights is None else halved_weights
        return conv_int_np(qx, 2 * np.asarray(h).astype(np.int64).reshape(qw.shape), stride,
                           pad, dilate, groups)
    if groups > 1 and qw.shape[1] == 1:
        return conv_int_np(qx, qw, stride, pad, dilate, groups)
    if len(qx) > 4:                                 # bound the memory of the pair products
        return np.concatenate([onednn_conv_np(qx[i:i + 4], qw, stride, pad, dilate, groups,
                                              vnni) for i in range(0, len(qx), 4)])
    return conv_np(np.asarray(qx), qw, stride, pad, dilate, groups, np.int64, _int16_pair_sum)


def onednn_dense_np(qx, qw, vnni=True):
    """The int32 accumulator of oneDNN's int8 fully-connected layer as the CPU computes it
    (``flatten=True``). Exact with VNNI. Without VNNI the products of consecutive input
    features are added in int16 with saturation (as :func:`onednn_conv_np` for uint8 data);
    int8 data is shifted to uint8 first (``x + 128``, compensated exactly by
    ``-128 * sum(w)``), so it saturates too."""
    x = np.asarray(qx).reshape(len(qx), -1)
    if vnni:
        return dense_int_np(x, qw)
    qw = np.asarray(qw).astype(np.int64)
    comp = 0
    if x.dtype == np.int8:
        x = (x.astype(np.int64) + 128).astype(np.uint8)
        comp = -128 * qw.sum(axis=1)[None]
    return onednn_conv_np(x[:, :, None], qw[:, :, None], vnni=False)[:, :, 0] + comp


def dense_int_np(qx, qw, flatten=True):
    """Exact integer fully-connected layer ``qx @ qw.T`` (int64), like ``FullyConnected``."""
    x = qx.astype(np.int64)
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return np.matmul(x, qw.astype(np.int64).T)


def sqnr_db(reference, test):
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB."""
    ref = np.asarray(reference, np.float64)
    err = np.asarray(test, np.float64) - ref
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float('inf')
    if signal == 0.0:
        return float('-inf')
    return 10.0 * np.log10(signal / noise)
