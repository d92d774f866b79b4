"""Initializers that are safe for integer parameters.

MXNet's random initializers (Uniform, Xavier, ...) call a sampler that only produces float
types, so an int8 parameter must never reach them. gluonq's integer parameters carry one of
these initializers as their own ``init``, which takes precedence over the global initializer
of ``net.initialize(mx.init.Xavier())``.
"""
from __future__ import annotations

import mxnet as mx

__all__ = ['IntInitializer', 'IntZero', 'IntConstant', 'IntUniform', 'is_int_safe']


class IntInitializer(mx.init.Initializer):
    """Base class of initializers that write integers into any dtype."""

    def _init_weight(self, name, arr):
        raise NotImplementedError


@mx.init.register
class IntZero(IntInitializer):
    """Fill with integer zeros."""

    def _init_weight(self, _, arr):
        arr[:] = 0


@mx.init.register
class IntConstant(IntInitializer):
    """Fill with one integer ``value``."""

    def __init__(self, value=0):
        super().__init__(value=int(value))
        self.value = int(value)

    def _init_weight(self, _, arr):
        arr[:] = self.value


@mx.init.register
class IntUniform(IntInitializer):
    """Uniform random integers in [low, high] (default the int8 weight range [-127, 127]).

    Drawn with ``mx.nd.random.randint`` into int32 and cast, so ``mx.random.seed`` makes it
    reproducible.
    """

    def __init__(self, low=-127, high=127):
        super().__init__(low=int(low), high=int(high))
        if low > high:
            raise ValueError('IntUniform needs low <= high, got %d > %d' % (low, high))
        self.low, self.high = int(low), int(high)

    def _init_weight(self, _, arr):
        vals = mx.nd.random.randint(self.low, self.high + 1, shape=arr.shape, dtype='int32',
                                    ctx=arr.context)
        arr[:] = vals.astype(arr.dtype)


def is_int_safe(init):
    """True if ``init`` can initialize an integer parameter without a float sampler."""
    if init is None:
        return False
    if isinstance(init, str):
        try:
            init = mx.init.create(init)
        except Exception:                           # pylint: disable=broad-except
            return False
    return isinstance(init, (IntInitializer, mx.init.Zero, mx.init.One, mx.init.Constant))
