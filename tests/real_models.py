"""The rapidocr models as test cases (examples/ocr_data.py), shared by tests/test_real_*.py.

Each model is imported with ``gluonq.import_onnx``, converted by ``gluonq.quantize_net`` on
rendered calibration images and run four ways (:data:`RUNS`): eager (the reference chain),
hybridized (oneDNN's fused int8 kernels), ``gluonq.export_onnx`` in onnxruntime, and
``gluonq.export_fast`` reloaded in stock MXNet with ``SymbolBlock.imports``. References
that do not come from the code under test: the labels, strings and text boxes the images
were rendered with, the fp32 network, and onnxruntime's own ``quantize_static``
(per-channel MinMax, ``benchmarks/bench_onnx.py``) on the same calibration images.

Accuracy drops are paired: the int8 network and fp32 score the same images, and the drop
counts the images fp32 gets right and int8 wrong minus the converse. The test sets are
large enough that the bar (0.5 point of top-1 or exact match, 1 point of box F1) is several
images or boxes, so that no single borderline image decides a test; ``benchmarks/
bench_real_models.py`` measures the same quantities on larger sets. Each model's tests are
a file of their own, so that pytest-xdist runs them on different workers.
"""
import os
import sys

import mxnet as mx
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
ocr_data = pytest.importorskip('ocr_data')

import gluonq  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
from bench_onnx import ort_quantize_static  # noqa: E402,F401

CALIB_MODES = ('naive', 'percentile', 'entropy', 'mse')
RUNS = ('eager', 'fast', 'onnx', 'fast-export')
CALIB_SEED, TEST_SEED = 1000, 0
#: cls: 400 test images, so the 0.5-point bar is 2 images
CLS_CALIB, CLS_TEST = 32, 400
#: rec: 400 lines of width 160 (up to 8 characters), the 0.5-point bar is 2 lines
REC_CALIB, REC_TEST, REC_WIDTH = 16, 400, 160
#: det: 24 pages of 256x256 (about 270 text lines), the 1-point F1 bar is several boxes
DET_CALIB, DET_TEST, DET_SIZE = 8, 24, (256, 256)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def batched(fn, x, bs):
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def every_run(qnet, x, bs, shape, tmp, post=lambda y: y, exact=False):
    """``{run: post(outputs)}`` of the converted ``qnet`` on ``x`` for each of RUNS; ``post``
    reduces each batch's output (the recognizer's to strings); ``exact`` is passed to the
    fast path and the fast export."""
    def over(fn):
        out = [post(fn(x[i:i + bs])) for i in range(0, len(x), bs)]
        return np.concatenate(out) if isinstance(out[0], np.ndarray) else sum(out, [])
    res = {'eager': over(lambda b: qnet(mx.nd.array(b)).asnumpy())}
    qnet.hybridize(exact=exact)
    res['fast'] = over(lambda b: qnet(mx.nd.array(b)).asnumpy())
    path = os.path.join(tmp, 'int8.onnx')
    gluonq.export_onnx(qnet, path, input_shape=(1,) + tuple(shape), overwrite=True)
    sess = session(path)
    name = sess.get_inputs()[0].name
    res['onnx'] = over(lambda b: sess.run(None, {name: b})[0])
    sym, params = gluonq.export_fast(qnet, os.path.join(tmp, 'fast'), overwrite=True,
                                     exact=exact)
    stock = mx.gluon.SymbolBlock.imports(sym, ['data'], params)
    res['fast-export'] = over(lambda b: stock(mx.nd.array(b)).asnumpy())
    return res


def paired_drop(ref_right, right):
    """Points of accuracy lost on the same examples, and the two discordant counts."""
    ref_right, right = np.asarray(ref_right, bool), np.asarray(right, bool)
    lost, gained = int((ref_right & ~right).sum()), int((~ref_right & right).sum())
    return 100.0 * (lost - gained) / len(right), lost, gained


def imported(kind, shape, tmp=None):
    """The float network of ``kind`` (cls and rec without their softmax: logits) and the
    ONNX file it was imported from (written to ``tmp`` for cls and rec)."""
    if kind == 'det':
        path = ocr_data.model_path(kind)
    else:
        path = os.path.join(tmp, '%s-logits.onnx' % kind)
        onnx.save(ocr_data.logits_model(kind), path)
    net = gluonq.import_onnx(path, (1,) + tuple(shape)).net
    net.hybridize(static_alloc=True)
    return net, path

