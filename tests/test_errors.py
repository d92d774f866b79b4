"""Every public error of gluonq's API: each bad input raises gluonq's own message, naming the
layer, parameter, input or file and what was expected (not MXNet's internals)."""
import json
import os
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluonq
from gluonq import debug
from gluonq import nn as qnn
from gluonq.calibration.collect import CalibrationDataError, as_batches
from gluonq.calibration.observers import PercentileObserver
from gluonq.convert.qnet import FloatOp
from gluonq.export import CheckpointError
from gluonq.nn._base import IntParameter


def _float_net():
    """conv(3->4)+relu -> maxpool -> flatten -> dense(64->5), for (N, 3, 8, 8) inputs."""
    mx.random.seed(1)
    net = nn.HybridSequential(prefix='net_')
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, padding=1, in_channels=3, activation='relu'), nn.MaxPool2D(),
                nn.Flatten(), nn.Dense(5, in_units=64))
    net.initialize(mx.init.Xavier())
    return net


def _calib():
    return np.random.RandomState(0).rand(16, 3, 8, 8).astype(np.float32)


@pytest.fixture(scope='module')
def qnet():
    return gluonq.quantize_net(_float_net(), _calib(), progress=False)


def _qtensor(dtype):
    q = qnn.Quantize(in_range=(0, 1) if dtype == 'uint8' else (-1, 1), out_dtype=dtype)
    q.initialize()
    return q(mx.nd.ones((1, 2, 4, 4)))


def _conv_residual_float():
    layer = qnn.QuantizedConv2D(2, 1, in_channels=2, in_range=(0, 1), out_range=(0, 2),
                                residual=True)
    layer.initialize()
    layer(mx.nd.ones((1, 2, 4, 4)), mx.nd.ones((1, 2, 4, 4)))


def _int32_into_int8(tmp_path):
    layer = qnn.QuantizedDense(3, in_units=4, in_range=(0, 1), prefix='fc_')
    layer.initialize()
    path = str(tmp_path / 'fc.params')
    layer.save_parameters(path)
    arrays = mx.nd.load(path)
    arrays['weight'] = arrays['weight'].astype('int32')
    mx.nd.save(path, arrays)
    layer.load_parameters(path)


def _float_block():
    class Eager(nn.Block):
        def forward(self, x):
            return x
    return Eager()


# (id, exception, message pattern, call(tmp_path))
BLOCK_CASES = [
    ('int-param-random-init', ValueError, r"integer parameter 'w' cannot use initializer",
     lambda t: IntParameter('w', (2,), 'int8', init=mx.init.Uniform())),
    ('int32-file-into-int8-param', ValueError,
     r"cannot load parameter 'fc_weight': it holds int8 values, the file has int32",
     _int32_into_int8),
    ('range-not-finite', ValueError,
     r"QuantizedDense 'fc' in_range: range must be finite with min <= max, got \[0, nan\]",
     lambda t: qnn.QuantizedDense(3, in_range=(0, np.nan), prefix='fc_')),
    ('out-range-with-float-output', ValueError,
     r"QuantizedDense 'fc': out_range is only used with out_dtype 'int8', 'uint8' or 'auto'",
     lambda t: qnn.QuantizedDense(3, out_dtype='float32', out_range=(0, 1), prefix='fc_')),
    ('unknown-out-dtype', ValueError,
     r"QuantizedDense 'fc': out_dtype must be 'float32', 'auto', 'int8' or 'uint8', got 'int4'",
     lambda t: qnn.QuantizedDense(3, out_dtype='int4', prefix='fc_')),
    ('concat-float-output', ValueError,
     r"QuantizedConcat 'cat': out_dtype must be 'auto', 'int8' or 'uint8', got 'float32'",
     lambda t: qnn.QuantizedConcat(out_dtype='float32', prefix='cat_')),
    ('unknown-in-dtype', ValueError,
     r"QuantizedConv2D 'c': in_dtype must be 'auto', 'int8' or 'uint8', got 'int16'",
     lambda t: qnn.QuantizedConv2D(4, 3, in_dtype='int16', prefix='c_')),
    ('unknown-in-dtype-with-range', ValueError,
     r"quantized dtype must be 'auto', 'int8' or 'uint8', got 'int16'",
     lambda t: qnn.QuantizedDense(3, in_range=(0, 1), in_dtype='int16')),
    ('conv-layout', ValueError, r"QuantizedConv2D supports layout 'NCHW' only, got 'NHWC'",
     lambda t: qnn.QuantizedConv2D(4, 3, layout='NHWC')),
    ('conv-groups', ValueError,
     r'QuantizedConv2D: channels \(6\) and in_channels \(8\) must be divisible by groups \(4\)',
     lambda t: qnn.QuantizedConv2D(6, 3, groups=4, in_channels=8)),
    ('conv-from-dense', TypeError, r'QuantizedConv2D.from_float needs an nn.Conv2D, got Dense',
     lambda t: qnn.QuantizedConv2D.from_float(nn.Dense(3))),
    ('conv1d-from-conv2d', TypeError,
     r'QuantizedConv1D.from_float needs an nn.Conv1D, got Conv2D',
     lambda t: qnn.QuantizedConv1D.from_float(nn.Conv2D(3, 3))),
    ('dense-from-conv', TypeError, r'QuantizedDense.from_float needs an nn.Dense, got Conv2D',
     lambda t: qnn.QuantizedDense.from_float(nn.Conv2D(3, 3))),
    ('quantize-out-dtype', ValueError,
     r"out_dtype must be 'auto', 'int8' or 'uint8', got 'int4'",
     lambda t: qnn.Quantize(out_dtype='int4')),
    ('quantize-quantized', TypeError, r"Quantize 'quantize\d*': input is already quantized",
     lambda t: qnn.Quantize()(_qtensor('int8'))),
    ('quantize-float16', TypeError, r'Quantize .*expected float32 input, got float16',
     lambda t: qnn.Quantize()(mx.nd.ones((2, 2), dtype='float16'))),
    ('dequantize-float', TypeError,
     r'Dequantize .*expected a QTensor \(data, min, max\), got NDArray',
     lambda t: qnn.Dequantize()(mx.nd.ones((2, 2)))),
    ('activation-kind', ValueError, r"QuantizedActivation supports 'relu' only, got 'tanh'",
     lambda t: qnn.QuantizedActivation('tanh')),
    ('activation-in-dtype', ValueError, r"in_dtype must be 'int8' or 'uint8', got 'int4'",
     lambda t: qnn.QuantizedActivation(in_dtype='int4')),
    ('activation-wrong-dtype', TypeError,
     r"QuantizedActivation .*expected a int8 input tensor, got uint8 \(build the block with "
     r"in_dtype='uint8'\)",
     lambda t: qnn.QuantizedActivation(in_dtype='int8')(_qtensor('uint8'))),
    ('add-activation', ValueError,
     r"QuantizedAdd supports activation None or 'relu', got 'sigmoid'",
     lambda t: qnn.QuantizedAdd(activation='sigmoid')),
    ('add-float-operand', TypeError, r'QuantizedAdd .*expected a QTensor',
     lambda t: qnn.QuantizedAdd()(mx.nd.ones((1, 2)), mx.nd.ones((1, 2)))),
    ('pool-layout', ValueError, r"QuantizedMaxPool2D supports layout NCHW only, got 'NHWC'",
     lambda t: qnn.QuantizedMaxPool2D(layout='NHWC')),
    ('residual-float-with-int8-output', TypeError,
     r'QuantizedConv2D .*with int8 output the residual input must be a QTensor',
     lambda t: _conv_residual_float()),
    ('int-uniform-bounds', ValueError, r'IntUniform needs low <= high, got 5 > 1',
     lambda t: gluonq.init.IntUniform(5, 1)),
    ('percentile-range', ValueError, r'percentile must be in \(0, 100\], got 0',
     lambda t: PercentileObserver(percentile=0)),
    ('float-op-unknown', ValueError, r"MXNet has no operator 'NoSuchOp'",
     lambda t: FloatOp('NoSuchOp', {}, 1)(mx.nd.ones(2))),
]


@pytest.mark.parametrize('exc,pattern,call', [c[1:] for c in BLOCK_CASES],
                         ids=[c[0] for c in BLOCK_CASES])
def test_block_errors(exc, pattern, call, tmp_path):
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


# --- the converter and its calibration data ------------------------------------------------
def _uninitialized():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3))
    return net


def _float16():
    net = _float_net()
    net.cast('float16')
    return net


X = _calib   # a fresh (16, 3, 8, 8) float32 array per call
CONVERT_CASES = [
    ('act-dtype', ValueError, r"act_dtype must be 'auto', 'int8' or 'uint8', got 'int4'",
     lambda: gluonq.quantize_net(_float_net(), X(), act_dtype='int4', progress=False)),
    ('calib-mode', ValueError, r"unknown calib_mode 'bogus': expected one of entropy, minmax",
     lambda: gluonq.quantize_net(_float_net(), X(), calib_mode='bogus', progress=False)),
    ('not-hybrid', TypeError, r'gluonq needs a HybridBlock \(hybridizable network\), got Eager',
     lambda: gluonq.quantize_net(_float_block(), X(), progress=False)),
    ('uninitialized', ValueError, r'the float network is not initialized',
     lambda: gluonq.quantize_net(_uninitialized(), X(), progress=False)),
    ('float16-network', ValueError, r"parameter '.*weight' is float16: gluonq converts float32",
     lambda: gluonq.quantize_net(_float16(), X(), progress=False)),
    ('calib-rank', CalibrationDataError,
     r"calibration batches of shape \(16, 8, 8\): input 'data' of shape \(1, 8, 8\) does not "
     r"fit the network: layer net_conv0_fwd rejects it \(.*Input data should be 4D.*\); its "
     r"first layer takes \(N, 3, H, W\) inputs \(net_conv0_fwd\)",
     lambda: gluonq.quantize_net(_float_net(), X()[:, 0], progress=False)),
    ('calib-channels', CalibrationDataError,
     r"calibration batches of shape \(16, 1, 8, 8\): .* layer net_conv0_fwd rejects it "
     r"\(Shape inconsistent.*\); its first layer takes \(N, 3, H, W\) inputs \(net_conv0_fwd\)",
     lambda: gluonq.quantize_net(_float_net(), X()[:, :1], progress=False)),
    ('calib-spatial', CalibrationDataError,
     r"calibration batches of shape \(16, 3, 4, 4\): .* layer net_dense0_fwd rejects it "
     r"\(Shape inconsistent, Provided = \[5,64\], inferred shape=\(5,16\)\)",
     lambda: gluonq.quantize_net(_float_net(), X()[:, :, :4, :4], progress=False)),
    ('calib-not-iterable', CalibrationDataError,
     r'calib_data must be a numpy array, an NDArray, a DataLoader or an iterable of batches, '
     r'got int', lambda: as_batches(5)),
    ('calib-empty-tuple', CalibrationDataError, r'calibration batch 0 is an empty tuple',
     lambda: as_batches([()])),
    ('calib-no-batch-axis', CalibrationDataError,
     r'calibration batch 0 has shape \(3,\): expected \(batch, ...\) with at least one example',
     lambda: as_batches([np.zeros(3, np.float32)])),
    ('calib-label-type', CalibrationDataError,
     r'calibration batch 0 \(label\): expected an NDArray or numpy array, got list',
     lambda: as_batches([(np.zeros((2, 3), np.float32), [0, 1])])),
    ('num-examples', CalibrationDataError, r'num_examples must be a positive integer, got 0',
     lambda: gluonq.quantize_net(_float_net(), X(), num_calib_examples=0, progress=False)),
    ('num-batches', CalibrationDataError, r'num_batches must be a positive integer, got -1',
     lambda: gluonq.quantize_net(_float_net(), X(), num_calib_batches=-1, progress=False)),
    ('batch-size', CalibrationDataError, r'batch_size must be a positive integer, got 0',
     lambda: gluonq.quantize_net(_float_net(), X(), batch_size=0, progress=False)),
]


@pytest.mark.parametrize('exc,pattern,call', [c[1:] for c in CONVERT_CASES],
                         ids=[c[0] for c in CONVERT_CASES])
def test_converter_errors(exc, pattern, call):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                # MXNet's "cannot decide type" notes
        with pytest.raises(exc, match=pattern):
            call()


def test_calibration_shape_error_prints_no_mxnet_dump(capfd):
    with pytest.raises(CalibrationDataError):
        gluonq.quantize_net(_float_net(), _calib()[:, 0], progress=False)
    out, err = capfd.readouterr()
    assert 'infer_shape error' not in out + err


def test_integer_calibration_data_warns_at_the_callers_line():
    x = (np.random.RandomState(0).rand(16, 3, 8, 8) * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match=r'calibration batch 0 holds uint8 values \(0\.\.25\d\): '
                                         r'is it normalized') as rec:
        q = gluonq.quantize_net(_float_net(), x, progress=False)
    assert rec[0].filename == __file__
    # taken as it is: the same ranges as the same values in float32
    assert q.qparams == gluonq.quantize_net(_float_net(), x.astype(np.float32),
                                            progress=False).qparams
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        as_batches(x.astype(np.float32) / 255)         # normalized data: no warning


# --- the converted network at inference -----------------------------------------------------
@pytest.mark.parametrize('mode', ['eager', 'hybridized', 'fast'])
def test_inference_with_a_wrong_shape_names_the_expected_one(qnet, mode):
    if mode == 'eager':
        qnet.hybridize(False)
    else:
        qnet.hybridize(fast=mode == 'fast', exact=True)
    x = _calib()
    want = r"QuantizedNet input 'data' has shape %s; the network was converted for inputs of " \
        r"shape \(N, 3, 8, 8\) \(any batch size N\), and operator \S+ rejects it"
    for bad, layer in ((x[:, 0], 'conv'), (x[:, :2], 'conv'), (x[:, :, :4, :4], 'dense')):
        if mode == 'eager':         # the layers check their inputs and name themselves
            pattern = r"Quantized%s '\S*net_%s0': " % (
                'Conv2D' if layer == 'conv' else 'Dense', layer)
        else:
            pattern = want % (r'\(%s\)' % ', '.join(map(str, bad.shape)))
        with pytest.raises(ValueError, match=pattern):
            qnet(mx.nd.array(bad))
    assert qnet(mx.nd.array(x[:, :, :, :])).shape == (16, 5)    # a good input still runs
    qnet.hybridize(False)


def test_nan_and_inf_inputs(qnet):
    """int8 has no NaN: by default a NaN or Inf input gives finite outputs (documented; the
    float network's fused ReLU also maps NaN to 0 here); with check_finite the call raises,
    naming the input and the examples, and leaves good inputs' results unchanged."""
    x = _calib()
    x[1, 0, 2, 2] = np.nan
    x[4, 2, 0, 0] = -np.inf
    for fast in (None, True):
        if fast:
            qnet.hybridize(exact=True)
        assert np.isfinite(qnet(mx.nd.array(x)).asnumpy()).all()     # masked, by default
        qnet.check_finite = True
        with pytest.raises(ValueError, match=r"QuantizedNet input 'data' holds NaN or Inf in "
                                             r"example\(s\) \[1, 4\] of 16"):
            qnet(mx.nd.array(x))
        good = _calib()
        np.testing.assert_array_equal(qnet(mx.nd.array(good)).asnumpy(),
                                      _unchecked(qnet, good))
        qnet.check_finite = False
    qnet.hybridize(False)
    spec_net = gluonq.QuantizedNet(qnet.spec, check_finite=True)
    assert spec_net.check_finite


def _unchecked(qnet, x):
    qnet.check_finite = False
    try:
        return qnet(mx.nd.array(x)).asnumpy()
    finally:
        qnet.check_finite = True


# --- checkpoints and exports ----------------------------------------------------------------
def test_save_quantized_takes_a_quantized_net(tmp_path):
    with pytest.raises(TypeError, match='save_quantized takes a QuantizedNet, got '
                                        'HybridSequential'):
        gluonq.save_quantized(_float_net(), str(tmp_path / 'x'))
    with pytest.raises(TypeError, match='lower takes a QuantizedNet, got HybridSequential'):
        gluonq.lower.lower(_float_net())


def _damage(prefix, ext, data):
    with open(prefix + ext, 'wb') as f:
        f.write(data)


def test_load_quantized_names_the_damaged_file(qnet, tmp_path):
    prefix = str(tmp_path / 'q')
    gluonq.save_quantized(qnet, prefix)
    params, side = open(prefix + '.params', 'rb').read(), open(prefix + '.json', 'rb').read()
    spec = json.loads(side)
    arrays = mx.nd.load(prefix + '.params')
    scale = sorted(k for k in arrays if k.endswith('weight_scale'))[0]
    arrays[scale] = mx.nd.ones((7,))
    wrong_shape = str(tmp_path / 'shape.params')
    mx.nd.save(wrong_shape, arrays)
    mx.nd.save(str(tmp_path / 'list.params'), [mx.nd.zeros(3)])
    bad_block = dict(spec, steps=[dict(s, block='NoSuchBlock') for s in spec['steps']])
    bad_config = dict(spec, steps=[dict(s, config=dict(s['config'], bogus=1))
                                   for s in spec['steps']])
    p, j = re_escape(prefix + '.params'), re_escape(prefix + '.json')
    cases = [
        ('.params', params[:len(params) // 2],
         p + r' is not a readable MXNet \.params file \(truncated or corrupt\?\): expected the '
             r'arrays save_quantized wrote for ' + j),
        ('.params', b'', p + r' is not a readable MXNet \.params file'),
        ('.params', open(str(tmp_path / 'list.params'), 'rb').read(),
         p + r' holds unnamed arrays: expected the named parameters save_quantized writes'),
        ('.params', open(wrong_shape, 'rb').read(),
         p + r' does not match ' + j + r': parameter %s has shape \(7,\), the network expects '
             r'\(4,\)' % re_escape(scale)),
        ('.json', side[:len(side) // 2],
         j + r' is not a JSON sidecar \(truncated or corrupt\?\)'),
        ('.json', b'\xff\xfe\x00', j + r' is not a JSON sidecar'),
        ('.json', b'[1, 2]', j + r' is not a gluonq checkpoint sidecar \(expected "format": '
                                 r"'gluonq.QuantizedNet', got 'list'\)"),
        ('.json', json.dumps(bad_block).encode(),
         j + r' is a damaged gluonq sidecar: cannot rebuild the network \(\w+Error: .*'
             r'NoSuchBlock'),
        ('.json', json.dumps(bad_config).encode(),
         j + r" is a damaged gluonq sidecar: cannot rebuild the network \(TypeError: .*'bogus'"),
    ]
    for ext, data, pattern in cases:
        _damage(prefix, '.params', params)
        _damage(prefix, '.json', side)
        _damage(prefix, ext, data)
        with pytest.raises(CheckpointError, match=pattern):
            gluonq.load_quantized(prefix)
    os.remove(prefix + '.json')
    with pytest.raises(FileNotFoundError, match='gluonq checkpoint file %s not found' % j):
        gluonq.load_quantized(prefix)


def re_escape(s):
    import re
    return re.escape(s)


WRITERS = [
    ('save_quantized', lambda q, p: gluonq.save_quantized(q, p), ('.params', '.json')),
    ('export_fast', lambda q, p: gluonq.export_fast(q, p), ('-symbol.json', '-0000.params')),
    ('export_compact', lambda q, p: gluonq.export_compact(q, p),
     ('-symbol.json', '-0000.params')),
]


@pytest.mark.parametrize('write,suffixes', [w[1:] for w in WRITERS], ids=[w[0] for w in WRITERS])
def test_writers_refuse_to_overwrite_and_leave_nothing_half_written(qnet, tmp_path, monkeypatch,
                                                                     write, suffixes):
    prefix = str(tmp_path / 'm')
    for kept in suffixes:               # either file of the pair alone blocks the write
        with open(prefix + kept, 'w') as f:
            f.write('mine')
        with pytest.raises(FileExistsError, match=r'refusing to overwrite %s \(pass '
                                                  r'overwrite=True' % re_escape(prefix + kept)):
            write(qnet, prefix)
        assert sorted(os.listdir(str(tmp_path))) == ['m' + kept]
        assert open(prefix + kept).read() == 'mine'
        os.remove(prefix + kept)
    with pytest.raises(FileNotFoundError, match=r'output folder %s does not exist'
                       % re_escape(str(tmp_path / 'nodir'))):
        write(qnet, str(tmp_path / 'nodir' / 'm'))

    def broken(*args, **kwargs):
        raise IOError('disk full')
    monkeypatch.setattr(mx.nd, 'save', broken)      # every writer saves its arrays last
    with pytest.raises(IOError, match='disk full'):
        write(qnet, prefix)
    assert os.listdir(str(tmp_path)) == []


def test_onnx_export_argument_errors(qnet):
    pytest.importorskip('onnx')
    with pytest.raises(ValueError, match=r"act_dtype must be 'uint8' \(onnxruntime's fast U8S8 "
                                         r"path\) or 'int8', got 'int4'"):
        gluonq.onnx.to_onnx(qnet, act_dtype='int4', weight_dtype='uint8')
    with pytest.raises(ValueError, match=r'export_onnx: input_shape must be \(batch, channels, '
                                         r'...\) with positive sizes, got \(3,\)'):
        gluonq.onnx.to_onnx(qnet, input_shape=(3,), weight_dtype='uint8')
    with pytest.raises(ValueError, match=r"target must be one of 'onnxruntime', 'openvino' "
                                         r"\(the runtime the graph is laid out for\), got "
                                         r"'tensorrt'"):
        gluonq.onnx.to_onnx(qnet, target='tensorrt')
    import onnx
    with pytest.raises(ValueError, match='this ONNX model was not written by '
                                         'gluonq.export_onnx'):
        gluonq.onnx.tensor_names(onnx.ModelProto())


def test_debug_compare_with_another_float_network(qnet):
    other = nn.HybridSequential()
    other.add(nn.Conv2D(4, 3, padding=1, in_channels=3), nn.Flatten(), nn.Dense(5))
    other.initialize()
    with pytest.raises(ValueError, match=r'the float network has no tensors \[.*\]: is it the '
                                         r'network that was quantized\?'):
        debug.compare(other, qnet, _calib())
