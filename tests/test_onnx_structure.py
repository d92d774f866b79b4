"""What onnxruntime and OpenVINO run for gluonq's QDQ graph, against onnxruntime's own int8.

Structure does not depend on the CPU's speed: onnxruntime's optimized graph
(``SessionOptions.optimized_model_filepath``) and OpenVINO's runtime model (``layerType``,
``runtimePrecision``) are read on any CPU. Two small nets at small sizes: gluoncv's
``resnet18_v1`` (residual adds with ReLU, gluonq int8 outputs 0..127, global average
pooling) and a net of gluoncv ``BottleneckV1`` blocks (ResNet-50 v1's: two strided 1x1
convolutions reading one tensor). onnxruntime reads the default export
(``target='onnxruntime'``), OpenVINO the one laid out for it (``target='openvino'``, what
``export_openvino`` converts). Expected counts come from the QuantizedNet's steps; the
anchor is ``onnxruntime.quantization.quantize_static`` (QDQ, U8S8, per channel) of the same
float network. Where gluonq's rewrites could change integers (global average pooling,
subsampling before a strided 1x1 convolution) onnxruntime's integers, fed gluonq's own
integer inputs, are compared with gluonq's.
"""
import os
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon import nn

import gluonq
from gluonq import quant

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
ov = pytest.importorskip('openvino')
gluoncv = pytest.importorskip('gluoncv')
import gluonq.onnx as gonnx                                     # noqa: E402
from gluonq.openvino import runtime_precisions                  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
from bench_onnx import export_fp32, ort_quantize_static       # noqa: E402
from param_values import value  # noqa: E402

#: the weight type whose onnxruntime integers are exact on this CPU (see test_onnx.py)
WEIGHTS = 'int8' if gonnx.ort_u8s8_exact() else 'uint8'


class Bottlenecks(gluon.HybridBlock):
    """A stem and two gluoncv ResNet-50 v1 bottlenecks (the first one downsampling with
    two strided 1x1 convolutions of its input), global average pooling over 15 x 15 (an
    odd count) and a classifier."""

    def __init__(self, **kw):
        super().__init__(**kw)
        from gluoncv.model_zoo.resnet import BottleneckV1
        with self.name_scope():
            self.stem = nn.HybridSequential()
            self.stem.add(nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(),
                          nn.Activation('relu'))
            self.b1 = BottleneckV1(32, 2, downsample=True, in_channels=16)
            self.b2 = BottleneckV1(32, 1, in_channels=32)
            self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        x = self.b2(self.b1(self.stem(x)))
        return self.fc(F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg'))


def _randomize_bn(net, seed):
    r = np.random.RandomState(seed)
    for name, p in net.collect_params().items():
        n = p.shape[0]
        if name.endswith('running_mean') or name.endswith('beta'):
            p.set_data(mx.nd.array(r.normal(0, 0.1, n)))
        elif name.endswith('running_var') or name.endswith('gamma'):
            p.set_data(mx.nd.array(r.uniform(0.5, 1.5, n)))


def _build(kind):
    mx.random.seed(0)
    if kind == 'resnet18_v1':
        from gluoncv.model_zoo import get_model
        net, shape = get_model('resnet18_v1', pretrained=False), (3, 64, 64)
    else:
        net, shape = Bottlenecks(), (3, 30, 30)
    net.initialize(mx.init.Xavier(magnitude=2))
    net(mx.nd.zeros((1,) + shape))
    _randomize_bn(net, 0)
    x = np.random.RandomState(1).uniform(-2, 2, (8,) + shape).astype(np.float32)
    return net, x


@pytest.fixture(scope='module', params=['resnet18_v1', 'bottlenecks'])
def case(request, tmp_path_factory):
    """(kind, qnet, calibration images, {target: gluonq's ONNX path}, onnxruntime's own QDQ
    path)."""
    tmp = tmp_path_factory.mktemp(request.param)
    net, x = _build(request.param)
    qnet = gluonq.quantize_net(net, x, calib_mode='naive', progress=False)
    gq = {t: str(tmp / ('gluonq-%s.onnx' % t)) for t in gonnx.TARGETS}
    for t, path in gq.items():       # OpenVINO's target takes int8 weights on any CPU
        gonnx.export_onnx(qnet, path, input_shape=(1,) + x.shape[1:], target=t,
                          weight_dtype=WEIGHTS if t == 'onnxruntime' else 'auto')
    fp32, anchor = str(tmp / 'fp32.onnx'), str(tmp / 'anchor.onnx')
    export_fp32(net, x[:1].shape, fp32, dynamic_batch=False)
    ort_quantize_static(fp32, anchor, x, batch_size=1)
    return request.param, qnet, x, gq, anchor


def _ort_ops(path, tmp):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = os.path.join(tmp, 'optimized.onnx')
    ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
    ops = {}
    for n in onnx.load(so.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _ov_layers(path):
    """{(layerType, runtimePrecision): count} of OpenVINO's runtime model of ``path``."""
    cm = ov.Core().compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': 1})
    return runtime_precisions(cm)


def _count(layers, kind, float_only=False):
    return sum(n for (t, p), n in layers.items()
               if t == kind and (not float_only or p not in ('u8', 'i8')))


def _steps(qnet, kind, pred=lambda block: True):
    return [s for s in qnet.spec['steps'] if s['block'].startswith(kind) and
            pred(qnet._children[s['name']])]


def _relu_int8_outputs(qnet):
    """Steps whose ReLU'd output gluonq holds as int8 (0..127): ONNX clips at the zero
    point after the quantize."""
    out, qps = [], qnet.qparams
    for s in qnet.spec['steps']:
        block = qnet._children[s['name']]
        relu = getattr(block, '_act_type', None) == 'relu' or getattr(block, '_relu', False) \
            or s['block'] == 'QuantizedActivation'
        qp = qps.get(s['outputs'][0])
        if relu and qp is not None and qp['dtype'] == 'int8':
            out.append(s)
    return out


def test_onnxruntime_fuses_every_unit(case, tmp_path):
    """onnxruntime's optimized graph: one QLinearConv per conv, one QLinearAdd per residual
    add, QLinearGlobalAveragePool, a QGemm classifier, the model input the only
    QuantizeLinear and no DequantizeLinear or float op left; the only ops beyond those of
    onnxruntime's own QDQ model are the integer Clips of gluonq's int8 ReLU outputs (no
    subsampling before the strided 1x1 convolutions)."""
    kind, qnet, _, gq, anchor = case
    ops = _ort_ops(gq['onnxruntime'], str(tmp_path))
    convs = _steps(qnet, 'QuantizedConv')
    residual = _steps(qnet, 'QuantizedConv', lambda b: b._residual)
    gap = _steps(qnet, 'QuantizedPooling', lambda b: b._kwargs['global_pool'])
    assert residual and gap
    assert ops.get('QLinearConv') == len(convs), ops
    assert ops.get('QLinearAdd') == len(residual), ops
    assert ops.get('QLinearGlobalAveragePool') == len(gap), ops
    assert ops.get('QGemm') == 1, ops
    assert ops.get('QuantizeLinear') == 1 and 'DequantizeLinear' not in ops, ops
    for op in ('Conv', 'FusedConv', 'Add', 'Relu', 'Max', 'GlobalAveragePool', 'Gemm',
               'MatMul'):
        assert op not in ops, (op, ops)
    clips = _relu_int8_outputs(qnet)
    assert ops.get('Clip', 0) == len(clips), (ops, [s['name'] for s in clips])
    own = _ort_ops(anchor, str(tmp_path))
    extra = set(ops) - set(own) - {'Clip'}
    assert not extra, (ops, own)
    for op in ('MaxPool', 'NhwcMaxPool'):
        assert ops.get(op, 0) == own.get(op, 0), (op, ops, own)
    q_own = sum(n for op, n in own.items() if op in ('QuantizeLinear', 'DequantizeLinear'))
    assert ops['QuantizeLinear'] <= q_own


def test_openvino_runs_every_layer_in_int8_with_no_stray_ops(case, tmp_path):
    """OpenVINO's runtime model: every convolution, the global average pooling (a Reduce)
    and the classifier in int8, the residual adds and ReLUs fused into the convolutions (no
    Eltwise), nothing in float but the model input's quantize, and no more Reorders and
    layers than on onnxruntime's own QDQ model of the same network. The graph laid out for
    onnxruntime leaves OpenVINO's strided 1x1 convolutions out of int8."""
    kind, qnet, x, gq, anchor = case
    layers = _ov_layers(gq['openvino'])
    convs = _steps(qnet, 'QuantizedConv')
    gap = _steps(qnet, 'QuantizedPooling', lambda b: b._kwargs['global_pool'])
    assert _count(layers, 'Convolution') == len(convs), layers
    assert _count(layers, 'FullyConnected') == 1, layers
    assert _count(layers, 'Reduce') == len(gap), layers
    assert _count(layers, 'Eltwise') == 0, layers
    executed = {k: n for k, n in layers.items() if k[0] not in ('Const', 'Reshape', 'Input',
                                                                'Output')}
    assert sum(n for k, n in executed.items() if k[1] not in ('u8', 'i8')) <= 1, layers
    own = _ov_layers(anchor)
    own_executed = {k: n for k, n in own.items() if k[0] not in ('Const', 'Reshape', 'Input',
                                                                 'Output')}
    assert _count(layers, 'Reorder') <= _count(own, 'Reorder'), (layers, own)
    assert sum(executed.values()) <= sum(own_executed.values()), (layers, own)
    if kind == 'bottlenecks':
        strided = _steps(qnet, 'QuantizedConv', lambda b: max(b._kwargs['stride']) > 1)
        path = str(tmp_path / 'onnxruntime-layout.onnx')
        onnx.save(gonnx.to_onnx(qnet, input_shape=(1,) + x.shape[1:], weight_dtype='int8'),
                  path)
        ort_layout = _ov_layers(path)
        assert _count(ort_layout, 'Convolution', float_only=True) == len(strided) == 2, \
            ort_layout


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=['CPUExecutionProvider'])


def _extract(path, inputs, outputs, tmp):
    dst = os.path.join(tmp, 'part.onnx')
    onnx.utils.extract_model(path, dst, inputs, outputs)
    return onnx.load(dst)


def _gluonq_ints(qnet, x):
    out = {}
    for k, v in qnet.forward_all(mx.nd.array(x)).items():
        out[k] = (v[0] if isinstance(v, (list, tuple)) else v).asnumpy()
    return out


def _onnx_feed(arr):
    gd = 'int8' if arr.dtype == np.int8 else 'uint8'
    return (arr.astype(np.int32) + gonnx.onnx_zero_point(gd)).astype(np.uint8), gd


def _conv_exact_value(block, qx):
    """float64 value before rounding of a non-residual int8 conv: the exact int64
    accumulator (tests/reference.py) times gluonq's requantize multiplier."""
    import reference as R
    p = {k[len(block.params.prefix):]: value(v) for k, v in block.params.items()}
    k = block._kwargs
    acc = R.conv_int(qx, p['weight'], k['stride'], k['pad'], k['dilate'], k['num_group'])
    if 'bias' in p:
        acc = acc + p['bias'].astype(np.int64).reshape(1, -1, 1, 1)
    iq, oq = block._in_q, block._out_q
    m = quant.requantize_multiplier_np(
        quant.inv_scale_np(oq.min, oq.max, oq.dtype), quant.inv_scale_np(iq.min, iq.max, iq.dtype),
        quant.weight_inv_scale_np(p['weight_scale']))
    return acc.astype(np.float64) * m.astype(np.float64).reshape(1, -1, 1, 1)


def test_rewritten_steps_keep_gluonqs_integers(case, tmp_path):
    """Fed gluonq's own integer inputs, onnxruntime's global average pooling gives gluonq's
    integers exactly (its pixel counts are odd or a power of two), a conv that reads a
    subsampled input gives them except at rounding ties, and a ReLU'd int8 output never
    goes below zero. OpenVINO's global average pooling is within one step of gluonq's."""
    kind, qnet, x, gq, _ = case
    # OpenVINO's layout (the subsampling) with weights whose onnxruntime integers are exact
    model = gonnx.to_onnx(qnet, input_shape=(1,) + x.shape[1:], target='openvino',
                          weight_dtype=WEIGHTS)
    ov_path = str(tmp_path / 'openvino-layout.onnx')
    onnx.save(model, ov_path)
    names = gonnx.tensor_names(model)
    g = _gluonq_ints(qnet, np.random.RandomState(2).uniform(-2, 2, (4,) + x.shape[1:])
                     .astype(np.float32))
    subsampled = {n.input[0] for n in model.graph.node
                  if n.op_type == 'MaxPool' and n.output[0].endswith('/subsample')}
    checked = set()
    for step in qnet.spec['steps']:
        block = qnet._children[step['name']]
        src, out = step['inputs'][0], step['outputs'][0]
        if step['block'] == 'QuantizedPooling' and block._kwargs['global_pool']:
            kind_ = 'gap'
        elif step['block'].startswith('QuantizedConv') and names[src] in subsampled and \
                not block._residual:
            kind_ = 'subsampled conv'
        else:
            continue
        part = _extract(ov_path, [names[src]], [names[out]], str(tmp_path))
        feed, _ = _onnx_feed(g[src])
        got = _session(part).run(None, {names[src]: feed})[0]
        want = g[out].astype(np.int32)
        gd = 'int8' if g[out].dtype == np.int8 else 'uint8'
        d = got.astype(np.int32) - gonnx.onnx_zero_point(gd) - want
        if kind_ == 'gap':
            n = int(np.prod(g[src].shape[2:]))
            assert n % 2 == 1 or n & (n - 1) == 0, n
            assert not d.any(), (step['name'], int((d != 0).sum()))
            path = str(tmp_path / 'gap.onnx')
            onnx.save(part, path)
            cm = ov.Core().compile_model(path, 'CPU')
            got_ov = cm({cm.inputs[0]: feed})[cm.outputs[0]].astype(np.int32)
            assert np.abs(got_ov - gonnx.onnx_zero_point(gd) - want).max() <= 1
        else:
            v = _conv_exact_value(block, g[src])
            bad = d != 0
            assert np.abs(d).max() <= 1, step['name']
            tie = np.abs(np.abs(v - np.floor(v)) - 0.5) <= 1e-6 * np.abs(v) + 1e-6
            assert tie[bad].all(), step['name']
        checked.add(kind_)
    assert 'gap' in checked
    if kind == 'bottlenecks':
        assert 'subsampled conv' in checked
    for step in _relu_int8_outputs(qnet):
        assert g[step['outputs'][0]].min() >= 0
    # onnxruntime's end-to-end int8 ReLU outputs: gluonq's zero point is their floor
    names = gonnx.tensor_names(onnx.load(gq['onnxruntime']))
    clipped = [names[s['outputs'][0]] for s in _relu_int8_outputs(qnet)]
    if clipped:
        m = onnx.load(gq['onnxruntime'])
        for n in clipped:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
        sess = _session(m)
        res = sess.run(clipped, {sess.get_inputs()[0].name: x})
        assert min(int(r.min()) for r in res) >= gonnx.onnx_zero_point('int8')
