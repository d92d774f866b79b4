"""Reading a Parameter's value in the tests.

MXNet's oneDNN convolutions reorder their weight array in place,
from inside their own (asynchronous) execution, the first time they run for inference; a
main-thread ``asnumpy()`` that started before can copy the weight half-way through that
reorder. The tests read parameters only with MXNet's engine idle.
"""
import mxnet as mx


def value(param):
    """``param``'s value as numpy, read once every pushed MXNet operation has finished."""
    mx.nd.waitall()
    return param.data().asnumpy()
