"""Shape operators on quantized tensors (reshape, transpose, slice, ...): the integers move,
the range stays, so the result is exact. They let int8 tensors pass between int8 layers and
matrix products, as multi-head attention reshapes and transposes its heads."""
from __future__ import annotations

from ._base import QTensor, QuantizedBlock

__all__ = ['QuantizedShapeOp', 'SHAPE_OPS', 'SPLIT_OPS']

#: MXNet operators that cut a tensor into ``num_outputs`` equal parts
SPLIT_OPS = ('SliceChannel', 'split')
#: MXNet operators (symbol-JSON names) that only move elements
SHAPE_OPS = ('Reshape', 'reshape', 'transpose', 'SwapAxis', 'swapaxes', 'expand_dims',
             'squeeze', 'slice', 'slice_axis', 'crop') + SPLIT_OPS


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
        - **out**: QTensor of the operator's output shape, same dtype and range; a split
          (:data:`SPLIT_OPS`) returns a list of ``num_outputs`` QTensors.
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

    @property
    def num_outputs(self):
        return int(self._attrs['num_outputs']) if self._op in SPLIT_OPS else 1

    def hybrid_forward(self, F, x):
        qt = self._require_qtensor(x)
        out = self.apply(F, qt.data)
        if self.num_outputs == 1:
            return QTensor(out, qt.min, qt.max)
        return [QTensor(out[i], qt.min, qt.max) for i in range(self.num_outputs)]

    def __repr__(self):
        return '%s(%s)' % (type(self).__name__, self._op)
