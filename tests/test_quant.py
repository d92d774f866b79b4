"""The quantization math (gluonq.quant) and the MXNet 1.9.1 int8 quirks it works around."""
import mxnet as mx
import numpy as np
import pytest

from gluonq import lower, quant

import reference as ref


def test_qparams_conventions():
    qp = quant.QParams('auto', 0.0, 6.0)
    assert qp.dtype == 'uint8' and qp.min == 0.0 and qp.max == 6.0
    assert np.isclose(qp.scale, 6.0 / 255)
    qp = quant.QParams('auto', -1.0, 3.0)
    assert qp.dtype == 'int8' and (qp.min, qp.max) == (-3.0, 3.0)
    assert np.isclose(qp.scale, 3.0 / 127)
    zero = quant.QParams('auto', 0.0, 0.0)
    assert zero.scale > 0                                   # never divide by zero
    assert quant.QParams.from_dict(qp.to_dict()) == qp
    with pytest.raises(ValueError):
        quant.QParams('uint8', -1.0, 1.0)


def test_quantize_rounds_half_to_even_and_saturates():
    qp = quant.QParams('int8', -127, 127)                   # scale 1
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 300, -300], np.float32)
    np.testing.assert_array_equal(quant.quantize_np(x, qp), [0, 2, 2, 0, -2, 126, 127, -128])
    qp8 = quant.QParams('uint8', 0, 255)
    np.testing.assert_array_equal(quant.quantize_np(np.array([-1, 0.5, 1.5, 999.]), qp8),
                                  [0, 0, 2, 255])


@pytest.mark.parametrize('shape,per_channel', [((64, 32, 3, 3), True), ((16, 1, 3, 3), True),
                                               ((10, 20), True), ((10, 20), False),
                                               ((8, 4, 3, 3), False)])
def test_quantize_weight(shape, per_channel):
    w = np.random.RandomState(sum(shape)).randn(*shape).astype(np.float32)
    q, s = quant.quantize_weight(w, per_channel=per_channel)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    wc = w.reshape(shape[0], -1) if per_channel else w.reshape(1, -1)
    qc = q.reshape(wc.shape)
    assert np.all(np.abs(qc).max(axis=1) == 127)
    np.testing.assert_allclose(s, np.abs(wc).max(axis=1) / 127, rtol=3e-3)
    err = np.abs(qc * s[:, None] - wc)
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-6))
    if per_channel:
        # oneDNN's re-quantization of the float images (127.5 / max|img|, half to even)
        img = quant.fused_weight_image(q, s).reshape(wc.shape)
        inv = quant.weight_inv_scale_np(s)
        back = np.clip(np.rint((img * inv[:, None]).astype(np.float32)), -128, 127)
        np.testing.assert_array_equal(back, qc)


def test_quantize_weight_zero_channel():
    w = np.random.RandomState(2).randn(4, 6).astype(np.float32)
    w[2] = 0
    q, s = quant.quantize_weight(w)
    assert not q[2].any() and s[2] > 0


def test_quantize_bias_rounds_and_saturates():
    b = np.array([1.5, -2.5, 1e12, -1e12], np.float32)
    q = quant.quantize_bias(b, 1.0, np.ones(4, np.float32))
    np.testing.assert_array_equal(q, [2, -3, 2 ** 31 - 1, -(2 ** 31 - 1)])


def test_requantize_np_half_even_relu_and_residual():
    acc = np.array([[5, 7, -5, 1000]], np.int64)
    out = quant.requantize_np([(acc, np.float32(0.5))], 'int8')
    np.testing.assert_array_equal(out, [[2, 4, -2, 127]])
    out = quant.requantize_np([(acc, np.float32(0.5)), (np.array([[1, 1, 1, 1]]), 1.0)],
                              'uint8', relu=True)
    np.testing.assert_array_equal(out, [[4, 4, 0, 255]])


@pytest.mark.parametrize('nd,groups,stride,pad,dilate', [(2, 1, 1, 1, 1), (2, 4, 2, 0, 1),
                                                         (1, 1, 2, 1, 2), (3, 2, 1, 1, 1)])
def test_conv_np_matches_mxnet_convolution(nd, groups, stride, pad, dilate):
    rng = np.random.RandomState(nd * 10 + groups)
    x = rng.randn(2, 4, *(7,) * nd)
    w = rng.randn(8, 4 // groups, *(3,) * nd)
    got = quant.conv_np(x, w, stride, pad, dilate, groups)
    ref = mx.nd.Convolution(mx.nd.array(x, dtype='float64'), mx.nd.array(w, dtype='float64'),
                            kernel=(3,) * nd, stride=(stride,) * nd, pad=(pad,) * nd,
                            dilate=(dilate,) * nd, num_filter=8, num_group=groups,
                            no_bias=True).asnumpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_f_functions_match_numpy_bit_for_bit():
    lo, hi = mx.nd.array([-2.7]), mx.nd.array([2.7])
    inv = quant.inv_scale_f(mx.nd, lo, hi, 'int8').asnumpy()[0]
    assert inv == quant.inv_scale_np(-2.7, 2.7, 'int8')
    inv_auto = quant.inv_scale_f(mx.nd, mx.nd.zeros(1), hi, 'auto').asnumpy()[0]
    assert inv_auto == quant.inv_scale_np(0, 2.7, 'uint8')
    rng = np.random.RandomState(4)
    s_w = rng.rand(50).astype(np.float32) * 0.01 + 1e-4
    np.testing.assert_array_equal(quant.weight_inv_scale_f(mx.nd, mx.nd.array(s_w)).asnumpy(),
                                  quant.weight_inv_scale_np(s_w))
    y = (rng.randint(-400, 400, 2000) / 2.0).astype(np.float32)   # many exact ties
    got = quant.round_half_even_f(mx.nd, mx.nd.array(y)).asnumpy()
    np.testing.assert_array_equal(got, np.rint(y))
    acc = rng.randint(-2 ** 20, 2 ** 20, (3, 5)).astype(np.int32)
    m = (rng.rand(5).astype(np.float32) * 1e-3)
    got = quant.requantize_f(mx.nd, [(mx.nd.array(acc, dtype='int32'), mx.nd.array(m))],
                             'int8').asnumpy()
    np.testing.assert_array_equal(got, quant.requantize_np([(acc, m)], 'int8'))


@pytest.mark.parametrize('in_dtype', ['uint8', 'int8'])
@pytest.mark.parametrize('fan_in', [1, 9, 4608])
def test_accumulator_bound_is_the_largest_reachable_sum(in_dtype, fan_in):
    """The bound equals the largest |sum(q_x * q_w)| of the reference (int8 inputs reach
    -128), plus the bias."""
    lo, hi = ref.BOUNDS[in_dtype]
    qw = np.full((2, fan_in), 127)
    qw[1] = -127
    worst = max(int(np.abs(ref.dense_int(np.full((1, fan_in), v), qw)).max()) for v in (lo, hi))
    assert quant.accumulator_bound(fan_in, in_dtype) == worst
    assert quant.accumulator_bound(fan_in, in_dtype, bias_max=5) == worst + 5


# -- MXNet 1.9.1 behaviour that gluonq depends on or works around ------------------------
class TestMXNetQuirks:
    def test_int8_param_default_initializer_fails(self):
        p = mx.gluon.Parameter('w', shape=(2, 2), dtype='int8')
        with pytest.raises(mx.base.MXNetError, match='float16, float32, float64'):
            p.initialize(mx.init.Xavier())
            p.data().wait_to_read()

    def test_quantized_conv_limits(self):
        x = mx.nd.ones((1, 2, 5, 5), dtype='uint8')
        w = mx.nd.ones((2, 2, 3, 3), dtype='int8')
        r = [mx.nd.array([v]) for v in (0, 1, -1, 1)]
        kw = dict(kernel=(3, 3), num_filter=2, no_bias=True)
        with pytest.raises(mx.base.MXNetError, match='only supports uint8'):
            mx.nd.contrib.quantized_conv(x.astype('int8'), w, None, *r, **kw)[0].wait_to_read()
        with pytest.raises(mx.base.MXNetError, match='num_group=1'):
            mx.nd.contrib.quantized_conv(x, w[:, :1], None, *r, num_group=2,
                                         kernel=(3, 3), num_filter=2,
                                         no_bias=True)[0].wait_to_read()

    def test_quantized_conv_reports_a_wrong_range_for_uint8(self):
        x = mx.nd.full((1, 4, 3, 3), 255, dtype='uint8')
        w = mx.nd.full((4, 4, 3, 3), 127, dtype='int8')
        out, lo, hi = mx.nd.contrib.quantized_conv(
            x, w, None, mx.nd.array([0]), mx.nd.array([1.0]), mx.nd.array([-1.0]),
            mx.nd.array([1.0]), kernel=(3, 3), num_filter=4, no_bias=True)
        true_hi = (1.0 / 255) * (1.0 / 127) * 2 ** 31     # real value of int32 2**31
        assert hi.asscalar() / true_hi == pytest.approx(255 / 127 * 127.0 / 127, rel=0.02)

    @pytest.mark.parametrize('ic', [4, 8, 24])
    def test_quantized_conv_saturates_pairs_of_products_without_vnni(self, ic):
        """Why gluonq's reference conv does not use ``contrib.quantized_conv``: on CPUs
        without VNNI oneDNN adds pairs of u8*s8 products in int16 (``vpmaddubsw``), so
        255 * 127 * 2 saturates at 32767 and the int32 sum is wrong; with VNNI it is exact.
        The reference's model of this CPU kind predicts the result either way."""
        x = np.full((1, ic, 5, 5), 255)
        q = np.full((8, ic, 3, 3), 127)
        r = [mx.nd.array([v]) for v in (0, 1, -1, 1)]
        out = mx.nd.contrib.quantized_conv(mx.nd.array(x, dtype='uint8'),
                                           mx.nd.array(q, dtype='int8'), None, *r,
                                           kernel=(3, 3), pad=(1, 1), num_filter=8,
                                           no_bias=True)[0].asnumpy()
        vnni = lower.int8_kernels_exact()
        np.testing.assert_array_equal(out, ref.onednn_conv_ref(x.astype(np.uint8), q, 1, 1,
                                                               vnni=vnni))
        saturated = out.max() == 32767 * (ic * 9 // 2)            # every pair saturated
        assert saturated == (not vnni)
        assert (out.max() < ref.conv_int(x, q, 1, 1).max()) == (not vnni)

    def test_dequantize_uses_127_5(self):
        q = mx.nd.array([127], dtype='int8')
        out = mx.nd.contrib.dequantize(q, mx.nd.array([-1.0]), mx.nd.array([1.0])).asscalar()
        assert out == pytest.approx(127 / 127.5)              # not 1.0

    def test_rint_is_not_half_even_and_cast_wraps(self):
        np.testing.assert_array_equal(mx.nd.rint(mx.nd.array([0.5, 1.5, 2.5, -0.5])).asnumpy(),
                                      [0, 1, 2, -1])
        np.testing.assert_array_equal(mx.nd.round(mx.nd.array([0.5, 2.5])).asnumpy(), [1, 3])
        assert mx.nd.array([300.0]).astype('int8').asscalar() == 44      # wraps, no saturation

    def test_quantize_v2_uses_127_5_and_half_even(self):
        q = mx.nd.contrib.quantize_v2(mx.nd.array([1.0, 0.5 / 127.5, -1.0]), out_type='int8',
                                      min_calib_range=-1.0, max_calib_range=1.0)[0]
        np.testing.assert_array_equal(q.asnumpy(), [127, 0, -128])

    def test_quantized_act_mistypes_uint8(self):
        q = mx.nd.array([200], dtype='uint8')
        out = mx.nd.contrib.quantized_act(q, mx.nd.array([0.0]), mx.nd.array([1.0]),
                                          act_type='relu')[0]
        assert out.dtype == np.int8 and out.asscalar() == -56


def test_ranges_are_snapped_to_values_mxnet_can_express():
    """Every QParams range has a float32 MXNet range R with f32(Q'/R) == gluonq's f32(Q/M)."""
    rng = np.random.RandomState(5)
    for m in rng.rand(300) * 20:
        for dt in ('int8', 'uint8'):
            qp = quant.QParams(dt, -m if dt == 'int8' else 0.0, m)
            assert abs(qp.max / np.float32(m) - 1) < 1e-5
            inv = quant.inv_scale_np(qp.min, qp.max, dt)
            qm = np.float32(quant.MX_QRANGE[dt])
            r0 = np.array([np.float32(qm / inv)]).view(np.int32)[0]
            rs = np.arange(r0 - 2, r0 + 3, dtype=np.int32).view(np.float32)
            assert np.any((qm / rs).astype(np.float32) == inv)
            assert quant.QParams(dt, qp.min, qp.max) == qp            # idempotent
