"""The converter: tracing and folding, planning, calibration data, checkpoints, errors."""
import filecmp
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluonq
from gluonq import debug, lower, quant
from gluonq.calibration.collect import CalibrationDataError
from gluonq.convert import trace_and_fold
from gluonq.export import CheckpointError

import mnist_models as M
from param_values import value


class Branchy(nn.HybridBlock):
    """Hand-written: F.relu, +, F.concat, F.Pooling, F.flatten, and a sigmoid (float)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1)
            self.bn = nn.BatchNorm()
            self.a = nn.Conv2D(8, 1)
            self.b = nn.Conv2D(8, 3, padding=1)
            self.gate = nn.Conv2D(16, 1)
            self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.concat(F.relu(self.a(x)), F.relu(self.b(x)), dim=1)
        y = F.Pooling(y, kernel=(2, 2), stride=(2, 2), pool_type='max')
        g = F.sigmoid(self.gate(y))
        y = F.relu(y * g + y)
        return self.fc(F.flatten(F.Pooling(y, kernel=(1, 1), global_pool=True,
                                           pool_type='avg')))


def _branchy():
    net = Branchy()
    net.initialize(mx.init.Xavier(magnitude=2))
    x = np.random.RandomState(0).rand(40, 1, 12, 12).astype(np.float32)
    net(mx.nd.array(x[:2]))
    # non-trivial BatchNorm statistics, so that folding is tested
    net.bn.running_mean.set_data(mx.nd.array(np.linspace(-0.2, 0.3, 8)))
    net.bn.running_var.set_data(mx.nd.array(np.linspace(0.5, 2.0, 8)))
    net.bn.gamma.set_data(mx.nd.array(np.linspace(0.8, 1.3, 8)))
    return net, x


def test_fold_preserves_the_float_network():
    net, x = _branchy()
    graph = trace_and_fold(net, (1,) + x.shape[1:])
    assert not any(n.op == 'BatchNorm' for n in graph.op_nodes())
    block = mx.gluon.SymbolBlock(graph.to_symbol(), [mx.sym.var('data')])
    for name, p in block.collect_params().items():
        p.shape = graph.params[name].shape
        p.initialize(mx.init.Constant(0))
        p.set_data(mx.nd.array(graph.params[name]))
    np.testing.assert_allclose(block(mx.nd.array(x)).asnumpy(), net(mx.nd.array(x)).asnumpy(),
                               rtol=1e-4, atol=1e-5)


def test_plan_report_and_partial_quantization():
    net, x = _branchy()
    q = gluonq.quantize_net(net, x, progress=False)
    kinds = {r['op']: r['kind'] for r in q.report if r['kind'] not in ('folded',)}
    assert kinds['Concat'].startswith('int8 concat')
    pools = [r for r in q.report if r['op'] == 'Pooling']
    assert pools[0]['kind'].startswith('int8 pool')
    # the global pool reads the float output of the sigmoid gate: it stays float
    assert pools[1]['kind'] == 'float' and 'inputs are float' in pools[1]['reason']
    assert any(r['kind'].startswith('int8 conv + relu') for r in q.report)
    sig = [r for r in q.report if r['op'] == 'sigmoid'][0]
    assert sig['kind'] == 'float' and 'no int8 kernel for sigmoid' in sig['reason']
    assert any(r['kind'] == 'folded' and 'BatchNorm folded' in r['reason'] for r in q.report)
    yf, yq = net(mx.nd.array(x)).asnumpy(), q(mx.nd.array(x)).asnumpy()
    assert quant.sqnr_db(yf, yq) > 20
    # exclude the first conv and the classifier: they stay float
    q2 = gluonq.quantize_net(net, x, exclude=['*conv0*', '*dense*'], progress=False)
    excl = [r for r in q2.report if r['reason'] == 'excluded by the user']
    assert sorted(r['op'] for r in excl) == ['Convolution', 'FullyConnected']
    assert quant.sqnr_db(yf, q2(mx.nd.array(x)).asnumpy()) > 20
    with pytest.raises(ValueError, match='no layer matches'):
        gluonq.quantize_net(net, x, exclude=['nonexistent_layer'], progress=False)


@pytest.mark.onednn
def test_int8_parameters_and_hybridize():
    net, x = _branchy()
    q = gluonq.quantize_net(net, x, progress=False)
    dtypes = {name.rsplit('_', 1)[-1]: p.dtype for name, p in q.collect_params().items()}
    assert any(p.dtype == np.int8 for p in q.collect_params().values())
    assert any(p.dtype == np.int32 for p in q.collect_params().values())
    assert dtypes['scale'] == np.float32
    y = q(mx.nd.array(x)).asnumpy()
    q.hybridize(exact=True)                 # eager and hybridized: the same integers
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), y, rtol=1e-5, atol=1e-5)
    if lower.int8_kernels_exact():          # the default fast path: the same integers
        q.hybridize()
        np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), y, rtol=1e-5, atol=1e-5)
    else:
        # without VNNI the fast path runs oneDNN's saturating int16 pairs (each fused layer
        # is checked against a model of them in tests/test_lower.py) and says so; measured
        # here with DNNL_MAX_CPU_ISA=AVX512_CORE: logit SQNR 28.8 dB against the exact
        # integers, the same top-1 on all 40 inputs
        with pytest.warns(RuntimeWarning, match='no VNNI'):
            q.hybridize()
            yf = q(mx.nd.array(x)).asnumpy()
        assert quant.sqnr_db(y, yf) >= 25, quant.sqnr_db(y, yf)
        assert (yf.argmax(1) != y.argmax(1)).sum() <= 1


def test_calib_data_forms_and_limits():
    net, x = _branchy()
    y = np.zeros(len(x), np.float32)
    loader = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(x, y), batch_size=8)
    forms = [x, mx.nd.array(x), loader, [mx.nd.array(x[i:i + 10]) for i in range(0, 40, 10)],
             [(mx.nd.array(x[i:i + 10]), mx.nd.array(y[i:i + 10])) for i in range(0, 40, 10)]]
    ref = gluonq.quantize_net(net, x, progress=False).qparams
    for form in forms:
        q = gluonq.quantize_net(net, form, progress=False)
        assert q.qparams == ref
    q = gluonq.quantize_net(net, loader, num_calib_batches=2, progress=False)
    assert q.spec['calibration']['num_examples'] == 16
    q = gluonq.quantize_net(net, x, num_calib_examples=13, progress=False)
    assert q.spec['calibration']['num_examples'] == 13


def test_calib_data_errors_name_the_input():
    net, x = _branchy()
    with pytest.raises(CalibrationDataError, match='empty'):
        gluonq.quantize_net(net, np.zeros((0, 1, 12, 12), np.float32), progress=False)
    with pytest.raises(CalibrationDataError, match='yielded no examples'):
        gluonq.quantize_net(net, [], progress=False)
    bad = x.copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(CalibrationDataError, match='batch 0 holds NaN or Inf'):
        gluonq.quantize_net(net, bad, progress=False)
    with pytest.raises(CalibrationDataError, match='example shape'):
        gluonq.quantize_net(net, [x[:4], x[:4, :, :6]], progress=False)
    with pytest.raises(CalibrationDataError, match='expected an NDArray or numpy array'):
        gluonq.quantize_net(net, [['not', 'arrays']], progress=False)


def test_checkpoint_roundtrip_determinism_and_refusal(tmp_path):
    net, x = _branchy()
    a = gluonq.quantize_net(net, x, progress=False)
    b = gluonq.quantize_net(net, x, progress=False)
    gluonq.save_quantized(a, str(tmp_path / 'a'))
    gluonq.save_quantized(b, str(tmp_path / 'b'))
    for ext in ('.params', '.json'):
        assert filecmp.cmp(str(tmp_path / ('a' + ext)), str(tmp_path / ('b' + ext)),
                           shallow=False)
    side = json.load(open(str(tmp_path / 'a.json')))
    assert side['versions']['mxnet'] == mx.__version__ and side['calibration']['mode'] == 'naive'
    assert side['qparams']
    loaded = gluonq.load_quantized(str(tmp_path / 'a'))
    np.testing.assert_array_equal(loaded(mx.nd.array(x)).asnumpy(), a(mx.nd.array(x)).asnumpy())
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        gluonq.save_quantized(a, str(tmp_path / 'a'))
    gluonq.save_quantized(a, str(tmp_path / 'a'), overwrite=True)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    net, x = _branchy()
    q = gluonq.quantize_net(net, x, progress=False)

    def broken(*args, **kwargs):
        raise IOError('disk full')
    monkeypatch.setattr(json, 'dump', broken)
    with pytest.raises(IOError, match='disk full'):
        gluonq.save_quantized(q, str(tmp_path / 'q'))
    assert os.listdir(str(tmp_path)) == []


def test_load_quantized_errors(tmp_path):
    net, x = _branchy()
    q = gluonq.quantize_net(net, x, progress=False)
    gluonq.save_quantized(q, str(tmp_path / 'q'))
    with pytest.raises(FileNotFoundError, match='not found'):
        gluonq.load_quantized(str(tmp_path / 'missing'))
    side = json.load(open(str(tmp_path / 'q.json')))
    side['steps'] = side['steps'][:-1]
    side['outputs'] = [side['steps'][-1]['outputs'][0]]
    json.dump(side, open(str(tmp_path / 'q.json'), 'w'))
    with pytest.raises(CheckpointError, match='unexpected'):
        gluonq.load_quantized(str(tmp_path / 'q'))
    open(str(tmp_path / 'q.json'), 'w').write('{"format": "something"}')
    with pytest.raises(CheckpointError, match='not a gluonq checkpoint'):
        gluonq.load_quantized(str(tmp_path / 'q'))


ZOO = [('cifar_resnet20_v1', 32), ('cifar_resnet20_v2', 32), ('resnet18_v1', 64),
       ('resnet18_v2', 64), ('mobilenet0.25', 64), ('mobilenetv2_0.25', 64),
       ('vgg11_bn', 32), ('squeezenet1.1', 224), ('densenet121', 224)]


@pytest.mark.parametrize('name,size', ZOO)
def test_gluoncv_model_zoo_converts(name, size):
    from gluoncv.model_zoo import get_model
    mx.random.seed(0)
    net = get_model(name, classes=10, pretrained=False)
    net.initialize(mx.init.MSRAPrelu())            # keeps activations from vanishing
    rng = np.random.RandomState(0)
    x = rng.rand(8 if size < 224 else 2, 3, size, size).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    int8 = [r for r in q.report if r['kind'].startswith('int8')]
    floats = [r for r in q.report if r['kind'] == 'float']
    assert len(int8) >= 5 and not floats, floats
    yf, yq = net(mx.nd.array(x)).asnumpy(), q(mx.nd.array(x)).asnumpy()
    assert yq.shape == yf.shape and np.all(np.isfinite(yq))
    assert quant.sqnr_db(yf, yq) > 10, _zoo_failure_report(net, q, x, yf, yq)


def _zoo_failure_report(net, q, x, yf, yq):
    """What a failed zoo conversion needs to be diagnosed where it happened (CI): is the
    int8 run repeatable, is the conversion, and which step loses the signal first."""
    again = q(mx.nd.array(x)).asnumpy()
    q2 = gluonq.quantize_net(net, x, progress=False)
    same_conversion = all(np.array_equal(value(a), value(b)) for a, b in
                          zip(q.collect_params().values(), q2.collect_params().values()))
    rows = debug.compare(net, q, x, num_examples=len(x))
    low = [r for r in rows if r['sqnr_db'] < 10][:8]
    return ('second run of the same QuantizedNet: identical %s; second conversion: same '
            'parameters %s, output SQNR %.1f dB\nfirst steps under 10 dB:\n%s'
            % (np.array_equal(again, yq), same_conversion,
               quant.sqnr_db(yf, q2(mx.nd.array(x)).asnumpy()),
               debug.format_table(low)))


def test_gluoncv_mobilenetv3_keeps_its_signal():
    """gluoncv's MobileNetV3 (hardswish, squeeze-excite) with untrained weights: its
    activations fade to ~1e-8, so the squeeze-excite layers' biases do not fit int32 at the
    calibrated scales and the converter raises their weight scales. Before that, the biases
    saturated and the int8 logits had 0 dB SQNR. Measured (8 images): eager 28.8 dB, the
    fast path 23.1 dB on an AVX2 EPYC; the exact path gives the eager integers."""
    from gluoncv.model_zoo import get_model
    mx.random.seed(0)
    net = get_model('mobilenetv3_small', classes=10, pretrained=False)
    net.initialize(mx.init.MSRAPrelu())
    x = np.random.RandomState(0).rand(8, 3, 64, 64).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    assert any('weight scale raised' in w for w in q.spec['calibration']['warnings'])
    yf, ye = net(mx.nd.array(x)).asnumpy(), q(mx.nd.array(x)).asnumpy()
    assert quant.sqnr_db(yf, ye) > 20
    q.hybridize()
    assert quant.sqnr_db(yf, q(mx.nd.array(x)).asnumpy()) > 10
    q.hybridize(exact=True)
    np.testing.assert_array_equal(q(mx.nd.array(x)).asnumpy(), ye)


def test_a_layer_after_a_dead_relu_keeps_its_bias():
    """A ReLU that never fires on the calibration data has the range [0, 0]; the next
    layer's int32 bias must still hold its float bias, so the int8 net outputs what the
    float net does (that bias), and the widened range is reported."""
    net = nn.HybridSequential()
    net.add(nn.Dense(8, in_units=6, activation='relu'), nn.Dense(3, in_units=8))
    net.initialize()
    net[0].weight.set_data(-mx.nd.ones((8, 6)))                  # inputs >= 0: never fires
    net[1].weight.set_data(mx.nd.array(np.random.RandomState(0).normal(0, 1, (3, 8))))
    net[1].bias.set_data(mx.nd.array([0.5, -1.0, 2.0]))
    x = np.random.RandomState(1).rand(32, 6).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    yf, yq = net(mx.nd.array(x)).asnumpy(), q(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(yq, yf, rtol=0, atol=1e-5 * np.abs(yf).max())
    assert any('widened' in w for w in q.spec['calibration']['warnings'])


def test_a_layer_reading_a_tiny_range_keeps_its_bias(tmp_path):
    """A real but tiny input range (activations that fade, as in an untrained MobileNetV3's
    squeeze-excite) makes ``s_in * s_w`` so small that an ordinary bias does not fit int32.
    The converter raises those channels' weight scales and says so, and every runtime keeps
    the float net's output, which is nearly all bias here (a saturated bias made it ~0)."""
    net = nn.HybridSequential()
    net.add(nn.Dense(8, in_units=6, activation='relu'), nn.Dense(3, in_units=8))
    net.initialize()
    rng = np.random.RandomState(0)
    net[0].weight.set_data(mx.nd.array(rng.rand(8, 6) * 1e-9))       # outputs ~1e-9
    net[1].weight.set_data(mx.nd.array(rng.normal(0, 1, (3, 8))))
    net[1].bias.set_data(mx.nd.array([0.5, -1.0, 2.0]))
    x = rng.rand(32, 6).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    yf = net(mx.nd.array(x)).asnumpy()
    step = q.spec['steps'][-1]['name']
    assert any(w.startswith(step + ': weight scale raised in 3 of 3')
               for w in q.spec['calibration']['warnings']), q.spec['calibration']['warnings']
    tol = dict(rtol=0, atol=1e-5 * np.abs(yf).max())
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), yf, **tol)
    q.hybridize()
    np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), yf, **tol)
    ort = pytest.importorskip('onnxruntime')
    path = str(tmp_path / 'q.onnx')
    gluonq.export_onnx(q, path, input_shape=(1, 6))
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, yf, **tol)


def test_symbolblock_import_converts(tmp_path):
    """Users quantize imported models: a SymbolBlock from an export."""
    net = M.build('tiny')
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(0).rand(16, 1, 32, 32).astype(np.float32)
    net.hybridize()
    net(mx.nd.array(x))
    net.export(str(tmp_path / 'tiny'))
    imported = mx.gluon.SymbolBlock.imports(str(tmp_path / 'tiny-symbol.json'), ['data'],
                                            str(tmp_path / 'tiny-0000.params'))
    q = gluonq.quantize_net(imported, x, progress=False)
    assert quant.sqnr_db(net(mx.nd.array(x)).asnumpy(), q(mx.nd.array(x)).asnumpy()) > 20


def test_relu_residual_output_is_uint8_unless_its_operand_is_signed():
    """relu(conv(x) + r) is held as uint8 (0..255) when the operand ``r`` is never negative
    and as int8 0..127 (oneDNN's fused sum saturates in a signed operand's dtype) when it
    can be: checked against the operand integers the network computes. ResNet-20 has both
    (each stage's downsampling block adds a signed 1x1 convolution)."""
    x, _ = M.load('train', 64)
    q = gluonq.quantize_net(M.pretrained('resnet20'), x, progress=False)
    env = q.forward_all(mx.nd.array(x))
    seen = set()
    for st in q.spec['steps']:
        block = q._children[st['name']]
        if len(st['inputs']) != 2 or getattr(block, '_act_type', None) != 'relu' or \
                not st['block'].startswith('QuantizedConv'):
            continue
        signed = bool(env[st['inputs'][1]].data.asnumpy().min() < 0)
        out = env[st['outputs'][0]].data.asnumpy()
        assert block._out_dtype == ('int8' if signed else 'uint8'), st['name']
        assert out.min() >= 0 and (not signed or out.max() <= 127), st['name']
        seen.add(signed)
    assert seen == {True, False}


class _ReluAfterConcat(mx.gluon.HybridBlock):
    """A standalone ReLU (after a concat) is the operand of a ReLU'd residual layer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.a = nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.b = nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.res = nn.Conv2D(8, 3, padding=1, in_channels=8)
            self.head = nn.Conv2D(2, 1, in_channels=8)

    def hybrid_forward(self, F, x):
        h = F.relu(F.concat(self.a(x), self.b(x), dim=1))
        return self.head(F.relu(self.res(h) + h))


@pytest.mark.onednn
def test_standalone_relu_operand_keeps_the_residual_layer_fused():
    """A standalone ReLU's int8 output is typed int8 in MXNet (only a fused layer types its
    0..127 output uint8), so the residual layer reading it is held as int8 0..127, which
    oneDNN's fused sum computes exactly; a uint8 output would need the unfused int32 path.
    The fast path gives the eager integers (bit-exact with VNNI)."""
    net = _ReluAfterConcat()
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    x = np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32)
    q = gluonq.quantize_net(net, x, progress=False)
    step = next(st for st in q.spec['steps'] if len(st['inputs']) == 2 and
                st['block'] == 'QuantizedConv2D')
    assert q._children[step['name']]._out_dtype == 'int8'
    report = {r['step']: r for r in lower.lower(q, exact=False).report}   # the fast path
    assert report[step['name']]['lowering'] == 'fused', report[step['name']]
    if lower.int8_kernels_exact():
        y = q(mx.nd.array(x)).asnumpy()
        q.hybridize()
        np.testing.assert_allclose(q(mx.nd.array(x)).asnumpy(), y, rtol=1e-5, atol=1e-5)
