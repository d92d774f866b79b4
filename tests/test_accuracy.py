"""Accuracy on real data: MNIST-trained gluoncv and hand-written networks, int8 vs fp32,
and gluonq against MXNet's built-in quantizer with the same calibration images and mode.

The models train for a few hundred steps here (the full-length comparison is
examples/mnist_accuracy.py); the bounds are the issue's: top-1 within 0.2 points of fp32
for ResNet-20 and the concat/residual network, 0.3 for the depthwise network and for every
calibration mode, and never worse than the built-in quantizer.
"""
import logging

import mxnet as mx
import pytest

import gluonq
from gluonq import quant

import mnist_models as M

N_TEST = 3000
N_CALIB = 256
RECIPES = {
    'resnet20': ({}, dict(batch_size=64, lr=0.2, max_steps=240)),
    'mobilenet0.25': ({}, dict(batch_size=64, lr=0.1, wd=4e-5, max_steps=300)),
    'incres': ({'width': 16}, dict(batch_size=64, lr=0.1, max_steps=240)),
}
_TRAINED = {}


def trained(name):
    if name not in _TRAINED:
        build_kw, train_kw = RECIPES[name]
        net = M.build(name, **build_kw)
        M.train(net, epochs=1, eval_test=False, verbose=False, **train_kw)
        net.hybridize(static_alloc=True, static_shape=True)
        xt, yt = M.load('test', N_TEST)
        acc, logits = M.evaluate(net, xt, yt)
        _TRAINED[name] = (net, acc, logits)
    return _TRAINED[name]


def _int8(net, mode='naive', per_channel=True):
    xc, _ = M.load('train', N_CALIB)
    q = gluonq.quantize_net(net, xc, calib_mode=mode, per_channel=per_channel, progress=False)
    q.hybridize()
    xt, yt = M.load('test', N_TEST)
    return M.evaluate(q, xt, yt)


def _builtin(net, mode):
    from mxnet.contrib.quantization import quantize_net_v2
    xc, yc = M.load('train', N_CALIB)
    dl = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(mx.nd.array(xc),
                                                             mx.nd.array(yc)), batch_size=64)
    q = quantize_net_v2(net, quantized_dtype='auto', quantize_mode='full',
                        quantize_granularity='channel-wise', calib_mode=mode, calib_data=dl,
                        num_calib_examples=N_CALIB, logger=logging.getLogger('quiet'))
    q.hybridize(static_alloc=True, static_shape=True)
    xt, yt = M.load('test', N_TEST)
    return M.evaluate(q, xt, yt)


@pytest.mark.parametrize('name,bound', [('resnet20', 0.2), ('incres', 0.2),
                                        ('mobilenet0.25', 0.3)])
def test_naive_int8_keeps_fp32_accuracy_and_beats_builtin(name, bound):
    net, acc_f, lf = trained(name)
    assert acc_f > 90, 'the float model did not train (%.2f%%)' % acc_f
    acc_q, lq = _int8(net)
    assert acc_f - acc_q <= bound, (acc_f, acc_q)
    sqnr = quant.sqnr_db(lf, lq)
    acc_b, lb = _builtin(trained(name)[0], 'naive')
    sqnr_b = quant.sqnr_db(lf, lb)
    assert acc_f - acc_q <= acc_f - acc_b + 0.05, (acc_q, acc_b)
    assert sqnr >= sqnr_b, (sqnr, sqnr_b)


@pytest.mark.parametrize('mode', ['entropy', 'percentile', 'mse'])
@pytest.mark.parametrize('name', ['resnet20', 'incres', 'mobilenet0.25'])
def test_every_calibration_mode_keeps_accuracy(name, mode):
    net, acc_f, lf = trained(name)
    acc_q, lq = _int8(net, mode)
    assert acc_f - acc_q <= 0.3, (mode, acc_f, acc_q)
    assert quant.sqnr_db(lf, lq) > 20


def test_entropy_does_not_collapse_where_builtin_does():
    """MXNet's entropy calibration was seen to destroy the concat/residual network."""
    net, acc_f, lf = trained('incres')
    acc_q, lq = _int8(net, 'entropy')
    acc_b, lb = _builtin(trained('incres')[0], 'entropy')
    assert acc_f - acc_q <= 0.3
    assert quant.sqnr_db(lf, lq) >= quant.sqnr_db(lf, lb)


def test_per_channel_helps_the_depthwise_network():
    net, acc_f, lf = trained('mobilenet0.25')
    acc_c, lc = _int8(net, per_channel=True)
    acc_t, lt = _int8(net, per_channel=False)
    assert quant.sqnr_db(lf, lc) > quant.sqnr_db(lf, lt)
    assert acc_f - acc_c <= 0.3
