"""rapidocr's text-direction classifier: every calibration mode, every runtime, against fp32
and onnxruntime's own int8 model (tests/real_models.py)."""
import os

import mxnet as mx
import pytest

import gluonq
from gluonq import quant
from real_models import (CALIB_SEED, TEST_SEED, RUNS, batched, every_run, imported,
                         ocr_data, ort_quantize_static, paired_drop, session)

CALIB_MODES = ('naive', 'percentile', 'entropy', 'mse')
#: 400 test images, so the 0.5-point bar is 2 images
CLS_CALIB, CLS_TEST = 32, 400


@pytest.fixture(scope='module')
def cls_case(tmp_path_factory):
    shape = ocr_data.CLS_SHAPE
    tmp = str(tmp_path_factory.mktemp('cls'))
    net, path = imported('cls', shape, tmp)
    calib, _ = ocr_data.cls_batch(CLS_CALIB, CALIB_SEED)
    x, y = ocr_data.cls_batch(CLS_TEST, TEST_SEED)
    fp32 = batched(lambda b: net(mx.nd.array(b)).asnumpy(), x, 100)
    # onnxruntime's symbolic shape inference fails on this model (an assertion on a Concat
    # of axis -1): quant_pre_process without it (ONNX's own shape inference runs)
    qs = ort_quantize_static(path, os.path.join(tmp, 'qs.onnx'), calib,
                             pre_process_options={'skip_symbolic_shape': True})
    sess = session(qs)
    name = sess.get_inputs()[0].name
    ort_q = batched(lambda b: sess.run(None, {name: b})[0], x, 100)
    return {'net': net, 'calib': calib, 'x': x, 'y': y, 'fp32': fp32, 'shape': shape,
            'ort_sqnr': quant.sqnr_db(fp32, ort_q)}


@pytest.mark.parametrize('mode', CALIB_MODES)
def test_cls_every_mode_and_runtime_keeps_top1_and_beats_onnxruntime(cls_case, mode, tmp_path):
    c = cls_case
    assert c['fp32'].shape == (CLS_TEST, 2)
    fp32_right = c['fp32'].argmax(1) == c['y']
    assert fp32_right.mean() >= 0.95                    # the renderer makes real text lines
    # affine (zero-point) inputs where the range is lopsided: the hardswish outputs
    qnet = gluonq.quantize_net(c['net'], c['calib'], calib_mode=mode, act_scheme='auto',
                               progress=False)
    assert any(s['config'].get('scheme') == 'affine' for s in qnet.spec['steps'])
    outs = every_run(qnet, c['x'], 100, c['shape'], str(tmp_path))
    got = {}
    for run in RUNS:
        assert outs[run].shape == c['fp32'].shape, run
        drop, lost, gained = paired_drop(fp32_right, outs[run].argmax(1) == c['y'])
        got[run] = {'drop': drop, 'lost': lost, 'gained': gained,
                    'sqnr': round(quant.sqnr_db(c['fp32'], outs[run]), 2)}
    assert all(g['drop'] <= 0.5 for g in got.values()), got
    short = [run for run, g in got.items() if g['sqnr'] < c['ort_sqnr']]
    assert not short, (got, c['ort_sqnr'])

