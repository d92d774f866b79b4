"""ONNX export of a QuantizedNet in QDQ form, for onnxruntime's int8 kernels.

``export_onnx(qnet, path)`` writes the network gluonq calibrated and quantized as an ONNX
model built from the QuantizedNet's own steps and integer parameters:

* every int8/uint8 tensor of gluonq is an ONNX integer tensor with the same scale. By
  default all of them are **uint8** (onnxruntime's fast U8S8 path on x86): a gluonq uint8
  tensor is held as is (zero point 0), a gluonq int8 tensor ``q`` as ``q + 128`` with zero
  point 128 -- exact, the same integers after the shift. ``act_dtype='int8'`` writes int8
  tensors instead (zero points 0 / -128);
* weights are int8 initializers carrying gluonq's integers (onnxruntime's fast U8S8 path)
  or uint8 ones holding those integers + 128 with zero point 128 (U8U8, exact on every
  CPU), with their scales per output channel (``DequantizeLinear`` with ``axis=0``) or per
  tensor. The default ``weight_dtype='auto'`` takes int8 where onnxruntime's U8S8 kernels
  are exact on the exporting CPU (VNNI) and uint8 where they saturate (see
  :func:`ort_u8s8_exact`). Biases are the int32 initializers gluonq computed at
  ``s_in * s_w``; BatchNorm is already folded; no initializer is listed as a graph input;
* each layer is ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear``, which onnxruntime fuses
  into QLinearConv / QGemm and OpenVINO into int8 convolutions. A fused ReLU is the uint8
  output range itself (QuantizeLinear clamps at zero point 0), so no Relu node is written;
  on a ReLU'd gluonq int8 tensor (zero point 128) it is an integer ``Clip`` after the
  QuantizeLinear, which keeps the unit fusable; the classifier's float output is
  ``DQ -> Gemm`` (QGemm with float output). With ``target='openvino'`` a tensor read only
  by unpadded strided 1x1 convolutions is subsampled on the integers first (a MaxPool with
  a 1x1 kernel), so that OpenVINO keeps those convolutions int8; onnxruntime runs the
  strided convolutions faster as they are, so the default ``target='onnxruntime'`` keeps
  them;
* max pooling, flatten, standalone ReLU and concat of equally quantized inputs run directly
  on the integer tensors (no Q/DQ around them); global average pooling is
  ``DQ -> GlobalAveragePool -> Q`` (QLinearGlobalAveragePool), other average pooling a
  depthwise conv with int8 weights of 1 (QLinearConv, rounding like gluonq); add and a
  requantizing concat are ``DQ -> op -> Q`` (QLinearAdd / QLinearConcat);
* int8 shape operators (reshape with MXNet's codes 0, -1, -2, -3, -4, transpose, SwapAxis,
  expand_dims, squeeze, slice, slice_axis, split) move the integer tensors as ONNX
  Reshape/Transpose/Unsqueeze/Squeeze/Slice/Split; a matrix product of two int8 tensors is
  ``DQ -> MatMul -> Q`` (QLinearMatMul, or MatMulIntegerToFloat with a float output);
* ops gluonq leaves in float (``FloatOp`` steps) are converted with MXNet's own ONNX
  converters (``mx.onnx``, which needs onnx 1.18.0) one op at a time and spliced in, except
  those in ``_FLOAT_HANDLERS`` (LayerNorm, mean, erf, the shape operators, global average
  pooling as ReduceMean, OpenVINO's hardsigmoid form), which gluonq writes itself; an op neither can convert raises :class:`ONNXExportError` naming the
  step.

Integer agreement with gluonq's MXNet int8 network. onnxruntime's QLinearConv computes
``round_half_even(float32(acc) * m_ort)``, ``m_ort = float32(float32(s_x * s_w) / s_y)``
from the three scales in the model; gluonq computes ``round_half_even(float32(acc) * m)``,
``m = (inv_y / inv_x) / inv_w`` in float32. For each output channel the weight scale
written is the float32 value next to gluonq's (a relative change below 1e-6) that makes
``m_ort`` bit-identical to ``m`` (:func:`matching_weight_scales`; for the few channels where
no float32 value does, one ulp off). With the exact int32 accumulator (int8 weights on a
CPU with VNNI, whose ``vpdpbusd`` does not saturate; uint8 weights on any CPU) the integers
are then identical. What still differs:

* QuantizeLinear divides by the scale where gluonq multiplies by the inverse scale: they can
  round differently when ``x / s`` is within a float32 ulp of a half-integer;
* a layer with a fused residual add. gluonq adds the residual before its one rounding;
  onnxruntime has no int8 conv with a sum input, so the conv result is rounded to an 8-bit
  intermediate first (``Conv -> Q -> DQ -> Add -> Q``, as onnxruntime's own quantizer does).
  Its range lies inside the window where saturating it cannot change the result; with
  ``calib_data`` it is the calibrated range of the conv result with a margin (finer). Where the
  intermediate does not saturate, a result moves by at most ``floor(s_c / (2 s_y) + 1)``
  steps (:func:`residual_intermediates` lists ``s_c``);
* unfused add and requantizing concat use onnxruntime's arithmetic (22-bit fixed-point
  multipliers, lookup tables): equal except at rounding ties;
* average pooling over ``n`` values: equal where ``n`` is odd or a power of two; for other
  ``n`` (a 14 x 14 global pool, a 2 x 3 kernel) a sum exactly at a tie can round one step
  the other way;
* with ``round_float_results``, a convolution's float result is rounded to an 8-bit
  intermediate: by at most half its step where it does not saturate;
* a float output (the classifier) is ``float32(acc) * (s_x * s_w)`` in onnxruntime and
  ``float32(acc) / (inv_x * inv_w)`` in gluonq: equal within a few float32 ulps.

:func:`tensor_names` maps gluonq's tensor names to the ONNX tensors holding them (stored in
the model's metadata), so any int8 tensor can be compared with ``QuantizedNet.forward_all``.
"""
from __future__ import annotations

import json

import numpy as np

from .. import quant
from ..arrays import to_numpy
from ..atomic import atomic_outputs
from ..convert.qnet import QuantizedNet, _find_op
from .registry import Registry

__all__ = ['export_onnx', 'to_onnx', 'preadd_ranges', 'ONNXExportError', 'tensor_names',
           'residual_intermediates', 'onnx_zero_point', 'matching_weight_scales',
           'ort_u8s8_exact', 'resolve_weight_dtype', 'TARGETS']


#: Calibrated pre-add ranges are widened by this factor (then cut to the safe window). On
#: the MNIST nets of benchmarks/bench_onnx.py, 1.25 gave 0.4-1.9 dB more logit SQNR than the
#: bare calibrated range on two nets of three (clipping of test inputs beyond the
#: calibration range costs more than the coarser rounding saves).
PREADD_MARGIN = 1.25


_ORT_U8S8_EXACT = None


def ort_u8s8_exact():
    """Does onnxruntime's U8S8 int8 GEMM (QLinearConv, QGemm) compute exactly on this CPU?

    With VNNI it does; on x86 CPUs without VNNI it adds pairs of uint8 * int8 products in
    int16 with saturation (``vpmaddubsw``), as onnxruntime's quantization docs describe.
    Probed once per process: ``MatMulInteger`` of two uint8 255s against int8 127s, exactly
    64770, comes back as 32767 where pairs saturate. Then ``weight_dtype='uint8'`` gives
    exact results.
    """
    global _ORT_U8S8_EXACT
    if _ORT_U8S8_EXACT is None:
        import onnxruntime as ort
        onnx, helper, numpy_helper = _onnx()
        b = numpy_helper.from_array(np.full((2, 1), 127, np.int8), 'b')
        graph = helper.make_graph(
            [helper.make_node('MatMulInteger', ['a', 'b'], ['y'])], 'probe',
            [helper.make_tensor_value_info('a', onnx.TensorProto.UINT8, [1, 2])],
            [helper.make_tensor_value_info('y', onnx.TensorProto.INT32, [1, 1])], [b])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
        model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid('', 13)])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=['CPUExecutionProvider'])
        y = sess.run(None, {'a': np.full((1, 2), 255, np.uint8)})[0]
        _ORT_U8S8_EXACT = bool(y[0, 0] == 2 * 255 * 127)
    return _ORT_U8S8_EXACT


#: the runtimes ``export_onnx`` lays its graph out for
TARGETS = ('onnxruntime', 'openvino')


def resolve_weight_dtype(weight_dtype, target='onnxruntime'):
    """The ONNX weight type ``export_onnx`` writes for ``weight_dtype``: 'auto' is 'int8'
    (U8S8, fast) where onnxruntime's U8S8 kernels are exact on this CPU, else 'uint8'
    (U8U8, exact on every CPU); for OpenVINO always 'int8' (its int8 convolutions take
    signed weights with no zero point; uint8 weights would be decompressed to float)."""
    if weight_dtype == 'auto' and target == 'openvino':
        return 'int8'
    if weight_dtype == 'auto':
        try:
            return 'int8' if ort_u8s8_exact() else 'uint8'
        except ImportError:
            import warnings
            warnings.warn("weight_dtype='auto' writes int8 (U8S8) weights: onnxruntime is not "
                          "installed, so whether its U8S8 kernels are exact on this CPU "
                          "cannot be probed", stacklevel=3)
            return 'int8'
    if weight_dtype not in ('int8', 'uint8'):
        raise ValueError("weight_dtype must be 'auto', 'int8' (onnxruntime's fast U8S8 path) "
                         "or 'uint8' (U8U8: exact on CPUs without VNNI), got %r"
                         % (weight_dtype,))
    return weight_dtype


class ONNXExportError(ValueError):
    """A QuantizedNet step that cannot be written as ONNX."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:                                      # pragma: no cover
        raise ImportError('gluonq.export_onnx needs the onnx package (onnx==1.18.0 is the '
                          'last release MXNet\'s float converters work with): '
                          'pip install "onnx==1.18.0"') from None
    return onnx, helper, numpy_helper


# ---------------------------------------------------------------------------------------
# float32 arithmetic of onnxruntime's fused kernels, used to pick exact weight scales
# ---------------------------------------------------------------------------------------
def _ort_multiplier(s_x, s_w, s_y):
    """QLinearConv's requantize multiplier: ``float32(float32(s_x * s_w) / s_y)``."""
    s_x, s_y = np.float32(s_x), np.float32(s_y)
    return ((s_x * np.asarray(s_w, np.float32)).astype(np.float32) / s_y).astype(np.float32)


def matching_weight_scales(m, s_x, s_y, max_steps=64):
    """Per-channel float32 weight scales ``s`` with ``_ort_multiplier(s_x, s, s_y) == m``.

    Starts at the float32 nearest ``m * s_y / s_x`` and walks up to ``max_steps`` ulps both
    ways. Not every float32 ``m`` is reachable (the products skip values when a float32
    multiplication carries into the next binade); such a channel gets the scale whose
    multiplier is nearest ``m`` (one ulp off). Returns ``(scales, exact_mask)``.
    """
    m = np.asarray(m, np.float32).reshape(-1)
    s0 = (m.astype(np.float64) * np.float64(np.float32(s_y)) /
          np.float64(np.float32(s_x))).astype(np.float32)
    k = np.arange(-max_steps, max_steps + 1)
    # candidates: s0 moved by k ulps (float32 bit patterns of positive values are ordered)
    cand = (s0.view(np.int32)[:, None] + k[None, :]).astype(np.int32).view(np.float32)
    got = _ort_multiplier(s_x, cand, s_y)
    err = np.abs(got.astype(np.float64) - m.astype(np.float64)[:, None])
    err += np.abs(k)[None, :] * 1e-30          # prefer the fewest steps among equals
    best = np.argmin(err, axis=1)
    out = cand[np.arange(len(m)), best]
    return out.astype(np.float32), _ort_multiplier(s_x, out, s_y) == m


# ---------------------------------------------------------------------------------------
# zero points, and the quantized tensors that carry them: every ONNX zero point is chosen
# here (``_Context.scale_zp`` writes a tensor's scale and zero point as initializers)
# ---------------------------------------------------------------------------------------
def _zero_point(gdtype, onnx_dtype):
    """Zero point that holds gluonq ``gdtype`` integers exactly in ``onnx_dtype``."""
    return {('int8', 'uint8'): 128, ('uint8', 'uint8'): 0,
            ('int8', 'int8'): 0, ('uint8', 'int8'): -128}[(gdtype, onnx_dtype)]


def onnx_zero_point(gluonq_dtype, act_dtype='uint8'):
    """Zero point of the ONNX tensor holding gluonq ``gluonq_dtype`` integers."""
    return _zero_point(gluonq_dtype, act_dtype)


def _weight_zero_point(weight_dtype):
    """Zero point of the weights: uint8 weights hold gluonq's int8 integers as ``q + 128``."""
    return 128 if weight_dtype == 'uint8' else 0


def _range_zero_point(lo, scale, onnx_dtype):
    """Zero point of an ONNX-only 8-bit tensor (no gluonq tensor) whose range starts at
    ``lo``."""
    info = np.iinfo(_np_dtype(onnx_dtype))
    return int(np.clip(np.rint(info.min - lo / float(scale)), info.min, info.max))


def _np_dtype(onnx_dtype):
    return np.uint8 if onnx_dtype == 'uint8' else np.int8


class _QT:
    """An integer ONNX tensor holding a gluonq quantized tensor."""
    __slots__ = ('name', 'qp', 'scale', 'zp', 'onnx_dtype')

    def __init__(self, name, qp, onnx_dtype):
        self.name = name
        self.qp = qp
        self.scale = np.float32(qp.scale)
        self.onnx_dtype = onnx_dtype
        self.zp = _zero_point(qp.dtype, onnx_dtype) + qp.zero_point


class _QTRaw(_QT):
    """An ONNX-only 8-bit tensor (not a gluonq tensor) with a given scale and zero point."""

    def __init__(self, name, scale, zp, onnx_dtype):
        self.name = name
        self.qp = None
        self.scale = np.float32(scale)
        self.zp = int(zp)
        self.onnx_dtype = onnx_dtype


# ---------------------------------------------------------------------------------------
# the context the handlers write into
# ---------------------------------------------------------------------------------------
class _Context:
    """What the export of one QuantizedNet holds while the handlers run: the ONNX nodes and
    initializers written so far, the ONNX tensor of each gluonq tensor (``env``: float
    names and :class:`_QT`), and the shapes of gluonq's tensors."""

    def __init__(self, qnet, input_shape, opset, act_dtype, dynamic_batch, preadd_ranges,
                 weight_dtype, target, float_result_ranges=None):
        self.onnx, self.helper, self.numpy_helper = _onnx()
        self.preadd_ranges = dict(preadd_ranges or {})
        self.float_result_ranges = dict(float_result_ranges or {})
        self.float_result_info = {}
        self.qnet = qnet
        self.spec = qnet.spec
        self.opset = opset
        self.act_dtype = act_dtype
        self.weight_dtype = weight_dtype
        self.target = target
        self.dynamic_batch = dynamic_batch
        self.input_shape = tuple(input_shape)
        self.nodes, self.inits = [], []
        self.qparam_inits = {}
        self.env = {}                      # gluonq key -> ONNX float name or _QT
        self.names = set()
        self.residual_info = {}
        self.weight_scale_info = {}
        self.rows_shape = {}
        self.subsampled = {}               # (ONNX tensor, strides) -> subsampled _QT
        self.shapes = self._tensor_shapes(self.input_shape)
        self._other_batch_shapes = None

    # -- shapes of every tensor from one eager run ----------------------------------------
    def _tensor_shapes(self, input_shape):
        import mxnet as mx
        x = mx.nd.zeros(input_shape)
        env = self.qnet.forward_all(x)
        shapes = {}
        for k, v in env.items():
            d = v[0] if isinstance(v, (list, tuple)) else v
            shapes[k] = tuple(d.shape)
        return shapes

    def batch_dims(self, key):
        """Axes of tensor ``key`` whose size follows the batch size (from a second eager
        run at another batch size); none without ``dynamic_batch``."""
        if not self.dynamic_batch:
            return []
        if self._other_batch_shapes is None:
            self._other_batch_shapes = self._tensor_shapes((self.input_shape[0] + 1,) +
                                                           self.input_shape[1:])
        return [i for i, (a, c) in enumerate(zip(self.shapes[key],
                                                  self._other_batch_shapes[key])) if a != c]

    # -- naming and small helpers ---------------------------------------------------------
    def fresh(self, base):
        name, k = base, 1
        while name in self.names:
            k += 1
            name = '%s_%d' % (base, k)
        self.names.add(name)
        return name

    def const(self, base, value):
        name = self.fresh(base)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, outputs, name=None, domain=None, **attrs):
        n = self.helper.make_node(op, inputs, outputs, name=self.fresh(name or outputs[0]),
                                  domain=domain, **attrs)
        self.nodes.append(n)
        return n

    # -- quantize / dequantize ------------------------------------------------------------
    def scale_zp(self, qt):
        """(scale name, zero point name) initializers of a quantized tensor (made once)."""
        if qt.name not in self.qparam_inits:
            s = self.const(qt.name + '/scale', np.array(qt.scale, np.float32))
            z = self.const(qt.name + '/zero_point', np.array(qt.zp, _np_dtype(qt.onnx_dtype)))
            self.qparam_inits[qt.name] = (s, z)
        return self.qparam_inits[qt.name]

    def quantize(self, float_name, out_name, qp):
        qt = _QT(self.fresh(out_name), qp, self.act_dtype)
        s, z = self.scale_zp(qt)
        self.node('QuantizeLinear', [float_name, s, z], [qt.name])
        return qt

    def quantize_relu(self, y, out_key, qp, relu):
        """QuantizeLinear of ``y`` with a fused ReLU if ``relu``. Where the zero point is the
        bottom of the integer range the saturation is the ReLU; otherwise an integer
        ``Clip`` from the zero point follows the quantize (exact: quantization is monotonic
        and maps 0 to the zero point). A float Relu before it would break the DQ -> op -> Q
        unit that onnxruntime fuses into an int8 kernel."""
        if not relu or _zero_point(qp.dtype, self.act_dtype) == \
                np.iinfo(_np_dtype(self.act_dtype)).min:
            return self.quantize(y, out_key, qp)
        return self.relu_q(self.quantize(y, out_key + '/prerelu', qp), out_key)

    def relu_q(self, x, out_key):
        """ReLU on the integers: ``Clip(q, zero point, top of the type)``. OpenVINO fuses a
        Clip with scalar bounds into the int8 convolution before it (an integer ``Max``
        it ran as a separate u8 Eltwise with a Reorder); onnxruntime runs either alone."""
        qt = _QT(self.fresh(out_key), x.qp, self.act_dtype)
        dt = _np_dtype(self.act_dtype)
        lo = self.const(qt.name + '/zero', np.array(x.zp, dt))
        hi = self.const(qt.name + '/top', np.array(np.iinfo(dt).max, dt))
        self.node('Clip', [x.name, lo, hi], [qt.name])
        return qt

    def subsample(self, x, strides):
        """Every ``strides``-th value of the integer tensor ``x`` (a MaxPool with a 1-pixel
        kernel, exact), written once per tensor and strides."""
        key = (x.name, tuple(strides))
        if key not in self.subsampled:
            qt = _QT(self.fresh(x.name + '/subsample'), x.qp, self.act_dtype)
            self.node('MaxPool', [x.name], [qt.name], kernel_shape=[1] * len(strides),
                      strides=list(strides))
            self.subsampled[key] = qt
        return self.subsampled[key]

    def dequantize(self, qt, out_name=None):
        """A fresh DequantizeLinear of ``qt`` (one per consumer, as QDQ node units want)."""
        s, z = self.scale_zp(qt)
        out = self.fresh(out_name or qt.name + '/dq')
        self.node('DequantizeLinear', [qt.name, s, z], [out])
        return out

    def rename(self, tensor, key):
        """Give the float result ``tensor`` of the last node the name of the gluonq tensor
        ``key`` when that name is free (graph outputs keep gluonq's names)."""
        last = self.nodes[-1]
        if key in self.names or tensor not in last.output:
            return tensor
        self.names.add(key)
        last.output[list(last.output).index(tensor)] = key
        return key

    def as_float(self, key):
        v = self.env[key]
        return self.dequantize(v) if isinstance(v, _QT) else v

    def as_q(self, key, step):
        v = self.env[key]
        if not isinstance(v, _QT):
            raise ONNXExportError('step %r reads %r as a quantized tensor, but it is float'
                                  % (step['name'], key))
        return v

    # -- the graph ------------------------------------------------------------------------
    def build(self):
        helper, onnx = self.helper, self.onnx
        inputs = []
        for k in self.spec['inputs']:
            shape = list(self.input_shape)
            if self.dynamic_batch:
                shape[0] = 'N'
            inputs.append(helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, shape))
            self.env[k] = k
            self.names.add(k)
        for step in self.spec['steps']:
            block = self.qnet._children[step['name']]
            handler = HANDLERS.get(step['block'])
            if handler is None:
                raise ONNXExportError('step %r: no ONNX converter for block %s'
                                      % (step['name'], step['block']))
            handler(self, step, block)
        outputs = []
        for k in self.spec['outputs']:
            v = self.env[k]
            if isinstance(v, _QT):
                v = self.dequantize(v)
            name = k
            if v != name:
                name = v if v not in [o.name for o in outputs] else self.fresh(k)
                if name != v:
                    self.node('Identity', [v], [name])
            self.env[k] = name
            shape = list(self.shapes[k])
            if self.dynamic_batch:
                shape[0] = 'N'
            outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
        graph = helper.make_graph(self.nodes, 'gluonq_int8', inputs, outputs, self.inits)
        opsets = [helper.make_opsetid('', self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name='gluonq')
        from .. import __version__
        model.producer_version = __version__
        model.ir_version = helper.find_min_ir_version_for(opsets)
        tensors = {k: (v.name if isinstance(v, _QT) else v) for k, v in self.env.items()}
        helper.set_model_props(model, {
            'gluonq.act_dtype': self.act_dtype,
            'gluonq.weight_dtype': self.weight_dtype,
            'gluonq.tensors': json.dumps(tensors, sort_keys=True),
            'gluonq.residual_intermediates': json.dumps(self.residual_info, sort_keys=True)})
        return model


# ---------------------------------------------------------------------------------------
# one handler per step kind
# ---------------------------------------------------------------------------------------
#: step kind (the block class a step names) -> ``handler(b, step, block)``, which writes the
#: step's nodes into the context ``b`` and binds its outputs in ``b.env``
HANDLERS = Registry()
handles = HANDLERS.handles


@handles('Quantize')
def _quantize(b, step, block):
    if block._qp is None:
        raise ONNXExportError('step %r quantizes with run-time (dynamic) ranges; ONNX '
                              'export needs a calibrated network (gluonq.quantize_net)'
                              % step['name'])
    b.env[step['outputs'][0]] = b.quantize(b.env[step['inputs'][0]], step['outputs'][0],
                                           block._qp)


@handles('Dequantize')
def _dequantize(b, step, block):
    qt = b.as_q(step['inputs'][0], step)
    b.env[step['outputs'][0]] = b.dequantize(qt, step['outputs'][0])


def _out_qp(block):
    q = block._out_q
    return None if q is None else quant.QParams(q.dtype, q.min, q.max)


def _check_static(step, block):
    if getattr(block, '_in_q', 1) is None or (block.out_dtype != 'float32' and
                                              block._out_q is None):
        raise ONNXExportError('step %r (%s) uses run-time (dynamic) ranges; ONNX export '
                              'needs a calibrated network (gluonq.quantize_net)'
                              % (step['name'], step['block']))


@handles('QuantizedConv1D', 'QuantizedConv2D', 'QuantizedConv3D', 'QuantizedDense')
def _layer(b, step, block):
    """``DQ -> Conv/Gemm -> Q`` with int8 weights and an int32 bias: QLinearConv / QGemm.

    A fused residual adds through an 8-bit intermediate (:func:`_residual_intermediate`);
    a dense layer on the last axis of an n-d tensor (``flatten=False``) runs as a Gemm on
    the (rows, in_units) view of the integers, reshaped back after."""
    _check_static(step, block)
    name = step['name']
    params = {k[len(block.params.prefix):]: to_numpy(v)
              for k, v in block.params.items()}
    x = b.as_q(step['inputs'][0], step)
    qp_in = block._in_q
    if x.qp.dtype != qp_in.dtype or x.qp.zero_point != qp_in.zero_point or \
            not np.isclose(x.qp.max, qp_in.max, rtol=1e-6) or \
            not np.isclose(x.qp.min, qp_in.min, rtol=1e-6):
        raise ONNXExportError('step %r: input range %r differs from the calibrated %r'
                              % (name, x.qp, qp_in))
    out_qp = _out_qp(block)
    relu = block._act_type == 'relu'
    is_dense = step['block'] == 'QuantizedDense'
    in_rank = len(b.shapes[step['inputs'][0]])
    rows_view = is_dense and not block._flatten and in_rank > 2
    w_dq, b_dq = _layer_weights(b, name, block, params, x, out_qp)
    y = _layer_op(b, name, block, is_dense, x, w_dq, b_dq, step['inputs'][0], in_rank)
    units = params['weight'].shape[0]
    if rows_view:
        _rows_view_shape(b, name, x.name, units)
    if block._residual:
        y = _residual_add(b, step, y, out_qp, relu, rows_view, in_rank)
    elif out_qp is None and name in b.float_result_ranges:
        y = _float_result_intermediate(b, name, y, relu)
        relu = False                         # the intermediate's zero point clamps at 0
    out_key = step['outputs'][0]
    if out_qp is None:
        if relu:
            y2 = b.fresh(name + '/relu')
            b.node('Relu', [y], [y2])
            y = y2
        elif block._act_type:
            y = _float_activation(b, name, y, block._act_type)
        if rows_view:
            y2 = b.fresh(name + '/reshape')
            b.node('Reshape', [y, b.rows_shape[name]], [y2])
            y = y2
        b.env[out_key] = b.rename(y, out_key)
    elif rows_view:
        rows = b.quantize_relu(y, name + '/rows', out_qp, relu)
        qt = _QT(b.fresh(out_key), out_qp, b.act_dtype)
        b.node('Reshape', [rows.name, b.rows_shape[name]], [qt.name])
        b.env[out_key] = qt
    else:
        b.env[out_key] = b.quantize_relu(y, out_key, out_qp, relu)


def _layer_weights(b, name, block, params, x, out_qp):
    """The weight and bias initializers of a layer and their DequantizeLinear outputs
    ``(w_dq, b_dq)`` (``b_dq`` None without bias). Without a residual the weight scales are
    the ones whose QLinearConv multiplier is gluonq's (:func:`matching_weight_scales`)."""
    qp_in = block._in_q
    w_q, s_w = params['weight'], params['weight_scale'].astype(np.float32)
    units = w_q.shape[0]
    per_channel = s_w.size > 1
    # the weight scale written to the model
    inv_in = qp_in.inv_scale
    inv_w = quant.weight_inv_scale_np(s_w)
    if out_qp is not None and not block._residual:
        inv_out = quant.inv_scale_np(out_qp.min, out_qp.max, out_qp.dtype)
        m = quant.requantize_multiplier_np(inv_out, inv_in, inv_w).reshape(-1)
        s_w_model, exact = matching_weight_scales(m, x.scale, np.float32(out_qp.scale))
        if not per_channel:
            s_w_model = s_w_model[:1]
        b.weight_scale_info[name] = (s_w_model, exact)
    else:
        s_w_model = s_w.reshape(-1)
    w_zp = _weight_zero_point(b.weight_dtype)
    w_dt = _np_dtype(b.weight_dtype)
    w_name = b.const(name + '/weight', (w_q.astype(np.int16) + w_zp).astype(w_dt))
    w_s = b.const(name + '/weight_scale', s_w_model if per_channel else
                  np.array(s_w_model[0], np.float32))
    w_z = b.const(name + '/weight_zero_point', np.full(units, w_zp, w_dt)
                  if per_channel else np.array(w_zp, w_dt))
    w_dq = b.fresh(name + '/weight/dq')
    kw = {'axis': 0} if per_channel else {}
    b.node('DequantizeLinear', [w_name, w_s, w_z], [w_dq], **kw)
    if 'bias' not in params:
        return w_dq, None
    bias = params['bias']
    if bias.dtype != np.int32:
        raise ONNXExportError('step %r: float bias (dynamic layer)' % name)
    if qp_in.zero_point:     # ONNX subtracts the input's zero point itself
        bias = bias.astype(np.int64) + qp_in.zero_point * w_q.reshape(units, -1).astype(
            np.int64).sum(axis=1)
    b_scale = (x.scale * np.broadcast_to(s_w_model, (units,))).astype(np.float32)
    b_name = b.const(name + '/bias', bias.astype(np.int32))
    b_s = b.const(name + '/bias_scale', b_scale)
    b_z = b.const(name + '/bias_zero_point', np.zeros(units, np.int32))
    b_dq = b.fresh(name + '/bias/dq')
    b.node('DequantizeLinear', [b_name, b_s, b_z], [b_dq], axis=0)
    return w_dq, b_dq


def _layer_op(b, name, block, is_dense, x, w_dq, b_dq, in_key, in_rank):
    """The float Conv / Gemm of a layer on the DequantizeLinear of its input ``x``; a
    dense input of rank > 2 is flattened as integers, and an input read only by strided
    1x1 convolutions subsampled for OpenVINO (:func:`_read_subsampled_only`). Returns its
    output."""
    x_in = x
    if is_dense and in_rank > 2:
        flat = _QT(b.fresh(name + '/flatten'), x.qp, b.act_dtype)
        b.node('Flatten', [x.name], [flat.name], axis=1 if block._flatten else in_rank - 1)
        x_in = flat
    k = None if is_dense else block._kwargs
    strides = None if is_dense else list(k['stride'])
    if not is_dense and b.target == 'openvino' and _read_subsampled_only(b, in_key):
        x_in = b.subsample(x_in, strides)
        strides = [1] * len(strides)
    x_dq = b.dequantize(x_in)
    y = b.fresh(name + ('/conv' if not is_dense else '/gemm'))
    if is_dense:
        b.node('Gemm', [x_dq, w_dq] + ([b_dq] if b_dq else []), [y], transB=1)
    else:
        b.node('Conv', [x_dq, w_dq] + ([b_dq] if b_dq else []), [y],
               kernel_shape=list(k['kernel']), strides=strides,
               pads=list(k['pad']) * 2, dilations=list(k['dilate']),
               group=int(k['num_group']))
    return y


def _residual_add(b, step, y, out_qp, relu, rows_view, in_rank):
    """The layer result ``y`` plus its residual: with a quantized output and residual,
    through an 8-bit intermediate of ``y`` (QLinearAdd); else in float."""
    name = step['name']
    r = b.env[step['inputs'][1]]
    if rows_view:         # the residual as (rows, units) too, integers or float
        r_rows = b.fresh(name + '/residual_rows')
        b.node('Flatten', [r.name if isinstance(r, _QT) else r], [r_rows], axis=in_rank - 1)
        r = _QT(r_rows, r.qp, b.act_dtype) if isinstance(r, _QT) else r_rows
    if out_qp is not None and isinstance(r, _QT):
        # round the conv result to an 8-bit intermediate whose saturation never
        # changes the final result, then add (QLinearAdd)
        cq = _residual_intermediate(b, name, out_qp, r.qp, relu)
        c_qt = _QTRaw(b.fresh(name + '/preadd'), cq[0], cq[1], b.act_dtype)
        b.residual_info[name]['tensor'] = c_qt.name
        s, z = b.scale_zp(c_qt)
        b.node('QuantizeLinear', [y, s, z], [c_qt.name])
        c_dq = b.dequantize(c_qt)
        y2 = b.fresh(name + '/add')
        b.node('Add', [c_dq, b.dequantize(r)], [y2])
        return y2
    y2 = b.fresh(name + '/add')
    b.node('Add', [y, b.dequantize(r) if isinstance(r, _QT) else r], [y2])
    return y2


def _read_subsampled_only(b, key):
    """Do all readers of gluonq tensor ``key`` take every n-th pixel only: unpadded 1x1
    convolutions with the same strides, some > 1 (ResNet v1's downsampling blocks)?

    OpenVINO moves the strides of such readers up through the DequantizeLinear (it
    inserts a pooling between the two) and then runs those convolutions in bf16 or
    float, also on the anchors' own QDQ models. Subsampled on the integers first
    (:meth:`subsample`), they stay int8 and share the one subsampling. onnxruntime runs
    the strided convolutions faster than the subsampling and unstrided ones (its
    profiler on ResNet-50 v1: 1.4-1.9% of a call), so only the OpenVINO graph has it."""
    if key in b.spec['outputs']:
        return False
    strides = set()
    for st in b.spec['steps']:
        if key not in st['inputs']:
            continue
        kw = getattr(b.qnet._children[st['name']], '_kwargs', {})
        if not st['block'].startswith('QuantizedConv') or st['inputs'].index(key) != 0 \
                or key in st['inputs'][1:] or any(d != 1 for d in kw['kernel']) or \
                any(kw['pad']):
            return False
        strides.add(tuple(kw['stride']))
    return len(strides) == 1 and max(next(iter(strides))) > 1


def _rows_view_shape(b, name, x_name, units):
    """Shape tensor ``x.shape[:-1] + (units,)`` (dynamic batch included)."""
    shp, head = b.fresh(name + '/in_shape'), b.fresh(name + '/out_shape_head')
    b.node('Shape', [x_name], [shp])
    starts = b.const(name + '/starts', np.array([0], np.int64))
    ends = b.const(name + '/ends', np.array([-1], np.int64))
    b.node('Slice', [shp, starts, ends], [head])
    last = b.const(name + '/units', np.array([units], np.int64))
    out = b.fresh(name + '/out_shape')
    b.node('Concat', [head, last], [out], axis=0)
    b.rows_shape[name] = out


def _float_activation(b, name, y, act):
    ops = {'sigmoid': 'Sigmoid', 'tanh': 'Tanh', 'softrelu': 'Softplus',
           'softsign': 'Softsign', 'relu': 'Relu'}
    if act not in ops:
        raise ONNXExportError('step %r: activation %r has no ONNX converter' % (name, act))
    y2 = b.fresh(name + '/' + act)
    b.node(ops[act], [y], [y2])
    return y2


def _residual_intermediate(b, name, out_qp, r_qp, relu):
    """(scale, zero point) of the 8-bit intermediate conv result before a residual add.

    The output saturates to [lo_y, hi_y] and the residual lies in [lo_r, hi_r], so a
    conv result ``c`` outside the window ``[lo_y - hi_r, hi_y - lo_r]`` saturates the
    output whatever the residual: saturating ``c`` to the window changes nothing. With
    calibrated ranges of ``c`` (``calib_data``) the range is the calibrated one widened
    by :data:`PREADD_MARGIN` and cut to the window: it rounds finer, and the margin
    keeps inputs a little outside the calibration data from saturating it.
    """
    qlo, qhi = quant.QBOUNDS[out_qp.dtype]
    lo_y, hi_y = qlo * float(out_qp.scale), qhi * float(out_qp.scale)
    if relu:
        lo_y = 0.0
    rlo, rhi = quant.QBOUNDS[r_qp.dtype]
    lo_r, hi_r = rlo * float(r_qp.scale), rhi * float(r_qp.scale)
    lo_c, hi_c = lo_y - hi_r, hi_y - lo_r
    window = [lo_c, hi_c]
    calibrated = name in b.preadd_ranges
    if calibrated:
        clo, chi = b.preadd_ranges[name]
        clo, chi = PREADD_MARGIN * min(float(clo), 0.0), PREADD_MARGIN * max(float(chi), 0.0)
        lo_c, hi_c = max(lo_c, clo), min(hi_c, chi)
        if hi_c - lo_c < quant.EPS_RANGE:
            lo_c, hi_c = window
    info = np.iinfo(_np_dtype(b.act_dtype))
    scale = np.float32((hi_c - lo_c) / (info.max - info.min))
    zp = _range_zero_point(lo_c, scale, b.act_dtype)
    b.residual_info[name] = {'scale': float(scale), 'zero_point': zp,
                                'range': [lo_c, hi_c], 'window': window,
                                'calibrated': calibrated, 'tensor': None,
                                'out_scale': float(out_qp.scale)}
    return scale, zp


def _float_result_intermediate(b, name, y, relu):
    """A convolution's float result ``y`` through an 8-bit intermediate (``Q -> DQ``), so
    that onnxruntime runs the convolution as a QLinearConv: its calibrated range (a ReLU
    makes it start at 0) widened by :data:`PREADD_MARGIN`. Returns the dequantized name.

    gluonq's float output is not rounded; this is: by at most half a step of the
    intermediate where it does not saturate (``float_result_info`` of ``to_onnx(...,
    return_info=True)`` has the scale)."""
    lo, hi = b.float_result_ranges[name]
    lo = 0.0 if relu else PREADD_MARGIN * min(float(lo), 0.0)
    hi = PREADD_MARGIN * max(float(hi), 0.0)
    if hi - lo < quant.EPS_RANGE:
        hi = lo + quant.EPS_RANGE
    info = np.iinfo(_np_dtype(b.act_dtype))
    scale = np.float32((hi - lo) / (info.max - info.min))
    zp = _range_zero_point(lo, scale, b.act_dtype)
    c_qt = _QTRaw(b.fresh(name + '/result'), scale, zp, b.act_dtype)
    s, z = b.scale_zp(c_qt)
    b.node('QuantizeLinear', [y, s, z], [c_qt.name])
    b.float_result_info[name] = {'scale': float(scale), 'zero_point': zp, 'range': [lo, hi],
                                 'tensor': c_qt.name}
    return b.dequantize(c_qt)


@handles('QuantizedAdd')
def _add(b, step, block):
    _check_static(step, block)
    qa, qb = (b.as_q(k, step) for k in step['inputs'])
    y = b.fresh(step['name'] + '/add')
    b.node('Add', [b.dequantize(qa), b.dequantize(qb)], [y])
    out_qp = _out_qp(block)
    out_key = step['outputs'][0]
    if out_qp is None:
        if block._relu:
            y2 = b.fresh(step['name'] + '/relu')
            b.node('Relu', [y], [y2])
            y = y2
        b.env[out_key] = b.rename(y, out_key)
        return
    b.env[out_key] = b.quantize_relu(y, out_key, out_qp, block._relu)


@handles('QuantizedConcat')
def _concat(b, step, block):
    _check_static(step, block)
    ins = [b.as_q(k, step) for k in step['inputs']]
    out_qp = _out_qp(block)
    out_key = step['outputs'][0]
    dim = block._dim
    if all(q.qp == out_qp for q in ins):
        qt = _QT(b.fresh(out_key), out_qp, b.act_dtype)
        b.node('Concat', [q.name for q in ins], [qt.name], axis=dim)
        b.env[out_key] = qt
        return
    y = b.fresh(step['name'] + '/concat')
    b.node('Concat', [b.dequantize(q) for q in ins], [y], axis=dim)
    b.env[out_key] = b.quantize(y, out_key, out_qp)


@handles('QuantizedPooling')
def _pooling(b, step, block):
    x = b.as_q(step['inputs'][0], step)
    k = block._kwargs
    out_key = step['outputs'][0]
    in_shape = b.shapes[step['inputs'][0]]
    if k['global_pool']:
        kernel, stride, pad = list(in_shape[2:]), [1, 1], [0, 0]
    else:
        kernel, stride, pad = list(k['kernel']), list(k['stride']), list(k['pad'])
    ceil = int(k['pooling_convention'] == 'full')
    if k['pool_type'] == 'max':
        qt = _QT(b.fresh(out_key), x.qp, b.act_dtype)
        b.node('MaxPool', [x.name], [qt.name], kernel_shape=kernel, strides=stride,
                  pads=pad * 2, ceil_mode=ceil)
        b.env[out_key] = qt
        return
    if k['global_pool']:
        b.env[out_key] = _global_avg_pool(b, step['name'], x, out_key)
        return
    if not k.get('count_include_pad', True):
        raise ONNXExportError('step %r: int8 average pooling with count_include_pad='
                              'False has no exact ONNX form' % step['name'])
    b.env[out_key] = _avg_pool_as_conv(b, step['name'], x, in_shape, kernel,
                                               stride, pad, ceil, out_key)


def _global_avg_pool(b, name, x, out_key):
    """Global average pooling as ``DQ -> GlobalAveragePool -> Q`` at the input's scale:
    onnxruntime fuses it into QLinearGlobalAveragePool and OpenVINO into a u8 Reduce.

    onnxruntime computes ``round_half_even(float32(sum) * float32(s / float32(s * n)))``
    for ``n`` pixels: for ``n`` a power of two the multiplier is exactly ``1 / n``, and
    for odd ``n`` ``sum / n`` lies at least ``1 / (2 n)`` from a tie, far beyond float32
    error, so both give gluonq's integers. For other ``n`` (e.g. 196 = 14 x 14) a sum
    that is exactly a tie can round one step the other way.
    """
    y = b.fresh(name + '/avgpool')
    b.node('GlobalAveragePool', [b.dequantize(x)], [y])
    return b.quantize(y, out_key, x.qp)


def _avg_pool_as_conv(b, name, x, in_shape, kernel, stride, pad, ceil, out_key):
    """Average pooling as a depthwise QLinearConv with all-ones int8 weights.

    gluonq (MXNet's int8 pooling) rounds ``sum / count`` half to even. onnxruntime's
    QLinearConv does the same with the multiplier ``s_x * s_w / s_y``; with
    ``s_y == s_x`` the weight scale is chosen so that the multiplier is exactly
    ``float32(1 / count)``. For a power-of-two count that is exact; for an odd count
    ``sum / count`` is never within float32 error of a tie; for other counts (6, 12,
    ...) a sum exactly at a tie can round one step the other way. (onnxruntime's own
    QLinearAveragePool rounds ties differently.)
    """
    c = in_shape[1]
    count = int(np.prod(kernel))
    w = b.const(name + '/pool_weight', np.ones((c, 1) + tuple(kernel), np.int8))
    m = np.array([1.0 / count], np.float32)
    s_w, _ = matching_weight_scales(m, x.scale, x.scale)
    ws = b.const(name + '/pool_weight_scale', np.array(s_w[0], np.float32))
    wz = b.const(name + '/pool_weight_zero_point', np.array(0, np.int8))
    w_dq = b.fresh(name + '/pool_weight/dq')
    b.node('DequantizeLinear', [w, ws, wz], [w_dq])
    if ceil:
        # MXNet's 'full' convention: extra windows at the end, padded with zeros and
        # divided by the full kernel size (count_include_pad)
        extra = []
        for i, (size, kk, st, p) in enumerate(zip(in_shape[2:], kernel, stride, pad)):
            n_floor = (size + 2 * p - kk) // st + 1
            n_ceil = -(-(size + 2 * p - kk) // st) + 1
            extra.append((n_ceil - n_floor) * st)
    else:
        extra = [0] * len(kernel)
    y = b.fresh(name + '/avgpool')
    b.node('Conv', [b.dequantize(x), w_dq], [y], kernel_shape=list(kernel),
              strides=list(stride), pads=list(pad) + [p + e for p, e in zip(pad, extra)],
              group=c)
    return b.quantize(y, out_key, x.qp)


@handles('QuantizedMatMul')
def _matmul(b, step, block):
    """DequantizeLinear of each operand -> MatMul (-> Mul by alpha) -> QuantizeLinear or
    float: the QDQ unit onnxruntime fuses into an int8 matmul. A transposed operand is
    transposed as integers, before its DequantizeLinear."""
    _check_static(step, block)
    name = step['name']
    ins = []
    for key, transposed in zip(step['inputs'], block._transpose):
        x = b.as_q(key, step)
        if transposed:
            nd = len(b.shapes[key])
            xt = _QT(b.fresh(name + '/transpose'), x.qp, b.act_dtype)
            b.node('Transpose', [x.name], [xt.name],
                      perm=list(range(nd - 2)) + [nd - 1, nd - 2])
            x = xt
        ins.append(b.dequantize(x))
    y = b.fresh(name + '/matmul')
    b.node('MatMul', ins, [y])
    if block.alpha != 1.0:
        alpha = b.const(name + '/alpha', np.array(block.alpha, np.float32))
        y2 = b.fresh(name + '/alpha_mul')
        b.node('Mul', [y, alpha], [y2])
        y = y2
    out_qp, out_key = _out_qp(block), step['outputs'][0]
    b.env[out_key] = b.rename(y, out_key) if out_qp is None else \
        b.quantize(y, out_key, out_qp)


@handles('QuantizedFlatten')
def _flatten(b, step, block):
    x = b.as_q(step['inputs'][0], step)
    out_key = step['outputs'][0]
    qt = _QT(b.fresh(out_key), x.qp, b.act_dtype)
    b.node('Flatten', [x.name], [qt.name], axis=1)
    b.env[out_key] = qt


@handles('QuantizedActivation')
def _relu(b, step, block):
    x = b.as_q(step['inputs'][0], step)
    out_key = step['outputs'][0]
    b.env[out_key] = x if x.qp.dtype == 'uint8' else b.relu_q(x, out_key)


@handles('QuantizedShapeOp')
def _shape_step(b, step, block):
    """The shape operator on the integer tensor (no Q/DQ): the same integers, moved."""
    x = b.as_q(step['inputs'][0], step)
    for key, out in zip(step['outputs'], _shape_op(b, step, block, x.name)):
        qt = _QT(out, x.qp, b.act_dtype)
        b.env[key] = qt


# ---------------------------------------------------------------------------------------
# shape operators (on integer or float tensors) and float ops mx.onnx cannot convert
# ---------------------------------------------------------------------------------------
_INT64_MAX, _INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def _lit(v, default=None):
    """An MXNet attribute (a symbol-JSON string such as ``'(None, 2)'`` or a Python value)
    as a Python value."""
    import ast
    if v is None:
        return default
    if isinstance(v, str):
        v = v.strip()
        if v in ('', 'None'):
            return default
        return ast.literal_eval(v)
    return v


def _ints(b, base, values):
    return b.const(base, np.asarray(values, np.int64))


def _shape_reshape(b, step, block, x):
    """Reshape to the known output shape; the one axis that follows the batch size (MXNet
    codes 0, -1, -2, -3, -4 resolved by the eager shape runs) is written as -1."""
    key = step['outputs'][0]
    shape = list(b.shapes[key])
    dyn = b.batch_dims(key)
    if len(dyn) > 1:
        raise ONNXExportError('step %r: reshape to %s with %d axes that follow the batch '
                              'size; export with dynamic_batch=False' % (step['name'],
                                                                          tuple(shape), len(dyn)))
    for i in dyn:
        shape[i] = -1
    y = b.fresh(key)
    b.node('Reshape', [x, _ints(b, step['name'] + '/shape', shape)], [y])
    return [y]


def _shape_transpose(b, step, block, x):
    nd = len(b.shapes[step['inputs'][0]])
    if block._op == 'transpose':
        perm = list(_lit(block._attrs.get('axes'), ()) or range(nd)[::-1])
    else:                                               # SwapAxis / swapaxes
        perm = list(range(nd))
        d1, d2 = (int(_lit(block._attrs.get(k), 0)) for k in ('dim1', 'dim2'))
        perm[d1], perm[d2] = perm[d2], perm[d1]
    y = b.fresh(step['outputs'][0])
    b.node('Transpose', [x], [y], perm=[p % nd for p in perm])
    return [y]


def _shape_expand_dims(b, step, block, x):
    y = b.fresh(step['outputs'][0])
    b.node('Unsqueeze', [x, _ints(b, step['name'] + '/axes', [int(_lit(block._attrs['axis']))])],
           [y])
    return [y]


def _shape_squeeze(b, step, block, x):
    axis = _lit(block._attrs.get('axis'))
    y = b.fresh(step['outputs'][0])
    if axis is None:                       # every axis of size 1, as MXNet at run time
        b.node('Squeeze', [x], [y])
    else:
        axes = [axis] if isinstance(axis, int) else list(axis)
        b.node('Squeeze', [x, _ints(b, step['name'] + '/axes', axes)], [y])
    return [y]


def _shape_slice(b, step, block, x):
    """``slice`` / ``crop`` (begin, end, step tuples with None) and ``slice_axis``."""
    a = block._attrs
    if block._op == 'slice_axis':
        begin, end, steps = [_lit(a.get('begin'))], [_lit(a.get('end'))], [1]
        axes = [int(_lit(a['axis']))]
    else:
        begin, end = list(_lit(a['begin'])), list(_lit(a['end']))
        steps = list(_lit(a.get('step'), ()) or ()) + [None] * len(begin)
        steps = [1 if st is None else int(st) for st in steps[:len(begin)]]
        axes = list(range(len(begin)))
    starts = [(0 if st > 0 else _INT64_MAX) if v is None else int(v)
              for v, st in zip(begin, steps)]
    ends = [(_INT64_MAX if st > 0 else _INT64_MIN) if v is None else int(v)
            for v, st in zip(end, steps)]
    name = step['name']
    y = b.fresh(step['outputs'][0])
    b.node('Slice', [x, _ints(b, name + '/starts', starts), _ints(b, name + '/ends', ends),
                     _ints(b, name + '/axes', axes), _ints(b, name + '/steps', steps)], [y])
    return [y]


def _shape_split(b, step, block, x):
    """``SliceChannel`` / ``split``: equal parts along ``axis``, squeezed with
    ``squeeze_axis``."""
    a = block._attrs
    n = int(_lit(a['num_outputs']))
    axis = int(_lit(a.get('axis'), 1))
    squeeze = bool(_lit(a.get('squeeze_axis'), False))
    parts = [b.fresh(k + ('/part' if squeeze else '')) for k in step['outputs']]
    b.node('Split', [x], parts, axis=axis, **({'num_outputs': n} if b.opset >= 18 else {}))
    if not squeeze:
        return parts
    outs = []
    for k, part in zip(step['outputs'], parts):
        y = b.fresh(k)
        b.node('Squeeze', [part, _ints(b, step['name'] + '/axes', [axis])], [y])
        outs.append(y)
    return outs


#: MXNet shape operator -> ONNX nodes on a tensor of any type (the names ``SHAPE_OPS``
#: of gluonq.nn.shape_ops)
_SHAPE_HANDLERS = {'Reshape': _shape_reshape, 'reshape': _shape_reshape,
                   'transpose': _shape_transpose, 'SwapAxis': _shape_transpose,
                   'swapaxes': _shape_transpose, 'expand_dims': _shape_expand_dims,
                   'squeeze': _shape_squeeze, 'slice': _shape_slice, 'crop': _shape_slice,
                   'slice_axis': _shape_slice, 'SliceChannel': _shape_split,
                   'split': _shape_split}


def _shape_op(b, step, block, x):
    """ONNX output names of the shape operator ``block._op`` applied to tensor ``x``."""
    handler = _SHAPE_HANDLERS.get(block._op)
    if handler is None:
        raise ONNXExportError('step %r: no ONNX converter for shape operator %s'
                              % (step['name'], block._op))
    return handler(b, step, block, x)


def _reduce_mean(b, x, out, axes, keepdims):
    """ReduceMean over ``axes`` (None: all): an attribute before opset 18, an input since."""
    if axes is None:
        b.node('ReduceMean', [x], [out], keepdims=int(keepdims))
    elif b.opset >= 18:
        b.node('ReduceMean', [x, _ints(b, out + '/axes', axes)], [out], keepdims=int(keepdims))
    else:
        b.node('ReduceMean', [x], [out], axes=list(axes), keepdims=int(keepdims))


def _param_inits(b, step, block):
    """``{input position: initializer name}`` of a FloatOp's parameters."""
    return {pos: b.const(step['name'] + '/' + pname,
                         to_numpy(block._reg_params[pname], np.float32))
            for pos, pname in block._param_pos}


def _float_layernorm(b, step, block, ins):
    """LayerNorm: ``(x - mean) / sqrt(var + eps) * gamma + beta`` over ``axis``, the
    pattern onnxruntime fuses into its LayerNormalization kernel."""
    a = block._attrs
    if bool(_lit(a.get('output_mean_var'), False)):
        raise ONNXExportError('step %r: LayerNorm with output_mean_var=True' % step['name'])
    name, (x,) = step['name'], ins
    nd = len(b.shapes[step['inputs'][0]])
    axis = int(_lit(a.get('axis'), -1)) % nd
    p = _param_inits(b, step, block)
    gamma, beta = p[1], p[2]
    if axis != nd - 1:                         # per-channel parameters broadcast over axis
        shp = _ints(b, name + '/param_shape', [-1] + [1] * (nd - 1 - axis))
        g2, b2 = b.fresh(name + '/gamma_b'), b.fresh(name + '/beta_b')
        b.node('Reshape', [gamma, shp], [g2])
        b.node('Reshape', [beta, shp], [b2])
        gamma, beta = g2, b2
    mean, d, sq, var, ve, std, xn, xg = (b.fresh(name + '/' + t) for t in (
        'mean', 'centered', 'sq', 'var', 'var_eps', 'std', 'normed', 'scaled'))
    _reduce_mean(b, x, mean, [axis], True)
    b.node('Sub', [x, mean], [d])
    b.node('Pow', [d, b.const(name + '/two', np.array(2.0, np.float32))], [sq])
    _reduce_mean(b, sq, var, [axis], True)
    eps = float(_lit(a.get('eps'), 1e-5))
    b.node('Add', [var, b.const(name + '/eps', np.array(eps, np.float32))], [ve])
    b.node('Sqrt', [ve], [std])
    b.node('Div', [d, std], [xn])
    b.node('Mul', [xn, gamma], [xg])
    y = b.fresh(step['outputs'][0])
    b.node('Add', [xg, beta], [y])
    return [y]


def _float_mean(b, step, block, ins):
    a = block._attrs
    nd = len(b.shapes[step['inputs'][0]])
    axis = _lit(a.get('axis'))
    axes = None if axis in (None, ()) else sorted(
        v % nd for v in ([axis] if isinstance(axis, int) else axis))
    if bool(_lit(a.get('exclude'), False)):
        axes = [i for i in range(nd) if i not in (axes or [])]
    y = b.fresh(step['outputs'][0])
    _reduce_mean(b, ins[0], y, axes, bool(_lit(a.get('keepdims'), False)))
    return [y]


def _float_erf(b, step, block, ins):
    y = b.fresh(step['outputs'][0])
    b.node('Erf', ins, [y])
    return [y]


def _float_shape(b, step, block, ins):
    return _shape_op(b, step, block, ins[0])


def _float_hard_sigmoid(b, step, block, ins):
    """For OpenVINO, ``hard_sigmoid(x; 1/6, 1/2)`` as ``Clip(x + 3, 0, 6) / 6``: the form its
    HSigmoid fusion recognizes, after which ``x * HSigmoid(x)`` becomes an HSwish fused into
    the int8 convolution before it (an ONNX HardSigmoid stays a separate float op there:
    rapidocr's MobileNetV3 classifier ran 1.6-2x slower with it). Otherwise None (MXNet's
    converter writes HardSigmoid, one kernel in onnxruntime)."""
    a = block._attrs
    alpha, beta = float(_lit(a.get('alpha'), 0.2)), float(_lit(a.get('beta'), 0.5))
    if b.target != 'openvino' or not (np.isclose(alpha, 1 / 6, rtol=1e-6) and
                                      np.isclose(beta, 0.5, rtol=1e-6)):
        return None
    name = step['name']
    t, c, y = b.fresh(name + '/plus3'), b.fresh(name + '/relu6'), b.fresh(step['outputs'][0])
    f = lambda tag, v: b.const(name + '/' + tag, np.array(v, np.float32))   # noqa: E731
    b.node('Add', [ins[0], f('three', 3.0)], [t])
    b.node('Clip', [t, f('zero', 0.0), f('six', 6.0)], [c])
    b.node('Div', [c, f('six_div', 6.0)], [y])
    return [y]


def _float_pooling(b, step, block, ins):
    """Global average pooling as ``ReduceMean`` over the spatial axes: onnxruntime moves
    its layout transposes through a ReduceMean, not through a float GlobalAveragePool
    (between int8 convolutions in NHWC, e.g. a squeeze-excite gate, each such pool cost two
    Transposes). Other pooling: None (MXNet's converter)."""
    a = block._attrs
    if not (bool(_lit(a.get('global_pool'), False)) and str(a.get('pool_type')) == 'avg'):
        return None
    nd = len(b.shapes[step['inputs'][0]])
    y = b.fresh(step['outputs'][0])
    _reduce_mean(b, ins[0], y, list(range(2, nd)), True)
    return [y]


#: float ops written by gluonq itself: mx.onnx writes ReduceMean in a form onnx 1.18's
#: checker refuses (LayerNorm, mean), has no erf, and no reshape codes -3 / -4
_FLOAT_HANDLERS = dict({op: _float_shape for op in _SHAPE_HANDLERS},
                       LayerNorm=_float_layernorm, mean=_float_mean, erf=_float_erf,
                       Pooling=_float_pooling, hard_sigmoid=_float_hard_sigmoid)


# ---------------------------------------------------------------------------------------
# float ops: MXNet's own ONNX converters, one op at a time
# ---------------------------------------------------------------------------------------
@handles('FloatOp')
def _float_op(b, step, block):
    handler = _FLOAT_HANDLERS.get(block._op)
    outs = None if handler is None else \
        handler(b, step, block, [b.as_float(k) for k in step['inputs']])
    if outs is not None:
        for key, out in zip(step['outputs'], outs):
            b.env[key] = out
        return
    import mxnet as mx
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    name = step['name']
    ins = [b.as_float(k) for k in step['inputs']]
    shapes = [b.shapes[k] for k in step['inputs']]
    sym_in = [mx.sym.var('gluonq_in%d' % i) for i in range(len(ins))]
    args = list(sym_in)
    params = {}
    for pos, pname in block._param_pos:
        var = 'gluonq_param_' + pname
        args.insert(pos, mx.sym.var(var))
        params[var] = block._reg_params[pname].data()
    try:
        sym = _find_op(mx.sym, block._op)(*args, **block._attrs)
    except Exception as err:
        raise ONNXExportError('step %r: cannot rebuild MXNet operator %s: %s'
                              % (name, block._op, err)) from None
    dyn = [(None,) + tuple(s[1:]) for s in shapes] if b.dynamic_batch else None
    import logging
    logger = logging.getLogger()
    level = logger.level
    try:
        logger.setLevel(max(level, logging.WARNING))
        graph = MXNetGraph().create_onnx_graph_proto(
            sym, params, in_shapes=[tuple(s) for s in shapes],
            in_types=[b.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))] * len(ins),
            opset_version=b.opset, dynamic=b.dynamic_batch, dynamic_input_shapes=dyn)
    except Exception as err:
        raise ONNXExportError(
            'step %r: gluonq keeps MXNet operator %r in float here, and MXNet\'s ONNX '
            'converter (mx.onnx, opset %d) cannot convert it: %s: %s. Please report it to '
            'gluonq, or replace the op in the float network with ops ONNX has before '
            'quantizing.' % (name, block._op, b.opset, type(err).__name__, err)) from None
    finally:
        logger.setLevel(level)
    rename = {'gluonq_in%d' % i: n for i, n in enumerate(ins)}
    outs = step['outputs']
    if len(graph.output) != len(outs):
        raise ONNXExportError('step %r: %s gave %d ONNX outputs, expected %d'
                              % (name, block._op, len(graph.output), len(outs)))
    for o, key in zip(graph.output, outs):
        rename[o.name] = b.fresh(key)
    for t in graph.initializer:
        new = b.fresh(name + '/' + t.name)
        rename[t.name] = new
        t2 = b.onnx.TensorProto()
        t2.CopyFrom(t)
        t2.name = new
        b.inits.append(t2)

    def mapped(n):
        if n == '':
            return n
        if n not in rename:
            rename[n] = b.fresh(name + '/' + n)
        return rename[n]

    for node in graph.node:
        n2 = b.onnx.NodeProto()
        n2.CopyFrom(node)
        del n2.input[:]
        n2.input.extend(mapped(i) for i in node.input)
        del n2.output[:]
        n2.output.extend(mapped(o) for o in node.output)
        n2.name = b.fresh(name + '/' + (node.name or node.op_type))
        b.nodes.append(n2)
    for o, key in zip(graph.output, outs):
        b.env[key] = rename[o.name]


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def _resolve_shape(qnet, input_shape):
    if input_shape is None:
        input_shape = qnet.spec.get('input_shape')
        if not input_shape:
            raise ValueError('export_onnx: pass input_shape (the network was saved without '
                             'one)')
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) < 2 or any(d <= 0 for d in input_shape):
        raise ValueError('export_onnx: input_shape must be (batch, channels, ...) with '
                         'positive sizes, got %s' % (input_shape,))
    return input_shape


def _residual_layers(qnet):
    return [s for s in qnet.spec['steps'] if getattr(qnet._children[s['name']],
                                                     '_residual', False)]


def _float_result_convs(qnet):
    """Convolutions with a float output and no residual: onnxruntime has no int8
    convolution with a float output (QLinearConv), so ``round_float_results`` rounds their
    result to an 8-bit intermediate (:func:`_float_result_intermediate`)."""
    return [s for s in qnet.spec['steps'] if s['block'].startswith('QuantizedConv') and
            _out_qp(qnet._children[s['name']]) is None and
            not qnet._children[s['name']]._residual]


def preadd_ranges(qnet, calib_data, calib_mode=None, num_calib_examples=None,
                  batch_size=32):
    """Calibrated ranges of the conv/dense results before each fused residual add.

    gluonq adds the residual before its single rounding; onnxruntime needs the conv result
    as an 8-bit tensor first. This runs gluonq's own int8 network on ``calib_data``,
    computes each residual layer's result ``c = s_x * s_w * (sum q_x q_w + q_b)`` and
    observes it with the network's calibration method (``qnet.spec['calibration']``) or
    ``calib_mode``. Returns ``{step name: (lo, hi)}``.
    """
    return _result_ranges(qnet, _residual_layers(qnet), calib_data, calib_mode,
                          num_calib_examples, batch_size)


def _result_ranges(qnet, layers, calib_data, calib_mode, num_calib_examples, batch_size):
    """``{step name: (lo, hi)}``: the calibrated range of the unrounded result
    ``c = s_x * s_w * (sum q_x q_w + q_b)`` of each layer step in ``layers``, on gluonq's
    own int8 network run on ``calib_data``."""
    import mxnet as mx
    from ..calibration.collect import as_batches
    from ..calibration.observers import make_observer
    if not layers:
        return {}
    mode = calib_mode or qnet.spec.get('calibration', {}).get('mode', 'naive')
    opts = dict(qnet.spec.get('calibration', {}).get('options', {})) if calib_mode is None \
        else {}
    observers = {s['name']: make_observer(mode, dtype='int8', name=s['name'] + ' (result)',
                                          **opts) for s in layers}
    for batch in as_batches(calib_data, None, num_calib_examples, batch_size):
        env = qnet.forward_all(mx.nd.array(batch))
        for s in layers:
            block = qnet._children[s['name']]
            qx = env[s['inputs'][0]]
            if not isinstance(qx, (list, tuple)):
                continue
            xf = qx[0].astype('float32')
            w = block.weight.data().astype('float32')
            if hasattr(block, '_kwargs'):
                acc = mx.nd.Convolution(xf, w, no_bias=True, **block._kwargs)
            else:
                acc = mx.nd.FullyConnected(xf, w, no_bias=True, num_hidden=w.shape[0],
                                           flatten=block._flatten)
            acc = acc.asnumpy().astype(np.float64)
            bshape = block._channel_bcast_shape()       # units on axis 1, or last on sequences
            if block.bias is not None:
                acc += to_numpy(block.bias, np.float64).reshape(bshape)
            s_w = to_numpy(block.weight_scale, np.float64)   # per unit or one
            c = acc * float(block._in_q.scale) * s_w.reshape(bshape)
            observers[s['name']].observe(c.astype(np.float32))
    out = {}
    for name, obs in observers.items():
        if obs.num_batches:
            lo, hi = obs.calculate_range()
            lo = max(float(lo), float(obs.min_val))       # a symmetric method's threshold
            hi = min(float(hi), float(obs.max_val))       # never widens the observed range
            out[name] = (min(lo, 0.0), max(hi, 0.0))
    return out


def to_onnx(qnet, input_shape=None, opset=13, act_dtype='uint8', dynamic_batch=True,
            calib_data=None, calib_mode=None, check=True, return_info=False,
            weight_dtype='auto', target='onnxruntime', round_float_results=False):
    """The ONNX ModelProto of ``qnet`` (see :func:`export_onnx`)."""
    if not isinstance(qnet, QuantizedNet):
        raise TypeError('export_onnx takes a QuantizedNet (from gluonq.quantize_net or '
                        'gluonq.load_quantized), got %s' % type(qnet).__name__)
    if act_dtype not in ('uint8', 'int8'):
        raise ValueError("act_dtype must be 'uint8' (onnxruntime's fast U8S8 path) or "
                         "'int8', got %r" % (act_dtype,))
    if target not in TARGETS:
        raise ValueError('target must be one of %s (the runtime the graph is laid out for), '
                         'got %r' % (', '.join(map(repr, TARGETS)), target))
    if round_float_results and target != 'onnxruntime':
        raise ValueError("round_float_results is for target='onnxruntime' (OpenVINO runs "
                         "int8 convolutions with a float output as they are), got target=%r"
                         % (target,))
    weight_dtype = resolve_weight_dtype(weight_dtype, target)
    if int(opset) < 13:
        raise ValueError('export_onnx writes opset 13 or later (per-channel '
                         'DequantizeLinear), got %r' % (opset,))
    floats = _float_result_convs(qnet) if round_float_results else []
    if calib_data is not None:
        residual = _residual_layers(qnet)
        ranges = _result_ranges(qnet, residual + floats, calib_data, calib_mode, None, 32)
        preadd = {s['name']: ranges[s['name']] for s in residual if s['name'] in ranges}
        results = {s['name']: ranges[s['name']] for s in floats if s['name'] in ranges}
    else:       # ranges the converter observed on the float network, if it recorded them
        preadd = {k: tuple(v) for k, v in qnet.spec.get('preadd_ranges', {}).items()}
        results = {k: tuple(v) for k, v in qnet.spec.get('float_result_ranges', {}).items()
                   if round_float_results}
    b = _Context(qnet, _resolve_shape(qnet, input_shape), int(opset), act_dtype,
                 dynamic_batch, preadd, weight_dtype, target, results)
    model = b.build()
    if check:
        b.onnx.checker.check_model(model)
    if return_info:
        return model, {'residual': b.residual_info, 'weight_scales': b.weight_scale_info,
                       'float_results': b.float_result_info}
    return model


def export_onnx(qnet, path, input_shape=None, opset=13, overwrite=False, act_dtype='uint8',
                dynamic_batch=True, calib_data=None, calib_mode=None, weight_dtype='auto',
                target='onnxruntime', round_float_results=False):
    """Write ``qnet`` to ``path`` as an ONNX model in QDQ form (see the module docstring).

    Parameters
    ----------
    qnet : QuantizedNet
        A calibrated network (``gluonq.quantize_net`` or ``gluonq.load_quantized``).
    path : str
        The ``.onnx`` file; written atomically (a failed export leaves no file).
    input_shape : tuple, optional
        Shape of the input (batch first); default: the shape the network was traced with.
    opset : int
        ONNX opset (13 or later).
    overwrite : bool
        Replace an existing file.
    act_dtype : {'uint8', 'int8'}
        ONNX type of the activations. 'uint8' (default) is onnxruntime's fast path on x86;
        either holds gluonq's integers exactly (zero point 128 / -128 where gluonq's type
        differs).
    dynamic_batch : bool
        Leave the batch dimension symbolic ('N').
    weight_dtype : {'auto', 'int8', 'uint8'}
        ONNX type of the weights. 'int8' (U8S8) is onnxruntime's fast path. On x86 CPUs
        without VNNI its kernels add pairs of u8 * s8 products in int16 with saturation
        (``vpmaddubsw``), which was seen to drop an MNIST MobileNetV2 to 46% top-1; 'uint8'
        (U8U8, gluonq's integers + 128 with zero point 128) is exact on every CPU and ran
        at about 0.7x U8S8's speed on an AVX2 CPU. 'auto' (default) is 'int8' where
        onnxruntime's U8S8 is exact on this CPU, else 'uint8' (:func:`resolve_weight_dtype`):
        name the type when the model is deployed on another kind of CPU. With
        ``target='openvino'`` 'auto' is 'int8'.
    calib_data : array, DataLoader or iterable of batches, optional
        Calibration inputs (the ones given to ``quantize_net``) for the 8-bit conv results
        that onnxruntime needs before residual adds (see :func:`preadd_ranges`). Without
        it, ranges recorded in ``qnet.spec['preadd_ranges']`` (``{step: [lo, hi]}``) are
        used if present, else the widest range that can never change a result, which
        rounds about 1.5-3x coarser there.
    calib_mode : str, optional
        Calibration method for those ranges; default: the one the network was calibrated
        with.
    target : {'onnxruntime', 'openvino'}
        The runtime the graph is laid out for. The integers are the same; 'openvino'
        subsamples the input of strided 1x1 convolutions first, which keeps them int8 in
        OpenVINO (and costs onnxruntime about 2% on ResNet-50 v1), writes
        ``hard_sigmoid(x; 1/6, 1/2)`` as ``Clip(x + 3, 0, 6) / 6`` (the form OpenVINO fuses
        into an HSwish) and takes int8 weights.
        :func:`gluonq.export_openvino` writes OpenVINO's own IR of that graph.
    round_float_results : bool
        onnxruntime has no int8 convolution with a float output (a conv before a float
        hardswish or gate), so by default such a convolution runs in float there, on
        gluonq's int8 input and weights: exact, but slower. True rounds its result to an
        8-bit intermediate at the calibrated range (``qnet.spec['float_result_ranges']``
        or, with ``calib_data``, observed as :func:`preadd_ranges` does), so that it runs
        as a QLinearConv, as onnxruntime's own quantizer does: rapidocr's three models ran
        1.1-1.9x faster in onnxruntime (``benchmarks/bench_real_speed.py``), at 1.5 and
        2.5 dB lower logit SQNR on its classifier (percentile, entropy calibration) and 5
        points less exact match on its recognizer (the settings of
        ``tests/test_real_cls.py`` and ``test_real_rec.py``). Only for
        ``target='onnxruntime'``.

    Returns
    -------
    str : the path written.
    """
    model = to_onnx(qnet, input_shape, opset, act_dtype, dynamic_batch, calib_data,
                    calib_mode, weight_dtype=weight_dtype, target=target,
                    round_float_results=round_float_results)
    with atomic_outputs([path], overwrite) as (tmp,):
        with open(tmp, 'wb') as f:
            _write_model(model, f)
    return path


def _write_model(model, f):
    f.write(model.SerializeToString())


def tensor_names(model):
    """``{gluonq tensor key: ONNX tensor name}`` of a model written by gluonq.

    A quantized gluonq tensor maps to the ONNX integer tensor holding its integers (uint8
    ``q + 128`` for gluonq int8 with ``act_dtype='uint8'``, see :func:`onnx_zero_point`); a
    float tensor maps to its float ONNX tensor.
    """
    props = {p.key: p.value for p in model.metadata_props}
    if 'gluonq.tensors' not in props:
        raise ValueError('this ONNX model was not written by gluonq.export_onnx')
    return json.loads(props['gluonq.tensors'])


def residual_intermediates(model):
    """Per residual layer: scale, zero point and range of the 8-bit conv result written
    before the add (see the module docstring)."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get('gluonq.residual_intermediates', '{}'))
