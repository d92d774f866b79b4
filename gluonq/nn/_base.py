"""What every quantized block shares: the quantized tensor type, integer parameters,
input quantization (static or dynamic) and the layer epilogue."""
from __future__ import annotations

from collections import namedtuple

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, Parameter

from .. import quant
from ..arrays import to_numpy
from ..init import IntZero, is_int_safe

__all__ = ['QTensor', 'as_qtensor', 'IntParameter', 'QuantizedBlock', 'QuantizedLayer']


class QTensor(namedtuple('QTensor', ['data', 'min', 'max'])):
    """An int8 or uint8 tensor with its real range, as MXNet's int8 operators pass it.

    ``data`` holds the integers; ``min``/``max`` are (1,)-shaped float32 tensors. int8 data
    is symmetric: ``min == -max`` and ``scale = max / 127``. uint8 data with ``min == 0`` has
    ``scale = max / 255``; uint8 data with ``min < 0`` is affine: ``scale = (max - min) / 255``
    and a zero point (see :class:`gluonq.quant.QParams`). A hybridized block returns it as a
    plain list ``[data, min, max]``, which every quantized block also accepts.
    """
    __slots__ = ()

    def dequantize(self):
        """Real values (float32 NDArray); eager mode only."""
        q = self.data.asnumpy()
        lo, hi = float(self.min.asnumpy()[0]), float(self.max.asnumpy()[0])
        qp = quant.QParams('uint8' if q.dtype == np.uint8 else 'int8', lo, hi,
                           'affine' if q.dtype == np.uint8 and lo < 0 else 'symmetric')
        return mx.nd.array(quant.dequantize_np(q, qp), ctx=self.data.context)


def as_qtensor(x):
    """``x`` as a :class:`QTensor` if it is a quantized tensor (a 3-sequence), else None."""
    if isinstance(x, QTensor):
        return x
    if isinstance(x, (list, tuple)) and len(x) == 3:
        return QTensor(*x)
    return None


class IntParameter(Parameter):
    """A Parameter that holds integers (int8 weights, int32 biases).

    It never reaches MXNet's float-only random sampler (only integer-safe initializers are
    accepted), it never takes gradients, ``cast`` leaves it alone, and loading float data
    into it is refused (that is a float checkpoint, which needs conversion, not a cast).
    """

    def __init__(self, name, shape, dtype, init=None, allow_deferred_init=True):
        init = IntZero() if init is None else init
        if not is_int_safe(init):
            raise ValueError('integer parameter %r cannot use initializer %r: it would call '
                             "MXNet's float-only random sampler; use gluonq.init.IntUniform, "
                             'IntZero or IntConstant' % (name, init))
        super().__init__(name, grad_req='null', shape=shape, dtype=dtype, init=init,
                         allow_deferred_init=allow_deferred_init, differentiable=False)

    def initialize(self, init=None, ctx=None, default_init=None, force_reinit=False):
        if init is not None and not is_int_safe(init):
            raise ValueError('parameter %r holds %s integers and cannot be initialized with %r '
                             "(MXNet's random samplers are float-only); use "
                             'gluonq.init.IntUniform, IntZero or IntConstant'
                             % (self.name, np.dtype(self.dtype).name, init))
        super().initialize(init, ctx, default_init=self.init if default_init is None
                           else default_init, force_reinit=force_reinit)

    def cast(self, dtype):
        """Integer parameters keep their dtype (``net.cast`` is for float parameters)."""

    def _load_init(self, data, ctx, cast_dtype=False, dtype_source='current'):
        if np.dtype(data.dtype) != np.dtype(self.dtype):
            hint = (' This looks like a float checkpoint: quantize the float network with '
                    'gluonq.quantize_net or build the block with from_float().'
                    if np.issubdtype(np.dtype(data.dtype), np.floating) else '')
            raise ValueError('cannot load parameter %r: it holds %s values, the file has %s.%s'
                             % (self.name, np.dtype(self.dtype).name,
                                np.dtype(data.dtype).name, hint))
        super()._load_init(data, ctx, cast_dtype=False, dtype_source=dtype_source)


def _check_range(name, lo, hi, dtype, scheme='symmetric'):
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError('%s: range must be finite with min <= max, got [%g, %g]'
                         % (name, lo, hi))
    if scheme not in quant.SCHEMES:
        raise ValueError("%s: scheme must be 'symmetric' or 'affine', got %r" % (name, scheme))
    if scheme == 'affine' and dtype not in ('auto', 'uint8'):
        raise ValueError("%s: the affine scheme holds uint8 tensors, got dtype %r"
                         % (name, dtype))
    return quant.QParams(dtype, lo, hi, scheme)


class QuantizedBlock(HybridBlock):
    """Base of gluonq's blocks: integer parameters and quantized-tensor plumbing."""

    def _int_param(self, name, shape, dtype, init=None):
        """Create an :class:`IntParameter` inside this block's ParameterDict."""
        full = self.params.prefix + name
        param = IntParameter(full, shape=shape, dtype=dtype, init=init)
        self.params.update({full: param})
        return param

    def _range_params(self, which, qparams):
        """Two float32 (1,) parameters ``<which>_min``/``<which>_max`` holding a range."""
        lo = self.params.get(which + '_min', shape=(1,), init=mx.init.Constant(qparams.min),
                             grad_req='null', differentiable=False)
        hi = self.params.get(which + '_max', shape=(1,), init=mx.init.Constant(qparams.max),
                             grad_req='null', differentiable=False)
        return lo, hi

    def _type_error(self, what):
        return TypeError('%s: %s' % (self._where(), what))

    def _where(self):
        """``QuantizedConv2D 'name'``: the block, for error messages."""
        return '%s %r' % (type(self).__name__, self.name)

    def _check_qtensor(self, F, qt, dtype, what='input'):
        """Eager-mode check that a quantized input has the dtype this block was built for."""
        if F is mx.nd and dtype is not None and np.dtype(qt.data.dtype) != np.dtype(dtype):
            raise self._type_error('expected a %s %s tensor, got %s (build the block with '
                                   "in_dtype='%s')" % (dtype, what,
                                                       np.dtype(qt.data.dtype).name,
                                                       np.dtype(qt.data.dtype).name))

    def _require_qtensor(self, x):
        qt = as_qtensor(x)
        if qt is None:
            raise self._type_error('expected a QTensor (data, min, max); quantize float data '
                                   'with gluonq.nn.Quantize first')
        return qt

    # -- output: float, or requantized with a calibrated (static) or run-time range ------
    def _setup_output(self, out_dtype, out_range, relu, allow_float=True):
        """Resolve the output dtype and create ``output_min``/``output_max`` if static."""
        self._out_q = None
        if out_dtype == 'float32':
            if not allow_float:
                raise ValueError("%s: out_dtype must be 'auto', 'int8' or 'uint8', got "
                                 "'float32'" % self._where())
            if out_range is not None:
                raise ValueError("%s: out_range is only used with out_dtype 'int8', 'uint8' or "
                                 "'auto', got out_dtype 'float32'" % self._where())
            self._out_dtype = 'float32'
            return
        if out_range is not None:
            lo = 0.0 if relu else min(float(out_range[0]), 0.0)
            dt = quant.dtype_for_range(lo, out_range[1], out_dtype)
            self._out_q = _check_range(self._where() + ' out_range', lo,
                                       max(float(out_range[1]), 0.0), dt)
            with self.name_scope():
                self.output_min, self.output_max = self._range_params('output', self._out_q)
        else:
            dt = out_dtype if out_dtype != 'auto' else ('uint8' if relu else 'int8')
            if dt not in quant.QRANGE:
                raise ValueError("%s: out_dtype must be 'float32', 'auto', 'int8' or 'uint8', "
                                 "got %r" % (self._where(), out_dtype))
        self._out_dtype = dt

    @property
    def out_dtype(self):
        """'float32', 'int8' or 'uint8'."""
        return self._out_dtype

    def _output(self, F, terms, params, relu, float_act=None, fused_sum=False):
        """Combine integer terms into the block's output.

        ``terms`` are ``(q, invs)``: integers and the list of inverse scales (steps per real
        unit) whose product converts them to real values; per-channel factors come already
        shaped for broadcasting. The requantize multiplier of a term is
        ``inv_out / invs[0] / invs[1] ...`` in float32, oneDNN's order.
        """
        if self._out_dtype == 'float32' or self._out_q is None:
            y = None
            for q, invs in terms:
                inv = invs[0]
                for f in invs[1:]:
                    inv = F.broadcast_mul(inv, f)
                t = F.broadcast_div(F.cast(q, 'float32'), inv)
                y = t if y is None else F.broadcast_add(y, t)
            if self._out_dtype == 'float32':
                if float_act is not None:
                    y = F.Activation(y, act_type=float_act)
                return y
            if relu:
                y = F.relu(y)
            lo, hi = quant.dynamic_range_f(F, y, self._out_dtype)
            return QTensor(*quant.quantize_f(F, y, lo, hi, self._out_dtype))
        lo, hi = params['output_min'], params['output_max']
        inv_out = quant.inv_scale_f(F, lo, hi, self._out_dtype)
        qterms = []
        for q, invs in terms:
            m = inv_out
            for f in invs:
                m = F.broadcast_div(m, f)
            qterms.append((q, m))
        return QTensor(quant.requantize_f(F, qterms, self._out_dtype, relu=relu,
                                          fused_sum=fused_sum), lo, hi)

    def _out_repr(self):
        if self._out_dtype == 'float32':
            return 'float32'
        return '%s %s' % (self._out_dtype, 'dynamic' if self._out_q is None else
                          '[%g, %g]' % (self._out_q.min, self._out_q.max))


class QuantizedLayer(QuantizedBlock):
    """Shared base of layers with int8 weights (dense, convolutions).

    Parameters (besides the float twin's)
    ----------
    in_dtype : {'auto', 'uint8', 'int8'}
        Integer type of the input. 'auto' is uint8 when ``in_range`` has min >= 0, else int8.
    in_range : (float, float) or None
        Calibrated real range of the input. None: dynamic mode, the range of each float
        input is computed at run time (``min``/``max`` of the tensor).
    in_scheme : {'symmetric', 'affine'}
        'affine': a uint8 input with a zero point where ``in_range`` has min < 0 (its term
        ``z * sum(q_w)`` is folded into the int32 bias, padding uses ``z``).
    out_dtype : {None, 'float32', 'auto', 'uint8', 'int8'}
        'float32' returns real values computed from the int32 accumulator; otherwise the
        layer requantizes and returns a :class:`QTensor`. 'auto' is uint8 when the output
        range has min >= 0 or the activation is relu. None (default): 'auto' when
        ``out_range`` is given, else 'float32'.
    out_range : (float, float) or None
        Calibrated real range of the output (needed for int8/uint8 output; None means
        dynamic: the range of each output is computed at run time).
    per_channel : bool
        One weight scale per output channel (default) or one for the tensor.
    residual : bool
        The layer takes a second input that is added to its result before the activation
        (a residual connection computed in the same int8 step).
    """

    def __init__(self, units, use_bias, activation, in_dtype='auto', in_range=None,
                 out_dtype=None, out_range=None, per_channel=True, residual=False,
                 in_scheme='symmetric', **kwargs):
        super().__init__(**kwargs)
        self._units = units
        self._use_bias = use_bias
        self._per_channel = bool(per_channel)
        self._residual = bool(residual)
        if out_dtype is None:
            out_dtype = 'float32' if out_range is None else 'auto'
        if activation not in (None, 'relu') and out_dtype != 'float32':
            raise ValueError('%s: activation %r can only run on float output; with int8 '
                             "output only 'relu' is fused" % (self._where(), activation))
        self._act_type = activation
        self._in_q = None
        if in_range is not None:
            self._in_q = _check_range(self._where() + ' in_range', in_range[0], in_range[1],
                                      in_dtype, in_scheme)
            self._in_dtype = self._in_q.dtype
        else:
            if in_scheme != 'symmetric':
                raise ValueError("%s: in_scheme %r needs a calibrated in_range"
                                 % (self._where(), in_scheme))
            self._in_dtype = 'int8' if in_dtype == 'auto' else in_dtype
            if self._in_dtype not in quant.QRANGE:
                raise ValueError("%s: in_dtype must be 'auto', 'int8' or 'uint8', got %r"
                                 % (self._where(), in_dtype))
        if self.in_zero_point:
            self._use_bias = True       # the zero point's term lives in the int32 bias
        self._setup_output(out_dtype, out_range, activation == 'relu')
        if self._in_q is not None:
            with self.name_scope():
                self.input_min, self.input_max = self._range_params('input', self._in_q)

    # -- parameters -----------------------------------------------------------------------
    def _make_weight_params(self, weight_shape):
        """int8 ``weight``, float32 ``weight_scale`` and (if any) the ``bias``.

        The bias is int32 at scale ``s_in * s_w`` when the input range is calibrated (for
        an affine input minus ``z * sum(q_w)`` per output channel); in dynamic mode ``s_in``
        is only known at run time, so the bias stays float32 and is quantized with the
        run-time scale.
        """
        self.weight = self._int_param('weight', weight_shape, np.int8)
        nscale = self._units if self._per_channel else 1
        self.weight_scale = self.params.get('weight_scale', shape=(nscale,),
                                            init=mx.init.One(), grad_req='null',
                                            differentiable=False)
        if self._use_bias:
            if self.is_static:
                self.bias = self._int_param('bias', (self._units,), np.int32)
            else:
                self.bias = self.params.get('bias', shape=(self._units,), init=mx.init.Zero(),
                                            grad_req='null', differentiable=False)
        else:
            self.bias = None

    @property
    def is_static(self):
        """True when the input range is calibrated (no run-time min/max)."""
        return self._in_q is not None

    @property
    def in_dtype(self):
        return self._in_dtype

    def set_float_params(self, weight, bias=None):
        """Quantize float ``weight`` (and ``bias``) into this layer's integer parameters.

        Weights become int8 with a max-abs scale (per channel or per tensor); a static layer
        stores the bias as int32 at ``s_in * s_w``, less ``z * sum(q_w)`` for an affine
        input with zero point ``z``, and raises the weight scale of a channel whose bias
        would not fit int32 (:func:`gluonq.quant.quantize_weight_for_bias`). Arrays may be
        numpy or NDArray. Returns the indices of the channels whose scale was raised.
        """
        w = to_numpy(weight, np.float32)
        if self.weight.shape is not None and (len(w.shape) != len(self.weight.shape) or any(
                s not in (0, t) for s, t in zip(self.weight.shape, w.shape))):
            raise ValueError('%s %r: weight of shape %s given, expected %s'
                             % (type(self).__name__, self.name, w.shape, self.weight.shape))
        b = None
        if self._use_bias:
            b = np.zeros(self._units, np.float32) if bias is None else \
                to_numpy(bias, np.float32)
            if b.shape != (w.shape[0],):
                raise ValueError('%s %r: bias of shape %s given, expected (%d,)'
                                 % (type(self).__name__, self.name, b.shape, w.shape[0]))
        raised = np.zeros(0, np.int64)
        z = self._in_q.zero_point if self.is_static else 0
        if b is not None and self.is_static:
            q, scale, raised = quant.quantize_weight_for_bias(
                w, b, self._in_q.scale, self._in_dtype, z, per_channel=self._per_channel)
        else:
            q, scale = quant.quantize_weight(w, per_channel=self._per_channel)
        self.weight.shape = q.shape
        self._set(self.weight, q)
        self._set(self.weight_scale, scale)
        if b is not None:
            if self.is_static:
                b = quant.quantize_bias(b, self._in_q.scale, scale,
                                        quant.bias_headroom(q, self._in_dtype, z))
                if z:
                    b = quant.fold_zero_point(b, q, z)
            self._set(self.bias, b)
        self._finish_shapes()
        return raised

    def _finish_shapes(self):
        """Hook for layers whose deferred shapes follow from the weight."""

    @staticmethod
    def _set(param, value):
        value = np.asarray(value, dtype=param.dtype)
        if param._data is None and not param._deferred_init:
            param.shape = value.shape
            param.initialize()
        elif param._deferred_init:
            param.shape = value.shape
            param._finish_deferred_init()
        param.set_data(mx.nd.array(value, dtype=param.dtype))

    # -- forward pieces -------------------------------------------------------------------
    def _input(self, F, x, params):
        """The input as ``(qtensor, inv_scale)``: ``inv_scale`` = integer steps per real unit.

        A float input is quantized with the calibrated range (static) or its own run-time
        range (dynamic); a quantized input is used as it is.
        """
        qt = as_qtensor(x)
        if F is mx.nd:
            self._check_input_shape((qt.data if qt is not None else x).shape)
        if qt is not None:
            self._check_qtensor(F, qt, self._in_dtype)
            if self.is_static:
                self._check_same_range(F, qt, params)
                lo, hi = params['input_min'], params['input_max']
            else:
                lo, hi = qt.min, qt.max
            return qt, self._in_inv_scale(F, lo, hi)
        if F is mx.nd and x.dtype != np.float32:
            raise self._type_error('expected a float32 input or a QTensor, got %s data'
                                   % np.dtype(x.dtype).name)
        if self.is_static:
            lo, hi = params['input_min'], params['input_max']
        else:
            lo, hi = quant.dynamic_range_f(F, x, self._in_dtype)
        if self.in_zero_point:
            qt = QTensor(*quant.quantize_affine_f(F, x, lo, hi, self.in_zero_point))
        else:
            qt = QTensor(*quant.quantize_f(F, x, lo, hi, self._in_dtype))
        return qt, self._in_inv_scale(F, lo, hi)

    @property
    def in_zero_point(self):
        """Zero point of the input (0 unless the input is affine)."""
        return self._in_q.zero_point if self._in_q is not None else 0

    def _in_inv_scale(self, F, lo, hi):
        if self.in_zero_point:
            return quant.affine_inv_scale_f(F, lo, hi)
        return quant.inv_scale_f(F, lo, hi, self._in_dtype)

    def _check_same_range(self, F, qt, params):
        if F is not mx.nd:
            return
        got = (float(qt.min.asscalar()), float(qt.max.asscalar()))
        want = (float(params['input_min'].asscalar()), float(params['input_max'].asscalar()))
        if not np.allclose(got, want, rtol=1e-6, atol=0):
            raise ValueError('%s %r: the quantized input has range [%g, %g] but the layer was '
                             'calibrated for [%g, %g] (its int32 bias is at that scale); '
                             'requantize the input or recalibrate'
                             % (type(self).__name__, self.name, got[0], got[1], want[0],
                                want[1]))

    def _epilogue(self, F, acc, inv_in, params, residual=None):
        """int32 accumulator (without bias) -> the layer's output (float or QTensor)."""
        bshape = self._channel_bcast_shape()
        inv_w = F.reshape(quant.weight_inv_scale_f(F, params['weight_scale']), bshape)
        bias = params.get('bias')
        if bias is not None:
            if not self.is_static:
                fan_in = int(np.prod(self.weight.shape[1:]))
                bias = quant.bias_to_int32_f(F, bias, inv_in, F.reshape(inv_w, (-1,)),
                                             quant.QRANGE_MAX_ABS[self._in_dtype] * 127 * fan_in)
            acc = F.broadcast_add(acc, F.reshape(bias, bshape))
        terms = [(acc, [inv_in, inv_w])]
        if self._residual:
            rq = as_qtensor(residual)
            if rq is None and self._out_dtype != 'float32':
                raise self._type_error('with int8 output the residual input must be a QTensor')
            if rq is None:
                y = F.broadcast_add(self._output(F, terms, params, relu=False), residual)
                return F.Activation(y, act_type=self._act_type) if self._act_type else y
            terms.append((rq.data, [quant.inv_scale_f(F, rq.min, rq.max, 'auto')]))
        return self._output(F, terms, params, relu=self._act_type == 'relu',
                            float_act=self._act_type, fused_sum=True)

    def _channel_bcast_shape(self):
        """Shape that broadcasts a per-channel vector over the accumulator."""
        raise NotImplementedError

    def _check_input_shape(self, shape):
        """Eager-mode check of the input shape against the weight (subclasses)."""

    def _quant_repr(self):
        src = 'dynamic' if self._in_q is None else '[%g, %g]' % (self._in_q.min, self._in_q.max)
        if self.in_zero_point:
            src += ' zero_point=%d' % self.in_zero_point
        return '%s %s -> %s, %s%s' % (self._in_dtype, src, self._out_repr(),
                                      'per-channel' if self._per_channel else 'per-tensor',
                                      ', +residual' if self._residual else '')
