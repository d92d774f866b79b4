"""The fast path: lower a QuantizedNet onto oneDNN's fused int8 kernels.

:func:`lower` turns a :class:`~gluonq.QuantizedNet` (its plain-data ``spec`` and its parameter
values) into one MXNet symbol graph, written node by node (no MXNet partition or quantize
pass), that stock MXNet runs and loads (``SymbolBlock.imports``, ``mx.mod.Module``) without
gluonq:

* ``Quantize`` -> ``_contrib_quantize_v2`` with the calibrated range;
* conv / dense layers -> ``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected`` with
  ``quantized=true``: int8 in, int8/uint8 out with the requantize, ReLU (functional ``F.relu``
  and ``clip(0, a)`` included, as gluonq's converter fuses them) and the residual sum fused
  into the kernel; the classifier returns float32 directly (``enable_float_output``);
* a dense layer with float output and a residual -> the fused kernel's float output plus
  the residual in float32 (gluonq adds it to the float result the same way);
* ``QuantizedMatMul`` (MXNet has no int8 product of two tensors) -> float32
  ``linalg_gemm2`` of the integers, cut along K so that every partial sum stays below
  2**24 (exact), then ``acc / inv`` or one ``quantize_v2`` whose scale is gluonq's
  requantize multiplier ("float-ops");
* pooling, flatten, ReLU on int8, concat and add -> MXNet's int8 operators; reshape,
  transpose and split (which MXNet moves slowly on 8-bit data) run on float32 images of the
  integers and hand them on to float readers (a matmul, the next shape op) uncast;
* float steps (``FloatOp``, ``Dequantize``) stay float.

Tensors stay int8/uint8 between layers (no dequantize -> quantize pairs); every range is a
calibrated constant.

**How the fused kernels reproduce gluonq's integers.** They quantize their fp32 weights
themselves (per output channel, ``127.5 / max|w_c|``, half to even) and use MXNet's range
convention (range magnitude ``R``: ``127.5 / R`` (int8) or ``255.5 / R`` (uint8) steps per real
unit), where gluonq uses ``Q / M`` with ``Q = 127 / 255``. So:

* every int8 tensor gets an MXNet range ``R`` (float32) with ``f32(Q' / R) == f32(Q / M)``
  (:func:`mx_range`, a float32 ulp search), written at full float32 precision;
* a layer's weights are fp32 images (:func:`gluonq.quant.fused_weight_image`) that the kernel
  re-quantizes into exactly gluonq's int8 weights with exactly gluonq's weight inverse scale,
  hence exactly gluonq's float32 requantize multiplier ``(inv_out / inv_in) / inv_w``; bias
  images round back to gluonq's int32 bias in the kernel;
* a ReLU'd int8 output of a residual layer whose operand is int8 ("u7", values 0..127) fuses
  too: oneDNN computes such a sum in the operand's dtype, which saturates at 127 exactly like
  gluonq; MXNet types the result uint8 and the graph carries it so.

**Where it cannot** the layer is lowered differently ("int32": a fused int8 convolution that
returns the exact int32 accumulator, per-tensor weight image, followed by gluonq's float32
epilogue; "reference": gluonq's own block). ``LoweredNet.report`` says what each step became
and why:

* a residual operand whose dtype differs from the output's (oneDNN computes the sum in the
  operand dtype, in place: an int8 operand with a fused ReLU clamps at 127, a uint8 one
  without ReLU wraps; MXNet's own quantization flow hits the first in every ResNet v1
  downsample block) -> int32;
* ReLU with int8 output without such an operand (a fused ReLU output goes up to 255) ->
  int32;
* grouped convolution with 1 < groups < channels (the weight reorder applies the scale of
  channel g to all of group g), all-zero weight channels, per-tensor weights where a channel
  has no +-127, a weight channel without an exact fp32 image (``quant._fused_exact_scales``
  misses the scales at float32 binade edges) -> int32;
* 1-d/3-d convolutions, dynamic ranges, dense with a residual add and int8 output
  (``_sg_mkldnn_fully_connected`` has no fused sum) -> reference. A dense layer on
  sequences (``flatten=False``) fuses like any other: the kernel works on the (rows,
  features) view and gives the same integers (tests/test_transformer.py).

**exact=True vs exact=False** (the fast path's default). gluonq's reference arithmetic is
built to match the kernels: its requantize adds a fused residual with one rounding, as
oneDNN's fused multiply-add ``fma(q_r, m_r, f32(acc * m))`` does (``tests/test_lower.py``
pins the kernel behaviour), and the converter snaps every range to a value MXNet's range
convention can express (``quant.snap_range_max``) and picks weight scales whose fp32 images
re-derive exactly (``quant.quantize_weight``). What can remain is a range or weight scale
without an exact MXNet form (a QuantizedNet built by hand, or a weight channel the scale
search misses): ``exact=True`` lowers such layers as "int32" (bit-exact, slower);
``exact=False`` fuses them with requantize multipliers within a float32 ulp (or the scale
error the report records) of gluonq's, so a result can differ by 1 where the reference is
within about 1e-4 of a rounding tie (tests bound it). Float outputs (dense with
``enable_float_output``) differ by float rounding only (relative 1e-7), and an accumulator
beyond 2**24 rounds to float32 at another point than in the reference.

**CPUs without VNNI.** On x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake / Zen 4)
oneDNN's int8 kernels add pairs of u8 * s8 products in int16 with saturation (``vpmaddubsw``:
255 * 127 * 2 > 32767) and, for int8 data, round the weights to even values first -- as
MXNet's own int8 flow and onnxruntime's U8S8 kernels do on such CPUs.
:func:`int8_kernels_exact` probes the CPU once. Where the kernels are not exact, ``exact=True``
lowers every convolution as "split": the uint8 input goes in as two halves of at most 128
(int8 input as its positive and negative parts, :func:`gluonq.quant.split_operand_f`), so no
pair saturates and nothing is rounded, each half through a fused int8 convolution returning
int32, then gluonq's epilogue as float operators -- bit-exact, but several times slower
than the fused kernels (and than fp32); dense layers run gluonq's reference dense, which
splits the same way. ``exact=False`` keeps the fused layers
(fast, within oneDNN's saturation of the reference).

**int8 weights on disk** (``int8_weights=True``): the weights are int8 parameters and each
fused convolution computes its fp32 image in the graph (``Cast``, per-channel scale, and a
``one_hot`` correction of the anchor element); the kernel re-quantizes that image at every
call (it redoes its weight preparation whenever the weight array changes), which costs time
in proportion to the weight size. Dense layers run gluonq's reference int8 dense, whose
kernel takes int8 weights as they are.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import OrderedDict

import mxnet as mx
import numpy as np

from .. import quant
from ..arrays import to_numpy
from ..convert.qnet import QuantizedNet
from ..nn import QTensor
from ..nn import _base as qbase
from .registry import Registry

__all__ = ['lower', 'LoweredNet', 'mx_range', 'MX_QRANGE', 'int8_kernels_exact',
           'halved_weights']

f32 = np.float32
#: MXNet's quantized-range constants (``kInt8Range``, ``kUint8Range``).
MX_QRANGE = {'int8': f32(127.5), 'uint8': f32(255.5)}
_VERSION = {'mxnet_version': ['int', 10901]}
_WINDOW = 64          # float32 ulps searched around a range / weight-scale target


# ---------------------------------------------------------------------------------------
# float32 arithmetic of MXNet's fused kernels
# ---------------------------------------------------------------------------------------
def _ulp_steps(x, n):
    """float32 values around positive ``x``: x, x+1ulp, x-1ulp, x+2ulp, ... (2n+1 values)."""
    offs = np.array([0] + [o for k in range(1, n + 1) for o in (k, -k)], np.int64)
    bits = np.asarray(x, f32).reshape(-1, 1).view(np.int32).astype(np.int64) + offs[None]
    return bits.astype(np.int32).view(f32)


def mx_range(inv, dtype, window=_WINDOW):
    """float32 range magnitude ``R`` for which MXNet's scale ``f32(Q' / R)`` equals ``inv``.

    ``inv`` is gluonq's inverse scale ``f32(Q / M)``; ``Q'`` is 127.5 (int8) or 255.5
    (uint8). Returns ``(R, exact)``: the nearest exact ``R`` within ``window`` ulps of
    ``Q' / inv``, or that value itself with ``exact=False`` when none exists (about 1 target
    in 7: division by a float32 skips some results).
    """
    qp = MX_QRANGE[dtype]
    inv = f32(inv)
    cands = _ulp_steps(f32(qp / inv), window)[0]
    hit = np.flatnonzero((qp / cands).astype(f32) == inv)
    if hit.size:
        return f32(cands[hit[0]]), True
    return f32(cands[0]), False


def _mx_inv(dtype, r):
    return f32(MX_QRANGE[dtype] / f32(r))


def _rederive(img, w):
    """The kernel's int8 weights from fp32 images ``img`` (C, K) and per-row scales ``w``."""
    y = (img * w[:, None]).astype(f32)
    return np.rint(np.clip(y, -128, 127)).astype(np.int64)


def halved_weights(img, per_channel=True):
    """The halved int8 weights oneDNN derives from an fp32 weight image for int8 data on a
    CPU without VNNI: ``rint(f32(img * w) * 0.5)`` with its weight scale
    ``w = f32(127.5 / max|img|)`` per output channel (or per tensor), half to even -- a
    weight whose image lands a float32 ulp off the exact half rounds that way."""
    img = np.asarray(img, f32)
    im2 = img.reshape(img.shape[0], -1)
    T = np.abs(im2).max(axis=1) if per_channel else np.full(im2.shape[0], np.abs(im2).max())
    w = (f32(127.5) / T.astype(f32)).astype(f32)
    return np.rint((im2 * w[:, None]).astype(f32) * f32(0.5)).astype(np.int64).reshape(
        img.shape)


def _bias_images(b_q, dscale, w):
    """fp32 bias images that the kernel rounds back to gluonq's int32 bias ``b_q``.

    The kernel computes ``round(b_img * f32(w * dscale))``; the image is chosen so that the
    product lies within 0.5 of ``b_q`` however it is evaluated (float32 with either operand
    order, or exactly), so the rounding mode does not matter either. Returns
    ``(images, exact)`` per channel (always False for |b_q| >= 2**22).
    """
    b = np.asarray(b_q, np.float64)
    bs = (w * f32(dscale)).astype(f32)
    base = (b / bs.astype(np.float64)).astype(f32)
    out = base.copy()
    exact = np.zeros(b.shape, bool)
    for off in (0, 1, -1, 2, -2):
        cand = (base.view(np.int32).astype(np.int64) + off).astype(np.int32).view(f32)
        p1 = (cand * bs).astype(f32).astype(np.float64)
        p2 = ((cand * f32(dscale)).astype(f32) * w).astype(f32).astype(np.float64)
        p3 = cand.astype(np.float64) * bs.astype(np.float64)
        good = ~exact & (np.abs(p1 - b) < 0.5) & (np.abs(p2 - b) < 0.5) & \
            (np.abs(p3 - b) < 0.5)
        out[good] = cand[good]
        exact |= good
        if exact.all():
            break
    return out, exact


def _weight_images(q2d, s_w, dscale=None, ratio=None, m=None, b_q=None, approx=False):
    """fp32 weight (and bias) images for a fused int8 kernel with per-channel requantize.

    ``q2d`` (C, K) gluonq int8 weights, ``s_w`` (C,) their scales. Per channel the image max
    ``T`` is searched (starting at ``f32(127.5 s_w)``, i.e. :func:`quant.fused_weight_image`)
    so that the kernel re-derives exactly ``q`` with scale ``w = f32(127.5 / T)`` and, when
    ``m`` is given, ``f32(ratio / w) == m`` (the requantize multiplier, ``ratio`` being
    ``f32(out_scale / data_scale)``), and the bias re-derives exactly.

    ``approx=True`` (no ``m``): a channel whose scale has no exact image (a -127 extreme
    and ``f32(127.5 s_w)`` not among the float32 values that map -127 back to -127) takes
    the nearest one that has; its multiplier then differs by that relative amount (at most
    about 3e-4), returned as ``img.scale_err``-like fourth element of the note.

    Returns ``(img, bias_img, ok, note)``; ``ok`` False when some channel has no solution.
    """
    C = q2d.shape[0]
    q = q2d.astype(np.int64)
    s_w = np.broadcast_to(np.asarray(s_w, f32).reshape(-1), (C,)).astype(f32)
    maxabs = np.abs(q).max(axis=1) if q.size else np.zeros(C, np.int64)
    if (maxabs != 127).any():
        return None, None, False, 'a weight channel has no +-127 (per-tensor scale or zero ' \
                                  'channel): the kernel re-quantizes each channel to 127'
    has_pos = (q == 127).any(axis=1)
    anchor = np.where(has_pos, np.argmax(q == 127, axis=1), np.argmax(q == -127, axis=1))
    t0 = (f32(127.5) * s_w).astype(f32)
    T = np.full(C, np.nan, f32)
    bimg = np.zeros(C, f32)
    todo = np.arange(C)
    cands = _ulp_steps(t0, _WINDOW)                         # (C, 2W+1)
    for j in range(cands.shape[1]):
        if todo.size == 0:
            break
        t = cands[todo, j]
        w = (f32(127.5) / t).astype(f32)
        tw = (t * w).astype(f32)
        ok = (tw >= f32(126.5)) & (has_pos[todo] | (tw < f32(127.5)))
        if m is not None:
            ok &= (f32(ratio) / w).astype(f32) == m[todo]
        if b_q is not None:
            bi, bex = _bias_images(b_q[todo], dscale, w)
            ok &= bex | (np.abs(b_q[todo]) >= 2 ** 22)
            bimg[todo[ok]] = bi[ok]
        T[todo[ok]] = t[ok]
        todo = todo[~ok]
    scale_err = 0.0
    if todo.size and approx and m is None:
        good = quant._good_mantissas()      # float32 mantissas that map -127 to -127
        for c in todo:
            bits = int(np.array([t0[c]], f32).view(np.uint32)[0])
            expo, mant = bits & ~0x7FFFFF, bits & 0x7FFFFF
            i = int(np.searchsorted(good, mant))
            cb = np.concatenate([expo - (1 << 23) + good[-4:],             # binade below
                                 expo + good[max(0, i - 4):i + 4],
                                 expo + (1 << 23) + good[:4]]).astype(np.int64)   # above
            vals = cb.astype(np.uint32).view(f32)
            T[c] = vals[np.argmin(np.abs(vals.astype(np.float64) - float(t0[c])))]
            if b_q is not None:
                w1 = np.array([f32(127.5) / T[c]], f32)
                bimg[c] = _bias_images(b_q[c:c + 1], dscale, w1)[0][0]
            scale_err = max(scale_err, abs(float(T[c]) / float(t0[c]) - 1))
        todo = todo[np.isnan(T[todo])]
    if todo.size:
        return None, None, False, '%d channel(s) without an exact fp32 image' % todo.size
    w = (f32(127.5) / T).astype(f32)
    img = quant.fused_weight_image(q2d, s_w).reshape(C, -1).astype(f32)
    moved = T != t0
    if moved.any():
        sc = T[moved].astype(np.float64) / 127.5
        img[moved] = (q[moved] * sc[:, None]).astype(f32)
    img[np.arange(C), anchor] = np.where(has_pos, T, -T)
    if not np.array_equal(_rederive(img, w), q):
        return None, None, False, 'fp32 weight image does not re-derive the int8 weights'
    note = '%d channel image(s) moved' % moved.sum() if moved.any() else ''
    if scale_err:
        note = ('approximate: a channel scale moved by %.1e to an exactly re-derivable one '
                '(quant._fused_exact_scales missed it)' % scale_err)
    if b_q is not None and (np.abs(b_q) >= 2 ** 22).any():
        note += ' bias beyond 2**22 may round differently'
    return img, (bimg if b_q is not None else None), True, note


def _tensor_image(q2d):
    """fp32 weight image with ONE scale for the whole tensor (int32 lowering).

    Without a calibrated output range the fused convolution quantizes its weights per
    tensor (``127.5 / max|w|``) and returns the raw int32 accumulator; the image is
    ``q * T / 127.5`` with one element of magnitude 127 stored as exactly ``T``.
    Returns ``(img, ok)``.
    """
    q = q2d.astype(np.int64)
    flat = q.reshape(-1)
    if not flat.size or np.abs(flat).max() != 127:
        return None, False
    pos = np.flatnonzero(flat == 127)
    k = pos[0] if pos.size else np.flatnonzero(flat == -127)[0]
    for T in _ulp_steps(f32(127.5), _WINDOW)[0]:
        w = f32(f32(127.5) / T)
        tw = f32(T * w)
        if tw < f32(126.5) or (not pos.size and tw >= f32(127.5)):
            continue
        img = (q * (float(T) / 127.5)).astype(f32)
        img.reshape(-1)[k] = T if pos.size else -T
        if np.array_equal(_rederive(img, np.full(q.shape[0], w, f32)), q):
            return img, True
    return None, False


_INT8_EXACT = None
_NO_VNNI = ("this CPU has no VNNI: oneDNN's int8 kernels saturate pairs of u8*s8 products at "
            'int16 (see int8_kernels_exact)')
_NO_INT8_MATMUL = ("MXNet 1.9.1 has no int8 product of two tensors (its only ones, "
                   '_sg_mkldnn_selfatt_qk/valatt, take one interleaved q/k/v tensor from '
                   'subgraph partitioning): %d float32 product(s) of the integers, each with '
                   'partial sums below 2**24, and the epilogue as float32 operators')


#: shape operators MXNet 1.9.1 runs about 15x slower on 8-bit than on float32 data (transpose
#: of (8, 128, 12, 64): 17 ms against 0.9 ms, 5.7 ms with the casts there and back)
_SLOW_INT8_SHAPE_OPS = ('transpose', 'SwapAxis', 'swapaxes', 'SliceChannel', 'split')


def int8_kernels_exact():
    """Does this CPU run oneDNN's int8 convolution exactly (VNNI), or does it saturate pairs
    of u8 * s8 products at int16 (AVX2, AVX-512 without VNNI)?

    Probed once per process with a worst case: eight uint8 255s against int8 127s, whose
    exact sum 259080 comes back as 4 * 32767 where pairs saturate.
    """
    global _INT8_EXACT
    if _INT8_EXACT is None:
        q = np.full((8, 8), 127, np.int64)
        img, _ = _tensor_image(q)
        sub = [_var('data'), _var('weight'),
               {'op': 'Convolution', 'name': 'probe_conv', 'inputs': [[0, 0, 0], [1, 0, 0]],
                'attrs': {'kernel': '(1, 1)', 'num_filter': '8', 'no_bias': 'True'}}]
        d, w, lo, hi = (mx.sym.var(n) for n in ('d', 'w', 'lo', 'hi'))
        conv = _fused('_sg_mkldnn_conv', 'probe', {'quantized': 'true'}, sub, [d, w, lo, hi])
        out = conv[0].bind(mx.cpu(), args={
            'd': mx.nd.full((1, 8, 1, 1), 255, dtype='uint8'),
            'w': mx.nd.array(img.reshape(8, 8, 1, 1)), 'lo': mx.nd.array([0.0]),
            'hi': mx.nd.array([1.0])}).forward()[0].asnumpy()
        _INT8_EXACT = bool((out == 8 * 255 * 127).all())
    return _INT8_EXACT


# ---------------------------------------------------------------------------------------
# graph building helpers
# ---------------------------------------------------------------------------------------
def _fused(op, name, attrs, sub_nodes, inputs):
    """One subgraph op node (``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected``).

    ``sub_nodes``: the float subgraph, its first variables in the order of ``inputs``;
    ``inputs``: the node's input symbols (subgraph arguments, then range inputs).
    """
    nodes = [{'op': 'null', 'name': '%s__in%d' % (name, i), 'inputs': []}
             for i in range(len(inputs))]
    sub = {'nodes': sub_nodes,
           'arg_nodes': [i for i, n in enumerate(sub_nodes) if n['op'] == 'null'],
           'heads': [[len(sub_nodes) - 1, 0, 0]], 'attrs': dict(_VERSION)}
    nodes.append({'op': op, 'name': name, 'attrs': attrs,
                  'inputs': [[i, 0, 0] for i in range(len(inputs))], 'subgraphs': [sub]})
    nout = 3 if attrs.get('enable_float_output', 'False') != 'True' else 1
    js = {'nodes': nodes, 'arg_nodes': list(range(len(inputs))),
          'heads': [[len(inputs), k, 0] for k in range(nout)], 'attrs': dict(_VERSION)}
    s = mx.sym.load_json(json.dumps(js))
    return s(**{'%s__in%d' % (name, i): x for i, x in enumerate(inputs)})


def _safe_adds(sym):
    """Rewrite ``elemwise_add`` outside the fused nodes as ``broadcast_add``.

    MXNet 1.9.1's oneDNN ``elemwise_add`` (a oneDNN ``sum``) misreads a float tensor cast
    from a oneDNN-layout int8/int32 tensor (tests/test_lower.py pins it); ``broadcast_add``
    of same-shaped tensors is the same float32 addition.
    """
    js = json.loads(sym.tojson())
    changed = False
    for n in js['nodes']:
        if n['op'] in ('elemwise_add', '_plus', '_Plus', '_add'):
            n['op'] = 'broadcast_add'
            changed = True
    return mx.sym.load_json(json.dumps(js)) if changed else sym


def _as_int(t):
    """The integers of ``t`` to be read by float operators (or gluonq's reference blocks).

    A hybridized SymbolBlock builds its backward graph up front, and that fails where a
    gradient would flow back into an int8 operator without one (``quantized_elemwise_add``,
    ``quantized_act``) -- also through BlockGrad, and also from an output nobody reads
    (tests/test_lower.py pins it). ``quantized_flatten`` has a (zero) gradient and consumes
    the data and both range outputs, so the integers pass it (reshaped back) unchanged.
    """
    if t.mx is None:
        return t.data
    return mx.sym.reshape_like(mx.sym.contrib.quantized_flatten(t.data, *t.mx)[0], t.data)


def _as_float(t):
    """:func:`_as_int` as float32 (``t.fimg`` where the graph has it already)."""
    return t.fimg if t.fimg is not None else mx.sym.Cast(_as_int(t), dtype='float32')


def _var(name):
    return {'op': 'null', 'name': name, 'inputs': []}


def _conv_attrs(block, x):
    """The Convolution attributes of a QuantizedConv2D (NCHW) in a fused subgraph reading
    ``x`` (an affine ``x`` comes padded with its zero point: no padding then)."""
    k = block._kwargs
    pad = (0,) * len(k['pad']) if x.zp else k['pad']
    return {'kernel': str(tuple(k['kernel'])), 'stride': str(tuple(k['stride'])),
            'dilate': str(tuple(k['dilate'])), 'pad': str(tuple(pad)),
            'num_filter': str(k['num_filter']), 'num_group': str(k['num_group']),
            'layout': 'NCHW'}


def _rng_attr(v):
    return repr(float(f32(v)))


class _T:
    """An int8/uint8 tensor of the lowered graph.

    ``dtype``/``M``/``inv``: gluonq's dtype, range max and inverse scale. ``mxdt``/``R``:
    the dtype the MXNet graph holds it in and the MXNet range magnitude, whose scale
    ``Q'(mxdt) / R`` is ``inv`` (or, where no float32 ``R`` gives that, its nearest).
    ``mxdt`` differs from ``dtype`` for a ReLU'd int8 output of a fused residual layer,
    which MXNet types uint8 (values 0..127 either way). An affine uint8 tensor has zero
    point ``zp`` > 0, ``M`` its span (max - min) and ``bounds`` its gluonq range: the fused
    kernels read its integers as plain uint8 at the same scale. ``fimg``: a float32 symbol
    of the same integers where one is at hand (the output of a shape operator run on float32),
    read by float operators instead of a cast of ``data``.
    """
    __slots__ = ('data', 'dtype', 'mxdt', 'M', 'inv', 'R', 'mx', 'gq', 'key', 'zp', 'bounds',
                 'fimg')

    def __init__(self, key, data, dtype, M, R=None, mx_rng=None, gq_rng=None, mxdt=None,
                 zp=0, bounds=None):
        self.key = key
        self.zp = int(zp)
        self.bounds = bounds
        self.data = data
        self.dtype = dtype
        self.mxdt = mxdt or dtype
        self.M = None if M is None else float(f32(M))
        self.inv = None if M is None else quant.inv_scale_np(0.0 if dtype == 'uint8' else -M,
                                                             M, dtype)
        if R is None and M is not None:
            R = mx_range(self.inv, self.mxdt)[0]
        self.R = None if R is None else f32(R)
        self.mx = mx_rng
        self.gq = gq_rng
        self.fimg = None

    @property
    def static(self):
        return self.M is not None

    @property
    def mx_scale(self):
        return _mx_inv(self.mxdt, self.R)

    def like(self, key, data, mx_rng):
        """The same quantization on new data (pass-through ops)."""
        return _T(key, data, self.dtype, self.M, self.R, mx_rng, self.gq, self.mxdt,
                  self.zp, self.bounds)

    def holds(self, qp):
        """Is this tensor quantized as QParams ``qp`` says (dtype, scale, zero point)?"""
        span = f32(f32(qp.max) - f32(qp.min)) if qp.is_affine else f32(qp.max)
        return self.static and self.dtype == qp.dtype and self.zp == qp.zero_point and \
            self.M == float(span)


class LoweredNet:
    """The lowered graph: an MXNet symbol, its fp32 parameters and how each step was lowered.

    Attributes
    ----------
    symbol : mx.sym.Symbol
        Inputs as the QuantizedNet's (``data``), outputs as its outputs.
    params : OrderedDict of str -> numpy float32 array
        Every argument / auxiliary state of ``symbol`` except the inputs.
    report : list of dict
        Per step: ``step``, ``block``, ``lowering`` ('fused', 'int32', 'split',
        'mxnet-op', 'float-ops', 'reference', 'float') and ``reason``.
    tensors : dict
        gluonq tensor key -> name of the symbol output holding it (int8 tensors: the data
        output, or the float32 image of the integers where the graph holds only that; see
        :meth:`internal`).
    """

    def __init__(self, symbol, params, input_names, report, tensors):
        self.symbol = symbol
        self.params = params
        self.input_names = list(input_names)
        self.report = report
        self.tensors = tensors

    def arg_aux(self, ctx=None):
        """``(arg_params, aux_params)`` as NDArray dicts (what ``Module.set_params`` takes)."""
        ctx = ctx or mx.cpu()
        aux_names = set(self.symbol.list_auxiliary_states())
        args, aux = {}, {}
        for k, v in self.params.items():
            (aux if k in aux_names else args)[k] = mx.nd.array(v, ctx=ctx, dtype=v.dtype)
        return args, aux

    def to_json(self):
        """Symbol JSON (compact; variables carry no initializers)."""
        js = json.loads(self.symbol.tojson())
        for n in js['nodes']:
            if n['op'] == 'null' and 'attrs' in n:
                for k in ('__init__', '__lr_mult__', '__wd_mult__'):
                    n['attrs'].pop(k, None)
                if not n['attrs']:
                    del n['attrs']
        return json.dumps(js, indent=1)

    def save(self, sym_path, params_path):
        """Write the symbol JSON and the ``arg:``/``aux:`` params file."""
        args, aux = self.arg_aux()
        with open(sym_path, 'w') as f:
            f.write(self.to_json())
        d = {'arg:' + k: v for k, v in sorted(args.items())}
        d.update({'aux:' + k: v for k, v in sorted(aux.items())})
        mx.nd.save(params_path, d)

    def block(self, ctx=None, release=False):
        """A (not hybridized) ``SymbolBlock`` of the lowered graph with its parameters set.

        ``release=True`` drops each numpy array once the block holds it (less peak memory;
        the LoweredNet then keeps only its graph and report)."""
        ctx = ctx or mx.cpu()
        with warnings.catch_warnings():       # "Cannot decide type for ... data"
            warnings.simplefilter('ignore')
            blk = mx.gluon.SymbolBlock(mx.sym.load_json(self.to_json()),
                                       [mx.sym.var(n) for n in self.input_names])
        params = blk.collect_params()
        for name, p in params.items():
            p._load_init(mx.nd.array(self.params[name], dtype=self.params[name].dtype), ctx,
                         cast_dtype=True, dtype_source='saved')
            if release:
                self.params[name] = None
        return blk

    def internal(self, keys):
        """Symbol whose outputs are the gluonq tensors ``keys`` (int8 data / float)."""
        internals = self.symbol.get_internals()
        return mx.sym.Group([internals[self.tensors[k]] for k in keys])

    def counts(self):
        """Number of steps per lowering kind."""
        out = {}
        for r in self.report:
            out[r['lowering']] = out.get(r['lowering'], 0) + 1
        return out

    def __repr__(self):
        return 'LoweredNet(%s)' % ', '.join('%d %s' % (v, k) for k, v in
                                             sorted(self.counts().items()))


class _Context:
    """What the lowering of one QuantizedNet holds while the handlers run: the symbols of
    gluonq's tensors (``env``: float symbols and :class:`_T`), the fp32 parameters, the
    integer block parameters and the per-step report."""

    def __init__(self, qnet, exact=True, int8_weights=False):
        self.qnet = qnet
        self.exact = exact
        self.int8_weights = int8_weights
        self.spec = qnet.spec
        self.params = OrderedDict()
        self.int_params = {}             # var name -> (dtype, int values)
        self.env = {}
        self.report = []
        self.tensors = {}
        self.names = set()

    # -- constants and parameters ---------------------------------------------------------
    def const(self, name, value):
        arr = np.asarray(value, f32).reshape(-1) if np.ndim(value) == 0 else \
            np.asarray(value, f32)
        if name in self.params:
            raise ValueError('duplicate lowered parameter %r' % name)
        self.params[name] = arr
        return mx.sym.var(name, shape=arr.shape, dtype=arr.dtype)

    def int_const(self, name, value):
        """An integer constant (stored as float32, cast in the graph)."""
        v = np.asarray(value)
        self.int_params[name] = (np.dtype(v.dtype).name, v)
        return mx.sym.var(name, shape=v.shape, dtype=v.dtype)

    def block_param(self, p):
        """Variable of a gluonq block's parameter (integers are stored as float32 and cast)."""
        v = to_numpy(p)
        if v.dtype == np.float32:
            if p.name not in self.params:
                self.params[p.name] = v
        else:
            self.int_params[p.name] = (np.dtype(v.dtype).name, v)
        return p.var()

    def mx_rng(self, t):
        if t.mx is None:
            lo = 0.0 if t.mxdt == 'uint8' else -float(t.R)
            t.mx = (self.const(self.unique(t.key + '_mxmin'), lo),
                    self.const(self.unique(t.key + '_mxmax'), float(t.R)))
        return t.mx

    def gq_rng(self, t):
        if t.gq is None:
            lo, hi = t.bounds if t.zp else (0.0 if t.dtype == 'uint8' else -t.M, t.M)
            t.gq = (self.const(self.unique(t.key + '_min'), lo),
                    self.const(self.unique(t.key + '_max'), hi))
        return t.gq

    def unique(self, name):
        base = re.sub(r'[^0-9A-Za-z_]', '_', name)
        name, k = base, 1
        while name in self.names or name in self.params:
            k += 1
            name = '%s_%d' % (base, k)
        self.names.add(name)
        return name

    def note(self, step, lowering, reason='', scale_err=0.0):
        """Record how ``step`` was lowered; ``scale_err`` is the largest relative change of a
        weight scale the fused kernel uses (non-zero only for approximate lowerings)."""
        self.report.append({'step': step['name'], 'block': step['block'],
                            'lowering': lowering, 'reason': reason,
                            'scale_err': float(scale_err)})

    # -- tensors of a step ------------------------------------------------------------------
    def inputs_of(self, step):
        return [self.env[k] for k in step['inputs']]

    def as_ref_input(self, v):
        return QTensor(_as_int(v), *self.gq_rng(v)) if isinstance(v, _T) else v

    def set_out(self, step, value):
        outs = step['outputs']
        if len(outs) == 1:
            self.env[outs[0]] = value
        else:
            for k, x in zip(outs, value):
                self.env[k] = x

    def quantize_as(self, x, key, qp, name):
        """float symbol -> _T held as QParams ``qp`` (symmetric or affine)."""
        if not qp.is_affine:
            return self.quantize(x, key, qp.dtype, qp.max, name)
        span = f32(f32(qp.max) - f32(qp.min))
        t = _T(key, None, 'uint8', span, zp=qp.zero_point, bounds=(qp.min, qp.max))
        t.data = quant.quantize_affine_f(mx.sym, x, *self.gq_rng(t), qp.zero_point)[0]
        return t

    def quantize(self, x, key, dtype, M, name):
        """float symbol -> _T with gluonq's quantize arithmetic."""
        inv = quant.inv_scale_np(0.0 if dtype == 'uint8' else -M, M, dtype)
        R, exact = mx_range(inv, dtype)
        lo = 0.0 if dtype == 'uint8' else -float(R)
        if exact:
            q = mx.sym.contrib.quantize_v2(x, out_type=dtype, min_calib_range=_rng_attr(lo),
                                           max_calib_range=_rng_attr(R), name=name)
            return _T(key, q[0], dtype, M, R, mx_rng=(q[1], q[2]))
        t = _T(key, None, dtype, M, R)
        gmin, gmax = self.gq_rng(t)
        t.data = mx.sym.contrib.quantize(x, gmin, gmax, out_type=dtype, name=name)[0]
        return t

    def weight_symbol(self, name, q, img, per_tensor):
        """The fp32 weight image ``img`` of a fused layer: computed in the graph from the
        int8 weights ``q`` with ``int8_weights`` (where that is exact), else a constant."""
        img = img.reshape(q.shape)
        wsym = _int8_weight_image(self, name, q, img, per_tensor) if self.int8_weights \
            else None
        return self.const(name + '_weight', img) if wsym is None else wsym

    def add_int32_bias(self, acc, name, b_q):
        """``acc`` (N, C, ...) plus gluonq's int32 bias ``b_q`` (None: no bias to add)."""
        if b_q is None:
            return acc
        return mx.sym.broadcast_add(acc, mx.sym.reshape(
            self.int_const(name + '_bias_int32', b_q.astype(np.int32)), (1, -1, 1, 1)))

    # -- the whole network ------------------------------------------------------------------
    def run(self):
        """Every step through its handler (:data:`HANDLERS`); the :class:`LoweredNet`."""
        spec = self.spec
        for name in spec['inputs']:
            self.env[name] = mx.sym.var(name)
        for step in spec['steps']:
            block = self.qnet._children[step['name']]
            HANDLERS.get(step['block'], _unhandled)(self, step, block)
        outs = []
        for k in spec['outputs']:
            v = self.env[k]
            if isinstance(v, _T):
                qt = QTensor(_as_float(v), *self.gq_rng(v))
                v = quant.dequantize_affine_f(mx.sym, qt) if v.zp else \
                    quant.dequantize_f(mx.sym, qt)
            outs.append(v)
        sym = outs[0] if len(outs) == 1 else mx.sym.Group(outs)
        sym = _safe_adds(self.cast_int_params(sym))
        used = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
        params = OrderedDict((k, v) for k, v in self.params.items() if k in used)
        missing = used - set(params) - set(spec['inputs'])
        if missing:
            raise RuntimeError('lowering left unbound variables: %s' % sorted(missing))
        self.record_tensor_names(sym)
        return LoweredNet(sym, params, spec['inputs'], self.report, self.tensors)

    def record_tensor_names(self, sym):
        names = set(sym.get_internals().list_outputs())
        for key, v in self.env.items():
            for s in ((v.data, v.fimg) if isinstance(v, _T) else (v,)):
                if isinstance(s, mx.sym.Symbol) and len(s.list_outputs()) == 1 and \
                        s.list_outputs()[0] in names:
                    self.tensors[key] = s.list_outputs()[0]
                    break

    def cast_int_params(self, sym):
        """Integer block parameters -> float32 variables + ``Cast`` in the graph.

        Stock ``SymbolBlock.imports`` only loads float parameters; int32 values beyond
        2**24 are split into two exactly representable halves.
        """
        args = set(sym.list_arguments())
        repl = {}
        for name, (dtype, v) in self.int_params.items():
            if name not in args:
                continue
            if self.int8_weights:       # kept as integers: imports loads the saved dtype
                self.params[name] = v
                continue
            v64 = v.astype(np.int64)
            if dtype == 'int32' and np.abs(v64).max(initial=0) >= 2 ** 24:
                hi, lo = v64 >> 12, v64 & 4095
                self.params[name + '_hi'] = hi.astype(f32)
                self.params[name + '_lo'] = lo.astype(f32)
                s = mx.sym.Cast(mx.sym.var(name + '_hi', shape=v.shape, dtype='float32'),
                                dtype='int32') * 4096 + \
                    mx.sym.Cast(mx.sym.var(name + '_lo', shape=v.shape, dtype='float32'),
                                dtype='int32')
            else:
                self.params[name + '_f32'] = v.astype(f32)
                s = mx.sym.Cast(mx.sym.var(name + '_f32', shape=v.shape, dtype='float32'),
                                dtype=dtype)
            repl[name] = s
        return sym(**repl) if repl else sym


# ---------------------------------------------------------------------------------------
# one handler per step kind
# ---------------------------------------------------------------------------------------
#: step kind (the block class a step names) -> ``handler(ctx, step, block)``, which binds the
#: step's outputs in ``ctx.env`` and records in ``ctx.note`` how the step was lowered
HANDLERS = Registry()
handles = HANDLERS.handles


def _reference(ctx, step, block, lowering, reason=''):
    """The step as gluonq's own block (its reference chain) on the graph's tensors."""
    ins = [ctx.as_ref_input(v) for v in ctx.inputs_of(step)]
    for p in block.collect_params().values():
        ctx.block_param(p)
    res = block(*ins)
    outs = step['outputs']
    vals = [res] if len(outs) == 1 else list(res)
    conv = []
    for k, v in zip(outs, vals):
        qt = qbase.as_qtensor(v) if not isinstance(v, mx.sym.Symbol) else None
        if qt is None:
            conv.append(v)
            continue
        dtype, M, mxdt = _out_qparams(ctx, step, block)
        t = _T(k, qt.data, dtype, M, gq_rng=(qt.min, qt.max), mxdt=mxdt)
        if M is None:
            t.mx = (qt.min, qt.max)
        conv.append(t)
    ctx.set_out(step, conv[0] if len(outs) == 1 else conv)
    ctx.note(step, lowering, reason)


def _out_qparams(ctx, step, block):
    """dtype, static range max (None: dynamic) and graph dtype of an int8 output of a
    reference step."""
    kind = step['block']
    if kind == 'Quantize':
        return block.out_dtype, (block._qp.max if block._qp is not None else None), \
            block.out_dtype
    if kind in ('QuantizedPooling', 'QuantizedFlatten', 'QuantizedActivation'):
        src = ctx.env[step['inputs'][0]]
        if isinstance(src, _T):
            return src.dtype, src.M, src.mxdt
    oq = getattr(block, '_out_q', None)
    return block.out_dtype, (oq.max if oq is not None else None), block.out_dtype


def _unhandled(ctx, step, block):
    _reference(ctx, step, block, 'reference', 'no fast-path handler for %s' % step['block'])


@handles('FloatOp', 'Dequantize')
def _float_step(ctx, step, block):
    _reference(ctx, step, block, 'float')


@handles('QuantizedConv1D', 'QuantizedConv3D')
def _conv_1d_3d(ctx, step, block):
    _reference(ctx, step, block, 'reference')


@handles('QuantizedMatMul')
def _matmul(ctx, step, block):
    """The integers' product as float32 ``linalg_gemm2``s of the operands' float images,
    cut along K so that every partial sum stays below 2**24 (exact, as
    :func:`gluonq.quant.matmul_int_f` with a known K), then gluonq's epilogue: ``acc / inv``
    (float output) or one ``quantize_v2`` (int8 output) whose scale is the requantize
    multiplier ``m`` -- ``saturate(rne(f32(acc * m)))``, gluonq's requantize -- or, where no
    MXNet range gives ``m``, ``acc * m`` and a ``quantize_v2`` at scale 1 ("float-ops").
    gluonq's block where a range is dynamic or K is unknown ("reference")."""
    ops = [_matmul_operand(ctx, step, block, x, w) for x, w in zip(ctx.inputs_of(step), 'ab')]
    why = None
    if block._k is None:
        why = 'contraction size unknown'
    elif any(o is None for o in ops):
        why = 'dynamic or affine operand'
    elif block.out_dtype != 'float32' and block._out_q is None:
        why = 'dynamic output range'
    if why:
        return _reference(ctx, step, block, 'reference', why)
    (a, inv_a), (b, inv_b) = ops
    ta, tb = block._transpose
    chunk = (quant.FLOAT32_EXACT - 1) // quant.matmul_bound(1, *block.in_dtypes)
    cuts = [(c, min(c + chunk, block._k)) for c in range(0, block._k, chunk)]
    prods = [mx.sym.linalg.gemm2(
        mx.sym.slice_axis(a, axis=-2 if ta else -1, begin=c0, end=c1),
        mx.sym.slice_axis(b, axis=-1 if tb else -2, begin=c0, end=c1),
        transpose_a=ta, transpose_b=tb) for c0, c1 in cuts] if len(cuts) > 1 else \
        [mx.sym.linalg.gemm2(a, b, transpose_a=ta, transpose_b=tb)]
    acc = prods[0] if len(prods) == 1 else mx.sym.Cast(
        mx.sym.add_n(*[mx.sym.Cast(p, dtype='int32') for p in prods]), dtype='float32')
    invs = [inv_a, inv_b] + ([f32(1.0 / block.alpha)] if block.alpha != 1.0 else [])
    name = ctx.unique(step['name'])
    if block.out_dtype == 'float32':
        inv = invs[0]
        for f in invs[1:]:
            inv = f32(inv * f)
        ctx.set_out(step, acc / float(inv))
    else:
        dt = block.out_dtype
        out = _T(step['outputs'][0], None, dt, block._out_q.max)
        m = out.inv
        for f in invs:
            m = f32(m / f)
        R, exact = mx_range(m, dt)
        if not exact:
            acc, R = acc * float(m), MX_QRANGE[dt]
        out.data = mx.sym.contrib.quantize_v2(
            acc, out_type=dt, min_calib_range=0.0 if dt == 'uint8' else _rng_attr(-R),
            max_calib_range=_rng_attr(R), name=name)[0]
        ctx.mx_rng(out)
        ctx.set_out(step, out)
    ctx.note(step, 'float-ops', _NO_INT8_MATMUL % len(prods))


def _matmul_operand(ctx, step, block, x, which):
    """``(float32 image of the integers, inverse scale)`` of operand ``which`` ('a'/'b') of
    a QuantizedMatMul: a static int8 tensor of the graph, or a float one quantized here with
    the block's calibrated range; None for a dynamic or affine operand."""
    dtype = block.in_dtypes['ab'.index(which)]
    if isinstance(x, _T):
        ok = x.static and not x.zp and x.dtype == dtype
        return (_as_float(x), x.inv) if ok else None
    qp = block._in_q.get(which)
    if qp is None or qp.is_affine:
        return None
    t = ctx.quantize_as(x, '%s_%s' % (step['name'], which), qp,
                        ctx.unique('%s_quantize_%s' % (step['name'], which)))
    return _as_float(t), t.inv


@handles('Quantize')
def _quantize(ctx, step, block):
    x, = ctx.inputs_of(step)
    if block._qp is None or isinstance(x, _T):
        return _reference(ctx, step, block, 'reference', 'dynamic range')
    t = ctx.quantize_as(x, step['outputs'][0], block._qp, ctx.unique(step['name']))
    ctx.set_out(step, t)
    if t.zp:
        return ctx.note(step, 'float-ops', 'affine: zero point %d added in float32' % t.zp)
    ctx.note(step, 'mxnet-op', '' if t.mx is not None else
             'range not representable in MXNet: gluonq quantize op')


# -- int8 ops with pass-through ranges -----------------------------------------------------
def _int8_input(ctx, step, block):
    """The int8 input of a pass-through step, or None after lowering the step as reference
    (float input)."""
    x, = ctx.inputs_of(step)
    if not isinstance(x, _T):
        _reference(ctx, step, block, 'reference', 'float input')
        return None
    return x


def _int8_result(ctx, step, x, r):
    """Bind the output ``r`` of MXNet's int8 operator on ``x`` (same quantization)."""
    ctx.set_out(step, x.like(step['outputs'][0], r[0], (r[1], r[2])))
    ctx.note(step, 'mxnet-op')


@handles('QuantizedPooling')
def _pooling(ctx, step, block):
    x = _int8_input(ctx, step, block)
    if x is not None:
        name = ctx.unique(step['name'])
        lo, hi = ctx.mx_rng(x)
        _int8_result(ctx, step, x, mx.sym.contrib.quantized_pooling(x.data, lo, hi, name=name,
                                                                    **block._kwargs))


@handles('QuantizedFlatten')
def _flatten(ctx, step, block):
    x = _int8_input(ctx, step, block)
    if x is not None:
        name = ctx.unique(step['name'])
        lo, hi = ctx.mx_rng(x)
        _int8_result(ctx, step, x, mx.sym.contrib.quantized_flatten(x.data, lo, hi, name=name))


@handles('QuantizedActivation')
def _relu(ctx, step, block):
    x = _int8_input(ctx, step, block)
    if x is None:
        return
    name = ctx.unique(step['name'])
    if x.mxdt == 'uint8':
        ctx.set_out(step, x.like(step['outputs'][0], x.data, x.mx))
        return ctx.note(step, 'mxnet-op', 'identity on uint8')
    lo, hi = ctx.mx_rng(x)
    _int8_result(ctx, step, x, mx.sym.contrib.quantized_act(x.data, lo, hi, act_type='relu',
                                                            name=name))


@handles('QuantizedShapeOp')
def _shape_op(ctx, step, block):
    x = _int8_input(ctx, step, block)
    if x is None:
        return
    ctx.unique(step['name'])
    lo, hi = ctx.mx_rng(x)
    slow = block._op in _SLOW_INT8_SHAPE_OPS

    def apply(v):
        r = block.apply(mx.sym, v)
        return [r[i] for i in range(block.num_outputs)] if block.num_outputs > 1 else [r]

    # slow ops (and any op on a tensor that has a float image) also give a float image, so
    # that a float reader (QuantizedMatMul, the next slow op) needs no cast back and forth
    fimgs = apply(_as_float(x)) if slow or x.fimg is not None else [None] * block.num_outputs
    parts = [mx.sym.Cast(f, dtype=x.mxdt) for f in fimgs] if slow else apply(x.data)
    # a split: every part keeps the input's range
    outs = [x.like(k, p, (lo, hi)) for k, p in zip(step['outputs'], parts)]
    for t, f in zip(outs, fimgs):
        t.fimg = f
    ctx.set_out(step, outs if len(outs) > 1 else outs[0])
    ctx.note(step, 'mxnet-op', 'on the float32 image of the integers (MXNet moves 8-bit '
             'elements slowly)' if slow else '')


# -- concat / add ----------------------------------------------------------------------------
@handles('QuantizedConcat')
def _concat(ctx, step, block):
    xs = ctx.inputs_of(step)
    why = None
    oq = block._out_q
    if oq is None:
        why = 'dynamic range'
    elif not all(isinstance(x, _T) and x.static for x in xs):
        why = 'input not a static int8 tensor'
    elif any(x.dtype != oq.dtype or x.mxdt != oq.dtype for x in xs):
        why = "MXNet's int8 concat needs inputs of the output's dtype"
    else:
        out = _T(step['outputs'][0], None, oq.dtype, oq.max)
        r_out = max(x.R for x in xs)
        sc_out = _mx_inv(oq.dtype, r_out)
        for x in xs:
            mx_f = f32(sc_out / x.mx_scale)
            gq_f = f32(out.inv / x.inv)
            copy_mx = sc_out == x.mx_scale
            copy_gq = gq_f == f32(1)
            if copy_mx != copy_gq or (not copy_mx and mx_f != gq_f):
                why = 'rescale factor of an input differs from gluonq'
    if why:
        return _reference(ctx, step, block, 'reference', why)
    args = [x.data for x in xs]
    for x in xs:
        args += list(ctx.mx_rng(x))
    r = mx.sym.contrib.quantized_concat(*args, num_args=len(xs), dim=block._dim,
                                        name=ctx.unique(step['name']))
    out.data, out.R, out.mx = r[0], f32(r_out), (r[1], r[2])
    ctx.set_out(step, out)
    ctx.note(step, 'mxnet-op')


@handles('QuantizedAdd')
def _add(ctx, step, block):
    a, b = ctx.inputs_of(step)
    oq = block._out_q
    why = None
    if oq is None or block._out_dtype == 'float32':
        why = 'float or dynamic output'
    elif not (isinstance(a, _T) and isinstance(b, _T) and a.static and b.static):
        why = 'input not a static int8 tensor'
    elif not (a.dtype == b.dtype == oq.dtype == a.mxdt == b.mxdt):
        why = "MXNet's int8 add mixes dtypes through an int8 buffer"
    elif block._relu and oq.dtype != 'uint8':
        why = 'ReLU on a signed sum has no int8 kernel'
    if why is None:
        out = _T(step['outputs'][0], None, oq.dtype, oq.max)
        want = [f32(out.inv / a.inv), f32(out.inv / b.inv)]
        chosen = None
        for R in _ulp_steps(out.R, _WINDOW)[0]:
            sc = _mx_inv(oq.dtype, R)
            if f32(sc / a.mx_scale) == want[0] and f32(sc / b.mx_scale) == want[1]:
                chosen = R
                break
        if chosen is None:
            why = 'no MXNet range gives the same rescale factors'
    if why:
        return _reference(ctx, step, block, 'reference', why)
    lo = 0.0 if oq.dtype == 'uint8' else -float(chosen)
    (amin, amax), (bmin, bmax) = ctx.mx_rng(a), ctx.mx_rng(b)
    r = mx.sym.contrib.quantized_elemwise_add(
        a.data, b.data, amin, amax, bmin, bmax, min_calib_range=_rng_attr(lo),
        max_calib_range=_rng_attr(chosen), name=ctx.unique(step['name']))
    out.data, out.R, out.mx = r[0], f32(chosen), (r[1], r[2])
    ctx.set_out(step, out)
    ctx.note(step, 'mxnet-op')


# -- conv / dense ------------------------------------------------------------------------------
@handles('QuantizedConv2D', 'QuantizedDense')
def _layer(ctx, step, block):
    """A fused kernel with the requantize, ReLU and residual sum inside ("fused"), a fused
    int8 convolution returning int32 plus gluonq's epilogue ("int32"), the "split"
    convolution (no VNNI, ``exact=True``) or gluonq's block ("reference")."""
    operands = _layer_operands(ctx, step, block)
    if operands is None:
        return
    x, residual, q, s_w, b_q = operands
    is_conv = step['block'] == 'QuantizedConv2D'
    if ctx.exact and not int8_kernels_exact():
        if not is_conv:
            return _reference(ctx, step, block, 'reference', _NO_VNNI)
        return _split_conv(ctx, step, block, x, residual, q, s_w, b_q)
    C = q.shape[0]
    q2d = q.reshape(C, -1)
    mode, why, out_mxdt = _layer_mode(block, is_conv, residual, q)
    out = img = bimg = None
    if mode == 'requant':
        mode, why, out, img, bimg = _requant_images(ctx, step, block, x, residual, q2d, s_w,
                                                    b_q, out_mxdt)
    elif mode == 'float':
        img, bimg, ok, note = _weight_images(q2d, s_w, x.mx_scale, None, None, b_q)
        if not ok:
            mode, why = 'int32', note
    if mode == 'int32':
        if not is_conv:
            return _reference(ctx, step, block, 'reference', why)
        img, bimg = _int32_images(q2d, b_q, x.mx_scale)
        if img is None:
            return _reference(ctx, step, block, 'reference', 'no weight of magnitude 127')
    name = ctx.unique(step['name'])
    fused = _fused_layer(ctx, block, name, is_conv, mode, x, residual, q, img, bimg, out,
                         out_mxdt)
    if mode == 'requant':
        out.data, out.mx = fused[0], (fused[1], fused[2])
        ctx.set_out(step, out)
        t0 = (f32(127.5) * s_w).astype(f32)
        err = np.abs(np.abs(img.reshape(C, -1)).max(axis=1) / t0 - 1).max()
        return ctx.note(step, 'fused', why, scale_err=err if err > 1e-6 else 0.0)
    if mode == 'float':
        y = fused if len(fused.list_outputs()) == 1 else fused[0]
        if residual is not None:
            y = _plus_residual(ctx, y, residual)
        if block._act_type not in (None, 'relu') or (residual is not None and block._act_type):
            y = mx.sym.Activation(y, act_type=block._act_type)
        ctx.set_out(step, y)
        return ctx.note(step, 'fused', 'float output' if residual is None else
                        'float output, the residual added in float32')
    acc = ctx.add_int32_bias(fused[0], name, None if bimg is not None else b_q)
    ctx.set_out(step, _epilogue(ctx, step, block, acc, x, residual, s_w, name))
    ctx.note(step, 'int32', why)


def _layer_operands(ctx, step, block):
    """``(x, residual, q, s_w, b_q)`` of a conv / dense step a fused kernel can take: its
    int8 input (quantized here from a float input), the residual (or None), the int8
    weights, their scales per output channel and the int32 bias (or None). None after
    lowering the step as reference."""
    ins = ctx.inputs_of(step)
    x = ins[0]
    residual = ins[1] if len(ins) > 1 else None
    is_conv = step['block'] == 'QuantizedConv2D'
    why = None
    if ctx.int8_weights and not is_conv:
        why = 'int8 weights: the int8 dense kernel reads them as is'
    elif not block.is_static:
        why = 'dynamic input range'
    elif is_conv and block._kwargs['layout'] != 'NCHW':
        why = 'layout'
    elif block._out_dtype != 'float32' and block._out_q is None:
        why = 'dynamic output range'
    in_q = block._in_q
    if why is None and isinstance(x, _T) and not x.holds(in_q):
        why = 'input range differs from the layer calibration'
    if why:
        _reference(ctx, step, block, 'reference', why)
        return None
    if not isinstance(x, _T):
        x = ctx.quantize_as(x, step['name'] + '_in', in_q,
                            ctx.unique(step['name'] + '_quantize'))
    if x.zp and is_conv and any(block._kwargs['pad']):
        x = _pad_zero_point(ctx, x, block._kwargs['pad'])
    params = {k[len(block.params.prefix):]: p for k, p in block.params.items()}
    q = to_numpy(params['weight'])
    C = q.shape[0]
    s_w = np.broadcast_to(to_numpy(params['weight_scale'], f32).reshape(-1),
                          (C,)).astype(f32)
    b_q = to_numpy(params['bias'], np.int64) if 'bias' in params else None
    return x, residual, q, s_w, b_q


def _pad_zero_point(ctx, x, pad):
    """An affine tensor padded with its zero point (a real 0), for a convolution that then
    runs unpadded: oneDNN's int8 kernels pad with the integer 0. MXNet's ``pad`` takes only
    float data, and the integers are exact in float32."""
    width = (0, 0, 0, 0) + tuple(p for p in pad for _ in range(2))
    padded = mx.sym.pad(_as_float(x), mode='constant', constant_value=float(x.zp),
                        pad_width=width)
    t = x.like(x.key + '_padded', mx.sym.Cast(padded, dtype='uint8'), None)
    t.gq = None
    return t


def _layer_mode(block, is_conv, residual, q):
    """``(mode, why, out_mxdt)`` of a layer with int8 weights ``q``: 'requant' (the kernel
    requantizes), 'float' (float output) or 'int32' (and the reason why not), and the MXNet
    dtype of a fused output."""
    C = q.shape[0]
    q2d = q.reshape(C, -1)
    groups = block._kwargs['num_group'] if is_conv else 1
    depthwise = groups > 1 and groups == C and q.shape[1] == 1
    out_dt = block._out_dtype
    act = block._act_type
    mode, why = 'requant', ''
    # MXNet types a fused output uint8 exactly when a ReLU is fused
    out_mxdt = 'uint8' if (act == 'relu' or out_dt == 'uint8') else 'int8'
    if out_dt == 'float32':
        # a dense layer's residual is added after the kernel (as gluonq adds it to the float
        # result); a convolution with float output returns int32 (no fused float output)
        fuses = not is_conv and not getattr(residual, 'zp', 0)
        mode = 'float' if fuses else 'int32'
        why = 'float output' if mode == 'int32' else ''
    elif residual is not None:
        if not is_conv:
            mode, why = 'int32', 'dense has no fused residual sum'
        elif not isinstance(residual, _T) or not residual.static:
            mode, why = 'int32', 'residual is not a static int8 tensor'
        elif residual.mxdt != out_mxdt and not (
                act == 'relu' and out_dt == 'int8' and residual.mxdt == 'int8'):
            # oneDNN computes the sum in the operand's dtype, in place: an int8 operand
            # with a fused ReLU saturates at 127, a uint8 one without ReLU wraps. The
            # first is exactly gluonq's ReLU'd int8 output ("u7"), so that case fuses.
            mode, why = 'int32', ('%s residual into a %s output: MXNet computes the fused '
                                  'sum in the operand dtype' % (residual.mxdt, out_dt))
    elif act == 'relu' and out_dt == 'int8':
        mode, why = 'int32', 'ReLU with int8 output (a fused ReLU makes uint8 up to 255)'
    if groups > 1 and not depthwise:
        mode, why = 'int32', 'grouped conv (1 < groups < channels): kernel scale bug'
    chmax = np.abs(q2d).max(axis=1)
    if mode != 'int32' and not (chmax == 127).all():
        mode, why = 'int32', ('all-zero weight channel' if (chmax == 0).any() else
                              'weight channel without +-127 (per-tensor weight scale)')
    return mode, why, out_mxdt


def _requant_images(ctx, step, block, x, residual, q2d, s_w, b_q, out_mxdt):
    """``(mode, why, out, img, bimg)`` of a layer whose kernel requantizes: its output
    tensor with the MXNet range chosen, and the weight and bias images that give gluonq's
    multipliers with it; mode 'int32' (no images) where none does."""
    C = q2d.shape[0]
    dscale = x.mx_scale
    out = _T(step['outputs'][0], None, block._out_dtype, block._out_q.max, mxdt=out_mxdt)
    m = quant.requantize_multiplier_np(out.inv, x.inv, quant.weight_inv_scale_np(s_w))
    m = np.broadcast_to(m, (C,)).astype(f32)
    for R in _output_ranges(out, x, residual):
        ratio = f32(_mx_inv(out_mxdt, R) / dscale)
        img, bimg, ok, note = _weight_images(q2d, s_w, dscale, ratio, m, b_q)
        if ok:
            out.R = f32(R)
            return 'requant', note, out, img, bimg
    if not ctx.exact:
        img, bimg, ok, note = _weight_images(q2d, s_w, dscale, None, None, b_q, approx=True)
        if ok:
            cands = _output_ranges(out, x, residual)
            out.R = cands[0] if cands else out.R
            why = note if note.startswith('approximate') else (
                'approximate: requantize multipliers within 1 float32 ulp of '
                "gluonq's (the range has no exact MXNet form)")
            return 'requant', why, out, img, bimg
    return 'int32', ('the range has no exact MXNet form: no fp32 image gives the requantize '
                     'multipliers exactly'), out, None, None


def _int32_images(q2d, b_q, dscale):
    """``(img, bimg)`` of a fused convolution returning int32: one weight scale for the
    tensor, a bias image where one rounds back exactly (else None: the bias is added as
    int32 after); ``(None, None)`` without a weight of magnitude 127."""
    img, ok = _tensor_image(q2d)
    if not ok:
        return None, None
    bimg = None
    if b_q is not None:
        w = f32(f32(127.5) / np.abs(img).max())
        bimg, bex = _bias_images(b_q, dscale, np.full(q2d.shape[0], w, f32))
        bimg = bimg if bex.all() else None
    return img, bimg


def _fused_layer(ctx, block, name, is_conv, mode, x, residual, q, img, bimg, out, out_mxdt):
    """The ``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected`` node of a layer lowered
    'requant', 'float' or 'int32'."""
    C = q.shape[0]
    act, out_dt = block._act_type, block._out_dtype
    inputs = [x.data, ctx.weight_symbol(name, q, img, per_tensor=mode == 'int32')]
    sub = [_var('data'), _var('weight')]
    if bimg is not None:
        inputs.append(ctx.const(name + '_bias', bimg))
        sub.append(_var('bias'))
    lattrs = {'no_bias': str(bimg is None)}
    if is_conv:
        lattrs.update(_conv_attrs(block, x))
        sub.append({'op': 'Convolution', 'name': name + '_conv', 'attrs': lattrs,
                    'inputs': [[i, 0, 0] for i in range(len(sub))]})
    else:
        lattrs.update(num_hidden=str(C), flatten=str(bool(block._flatten)))
        sub.append({'op': 'FullyConnected', 'name': name + '_fc', 'attrs': lattrs,
                    'inputs': [[i, 0, 0] for i in range(len(sub))]})
    # a float output's ReLU comes after its residual (added outside the kernel)
    relu = (mode == 'requant' or (mode == 'float' and residual is None)) and \
        (act == 'relu' or out_dt == 'uint8')
    with_sum = mode == 'requant' and residual is not None

    def add_relu():
        sub.append({'op': 'Activation', 'name': name + '_relu',
                    'attrs': {'act_type': 'relu'}, 'inputs': [[len(sub) - 1, 0, 0]]})

    if is_conv:
        attrs = {'quantized': 'true'}
        if relu and not with_sum:
            attrs['with_act'] = 'true'
            add_relu()
        if with_sum:
            attrs['with_sum'] = 'true'
            inputs.append(residual.data)
            sub.append(_var('sum'))
            sub.append({'op': 'elemwise_add', 'name': name + '_add',
                        'inputs': [[len(sub) - 2, 0, 0], [len(sub) - 1, 0, 0]]})
            if relu:
                attrs['with_postsum_act'] = 'true'
                add_relu()
    else:
        attrs = {'quantized': 'True', 'channel_wise_quantize': 'True'}
        if relu:
            attrs['with_eltwise'] = 'True'
            add_relu()
        if mode == 'float':
            attrs['enable_float_output'] = 'True'
    if mode == 'requant':
        attrs['min_calib_range'] = _rng_attr(0.0 if out_mxdt == 'uint8' else -out.R)
        attrs['max_calib_range'] = _rng_attr(out.R)
    inputs += list(ctx.mx_rng(x))
    if with_sum:
        inputs += list(ctx.mx_rng(residual))
    return _fused('_sg_mkldnn_conv' if is_conv else '_sg_mkldnn_fully_connected', name,
                  attrs, sub, inputs)


def _split_conv(ctx, step, block, x, residual, q, s_w, b_q):
    """An exact int8 convolution where the CPU's kernels saturate int16 pairs: the input
    as two uint8 halves of at most 128 (:func:`gluonq.quant.split_operand_f`), each
    through a fused int8 convolution returning the int32 accumulator, then gluonq's
    epilogue."""
    C = q.shape[0]
    img, ok = _tensor_image(q.reshape(C, -1))
    if not ok:
        return _reference(ctx, step, block, 'reference', 'no weight of magnitude 127')
    name = ctx.unique(step['name'])
    wsym = ctx.weight_symbol(name, q, img, per_tensor=True)
    lattrs = dict(_conv_attrs(block, x), no_bias='True')
    # the data range only sets the operator's reported output range (unused here)
    lo, hi = ctx.const(name + '_half_min', 0.0), ctx.const(name + '_half_max', 1.0)
    accs = []
    for part, half in zip('ab', quant.split_operand_f(mx.sym, _as_float(x), x.mxdt)):
        sub = [_var('data'), _var('weight'),
               {'op': 'Convolution', 'name': '%s_%s_conv' % (name, part), 'attrs': lattrs,
                'inputs': [[0, 0, 0], [1, 0, 0]]}]
        accs.append(_fused('_sg_mkldnn_conv', '%s_%s' % (name, part), {'quantized': 'true'},
                           sub, [half, wsym, lo, hi])[0])
    acc = (mx.sym.broadcast_add if x.mxdt == 'uint8' else mx.sym.broadcast_sub)(*accs)
    acc = ctx.add_int32_bias(acc, name, b_q)
    ctx.set_out(step, _epilogue(ctx, step, block, acc, x, residual, s_w, name))
    ctx.note(step, 'split', _NO_VNNI)


def _epilogue(ctx, step, block, acc, x, residual, s_w, name):
    """gluonq's layer epilogue on an exact int32 accumulator (bias included).

    The same float32 operations as the reference blocks (``_QuantizedLayer._epilogue``),
    with the multipliers precomputed as the same float32 values. Only element-wise
    (non-oneDNN) operators run on the accumulator, and the result leaves through a cast
    that changes the element size: MXNet 1.9.1 lets a same-size in-place cast of a
    oneDNN-layout tensor keep the oneDNN layout tag, and a oneDNN operator (or oneDNN's
    ``elemwise_add``) reading the result then misreads it (tests/test_lower.py pins it).
    """
    C = s_w.shape[0]
    inv_in = x.inv
    inv_w = quant.weight_inv_scale_np(s_w)
    out_dt = block._out_dtype
    # int32 -> float64 -> float32 is the same rounding as int32 -> float32, into a
    # freshly allocated buffer
    accf = mx.sym.Cast(mx.sym.Cast(acc, dtype='float64'), dtype='float32')
    if out_dt == 'float32':
        inv = (np.float32(inv_in) * inv_w).astype(f32)
        y = mx.sym.broadcast_div(accf, mx.sym.reshape(ctx.const(name + '_inv', inv),
                                                      (1, -1, 1, 1)))
        if residual is not None:
            y = _plus_residual(ctx, y, residual)
        if block._act_type:
            y = mx.sym.Activation(y, act_type=block._act_type)
        return y
    out = _T(step['outputs'][0], None, out_dt, block._out_q.max)
    m = quant.requantize_multiplier_np(out.inv, inv_in, inv_w)
    m = np.broadcast_to(m, (C,)).astype(f32)
    y = mx.sym.broadcast_mul(accf, mx.sym.reshape(ctx.const(name + '_mult', m),
                                                  (1, -1, 1, 1)))
    if residual is not None:
        # one rounding, as gluonq's fused residual (quant.requantize_f, fused_sum=True)
        mr = mx.sym.Cast(ctx.const(name + '_res_mult', f32(out.inv / residual.inv)),
                         dtype='float64')
        t = mx.sym.broadcast_mul(mx.sym.Cast(_as_float(residual), dtype='float64'), mr)
        y = mx.sym.Cast(mx.sym.broadcast_add(mx.sym.Cast(y, dtype='float64'), t),
                        dtype='float32')
    lo, hi = quant.QBOUNDS[out_dt]
    if block._act_type == 'relu':
        lo = 0
    # clip (with relu folded in), round half to even, cast: gluonq's requantize_f
    y = quant.round_half_even_f(mx.sym, mx.sym.clip(y, lo, hi))
    # a ReLU'd int8 output holds 0..127: typed uint8 like the fused kernels type it, so
    # that a fused residual reading it sees a uint8 operand
    out.mxdt = 'uint8' if lo >= 0 else out_dt
    out.R = mx_range(out.inv, out.mxdt)[0]
    out.data = mx.sym.Cast(y, dtype=out.mxdt)
    return out


def _plus_residual(ctx, y, residual):
    """``y + residual`` in float32, an int8 residual dequantized as gluonq's float epilogue
    does: ``float32(q) / inv`` (a scalar operator: the same float32 division)."""
    r = residual
    if isinstance(r, _T):
        r = _as_float(r) / float(r.inv)
    return mx.sym.broadcast_add(y, r)


def _output_ranges(out, x, residual, limit=6):
    """Candidate MXNet ranges of a fused layer's output, best first.

    The kernel's requantize multiplier is ``f32(f32(out_scale / data_scale) / w_c)``;
    gluonq's is ``f32(f32(inv_out / inv_in) / inv_w_c)``. Ranges whose ``out_scale``
    makes the first quotient equal gluonq's let the weight images keep gluonq's own
    scales (the only option for channels whose extreme weight is -127); gluonq's own
    output range comes first when it qualifies. With a fused residual, the sum factor
    ``f32(out_scale / sum_scale)`` must also equal ``f32(inv_out / inv_r)``. If no range
    qualifies, the ranges nearest to gluonq's are returned (the weight images then
    absorb the difference where they can).
    """
    dt = out.mxdt
    g = f32(out.inv / x.inv)
    seeds = [out.R, f32(MX_QRANGE[dt] / f32(g * x.mx_scale))]
    cands = np.unique(np.concatenate([_ulp_steps(v, _WINDOW)[0] for v in seeds]))
    scales = (MX_QRANGE[dt] / cands).astype(f32)
    ok = np.ones(cands.shape, bool)
    if residual is not None:
        ok &= (scales / residual.mx_scale).astype(f32) == f32(out.inv / residual.inv)
    exact = ok & ((scales / x.mx_scale).astype(f32) == g)
    dist = np.abs(cands.astype(np.float64) - float(out.R))
    order = np.lexsort((dist, cands != out.R))
    best = [cands[i] for i in order if exact[i]]
    rest = [cands[i] for i in order if ok[i] and not exact[i]]
    return (best + rest)[:limit]


def _int8_weight_image(ctx, name, q, img, per_tensor):
    """The fp32 image ``img`` of int8 weights ``q`` computed in the graph from ``q``.

    ``image = f32(q * s) + one_hot(anchor) * d`` per output channel, with ``s`` the
    image's scale and ``d`` moving each channel's anchor element to the image's exact
    maximum. Returns None when that expression does not give an image the kernel
    re-quantizes exactly like ``img`` (then the layer keeps its fp32 image).
    """
    C = q.shape[0]
    q2 = q.reshape(C, -1).astype(np.int64)
    im = img.reshape(C, -1)
    amax = np.abs(im).max(axis=1)
    T = np.full(C, np.abs(im).max(), f32) if per_tensor else amax.astype(f32)
    w = (f32(127.5) / T).astype(f32)
    scale = (T.astype(np.float64) / 127.5).astype(f32)
    new = (q2.astype(f32) * scale[:, None]).astype(f32)
    anchor = np.argmax(np.abs(im) == T[:, None], axis=1)
    has = np.abs(im[np.arange(C), anchor]) == T
    target = np.where(has, im[np.arange(C), anchor], new[np.arange(C), anchor])
    delta = (target - new[np.arange(C), anchor]).astype(f32)
    new[np.arange(C), anchor] = (new[np.arange(C), anchor] + delta).astype(f32)
    ok = np.array_equal(_rederive(new, w), q2) and \
        np.array_equal(np.abs(new).max(axis=1) if not per_tensor else
                       np.full(C, np.abs(new).max()), T) and \
        np.array_equal(new[np.arange(C), anchor], target)
    if not ok:
        return None
    qv = mx.sym.var(name + '_weight_int8', shape=q.shape, dtype='int8')
    ctx.params[name + '_weight_int8'] = q.astype(np.int8)
    shape = (C,) + (1,) * (q.ndim - 1)
    y = mx.sym.broadcast_mul(mx.sym.Cast(qv, dtype='float32'),
                             mx.sym.reshape(ctx.const(name + '_weight_scale', scale), shape))
    corr = mx.sym.broadcast_mul(
        mx.sym.one_hot(ctx.const(name + '_weight_anchor', anchor.astype(f32)),
                       depth=q2.shape[1]),
        mx.sym.reshape(ctx.const(name + '_weight_delta', delta), (C, 1)))
    return mx.sym.broadcast_add(y, mx.sym.reshape(corr, q.shape))


def lower(qnet, exact=True, int8_weights=False):
    """Lower ``qnet`` (a :class:`~gluonq.QuantizedNet`) to a :class:`LoweredNet`.

    ``exact=True``: every int8 tensor equals the reference chain's; a layer that the fused
    kernel cannot reproduce exactly runs as an int8 convolution with gluonq's float32
    epilogue ("int32" lowering), and on a CPU without VNNI every convolution runs "split"
    (see the module docstring). ``exact=False`` also fuses layers whose ranges have no
    exact MXNet form, with requantize multipliers within one float32 ulp of gluonq's (a
    result can then differ by 1 where the reference is within about 1e-5 of a rounding
    tie), and fuses on CPUs without VNNI too (where oneDNN saturates int16 pairs). Reads
    the current parameter values; call again after changing them.

    ``int8_weights=True`` keeps the weights int8 in the parameters (a file about a quarter of
    the fp32 one): each fused convolution computes its fp32 image in the graph
    (:func:`_int8_weight_image`) and re-quantizes it on every call, and dense
    layers run gluonq's reference int8 dense. Same integers as the fp32-image graph.
    """
    if not isinstance(qnet, QuantizedNet):
        raise TypeError('lower takes a QuantizedNet, got %s' % type(qnet).__name__)
    return _Context(qnet, exact, int8_weights).run()
