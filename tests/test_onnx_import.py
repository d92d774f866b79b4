"""gluonq.import_onnx against onnxruntime (fp32), the independent reference.

Metric everywhere: ``rel = max|out - ref| / max|ref|`` over the whole output tensor. The
real rapidocr models must reach 1e-4 on rendered text (examples/ocr_data.py); the small
synthetic graphs, one or two ops each, 1e-5.
"""
import json
import os

import mxnet as mx
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import gluonq  # noqa: E402
from gluonq import ONNXImportError, import_onnx  # noqa: E402
from param_values import value  # noqa: E402

SETTINGS = dict(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SYNTH_TOL = 1e-5
REAL_TOL = 1e-4
INT_MAX = 2 ** 63 - 1


def rel_err(out, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=['CPUExecutionProvider'])


def ort_run(model, x):
    s = session(model)
    return s.run(None, {s.get_inputs()[0].name: x})


def mx_run(net, x):
    out = net(mx.nd.array(x))
    return [o.asnumpy() for o in out] if isinstance(out, (list, tuple)) else [out.asnumpy()]


def make_model(nodes, out_shape=None, inits=None, opset=13, in_shape=None, n_out=1):
    """A one-input model: input 'x', outputs 'y' (and 'y1', ... if n_out > 1)."""
    outs = ['y'] + ['y%d' % i for i in range(1, n_out)]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        initializer=[numpy_helper.from_array(np.asarray(v), k)
                     for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)])
    model.ir_version = 8
    return model


def check(model, x, tol=SYNTH_TOL, **kwargs):
    """Import ``model`` for ``x.shape`` and compare every output with onnxruntime."""
    refs = ort_run(model, x)
    res = import_onnx(model, x.shape, **kwargs)
    outs = mx_run(res.net, x)
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= tol, rel_err(out, ref)
    return res


def data(shape, seed, lo=-2.0, hi=2.0):
    return np.random.RandomState(seed).uniform(lo, hi, size=shape).astype(np.float32)


def graph_ops(net, input_name):
    js = json.loads(net(mx.sym.var(input_name)).tojson())
    return js['nodes']


# -- the real models ------------------------------------------------------------------------
ocr_data = pytest.importorskip('ocr_data')


def _with_logits(path, logits):
    """The model at ``path`` with tensor ``logits`` (pre-softmax) as a second output."""
    model = onnx.load(path)
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    return model


REAL_CASES = [
    # kind, input shape (C, H, W), batch, batch maker, pre-softmax tensor (or None)
    ('cls', (3, 48, 192), 2, lambda: ocr_data.cls_batch(2, 11)[0], 'linear_1.tmp_1'),
    ('cls', (3, 48, 96), 2, lambda: ocr_data.cls_batch(2, 12, (3, 48, 96))[0],
     'linear_1.tmp_1'),
    ('rec', (3, 48, 160), 2, lambda: ocr_data.rec_batch(2, 13, 160)[0], 'p2o.Add.277'),
    ('rec', (3, 48, 320), 1, lambda: ocr_data.rec_batch(1, 14, 320)[0], 'p2o.Add.277'),
    ('det', (3, 64, 96), 1, lambda: ocr_data.det_batch(1, 15, 64, 96)[0], None),
    ('det', (3, 96, 128), 1, lambda: ocr_data.det_batch(1, 16, 96, 128)[0], None),
]


@pytest.mark.parametrize('kind,shape,batch,make,logits', REAL_CASES,
                         ids=['%s-%s' % (c[0], 'x'.join(map(str, c[1]))) for c in REAL_CASES])
def test_rapidocr_models_match_onnxruntime(kind, shape, batch, make, logits):
    path = ocr_data.model_path(kind)
    model = _with_logits(path, logits) if logits else onnx.load(path)
    x = make()
    assert x.shape == (batch,) + shape and x.dtype == np.float32
    res = check(model, x, tol=REAL_TOL)
    assert res.input_shape == (batch,) + shape
    assert isinstance(res.net, mx.gluon.SymbolBlock)


def test_real_model_batch_is_free_and_metadata_kept():
    """The cls model folds Shape(x)[0] into its reshape: imported at batch 2, it runs at
    batch 3 as onnxruntime does; the recognizer's charset comes with the import."""
    x = ocr_data.cls_batch(3, 21)[0]
    res = import_onnx(ocr_data.model_path('cls'), (2,) + x.shape[1:])
    assert rel_err(mx_run(res.net, x)[0], ort_run(ocr_data.model_path('cls'), x)[0]) <= REAL_TOL
    rec = import_onnx(ocr_data.model_path('rec'), (1, 3, 48, 80))
    chars = rec.metadata['character'].splitlines()
    out = mx_run(rec.net, ocr_data.rec_batch(1, 22, 80)[0])[0]
    assert out.shape[-1] == len(chars) + 2 == len(ocr_data.charset())   # blank + ' '


def test_cls_graph_for_the_converter():
    """What gluonq's converter sees: conv biases inside the Convolutions (fuse_bias), every
    BatchNorm as BatchNorm, the classifier as FullyConnected; with fuse_bias=False the SE
    biases stay ``broadcast_add`` with a parameter, and both compute the same."""
    path = ocr_data.model_path('cls')
    fused = import_onnx(path, (1, 3, 48, 192))
    raw = import_onnx(path, (1, 3, 48, 192), fuse_bias=False)
    ops = graph_ops(fused.net, fused.input_name)
    count = {}
    for n in ops:
        count[n['op']] = count.get(n['op'], 0) + 1
    model = onnx.load(path)
    onnx_count = {}
    for n in model.graph.node:
        onnx_count[n.op_type] = onnx_count.get(n.op_type, 0) + 1
    assert count['Convolution'] == onnx_count['Conv']
    assert count['BatchNorm'] == onnx_count['BatchNormalization']
    assert count['FullyConnected'] == 1
    with_bias = [n for n in ops if n['op'] in ('Convolution', 'FullyConnected')
                 and n['attrs']['no_bias'] == 'False']
    # every Add of a constant after a Conv (the SE blocks' two convs) or after the
    # classifier's MatMul became a bias
    raw_adds = [n for n in graph_ops(raw.net, raw.input_name) if n['op'] == 'broadcast_add']
    fused_adds = [n for n in ops if n['op'] == 'broadcast_add']
    assert len(with_bias) == len(raw_adds) - len(fused_adds) > 0
    assert count.get('hard_sigmoid') == onnx_count['HardSigmoid']
    x = ocr_data.cls_batch(2, 23)[0]
    assert rel_err(mx_run(fused.net, x)[0], mx_run(raw.net, x)[0]) <= REAL_TOL


def test_import_is_deterministic():
    path = ocr_data.model_path('cls')
    a, b = import_onnx(path, (1, 3, 48, 96)), import_onnx(path, (1, 3, 48, 96))
    assert a.net(mx.sym.var(a.input_name)).tojson() == b.net(mx.sym.var(b.input_name)).tojson()
    pa, pb = a.net.collect_params(), b.net.collect_params()
    assert list(pa.keys()) == list(pb.keys())
    for k in pa.keys():
        assert value(pa[k]).tobytes() == value(pb[k]).tobytes()
        assert pa[k].data().dtype == np.float32


# -- elementwise ------------------------------------------------------------------------------
@st.composite
def broadcast_case(draw):
    op = draw(st.sampled_from(['Add', 'Sub', 'Mul', 'Div', 'Pow']))
    out_shape = (2, 4, 3, 5)
    kind = draw(st.sampled_from(['scalar', 'per_channel', 'suffix', 'prefix', 'tensor']))
    if kind == 'scalar':
        cshape = draw(st.sampled_from([(), (1,), (1, 1, 1, 1)]))
    elif kind == 'per_channel':
        cshape = draw(st.sampled_from([(4, 1, 1), (1, 4, 1, 1)]))
    elif kind == 'suffix':
        k = draw(st.integers(1, 4))
        cshape = tuple(d if draw(st.booleans()) else 1 for d in out_shape[-k:])
    elif kind == 'prefix':
        cshape = (1,) + tuple(d if draw(st.booleans()) else 1 for d in out_shape)
    else:
        cshape = None                 # tensor-tensor, the second one reduced (broadcast)
    const_first = draw(st.booleans())
    fuse = draw(st.booleans())
    return op, cshape, const_first, fuse


@settings(**SETTINGS)
@given(broadcast_case(), st.integers(0, 1000))
def test_binary_ops_broadcast(case, seed):
    """Add/Sub/Mul/Div/Pow after a Conv (so bias fusion is tried), with a constant of every
    broadcast form on either side, or between two tensors of different shapes."""
    op, cshape, const_first, fuse = case
    rng = np.random.RandomState(seed)
    w = rng.uniform(-1, 1, (4, 3, 1, 1)).astype(np.float32)
    inits = {'w': w}
    nodes = [helper.make_node('Conv', ['x', 'w'], ['c'])]
    if op == 'Pow':                   # keep the base positive and the exponent small
        nodes.append(helper.make_node('Sigmoid', ['c'], ['s']))
        base = 's'
    else:
        base = 'c'
    if cshape is None:
        nodes.append(helper.make_node('ReduceMean', [base], ['other'], axes=[2], keepdims=1))
        other = 'other'
        if op in ('Div', 'Pow'):
            nodes.append(helper.make_node('Sigmoid', ['other'], ['other_pos']))
            other = 'other_pos'
    else:
        lo = 0.5 if op in ('Div', 'Pow') else -2
        inits['k'] = (rng.uniform(lo, 2, cshape) * (rng.choice([-1, 1], cshape)
                      if op not in ('Div', 'Pow') else 1)).astype(np.float32)
        other = 'k'
    args = [other, base] if const_first else [base, other]
    if op in ('Div', 'Pow') and const_first:
        args = [base, other]          # x / c and x ** c (c ** x and c / x: below)
    nodes.append(helper.make_node(op, args, ['y']))
    x = data((2, 3, 3, 5), seed)
    check(make_model(nodes, inits=inits), x, fuse_bias=fuse)


@pytest.mark.parametrize('op', ['Sub', 'Div', 'Pow'])
def test_scalar_on_the_left(op):
    nodes = [helper.make_node('Sigmoid', ['x'], ['s']),
             helper.make_node(op, ['k', 's'], ['y'])]
    check(make_model(nodes, inits={'k': np.array(1.5, np.float32)}), data((2, 3, 4), 1))


@settings(**SETTINGS)
@given(st.sampled_from([6, 11, 13]), st.one_of(st.none(), st.floats(-1, 0.5)),
       st.one_of(st.none(), st.floats(0.6, 6)))
def test_clip(opset, lo, hi):
    """Clip with min/max as attributes (opset 6) or optional inputs (opset 11+)."""
    if opset == 6:
        attrs = {k: v for k, v in (('min', lo), ('max', hi)) if v is not None}
        node, inits = helper.make_node('Clip', ['x'], ['y'], **attrs), {}
    else:
        inits = {k: np.array(v, np.float32) for k, v in (('lo', lo), ('hi', hi))
                 if v is not None}
        node = helper.make_node('Clip', ['x', 'lo' if lo is not None else '',
                                         'hi' if hi is not None else ''], ['y'])
    check(make_model([node], inits=inits, opset=opset), data((2, 3, 4, 5), 2, -8, 8))


def test_clip_min_zero_is_relu():
    node = helper.make_node('Clip', ['x', 'lo'], ['y'])
    res = check(make_model([node], inits={'lo': np.array(0, np.float32)}), data((2, 5), 3))
    ops = [n for n in graph_ops(res.net, res.input_name) if n['op'] != 'null']
    assert [(n['op'], n['attrs']) for n in ops] == [('Activation', {'act_type': 'relu'})]


@pytest.mark.parametrize('op,attrs,opset', [
    ('Relu', {}, 13), ('Sigmoid', {}, 13), ('Sqrt', {}, 13),
    ('HardSigmoid', {}, 13), ('HardSigmoid', {'alpha': 1 / 6., 'beta': 0.5}, 13),
    ('HardSwish', {}, 14), ('Identity', {}, 13)])
def test_unary(op, attrs, opset):
    lo = 0.0 if op == 'Sqrt' else -5.0
    check(make_model([helper.make_node(op, ['x'], ['y'], **attrs)], opset=opset),
          data((2, 3, 4, 5), 4, lo, 5.0))


# -- layers ---------------------------------------------------------------------------------
@st.composite
def conv_case(draw):
    dims = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    cin, cout = 4, draw(st.sampled_from([4, 8]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    auto = draw(st.sampled_from(['NOTSET', 'NOTSET', 'SAME_UPPER', 'SAME_LOWER', 'VALID']))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * dims))
    if dims == 1 and pads[0] != pads[1]:
        pads = (pads[0], pads[0])     # asymmetric pads: 2-d and 3-d only
    bias = draw(st.booleans())
    return dims, group, cin, cout, kernel, strides, dil, auto, pads, bias


@settings(**SETTINGS)
@given(conv_case(), st.integers(0, 1000))
def test_conv(case, seed):
    dims, group, cin, cout, kernel, strides, dil, auto, pads, bias = case
    rng = np.random.RandomState(seed)
    inits = {'w': rng.uniform(-1, 1, (cout, cin // group) + kernel).astype(np.float32)}
    ins = ['x', 'w']
    if bias:
        inits['b'] = rng.uniform(-1, 1, (cout,)).astype(np.float32)
        ins.append('b')
    attrs = dict(kernel_shape=kernel, strides=strides, dilations=dil, group=group)
    if auto == 'NOTSET':
        attrs['pads'] = pads
    else:
        attrs['auto_pad'] = auto
        if auto != 'VALID':
            attrs['dilations'] = (1,) * dims      # onnxruntime: SAME with dilation differs
    x = data((2, cin) + (7,) * dims, seed)
    res = check(make_model([helper.make_node('Conv', ins, ['y'], **attrs)], inits=inits), x)
    conv = [n for n in graph_ops(res.net, res.input_name) if n['op'] == 'Convolution']
    assert len(conv) == 1 and conv[0]['attrs']['no_bias'] == str(not bias)


@st.composite
def deconv_case(draw):
    group = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(2))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(2))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(2))
    pads = tuple(draw(st.integers(0, k - 1)) for k in kernel)
    outpad = tuple(draw(st.integers(0, s - 1)) for s in strides)
    bias = draw(st.sampled_from(['none', 'input', 'add']))
    return group, kernel, strides, dil, pads, outpad, bias


@settings(**SETTINGS)
@given(deconv_case(), st.integers(0, 1000))
def test_conv_transpose(case, seed):
    """ConvTranspose with groups, strides, dilations, symmetric pads, output_padding, and a
    bias as input or as det's separate Add of a (1, C, 1, 1) constant."""
    group, kernel, strides, dil, pads, outpad, bias = case
    rng = np.random.RandomState(seed)
    cin, cout_g = 4, 3
    inits = {'w': rng.uniform(-1, 1, (cin, cout_g) + kernel).astype(np.float32)}
    ins = ['x', 'w']
    out = 'y' if bias != 'add' else 'd'
    if bias == 'input':
        inits['b'] = rng.uniform(-1, 1, (cout_g * group,)).astype(np.float32)
        ins.append('b')
    nodes = [helper.make_node('ConvTranspose', ins, [out], kernel_shape=kernel,
                              strides=strides, dilations=dil, group=group,
                              pads=pads + pads, output_padding=outpad)]
    if bias == 'add':
        inits['b'] = rng.uniform(-1, 1, (1, cout_g * group, 1, 1)).astype(np.float32)
        nodes.append(helper.make_node('Add', ['d', 'b'], ['y']))
    res = check(make_model(nodes, inits=inits), data((2, cin, 5, 6), seed))
    ops = [n['op'] for n in graph_ops(res.net, res.input_name) if n['op'] != 'null']
    assert ops == ['Deconvolution']


@pytest.mark.parametrize('fold', [True, False])
def test_batchnorm_and_gemm(fold):
    rng = np.random.RandomState(5)
    c = 6
    inits = {'s': rng.uniform(0.5, 2, c), 'b': rng.uniform(-1, 1, c),
             'm': rng.uniform(-1, 1, c), 'v': rng.uniform(0.1, 2, c),
             'W': rng.uniform(-1, 1, (7, c)), 'C': rng.uniform(-1, 1, (1, 7))}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [helper.make_node('BatchNormalization', ['x', 's', 'b', 'm', 'v'], ['bn'],
                              epsilon=1e-3),
             helper.make_node('Gemm', ['bn', 'W', 'C'], ['y'], transB=1, alpha=0.5,
                              beta=2.0)]
    res = check(make_model(nodes, inits=inits), data((3, c), 6), fuse_bias=fold)
    ops = [n['op'] for n in graph_ops(res.net, res.input_name) if n['op'] != 'null']
    assert ops == ['BatchNorm', 'FullyConnected']


@pytest.mark.parametrize('case', ['dense2d', 'dense3d', 'bmm3d', 'bmm4d', 'dot2d'])
def test_matmul(case):
    rng = np.random.RandomState(7)
    inits = {'W': rng.uniform(-1, 1, (6, 5)).astype(np.float32),
             'B': rng.uniform(-1, 1, (5,)).astype(np.float32)}
    if case.startswith('dense'):
        shape = (3, 6) if case == 'dense2d' else (2, 3, 6)
        nodes = [helper.make_node('MatMul', ['x', 'W'], ['m']),
                 helper.make_node('Add', ['m', 'B'], ['y'])]
        res = check(make_model(nodes, inits=inits), data(shape, 8))
        fc = [n for n in graph_ops(res.net, res.input_name) if n['op'] == 'FullyConnected']
        assert len(fc) == 1 and fc[0]['attrs']['no_bias'] == 'False'
        assert fc[0]['attrs']['flatten'] == str(case == 'dense2d')
        return
    shape = {'bmm3d': (2, 3, 6), 'bmm4d': (2, 2, 3, 6), 'dot2d': (3, 6)}[case]
    perm = list(range(len(shape)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    nodes = [helper.make_node('Transpose', ['x'], ['t'], perm=perm),
             helper.make_node('MatMul', ['x', 't'], ['y'])]
    check(make_model(nodes), data(shape, 9))


@pytest.mark.parametrize('opset,axis', [(11, 1), (11, -1), (11, 2), (13, 1), (13, -1)])
def test_softmax(opset, axis):
    """Softmax before opset 13 is over all axes from ``axis`` on (flattened)."""
    check(make_model([helper.make_node('Softmax', ['x'], ['y'], axis=axis)], opset=opset),
          data((2, 3, 4, 5), 10, -4, 4))


def test_layernorm_as_reduce_mean():
    """The recognizer's LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div."""
    eps = np.array(1e-5, np.float32)
    two = np.array(2.0, np.float32)
    nodes = [helper.make_node('ReduceMean', ['x'], ['mu'], axes=[-1]),
             helper.make_node('Sub', ['x', 'mu'], ['d']),
             helper.make_node('Pow', ['d', 'two'], ['d2']),
             helper.make_node('ReduceMean', ['d2'], ['var'], axes=[-1]),
             helper.make_node('Add', ['var', 'eps'], ['ve']),
             helper.make_node('Sqrt', ['ve'], ['sd']),
             helper.make_node('Div', ['d', 'sd'], ['y'])]
    check(make_model(nodes, inits={'eps': eps, 'two': two}, opset=12), data((2, 7, 16), 11))


@pytest.mark.parametrize('op,attrs', [
    ('MaxPool', dict(kernel_shape=[2, 2], strides=[2, 2])),
    ('MaxPool', dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ('MaxPool', dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ('AveragePool', dict(kernel_shape=[3, 2], strides=[3, 2])),
    ('AveragePool', dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    ('AveragePool', dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    ('GlobalAveragePool', {})])
def test_pooling(op, attrs):
    res = check(make_model([helper.make_node(op, ['x'], ['y'], **attrs)]),
                data((2, 3, 9, 8), 12))
    assert [n['op'] for n in graph_ops(res.net, res.input_name) if n['op'] != 'null'] == \
        ['Pooling']


# -- shapes and constant folding --------------------------------------------------------------
@st.composite
def slice_case(draw):
    ndim = 3
    naxes = draw(st.integers(1, 3))
    axes = draw(st.permutations(range(ndim)))[:naxes]
    steps = [draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    starts = [draw(st.one_of(st.integers(-9, 9), st.just(INT_MAX * (1 if p < 0 else -1))))
              for p in steps]
    ends = [draw(st.one_of(st.just(s + (1 if p > 0 else -1) * draw(st.integers(1, 9))),
                           st.just(INT_MAX * (1 if p > 0 else -1))))
            for s, p in zip(starts, steps)]
    neg = [draw(st.booleans()) for _ in axes]
    axes = [a - ndim if n else a for a, n in zip(axes, neg)]
    return axes, starts, ends, steps, draw(st.sampled_from([9, 13]))


@settings(**dict(SETTINGS, suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much]))
@given(slice_case())
def test_slice(case):
    """Slice with negative axes, steps, out-of-range and INT_MAX bounds (opset 13 inputs;
    opset 9 attributes, steps 1). Slicing the batch axis needs batch_free=False."""
    axes, starts, ends, steps, opset = case
    shape = (4, 6, 8)
    if opset == 9:
        steps = [1] * len(axes)
    index = [slice(None)] * 3
    for a, s, e, st_ in zip(axes, starts, ends, steps):
        index[a % 3] = slice(s, e, st_)           # numpy clamps bounds as ONNX does
    assume(np.zeros(shape)[tuple(index)].size > 0)
    if opset == 9:
        node = helper.make_node('Slice', ['x'], ['y'], starts=starts, ends=ends, axes=axes)
        inits = {}
    else:
        inits = {'s': np.array(starts, np.int64), 'e': np.array(ends, np.int64),
                 'a': np.array(axes, np.int64), 'p': np.array(steps, np.int64)}
        node = helper.make_node('Slice', ['x', 's', 'e', 'a', 'p'], ['y'])
    check(make_model([node], inits=inits, opset=opset), data(shape, 13),
          batch_free=all(a % 3 for a in axes))


def _shape_subgraph(gather):
    """cls's classifier head: the reshape target is Shape(x)[0] ++ [C], folded."""
    head = [helper.make_node('GlobalAveragePool', ['x'], ['g']),
            helper.make_node('Shape', ['g'], ['sh'])]
    if gather:
        head += [helper.make_node('Gather', ['sh', 'i0'], ['n'], axis=0),
                 helper.make_node('Unsqueeze', ['n', 'ax0'], ['n1'])]
    else:
        head += [helper.make_node('Slice', ['sh', 'i0', 'i1', 'ax0'], ['n1'])]
    head += [helper.make_node('Cast', ['n1'], ['n32'], to=TensorProto.INT32),
             helper.make_node('Cast', ['n32'], ['n64'], to=TensorProto.INT64),
             helper.make_node('Constant', [], ['c'], value=numpy_helper.from_array(
                 np.array([3], np.int64))),
             helper.make_node('Concat', ['n64', 'c'], ['target'], axis=0),
             helper.make_node('Reshape', ['g', 'target'], ['flat']),
             helper.make_node('MatMul', ['flat', 'W'], ['m']),
             helper.make_node('Add', ['m', 'b'], ['z']),
             helper.make_node('Softmax', ['z'], ['y'], axis=1)]
    rng = np.random.RandomState(14)
    inits = {'W': rng.uniform(-1, 1, (3, 2)).astype(np.float32),
             'b': rng.uniform(-1, 1, (2,)).astype(np.float32),
             'i1': np.array([1], np.int64), 'ax0': np.array([0], np.int64)}
    inits['i0'] = np.array(0, np.int64) if gather else np.array([0], np.int64)
    return make_model(head, inits=inits, in_shape=['N', 3, 'H', 'W'])


@pytest.mark.parametrize('gather', [False, True])
def test_shape_arithmetic_is_folded_and_batch_stays_free(gather):
    model = _shape_subgraph(gather)
    res = import_onnx(model, (2, 3, 5, 6))
    for n in (1, 2, 5):
        x = data((n, 3, 5, 6), 15 + n)
        assert rel_err(mx_run(res.net, x)[0], ort_run(model, x)[0]) <= SYNTH_TOL
    fixed = import_onnx(model, (2, 3, 5, 6), batch_free=False)
    reshape = [n for n in graph_ops(fixed.net, fixed.input_name) if n['op'] == 'Reshape']
    assert reshape[0]['attrs']['shape'] == '(2, 3)'


def test_reshape_zero_and_minus_one_keep_the_batch_free():
    """The recognizer writes reshape targets with ONNX's 0 (copy) and -1; they stay."""
    inits = {'t': np.array([0, -1, 4], np.int64), 'p': np.array([0, 2, 1], np.int64)}
    nodes = [helper.make_node('Reshape', ['x', 't'], ['r']),
             helper.make_node('Transpose', ['r'], ['y'], perm=[0, 2, 1])]
    model = make_model(nodes, inits=inits)
    res = import_onnx(model, (1, 3, 8))
    for n in (1, 4):
        x = data((n, 3, 8), 16)
        assert rel_err(mx_run(res.net, x)[0], ort_run(model, x)[0]) <= SYNTH_TOL


@pytest.mark.parametrize('opset', [11, 13])
def test_squeeze_unsqueeze_flatten_concat(opset):
    def axes_node(op, src, dst, axes):
        if opset < 13:
            return [helper.make_node(op, [src], [dst], axes=axes)], {}
        name = dst + '_axes'
        return [helper.make_node(op, [src, name], [dst])], {name: np.array(axes, np.int64)}
    nodes, inits = [], {'k': np.full((2, 1, 4, 5), 0.5, np.float32)}
    for op, src, dst, axes in (('Unsqueeze', 'x', 'u', [-1, 1]), ('Squeeze', 'u', 's', [1, -1])):
        n, i = axes_node(op, src, dst, axes)
        nodes += n
        inits.update(i)
    nodes += [helper.make_node('Concat', ['s', 'k'], ['c'], axis=-3),
              helper.make_node('Flatten', ['c'], ['f0'], axis=0),
              helper.make_node('Flatten', ['c'], ['f1'], axis=1),
              helper.make_node('Flatten', ['c'], ['f2'], axis=2),
              helper.make_node('Concat', ['f0'], ['y'], axis=0),
              helper.make_node('Identity', ['f1'], ['y1']),
              helper.make_node('Identity', ['f2'], ['y2'])]
    check(make_model(nodes, inits=inits, opset=opset, n_out=3), data((2, 3, 4, 5), 17))


@settings(**SETTINGS)
@given(st.integers(1, 4), st.sampled_from(['asymmetric', 'half_pixel', 'pytorch_half_pixel',
                                           'align_corners', 'tf_half_pixel_for_nn']),
       st.sampled_from(['floor', 'ceil', 'round_prefer_floor', 'round_prefer_ceil']),
       st.booleans())
def test_resize_nearest(factor, coord, rounding, by_sizes):
    """Resize nearest: imported exactly when onnxruntime's own mapping is a repetition by
    the factor (det's asymmetric/floor is), else ONNXImportError."""
    shape = (1, 2, 3, 5)
    out = shape[:2] + (shape[2] * factor, shape[3] * factor)
    if by_sizes:
        inits = {'roi': np.zeros(0, np.float32), 'sc': np.zeros(0, np.float32),
                 'sz': np.array(out, np.int64)}
        ins = ['x', 'roi', '', 'sz']
        inits.pop('sc')
    else:
        inits = {'roi': np.zeros(0, np.float32),
                 'sc': np.array([1, 1, factor, factor], np.float32)}
        ins = ['x', 'roi', 'sc']
    model = make_model([helper.make_node('Resize', ins, ['y'], mode='nearest',
                                         coordinate_transformation_mode=coord,
                                         nearest_mode=rounding)], inits=inits)
    ramp = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    ref = ort_run(model, ramp)[0]
    repeated = np.repeat(np.repeat(ramp, factor, axis=2), factor, axis=3)
    if np.array_equal(ref, repeated):
        check(model, data(shape, 18))
    else:
        with pytest.raises(ONNXImportError, match='Resize'):
            import_onnx(model, shape)


def test_det_resize_mode_is_supported():
    inits = {'roi': np.zeros(0, np.float32), 'sc': np.array([1, 1, 2, 2], np.float32)}
    model = make_model([helper.make_node(
        'Resize', ['x', 'roi', 'sc'], ['y'], mode='nearest',
        coordinate_transformation_mode='asymmetric', nearest_mode='floor')], inits=inits,
        opset=12)
    res = check(model, data((2, 3, 4, 6), 19))
    assert [n['op'] for n in graph_ops(res.net, res.input_name) if n['op'] != 'null'] == \
        ['UpSampling']


# -- errors -----------------------------------------------------------------------------------
def test_unsupported_op_names_node_and_op():
    model = make_model([helper.make_node('Erf', ['x'], ['y'], name='my_erf')])
    with pytest.raises(ONNXImportError, match=r"'my_erf' \(Erf\).*Erf is not supported"):
        import_onnx(model, (1, 3))


def test_computed_weight_is_an_error():
    nodes = [helper.make_node('Relu', ['x'], ['w']),
             helper.make_node('Conv', ['x', 'w'], ['y'], name='conv7')]
    with pytest.raises(ONNXImportError, match=r"'conv7' \(Conv\).*weight.*constant"):
        import_onnx(make_model(nodes), (1, 1, 1, 1))


def test_unsupported_attribute_is_an_error():
    model = make_model([helper.make_node('Resize', ['x', 'roi', 'sc'], ['y'], name='up',
                                         mode='linear')],
                       inits={'roi': np.zeros(0, np.float32),
                              'sc': np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(ONNXImportError, match=r"'up' \(Resize\).*'linear'"):
        import_onnx(model, (1, 1, 2, 2))


def test_batch_dependent_operand_is_an_error_unless_batch_is_fixed():
    nodes = [helper.make_node('Shape', ['x'], ['s']),
             helper.make_node('ConstantOfShape', ['s'], ['ones'], value=numpy_helper.from_array(
                 np.array([1.0], np.float32))),
             helper.make_node('Add', ['x', 'ones'], ['y'], name='add_ones')]
    model = make_model(nodes)
    with pytest.raises(ONNXImportError, match=r"'add_ones' \(Add\).*batch"):
        import_onnx(model, (2, 3))
    res = import_onnx(model, (2, 3), batch_free=False)
    x = data((2, 3), 20)
    assert rel_err(mx_run(res.net, x)[0], ort_run(model, x)[0]) <= SYNTH_TOL


def test_slicing_the_batch_axis_needs_a_fixed_batch():
    inits = {'s': np.array([1], np.int64), 'e': np.array([3], np.int64),
             'a': np.array([0], np.int64)}
    model = make_model([helper.make_node('Slice', ['x', 's', 'e', 'a'], ['y'], name='sl')],
                       inits=inits)
    with pytest.raises(ONNXImportError, match=r"'sl' \(Slice\).*batch_free=False"):
        import_onnx(model, (4, 3))
    check(model, data((4, 3), 21), batch_free=False)


def test_free_dimension_needs_input_shape():
    model = make_model([helper.make_node('Relu', ['x'], ['y'])], in_shape=['N', 3, 'H', 8])
    with pytest.raises(ONNXImportError, match='input_shape'):
        import_onnx(model)
    with pytest.raises(ONNXImportError, match='does not fit'):
        import_onnx(model, (1, 4, 5, 8))
    assert import_onnx(model, (1, 3, 5, 8)).input_shape == (1, 3, 5, 8)


def test_bad_files_name_the_file(tmp_path):
    missing = str(tmp_path / 'nope.onnx')
    with pytest.raises(ONNXImportError, match='nope.onnx not found'):
        import_onnx(missing)
    junk = tmp_path / 'junk.onnx'
    junk.write_bytes(b'\x00\xffnot a protobuf at all' * 10)
    with pytest.raises(ONNXImportError, match='junk.onnx is not an ONNX model'):
        import_onnx(str(junk))
    assert issubclass(ONNXImportError, ValueError)
    assert gluonq.import_onnx is import_onnx and os.path.exists(ocr_data.model_path('cls'))
