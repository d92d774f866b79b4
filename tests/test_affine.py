"""Affine (uint8 + zero point) activations: the arithmetic and the blocks against
tests/reference.py, the converter's choice of tensors, and every runtime on one network."""
import mxnet as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gluonq
from gluonq import nn as qnn
from gluonq import quant

import reference as ref
from test_properties import MAGNITUDES, _f32s, _seeds, conv_cases


def _lopsided(draw_lo, top):
    """An affine range [-lo, top] with lo a fraction of top (a hardswish-like tensor).

    A range that already has the form gluonq gives its affine ranges is kept as it is (so
    the spec round-trips) instead of re-derived; the rule is checked on the others."""
    lo, hi = -float(np.float32(draw_lo * top)), float(top)
    assume(not quant._is_affine_range(lo, hi))
    return lo, hi


# -- the arithmetic ---------------------------------------------------------------------------
@settings(max_examples=200)
@given(top=MAGNITUDES, frac=_f32s(1e-3, 4.0), seed=_seeds())
def test_affine_range_zero_point_and_quantize_follow_the_documented_rule(top, frac, seed):
    lo, hi = _lopsided(frac, top)
    qp = quant.QParams('uint8', lo, hi, 'affine')
    inv, z = ref.affine_qparams(lo, hi)
    assume(z > 0)                                       # z == 0 is a plain uint8 range
    assert qp.is_affine and qp.dtype == 'uint8' and qp.min < 0 <= qp.max
    assert qp.inv_scale == inv and qp.zero_point == z
    assert quant.QParams.from_dict(qp.to_dict()) == qp  # the spec round-trips
    x = np.random.RandomState(seed).uniform(1.2 * lo, 1.2 * hi, 300).astype(np.float32)
    np.testing.assert_array_equal(quant.quantize_np(x, qp), ref.affine_quantize(x, inv, z))
    blk = qnn.Quantize('uint8', (lo, hi), scheme='affine')
    blk.initialize()
    t = blk(mx.nd.array(x))
    np.testing.assert_array_equal(t.data.asnumpy(), ref.affine_quantize(x, inv, z))
    # a real 0 is exactly the zero point, and values in range come back within half a step
    np.testing.assert_array_equal(quant.quantize_np(np.zeros(1, np.float32), qp), [z])
    back = qnn.Dequantize('affine')(t).asnumpy().astype(np.float64)
    inside = (x >= qp.min) & (x <= qp.max)
    assert np.all(np.abs(back - x)[inside] <= 0.5 / float(inv) * (1 + 1e-5))


@settings(max_examples=100)
@given(top=MAGNITUDES, frac=_f32s(0.02, 0.5))
def test_affine_step_is_finer_than_symmetric_on_lopsided_ranges(top, frac):
    lo, hi = _lopsided(frac, top)
    aff = quant.QParams('uint8', lo, hi, 'affine')
    sym = quant.QParams('int8', lo, hi)
    # symmetric int8 spends 127 steps on [0, hi] and 128 on [-hi, 0]; affine spends all 255
    # on [lo, hi] (widened so that lo is a whole step): the step shrinks by
    # 255 * hi / (127 * span), span >= hi - lo (snapping aside)
    gain = float(sym.scale) / float(aff.scale)
    span = float(ref.affine_span(lo, hi))
    assert span >= (hi - lo) * (1 - 1e-6)
    assert gain == pytest.approx(255 * hi / (127 * span), rel=1e-3)
    assert gain > 1.3


# -- the blocks against the reference ---------------------------------------------------------
@settings(max_examples=80)
@given(case=conv_cases(), per_channel=st.booleans(), seed=_seeds(), top=MAGNITUDES,
       frac=_f32s(0.01, 3.0), bias=st.booleans())
def test_affine_conv_block_equals_the_reference(case, per_channel, seed, top, frac, bias):
    rng = np.random.RandomState(seed)
    nd, g = case['nd'], case['groups']
    lo, hi = _lopsided(frac, top)
    assume(ref.affine_qparams(lo, hi)[1] > 0)
    w = (rng.randn(case['cout'], case['cin'] // g, *case['k']) * rng.uniform(1e-3, 3)
         ).astype(np.float32)
    b = rng.uniform(-1, 1, case['cout']).astype(np.float32) * top if bias else None
    x = rng.uniform(1.2 * lo, 1.2 * hi, (case['batch'], case['cin']) + case['sp']).astype(
        np.float32)                                     # some inputs saturate
    q = getattr(qnn, 'QuantizedConv%dD' % nd)(
        case['cout'], case['k'], strides=case['stride'], padding=case['pad'],
        dilation=case['dilate'], groups=g, in_channels=case['cin'], use_bias=bias,
        in_dtype='uint8', in_range=(lo, hi), in_scheme='affine', per_channel=per_channel)
    q.initialize()
    q.set_float_params(w, b)
    geom = dict(stride=case['stride'], pad=case['pad'], dilate=case['dilate'], groups=g)
    expect = ref.affine_layer('conv', w, b, x, (lo, hi), per_channel, geom)
    tol = ref.FLOAT_RTOL * np.abs(expect).astype(np.float64)
    got = q(mx.nd.array(x)).asnumpy().astype(np.float64)
    assert np.all(np.abs(got - expect) <= tol)
    q.hybridize()
    np.testing.assert_array_equal(q(mx.nd.array(x)).asnumpy(), got.astype(np.float32))


@settings(max_examples=60)
@given(seed=_seeds(), batch=st.integers(1, 3), units=st.integers(1, 8),
       in_units=st.integers(1, 40), per_channel=st.booleans(), flatten=st.booleans(),
       top=MAGNITUDES, frac=_f32s(0.01, 3.0))
def test_affine_dense_block_equals_the_reference(seed, batch, units, in_units, per_channel,
                                                 flatten, top, frac):
    rng = np.random.RandomState(seed)
    lo, hi = _lopsided(frac, top)
    assume(ref.affine_qparams(lo, hi)[1] > 0)
    w = (rng.randn(units, in_units * (2 if flatten else 1)) * rng.uniform(1e-3, 3)).astype(
        np.float32)
    b = rng.uniform(-1, 1, units).astype(np.float32)
    x = rng.uniform(lo, hi, (batch, 2, in_units)).astype(np.float32)
    q = qnn.QuantizedDense(units, flatten=flatten, in_units=w.shape[1], in_dtype='uint8',
                           in_range=(lo, hi), in_scheme='affine', per_channel=per_channel)
    q.initialize()
    q.set_float_params(w, b)
    expect = ref.affine_layer('dense', w, b, x, (lo, hi), per_channel, flatten=flatten)
    got = q(mx.nd.array(x)).asnumpy().astype(np.float64)
    assert np.all(np.abs(got - expect) <= ref.FLOAT_RTOL * np.abs(expect))
    # fed the Quantize step's tensor instead of float: the same integers
    stub = qnn.Quantize('uint8', (lo, hi), scheme='affine')
    stub.initialize()
    np.testing.assert_array_equal(q(stub(mx.nd.array(x))).asnumpy(), got.astype(np.float32))


def test_affine_blocks_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="in_scheme 'affine' needs a calibrated in_range"):
        qnn.QuantizedDense(4, in_units=3, in_scheme='affine')
    with pytest.raises(ValueError, match='affine scheme holds uint8 tensors'):
        qnn.QuantizedDense(4, in_units=3, in_dtype='int8', in_range=(-1, 3),
                           in_scheme='affine')
    with pytest.raises(ValueError, match="scheme must be 'symmetric' or 'affine'"):
        qnn.Quantize('uint8', (-1, 3), scheme='asymmetric')
    with pytest.raises(ValueError, match='uint8 needs a range with min >= 0'):
        qnn.Quantize('uint8', (-1, 3))                  # affine is asked for, never implied
    stub = qnn.Quantize('uint8', (-1, 3), scheme='affine')
    stub.initialize()
    t = stub(mx.nd.ones((2, 3)))
    with pytest.raises(TypeError, match="the input is affine uint8, the block was built with "
                                        "scheme='symmetric'"):
        qnn.Dequantize()(t)


def test_affine_layer_without_bias_keeps_the_zero_point_term():
    """A bias-free layer still needs the int32 term ``-z * sum(q_w)``: it gets a bias."""
    rng = np.random.RandomState(0)
    w = rng.randn(3, 5).astype(np.float32)
    x = rng.uniform(-0.375, 6, (4, 5)).astype(np.float32)
    q = qnn.QuantizedDense(3, in_units=5, use_bias=False, in_dtype='uint8',
                           in_range=(-0.375, 6), in_scheme='affine')
    q.initialize()
    q.set_float_params(w)
    expect = ref.affine_layer('dense', w, None, x, (-0.375, 6))
    got = q(mx.nd.array(x)).asnumpy()
    assert np.all(np.abs(got - expect) <= ref.FLOAT_RTOL * np.abs(expect))
    assert 'zero_point=' in repr(q)


# -- the converter and every runtime ------------------------------------------------------------
class _HardSwish(mx.gluon.HybridBlock):
    def hybrid_forward(self, F, x):
        return x * F.clip(x + 3, 0, 6) / 6


class _HardSwishNet(mx.gluon.HybridBlock):
    """conv-bn-hardswish, depthwise (padded) -hardswish, pointwise-hardswish, pool, dense:
    every hardswish output is a lopsided float tensor read only by a layer."""

    def __init__(self):
        super().__init__()
        nn = mx.gluon.nn
        with self.name_scope():
            self.c0, self.bn = nn.Conv2D(16, 3, padding=1), nn.BatchNorm()
            self.dw = nn.Conv2D(16, 3, padding=1, groups=16)
            self.pw = nn.Conv2D(24, 1)
            self.hs = [_HardSwish() for _ in range(3)]
            for i, h in enumerate(self.hs):
                self.register_child(h, 'hs%d' % i)
            self.pool, self.fc = nn.GlobalAvgPool2D(), nn.Dense(10)

    def hybrid_forward(self, F, x):
        x = self.hs[0](self.bn(self.c0(x)))
        x = self.hs[2](self.pw(self.hs[1](self.dw(x))))
        return self.fc(self.pool(x))


@pytest.fixture(scope='module')
def hs_case():
    mx.random.seed(3)
    net = _HardSwishNet()
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(4).uniform(0, 1, (96, 3, 16, 16)).astype(np.float32)
    net(mx.nd.array(x[:2]))
    net.bn.running_mean.set_data(mx.nd.array(np.random.RandomState(5).randn(16) * 0.3))
    qnets = {s: gluonq.quantize_net(net, x[:32], act_scheme=s, progress=False)
             for s in ('symmetric', 'auto', 'affine')}
    return net, x[32:], qnets


def _affine_steps(qnet):
    return [s for s in qnet.spec['steps'] if s['config'].get('scheme') == 'affine']


def test_converter_holds_only_layer_inputs_affine(hs_case):
    net, x, qnets = hs_case
    assert not _affine_steps(qnets['symmetric'])
    steps = _affine_steps(qnets['affine'])
    assert len(steps) >= 3                              # the three hardswish outputs
    readers = {k: [s for s in qnets['affine'].spec['steps'] if k in s['inputs']]
               for st_ in steps for k in st_['outputs']}
    for k, rs in readers.items():
        assert rs and all(r['block'] in ('QuantizedConv2D', 'QuantizedDense') and
                          r['inputs'][0] == k and r['config']['in_scheme'] == 'affine'
                          for r in rs), (k, rs)
    assert qnets['affine'].spec['calibration']['act_scheme'] == 'affine'
    # the spec round-trips: load_quantized rebuilds the same affine ranges
    q2 = gluonq.QuantizedNet(qnets['affine'].spec)
    assert [s['config'] for s in _affine_steps(q2)] == [s['config'] for s in steps]


def test_auto_affine_tensors_are_held_closer_than_symmetric(hs_case):
    """Each tensor act_scheme='auto' holds affine is reproduced with a smaller mean squared
    error, on held-out inputs, than the symmetric network holds the same tensor."""
    net, x, qnets = hs_case
    steps = {s['inputs'][0]: s for s in qnets['symmetric'].spec['steps']
             if s['block'] == 'Quantize'}
    env = qnets['symmetric'].forward_all(mx.nd.array(x))
    picked = _affine_steps(qnets['auto'])
    assert picked
    for st_ in picked:
        t = env[st_['inputs'][0]].asnumpy()             # the float tensor, held-out inputs
        aff = quant.QParams('uint8', *st_['config']['in_range'], 'affine')
        sym_cfg = steps[st_['inputs'][0]]['config']
        sym = quant.QParams(sym_cfg['out_dtype'], *sym_cfg['in_range'])
        err = {k: np.mean((quant.dequantize_np(quant.quantize_np(t, qp), qp).astype(
            np.float64) - t) ** 2) for k, qp in (('affine', aff), ('symmetric', sym))}
        assert err['affine'] < err['symmetric'], (st_['name'], err)


@pytest.mark.onednn
def test_affine_fast_path_and_exports_give_the_reference_chain(hs_case, tmp_path):
    net, x, qnets = hs_case
    qnet = qnets['affine']
    eager = qnet(mx.nd.array(x)).asnumpy()
    tol = 1e-5 * np.abs(eager).max()
    kinds = [True] + ([False] if gluonq.lower.int8_kernels_exact() else [])
    for exact in kinds:            # the default fast path is exact only with VNNI
        qnet.hybridize(exact=exact)
        fast = qnet(mx.nd.array(x)).asnumpy()
        assert np.abs(fast - eager).max() <= tol, exact
    report = gluonq.lower.lower(qnet).report
    assert any(r['reason'].startswith('affine: zero point') for r in report)
    import onnxruntime as ort
    path = str(tmp_path / 'affine.onnx')
    gluonq.export_onnx(qnet, path, input_shape=(1,) + x.shape[1:])
    so = ort.SessionOptions()
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    sess = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    # float outputs from the same int32 accumulators: equal up to float32 rounding, unless
    # a rounding tie flips an integer of a later layer's input (none was seen; allowed
    # for at most 1% of the logits)
    far = np.abs(got - eager) > tol
    assert far.mean() <= 0.01, far.mean()
