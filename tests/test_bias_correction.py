"""Bias correction (``quantize_net(bias_correction=True)``): the mean int8 error per output
channel on the calibration data, against the float network, computed here in numpy from
the two networks' outputs; the corrected network's integers on the reference chain and the
fast path; and its effect on a shipped model, paired over held-out test images."""
import json
import os
import sys

import mxnet as mx
import numpy as np
from hypothesis import given, settings, strategies as st

import gluonq
from gluonq import debug, quant
from gluonq.convert.bias_correction import NUM_EXAMPLES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'examples'))
import mnist_models as M  # noqa: E402
from param_values import value  # noqa: E402


def _mlp(seed, in_units, hidden, out_units):
    """Dense-relu-Dense with non-centred inputs: rounding the weights shifts the means."""
    rng = np.random.RandomState(seed)
    net = mx.gluon.nn.HybridSequential(prefix='bcnet_')
    with net.name_scope():
        net.add(mx.gluon.nn.Dense(hidden, in_units=in_units, activation='relu'),
                mx.gluon.nn.Dense(out_units, in_units=hidden))
    net.initialize()
    for d in net:
        d.weight.set_data(mx.nd.array(rng.normal(0, 1, d.weight.shape)))
        d.bias.set_data(mx.nd.array(rng.normal(0, 0.1, d.bias.shape)))
    x = (rng.rand(160, in_units) + 0.5 * rng.rand(1, in_units)).astype(np.float32)
    return net, x


@given(st.integers(0, 2 ** 16), st.integers(4, 24), st.integers(2, 16), st.booleans())
@settings(max_examples=12, deadline=None)
def test_output_channel_means_are_corrected(seed, hidden, out_units, per_channel):
    """The last layer (float output) is corrected last, on the final upstream: afterwards
    its mean error per output channel on the calibration examples bias correction used is
    at most half an int32 bias step (plus float32 rounding)."""
    net, x = _mlp(seed, 12, hidden, out_units)
    y = net(mx.nd.array(x)).asnumpy().astype(np.float64)[:NUM_EXAMPLES]
    before = gluonq.quantize_net(net, x, per_channel=per_channel, progress=False)
    after = gluonq.quantize_net(net, x, per_channel=per_channel, bias_correction=True,
                                progress=False)
    err = {}
    for name, q in (('before', before), ('after', after)):
        err[name] = (q(mx.nd.array(x[:NUM_EXAMPLES])).asnumpy() - y).mean(axis=0)
    step = [s for s in after.spec['steps'] if s['block'] == 'QuantizedDense'][-1]
    s_in = quant.QParams(step['config']['in_dtype'], *step['config']['in_range']).scale
    s_w = value(after._children[step['name']].weight_scale).astype(np.float64)
    half_step = 0.5 * s_in * s_w
    tol = 1e-5 * np.abs(y).max()
    assert np.all(np.abs(err['after']) <= half_step + tol)
    assert np.abs(err['after']).sum() <= np.abs(err['before']).sum() + tol
    shifts = after.spec['calibration']['bias_correction']
    assert set(shifts) == {s['name'] for s in after.spec['steps']
                           if s['block'] == 'QuantizedDense'}
    assert 'bias_correction' not in before.spec['calibration']
    # the whole change is in the int32 bias, at the same scale
    b0 = value(before._children[step['name']].bias).astype(np.int64)
    b1 = value(after._children[step['name']].bias).astype(np.int64)
    assert after._children[step['name']].bias.dtype == np.int32
    np.testing.assert_allclose(shifts[step['name']], np.abs((b1 - b0) * s_in * s_w).max())
    for k in ('weight', 'weight_scale'):
        np.testing.assert_array_equal(value(getattr(before._children[step['name']], k)),
                                      value(getattr(after._children[step['name']], k)))


def test_corrected_net_reference_chain_equals_fast_path(tmp_path):
    """The corrected biases are ordinary int32 biases: the fast path (exact on both CPU
    kinds with exact=True) computes the reference chain's integers, and the checkpoint
    round trip keeps them."""
    net = M.pretrained('resnet20')
    x, _ = M.load('train', 64)
    q = gluonq.quantize_net(net, x, bias_correction=True, progress=False)
    assert max(v for v in q.spec['calibration']['bias_correction'].values()) > 0
    y_ref = q(mx.nd.array(x)).asnumpy()
    q.hybridize(exact=True)
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), y_ref, rtol=1e-5, atol=1e-5)
    prefix = str(tmp_path / 'bc')
    gluonq.save_quantized(q, prefix)
    with open(prefix + '.json') as f:
        assert json.load(f)['calibration']['bias_correction'] == \
            q.spec['calibration']['bias_correction']
    q2 = gluonq.load_quantized(prefix)
    np.testing.assert_array_equal(q2(mx.nd.array(x)).asnumpy(), y_ref)


def test_bias_correction_raises_logit_sqnr_on_held_out_images():
    """mobilenet0.25 (depthwise; measured +1.5 dB mean per image on 2000 test images):
    the per-image logit SQNR gain is positive by more than 3 standard errors, over 1000
    held-out test images, and bias correction shows per layer in gluonq.debug."""
    net = M.pretrained('mobilenet0.25')
    xc, _ = M.load('train', 256)
    xt, yt = M.test_set()
    xt, yt = xt[:1000], yt[:1000]
    _, lf = M.evaluate(net, xt, yt)
    qs = {'naive': gluonq.quantize_net(net, xc, bias_correction=False, progress=False),
          'naive + bias correction': gluonq.quantize_net(net, xc, bias_correction=True,
                                                         progress=False)}
    per_image = {}
    for label, q in qs.items():
        q.hybridize(exact=True)
        _, lq = M.evaluate(q, xt, yt)
        per_image[label] = np.array([quant.sqnr_db(lf[i], lq[i]) for i in range(len(lf))])
    gain = per_image['naive + bias correction'] - per_image['naive']
    assert gain.mean() - 3 * gain.std(ddof=1) / np.sqrt(len(gain)) > 0, gain.mean()
    rows = debug.compare_methods(net, qs, xc, num_examples=32)
    shifted = [r for r in rows if r['bias_shift']['naive + bias correction']]
    assert shifted and all(r['bias_shift']['naive'] is None for r in rows)
    assert 'bias shift' in debug.format_methods(rows)
