"""Shape operators on quantized tensors (reshape, transpose, slice, ...): the integers move,
the range stays, so the result is exact. They let int8 tensors pass between int8 layers and
matrix products, as multi-head attention reshapes and transposes its heads."""
from __future__ import annotations

from ._base import QTensor, QuantizedBlock

__all__ = ['QuantizedShapeOp', 'SHAPE_OPS']

#: MXNet operators (symbol-JSON names) that only move elements
SHAPE_OPS = ('Reshape', 'reshape', 'transpose', 'SwapAxis', 'swapaxes', 'expand_dims',
             'squeeze', 'slice', 'slice_axis', 'crop')


class QuantizedShapeOp(QuantizedBlock):
    """One MXNet shape operator applied to the integers of a :class:`QTensor`.

    Parameters
    ----------
    op : str
        One of :data:`SHAPE_OPS`, as named in symbol JSON.
    attrs : dict
        Its attributes (strings, as in symbol JSON, or Python values).

    Inputs:
        - **data**: QTensor of any shape the operator takes.

    Outputs:
        - **out**: QTensor of the operator's output shape, same dtype and range.
    """

    def __init__(self, op, attrs=None, **kwargs):
        super().__init__(**kwargs)
        if op not in SHAPE_OPS:
            raise ValueError('QuantizedShapeOp: operator %r only moves elements if it is one '
                             'of %s' % (op, ', '.join(SHAPE_OPS)))
        self._op = op
        self._attrs = {k: v for k, v in (attrs or {}).items() if not k.startswith('__')}

    def apply(self, F, data):
        """The operator on integer ``data`` (an NDArray or a Symbol)."""
        fn = getattr(F, self._op, None) or getattr(F._internal, self._op)
        return fn(data, **self._attrs)

    def hybrid_forward(self, F, x):
        qt = self._require_qtensor(x)
        return QTensor(self.apply(F, qt.data), qt.min, qt.max)

    def __repr__(self):
        return '%s(%s)' % (type(self).__name__, self._op)
