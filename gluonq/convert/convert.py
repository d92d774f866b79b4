"""``quantize_net``: a float Gluon network and calibration data in, a QuantizedNet out.

trace -> fold BatchNorm -> plan (what runs in int8) -> observe the float tensors on the
calibration data -> quantization parameters -> build the QuantizedNet from gluonq's blocks.
"""
from __future__ import annotations

import json
import logging
import re

import mxnet as mx
import numpy as np

from .. import __version__, quant
from ..calibration.collect import CalibrationDataError, as_batches, collect
from ..calibration.observers import make_observer
from .activations import simplify as simplify_activations
from .adaround import ITERS as ADAROUND_ITERS, adaround
from .bias_correction import correct_biases
from .fallback import accuracy_fallback
from .fold import conv_geometry, prepare
from .graph import edge_key, parse_tuple, trace
from .plan import affine_candidates, check_exclude, make_plan
from .qnet import QuantizedNet, mx_reason

__all__ = ['quantize_net', 'trace_and_fold']

log = logging.getLogger('gluonq')
_SAFE = re.compile(r'[^0-9A-Za-z_]')


def _step_name(node_name, used):
    name = _SAFE.sub('_', node_name[:-4] if node_name.endswith('_fwd') else node_name)
    base, k = name, 1
    while name in used:
        k += 1
        name = '%s_%d' % (base, k)
    used.add(name)
    return name


def input_shape_error(net, input_shape, input_name='data'):
    """None if ``net`` takes an input of ``input_shape``, else a sentence naming the layer
    that rejects it, MXNet's reason and, where the first layer tells, the expected shape."""
    data = mx.sym.var(input_name)
    out = net(data)
    out = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
    args = set(out.list_arguments()) | set(out.list_auxiliary_states())
    shapes = {p.name: p.shape for p in net.collect_params().values()   # unused ones left out
              if p.name in args and p.shape and all(s > 0 for s in p.shape)}
    try:
        out.infer_shape_partial(**{input_name: tuple(input_shape)}, **shapes)
        return None
    except mx.base.MXNetError as err:
        layer, reason = mx_reason(err)
    msg = 'input %r of shape %s does not fit the network: layer %s rejects it (%s)' % (
        input_name, tuple(input_shape), layer, reason)
    expected = _expected_input(out, input_name, shapes)
    return msg + ('; its first layer takes %s' % expected if expected else '')


def _expected_input(sym, input_name, shapes):
    """What the first layer reading ``input_name`` takes, e.g. '(N, 3, H, W) inputs'."""
    nodes = json.loads(sym.tojson())['nodes']
    data_id = next(i for i, n in enumerate(nodes) if n['name'] == input_name)
    for n in nodes:
        if n['op'] not in ('Convolution', 'FullyConnected') or not n['inputs'] or \
                n['inputs'][0][0] != data_id or len(n['inputs']) < 2:
            continue
        w = shapes.get(nodes[n['inputs'][1][0]]['name'])
        if w is None:
            return None
        if n['op'] == 'FullyConnected':
            return 'inputs of %d features per example (%s)' % (w[1], n['name'])
        nd = len(parse_tuple(n['attrs']['kernel'], ()))
        cin = w[1] * int(n['attrs'].get('num_group', 1))
        return '(N, %d, %s) inputs (%s)' % (cin, ', '.join('DHW'[3 - nd:]), n['name'])
    return None


def trace_and_fold(net, input_shape):
    """The folded float graph of ``net`` for inputs of ``input_shape``, hardswish and
    hardsigmoid in their one-op form (:func:`gluonq.convert.activations.simplify`).

    Raises ValueError naming the layer that rejects inputs of that shape.
    """
    if isinstance(net, mx.gluon.HybridBlock):
        err = input_shape_error(net, input_shape)
        if err:
            raise ValueError(err)
    graph = trace(net, [tuple(input_shape)])
    prepare(graph)
    simplify_activations(graph)
    graph.infer_shapes({graph.inputs[0]: tuple(input_shape)})
    return graph


def quantize_net(net, calib_data, calib_mode='naive', num_calib_batches=None,
                 num_calib_examples=None, per_channel=True, act_dtype='auto', exclude=None,
                 batch_size=32, calib_options=None, progress=True, bias_correction=False,
                 eval_fn=None, max_drop=0.1, act_scheme='symmetric', weight_rounding='nearest',
                 adaround_iters=ADAROUND_ITERS):
    """Quantize a float Gluon network to int8 with calibration data.

    Parameters
    ----------
    net : HybridBlock
        The trained float network (gluoncv model, hand-written HybridBlock, SymbolBlock).
    calib_data : DataLoader, iterable of arrays or (data, label) tuples, or numpy array
        Real inputs for calibration, preprocessed as in training (integer data, such as
        uint8 0-255 images, is calibrated as it is, with a warning).
    calib_mode : {'naive', 'percentile', 'entropy', 'mse', 'moving_average'} or Observer class
        How activation ranges are chosen (see :mod:`gluonq.calibration.observers`).
    num_calib_batches, num_calib_examples : int, optional
        Limits on the calibration data used.
    per_channel : bool
        Per-output-channel weight scales (default) or one scale per tensor.
    act_dtype : {'auto', 'int8', 'uint8'}
        Activation dtype: 'auto' is uint8 where the calibrated minimum is >= 0.
    act_scheme : {'symmetric', 'auto', 'affine'}
        'affine' holds each float tensor that only conv/dense layers read (a network input,
        the output of a float op such as hardswish) as uint8 with a zero point where its
        range has min < 0 (:func:`gluonq.convert.plan.affine_candidates`); 'auto' does so
        only where that makes the step at least ``AFFINE_GAIN`` (1.25) times finer than
        symmetric int8, i.e. where the range is lopsided; 'symmetric' (default) never.
        Affine tensors need ``act_dtype='auto'``. Measured with 'auto': +2.5 to +4.0 dB
        logit SQNR on rapidocr's cls model (naive, percentile, mse), within 0.1 dB on the
        MNIST models, but -0.7 dB and fewer exact matches on the rec model and -1.1 box F1
        on det: no default for every network, so it is opt-in (README "The arithmetic").
    exclude : list of str, optional
        Node names or glob patterns (e.g. ``'*conv0*'``, ``'*dense*'``) that stay float.
    calib_options : dict, optional
        Extra keyword arguments for the observers (e.g. ``{'percentile': 99.9}``).
    bias_correction : bool, default False
        Remove each layer's mean int8 error per output channel on the calibration data from
        its int32 bias (:mod:`gluonq.convert.bias_correction`); the largest change per layer
        is in ``qnet.spec['calibration']['bias_correction']``. Off by default: it raises
        logit SQNR on the MNIST models but lowered top-1 on rapidocr's cls model.
    weight_rounding : {'nearest', 'adaround'}, default 'nearest'
        'adaround' learns, per weight, whether to round down or up so that each layer's
        output MSE on the calibration data (with the int8 input) is smallest, layer by layer
        in order (:mod:`gluonq.convert.adaround`); scales, +-127 elements and int32 biases
        stay. Per layer MSE before/after in ``qnet.spec['calibration']['weight_rounding']``.
        Runs before bias correction.
    adaround_iters : int
        Optimizer steps per layer for 'adaround' (its time is proportional).
    eval_fn : callable, optional
        ``eval_fn(net) -> metric`` (higher is better), run on the float and the int8 network.
        When given, the most sensitive int8 layers go back to float until the metric drops
        by at most ``max_drop`` (:mod:`gluonq.convert.fallback`; which layers, and whether
        the bound was met, in ``qnet.spec['calibration']['fallback']``).
    max_drop : float, default 0.1
        Largest acceptable ``eval_fn(net) - eval_fn(qnet)``, in the metric's units.

    Returns
    -------
    QuantizedNet
        A HybridBlock built from gluonq's int8 blocks; ``.report`` says what each op became.

    Raises
    ------
    CalibrationDataError
        Empty or non-finite calibration data, or batches of a shape the network does not
        take (naming the batch, or the layer that rejects the shape and what it expects).
    ValueError
        A setting that does not fit the network (``exclude`` matching no layer, ...).
    """
    if act_dtype not in ('auto', 'int8', 'uint8'):
        raise ValueError("act_dtype must be 'auto', 'int8' or 'uint8', got %r" % (act_dtype,))
    if act_scheme not in ('symmetric', 'auto', 'affine'):
        raise ValueError("act_scheme must be 'symmetric', 'auto' or 'affine', got %r"
                         % (act_scheme,))
    if act_scheme == 'affine' and act_dtype != 'auto':
        raise ValueError("act_scheme='affine' holds tensors as uint8 with a zero point and "
                         "needs act_dtype='auto', got act_dtype=%r" % (act_dtype,))
    if weight_rounding not in ('nearest', 'adaround'):
        raise ValueError("weight_rounding must be 'nearest' or 'adaround', got %r"
                         % (weight_rounding,))
    if isinstance(adaround_iters, bool) or not isinstance(adaround_iters, int) \
            or adaround_iters < 1:
        raise ValueError('adaround_iters must be a positive int, got %r' % (adaround_iters,))
    exclude = list(exclude or [])
    batches = as_batches(calib_data, num_calib_batches, num_calib_examples, batch_size)
    if isinstance(net, mx.gluon.HybridBlock):
        err = input_shape_error(net, (1,) + batches[0].shape[1:])
        if err:
            raise CalibrationDataError('calibration batches of shape %s: %s'
                                       % (batches[0].shape, err))
    graph = trace_and_fold(net, (1,) + batches[0].shape[1:])
    units = make_plan(graph, exclude)
    check_exclude(graph, exclude)
    # tensors to observe: outputs of int8 units that produce their own range, and float
    # tensors that an int8 unit reads (they get a Quantize step)
    producer = {e: u for u in units for e in u.outputs}
    observed = []
    for u in units:
        if u.is_int8 and u.kind in ('conv', 'dense', 'add', 'concat', 'matmul'):
            if u.out_q:
                observed.append(u.output)
        for e, q in zip(u.inputs, u.in_q):
            if q and not (e in producer and producer[e].is_int8) and e not in observed:
                observed.append(e)
    # layer results gluonq never rounds, which onnxruntime needs as 8-bit tensors: before a
    # fused residual add (no fused sum there; spec['preadd_ranges']) and a convolution's
    # float output (no QLinearConv with one; spec['float_result_ranges'])
    preadd = [(u.node.name, 0) for u in units if u.is_int8 and u.residual is not None]
    floats = [(u.node.name, 0) for u in units if u.is_int8 and u.kind == 'conv' and
              not u.out_q and u.residual is None]
    opts = dict(calib_options or {})
    observers = [make_observer(calib_mode, dtype=act_dtype, name=edge_key(e), **opts)
                 for e in observed]
    result_obs = [make_observer(calib_mode, dtype='int8', name=edge_key(e) + ' (result)',
                                **opts) for e in preadd + floats]
    if observers:
        sym = graph.to_symbol(observed + preadd + floats)
        collect(sym, graph.inputs[0], graph.params, batches, observers + result_obs,
                progress)
    affine_ok = set(affine_candidates(units)) if act_dtype == 'auto' else set()
    qparams = {e: _choose_qparams(o, act_scheme if e in affine_ok else 'symmetric')
               for e, o in zip(observed, observers)}
    warnings = [o.fallback for o in observers if getattr(o, 'fallback', None)]
    warnings += _fit_bias_ranges(graph, units, producer, qparams, per_channel)
    for w in warnings:
        log.warning('calibration: %s', w)
    _propagate_qparams(units, producer, qparams)
    spec, values = _build_spec(graph, units, qparams, per_channel, act_dtype)
    step_of = {st['node']: st['name'] for st in spec['steps'] if 'node' in st}
    for key, edges, obs in (('preadd_ranges', preadd, result_obs[:len(preadd)]),
                            ('float_result_ranges', floats, result_obs[len(preadd):])):
        spec[key] = {}
        for e, o in zip(edges, obs):
            qp = o.calculate_qparams()
            spec[key][step_of[e[0]]] = [qp.min, qp.max]
    spec['calibration'] = {
        'mode': calib_mode if isinstance(calib_mode, str) else calib_mode.__name__,
        'options': opts, 'num_examples': int(sum(b.shape[0] for b in batches)),
        'num_batches': len(batches), 'per_channel': bool(per_channel),
        'act_dtype': act_dtype, 'act_scheme': act_scheme, 'exclude': exclude,
        'warnings': warnings}
    spec['versions'] = {'gluonq': __version__, 'mxnet': mx.__version__}
    qnet = QuantizedNet(spec)
    for w in _set_values(qnet, values):
        log.warning('calibration: %s', w)
        qnet._spec['calibration']['warnings'].append(w)
    if weight_rounding == 'adaround':
        adaround(qnet, values, batches, adaround_iters)
    if bias_correction:
        correct_biases(qnet, graph, batches)
    if eval_fn is not None:
        qnet = accuracy_fallback(net, qnet, values, batches, eval_fn, max_drop, lambda nodes: (
            quantize_net(net, batches, calib_mode, None, None, per_channel, act_dtype,
                         exclude + nodes, batch_size, calib_options, progress, bias_correction,
                         act_scheme=act_scheme, weight_rounding=weight_rounding,
                         adaround_iters=adaround_iters)))
    return qnet


#: act_scheme='auto' takes an affine range where its step is at least this much finer.
AFFINE_GAIN = 1.25


def _choose_qparams(observer, scheme):
    """The observer's QParams under ``scheme`` ('symmetric', 'auto' or 'affine')."""
    sym = observer.calculate_qparams()
    if scheme == 'symmetric':
        return sym
    aff = observer.calculate_qparams('affine')
    if scheme == 'affine' or float(sym.scale) >= AFFINE_GAIN * float(aff.scale):
        return aff
    return sym


#: units whose output holds their input's range (see :func:`_propagate_qparams`)
_PASS_THROUGH = ('pool', 'flatten', 'relu', 'shape')


def _range_source(edge, producer, qparams):
    """The calibrated edge whose range ``edge`` carries through pass-through units (None for
    a dynamic input)."""
    while edge not in qparams and edge in producer and producer[edge].kind in _PASS_THROUGH:
        edge = producer[edge].inputs[0]
    return edge if edge in qparams else None


def _fit_bias_ranges(graph, units, producer, qparams, per_channel):
    """Widen the range of a tensor that was 0 on every calibration example (a ReLU that never
    fired) where it is too small for the int32 bias of a layer that reads it.

    A layer holds its bias as ``round(b / (s_in * s_w))`` in int32, less the accumulator's
    headroom (:func:`gluonq.quant.bias_headroom`). An all-zero input has the range
    ``EPS_RANGE``, so small an ``s_in`` that the bias saturates and the layer loses it. Such
    a range is scaled up to the smallest one whose ``s_in`` fits the bias of every layer
    reading it: nothing is lost, since the tensor held only zeros. A tensor with a real range
    keeps it (rapidocr's rec model has channels whose bias would need ranges up to 1e24 times
    wider, which would wipe out every other channel); such channels get a larger weight scale
    instead (:func:`gluonq.quant.quantize_weight_for_bias`). Returns a warning per widened
    tensor.
    """
    need = {}                                   # edge -> smallest s_in its readers allow
    for u in units:
        if not (u.is_int8 and u.kind in ('conv', 'dense')) or \
                u.node.bool_attr('no_bias', False):
            continue
        src = _range_source(u.inputs[0], producer, qparams)
        if src is None:
            continue
        qp = qparams[src]
        if max(abs(qp.min), abs(qp.max)) >= 2 * quant.EPS_RANGE:
            continue
        b = graph.params[graph.param_of(u.node, 2)].astype(np.float64)
        q_w, s_w = quant.quantize_weight(graph.params[graph.param_of(u.node, 1)], per_channel)
        room = quant.QBOUNDS['int32'][1] - quant.bias_headroom(q_w, qp.dtype, qp.zero_point)
        s_min = float(np.max(np.abs(b) / (room * np.broadcast_to(s_w, b.shape))))
        if s_min > float(qp.scale):
            need[src] = max(need.get(src, 0.0), s_min)
    warnings = []
    for e, s_min in sorted(need.items(), key=lambda kv: edge_key(kv[0])):
        old = qparams[e]
        k = s_min / float(old.scale)
        new = old
        while float(new.scale) < s_min:
            k *= 1.001
            new = quant.QParams(old.dtype, old.min * k, old.max * k, old.scheme)
        qparams[e] = new
        warnings.append('range of %s widened from [%g, %g] to [%g, %g]: the bias of a layer '
                        'reading it does not fit int32 at the calibrated scale (the tensor was 0 '
                        'on every calibration example)'
                        % (edge_key(e), old.min, old.max, new.min, new.max))
    return warnings


def _propagate_qparams(units, producer, qparams):
    """Ranges of pass-through outputs, concat inputs that share the output's range, and
    ReLU'd residual layers with a signed operand."""
    nonneg = set()       # int8 edges of ReLU'd residual layers (0..127, typed uint8 by oneDNN)
    for u in units:
        if not u.is_int8:
            continue
        if u.kind in ('conv', 'dense') and u.residual is not None and u.act == 'relu' and \
                u.output in qparams and qparams[u.output].dtype == 'uint8' and \
                qparams[u.residual].dtype == 'int8' and u.residual not in nonneg:
            # relu(conv(x) + r) with a signed r: the output is held as int8 (0..127), one bit
            # less, because oneDNN's fused sum computes in the operand's dtype and saturates
            # at 127 (MXNet's own int8 flow silently clips such outputs at half range). With
            # such a 0..127 r (which the fused kernels type uint8) the sum fits uint8, and the
            # output keeps its uint8 range. A standalone ReLU's int8 output stays int8-typed
            # in MXNet, so it counts as signed here.
            out = qparams[u.output]
            qparams[u.output] = quant.QParams('int8', -out.max, out.max)
            nonneg.add(u.output)
        elif u.kind in _PASS_THROUGH:
            for e in u.outputs:
                qparams[e] = qparams[u.inputs[0]]
                if u.inputs[0] in nonneg:
                    nonneg.add(e)
        elif u.kind == 'concat':
            out = qparams[u.output]
            # an int8 layer feeding only this concat writes the concat's range directly,
            # so the concat copies instead of requantizing
            for e in u.inputs:
                p = producer.get(e)
                if p is not None and p.kind in ('conv', 'dense', 'add') and \
                        _single_reader(units, e) and (p.act is None or out.dtype == 'uint8'):
                    qparams[e] = out


def _single_reader(units, edge):
    return sum(u.inputs.count(edge) for u in units) == 1


def _qkey(e):
    return edge_key(e) + '#q'


def _fkey(e):
    return edge_key(e) + '#f'


def _build_spec(graph, units, qparams, per_channel, act_dtype):
    """Steps of the QuantizedNet and the float values its parameters are made from."""
    producer = {e: u for u in units for e in u.outputs}
    steps, values, used, report = [], {}, set(), []
    have = {}                                   # (edge, 'q'/'f') -> tensor key

    def tensor(e, want_q):
        if e in producer and producer[e].is_int8 and producer[e].out_q:
            native = 'q'
        else:
            native = 'f'
        key = edge_key(e)
        if (want_q and native == 'q') or (not want_q and native == 'f'):
            return key
        if (e, want_q) in have:
            return have[(e, want_q)]
        if want_q:
            qp = qparams[e]
            name = _step_name('quantize_' + edge_key(e), used)
            cfg = {'out_dtype': qp.dtype, 'in_range': [qp.min, qp.max]}
            if qp.is_affine:
                cfg['scheme'] = 'affine'
            steps.append({'name': name, 'block': 'Quantize', 'inputs': [key],
                          'outputs': [_qkey(e)], 'config': cfg})
            have[(e, want_q)] = _qkey(e)
        else:
            name = _step_name('dequantize_' + edge_key(e), used)
            steps.append({'name': name, 'block': 'Dequantize', 'inputs': [key],
                          'outputs': [_fkey(e)], 'config': {}})
            have[(e, want_q)] = _fkey(e)
        return have[(e, want_q)]

    for u in units:
        ins = [tensor(e, q) for e, q in zip(u.inputs, u.in_q)]
        name = _step_name(u.node.name, used)
        out_qp = qparams.get(u.output) if u.out_q else None
        if u.kind in ('conv', 'dense'):
            cfg, vals = _layer_config(graph, u, qparams, out_qp, per_channel)
            block = {'conv': 'QuantizedConv%dD' % len(parse_tuple(u.node.attr('kernel'), ())),
                     'dense': 'QuantizedDense'}[u.kind]
            values[name] = vals
        elif u.kind == 'add':
            block = 'QuantizedAdd'
            cfg = {'activation': 'relu' if u.act else None,
                   'out_dtype': out_qp.dtype if out_qp else 'float32',
                   'out_range': [out_qp.min, out_qp.max] if out_qp else None}
        elif u.kind == 'concat':
            block = 'QuantizedConcat'
            cfg = {'dim': int(u.node.attr('dim', '1')), 'out_dtype': out_qp.dtype,
                   'out_range': [out_qp.min, out_qp.max]}
        elif u.kind == 'pool':
            block = 'QuantizedPooling'
            n = u.node
            cfg = {'pool_size': list(parse_tuple(n.attr('kernel'), (1, 1)) or (1, 1)),
                   'strides': list(parse_tuple(n.attr('stride'), (1, 1)) or (1, 1)),
                   'padding': list(parse_tuple(n.attr('pad'), (0, 0)) or (0, 0)),
                   'ceil_mode': n.attr('pooling_convention', 'valid') == 'full',
                   'global_pool': n.bool_attr('global_pool'),
                   'pool_type': n.attr('pool_type', 'max')}
            if n.attr('count_include_pad') is not None:
                cfg['count_include_pad'] = n.bool_attr('count_include_pad', True)
        elif u.kind == 'matmul':
            block, cfg = 'QuantizedMatMul', _matmul_config(graph, u, qparams, out_qp)
        elif u.kind == 'shape':
            block, cfg = 'QuantizedShapeOp', {'op': u.node.op, 'attrs': dict(u.node.attrs)}
        elif u.kind == 'flatten':
            block, cfg = 'QuantizedFlatten', {}
        elif u.kind == 'relu':
            block, cfg = 'QuantizedActivation', {'in_dtype': qparams[u.inputs[0]].dtype}
        else:
            block, cfg, vals, ins = _float_config(graph, u, ins)
            values[name] = vals
        outs = [edge_key(e) for e in u.outputs]
        if u.kind == 'float':
            nout = len(u.node.shapes or [None])
            outs = [edge_key((u.node.name, i)) for i in range(nout)]
        steps.append({'name': name, 'block': block, 'config': cfg, 'inputs': ins,
                      'outputs': outs, 'node': u.node.name})
        for node in [u.node] + u.fused:
            report.append({'node': node.name, 'op': node.op, 'step': name,
                           'kind': u.describe() if node is u.node else
                           'fused into %s' % name,
                           'reason': u.reason or ''})
    for name, note in graph.notes.items():        # every note starts with the op name
        report.append({'node': name, 'op': note.split(' ', 1)[0], 'step': '',
                       'kind': 'folded', 'reason': note})
    outputs = [tensor(e, False) for e in graph.outputs]
    spec = {'format': 'gluonq.QuantizedNet', 'format_version': 1,
            'inputs': [graph.inputs[0]], 'input_shape': list(graph.shape((graph.inputs[0], 0))
                                                             or []),
            'outputs': outputs, 'steps': steps,
            'qparams': {edge_key(e): qp.to_dict() for e, qp in sorted(
                qparams.items(), key=lambda kv: edge_key(kv[0]))},
            'report': report}
    return spec, values


def _layer_config(graph, u, qparams, out_qp, per_channel):
    node = u.node
    w = graph.params[graph.param_of(node, 1)]
    has_bias = not node.bool_attr('no_bias', False)
    b = graph.params[graph.param_of(node, 2)] if has_bias else None
    in_qp = qparams.get(u.inputs[0])      # None: dynamic, the range of each input
    common = {'in_dtype': in_qp.dtype if in_qp else u.dynamic_dtypes[0],
              'in_range': [in_qp.min, in_qp.max] if in_qp else None,
              'out_dtype': out_qp.dtype if out_qp else 'float32',
              'out_range': [out_qp.min, out_qp.max] if out_qp else None,
              'per_channel': bool(per_channel), 'residual': u.residual is not None,
              'activation': 'relu' if u.act else None, 'use_bias': has_bias}
    if in_qp is not None and in_qp.is_affine:
        common['in_scheme'] = 'affine'
    if u.kind == 'dense':
        cfg = dict(common, units=int(node.attr('num_hidden')),
                   flatten=node.bool_attr('flatten', True), in_units=int(w.shape[1]))
    else:
        g = conv_geometry(node)
        nd = len(g['kernel'])
        cfg = dict(common, channels=g['channels'], kernel_size=list(g['kernel']),
                   strides=list(g['stride']), padding=list(g['pad']),
                   dilation=list(g['dilate']), groups=g['groups'],
                   layout={1: 'NCW', 2: 'NCHW', 3: 'NCDHW'}[nd],
                   in_channels=int(w.shape[1]) * g['groups'])
    return cfg, {'weight': w, 'bias': b}


def _matmul_config(graph, u, qparams, out_qp):
    """A QuantizedMatMul step: the float op's flags and alpha times the folded scalar; the
    operands arrive quantized (QTensors with their calibrated ranges), or float in dynamic
    mode (quantized with the range of each operand)."""
    n = u.node
    da, db = (qparams[e].dtype if e in qparams else u.dynamic_dtypes[i]
              for i, e in enumerate(u.inputs))
    sa = graph.shape(u.inputs[0])
    return {'contraction': int(sa[-2 if n.bool_attr('transpose_a') else -1]),
            'transpose_a': n.bool_attr('transpose_a'), 'transpose_b': n.bool_attr('transpose_b'),
            'alpha': float(n.attr('alpha', '1.0')) * u.alpha, 'a_dtype': da,
            'b_dtype': db, 'out_dtype': out_qp.dtype if out_qp else 'float32',
            'out_range': [out_qp.min, out_qp.max] if out_qp else None}


def _float_config(graph, u, ins):
    """A FloatOp step: parameters become its own, data inputs stay inputs."""
    node = u.node
    params, vals, data = [], {}, []
    k = 0
    for pos, e in enumerate(node.inputs):
        if e[0] in graph.params:
            local = 'p%d' % pos
            params.append([pos, local, list(graph.params[e[0]].shape)])
            vals[local] = graph.params[e[0]]
        else:
            data.append(ins[k])
            k += 1
    cfg = {'op': node.op, 'attrs': dict(node.attrs), 'num_inputs': len(node.inputs),
           'params': params}
    return 'FloatOp', cfg, vals, data


def _set_values(qnet, values):
    """Initialize the converted network and write its parameters from float values; a
    warning per layer whose bias made weight scales rise (``set_float_params``)."""
    qnet.initialize(mx.init.Zero())
    warnings = []
    for name, vals in values.items():
        block = qnet._children[name]
        if hasattr(block, 'set_float_params'):
            raised = block.set_float_params(vals['weight'], vals['bias'])
            if len(raised):
                warnings.append('%s: weight scale raised in %d of %d channel(s) (%s) so that '
                                'the int32 bias fits at the calibrated input scale'
                                % (name, len(raised), block._units,
                                   ', '.join(str(c) for c in raised[:8]) +
                                   (', ...' if len(raised) > 8 else '')))
        else:
            missing = sorted(set(block._reg_params) - set(vals))
            if missing:
                raise ValueError('step %r (%r): no value for its parameters %s'
                                 % (name, block, missing))
            for local, v in vals.items():
                block._reg_params[local].set_data(mx.nd.array(v, dtype=np.float32))
    return warnings
