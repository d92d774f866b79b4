"""Accuracy on real data: the float MNIST models shipped in data/models/ (gluoncv's CIFAR
ResNet-20 and MobileNet-0.25, and a hand-written concat/residual network, trained by
examples/train_mnist.py), quantized with 512 calibration images and scored on all 10k test
images, against fp32 and against MXNet's built-in quantizer with the same images and mode.

The bounds are the issue's: top-1 within 0.2 points of fp32 for ResNet-20 and the
concat/residual network, 0.3 for the depthwise network and for every calibration mode.
Against the built-in, gluonq's logit SQNR must be no lower and it must change no more fp32
predictions than the built-in does; its top-1 must not be significantly lower (a paired sign
test on the images where exactly one of the two is right: two int8 models of one fp32
network differ by a handful of borderline images, which land on either side by chance).
"""
import logging
import math

import mxnet as mx
import numpy as np
import pytest

import gluonq
from gluonq import quant

import mnist_models as M

N_CALIB = 512
BOUND = {'resnet20': 0.2, 'incres': 0.2, 'mobilenet0.25': 0.3}
_FLOAT = {}


def float_model(name):
    """The shipped float model, its top-1 and logits on the 10k test images."""
    if name not in _FLOAT:
        net = M.pretrained(name)
        xt, yt = M.test_set()
        acc, logits = M.evaluate(net, xt, yt)
        assert acc > 98.5, 'the shipped %s checkpoint scores only %.2f%%' % (name, acc)
        _FLOAT[name] = (net, acc, logits)
    return _FLOAT[name]


def _int8(net, mode='naive', per_channel=True):
    xc, _ = M.load('train', N_CALIB)
    q = gluonq.quantize_net(net, xc, calib_mode=mode, per_channel=per_channel, progress=False)
    q.hybridize()
    xt, yt = M.test_set()
    return M.evaluate(q, xt, yt)


def _builtin(name, mode):
    from mxnet.contrib.quantization import quantize_net_v2
    xc, yc = M.load('train', N_CALIB)
    dl = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(mx.nd.array(xc),
                                                             mx.nd.array(yc)), batch_size=64)
    q = quantize_net_v2(M.pretrained(name), quantized_dtype='auto', quantize_mode='full',
                        quantize_granularity='channel-wise', calib_mode=mode, calib_data=dl,
                        num_calib_examples=N_CALIB, logger=logging.getLogger('quiet'))
    q.hybridize(static_alloc=True, static_shape=True)
    xt, yt = M.test_set()
    return M.evaluate(q, xt, yt)


def _not_significantly_worse(logits_q, logits_b):
    """Sign test (normal approximation, one-sided 5%) on the images that exactly one of the
    two int8 models gets right: gluonq's top-1 is not significantly below the built-in's."""
    _, yt = M.test_set()
    right_q, right_b = logits_q.argmax(1) == yt, logits_b.argmax(1) == yt
    only_b, only_q = int(np.sum(right_b & ~right_q)), int(np.sum(right_q & ~right_b))
    return only_b - only_q <= 1.645 * math.sqrt(only_b + only_q), (only_b, only_q)


def _changed(logits_f, logits_q):
    """Number of test images whose top-1 prediction differs from fp32's."""
    return int(np.sum(logits_f.argmax(1) != logits_q.argmax(1)))


@pytest.mark.parametrize('name', ['resnet20', 'incres', 'mobilenet0.25'])
def test_naive_int8_keeps_fp32_accuracy_and_beats_builtin(name):
    net, acc_f, lf = float_model(name)
    acc_q, lq = _int8(net)
    assert acc_f - acc_q <= BOUND[name], (acc_f, acc_q)
    acc_b, lb = _builtin(name, 'naive')
    assert quant.sqnr_db(lf, lq) >= quant.sqnr_db(lf, lb)
    assert _changed(lf, lq) <= _changed(lf, lb)
    ok, counts = _not_significantly_worse(lq, lb)
    assert ok, ('right only with the built-in / only with gluonq', counts, acc_q, acc_b)


@pytest.mark.parametrize('mode', ['entropy', 'percentile', 'mse'])
@pytest.mark.parametrize('name', ['resnet20', 'incres', 'mobilenet0.25'])
def test_every_calibration_mode_keeps_accuracy(name, mode):
    net, acc_f, lf = float_model(name)
    acc_q, lq = _int8(net, mode)
    assert acc_f - acc_q <= 0.3, (mode, acc_f, acc_q)
    assert quant.sqnr_db(lf, lq) > 20


def test_entropy_does_not_collapse_where_builtin_does():
    """MXNet's entropy calibration was seen to destroy the concat/residual network."""
    net, acc_f, lf = float_model('incres')
    acc_q, lq = _int8(net, 'entropy')
    acc_b, lb = _builtin('incres', 'entropy')
    assert acc_f - acc_q <= 0.3
    assert quant.sqnr_db(lf, lq) >= quant.sqnr_db(lf, lb)


def test_per_channel_helps_the_depthwise_network():
    net, acc_f, lf = float_model('mobilenet0.25')
    acc_c, lc = _int8(net, per_channel=True)
    acc_t, lt = _int8(net, per_channel=False)
    assert quant.sqnr_db(lf, lc) > quant.sqnr_db(lf, lt) + 3
    assert acc_f - acc_c <= 0.3
    assert acc_c >= acc_t
