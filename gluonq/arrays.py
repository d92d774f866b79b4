"""Numpy copies of MXNet arrays, taken when no MXNet operator can still be changing them.

MXNet 1.9.1's oneDNN convolutions reorder their weight array *in place* into
oneDNN's blocked layout the first time they run for inference. The convolution pushes that
reorder from inside its own execution (``NDArray::MKLDNNDataReorderAsync``), so a main-thread
``asnumpy()`` that started while the convolution was still queued or running does not wait
for it, and can copy a weight half-way through the reorder: a silently wrong tensor, at
random, mostly on a loaded machine. On resnet18_v2 (2 cores, other jobs beside it), tracing
right after a forward read a wrong weight in 9 of 150 traces with ``asnumpy()`` and in 0 of
150 with :func:`to_numpy` (``benchmarks/weight_read_race.py``: 6 of 150 against 0 of 150).
Every parameter that gluonq reads goes through :func:`to_numpy`.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

__all__ = ['to_numpy']


def to_numpy(value, dtype=None):
    """A numpy copy of ``value`` (Parameter, NDArray or array-like), read once every MXNet
    operation already pushed has finished (``mx.nd.waitall``). ``dtype`` casts the copy."""
    if isinstance(value, mx.gluon.Parameter):
        value = value.data()
    if isinstance(value, mx.nd.NDArray):
        mx.nd.waitall()
        value = value.asnumpy()
    return np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)
