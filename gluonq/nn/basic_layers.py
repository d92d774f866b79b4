"""Quantized twins of ``mxnet.gluon.nn``'s basic layers, and the quantize/dequantize stubs."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import quant
from ..arrays import to_numpy
from ._base import QTensor, QuantizedBlock, QuantizedLayer, _check_range, as_qtensor

__all__ = ['QuantizedDense', 'QuantizedActivation', 'QuantizedFlatten', 'Quantize', 'Dequantize']


class QuantizedDense(QuantizedLayer):
    r"""Densely-connected layer with int8 weights: the quantized twin of ``nn.Dense``.

    ``output = activation(dot(input, weight) + bias)`` computed as
    ``quantize(input)`` (uint8 or int8) -> ``contrib.quantized_fully_connected`` (int32, on
    two uint8 halves of the input, exact on every CPU) -> ``+ bias`` (int32 at
    ``s_in * s_w``) -> float output or requantized int8/uint8 output.

    Parameters
    ----------
    units : int
        Dimensionality of the output space.
    activation : str
        Activation after the layer; with int8 output only 'relu' (fused into the requantize).
    use_bias : bool, default True
    flatten : bool, default True
        As ``nn.Dense``: collapse all but the first axis of the input.
    in_units : int, optional
        Size of the input; inferred at the first forward when 0.
    in_dtype, in_range, out_dtype, out_range, per_channel, residual :
        Quantization settings, see :class:`~gluonq.nn.QuantizedLayer`.

    Parameters held: ``weight`` int8 (units, in_units) in [-127, 127]; ``weight_scale``
    float32 (units,) or (1,), real units per integer step; ``bias`` int32 (units,) at scale
    ``s_in * s_w`` (float32 in dynamic mode); ``input_min``/``input_max`` and
    ``output_min``/``output_max`` float32 (1,) calibrated ranges when given.

    Inputs:
        - **data**: float32 of shape `(batch_size, x1, ..., xn)` (or `(x1, ..., xn, in_units)`
          with ``flatten=False``), or a :class:`QTensor` of that shape.
        - **residual** (only with ``residual=True``): a tensor of the output's shape.

    Outputs:
        - **out**: float32 `(batch_size, units)` (``flatten=True``), or a :class:`QTensor` of
          that shape when ``out_dtype`` is int8/uint8/auto.
    """

    def __init__(self, units, activation=None, use_bias=True, flatten=True, in_units=0,
                 **kwargs):
        super().__init__(units, use_bias, activation, **kwargs)
        self._flatten = flatten
        self._in_units = in_units
        with self.name_scope():
            self._make_weight_params((units, in_units))

    def hybrid_forward(self, F, x, residual=None, **params):
        qt, inv_in = self._input(F, x, params)
        # The input goes in as two uint8 halves of at most 128 each, so that no CPU's kernel
        # saturates (see quant.split_operand_f). no_bias: MXNet's int8 bias path adds through
        # float32; the int32 bias is added exactly in the epilogue. The ranges only set the
        # operator's output range, which gluonq does not use.
        one = F.ones_like(qt.max)
        acc = [F.contrib.quantized_fully_connected(
            data=half, weight=params['weight'], min_data=F.zeros_like(qt.min), max_data=one,
            min_weight=-one, max_weight=one, num_hidden=self._units, no_bias=True,
            flatten=self._flatten)[0] for half in quant.split_operand_f(F, qt.data,
                                                                         self._in_dtype)]
        acc = F.broadcast_add(*acc) if self._in_dtype == 'uint8' else F.broadcast_sub(*acc)
        return self._epilogue(F, acc, inv_in, params, residual)

    def _channel_bcast_shape(self):
        return (1, -1) if self._flatten else (-1,)

    def _check_input_shape(self, shape):
        in_units = self.weight.shape[1]
        got = int(np.prod(shape[1:])) if self._flatten else shape[-1]
        if in_units and got != in_units:
            raise ValueError('%s %r: input of shape %s has %d features, the layer takes '
                             'in_units=%d' % (type(self).__name__, self.name, shape, got,
                                              in_units))

    def __repr__(self):
        shape = self.weight.shape
        return '{name}({i} -> {o}, {act}, {q})'.format(
            name=type(self).__name__, i=shape[1] if shape[1] else None, o=shape[0],
            act=self._act_type or 'linear', q=self._quant_repr())

    @classmethod
    def from_float(cls, dense, in_range=None, out_range=None, **kwargs):
        """Quantized twin of a trained ``nn.Dense`` (or QuantizedDense config + float weights).

        ``in_range``/``out_range`` are the calibrated real ranges of the input and output
        (None: dynamic); the other keyword arguments are :class:`QuantizedLayer`'s.
        """
        if not isinstance(dense, mx.gluon.nn.Dense):
            raise TypeError('QuantizedDense.from_float needs an nn.Dense, got %s'
                            % type(dense).__name__)
        kwargs.setdefault('activation', dense.act._act_type if dense.act is not None else None)
        weight = to_numpy(dense.weight)
        layer = cls(dense._units, use_bias=dense.bias is not None,
                    flatten=dense._flatten, in_units=weight.shape[1], in_range=in_range,
                    out_range=out_range, **kwargs)
        layer.initialize(ctx=dense.weight.list_ctx())
        layer.set_float_params(weight, None if dense.bias is None else dense.bias.data())
        return layer


class Quantize(QuantizedBlock):
    """Float -> quantized tensor: the quantize stub (PyTorch's QuantStub).

    Parameters
    ----------
    out_dtype : {'auto', 'uint8', 'int8'}
        'auto' is uint8 when ``in_range`` has min >= 0, else int8.
    in_range : (float, float) or None
        Calibrated real range (held in ``input_min``/``input_max``); None: dynamic, each
        input's own range.
    scheme : {'symmetric', 'affine'}
        'affine': uint8 with a zero point where ``in_range`` has min < 0 (the output
        QTensor's range then has ``min < 0``; only gluonq's layers read it).

    Inputs:
        - **data**: float32 tensor of any shape.

    Outputs:
        - **out**: :class:`QTensor` of the same shape.
    """

    def __init__(self, out_dtype='auto', in_range=None, scheme='symmetric', **kwargs):
        super().__init__(**kwargs)
        self._qp = None
        if in_range is not None:
            self._qp = _check_range('in_range', in_range[0], in_range[1], out_dtype, scheme)
            self._dtype = self._qp.dtype
            with self.name_scope():
                self.input_min, self.input_max = self._range_params('input', self._qp)
        else:
            if scheme != 'symmetric':
                raise ValueError("Quantize: scheme %r needs a calibrated in_range" % (scheme,))
            self._dtype = 'int8' if out_dtype == 'auto' else out_dtype
            if self._dtype not in quant.QRANGE:
                raise ValueError("out_dtype must be 'auto', 'int8' or 'uint8', got %r"
                                 % (out_dtype,))

    @property
    def out_dtype(self):
        return self._dtype

    def hybrid_forward(self, F, x, input_min=None, input_max=None):
        if as_qtensor(x) is not None:
            raise self._type_error('input is already quantized')
        if F is mx.nd and x.dtype != np.float32:
            raise self._type_error('expected float32 input, got %s' % np.dtype(x.dtype).name)
        if self._qp is None:
            input_min, input_max = quant.dynamic_range_f(F, x, self._dtype)
        elif self._qp.is_affine:
            return QTensor(*quant.quantize_affine_f(F, x, input_min, input_max,
                                                    self._qp.zero_point))
        return QTensor(*quant.quantize_f(F, x, input_min, input_max, self._dtype))

    def __repr__(self):
        rng = 'dynamic' if self._qp is None else '[%g, %g]' % (self._qp.min, self._qp.max)
        if self._qp is not None and self._qp.is_affine:
            rng += ' zero_point=%d' % self._qp.zero_point
        return '%s(float32 -> %s, %s)' % (type(self).__name__, self._dtype, rng)


class Dequantize(QuantizedBlock):
    """Quantized tensor -> float32: the dequantize stub (PyTorch's DeQuantStub).

    ``out = float32(q) * max / Q`` with Q = 127 (int8) or 255 (uint8); the dtype is read
    from the range (uint8 tensors have min >= 0). With ``scheme='affine'`` the input is
    affine uint8: ``out = float32(q - z) * (max - min) / 255``.

    Inputs:
        - **data**: :class:`QTensor` (or list ``[data, min, max]``).

    Outputs:
        - **out**: float32 tensor of the same shape.
    """

    def __init__(self, scheme='symmetric', **kwargs):
        super().__init__(**kwargs)
        if scheme not in quant.SCHEMES:
            raise ValueError("Dequantize: scheme must be 'symmetric' or 'affine', got %r"
                             % (scheme,))
        self._scheme = scheme

    def hybrid_forward(self, F, x):
        qt = as_qtensor(x)
        if qt is None:
            raise self._type_error('expected a QTensor (data, min, max), got %s'
                                   % type(x).__name__)
        if F is mx.nd and (qt.data.dtype == np.uint8 and float(qt.min.asscalar()) < 0) != \
                (self._scheme == 'affine'):
            raise self._type_error('the input is %s, the block was built with scheme=%r'
                                   % ('affine uint8' if self._scheme == 'symmetric'
                                      else 'not affine', self._scheme))
        if self._scheme == 'affine':
            return quant.dequantize_affine_f(F, qt)
        return quant.dequantize_f(F, qt)

    def __repr__(self):
        return '%s(%s-> float32)' % (type(self).__name__,
                                     'affine ' if self._scheme == 'affine' else '')


class QuantizedActivation(QuantizedBlock):
    """ReLU on a quantized tensor (the only activation with an exact int8 form).

    int8 data goes through MXNet's ``contrib.quantized_act`` (``max(q, 0)``, range kept); on
    uint8 data ReLU is the identity (``quantized_act`` mistypes uint8 input as int8).

    Parameters
    ----------
    activation : 'relu'
    in_dtype : {'int8', 'uint8'}
        dtype of the input, which decides the kernel.

    Inputs:
        - **data**: QTensor of any shape.

    Outputs:
        - **out**: QTensor of the same shape, dtype and range.
    """

    def __init__(self, activation='relu', in_dtype='int8', **kwargs):
        super().__init__(**kwargs)
        if activation != 'relu':
            raise ValueError("QuantizedActivation supports 'relu' only, got %r" % (activation,))
        if in_dtype not in quant.QRANGE:
            raise ValueError("in_dtype must be 'int8' or 'uint8', got %r" % (in_dtype,))
        self._in_dtype = in_dtype

    def hybrid_forward(self, F, x):
        qt = self._require_qtensor(x)
        self._check_qtensor(F, qt, self._in_dtype)
        if self._in_dtype == 'uint8':
            return qt
        return QTensor(*F.contrib.quantized_act(qt.data, qt.min, qt.max, act_type='relu'))

    def __repr__(self):
        return '%s(relu, %s)' % (type(self).__name__, self._in_dtype)


class QuantizedFlatten(QuantizedBlock):
    """Flatten a quantized tensor to `(batch_size, -1)` (``contrib.quantized_flatten``).

    Inputs:
        - **data**: QTensor `(batch_size, d1, ..., dn)`.

    Outputs:
        - **out**: QTensor `(batch_size, d1 * ... * dn)`, same dtype and range.
    """

    def hybrid_forward(self, F, x):
        qt = self._require_qtensor(x)
        return QTensor(*F.contrib.quantized_flatten(qt.data, qt.min, qt.max))

    def __repr__(self):
        return '%s()' % type(self).__name__
