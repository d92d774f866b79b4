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
    """An affine range [-lo, top] with lo a fraction of top (a hardswish-like tensor)."""
    return -float(np.float32(draw_lo * top)), float(top)


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
    # on [lo, hi]: the step shrinks by 255 * hi / (127 * (hi - lo)) (snapping aside)
    gain = float(sym.scale) / float(aff.scale)
    assert gain == pytest.approx(255 * hi / (127 * (hi - lo)), rel=1e-3)
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
