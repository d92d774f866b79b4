"""AdaRound (``quantize_net(weight_rounding='adaround')``): each learned integer is the floor
or the ceiling of ``w / s``, scales, +-127 elements and int32 biases stay, oneDNN re-derives
the integers from their fp32 image, and each layer's output MSE on its calibration input
(the int8 network's, captured here with forward hooks and recomputed in numpy from the float
weights) is no larger than with nearest rounding; the reference chain, the fast path and
the ONNX export still compute one network, also with a zero-point input."""
import json

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gluonq
from gluonq import cli

import mnist_models as M
import reference as ref
from test_affine import _HardSwishNet
from param_values import value

LAYERS = ('QuantizedConv2D', 'QuantizedDense')


def _net(seed, depthwise):
    """conv-relu, (depthwise or dense) strided conv-relu, dense: three layers whose rows
    (40 examples of 6x6) all fit in AdaRound's sample."""
    nn = mx.gluon.nn
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix='ada_')
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, padding=1, activation='relu'),
                nn.Conv2D(8, 3, strides=2, padding=1, groups=4 if depthwise else 1,
                          activation='relu'),
                nn.Dense(5))
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(seed).uniform(-1, 1, (40, 3, 6, 6)).astype(np.float32)
    net(mx.nd.array(x[:1]))
    return net, x


def _layer_steps(qnet):
    return [s for s in qnet.spec['steps'] if s['block'] in LAYERS]


def _real(t):
    """Real values of a layer's captured input (a QTensor, symmetric)."""
    lo, hi = (float(v.asscalar()) for v in t[1:])
    dtype = 'uint8' if lo >= 0 else 'int8'
    return ref.dequantize(t[0].asnumpy(), dtype, lo, hi).astype(np.float64)


def _layer_out(step, x, w, b):
    """float64 pre-activation output of a layer step on real input ``x``."""
    cfg = step['config']
    if step['block'] == 'QuantizedDense':
        y = x.reshape(len(x), -1) @ w.reshape(len(w), -1).T.astype(np.float64)
        return y + b
    y = ref._float_conv(x, w.astype(np.float64), dict(stride=cfg['strides'],
                                                      pad=cfg['padding'],
                                                      groups=cfg['groups']))
    return y + b.reshape(1, -1, 1, 1)


def _inputs(qnet, x):
    """Each layer step's input in ``qnet`` (eager), captured with forward hooks."""
    seen = {}
    for s in _layer_steps(qnet):
        qnet._children[s['name']].register_forward_hook(
            lambda blk, args, out, name=s['name']: seen.__setitem__(name, args[0]))
    qnet(mx.nd.array(x))
    return seen


def _weights(qnet, step):
    blk = qnet._children[step['name']]
    return (value(blk.weight).astype(np.int64),
            value(blk.weight_scale).astype(np.float64),
            value(blk.bias).astype(np.int64))


def _rederives(q, s):
    """oneDNN's fused kernels (README "CPUs with and without VNNI"): from the image ``q * s``
    with the first +127 (else -127) of each channel stored as ``+-f32(127.5 s)`` they
    re-derive ``rint(f32(image * f32(127.5 / max|image|)))``: the same integers?"""
    q = q.reshape(len(q), -1)
    s = np.broadcast_to(s.astype(np.float32), (len(q),))[:, None]
    img = (q.astype(np.float32) * s).astype(np.float32)
    for c in range(len(q)):
        k = np.flatnonzero(q[c] == 127)
        k = k if k.size else np.flatnonzero(q[c] == -127)
        img[c, k[0]] = np.sign(q[c, k[0]]) * np.float32(np.float32(127.5) * s[c, 0])
    inv = (np.float32(127.5) / np.abs(img).max(axis=1, keepdims=True)).astype(np.float32)
    return np.array_equal(np.clip(np.rint((img * inv).astype(np.float32)), -128, 127), q)


@given(seed=st.integers(0, 2 ** 16), depthwise=st.booleans())
@settings(max_examples=6, deadline=None)
def test_integers_are_floor_or_ceil_and_layer_mse_does_not_grow(seed, depthwise):
    net, x = _net(seed, depthwise)
    near = gluonq.quantize_net(net, x, progress=False)
    ada = gluonq.quantize_net(net, x, progress=False, weight_rounding='adaround',
                              adaround_iters=60)
    record = ada.spec['calibration']['weight_rounding']
    assert 'weight_rounding' not in near.spec['calibration']
    assert record['method'] == 'adaround' and record['iters'] == 60
    params = {k: value(v).astype(np.float64) for k, v in
              net.collect_params().items()}
    seen = _inputs(ada, x)
    for step in _layer_steps(ada):
        layer = step['node'][:-len('_fwd')]
        w, b = params[layer + '_weight'], params[layer + '_bias']
        qn, sn, bn = _weights(near, step)
        qa, sa, ba = _weights(ada, step)
        np.testing.assert_array_equal(sa, sn)                   # scales stay
        np.testing.assert_array_equal(ba, bn)                   # the int32 bias stays
        r = w / sa.reshape((-1,) + (1,) * (w.ndim - 1))
        assert np.all((qa == np.floor(r)) | (qa == np.ceil(r)))
        assert np.all(qa[np.abs(qn) == 127] == qn[np.abs(qn) == 127])
        assert (np.abs(qa.reshape(len(qa), -1)).max(axis=1) == 127).all()
        assert _rederives(qa, sa)
        # output MSE on the layer's int8 input in the adaround network, all rows
        xr = _real(seen[step['name']])
        s_in = float(ref.dequantize(1, step['config']['in_dtype'],
                                    *step['config']['in_range']))
        target = _layer_out(step, xr, w, b)
        mse = {}
        for k, (q, s, bq) in (('nearest', (qn, sn, bn)), ('adaround', (qa, sa, ba))):
            wq = q * s.reshape((-1,) + (1,) * (q.ndim - 1))
            mse[k] = np.mean((_layer_out(step, xr, wq, bq * s_in * s) - target) ** 2)
        rec = record['layers'][step['name']]
        assert rec['rows'] == target.size // target.shape[1]
        assert rec['mse_nearest'] == pytest.approx(mse['nearest'], rel=1e-4)
        assert rec['mse'] == pytest.approx(mse['adaround'], rel=1e-4)
        assert mse['adaround'] <= mse['nearest'] * (1 + 1e-6)
        assert rec['changed'] == pytest.approx(np.mean(qa != qn))
    assert any(v['changed'] > 0 for v in record['layers'].values())


@pytest.fixture(scope='module')
def hs_affine():
    mx.random.seed(3)
    net = _HardSwishNet()
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(4).uniform(0, 1, (64, 3, 16, 16)).astype(np.float32)
    net(mx.nd.array(x[:2]))
    kw = dict(act_scheme='affine', progress=False)
    return (x, gluonq.quantize_net(net, x[:32], **kw),
            gluonq.quantize_net(net, x[:32], weight_rounding='adaround', adaround_iters=40,
                                **kw))


def test_zero_point_layers_refold_the_same_int32_bias(hs_affine):
    """For a layer with a zero-point input the stored bias is ``b_q - z * sum(q_w)``: the
    unfolded int32 bias stays, the folded term follows the new integers."""
    _, near, ada = hs_affine
    affine = [s for s in _layer_steps(ada) if ada._children[s['name']].in_zero_point]
    assert affine
    changed = 0
    for step in affine:
        z = ada._children[step['name']].in_zero_point
        qn, _, bn = _weights(near, step)
        qa, _, ba = _weights(ada, step)
        unfold = {k: b + z * q.reshape(len(q), -1).sum(axis=1)
                  for k, q, b in (('n', qn, bn), ('a', qa, ba))}
        np.testing.assert_array_equal(unfold['a'], unfold['n'])
        changed += int((qa != qn).sum())
    assert changed > 0


@pytest.mark.onednn
def test_fast_path_and_onnx_compute_the_reference_chain(hs_affine, tmp_path):
    x, _, qnet = hs_affine
    x = x[32:]
    eager = qnet(mx.nd.array(x)).asnumpy()
    tol = 1e-5 * np.abs(eager).max()
    qnet.hybridize(exact=True)
    assert np.abs(qnet(mx.nd.array(x)).asnumpy() - eager).max() <= tol
    import onnxruntime as ort
    path = str(tmp_path / 'ada.onnx')
    gluonq.export_onnx(qnet, path, input_shape=(1,) + x.shape[1:])
    so = ort.SessionOptions()
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    sess = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    # as in test_affine: equal up to float32 rounding but for rare rounding ties
    assert (np.abs(got - eager) > tol).mean() <= 0.01


def test_residual_net_fast_path_and_checkpoint(tmp_path):
    """resnet20 (fused residual adds): the hybridized net gives the eager integers, and the
    record survives save/load."""
    net = M.pretrained('resnet20')
    x, _ = M.load('train', 48)
    q = gluonq.quantize_net(net, x, progress=False, weight_rounding='adaround',
                            adaround_iters=20)
    eager = q(mx.nd.array(x)).asnumpy()
    q.hybridize(exact=True)
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), eager, rtol=1e-5, atol=1e-5)
    prefix = str(tmp_path / 'ada')
    gluonq.save_quantized(q, prefix)
    with open(prefix + '.json') as f:
        assert json.load(f)['calibration']['weight_rounding'] == \
            q.spec['calibration']['weight_rounding']
    np.testing.assert_array_equal(gluonq.load_quantized(prefix)(mx.nd.array(x)).asnumpy(),
                                  eager)


@pytest.mark.parametrize('kw, pattern', [
    ({'weight_rounding': 'up'}, "weight_rounding must be 'nearest' or 'adaround', got 'up'"),
    ({'weight_rounding': 'adaround', 'adaround_iters': 0}, 'adaround_iters must be a '
                                                           'positive int, got 0'),
    ({'adaround_iters': 2.5}, 'adaround_iters must be a positive int, got 2.5'),
    ({'adaround_iters': True}, 'adaround_iters must be a positive int, got True'),
])
def test_bad_arguments_name_the_parameter(kw, pattern):
    net, x = _net(0, False)
    with pytest.raises(ValueError, match=pattern):
        gluonq.quantize_net(net, x, progress=False, **kw)


def test_cli_weight_rounding(tmp_path, capsys):
    net = M.build('tiny')
    net.initialize(mx.init.Xavier())
    x, _ = M.load('train', 16)
    net(mx.nd.array(x[:1]))
    net.save_parameters(str(tmp_path / 'tiny.params'))
    np.savez(str(tmp_path / 'calib.npz'), x=x)
    argv = ['--factory', 'mnist_models:build', '--model-kwargs', '{"name": "tiny"}',
            '--params', str(tmp_path / 'tiny.params'), '--calib', str(tmp_path / 'calib.npz'),
            '--out', str(tmp_path / 'q'), '--quiet']
    assert cli.main(argv + ['--weight-rounding', 'adaround']) == 0
    with open(str(tmp_path / 'q.json')) as f:
        assert json.load(f)['calibration']['weight_rounding']['method'] == 'adaround'
    with pytest.raises(SystemExit):
        cli.main(argv + ['--weight-rounding', 'up'])
    assert '--weight-rounding' in capsys.readouterr().err
