"""Matrix product of two activations in int8: the quantized twin of ``batch_dot``, ``dot``
(2-d) and ``linalg_gemm2``, as attention computes ``Q K^T`` and ``softmax(.) V``."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import quant
from ._base import QuantizedBlock, _check_range, as_qtensor

__all__ = ['QuantizedMatMul']

#: float operators the block is the twin of (``dot`` with 2-d operands)
MATMUL_OPS = ('batch_dot', 'dot', 'linalg_gemm2', '_linalg_gemm2')


def _bool_attr(attrs, key):
    return str(attrs.get(key, 'False')).strip().lower() in ('true', '1')


class QuantizedMatMul(QuantizedBlock):
    r"""Matrix product of two activations in int8: ``out = alpha * op(a) @ op(b)``.

    ``op(x)`` is ``x`` or, with ``transpose_a``/``transpose_b``, ``x`` with its last two axes
    swapped; leading (batch) axes must be equal, as for ``batch_dot`` and ``linalg_gemm2``.
    Each operand is an int8/uint8 :class:`QTensor` or float32 data quantized here (per
    tensor, with its calibrated range or, without one, the range of the tensor itself). The
    int32 accumulator ``sum_k q_a q_b`` is exact (``quant.matmul_int_f``: float32 products
    of integers, chunked so that partial sums stay below 2**24) and becomes either float32
    ``alpha * acc * s_a * s_b`` or, requantized with gluonq's arithmetic, int8/uint8
    ``saturate(round(acc * m))`` with ``m = inv_out / inv_a / inv_b / inv_alpha``
    (``inv = 1 / scale``) in float32.

    Parameters
    ----------
    transpose_a, transpose_b : bool, default False
        Swap the last two axes of the operand before the product.
    alpha : float, default 1.0
        Factor of the product (``linalg_gemm2``'s alpha; a ``/ sqrt(d)`` folded in), applied
        in the epilogue as the inverse scale ``f32(1 / alpha)``.
    a_dtype, b_dtype : {'auto', 'int8', 'uint8'}
        Integer type of each operand; 'auto' is uint8 when its range has min >= 0, else
        int8 (dynamic mode: int8).
    a_range, b_range : (float, float) or None
        Calibrated real range used to quantize a float operand (held in ``a_min``/``a_max``,
        ``b_min``/``b_max``); None: the range of each float operand at run time. A QTensor
        operand brings its own range.
    out_dtype : {None, 'float32', 'auto', 'int8', 'uint8'}
        'float32' returns real values; otherwise a requantized :class:`QTensor` ('auto':
        uint8 for an ``out_range`` with min >= 0). None: 'auto' with ``out_range``, else
        'float32'.
    out_range : (float, float) or None
        Calibrated real range of the output; None with an integer ``out_dtype``: the range
        of each result (dynamic).
    contraction : int or None
        The contraction size K, when it is fixed (the converter records it): a hybridized
        graph then multiplies in as few exact float32 products as K needs, instead of the
        chunks that cover any K. Eager calls check it.

    Inputs:
        - **a**: float32 or QTensor of shape `(..., M, K)` (`(..., K, M)` with
          ``transpose_a``).
        - **b**: float32 or QTensor of shape `(..., K, N)` (`(..., N, K)` with
          ``transpose_b``), the same leading axes.

    Outputs:
        - **out**: float32 `(..., M, N)`, or a QTensor of that shape for an integer
          ``out_dtype``.

    The accumulator is int32: ``K * max|q_a| * max|q_b|`` (128 for int8, 255 for uint8)
    must stay below 2**31 - 1 (int8 x int8: K <= 131071); eager calls check it.
    """

    def __init__(self, transpose_a=False, transpose_b=False, alpha=1.0, a_dtype='auto',
                 a_range=None, b_dtype='auto', b_range=None, out_dtype=None, out_range=None,
                 contraction=None, **kwargs):
        super().__init__(**kwargs)
        self._transpose = (bool(transpose_a), bool(transpose_b))
        self._k = None if contraction is None else int(contraction)
        self._alpha = float(alpha)
        if not np.isfinite(self._alpha) or self._alpha == 0:
            raise ValueError('QuantizedMatMul: alpha must be finite and nonzero, got %r'
                             % (alpha,))
        self._in_q, self._in_dtype = {}, {}
        for which, dtype, rng in (('a', a_dtype, a_range), ('b', b_dtype, b_range)):
            if rng is not None:
                dt = quant.dtype_for_range(rng[0], rng[1], dtype)
                self._in_q[which] = _check_range('%s_range' % which, rng[0], rng[1], dt)
            else:
                dt = 'int8' if dtype == 'auto' else dtype
                if dt not in quant.QRANGE:
                    raise ValueError("QuantizedMatMul: %s_dtype must be 'auto', 'int8' or "
                                     "'uint8', got %r" % (which, dtype))
            self._in_dtype[which] = dt
        if out_dtype is None:
            out_dtype = 'float32' if out_range is None else 'auto'
        self._setup_output(out_dtype, out_range, relu=False)
        with self.name_scope():
            for which, qp in self._in_q.items():
                lo, hi = self._range_params(which, qp)
                setattr(self, which + '_min', lo)
                setattr(self, which + '_max', hi)

    @property
    def in_dtypes(self):
        """Integer types of the two operands, ``(a, b)``."""
        return self._in_dtype['a'], self._in_dtype['b']

    @property
    def alpha(self):
        return self._alpha

    def _operand(self, F, x, which, params):
        """``(integers, inverse scale)`` of one operand (quantized here if float)."""
        dtype = self._in_dtype[which]
        qt = as_qtensor(x)
        if qt is not None:
            if F is mx.nd and np.dtype(qt.data.dtype) != np.dtype(dtype):
                raise self._type_error("operand %s: expected %s data, got %s (build the block "
                                       "with %s_dtype='%s')" % (which, dtype,
                                                                np.dtype(qt.data.dtype).name,
                                                                which,
                                                                np.dtype(qt.data.dtype).name))
            return qt.data, quant.inv_scale_f(F, qt.min, qt.max, dtype)
        if F is mx.nd and x.dtype != np.float32:
            raise self._type_error('operand %s: expected float32 data or a QTensor, got %s'
                                   % (which, np.dtype(x.dtype).name))
        if which in self._in_q:
            lo, hi = params[which + '_min'], params[which + '_max']
        else:
            lo, hi = quant.dynamic_range_f(F, x, dtype)
        q, lo, hi = quant.quantize_f(F, x, lo, hi, dtype)
        return q, quant.inv_scale_f(F, lo, hi, dtype)

    def _contraction(self, sa, sb):
        """Eager check of the operand shapes; returns K."""
        ta, tb = self._transpose
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            raise ValueError('%s %r: operands of shapes %s and %s; expected the same number '
                             '(>= 2) of axes and equal leading axes'
                             % (type(self).__name__, self.name, sa, sb))
        ka, kb = sa[-2 if ta else -1], sb[-1 if tb else -2]
        if ka != kb or (self._k is not None and ka != self._k):
            raise ValueError('%s %r: operands of shapes %s and %s (transpose_a=%s, '
                             'transpose_b=%s) contract %d with %d%s'
                             % (type(self).__name__, self.name, sa, sb, ta, tb, ka, kb,
                                '' if self._k is None else
                                ' (the block was built for contraction=%d)' % self._k))
        bound = quant.matmul_bound(ka, *self.in_dtypes)
        if bound > quant.QBOUNDS['int32'][1]:
            raise ValueError('%s %r: %d products of %s x %s integers can reach %d, beyond '
                             'the int32 accumulator' % (type(self).__name__, self.name, ka,
                                                       self.in_dtypes[0], self.in_dtypes[1],
                                                       bound))
        return ka

    def hybrid_forward(self, F, a, b, **params):
        qa, inv_a = self._operand(F, a, 'a', params)
        qb, inv_b = self._operand(F, b, 'b', params)
        k = self._contraction(qa.shape, qb.shape) if F is mx.nd else self._k
        acc = quant.matmul_int_f(F, qa, qb, *self.in_dtypes, *self._transpose, k=k)
        invs = [inv_a, inv_b]
        if self._alpha != 1.0:
            invs.append(F.ones_like(inv_a) * float(np.float32(1.0 / self._alpha)))
        return self._output(F, [(acc, invs)], params, relu=False)

    def __repr__(self):
        ops = []
        for which in 'ab':
            qp = self._in_q.get(which)
            ops.append(self._in_dtype[which] if qp is None else
                       '%s [%g, %g]' % (self._in_dtype[which], qp.min, qp.max))
        flags = [f for f, on in zip(('transpose_a', 'transpose_b'), self._transpose) if on]
        if self._alpha != 1.0:
            flags.append('alpha=%g' % self._alpha)
        return '%s(%s x %s -> %s%s)' % (type(self).__name__, ops[0], ops[1], self._out_repr(),
                                        ''.join(', ' + f for f in flags))

    @classmethod
    def from_op(cls, op, attrs=None, a_range=None, b_range=None, out_range=None, **kwargs):
        """The twin of one float operator: ``batch_dot``, ``dot`` (of 2-d operands) or
        ``linalg_gemm2`` with its attributes (symbol-JSON strings or Python values).

        ``a_range``/``b_range``/``out_range`` are the calibrated real ranges (None:
        dynamic); other keyword arguments go to the constructor (``alpha`` multiplies the
        operator's own).
        """
        attrs = dict(attrs or {})
        if op not in MATMUL_OPS:
            raise ValueError('QuantizedMatMul.from_op: operator %r is not one of %s'
                             % (op, ', '.join(MATMUL_OPS)))
        if op.endswith('linalg_gemm2') and int(attrs.get('axis', -2)) != -2:
            raise ValueError('QuantizedMatMul.from_op: linalg_gemm2 with axis=%s (only the '
                             'last two axes, axis=-2, are supported)' % attrs['axis'])
        alpha = float(attrs.get('alpha', 1.0)) * float(kwargs.pop('alpha', 1.0))
        return cls(transpose_a=_bool_attr(attrs, 'transpose_a'),
                   transpose_b=_bool_attr(attrs, 'transpose_b'), alpha=alpha,
                   a_range=a_range, b_range=b_range, out_range=out_range, **kwargs)
