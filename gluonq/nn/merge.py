"""Merging quantized tensors: residual add and concat, with calibrated output ranges.

MXNet's ``quantized_elemwise_add`` and ``quantized_concat`` are not used: they read int8 data
with the 127.5 / 255.5 convention (0.4% off every other int8 operator's 127 / 255), and the
add requantizes a mixed uint8 + int8 pair through an int8 buffer that saturates at 127. The
arithmetic here is gluonq's requantize (``quant.requantize_f``), the same as a layer's.
"""
from __future__ import annotations

from .. import quant
from ._base import QTensor, QuantizedBlock

__all__ = ['QuantizedAdd', 'QuantizedConcat']


class QuantizedAdd(QuantizedBlock):
    """Element-wise sum of two quantized tensors: ``out = a + b`` (then ReLU if asked).

    ``q_out = saturate(round(q_a * s_a / s_out + q_b * s_b / s_out))`` in float32.

    Parameters
    ----------
    activation : None or 'relu'
        Applied to the sum before rounding.
    out_dtype : {'auto', 'int8', 'uint8', 'float32'}
        'auto' is uint8 after a relu or for an out_range with min >= 0.
    out_range : (float, float) or None
        Calibrated real range of the sum (held in ``output_min``/``output_max``); None: the
        range of each result is computed at run time.

    Inputs:
        - **a**, **b**: QTensors of the same shape (any mix of int8 and uint8).

    Outputs:
        - **out**: QTensor of that shape (float32 with ``out_dtype='float32'``).
    """

    def __init__(self, activation=None, out_dtype='auto', out_range=None, **kwargs):
        super().__init__(**kwargs)
        if activation not in (None, 'relu'):
            raise ValueError("QuantizedAdd supports activation None or 'relu', got %r"
                             % (activation,))
        self._relu = activation == 'relu'
        self._setup_output(out_dtype, out_range, self._relu)

    def hybrid_forward(self, F, a, b, **params):
        qa, qb = self._require_qtensor(a), self._require_qtensor(b)
        terms = [(q.data, [quant.inv_scale_f(F, q.min, q.max, 'auto')]) for q in (qa, qb)]
        return self._output(F, terms, params, relu=self._relu,
                            float_act='relu' if self._relu else None)

    def __repr__(self):
        return '%s(%s-> %s)' % (type(self).__name__, 'relu ' if self._relu else '',
                                self._out_repr())


class QuantizedConcat(QuantizedBlock):
    """Concatenation of quantized tensors along ``dim``.

    Each input is requantized to the output range (``round(q_i * s_i / s_out)``); an input
    that already has the output's range and dtype comes through unchanged.

    Parameters
    ----------
    dim : int, default 1
    out_dtype : {'auto', 'int8', 'uint8'}
    out_range : (float, float) or None
        Calibrated range of the result; None: the union of the inputs' ranges at run time
        (then ``out_dtype`` 'auto' means int8).

    Inputs:
        - **\\*data**: QTensors with equal shapes except along ``dim``.

    Outputs:
        - **out**: QTensor.
    """

    def __init__(self, dim=1, out_dtype='auto', out_range=None, **kwargs):
        super().__init__(**kwargs)
        self._dim = dim
        self._setup_output(out_dtype, out_range, False, allow_float=False)

    def hybrid_forward(self, F, *inputs, **params):
        qts = [self._require_qtensor(x) for x in inputs]
        if self._out_q is None:
            hi = qts[0].max
            for q in qts[1:]:
                hi = F.maximum(hi, F.maximum(F.abs(q.min), q.max))
            hi = F.maximum(hi, F.abs(qts[0].min))
            lo = -hi if self._out_dtype == 'int8' else F.zeros_like(hi)
        else:
            lo, hi = params['output_min'], params['output_max']
        inv_out = quant.inv_scale_f(F, lo, hi, self._out_dtype)
        parts = [quant.requantize_f(
            F, [(q.data, F.broadcast_div(inv_out, quant.inv_scale_f(F, q.min, q.max, 'auto')))],
            self._out_dtype) for q in qts]
        return QTensor(F.concat(*parts, dim=self._dim), lo, hi)

    def __repr__(self):
        return '%s(dim=%d -> %s)' % (type(self).__name__, self._dim, self._out_repr())
