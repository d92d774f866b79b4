"""gluonq.nn layers against the independent numpy reference and against their float twins.

int8/uint8 outputs must equal the reference bit for bit; float outputs must lie within
``reference.FLOAT_RTOL`` (float32 rounding of the epilogue) of the exact value; both must
stay within the reference's error bound of the float twin.
"""
import itertools

import mxnet as mx
import numpy as np
import pytest

from gluonq import nn as qnn

import reference as ref
from param_values import value


def _float_dense(rng, units, in_units, act=None, use_bias=True, flatten=True):
    d = mx.gluon.nn.Dense(units, activation=act, use_bias=use_bias, flatten=flatten,
                          in_units=in_units)
    d.initialize(mx.init.Xavier(magnitude=3))
    if use_bias:
        d.bias.set_data(mx.nd.array(rng.uniform(-0.5, 0.5, units)))
    return d


def _float_conv(rng, nd, cin, cout, k, stride, pad, dilate, groups, act=None, use_bias=True):
    cls = {1: mx.gluon.nn.Conv1D, 2: mx.gluon.nn.Conv2D, 3: mx.gluon.nn.Conv3D}[nd]
    c = cls(cout, k, strides=stride, padding=pad, dilation=dilate, groups=groups,
            in_channels=cin, activation=act, use_bias=use_bias)
    c.initialize(mx.init.Xavier(magnitude=3))
    if use_bias:
        c.bias.set_data(mx.nd.array(rng.uniform(-0.5, 0.5, cout)))
    return c


def _params(f):
    """Float weight and bias of a float twin (what the reference starts from)."""
    return value(f.weight), None if f.bias is None else value(f.bias)


def _input(rng, shape, dtype, top=2.0):
    return rng.uniform(0 if dtype == 'uint8' else -top, top, shape).astype(np.float32)


def _run(qlayer, *args):
    """Eager and hybridized results of the block (they must be identical)."""
    out = qlayer(*args)
    qlayer.hybridize()
    out2 = qlayer(*args)
    qt, qt2 = qnn.as_qtensor(out), qnn.as_qtensor(out2)
    a = (qt.data if qt is not None else out).asnumpy()
    np.testing.assert_array_equal((qt2.data if qt2 is not None else out2).asnumpy(), a)
    return out


def _assert_float_close(got, expect, extra=0.0):
    """|got - expect| within float32 rounding of the epilogue (``extra``: magnitude of any
    float term added after it)."""
    tol = ref.FLOAT_RTOL * (np.abs(expect).astype(np.float64) + extra)
    err = np.abs(got.astype(np.float64) - expect)
    assert np.all(err <= tol), (float(err.max()), float((err / np.maximum(tol, 1e-45)).max()))


def _assert_int_equal(out, expect):
    q, dt, lo, hi = expect
    qt = qnn.as_qtensor(out)
    assert qt.data.dtype == np.dtype(dt)
    np.testing.assert_array_equal(qt.data.asnumpy(), q)
    assert (float(qt.min.asnumpy()[0]), float(qt.max.asnumpy()[0])) == (lo, hi)
    return ref.dequantize(q, dt, lo, hi)


def _assert_within_bound(got, yf, bound):
    err = np.abs(got.astype(np.float64) - yf)
    assert np.all(err <= bound), (float(err.max()), float((err / bound).max()))


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
    rng = np.random.RandomState(batch * 1000 + shape[1])
    units, in_units = shape
    f = _float_dense(rng, units, in_units)
    x = _input(rng, (batch, in_units), in_dtype)
    in_range = ((0.0, 2.0) if in_dtype == 'uint8' else (-2.0, 2.0)) if static else None
    q = qnn.QuantizedDense.from_float(f, in_range=in_range, in_dtype=in_dtype,
                                      per_channel=per_channel)
    got = _run(q, mx.nd.array(x)).asnumpy()
    w, b = _params(f)
    _assert_float_close(got, ref.layer('dense', w, b, x, in_dtype, in_range,
                                       per_channel=per_channel))
    bound = ref.error_bound('dense', w, x, in_dtype, in_range, per_channel)
    _assert_within_bound(got, f(mx.nd.array(x)).asnumpy(), bound)


@pytest.mark.parametrize('out_dtype,act', [('auto', None), ('int8', None), ('auto', 'relu'),
                                           ('uint8', 'relu')])
def test_dense_int8_out(out_dtype, act):
    rng = np.random.RandomState(7)
    f = _float_dense(rng, 10, 24, act=act)
    x = _input(rng, (4, 24), 'uint8')
    yf = f(mx.nd.array(x)).asnumpy()
    out_range = (0.0 if act else float(yf.min()), float(yf.max()))
    q = qnn.QuantizedDense.from_float(f, in_range=(0, 2.0), out_range=out_range,
                                      out_dtype=out_dtype)
    assert q.out_dtype == ('uint8' if act else 'int8')
    w, b = _params(f)
    expect = ref.layer('dense', w, b, x, 'auto', (0, 2.0), out_dtype, out_range,
                       relu=act == 'relu')
    got = _assert_int_equal(_run(q, mx.nd.array(x)), expect)
    # requantizing adds at most half an output step to the float-output bound
    step = expect[3] / ref.Q[expect[1]]
    bound = ref.error_bound('dense', w, x, 'auto', (0, 2.0)) + 0.5 * step * (1 + 1e-6)
    _assert_within_bound(got, yf, bound)


def test_dense_flatten_false_and_no_bias():
    rng = np.random.RandomState(8)
    f = _float_dense(rng, 6, 5, use_bias=False, flatten=False)
    x = _input(rng, (2, 3, 5), 'int8')
    q = qnn.QuantizedDense.from_float(f, in_range=(-2, 2))
    got = _run(q, mx.nd.array(x)).asnumpy()
    assert got.shape == (2, 3, 6) and q.bias is None
    w, _ = _params(f)
    _assert_float_close(got, ref.layer('dense', w, None, x, 'auto', (-2, 2), flatten=False))
    _assert_within_bound(got, f(mx.nd.array(x)).asnumpy(),
                         ref.error_bound('dense', w, x, 'auto', (-2, 2), flatten=False,
                                         bias=False))


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


def _geometry(nd, stride, pad, dilate, groups):
    tup = lambda v: (v,) * nd if np.isscalar(v) else tuple(v)      # noqa: E731
    return {'stride': tup(stride), 'pad': tup(pad), 'dilate': tup(dilate), 'groups': groups}


@pytest.mark.parametrize('case', CONV_CASES)
@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
@pytest.mark.parametrize('per_channel', [True, False])
def test_conv_matches_reference_and_bound(case, in_dtype, per_channel):
    nd, cin, cout, k, stride, pad, dilate, groups, sp = case
    rng = np.random.RandomState(CONV_CASES.index(case))
    f = _float_conv(rng, nd, cin, cout, k, stride, pad, dilate, groups)
    batch = 1 if cin % 2 else 3
    x = _input(rng, (batch, cin) + (sp,) * nd, in_dtype)
    in_range = (0.0, 2.0) if in_dtype == 'uint8' else (-2.0, 2.0)
    q = getattr(qnn, 'QuantizedConv%dD' % nd).from_float(f, in_range=in_range,
                                                         per_channel=per_channel)
    g = _geometry(nd, stride, pad, dilate, groups)
    got = _run(q, mx.nd.array(x)).asnumpy()
    w, b = _params(f)
    _assert_float_close(got, ref.layer('conv', w, b, x, in_dtype, in_range,
                                       per_channel=per_channel, geometry=g))
    bound = ref.error_bound('conv', w, x, in_dtype, in_range, per_channel, g)
    _assert_within_bound(got, f(mx.nd.array(x)).asnumpy(), bound)


@pytest.mark.parametrize('act', [None, 'relu'])
@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
def test_conv_int8_out_static_and_dynamic(act, in_dtype):
    rng = np.random.RandomState(11)
    f = _float_conv(rng, 2, 4, 8, 3, 1, 1, 1, 1, act=act)
    x = _input(rng, (2, 4, 6, 6), in_dtype)
    yf = f(mx.nd.array(x)).asnumpy()
    g = _geometry(2, 1, 1, 1, 1)
    w, b = _params(f)
    in_range = (0, 2) if in_dtype == 'uint8' else (-2, 2)
    out_range = (float(yf.min()), float(yf.max()))
    q = qnn.QuantizedConv2D.from_float(f, in_range=in_range, out_range=out_range,
                                       out_dtype='auto')
    expect = ref.layer('conv', w, b, x, in_dtype, in_range, 'auto', out_range,
                       relu=act == 'relu', geometry=g)
    got = _assert_int_equal(_run(q, mx.nd.array(x)), expect)
    step = expect[3] / ref.Q[expect[1]]
    _assert_within_bound(got, yf, ref.error_bound('conv', w, x, in_dtype, in_range,
                                                  geometry=g) + 0.5 * step * (1 + 1e-6))


@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
@pytest.mark.parametrize('seed', range(4))
def test_dynamic_mode_uses_the_unsnapped_batch_range(in_dtype, seed):
    """Dynamic layers take the range of each batch as it is (no snap: snapping only serves
    the fused kernels of calibrated layers) and quantize the float bias at that scale.

    The check is tight enough to tell a snapped range from an unsnapped one: with the
    range snapped the reference differs by more than FLOAT_RTOL on some outputs."""
    rng = np.random.RandomState(seed)
    f = _float_conv(rng, 2, 6, 8, 3, 1, 1, 1, 1)
    w, b = _params(f)
    g = _geometry(2, 1, 1, 1, 1)
    dyn = qnn.QuantizedConv2D.from_float(f, in_dtype=in_dtype)
    assert not dyn.is_static and dyn.bias.dtype == np.float32
    for top in rng.uniform(0.5, 3.0, 3):
        x = _input(rng, (2, 6, 5, 5), in_dtype, top)
        got = _run(dyn, mx.nd.array(x)).asnumpy()
        _assert_float_close(got, ref.layer('conv', w, b, x, in_dtype, None, geometry=g))
        _assert_within_bound(got, f(mx.nd.array(x)).asnumpy(),
                             ref.error_bound('conv', w, x, in_dtype, None, geometry=g))
    # int8 output with a dynamic output range: the float result quantized with its own range
    fd = _float_dense(rng, 5, 9)
    dyn_q = qnn.QuantizedDense.from_float(fd, in_dtype=in_dtype, out_dtype='int8')
    x = _input(rng, (3, 9), in_dtype)
    wd, bd = _params(fd)
    expect = ref.layer('dense', wd, bd, x, in_dtype, None, 'int8', None)
    q, dt, lo, hi = expect
    out = _run(dyn_q, mx.nd.array(x))
    qt = qnn.as_qtensor(out)
    assert qt.data.dtype == np.int8
    # the range is the max of a float32 result, which may differ from the reference's by
    # FLOAT_RTOL: compare the integers up to one step where the range moved
    got_hi = float(qt.max.asnumpy()[0])
    assert abs(got_hi - hi) <= ref.FLOAT_RTOL * hi
    diff = np.abs(qt.data.asnumpy().astype(np.int64) - q)
    assert diff.max() <= (0 if got_hi == hi else 1)


def test_residual_fused_conv_matches_reference():
    """conv + residual add + relu in one int8 step (the ResNet block shape)."""
    rng = np.random.RandomState(12)
    f = _float_conv(rng, 2, 8, 8, 3, 1, 1, 1, 1)
    x = _input(rng, (2, 8, 5, 5), 'uint8')
    r = _input(rng, (2, 8, 5, 5), 'int8')
    qr = qnn.Quantize(in_range=(-2, 2))
    qr.initialize()
    rq = qr(mx.nd.array(r))
    r_dt, r_lo, r_hi = ref.resolve_range('int8', -2, 2)
    np.testing.assert_array_equal(rq.data.asnumpy(), ref.quantize(r, r_dt, r_lo, r_hi))
    yf = np.maximum(f(mx.nd.array(x)).asnumpy() + r, 0)
    out_range = (0, float(yf.max()))
    q = qnn.QuantizedConv2D.from_float(f, in_range=(0, 2), out_range=out_range,
                                       activation='relu', residual=True)
    w, b = _params(f)
    expect = ref.layer('conv', w, b, x, 'uint8', (0, 2), 'auto', out_range, relu=True,
                       residual=rq.data.asnumpy(), residual_qp=(r_dt, r_lo, r_hi),
                       geometry=_geometry(2, 1, 1, 1, 1))
    got = _assert_int_equal(_run(q, mx.nd.array(x), rq), expect)
    # the residual's own rounding adds half a residual step to the bound
    bound = (ref.error_bound('conv', w, x, 'uint8', (0, 2), geometry=_geometry(2, 1, 1, 1, 1))
             + 0.5 * (r_hi / 127 + expect[3] / 255) * (1 + 1e-6))
    _assert_within_bound(got, yf, bound)


def test_residual_float_out_matches_reference():
    rng = np.random.RandomState(13)
    f = _float_dense(rng, 6, 10)
    x = _input(rng, (3, 10), 'int8')
    r = _input(rng, (3, 6), 'int8')
    q = qnn.QuantizedDense.from_float(f, in_range=(-2, 2), residual=True, activation='relu')
    got = _run(q, mx.nd.array(x), mx.nd.array(r)).asnumpy()
    w, b = _params(f)
    expect = ref.layer('dense', w, b, x, 'int8', (-2, 2), relu=True, residual=r)
    _assert_float_close(got, expect, extra=2 * np.abs(r))
    bound = ref.error_bound('dense', w, x, 'int8', (-2, 2))
    _assert_within_bound(got, np.maximum(f(mx.nd.array(x)).asnumpy() + r, 0), bound)


def test_saturation_clamps_out_of_range_inputs():
    rng = np.random.RandomState(14)
    f = _float_dense(rng, 4, 6)
    q = qnn.QuantizedDense.from_float(f, in_range=(0.0, 1.0))
    x = np.array([[5.0, -3.0, 0.5, 1.0, 100.0, 0.0]], np.float32)
    clamped = np.clip(x, 0.0, 1.0)
    np.testing.assert_array_equal(q(mx.nd.array(x)).asnumpy(), q(mx.nd.array(clamped)).asnumpy())
    qz = qnn.Quantize(in_range=(-1.0, 1.0))
    qz.initialize()
    qi = qz(mx.nd.array([[1e6, -1e6, 0.0]])).data.asnumpy()
    np.testing.assert_array_equal(qi, [[127, -128, 0]])        # saturates, never wraps


@pytest.mark.parametrize('values', [np.zeros((2, 5)), np.full((2, 5), 3.5),
                                    np.full((1, 5), -7.0), np.array([[0.25]])])
def test_constant_zero_and_single_element_inputs(values):
    rng = np.random.RandomState(15)
    x = values.astype(np.float32)
    f = _float_dense(rng, 3, x.shape[1])
    w, b = _params(f)
    yf = f(mx.nd.array(x)).asnumpy()
    for in_range in (None, (0.0, 0.0)):             # dynamic, and a zero calibrated range
        q = qnn.QuantizedDense.from_float(f, in_range=in_range, in_dtype='int8')
        got = q(mx.nd.array(x)).asnumpy()
        assert np.all(np.isfinite(got))
        _assert_float_close(got, ref.layer('dense', w, b, x, 'int8', in_range))
    qs = qnn.Quantize()
    qs.initialize()
    back = qnn.Dequantize()(qs(mx.nd.array(x))).asnumpy()
    np.testing.assert_allclose(back, x, rtol=0, atol=float(np.abs(x).max()) / 127 / 2 + 1e-7)


@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
def test_int32_bias_saturates_without_wrapping(in_dtype):
    """A bias far beyond int32 at ``s_x * s_w`` saturates with room for the largest
    accumulator, so ``sum + bias`` keeps its sign at the extremes of the input range."""
    rng = np.random.RandomState(17)
    f = _float_dense(rng, 4, 16)
    w, _ = _params(f)
    b = np.array([1e6, -1e6, 3e3, -3e3], np.float32)
    f.bias.set_data(mx.nd.array(b))
    in_range = (0.0, 1e-3) if in_dtype == 'uint8' else (-1e-3, 1e-3)
    q = qnn.QuantizedDense.from_float(f, in_range=in_range, in_dtype=in_dtype)
    qw, _ = ref.weight_q(w)
    for x in (np.full((1, 16), 1e-3, np.float32) * np.sign(qw[:1]),     # the largest sums
              -np.full((1, 16), 1e-3, np.float32) * np.sign(qw[:1]),
              np.full((1, 16), in_range[0], np.float32)):
        got = _run(q, mx.nd.array(x)).asnumpy()
        expect = ref.layer('dense', w, b, x, in_dtype, in_range)
        _assert_float_close(got, expect)
        assert np.all(np.sign(got[0, :2]) == np.sign(b[:2]))          # no wrap-around


def test_ops_between_int8_layers_match_reference():
    rng = np.random.RandomState(16)
    a = rng.uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
    b = rng.uniform(0, 1, (2, 4, 6, 6)).astype(np.float32)
    qpa, qpb = ref.resolve_range('int8', -3, 3), ref.resolve_range('uint8', 0, 1)
    qa_blk, qb_blk = qnn.Quantize(in_range=(-3, 3)), qnn.Quantize(in_range=(0, 1))
    qa_blk.initialize()
    qb_blk.initialize()
    ta, tb = qa_blk(mx.nd.array(a)), qb_blk(mx.nd.array(b))
    ia, ib = ref.quantize(a, *qpa), ref.quantize(b, *qpb)
    np.testing.assert_array_equal(ta.data.asnumpy(), ia)
    np.testing.assert_array_equal(tb.data.asnumpy(), ib)
    # relu on int8 and on uint8
    np.testing.assert_array_equal(qnn.QuantizedActivation()(ta).data.asnumpy(),
                                  np.maximum(ia, 0))
    np.testing.assert_array_equal(qnn.QuantizedActivation(in_dtype='uint8')(tb).data.asnumpy(),
                                  ib)
    # max and average pooling (average: float32 sum / count, half to even)
    mp = qnn.QuantizedMaxPool2D(pool_size=2)(ta).data.asnumpy()
    np.testing.assert_array_equal(mp, ia.reshape(2, 4, 3, 2, 3, 2).max(axis=(3, 5)))
    ap = qnn.QuantizedAvgPool2D(pool_size=3)(tb).data.asnumpy()
    np.testing.assert_array_equal(ap, np.rint(ib.reshape(2, 4, 2, 3, 2, 3).sum(axis=(3, 5))
                                              / 9.0))
    gp = qnn.QuantizedGlobalAvgPool2D()(tb).data.asnumpy()
    np.testing.assert_array_equal(gp[..., 0, 0], np.rint(ib.sum(axis=(2, 3)) / 36.0))
    np.testing.assert_array_equal(qnn.QuantizedFlatten()(ta).data.asnumpy(), ia.reshape(2, -1))
    # add with relu to a calibrated uint8 range: two float32 terms added in float32
    add = qnn.QuantizedAdd(activation='relu', out_range=(0, 4))
    add.initialize()
    out = add(ta, tb)
    qpo = ref.resolve_range('uint8', 0, 4)
    inv_o = ref.inv_scale('uint8', qpo[2])
    expect = ref.requantize(ia, inv_o / ref.inv_scale('int8', qpa[2]), 'uint8', relu=True,
                            residual=(ib, inv_o / ref.inv_scale('uint8', qpb[2])), fused=False)
    np.testing.assert_array_equal(out.data.asnumpy(), expect)
    err = np.abs(ref.dequantize(expect, *qpo) - np.maximum(a + b, 0))
    assert err.max() <= 0.5 * (qpa[2] / 127 + qpb[2] / 255 + qpo[2] / 255) * (1 + 1e-6)
    # concat: an input with the output's range passes unchanged, the other is requantized
    cat = qnn.QuantizedConcat(out_range=(-3, 3))
    cat.initialize()
    c = cat(ta, tb).data.asnumpy()
    np.testing.assert_array_equal(c[:, :4], ia)
    inv_o = ref.inv_scale('int8', qpa[2])
    np.testing.assert_array_equal(c[:, 4:], ref.requantize(
        ib, inv_o / ref.inv_scale('uint8', qpb[2]), 'int8'))


@pytest.mark.parametrize('groups,cin,nd', [(1, 80, 2), (2, 160, 2), (1, 40, 3), (4, 256, 1)])
def test_accumulators_beyond_2_24_are_exact(groups, cin, nd):
    """Partial sums past 2**24 (where float32 stops counting in ones): the block's int32
    accumulator must still be exact. The bias cancels most of each sum, so an error of one
    unit in the accumulator is a large relative error of the float output."""
    rng = np.random.RandomState(18 + groups)
    k = {1: 9, 2: 3, 3: 3}[nd]
    f = _float_conv(rng, nd, cin, 4, k, 1, 0, 1, groups)
    w = rng.uniform(0.9, 1.0, f.weight.shape).astype(np.float32)
    f.weight.set_data(mx.nd.array(w))
    x = rng.uniform(1.9, 2.0, (2, cin) + (k + 1,) * nd).astype(np.float32)
    g = _geometry(nd, 1, 0, 1, groups)
    # the exact accumulators (reference) and a bias that cancels their mean per channel
    dt, lo, hi = ref.resolve_range('uint8', 0, 2)
    qw, s_w = ref.weight_q(w)
    acc = ref.conv_int(ref.quantize(x, dt, lo, hi), qw, **{k_: g[k_] for k_ in g})
    assert acc.max() > 2 ** 24
    s_x = np.float64(np.float32(hi / 255))
    b = (-acc.mean(axis=tuple({0} | set(range(2, acc.ndim)))) * s_x * s_w).astype(np.float32)
    f.bias.set_data(mx.nd.array(b))
    q = getattr(qnn, 'QuantizedConv%dD' % nd).from_float(f, in_range=(0, 2))
    got = _run(q, mx.nd.array(x)).asnumpy()
    expect = ref.layer('conv', w, b, x, 'uint8', (0, 2), geometry=g)
    assert np.abs(expect).max() < 1e-3 * np.abs(acc * s_x * s_w[0]).max()
    _assert_float_close(got, expect)
