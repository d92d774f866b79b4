"""gluonq.nn layers against their float twins and against the numpy integer model."""
import itertools

import mxnet as mx
import numpy as np
import pytest

from gluonq import nn as qnn
from gluonq import quant

import reference as ref

RNG = np.random.RandomState(0)


def _float_dense(units, in_units, act=None, use_bias=True, flatten=True):
    d = mx.gluon.nn.Dense(units, activation=act, use_bias=use_bias, flatten=flatten,
                          in_units=in_units)
    d.initialize(mx.init.Xavier(magnitude=3))
    if use_bias:
        d.bias.set_data(mx.nd.array(RNG.uniform(-0.5, 0.5, units)))
    return d


def _float_conv(nd, cin, cout, k, stride, pad, dilate, groups, act=None, use_bias=True):
    cls = {1: mx.gluon.nn.Conv1D, 2: mx.gluon.nn.Conv2D, 3: mx.gluon.nn.Conv3D}[nd]
    c = cls(cout, k, strides=stride, padding=pad, dilation=dilate, groups=groups,
            in_channels=cin, activation=act, use_bias=use_bias)
    c.initialize(mx.init.Xavier(magnitude=3))
    if use_bias:
        c.bias.set_data(mx.nd.array(RNG.uniform(-0.5, 0.5, cout)))
    return c


def _input(shape, dtype):
    if dtype == 'uint8':
        return RNG.uniform(0, 2.0, shape).astype(np.float32)
    return RNG.uniform(-2.0, 2.0, shape).astype(np.float32)


def _check_layer(qlayer, flayer, x, kind, geometry=None):
    """The int8 layer: same integers as numpy, error within the bound, eager == hybrid."""
    xn = mx.nd.array(x)
    out = qlayer(xn)
    expect = ref.layer_forward(qlayer, x, kind, geometry)
    qt = qnn.as_qtensor(out)
    if qt is not None:
        q_expect, qp = expect
        assert qt.data.dtype == q_expect.dtype
        np.testing.assert_array_equal(qt.data.asnumpy(), q_expect)
        got = quant.dequantize_np(qt.data.asnumpy(), qp)
    else:
        got = out.asnumpy()
        np.testing.assert_allclose(got, expect, rtol=2e-6, atol=1e-6)
    # eager and hybridized give identical results
    qlayer.hybridize()
    out2 = qlayer(xn)
    qt2 = qnn.as_qtensor(out2)
    np.testing.assert_array_equal((qt2.data if qt2 is not None else out2).asnumpy(),
                                  (qt.data if qt is not None else out).asnumpy())
    return got


DENSE_CASES = list(itertools.product(
    [1, 5],                       # batch
    [(7, 13), (1, 1), (33, 64)],  # units, in_units
    ['uint8', 'int8'],            # input dtype
    [True, False],                # per channel
    [True, False],                # static
))


@pytest.mark.parametrize('batch,shape,in_dtype,per_channel,static', DENSE_CASES)
def test_dense_float_out_matches_reference_and_bound(batch, shape, in_dtype, per_channel,
                                                     static):
    units, in_units = shape
    f = _float_dense(units, in_units)
    x = _input((batch, in_units), in_dtype)
    in_range = (0.0, 2.0) if in_dtype == 'uint8' else (-2.0, 2.0)
    q = qnn.QuantizedDense.from_float(f, in_range=in_range if static else None,
                                      in_dtype=in_dtype, per_channel=per_channel)
    got = _check_layer(q, f, x, 'dense')
    qp_in = ref.input_qparams(x, in_dtype, in_range if static else None)
    bound = ref.error_bound(f.weight.data().asnumpy(), x, qp_in,
                            q.weight_scale.data().asnumpy(), 'dense', bias_scale=True)
    err = np.abs(got - f(mx.nd.array(x)).asnumpy())
    assert np.all(err <= bound), (err.max(), bound.min())


@pytest.mark.parametrize('out_dtype,act', [('auto', None), ('int8', None), ('auto', 'relu'),
                                           ('uint8', 'relu')])
def test_dense_int8_out(out_dtype, act):
    f = _float_dense(10, 24, act=act)
    x = _input((4, 24), 'uint8')
    yf = f(mx.nd.array(x)).asnumpy()
    lo = 0.0 if act else float(yf.min())
    q = qnn.QuantizedDense.from_float(f, in_range=(0, 2.0), out_range=(lo, float(yf.max())),
                                      out_dtype=out_dtype)
    got = _check_layer(q, f, x, 'dense')
    assert q.out_dtype == ('uint8' if act else 'int8')
    # requantizing adds at most half an output step to the float-output error bound
    qp_in = quant.QParams('uint8', 0, 2.0)
    bound = ref.error_bound(f.weight.data().asnumpy(), x, qp_in,
                            q.weight_scale.data().asnumpy(), 'dense', bias_scale=True)
    out_step = float(quant.QParams(q.out_dtype, lo, float(yf.max())).scale)
    assert np.all(np.abs(got - yf) <= bound + 0.5 * out_step * (1 + 1e-5))


def test_dense_flatten_false_and_no_bias():
    f = _float_dense(6, 5, use_bias=False, flatten=False)
    x = _input((2, 3, 5), 'int8')
    q = qnn.QuantizedDense.from_float(f, in_range=(-2, 2))
    got = _check_layer(q, f, x, 'dense')
    assert got.shape == (2, 3, 6)
    assert 'bias' not in ref.layer_params(q)


CONV_CASES = [
    # nd, cin, cout, kernel, stride, pad, dilate, groups, spatial
    (2, 3, 8, 3, 1, 1, 1, 1, 9),
    (2, 4, 6, 3, 2, 0, 1, 1, 7),
    (2, 8, 8, 3, 1, 1, 1, 8, 6),        # depthwise
    (2, 6, 9, 1, 1, 0, 1, 3, 5),        # grouped 1x1
    (2, 5, 4, (3, 1), (2, 1), (1, 0), (2, 1), 1, 8),
    (2, 3, 16, 5, 3, 2, 1, 1, 11),
    (1, 5, 7, 3, 2, 1, 1, 1, 13),
    (1, 6, 6, 5, 1, 2, 2, 6, 10),
    (3, 3, 4, 3, 1, 1, 1, 1, 5),
    (3, 4, 4, 3, 2, 1, 1, 2, 6),
]


@pytest.mark.parametrize('case', CONV_CASES)
@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
@pytest.mark.parametrize('per_channel', [True, False])
def test_conv_matches_reference_and_bound(case, in_dtype, per_channel):
    nd, cin, cout, k, stride, pad, dilate, groups, sp = case
    f = _float_conv(nd, cin, cout, k, stride, pad, dilate, groups)
    batch = 1 if cin % 2 else 3
    x = _input((batch, cin) + (sp,) * nd, in_dtype)
    in_range = (0.0, 2.0) if in_dtype == 'uint8' else (-2.0, 2.0)
    cls = getattr(qnn, 'QuantizedConv%dD' % nd)
    q = cls.from_float(f, in_range=in_range, per_channel=per_channel)
    g = {'stride': f._kwargs['stride'], 'pad': f._kwargs['pad'],
         'dilate': f._kwargs['dilate'], 'groups': groups}
    got = _check_layer(q, f, x, 'conv', g)
    bound = ref.error_bound(f.weight.data().asnumpy(), x, quant.QParams(in_dtype, *in_range),
                            q.weight_scale.data().asnumpy(), 'conv', g, bias_scale=True)
    err = np.abs(got - f(mx.nd.array(x)).asnumpy())
    assert np.all(err <= bound), (err.max(), float(bound.min()))


@pytest.mark.parametrize('act', [None, 'relu'])
def test_conv_int8_out_and_dynamic(act):
    f = _float_conv(2, 4, 8, 3, 1, 1, 1, 1, act=act)
    x = _input((2, 4, 6, 6), 'int8')
    yf = f(mx.nd.array(x)).asnumpy()
    g = {'stride': (1, 1), 'pad': (1, 1), 'dilate': (1, 1), 'groups': 1}
    q = qnn.QuantizedConv2D.from_float(f, in_range=(-2, 2), out_range=(yf.min(), yf.max()),
                                       out_dtype='auto')
    _check_layer(q, f, x, 'conv', g)
    dyn = qnn.QuantizedConv2D.from_float(f)             # dynamic input range, float out
    assert not dyn.is_static and dyn.bias.dtype == np.float32
    _check_layer(dyn, f, x, 'conv', g)


def test_residual_fused_conv_matches_reference():
    """conv + residual add + relu in one int8 step (the ResNet block shape)."""
    f = _float_conv(2, 8, 8, 3, 1, 1, 1, 1)
    x = _input((2, 8, 5, 5), 'uint8')
    r = _input((2, 8, 5, 5), 'int8')
    qr = qnn.Quantize(in_range=(-2, 2))
    qr.initialize()
    rq = qr(mx.nd.array(r))
    yf = np.maximum(f(mx.nd.array(x)).asnumpy() + r, 0)
    q = qnn.QuantizedConv2D.from_float(f, in_range=(0, 2), out_range=(0, float(yf.max())),
                                       activation='relu', residual=True)
    out = q(mx.nd.array(x), rq)
    g = {'stride': (1, 1), 'pad': (1, 1), 'dilate': (1, 1), 'groups': 1}
    q_expect, qp = ref.layer_forward(q, x, 'conv', g,
                                     residual=(rq.data.asnumpy(), quant.QParams('int8', -2, 2)))
    np.testing.assert_array_equal(out.data.asnumpy(), q_expect)
    assert quant.sqnr_db(yf, quant.dequantize_np(q_expect, qp)) > 25


def test_saturation_clamps_out_of_range_inputs():
    f = _float_dense(4, 6)
    q = qnn.QuantizedDense.from_float(f, in_range=(0.0, 1.0))
    x = np.array([[5.0, -3.0, 0.5, 1.0, 100.0, 0.0]], np.float32)
    clamped = np.clip(x, 0.0, 1.0)
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(),
                               q(mx.nd.array(clamped)).asnumpy(), rtol=0, atol=0)
    qz = qnn.Quantize(in_range=(-1.0, 1.0))
    qz.initialize()
    qi = qz(mx.nd.array([[1e6, -1e6, 0.0]])).data.asnumpy()
    np.testing.assert_array_equal(qi, [[127, -128, 0]])        # saturates, never wraps


@pytest.mark.parametrize('values', [np.zeros((2, 5)), np.full((2, 5), 3.5),
                                    np.full((1, 5), -7.0), np.array([[0.25]])])
def test_constant_zero_and_single_element_inputs(values):
    x = values.astype(np.float32)
    f = _float_dense(3, x.shape[1])
    for q in (qnn.QuantizedDense.from_float(f),                          # dynamic range
              qnn.QuantizedDense.from_float(f, in_range=(0.0, 0.0), in_dtype='int8')):
        y = q(mx.nd.array(x)).asnumpy()
        assert np.all(np.isfinite(y))
    qs = qnn.Quantize()
    qs.initialize()
    qt = qs(mx.nd.array(x))
    assert np.all(np.isfinite(qnn.Dequantize()(qt).asnumpy()))
    np.testing.assert_allclose(qnn.Dequantize()(qt).asnumpy(), x,
                               atol=float(np.abs(x).max()) / 127 / 2 + 1e-7)


def test_ops_between_int8_layers_match_reference():
    a = RNG.uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
    b = RNG.uniform(0, 1, (2, 4, 6, 6)).astype(np.float32)
    qpa, qpb = quant.QParams('int8', -3, 3), quant.QParams('uint8', 0, 1)
    qa_blk, qb_blk = qnn.Quantize(in_range=(-3, 3)), qnn.Quantize(in_range=(0, 1))
    qa_blk.initialize()
    qb_blk.initialize()
    ta, tb = qa_blk(mx.nd.array(a)), qb_blk(mx.nd.array(b))
    ia, ib = quant.quantize_np(a, qpa), quant.quantize_np(b, qpb)
    np.testing.assert_array_equal(ta.data.asnumpy(), ia)
    np.testing.assert_array_equal(tb.data.asnumpy(), ib)
    # relu on int8 and on uint8
    np.testing.assert_array_equal(qnn.QuantizedActivation()(ta).data.asnumpy(),
                                  np.maximum(ia, 0))
    np.testing.assert_array_equal(qnn.QuantizedActivation(in_dtype='uint8')(tb).data.asnumpy(),
                                  ib)
    # max and average pooling
    mp = qnn.QuantizedMaxPool2D(pool_size=2)(ta).data.asnumpy()
    np.testing.assert_array_equal(mp, ia.reshape(2, 4, 3, 2, 3, 2).max(axis=(3, 5)))
    ap = qnn.QuantizedAvgPool2D(pool_size=3)(tb).data.asnumpy()
    expect = np.rint(ib.astype(np.float32).reshape(2, 4, 2, 3, 2, 3).sum(axis=(3, 5)) / 9)
    np.testing.assert_array_equal(ap, expect)
    gp = qnn.QuantizedGlobalAvgPool2D()(tb).data.asnumpy()
    np.testing.assert_array_equal(gp[..., 0, 0], np.rint(
        ib.astype(np.float32).sum(axis=(2, 3)) / np.float32(36)))
    np.testing.assert_array_equal(qnn.QuantizedFlatten()(ta).data.asnumpy(), ia.reshape(2, -1))
    # add with relu to a calibrated uint8 range
    add = qnn.QuantizedAdd(activation='relu', out_range=(0, 4))
    add.initialize()
    out = add(ta, tb)
    qpo = quant.QParams('uint8', 0, 4)
    inv_o = quant.inv_scale_np(0, 4, 'uint8')
    expect = quant.requantize_np(
        [(ia, inv_o / quant.inv_scale_np(-3, 3, 'int8')),
         (ib, inv_o / quant.inv_scale_np(0, 1, 'uint8'))], 'uint8', relu=True)
    np.testing.assert_array_equal(out.data.asnumpy(), expect)
    assert quant.sqnr_db(np.maximum(a + b, 0), quant.dequantize_np(expect, qpo)) > 30
    # concat: an input with the output's range passes unchanged
    cat = qnn.QuantizedConcat(out_range=(-3, 3))
    cat.initialize()
    c = cat(ta, tb).data.asnumpy()
    np.testing.assert_array_equal(c[:, :4], ia)
    inv_o = quant.inv_scale_np(-3, 3, 'int8')
    np.testing.assert_array_equal(c[:, 4:], quant.requantize_np(
        [(ib, inv_o / quant.inv_scale_np(0, 1, 'uint8'))], 'int8'))
