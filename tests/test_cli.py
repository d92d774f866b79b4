"""gluonq-convert: inputs, outputs, errors."""
import json
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import gluonq
from gluonq import cli, quant

import mnist_models as M
from param_values import value


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    net = M.build('tiny')
    M.train(net, epochs=1, batch_size=64, lr=0.1, max_steps=60, eval_test=False,
            verbose=False)
    net.save_parameters(str(d / 'tiny.params'))
    x, y = M.load('train', 64)
    np.savez(str(d / 'calib.npz'), x=x, y=y)
    xt, yt = M.load('test', 300)
    np.savez(str(d / 'test.npz'), x=xt, y=yt)
    return d


def _argv(d, out, *extra):
    return ['--factory', 'mnist_models:build', '--model-kwargs', '{"name": "tiny"}',
            '--params', str(d / 'tiny.params'), '--calib', str(d / 'calib.npz'),
            '--out', str(out), '--quiet'] + list(extra)


def test_convert_evaluate_and_reload(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / 'q'
    assert cli.main(_argv(tiny_ckpt, out, '--eval', str(tiny_ckpt / 'test.npz'),
                          '--report-png', str(tmp_path / 'r.png'))) == 0
    text = capsys.readouterr().out
    assert 'SQNR dB' in text and 'top-1: fp32' in text
    side = json.load(open(str(out) + '.json'))
    assert side['calibration']['num_examples'] == 64
    summary = side['extra']['summary']
    assert abs(summary['fp32_top1'] - summary['int8_top1']) <= 2.0
    qnet = gluonq.load_quantized(str(out))
    net = M.build('tiny')
    net.load_parameters(str(tiny_ckpt / 'tiny.params'))
    xt = np.load(str(tiny_ckpt / 'test.npz'))['x'][:50]
    yq = qnet(mx.nd.array(xt)).asnumpy()
    assert (yq.argmax(1) == net(mx.nd.array(xt)).asnumpy().argmax(1)).mean() > 0.9
    assert os.path.getsize(str(tmp_path / 'r.png')) > 1000


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / 'q'
    assert cli.main(_argv(tiny_ckpt, out)) == 0
    before = {p: os.path.getmtime(str(tmp_path / p)) for p in os.listdir(str(tmp_path))}
    assert cli.main(_argv(tiny_ckpt, out)) == 2
    assert 'refusing to overwrite' in capsys.readouterr().err
    assert {p: os.path.getmtime(str(tmp_path / p)) for p in os.listdir(str(tmp_path))} == before
    assert cli.main(_argv(tiny_ckpt, out, '--overwrite')) == 0
    # a failing export (unwritable folder) removes the files this run wrote
    out2 = tmp_path / 'new'
    assert cli.main(_argv(tiny_ckpt, out2, '--export-compact',
                          str(tmp_path / 'missing_dir' / 'x'))) == 2
    assert not any(p.startswith('new') for p in os.listdir(str(tmp_path)))


def test_architecture_checkpoint_mismatch_lists_names(tiny_ckpt, tmp_path, capsys):
    argv = _argv(tiny_ckpt, tmp_path / 'q')
    argv[3] = '{"name": "tiny", "width": 4}'       # shapes differ
    assert cli.main(argv) == 2
    assert 'expects shape' in capsys.readouterr().err
    argv = ['--model', 'cifar_resnet20_v1', '--classes', '10'] + _argv(
        tiny_ckpt, tmp_path / 'q')[4:]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert 'missing from the checkpoint' in err and 'unexpected in the checkpoint' in err
    assert 'features.0.weight' in err and 'c1.conv.weight' in err


def test_bad_calibration_data(tiny_ckpt, tmp_path, capsys):
    bad = np.load(str(tiny_ckpt / 'calib.npz'))['x'].copy()
    bad[0, 0, 0, 0] = np.inf
    np.save(str(tmp_path / 'bad.npy'), bad)
    argv = _argv(tiny_ckpt, tmp_path / 'q')
    argv[argv.index('--calib') + 1] = str(tmp_path / 'bad.npy')
    assert cli.main(argv) == 2
    assert 'NaN or Inf' in capsys.readouterr().err
    np.save(str(tmp_path / 'empty.npy'), bad[:0])
    argv[argv.index('--calib') + 1] = str(tmp_path / 'empty.npy')
    assert cli.main(argv) == 2
    assert 'empty' in capsys.readouterr().err
    argv[argv.index('--calib') + 1] = str(tmp_path / 'nothing.npz')
    assert cli.main(argv) == 2
    assert 'not found' in capsys.readouterr().err
    np.save(str(tmp_path / 'wrong.npy'), bad[:, :, :8, :8])
    argv[argv.index('--calib') + 1] = str(tmp_path / 'wrong.npy')
    assert cli.main(argv) == 2


def test_image_folder_recordio_and_symbol(tiny_ckpt, tmp_path):
    import cv2
    x, _ = M.load('train', 16)
    imgs = np.clip((x[:, 0] * M.STD + M.MEAN) * 255, 0, 255).astype(np.uint8)
    folder = tmp_path / 'imgs'
    folder.mkdir()
    rec = mx.recordio.MXRecordIO(str(tmp_path / 'c.rec'), 'w')
    for i, im in enumerate(imgs):
        rgb = np.stack([im] * 3, -1)
        cv2.imwrite(str(folder / ('%02d.png' % i)), rgb)
        rec.write(mx.recordio.pack_img(mx.recordio.IRHeader(0, 0, i, 0), rgb, img_fmt='.png'))
    rec.close()
    # a 3-channel model exported to symbol JSON
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Conv2D(4, 3, activation='relu'), mx.gluon.nn.GlobalAvgPool2D(),
            mx.gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / 'm'))
    for calib in (str(folder), str(tmp_path / 'c.rec')):
        out = tmp_path / ('q_' + os.path.basename(calib).replace('.', '_'))
        assert cli.main(['--symbol', str(tmp_path / 'm-symbol.json'), '--params',
                         str(tmp_path / 'm-0000.params'), '--calib', calib, '--mean', '0.1',
                         '--std', '0.3', '--out', str(out), '--quiet']) == 0
        assert gluonq.load_quantized(str(out))(mx.nd.zeros((2, 3, 32, 32))).shape == (2, 3)


def test_python_dash_m_entry_point(tiny_ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, '-m', 'gluonq.convert', '--help'], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and '--calib-mode' in r.stdout


@pytest.mark.parametrize('weights', ['auto', 'int8', 'uint8'])
def test_onnx_export_from_the_command_line(tiny_ckpt, tmp_path, weights):
    """--onnx writes the QDQ model with the chosen weight type ('auto': the exact one on
    this CPU). On every CPU its weights are the checkpoint's integers and the file is the one
    export_onnx writes from the reloaded checkpoint. Where onnxruntime computes exactly (uint8
    weights, or int8 weights on a CPU with VNNI) its logits match the int8 checkpoint's own
    (gluonq's reference chain) within the bound the classifier's scales allow for a few
    rounding-tie differences; the saturating U8S8 arithmetic of CPUs without VNNI is
    test_onnx's."""
    ort = pytest.importorskip('onnxruntime')
    import gluonq.onnx as gonnx
    out, path = tmp_path / 'q', str(tmp_path / 'q.onnx')
    assert cli.main(_argv(tiny_ckpt, out, '--onnx', path, '--onnx-weights', weights)) == 0
    if weights == 'auto':
        weights = 'int8' if gonnx.ort_u8s8_exact() else 'uint8'
    qnet = gluonq.load_quantized(str(out))
    xt = np.load(str(tiny_ckpt / 'test.npz'))['x'][:100]
    ref = qnet(mx.nd.array(xt)).asnumpy()                  # eager: the reference chain
    import onnx
    model = onnx.load(path)
    assert {t.data_type for t in model.graph.initializer if t.name.endswith('/weight')} == \
        {getattr(onnx.TensorProto, weights.upper())}
    # on every CPU: the weights are the checkpoint's integers (uint8 ones shifted by the
    # zero point 128), and the file is the one the API writes from the checkpoint
    from onnx import numpy_helper
    layers = 0
    for t in model.graph.initializer:
        if t.name.endswith('/weight'):
            w = value(qnet._children[t.name[:-len('/weight')]].weight)
            got_w = numpy_helper.to_array(t).astype(np.int16)
            np.testing.assert_array_equal(got_w - (128 if weights == 'uint8' else 0), w)
            layers += 1
    assert layers == 4
    gluonq.export_onnx(gluonq.load_quantized(str(out)), str(tmp_path / 'api.onnx'),
                       weight_dtype=weights)
    assert open(path, 'rb').read() == open(str(tmp_path / 'api.onnx'), 'rb').read()
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: xt})[0]
    assert got.shape == ref.shape
    if weights == 'uint8' or gonnx.ort_u8s8_exact():
        # one step of the classifier's input moves a logit by at most s_x * max|s_w q_w|
        fc = qnet._children[qnet.spec['steps'][-1]['name']]
        w = value(fc.weight).astype(np.float64)
        step = float(fc._in_q.scale) * np.abs(
            w * value(fc.weight_scale)[:, None]).sum(1)
        assert (np.abs(got - ref) <= 3 * step[None] + 1e-4 * np.abs(ref).max()).all()


# --- every CliError -------------------------------------------------------------------------
def _small_onnx(path):
    """A float ONNX classifier for (N, 1, 32, 32) input: Conv+bias, Relu, global pooling,
    Flatten, Gemm (random weights, seeded)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    r = np.random.RandomState(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (
        ('w', r.randn(8, 1, 3, 3) * 0.5), ('b', r.randn(8) * 0.1),
        ('fw', r.randn(10, 8) * 0.5), ('fb', r.randn(10) * 0.1))]
    nodes = [helper.make_node('Conv', ['x', 'w', 'b'], ['c'], pads=[1, 1, 1, 1]),
             helper.make_node('Relu', ['c'], ['r']),
             helper.make_node('GlobalAveragePool', ['r'], ['p']),
             helper.make_node('Flatten', ['p'], ['f']),
             helper.make_node('Gemm', ['f', 'fw', 'fb'], ['y'], transB=1)]
    graph = helper.make_graph(nodes, 'small', [helper.make_tensor_value_info(
        'x', TensorProto.FLOAT, ['N', 1, 32, 32])], [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, ['N', 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)]), path)


def _bad_files(d):
    """Damaged inputs next to the good ones in ``d`` (made once per module)."""
    if (d / 'garbage.npy').exists():
        return
    _small_onnx(str(d / 'small.onnx'))
    (d / 'garbage.npy').write_bytes(b'not an array')
    (d / 'garbage.params').write_bytes(b'not params')
    np.savez(str(d / 'none.npz'))
    np.savez(str(d / 'xonly.npz'), x=np.zeros((4, 1, 32, 32), np.float32))
    np.savez(str(d / 'eval_shape.npz'), x=np.zeros((4, 1, 16, 16), np.float32),
             y=np.zeros(4, np.float32))
    np.savez(str(d / 'eval_labels.npz'), x=np.zeros((4, 1, 32, 32), np.float32),
             y=np.zeros(3, np.float32))
    mx.nd.save(str(d / 'list.params'), [mx.nd.zeros(3)])
    mx.nd.save(str(d / 'half.params'), {k: v.astype('float16') for k, v in
                                        mx.nd.load(str(d / 'tiny.params')).items()})
    (d / 'bad-symbol.json').write_text('{nope')
    (d / 'noimgs').mkdir()
    (d / 'noimgs' / 'readme.txt').write_text('no images here')
    rec = mx.recordio.MXRecordIO(str(d / 'empty.rec'), 'w')
    rec.close()
    import cv2
    (d / 'sizes').mkdir()
    for i, size in enumerate([(8, 8), (8, 10)]):
        cv2.imwrite(str(d / 'sizes' / ('%d.png' % i)), np.zeros(size + (3,), np.uint8))
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(2, in_units=4))
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 4)))
    net.export(str(d / 'lin'))


def _with(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def _no_arch(argv):
    return argv[4:]


CLI_ERRORS = [
    # (id, argv from (good argv, data dir, tmp dir), message pattern)
    ('import-spec', lambda a, d, t: _with(a, '--factory', 'mnist_models'),
     r"--factory must look like package.module:name, got 'mnist_models'"),
    ('import-module', lambda a, d, t: _with(a, '--factory', 'no_such_module:build'),
     r"--factory: cannot import no_such_module: No module named 'no_such_module'"),
    ('import-attr', lambda a, d, t: _with(a, '--factory', 'mnist_models:nope'),
     r"--factory: module mnist_models has no 'nope'"),
    ('transform-import', lambda a, d, t: a + ['--transform', 'mnist_models:nope'],
     r"--transform: module mnist_models has no 'nope'"),
    ('no-architecture', lambda a, d, t: _no_arch(a),
     r'give exactly one of --model, --factory, --symbol, --onnx-model \(got none\)'),
    ('two-architectures', lambda a, d, t: a + ['--model', 'cifar_resnet20_v1'],
     r'give exactly one of --model, --factory, --symbol, --onnx-model \(got --model, '
     r'--factory\)'),
    ('params-required', lambda a, d, t: a[:4] + a[6:],
     r'--params \(the float checkpoint\) is required with --model, --factory and --symbol'),
    ('onnx-with-params', lambda a, d, t: ['--onnx-model', str(d / 'small.onnx')] + _no_arch(a),
     r'--onnx-model \S+small.onnx carries its weights: drop --params \S+tiny.params'),
    ('onnx-missing', lambda a, d, t: ['--onnx-model', str(t / 'none.onnx')] + a[6:],
     r'--onnx-model \S+none.onnx: ONNX file \S+none.onnx not found'),
    ('openvino-suffix', lambda a, d, t: a + ['--openvino', str(t / 'model.onnx')],
     r'--openvino \S+model.onnx: an OpenVINO IR path ends in .xml'),
    ('kwargs-json', lambda a, d, t: _with(a, '--model-kwargs', '{name: tiny}'),
     r'--model-kwargs is not valid JSON: Expecting property name'),
    ('kwargs-object', lambda a, d, t: _with(a, '--model-kwargs', '["tiny"]'),
     r'--model-kwargs must be a JSON object \({"name": value}\), got \["tiny"\]'),
    ('factory-kwargs', lambda a, d, t: _with(a, '--model-kwargs', '{"size": 3}'),
     r"--factory mnist_models:build does not take --model-kwargs {\"size\": 3}: .*"),
    ('factory-result', lambda a, d, t: _with(_with(a, '--factory', 'builtins:dict'),
                                             '--model-kwargs', '{}'),
     r'--factory builtins:dict returned dict: expected a Gluon HybridBlock'),
    ('model-name', lambda a, d, t: ['--model', 'no_such_net'] + _no_arch(a),
     r'--model no_such_net: .*no_such_net'),
    ('symbol-missing', lambda a, d, t: ['--symbol', str(t / 'x-symbol.json')] + _no_arch(a),
     r'--symbol file \S+x-symbol.json not found'),
    ('symbol-corrupt', lambda a, d, t: ['--symbol', str(d / 'bad-symbol.json')] + _no_arch(a),
     r'--symbol \S+bad-symbol.json is not an MXNet symbol JSON file'),
    ('symbol-input', lambda a, d, t: ['--symbol', str(d / 'lin-symbol.json'), '--input-name',
                                      'image'] + _no_arch(a),
     r"--symbol \S+lin-symbol.json has no input 'image' \(--input-name\); its arguments "
     r'begin data, dense\d+_weight'),
    ('params-missing', lambda a, d, t: _with(a, '--params', str(t / 'x.params')),
     r'--params file \S+x.params not found'),
    ('params-corrupt', lambda a, d, t: _with(a, '--params', str(d / 'garbage.params')),
     r'--params \S+garbage.params is not an MXNet .params file'),
    ('params-unnamed', lambda a, d, t: _with(a, '--params', str(d / 'list.params')),
     r'--params \S+list.params holds no named parameters'),
    ('params-float16', lambda a, d, t: _with(a, '--params', str(d / 'half.params')),
     r'parameter \S+ in \S+half.params is float16: expected a float32 checkpoint'),
    ('folder-empty', lambda a, d, t: _with(a, '--calib', str(d / 'noimgs')),
     r'--calib folder \S+noimgs holds no images \(.jpg, .jpeg, .png, .bmp\)'),
    ('rec-empty', lambda a, d, t: _with(a, '--calib', str(d / 'empty.rec')),
     r'--calib RecordIO file \S+empty.rec holds no images'),
    ('image-sizes', lambda a, d, t: _with(a, '--calib', str(d / 'sizes')),
     r'images in \S+sizes have different sizes \[\(8, 8\), \(8, 10\)\]: give --image-size H W'),
    ('mean-count', lambda a, d, t: _with(a, '--calib', str(d / 'sizes')) +
     ['--image-size', '8', '8', '--mean', '0.1', '0.2'],
     r'--mean has 2 values: give one, or one per channel \(the images in \S+sizes have 3\)'),
    ('std-zero', lambda a, d, t: _with(a, '--calib', str(d / 'sizes')) +
     ['--image-size', '8', '8', '--std', '0'], r'--std must be positive, got 0'),
    ('calib-missing', lambda a, d, t: _with(a, '--calib', str(t / 'nothing.npz')),
     r'data file \S+nothing.npz not found'),
    ('calib-corrupt', lambda a, d, t: _with(a, '--calib', str(d / 'garbage.npy')),
     r'cannot read \S+garbage.npy as .npy/.npz: '),
    ('calib-no-arrays', lambda a, d, t: _with(a, '--calib', str(d / 'none.npz')),
     r'\S+none.npz holds no arrays'),
    ('calib-key', lambda a, d, t: a + ['--calib-key', 'images'],
     r"\S+calib.npz has no array 'images' \(it has x, y\)"),
    ('eval-labels-missing', lambda a, d, t: a + ['--eval', str(d / 'xonly.npz')],
     r"\S+xonly.npz has no label array None \(it has x\)"),
    ('eval-label-key', lambda a, d, t: a + ['--eval', str(d / 'test.npz'),
                                            '--eval-label-key', 'labels'],
     r"\S+test.npz has no label array 'labels' \(it has x, y\)"),
    ('eval-shape', lambda a, d, t: a + ['--eval', str(d / 'eval_shape.npz')],
     r'--eval \S+eval_shape.npz: inputs have example shape \(1, 16, 16\), the calibration data '
     r'\(1, 32, 32\)'),
    ('eval-label-count', lambda a, d, t: a + ['--eval', str(d / 'eval_labels.npz')],
     r'--eval \S+eval_labels.npz: 4 inputs but 3 labels'),
    ('num-calib-examples', lambda a, d, t: a + ['--num-calib-examples', '0'],
     r'--num-calib-examples must be at least 1, got 0'),
    ('batch-size', lambda a, d, t: a + ['--batch-size', '-2'],
     r'--batch-size must be at least 1, got -2'),
    ('image-size', lambda a, d, t: a + ['--image-size', '0', '5'],
     r'--image-size H W must be positive, got 0 5'),
    ('percentile-mode', lambda a, d, t: a + ['--percentile', '99'],
     r'--percentile is used only with --calib-mode percentile \(got --calib-mode naive\)'),
    ('percentile-value', lambda a, d, t: a + ['--calib-mode', 'percentile', '--percentile',
                                              '120'],
     r'percentile must be in \(0, 100\], got 120'),
    ('exclude', lambda a, d, t: a + ['--exclude', '*nosuchlayer*'],
     r"exclude: no layer matches \['\*nosuchlayer\*'\]; layer names look like"),
    ('same-output', lambda a, d, t: a + ['--export-fast', str(t / 'e'), '--export-compact',
                                         str(t / 'e')],
     r'two outputs would be written to \S+e-0000.params, \S+e-symbol.json: give each its own '
     r'path'),
    ('calib-shape', lambda a, d, t: _with(a, '--calib', str(d / 'eval_shape.npz')),
     r"--calib \S+eval_shape.npz: calibration batches of shape \(4, 1, 16, 16\): input 'data' "
     r'of shape \(1, 1, 16, 16\) does not fit the network: layer \S+dense0_fwd rejects it'),
    ('calib-nan', None, r'--calib \S+bad.npy: calibration batch 0 holds NaN or Inf'),
    ('output-folder', lambda a, d, t: _with(a, '--out', str(t / 'nodir' / 'q')),
     r'output folder \S+nodir does not exist'),
]


@pytest.mark.parametrize('make,pattern', [c[1:] for c in CLI_ERRORS],
                         ids=[c[0] for c in CLI_ERRORS])
def test_every_cli_error_names_its_option(tiny_ckpt, tmp_path, capsys, make, pattern):
    _bad_files(tiny_ckpt)
    argv = _argv(tiny_ckpt, tmp_path / 'q')
    if make is None:                    # calibration data with an Inf
        bad = np.load(str(tiny_ckpt / 'calib.npz'))['x'].copy()
        bad[0, 0, 0, 0] = np.inf
        np.save(str(tmp_path / 'bad.npy'), bad)
        argv = _with(argv, '--calib', str(tmp_path / 'bad.npy'))
    else:
        argv = make(argv, tiny_ckpt, tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('gluonq-convert: error: ') and 'Traceback' not in err
    assert re.search(pattern, err), err
    assert os.listdir(str(tmp_path)) in ([], ['bad.npy'])     # nothing written


# --- what each option does ------------------------------------------------------------------
def _side(prefix):
    with open(str(prefix) + '.json') as f:
        return json.load(f)


def _layer_steps(side):
    return [s for s in side['steps'] if s['block'] in ('QuantizedConv2D', 'QuantizedDense')]


def test_weight_granularity_act_dtype_exclude_and_limits(tiny_ckpt, tmp_path):
    base, other = tmp_path / 'base', tmp_path / 'other'
    assert cli.main(_argv(tiny_ckpt, base)) == 0
    assert cli.main(_argv(tiny_ckpt, other, '--per-tensor', '--act-dtype', 'int8',
                          '--exclude', '*convbn0*', '--num-calib-examples', '16',
                          '--batch-size', '5')) == 0
    b, o = _side(base), _side(other)
    pb, po = mx.nd.load(str(base) + '.params'), mx.nd.load(str(other) + '.params')
    # per channel by default: one scale per output channel; --per-tensor: one per layer
    for st in _layer_steps(b):
        scale = next(v for k, v in pb.items() if k.startswith(st['name'] + '.') and
                     k.endswith('weight_scale'))
        w = next(v for k, v in pb.items() if k.startswith(st['name'] + '.') and
                 k.endswith('.weight'))
        assert scale.shape == (w.shape[0],) and w.shape[0] > 1
    assert _layer_steps(o)
    for st in _layer_steps(o):
        assert st['config']['per_channel'] is False
        assert [v.shape for k, v in po.items() if k.startswith(st['name'] + '.') and
                k.endswith('weight_scale')] == [(1,)]
    # --act-dtype int8: every activation int8; the default takes uint8 after ReLUs
    assert {q['dtype'] for q in o['qparams'].values()} == {'int8'}
    assert 'uint8' in {q['dtype'] for q in b['qparams'].values()}
    # --exclude: that layer stays float in the report and runs as a FloatOp
    def kind(side):
        return next(r['kind'] for r in side['report'] if r['node'].endswith('convbn0_conv0_fwd'))
    assert kind(o) == 'float' and kind(b).startswith('int8')
    assert o['calibration']['exclude'] == ['*convbn0*']
    assert (o['calibration']['num_examples'], o['calibration']['num_batches']) == (16, 4)
    assert (b['calibration']['num_examples'], b['calibration']['per_channel']) == (64, True)


def _assert_covers_exactly(qp, x):
    """A naive (min/max) range of data ``x``: symmetric, ``max == max|x|``; affine (the
    default for a lopsided input), ``min == min(x)`` exactly (a whole step) and ``max`` at
    or above ``max(x)``, the span at most ``1 + 1/z`` times ``max(x) - min(x)``."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if qp.get('scheme') != 'affine':
        assert qp['max'] == pytest.approx(float(np.abs(x).max()), rel=1e-5)
        return
    z = int(np.floor(-lo * 255 / (hi - lo) + 1e-4))
    assert qp['min'] == pytest.approx(lo, rel=1e-5)
    assert qp['max'] >= hi * (1 - 1e-6)
    assert qp['max'] - qp['min'] <= (hi - lo) * (1 + 1.0 / z) * (1 + 1e-5)


def test_calib_mode_is_recorded_and_changes_the_ranges(tiny_ckpt, tmp_path):
    sides = {}
    for mode, extra in (('naive', []), ('percentile', ['--percentile', '99']),
                        ('entropy', [])):
        out = tmp_path / mode
        assert cli.main(_argv(tiny_ckpt, out, '--calib-mode', mode, *extra)) == 0
        sides[mode] = _side(out)
        assert sides[mode]['calibration']['mode'] == mode
    assert sides['percentile']['calibration']['options'] == {'percentile': 99.0}
    # naive is the min/max: every other mode's threshold lies inside it, and some below it
    x = np.load(str(tiny_ckpt / 'calib.npz'))['x']
    key = 'data' if 'data' in sides['naive']['qparams'] else sorted(sides['naive']['qparams'])[0]
    _assert_covers_exactly(sides['naive']['qparams'][key], x)
    def ranges(mode):           # tensor -> max, without the per-instance name prefix
        return {re.sub(r'^tinynet\d+_', '', k): v['max']
                for k, v in sides[mode]['qparams'].items()}
    for mode in ('percentile', 'entropy'):
        ratios = [ranges(mode)[k] / v for k, v in ranges('naive').items()]
        assert max(ratios) <= 1 + 1e-6 and min(ratios) < 0.99, (mode, ratios)


def test_bias_correction_flag_gives_the_apis_corrected_biases(tiny_ckpt, tmp_path):
    """``--bias-correction`` converts as ``quantize_net(..., bias_correction=True)`` does: the
    same int32 biases, which differ from the uncorrected conversion's."""
    import mnist_models
    plain, fixed = tmp_path / 'plain', tmp_path / 'fixed'
    assert cli.main(_argv(tiny_ckpt, plain)) == 0
    assert cli.main(_argv(tiny_ckpt, fixed, '--bias-correction')) == 0
    assert 'bias_correction' not in _side(plain)['calibration']
    assert set(_side(fixed)['calibration']['bias_correction']) == \
        {s['name'] for s in _layer_steps(_side(fixed))}
    net = mnist_models.build('tiny')
    net.load_parameters(str(tiny_ckpt / 'tiny.params'))
    x = np.load(str(tiny_ckpt / 'calib.npz'))['x']
    api = gluonq.quantize_net(net, x[:512], bias_correction=True, progress=False)
    loaded = {p: gluonq.load_quantized(str(p)) for p in (plain, fixed)}

    def biases(q):
        return [value(q._children[s['name']].bias) for s in _layer_steps(q.spec)]
    for got, want in zip(biases(loaded[fixed]), biases(api)):
        np.testing.assert_array_equal(got, want)
    assert any(np.any(a != b) for a, b in zip(biases(loaded[fixed]), biases(loaded[plain])))


def test_exports_report_eval_and_overwrite(tiny_ckpt, tmp_path):
    out = tmp_path / 'q'
    argv = _argv(tiny_ckpt, out, '--export-fast', str(tmp_path / 'fast'), '--export-compact',
                 str(tmp_path / 'compact'), '--report-png', str(tmp_path / 'r.png'),
                 '--eval', str(tiny_ckpt / 'test.npz'))
    assert cli.main(argv) == 0
    assert open(str(tmp_path / 'r.png'), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    qnet = gluonq.load_quantized(str(out))
    xt = np.load(str(tiny_ckpt / 'test.npz'))['x'][:64]
    eager = qnet(mx.nd.array(xt)).asnumpy()
    qnet.hybridize()
    fast = qnet(mx.nd.array(xt)).asnumpy()
    for name, want in (('compact', eager), ('fast', fast)):     # stock MXNet, no gluonq blocks
        blk = mx.gluon.SymbolBlock.imports(str(tmp_path / (name + '-symbol.json')), ['data'],
                                           str(tmp_path / (name + '-0000.params')))
        np.testing.assert_array_equal(blk(mx.nd.array(xt)).asnumpy(), want)
    # --eval: top-1 of the float checkpoint and of the int8 one, as computed here
    d = np.load(str(tiny_ckpt / 'test.npz'))
    net = M.build('tiny')
    net.load_parameters(str(tiny_ckpt / 'tiny.params'))
    summary = _side(out)['extra']['summary']
    assert summary['fp32_top1'] == pytest.approx(
        100 * float((net(mx.nd.array(d['x'])).asnumpy().argmax(1) == d['y']).mean()))
    assert summary['int8_top1'] == pytest.approx(
        100 * float((qnet(mx.nd.array(d['x'])).asnumpy().argmax(1) == d['y']).mean()))
    # --overwrite replaces every output (here with other settings)
    before = {p: open(str(tmp_path / p), 'rb').read() for p in os.listdir(str(tmp_path))}
    assert cli.main(argv + ['--overwrite', '--per-tensor']) == 0
    after = {p: open(str(tmp_path / p), 'rb').read() for p in os.listdir(str(tmp_path))}
    assert set(after) == set(before)
    assert after['q.params'] != before['q.params'] and after['q.json'] != before['q.json']


def test_onnx_model_in_openvino_out(tiny_ckpt, tmp_path):
    """--onnx-model converts a float ONNX file (no --params) as import_onnx + quantize_net
    do, and --openvino writes an IR that OpenVINO runs in agreement with the checkpoint."""
    ov = pytest.importorskip('openvino')
    _small_onnx(str(tiny_ckpt / 'small.onnx'))
    out, xml = tmp_path / 'q', tmp_path / 'ir.xml'
    argv = ['--onnx-model', str(tiny_ckpt / 'small.onnx'), '--calib',
            str(tiny_ckpt / 'calib.npz'), '--out', str(out), '--openvino', str(xml), '--quiet']
    assert cli.main(argv) == 0
    assert sorted(os.listdir(str(tmp_path))) == ['ir.bin', 'ir.xml', 'q.json', 'q.params']
    x = np.load(str(tiny_ckpt / 'calib.npz'))['x']
    api = gluonq.quantize_net(gluonq.import_onnx(str(tiny_ckpt / 'small.onnx'),
                                                 (1, 1, 32, 32)).net, x, progress=False)
    got = gluonq.load_quantized(str(out))(mx.nd.array(x)).asnumpy()
    np.testing.assert_array_equal(got, api(mx.nd.array(x)).asnumpy())
    cm = ov.Core().compile_model(str(xml), 'CPU')
    lo = cm({cm.inputs[0]: x})[cm.outputs[0]]
    assert np.mean(lo.argmax(1) == got.argmax(1)) >= 0.95
    assert quant.sqnr_db(got, lo) >= 30


def test_failure_with_overwrite_keeps_the_old_files(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / 'q'
    assert cli.main(_argv(tiny_ckpt, out, '--export-compact', str(tmp_path / 'c'))) == 0
    before = {p: open(str(tmp_path / p), 'rb').read() for p in os.listdir(str(tmp_path))}

    def broken(*args, **kwargs):
        raise IOError('disk full')
    monkeypatch.setattr(gluonq, 'export_compact', broken)   # the checkpoint is already staged
    with pytest.raises(IOError, match='disk full'):
        cli.main(_argv(tiny_ckpt, out, '--export-compact', str(tmp_path / 'c'), '--overwrite',
                       '--per-tensor'))
    after = {p: open(str(tmp_path / p), 'rb').read() for p in os.listdir(str(tmp_path))}
    assert after == before                          # no temporary file, old files intact


_SEEN = {}


def capture(x):
    """--transform hook of the image tests: records what the network is given."""
    _SEEN['x'] = np.array(x)
    return x


def test_images_reach_the_network_as_rgb_resized_and_normalized(tiny_ckpt, tmp_path):
    """Coloured images (R, G, B distinct) from a folder and from a .rec: the network gets
    them as RGB in NCHW, resized by --image-size, with per-channel --mean/--std."""
    import cv2
    rgb = np.array([[200, 90, 20], [30, 160, 250], [120, 10, 70]], np.uint8)
    folder = tmp_path / 'imgs'
    folder.mkdir()
    rec = mx.recordio.MXRecordIO(str(tmp_path / 'c.rec'), 'w')
    for i, colour in enumerate(rgb):
        bgr = np.broadcast_to(colour[::-1], (12, 16, 3)).copy()    # OpenCV writes BGR
        cv2.imwrite(str(folder / ('%02d.png' % i)), bgr)
        rec.write(mx.recordio.pack_img(mx.recordio.IRHeader(0, 0, i, 0), bgr, img_fmt='.png'))
    rec.close()
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Conv2D(4, 3, activation='relu'), mx.gluon.nn.GlobalAvgPool2D(),
            mx.gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 6, 8)))
    net.export(str(tmp_path / 'm'))
    mean, std = np.float32([0.1, 0.2, 0.3]), np.float32([0.5, 0.25, 0.2])
    want = (rgb.astype(np.float32) / 255.0 - mean) / std                  # (image, channel)
    for calib in (str(folder), str(tmp_path / 'c.rec')):
        _SEEN.clear()
        out = tmp_path / ('q' + str(len(os.listdir(str(tmp_path)))))
        assert cli.main(['--symbol', str(tmp_path / 'm-symbol.json'), '--params',
                         str(tmp_path / 'm-0000.params'), '--calib', calib,
                         '--image-size', '6', '8', '--mean', '0.1', '0.2', '0.3',
                         '--std', '0.5', '0.25', '0.2', '--transform', 'test_cli:capture',
                         '--out', str(out), '--quiet']) == 0
        x = _SEEN['x']
        assert x.shape == (3, 3, 6, 8) and x.dtype == np.float32
        np.testing.assert_allclose(x, np.broadcast_to(want[:, :, None, None], x.shape),
                                   rtol=1e-6)
        # the network's quantized input covers exactly these values
        _assert_covers_exactly(_side(out)['qparams']['data'], want)


def test_onnx_round_float_results_from_the_command_line(tiny_ckpt, tmp_path, monkeypatch):
    """--onnx-round-float-results reaches export_onnx; without it the export is exact."""
    pytest.importorskip('onnx')
    calls = []
    real = gluonq.export_onnx

    def spy(*args, **kwargs):
        calls.append(kwargs.get('round_float_results'))
        return real(*args, **kwargs)
    monkeypatch.setattr(gluonq, 'export_onnx', spy)
    for k, flag in enumerate(([], ['--onnx-round-float-results'])):
        out, path = tmp_path / ('q%d' % k), str(tmp_path / ('q%d.onnx' % k))
        assert cli.main(_argv(tiny_ckpt, out, '--onnx', path, *flag)) == 0
    assert calls == [False, True]
