"""gluonq-convert: inputs, outputs, errors."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import gluonq
from gluonq import cli

import mnist_models as M


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
    this CPU). Where onnxruntime computes exactly (uint8 weights, or int8 weights on a CPU
    with VNNI) its logits match the int8 checkpoint's own (gluonq's reference chain) within
    the bound the classifier's scales allow for a few rounding-tie differences; the
    saturating case is test_onnx's."""
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
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: xt})[0]
    assert got.shape == ref.shape
    if weights == 'uint8' or gonnx.ort_u8s8_exact():
        # one step of the classifier's input moves a logit by at most s_x * max|s_w q_w|
        fc = qnet._children[qnet.spec['steps'][-1]['name']]
        w = fc.weight.data().asnumpy().astype(np.float64)
        step = float(fc._in_q.scale) * np.abs(
            w * fc.weight_scale.data().asnumpy()[:, None]).sum(1)
        assert (np.abs(got - ref) <= 3 * step[None] + 1e-4 * np.abs(ref).max()).all()
