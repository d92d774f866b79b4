"""The converter on graphs as ONNX exporters and importers write them: biases and scales as
constant arithmetic after a bias-free conv, reshaped constants, hardswish / hardsigmoid
spelled out in scalar ops, squeeze-excite gates; and the converter's own spec check."""
import json

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from mxnet.gluon import HybridBlock, nn

import gluonq
from gluonq import lower, quant
from gluonq.convert import trace_and_fold
from gluonq.convert.graph import trace
from param_values import value


def _hswish(F, x):
    return F.elemwise_mul(x, F.clip(x + 3, 0, 6)) / 6


class SENet(HybridBlock):
    """A MobileNetV3-like block as paddle2onnx writes it: every bias a broadcast_add of a
    parameter ((1, C, 1, 1), (C, 1, 1) or reshaped (C,)), hardswish as x * clip(x + 3, 0, 6)
    / 6, a squeeze-excite gate with hardsigmoid clip(0.2 x + 0.5, 0, 1), a scale-and-shift
    (BatchNorm as mul/add) and a dense bias as broadcast_add."""

    def __init__(self, hard_sigmoid_op=False, **kw):
        super().__init__(**kw)
        self._hs_op = hard_sigmoid_op
        u = mx.init.Uniform(0.5)
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1, use_bias=False, in_channels=3)
            self.stem_b = self.params.get('stem_b', shape=(1, 8, 1, 1), init=u)
            self.dw = nn.Conv2D(8, 3, padding=1, groups=8, use_bias=False, in_channels=8)
            self.dw_b = self.params.get('dw_b', shape=(8, 1, 1), init=u)
            self.se1 = nn.Conv2D(4, 1, use_bias=False, in_channels=8)
            self.se1_b = self.params.get('se1_b', shape=(4,), init=u)
            self.se2 = nn.Conv2D(8, 1, use_bias=False, in_channels=4)
            self.se2_b = self.params.get('se2_b', shape=(1, 8, 1, 1), init=u)
            self.pw = nn.Conv2D(16, 1, use_bias=False, in_channels=8)
            self.pw_s = self.params.get('pw_s', shape=(1, 16, 1, 1), init=mx.init.Uniform(1.0))
            self.pw_b = self.params.get('pw_b', shape=(1, 16, 1, 1), init=u)
            self.fc = nn.Dense(10, use_bias=False, in_units=16)
            self.fc_b = self.params.get('fc_b', shape=(10,), init=u)

    def hybrid_forward(self, F, x, stem_b, dw_b, se1_b, se2_b, pw_s, pw_b, fc_b):
        x = _hswish(F, F.broadcast_add(self.stem(x), stem_b))
        x = _hswish(F, F.broadcast_add(self.dw(x), dw_b))
        s = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg')
        s = F.relu(F.broadcast_add(self.se1(s), F.reshape(se1_b, (1, -1, 1, 1))))
        s = F.broadcast_add(self.se2(s), se2_b)
        s = F.hard_sigmoid(s, alpha=0.2, beta=0.5) if self._hs_op else \
            F.clip(s * 0.2 + 0.5, 0, 1)
        x = F.broadcast_mul(x, s)
        x = F.relu(F.broadcast_add(F.broadcast_mul(self.pw(x), pw_s), pw_b))
        x = F.flatten(F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg'))
        return F.broadcast_add(self.fc(x), fc_b)


def _images(seed, n=24, c=3, size=16):
    """Smooth random images in [0, 1] (low-frequency fields plus a little noise)."""
    rng = np.random.RandomState(seed)
    low = rng.rand(n, c, 4, 4).astype(np.float32)
    x = np.kron(low, np.ones((1, 1, size // 4, size // 4), np.float32))
    return np.clip(x + 0.1 * rng.randn(*x.shape).astype(np.float32), 0, 1)


def _as_symbolblock(net, x, tmp_path, name):
    """``net`` exported and loaded back with SymbolBlock.imports (as imported models are)."""
    net.hybridize()
    net(mx.nd.array(x[:1]))
    prefix = str(tmp_path / name)
    net.export(prefix)
    return mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'],
                                        prefix + '-0000.params')


def _outputs_all_modes(q, x):
    """Outputs of ``q`` eager, hybridize(fast=False) and (fast) hybridize(); on a CPU
    without VNNI the fast path with ``exact=True`` (the default there runs oneDNN's
    saturating int16 pair sums, checked against a model of them in test_lower.py)."""
    outs = {'eager': q(mx.nd.array(x)).asnumpy()}
    q.hybridize(fast=False)
    outs['reference chain'] = q(mx.nd.array(x)).asnumpy()
    q.hybridize(exact=not lower.int8_kernels_exact())
    outs['fast'] = q(mx.nd.array(x)).asnumpy()
    return outs


def _se_net(seed=0, **kw):
    mx.random.seed(seed)
    net = SENet(**kw)
    net.initialize(mx.init.Xavier(magnitude=2))
    return net


# measured: 50.0-61.0 dB on this net (seeds 0-2, every calib_mode, eager / reference chain /
# fast, calibration and held-out images alike); the bar leaves 10 dB
SE_SQNR_DB = 40


@pytest.mark.parametrize('form', ['hybridblock', 'symbolblock', 'hard_sigmoid op'])
def test_se_net_converts_and_runs_in_every_form(form, tmp_path):
    net = _se_net(hard_sigmoid_op=form == 'hard_sigmoid op')
    x = _images(1)
    y = net(mx.nd.array(x)).asnumpy()
    if form != 'hybridblock':
        net = _as_symbolblock(net, x, tmp_path, 'se')
    q = gluonq.quantize_net(net, x, progress=False)
    # no Quantize step reads a constant; every parameter was folded into a layer
    params = set(trace(net, [(1,) + x.shape[1:]]).params)
    for step in q.spec['steps']:
        assert not (step['block'] == 'Quantize' and step['inputs'][0] in params), step
    folded = [r for r in q.report if r['kind'] == 'folded']
    assert sum(r['op'] == 'broadcast_add' and 'folded into the bias' in r['reason']
               for r in folded) == 6
    assert any(r['op'] == 'broadcast_mul' and 'weight and bias' in r['reason'] for r in folded)
    assert any(r['op'] == 'Reshape' and 'evaluated once' in r['reason'] for r in folded)
    assert sum(r['kind'].startswith('int8 conv') for r in q.report) == 5
    # each hardswish (4 ops as written) runs as x * hard_sigmoid(x): 2 float ops
    assert sum('hardswish' in r['reason'] for r in q.report if r['kind'] == 'float') == 4
    assert sum('rewritten as hard_sigmoid and broadcast_mul' in r['reason']
               for r in folded) == 8
    assert any(r['op'] == 'broadcast_mul' and 'squeeze-excite' in r['reason']
               for r in q.report)
    for mode, yq in _outputs_all_modes(q, x).items():
        assert yq.shape == y.shape
        assert quant.sqnr_db(y, yq) >= SE_SQNR_DB, mode


def test_se_net_exports_to_onnx(tmp_path):
    """The float steps these graphs keep (hardswish, gates, clips) export with the int8 ones:
    onnxruntime's result is as close to fp32 as gluonq's (measured 54.5 dB)."""
    ort = pytest.importorskip('onnxruntime')
    net = _se_net()
    x = _images(6)
    q = gluonq.quantize_net(net, x, progress=False)
    path = str(tmp_path / 'se.onnx')
    gluonq.export_onnx(q, path)
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    yo = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert quant.sqnr_db(net(mx.nd.array(x)).asnumpy(), yo) >= SE_SQNR_DB


@pytest.mark.parametrize('calib_mode', ['entropy', 'percentile', 'mse'])
def test_se_net_every_calib_mode(calib_mode):
    net = _se_net()
    x = _images(2)
    q = gluonq.quantize_net(net, x, calib_mode=calib_mode, progress=False)
    y = net(mx.nd.array(x)).asnumpy()
    for mode, yq in _outputs_all_modes(q, x).items():
        assert quant.sqnr_db(y, yq) >= SE_SQNR_DB, mode


class BiasAsAdd(HybridBlock):
    """conv (no bias) + broadcast_add of a (1, C, 1, 1) parameter, relu, dense; or the same
    with the bias inside the conv (``conv_bias=True``)."""

    def __init__(self, conv_bias, **kw):
        super().__init__(**kw)
        self._conv_bias = conv_bias
        with self.name_scope():
            self.conv = nn.Conv2D(6, 3, padding=1, use_bias=conv_bias, in_channels=3)
            self.b = self.params.get('b', shape=(1, 6, 1, 1), init=mx.init.Zero())
            self.conv2 = nn.Conv2D(6, 3, in_channels=6)
            self.fc = nn.Dense(5, in_units=6 * 14 * 14)

    def hybrid_forward(self, F, x, b):
        y = self.conv(x)
        if not self._conv_bias:
            y = F.broadcast_add(y, b)
        return self.fc(F.relu(self.conv2(F.relu(y))))


def test_folded_bias_add_is_bit_identical_to_a_conv_bias():
    x = _images(3)
    bias = np.random.RandomState(3).randn(6).astype(np.float32)
    nets = []
    for conv_bias in (False, True):
        mx.random.seed(5)
        net = BiasAsAdd(conv_bias)
        net.initialize(mx.init.Xavier(magnitude=2))
        net(mx.nd.array(x[:1]))
        nets.append(net)
    nets[1].conv.weight.set_data(nets[0].conv.weight.data())
    for name in ('conv2', 'fc'):
        for pa, pb in zip(getattr(nets[0], name).collect_params().values(),
                          getattr(nets[1], name).collect_params().values()):
            pb.set_data(pa.data())
    nets[0].b.set_data(mx.nd.array(bias.reshape(1, 6, 1, 1)))
    nets[1].conv.bias.set_data(mx.nd.array(bias))
    qs = [gluonq.quantize_net(n, x, progress=False) for n in nets]
    assert list(qs[0].qparams.values()) == list(qs[1].qparams.values())   # names differ
    outs = [_outputs_all_modes(q, x) for q in qs]
    for mode in outs[0]:
        np.testing.assert_array_equal(outs[0][mode], outs[1][mode], err_msg=mode)


OPS = {  # name -> (how the net applies the constant c to the conv output y)
    'broadcast_add': lambda F, y, c: F.broadcast_add(y, c),
    'broadcast_add, constant first': lambda F, y, c: F.broadcast_add(c, y),
    'broadcast_sub': lambda F, y, c: F.broadcast_sub(y, c),
    'broadcast_sub, constant first': lambda F, y, c: F.broadcast_sub(c, y),
    'broadcast_mul': lambda F, y, c: F.broadcast_mul(y, c),
    'broadcast_div': lambda F, y, c: F.broadcast_div(y, c),
}
SCALAR_OPS = {
    '_plus_scalar': lambda F, y, s: y + s, '_minus_scalar': lambda F, y, s: y - s,
    '_rminus_scalar': lambda F, y, s: s - y, '_mul_scalar': lambda F, y, s: y * s,
    '_div_scalar': lambda F, y, s: y / s,
}


class ConstAfterLayer(HybridBlock):
    """conv or dense, then ``op(y, constant)``; the constant is a parameter of ``shape``
    (reshaped to ``view`` in the graph) or a scalar."""

    def __init__(self, layer, op, shape, view=None, scalar=None, **kw):
        super().__init__(**kw)
        self._op, self._view, self._scalar = op, view, scalar
        with self.name_scope():
            self.layer = nn.Conv2D(4, 3, padding=1, in_channels=2) if layer == 'conv' else \
                nn.Dense(4, in_units=2 * 5 * 5)
            self.c = self.params.get('c', shape=shape, init=mx.init.Zero())

    def hybrid_forward(self, F, x, c):
        y = self.layer(x)
        if self._scalar is not None:
            return SCALAR_OPS[self._op](F, y, self._scalar)
        return OPS[self._op](F, y, F.reshape(c, self._view) if self._view else c)


def _folded_float_block(graph):
    block = mx.gluon.SymbolBlock(graph.to_symbol(), [mx.sym.var('data')])
    for name, p in block.collect_params().items():
        p.shape = graph.params[name].shape
        p.initialize(mx.init.Constant(0))
        p.set_data(mx.nd.array(graph.params[name]))
    return block


@settings(max_examples=30, deadline=None)
@given(layer=st.sampled_from(['conv', 'dense']), op=st.sampled_from(sorted(OPS)),
       form=st.sampled_from(['per channel', 'reshaped', 'scalar', 'scalar op']),
       seed=st.integers(0, 2 ** 16))
def test_fold_arithmetic_matches_the_float_network(layer, op, form, seed):
    """Property: folding a per-channel/scalar constant into the layer changes its output by
    float32 rounding only, for every op, operand order and constant shape."""
    rng = np.random.RandomState(seed)
    chan = (1, 4, 1, 1) if layer == 'conv' else (1, 4)
    if form == 'scalar op':
        sop = {'broadcast_add': '_plus_scalar', 'broadcast_sub': '_minus_scalar',
               'broadcast_sub, constant first': '_rminus_scalar',
               'broadcast_mul': '_mul_scalar', 'broadcast_div': '_div_scalar'}.get(op)
        if sop is None:
            return
        scalar = float(rng.uniform(0.5, 2.0) * rng.choice([-1, 1]))
        net = ConstAfterLayer(layer, sop, (1,), scalar=scalar)
    elif form == 'reshaped':
        net = ConstAfterLayer(layer, op, (4,), view=chan)
    else:
        net = ConstAfterLayer(layer, op, (1,) if form == 'scalar' else chan)
    net.initialize(mx.init.Xavier())
    x = rng.randn(3, 2, 5, 5).astype(np.float32)
    net(mx.nd.array(x))
    c = rng.uniform(0.5, 2.0, net.c.shape) * rng.choice([-1, 1], net.c.shape)
    net.c.set_data(mx.nd.array(c))
    graph = trace_and_fold(net, (1, 2, 5, 5))
    assert [n.op for n in graph.op_nodes()] == [
        'Convolution' if layer == 'conv' else 'FullyConnected']
    y = net(mx.nd.array(x)).asnumpy()
    yf = _folded_float_block(graph)(mx.nd.array(x)).asnumpy()
    # the folded weight and bias are float32 roundings of exact float64 products
    np.testing.assert_allclose(yf, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


class SharedBiasBN(HybridBlock):
    """Two convolutions with their own weights and one shared bias parameter, each followed
    by a BatchNorm: neither BatchNorm can fold into its convolution's bias."""

    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.w1 = self.params.get('w1', shape=(4, 2, 3, 3))
            self.w2 = self.params.get('w2', shape=(4, 2, 3, 3))
            self.b = self.params.get('b', shape=(4,), init='zeros')
            self.bn1, self.bn2 = nn.BatchNorm(in_channels=4), nn.BatchNorm(in_channels=4)

    def hybrid_forward(self, F, x, w1, w2, b):
        conv = dict(kernel=(3, 3), num_filter=4, pad=(1, 1))
        return self.bn1(F.Convolution(x, w1, b, **conv)) + \
            self.bn2(F.Convolution(x, w2, b, **conv))


def test_batchnorm_after_a_layer_with_a_shared_bias_leaves_the_layer_unchanged():
    rng = np.random.RandomState(0)
    net = SharedBiasBN()
    net.initialize(mx.init.Xavier())
    for bn in (net.bn1, net.bn2):
        bn.gamma.set_data(mx.nd.array(rng.uniform(0.5, 2.0, 4)))
        bn.running_mean.set_data(mx.nd.array(rng.randn(4)))
        bn.running_var.set_data(mx.nd.array(rng.uniform(0.5, 2.0, 4)))
    net.b.set_data(mx.nd.array(rng.randn(4)))
    x = rng.randn(3, 2, 5, 5).astype(np.float32)
    graph = trace_and_fold(net, (1, 2, 5, 5))
    # each BatchNorm is still its own op (a depthwise 1x1 convolution)
    assert [n.op for n in graph.op_nodes()].count('Convolution') == 4
    y = net(mx.nd.array(x)).asnumpy()
    yf = _folded_float_block(graph)(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(yf, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


@pytest.mark.parametrize('case', ['spatial constant', 'two readers', 'constant / output',
                                  'after pooling'])
def test_unfoldable_constant_stays_float_with_a_reason(case):
    class Net(HybridBlock):
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                # a bias of 5 keeps the output away from 0 ('constant / output')
                self.conv = nn.Conv2D(4, 3, padding=1, in_channels=2,
                                      bias_initializer=mx.init.Constant(5))
                self.c = self.params.get('c', shape=(1, 1, 8, 8), init=mx.init.One())
                self.conv2 = nn.Conv2D(4, 3, in_channels=4)

        def hybrid_forward(self, F, x, c):
            y = self.conv(x)
            if case == 'spatial constant':
                y = F.broadcast_add(y, c)
            elif case == 'two readers':
                y = F.relu(F.broadcast_add(y, F.slice_axis(c, axis=1, begin=0, end=1))) + y
            elif case == 'constant / output':
                y = F.broadcast_div(F.slice_axis(F.slice_axis(c, axis=2, begin=0, end=1),
                                                 axis=3, begin=0, end=1), y)
            elif case == 'after pooling':
                y = F.broadcast_mul(F.Pooling(F.relu(y), kernel=(1, 1), pool_type='max'),
                                    F.slice_axis(c, axis=3, begin=0, end=1))
            return self.conv2(y)

    net = Net()
    net.initialize(mx.init.Xavier())
    x = _images(4, n=8, c=2, size=8)
    y = net(mx.nd.array(x)).asnumpy()
    q = gluonq.quantize_net(net, x, progress=False)
    want = {'spatial constant': 'varies along other axes than the output channels',
            'two readers': 'whose output has other readers',
            'constant / output': 'divides a constant by the output',
            'after pooling': 'not after a conv/dense layer'}[case]
    assert any(r['kind'] == 'float' and want in r['reason'] for r in q.report), q.report
    for mode, yq in _outputs_all_modes(q, x).items():
        assert quant.sqnr_db(y, yq) >= 35, mode    # measured: 42.9-50.5 dB


def _bad_spec(q):
    spec = q.spec
    step = next(s for s in spec['steps'] if s['block'].startswith('QuantizedConv'))
    step['inputs'] = ['no_such_tensor']
    return spec, step['name']


def test_spec_check_names_the_step(tmp_path):
    net = _se_net()
    x = _images(5, n=4)
    q = gluonq.quantize_net(net, x, progress=False)
    spec, name = _bad_spec(q)
    with pytest.raises(ValueError, match="%r .*reads 'no_such_tensor', which is neither" % name):
        gluonq.convert.qnet.QuantizedNet(spec)
    # the same check on load
    gluonq.save_quantized(q, str(tmp_path / 'q'))
    side = json.load(open(str(tmp_path / 'q.json')))
    side['steps'] = _bad_spec(q)[0]['steps']
    json.dump(side, open(str(tmp_path / 'q.json'), 'w'))
    with pytest.raises(ValueError, match='reads .no_such_tensor.'):
        gluonq.load_quantized(str(tmp_path / 'q'))
    # a FloatOp whose parameter positions do not add up
    spec = q.spec
    fop = next(s for s in spec['steps'] if s['block'] == 'FloatOp')
    fop['config']['num_inputs'] += 1
    with pytest.raises(ValueError, match=r'FloatOp.*has \d+ inputs, but the step lists'):
        gluonq.convert.qnet.QuantizedNet(spec)


class LSTMTagger(HybridBlock):
    """An LSTM with its default (zero) begin state, then a dense layer per time step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.lstm = mx.gluon.rnn.LSTM(16, layout='NTC', input_size=8)
            self.fc = nn.Dense(4, in_units=16, flatten=False)

    def hybrid_forward(self, F, x):
        return self.fc(self.lstm(x))


@pytest.mark.onednn
@pytest.mark.parametrize('hybridize', [False, True])
def test_lstm_default_state_converts_for_any_batch_size(hybridize):
    """The LSTM's begin state is zeros of a batch size MXNet infers from the data; it must not
    be frozen at the batch size of the trace. The LSTM stays float and the dense layer is
    int8: at batch sizes 1, 3 and 8 each output is within the bound that the input and
    weight steps give (numpy, from the float weights and the calibrated input range). Without
    VNNI the default fused kernels round int8 weights differently (README, "CPUs without
    VNNI"), so the hybridized case runs ``exact=True`` there."""
    net = LSTMTagger()
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    x = np.random.RandomState(0).randn(8, 5, 8).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    if hybridize:           # the fused kernels, bit-exact ones on a CPU without VNNI
        q.hybridize(exact=not lower.int8_kernels_exact())
    dense = [b for b in q._children.values() if type(b).__name__ == 'QuantizedDense']
    assert len(dense) == 1
    s_x = float(dense[0]._in_q.max) / 127
    w = value(net.fc.weight).astype(np.float64)          # (4, 16)
    s_w = np.abs(w).max(axis=1) / 127
    for n in (1, 3, 8):
        h = net.lstm(mx.nd.array(x[:n])).asnumpy().astype(np.float64)   # (n, 5, 16)
        assert np.abs(h).max() <= 127 * s_x * (1 + 1e-6)
        bound = (np.abs(w).sum(1) * s_x / 2 + np.abs(h).sum(-1, keepdims=True) * s_w / 2
                 + w.shape[1] * s_x * s_w / 4 + s_x * s_w / 2) * (1 + 1e-5) + 1e-6
        y_f = net(mx.nd.array(x[:n])).asnumpy()
        y_q = q(mx.nd.array(x[:n])).asnumpy()
        assert y_q.shape == y_f.shape == (n, 5, 4)
        assert (np.abs(y_q - y_f) <= bound).all(), np.abs(y_q - y_f).max()


#: activations as exporters spell them out, between two convolutions: (function, float ops
#: the traced graph keeps for it, whether it is rewritten)
_ACTIVATIONS = {
    'x * clip(x + 3, 0, 6) / 6': (lambda F, x: F.elemwise_mul(x, F.clip(x + 3, 0, 6)) / 6,
                                  ['hard_sigmoid', 'broadcast_mul']),
    'x * clip(relu(x + 3), 0, 6) * (1/6)': (
        lambda F, x: F.elemwise_mul(F.clip(F.relu(x + 3), 0, 6), x) * (1 / 6.0),
        ['hard_sigmoid', 'broadcast_mul']),
    'x * clip(x / 6 + 0.5, 0, 1)': (lambda F, x: F.elemwise_mul(x, F.clip(x / 6 + 0.5, 0, 1)),
                                    ['hard_sigmoid', 'broadcast_mul']),
    'x * clip(x + 3, 0, 6)': (lambda F, x: F.elemwise_mul(x, F.clip(x + 3, 0, 6)),
                              ['hard_sigmoid', 'broadcast_mul', '_mul_scalar']),
    # after a pooling (after a conv, the scale and shift would fold into it)
    'clip(0.2 avgpool(x) + 0.5, 0, 1)': (
        lambda F, x: F.clip(F.Pooling(x, kernel=(2, 2), pool_type='avg') * 0.2 + 0.5, 0, 1),
        ['Pooling', 'hard_sigmoid']),
    # saturates only beyond |x| = 50: not provably a hardsigmoid on the probe, left alone
    'x * clip(0.01 x + 0.5, 0, 1)': (
        lambda F, x: F.elemwise_mul(x, F.clip(x * 0.01 + 0.5, 0, 1)),
        ['_mul_scalar', '_plus_scalar', 'clip', 'elemwise_mul']),
}


class _ActNet(HybridBlock):
    def __init__(self, act, **kw):
        super().__init__(**kw)
        self._act = act
        with self.name_scope():
            self.c1 = nn.Conv2D(6, 3, padding=1, in_channels=3)
            self.c2 = nn.Conv2D(4, 1, in_channels=6)

    def hybrid_forward(self, F, x):
        return self.c2(self._act(F, self.c1(x)))


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(sorted(_ACTIVATIONS)), seed=st.integers(0, 2 ** 16),
       scale=st.floats(0.1, 30.0))
def test_spelled_out_activations_become_one_op(form, seed, scale):
    """The traced graph computes a spelled-out hardswish / hardsigmoid with MXNet's one-op
    ``hard_sigmoid`` (and a multiply), and gives the float network's outputs within float32
    rounding, also far into both saturated ends; a chain that saturates only outside the
    probe stays as written."""
    act, ops = _ACTIVATIONS[form]
    mx.random.seed(seed % 1000)
    net = _ActNet(act)
    net.initialize(mx.init.Xavier(magnitude=2))
    x = np.random.RandomState(seed).uniform(-scale, scale, (2, 3, 6, 6)).astype(np.float32)
    graph = trace_and_fold(net, x.shape)
    between = [n.op for n in graph.op_nodes() if n.op != 'Convolution']
    assert between == ops, between
    sym = graph.to_symbol()
    args = {k: mx.nd.array(v) for k, v in graph.params.items()}
    args[graph.inputs[0]] = mx.nd.array(x)
    got = sym.eval(ctx=mx.cpu(), **args)[0].asnumpy()
    want = net(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rounded_float_conv_results_are_int8_kernels_in_onnxruntime(tmp_path):
    """onnxruntime has no int8 convolution with a float output: with
    ``round_float_results`` a conv whose float result feeds a hardswish rounds it to an
    8-bit intermediate at the calibrated range, so every conv is a QLinearConv, and the
    first one's intermediate is within half a step of gluonq's unrounded float result
    where it does not saturate. By default the result stays float (a float conv there)."""
    ort = pytest.importorskip('onnxruntime')
    onnx = pytest.importorskip('onnx')
    from gluonq import onnx as gonnx
    net = _se_net()
    x = _images(6)
    q = gluonq.quantize_net(net, x, progress=False)
    floats = [s for s in q.spec['steps'] if s['block'] == 'QuantizedConv2D' and
              q._children[s['name']]._out_q is None]
    assert floats and set(q.spec['float_result_ranges']) == {s['name'] for s in floats}
    model, info = gonnx.to_onnx(q, input_shape=(1,) + x.shape[1:], return_info=True,
                                round_float_results=True)
    assert set(info['float_results']) == {s['name'] for s in floats}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / 'opt.onnx')
    first = info['float_results'][floats[0]['name']]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(first['tensor']))
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=['CPUExecutionProvider'])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count('QLinearConv') == sum(s['block'] == 'QuantizedConv2D'
                                           for s in q.spec['steps'])
    assert 'Conv' not in ops and 'FusedConv' not in ops, ops
    xt = _images(7)
    qi = sess.run([first['tensor']], {sess.get_inputs()[0].name: xt})[0].astype(np.float64)
    got = (qi - first['zero_point']) * first['scale']
    want = q.forward_all(mx.nd.array(xt))[floats[0]['outputs'][0]].asnumpy()
    lo, hi = first['range']
    inside = (want > lo) & (want < hi)
    assert inside.mean() > 0.99
    assert np.abs(got - want)[inside].max() <= 0.5 * first['scale'] * (1 + 1e-5) + 1e-6
    for target in gonnx.TARGETS:
        assert not any(n.output[0].endswith('/result')
                       for n in gonnx.to_onnx(q, target=target).graph.node)
