"""Same inputs, same bytes, across processes.

The shipped float ResNet-20 (``data/models/resnet20.params``) is converted with 32
calibration images in two separate Python processes, once through the API and once through
``python -m gluonq.convert``. Every file written -- the int8 checkpoint (``.params`` and
``.json``), the fast and compact MXNet exports and the ONNX model -- must be byte-identical
between the two processes. The two processes of a pair run with different
``PYTHONHASHSEED`` values, so an output that depends on the iteration order of a set or
on ``hash()`` of a string differs between them (within one process it would not).
"""
import filecmp
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, 'examples')
N_CALIB = 32

#: the files each conversion writes, relative to its output folder
FILES = ['q.params', 'q.json', 'fast-symbol.json', 'fast-0000.params',
         'compact-symbol.json', 'compact-0000.params', 'q.onnx']

_API = textwrap.dedent('''
    import sys
    out, n = sys.argv[1], int(sys.argv[2])
    import gluonq
    import mnist_models as M
    x, _ = M.load('train', n)
    qnet = gluonq.quantize_net(M.pretrained('resnet20'), x, progress=False)
    gluonq.save_quantized(qnet, out + '/q')
    gluonq.export_fast(qnet, out + '/fast')
    gluonq.export_compact(qnet, out + '/compact')
    gluonq.export_onnx(qnet, out + '/q.onnx')
''')


def _cli_argv(out):
    return ['-m', 'gluonq.convert', '--model', 'cifar_resnet20_v1', '--classes', '10',
            '--params', os.path.join(ROOT, 'data', 'models', 'resnet20.params'),
            '--calib', os.path.join(ROOT, 'data', 'mnist.npz'), '--calib-key', 'x_train',
            '--transform', 'mnist_models:preprocess', '--num-calib-examples', str(N_CALIB),
            '--out', out + '/q', '--export-fast', out + '/fast',
            '--export-compact', out + '/compact', '--onnx', out + '/q.onnx', '--quiet']


def _run_pair(tmp_path, argv_of):
    """Run ``python argv_of(folder)`` in two processes at once (different hash seeds);
    return their output folders."""
    folders, procs = [], []
    for seed in ('1', '2'):
        d = tmp_path / ('run' + seed)
        d.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS='1',
                   PYTHONPATH=os.pathsep.join([EXAMPLES, os.environ.get('PYTHONPATH', '')]))
        procs.append(subprocess.Popen([sys.executable] + argv_of(str(d)), cwd=str(d), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        folders.append(d)
    for p in procs:
        log = p.communicate(timeout=600)[0].decode(errors='replace')
        assert p.returncode == 0, log[-3000:]
    return folders


def _assert_identical(a, b):
    assert sorted(os.listdir(str(a))) == sorted(os.listdir(str(b))), 'different file sets'
    for name in FILES:
        assert os.path.getsize(str(a / name)) > 0, name
        assert filecmp.cmp(str(a / name), str(b / name), shallow=False), \
            '%s differs between two processes' % name


@pytest.mark.parametrize('how', ['api', 'cli'])
def test_conversion_is_byte_identical_across_processes(tmp_path, how):
    if how == 'api':
        a, b = _run_pair(tmp_path, lambda d: ['-c', _API, d, str(N_CALIB)])
    else:
        a, b = _run_pair(tmp_path, _cli_argv)
    _assert_identical(a, b)
