"""gluonq.arrays.to_numpy, and tracing a network whose forward may still be running."""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from gluonq.arrays import to_numpy
from gluonq.convert.graph import trace


def test_to_numpy_reads_parameters_arrays_and_numpy():
    p = mx.gluon.Parameter('w', shape=(3, 4))
    p.initialize(mx.init.Uniform())
    ref = p.data().asnumpy()
    assert np.array_equal(to_numpy(p), ref)
    assert np.array_equal(to_numpy(p.data()), ref)
    assert to_numpy(p, np.float64).dtype == np.float64
    assert np.array_equal(to_numpy(ref), ref)
    assert to_numpy([1, 2], np.int8).dtype == np.int8


def test_trace_right_after_a_forward_reads_the_settled_weights():
    """Each trace starts while the forward's convolutions (which reorder their weights in
    place) may still be queued; every traced value must equal the value read afterwards."""
    for i in range(4):
        net = nn.HybridSequential()
        with net.name_scope():
            for c in (64, 128, 128, 256):
                net.add(nn.Conv2D(c, 3, padding=1), nn.Activation('relu'))
        net.initialize(mx.init.Xavier())
        net(mx.nd.ones((1, 3, 32, 32)))
        graph = trace(net, [(1, 3, 32, 32)])
        mx.nd.waitall()
        wrong = [p.name for p in net.collect_params().values()
                 if not np.array_equal(graph.params[p.name], p.data().asnumpy())]
        assert not wrong, 'trace %d read wrong values for %s' % (i, wrong)
