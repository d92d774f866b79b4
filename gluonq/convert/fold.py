"""Float graph passes that run before quantization: identity removal, constant evaluation,
BatchNorm folding and folding of constant arithmetic into the preceding conv/dense layer.

Imported graphs (ONNX files from PaddlePaddle, TensorFlow, ...) write a layer's bias as
``broadcast_add(conv_out, constant)``, a scale as ``broadcast_mul`` and reshape their
constants in the graph: :func:`fold_constants` evaluates ops that read only parameters, and
:func:`fold_affine` moves a per-output-channel or scalar add/sub/mul/div into the layer, as
:func:`fold_batchnorm` does for BatchNorm. All folding arithmetic is float64 and the results
are stored as float32, so folding changes the float network by rounding only (the tests
check it against the unfolded network). ``graph.notes`` records what each pass did to the
nodes it removed; every note starts with the op name of the removed node.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import mxnet as mx
import numpy as np

from .graph import Node, parse_tuple

__all__ = ['remove_identities', 'batch_sized_states', 'fold_constants', 'fold_batchnorm',
           'fold_affine', 'constant_operand', 'affine_problem', 'batchnorm_to_conv', 'prepare']

IDENTITY_OPS = ('Dropout', '_copy', 'identity', 'BlockGrad', 'stop_gradient')


def remove_identities(graph):
    """Drop ops that are the identity at inference (Dropout, copies)."""
    for node in graph.op_nodes():
        if node.op in IDENTITY_OPS and len(node.inputs) >= 1:
            graph.replace_uses((node.name, 0), node.inputs[0])
            graph.notes[node.name] = '%s is the identity at inference: removed' % node.op
    graph.remove_unused()
    return graph


def _eval_node(node, values):
    """Outputs (numpy) of one op node on constant input ``values``, computed by MXNet."""
    k = len(node.inputs)
    js = {'nodes': [{'op': 'null', 'name': 'c%d' % i, 'inputs': []} for i in range(k)]
                   + [{'op': node.op, 'name': node.name, 'attrs': dict(node.attrs),
                       'inputs': [[i, 0, 0] for i in range(k)]}],
          'arg_nodes': list(range(k)), 'heads': [[k, i, 0] for i in range(len(node.shapes))],
          'attrs': {'mxnet_version': ['int', 10901]}}
    sym = mx.sym.load_json(json.dumps(js))
    outs = sym.eval(ctx=mx.cpu(), **{'c%d' % i: mx.nd.array(v, dtype=v.dtype)
                                     for i, v in enumerate(values)})
    return [o.asnumpy() for o in outs]


def fold_constants(graph):
    """Evaluate every op whose inputs are all parameters (a reshaped, transposed, broadcast or
    scaled constant) once, in float32 as the network computes it, and make its outputs
    parameters. Random ops are left alone, and so are ops that make a tensor whose shape
    MXNet infers from the data (``zeros(shape=(1, 0, 16))``, an RNN's default begin state:
    its batch size is not known until the network runs)."""
    for node in graph.op_nodes():
        if not all(src in graph.params for src, _ in node.inputs) or node.shapes is None or \
                'random' in node.op or 'sample' in node.op or _shape_inferred(node):
            continue
        outs = _eval_node(node, [graph.params[src] for src, _ in node.inputs])
        del graph.nodes[node.name]
        if len(outs) == 1:                       # the constant keeps the op's name
            graph.add_param(node.name, outs[0])
        else:
            for i, v in enumerate(outs):
                name = graph.add_param(_fresh(graph, '%s_out%d' % (node.name, i)), v)
                graph.replace_uses((node.name, i), (name, 0))
        graph.notes[node.name] = '%s of constants evaluated once at conversion' % node.op
    graph.remove_unused()
    return graph


_FILL = {'_zeros': lambda n: 0.0, '_ones': lambda n: 1.0,
         '_full': lambda n: float(n.attr('value', '0'))}


def batch_sized_states(graph):
    """Give an RNN's default begin states (``zeros(shape=(layers, 0, hidden))``, whose 0 is
    the batch size MXNet infers from the data) a data input: a constant with batch size 1
    broadcast to the RNN data's batch axis (``broadcast_like``, axis 1 of both, RNN's TNC
    layout), placed just before the RNN. Evaluating such a state once would fix the batch
    size of the converted network."""
    users = graph.consumers()
    for node in graph.op_nodes():
        if node.op not in _FILL or not _shape_inferred(node):
            continue
        rnns = [graph.nodes[c] for c, pos in users[node.name]
                if graph.nodes[c].op == 'RNN' and pos >= 2]
        if len(rnns) != len(users[node.name]) or len({r.name for r in rnns}) != 1:
            continue
        rnn = rnns[0]
        shape = parse_tuple(node.attr('shape'))
        if [i for i, d in enumerate(shape) if d <= 0] != [1]:
            continue
        row = graph.add_param(_fresh(graph, node.name + '_row'),
                              np.full((shape[0], 1) + shape[2:], _FILL[node.op](node),
                                      np.float32))
        state = Node(node.name, 'broadcast_like', {'lhs_axes': '(1,)', 'rhs_axes': '(1,)'},
                     [(row, 0), rnn.inputs[0]])
        state.shapes = node.shapes
        order = [n for n in graph.nodes.values() if n.name != node.name]
        at = order.index(rnn)
        graph.nodes = OrderedDict((n.name, n) for n in order[:at] + [state] + order[at:])
        graph.notes[node.name] = ('%s with the batch size inferred: a batch-1 constant '
                                  'broadcast along the RNN data\'s batch axis' % node.op)
    return graph


def _shape_inferred(node):
    """Does ``node`` read nothing and make a tensor of a ``shape`` attribute with unknown
    (0 or -1) sizes?"""
    shape = node.attr('shape', None)
    return not node.inputs and shape is not None and any(d <= 0 for d in parse_tuple(shape))


def _bn_alpha_beta(graph, bn):
    """Per-channel ``(alpha, shift)`` of an inference BatchNorm: ``y = alpha * x + shift``."""
    gamma, beta, mean, var = (graph.params[bn.inputs[i][0]].astype(np.float64)
                              for i in range(1, 5))
    eps = float(bn.attr('eps', '1e-3'))
    if bn.bool_attr('fix_gamma', True):
        gamma = np.ones_like(gamma)
    alpha = gamma / np.sqrt(var + eps)
    return alpha, beta - mean * alpha


def _is_foldable_bn(graph, bn):
    if bn.op != 'BatchNorm' or len(bn.inputs) != 5:
        return False
    return all(bn.inputs[i][0] in graph.params for i in range(1, 5))


def _channel_axis_ok(producer, axis):
    """Whether ``axis`` is the output-channel axis of a Convolution/FullyConnected node."""
    out_shape = producer.shapes[0] if producer.shapes else None
    if out_shape is None:
        return False
    axis = axis % len(out_shape)
    if producer.op == 'Convolution':
        layout = producer.attr('layout', 'None')
        return axis == 1 and (layout in ('None', None) or layout.startswith('NC'))
    return axis == len(out_shape) - 1          # FullyConnected: units on the last axis


def _fold_target_problem(graph, edge, axis, users):
    """Why a per-channel ``y = alpha * x + shift`` on ``edge`` along ``axis`` cannot fold into
    the layer that writes ``edge`` (None if it can): that must be a Convolution or
    FullyConnected whose output, weight and bias nothing else reads."""
    src, idx = edge
    producer = graph.nodes[src]
    if producer.op not in ('Convolution', 'FullyConnected') or idx != 0:
        return 'after %s (%s), not after a conv/dense layer it could fold into' % (
            producer.name, producer.op)
    if len(users[src]) != 1 or (src, 0) in graph.outputs:
        return 'after %s, whose output has other readers: cannot fold' % src
    wname = graph.param_of(producer, 1)
    if wname is None or len(users[wname]) != 1:
        return 'after %s, whose weight is not its own parameter' % src
    if not producer.bool_attr('no_bias', False):
        bname = graph.param_of(producer, 2)
        if bname is None or len(users[bname]) != 1:
            return 'after %s, whose bias is not its own parameter' % src
    if not _channel_axis_ok(producer, axis):
        return 'after %s, whose layout is not channel-first' % src
    return None


def _fold_into(graph, producer, alpha, shift):
    """Make ``producer`` (see :func:`_fold_target_problem`) compute ``alpha * y + shift`` per
    output channel: ``w' = alpha w``, ``b' = alpha b + shift`` (a bias is added if it has
    none), float64 products rounded to float32."""
    if np.any(alpha != 1.0):
        wname = graph.param_of(producer, 1)
        w = graph.params[wname].astype(np.float64)
        graph.params[wname] = (w * alpha.reshape((-1,) + (1,) * (w.ndim - 1))).astype(
            np.float32)
    if producer.bool_attr('no_bias', False):
        bname = graph.add_param(_fresh(graph, producer.name + '_folded_bias'),
                                shift.astype(np.float32))
        producer.inputs.append((bname, 0))
        producer.attrs['no_bias'] = 'False'
    else:
        bname = graph.param_of(producer, 2)
        b = graph.params[bname].astype(np.float64)
        graph.params[bname] = (b * alpha + shift).astype(np.float32)


def fold_batchnorm(graph):
    """Fold every inference BatchNorm that directly follows a Convolution or FullyConnected
    (whose output, weight and bias nothing else reads) into that layer's weight and bias."""
    users = graph.consumers()
    for bn in graph.op_nodes():
        if not _is_foldable_bn(graph, bn) or \
                _fold_target_problem(graph, bn.inputs[0], int(bn.attr('axis', '1')), users):
            continue
        producer = graph.nodes[bn.inputs[0][0]]
        _fold_into(graph, producer, *_bn_alpha_beta(graph, bn))
        graph.replace_uses((bn.name, 0), (producer.name, 0))
        graph.notes[bn.name] = 'BatchNorm folded into %s' % producer.name
        users = graph.consumers()
    graph.remove_unused()
    return graph


#: arithmetic ops with two tensor operands -> what they compute
BINARY_ARITH = {'broadcast_add': 'add', 'elemwise_add': 'add', 'broadcast_sub': 'sub',
                'elemwise_sub': 'sub', 'broadcast_mul': 'mul', 'elemwise_mul': 'mul',
                'broadcast_div': 'div', 'elemwise_div': 'div'}
#: arithmetic ops with a scalar attribute -> what they compute (``rsub``: scalar - x,
#: ``rdiv``: scalar / x)
SCALAR_ARITH = {'_plus_scalar': 'add', '_minus_scalar': 'sub', '_rminus_scalar': 'rsub',
                '_mul_scalar': 'mul', '_div_scalar': 'div', '_rdiv_scalar': 'rdiv'}


def constant_operand(graph, node):
    """``(kind, data_edge, constant, constant_first)`` of an add/sub/mul/div of a tensor
    and a constant (a parameter or a scalar attribute), else None. ``kind`` is add, sub,
    mul, div, and ``constant_first`` says the constant is the left operand (``c - x``)."""
    if node.op in SCALAR_ARITH and len(node.inputs) == 1:
        kind = SCALAR_ARITH[node.op]
        c = np.float64(np.float32(node.attr('scalar')))   # MXNet applies it in float32
        if kind in ('rsub', 'rdiv'):
            return kind[1:], node.inputs[0], c, True
        return kind, node.inputs[0], c, False
    if node.op in BINARY_ARITH and len(node.inputs) == 2:
        consts = [e[0] in graph.params for e in node.inputs]
        if consts.count(True) != 1:
            return None
        k = consts.index(True)
        return (BINARY_ARITH[node.op], node.inputs[1 - k],
                graph.params[node.inputs[k][0]].astype(np.float64), k == 0)
    return None


def _per_channel(c, out_shape, axis):
    """``c`` as one value per channel (or a scalar) of ``out_shape``'s axis ``axis``, or a
    reason it is not."""
    c = np.asarray(c)
    if c.ndim > len(out_shape):
        return None, 'a constant of shape %s has more axes than the output %s' % (
            c.shape, out_shape)
    full = (1,) * (len(out_shape) - c.ndim) + c.shape
    try:
        if np.broadcast_shapes(full, out_shape) != tuple(out_shape):
            raise ValueError
    except ValueError:
        return None, 'a constant of shape %s broadcasts the output %s to a larger shape' % (
            c.shape, out_shape)
    if any(d != 1 for i, d in enumerate(full) if i != axis):
        return None, ('a constant of shape %s varies along other axes than the output '
                      'channels (axis %d of %s)' % (c.shape, axis, tuple(out_shape)))
    return c.reshape(full[axis]), None


def _channel_axis(layer):
    """Output-channel axis of a conv (1) or dense layer (the last)."""
    return 1 if layer.op == 'Convolution' else len(layer.shapes[0]) - 1


def affine_problem(graph, node, users=None):
    """Why the constant arithmetic ``node`` cannot fold into the conv/dense layer before it
    (None if it can, or if ``node`` is no such arithmetic)."""
    found = constant_operand(graph, node)
    if found is None:
        return None
    kind, (src, idx), c, const_first = found
    producer = graph.nodes[src]
    what = '%s with a constant' % node.op
    users = graph.consumers() if users is None else users
    axis = _channel_axis(producer) if producer.shapes else 1
    why = _fold_target_problem(graph, (src, idx), axis, users)
    if why:
        return '%s %s' % (what, why)
    _, why = _per_channel(c, producer.shapes[0], axis)
    if why:
        return '%s after %s: %s' % (what, src, why)
    if kind == 'div' and const_first:
        return '%s after %s divides a constant by the output (not affine)' % (what, src)
    if kind == 'div' and np.any(c == 0):
        return '%s after %s divides by zero' % (what, src)
    return None


def fold_affine(graph):
    """Fold a per-output-channel or scalar add/sub/mul/div with a constant that directly
    follows a Convolution or FullyConnected (whose output nothing else reads) into that
    layer's weight and bias: ``w' = a w``, ``b' = a b + t`` for ``y = a x + t``."""
    changed = False
    users = graph.consumers()
    for node in graph.op_nodes():
        if constant_operand(graph, node) is None or affine_problem(graph, node, users):
            continue
        kind, (src, _), c, const_first = constant_operand(graph, node)
        producer = graph.nodes[src]
        axis = _channel_axis(producer)
        c, _ = _per_channel(c, producer.shapes[0], axis)
        units = producer.shapes[0][axis]
        c = np.broadcast_to(c, (units,))
        alpha = {'add': 1.0, 'sub': -1.0 if const_first else 1.0, 'mul': c,
                 'div': 1.0 / c}[kind] * np.ones(units)
        shift = {'add': c, 'sub': c if const_first else -c}.get(kind, np.zeros(units))
        _fold_into(graph, producer, alpha, shift)
        graph.replace_uses((node.name, 0), (producer.name, 0))
        del graph.nodes[node.name]
        graph.notes[node.name] = '%s with a constant folded into the %s of %s' % (
            node.op, 'bias' if kind in ('add', 'sub') and not const_first else
            'weight and bias', producer.name)
        users = graph.consumers()
        changed = True
    graph.remove_unused()
    return changed


def batchnorm_to_conv(graph):
    """Rewrite each remaining 4-d inference BatchNorm (NCHW, axis 1) as a depthwise 1x1
    Convolution with the same per-channel affine map, so that it can be quantized (as in
    pre-activation networks: DenseNet, ResNet v2)."""
    for bn in graph.op_nodes():
        if not _is_foldable_bn(graph, bn) or bn.shapes is None:
            continue
        shape = bn.shapes[0]
        if len(shape) != 4 or int(bn.attr('axis', '1')) % 4 != 1:
            continue
        alpha, shift = _bn_alpha_beta(graph, bn)
        c = shape[1]
        wname = graph.add_param(_fresh(graph, bn.name + '_dw_weight'),
                                alpha.reshape(c, 1, 1, 1).astype(np.float32))
        bname = graph.add_param(_fresh(graph, bn.name + '_dw_bias'), shift.astype(np.float32))
        conv = Node(bn.name, 'Convolution',
                    {'kernel': '(1, 1)', 'stride': '(1, 1)', 'pad': '(0, 0)',
                     'dilate': '(1, 1)', 'num_filter': str(c), 'num_group': str(c),
                     'no_bias': 'False', 'layout': 'NCHW'},
                    [bn.inputs[0], (wname, 0), (bname, 0)])
        conv.shapes = [shape]
        graph.nodes[bn.name] = conv
        graph.notes[bn.name] = 'BatchNorm without a preceding conv, run as a depthwise 1x1 conv'
    graph.remove_unused()
    return graph


def _fresh(graph, name):
    base, k = name, 0
    while name in graph.nodes:
        k += 1
        name = '%s%d' % (base, k)
    return name


def prepare(graph):
    """The float passes in order: identities out, constants evaluated, BatchNorms and
    constant arithmetic folded into the layers before them (until nothing changes: conv ->
    mul -> add -> BatchNorm folds whole), lone BNs as depthwise convs."""
    remove_identities(graph)
    batch_sized_states(graph)
    fold_constants(graph)
    while True:
        fold_batchnorm(graph)
        if not fold_affine(graph):
            break
    batchnorm_to_conv(graph)
    return graph


def conv_geometry(node):
    """Kernel, stride, pad, dilate and groups of a Convolution node (tuples of ints)."""
    kernel = parse_tuple(node.attr('kernel'))
    nd = len(kernel)
    return {
        'kernel': kernel,
        'stride': parse_tuple(node.attr('stride'), (1,) * nd) or (1,) * nd,
        'pad': parse_tuple(node.attr('pad'), (0,) * nd) or (0,) * nd,
        'dilate': parse_tuple(node.attr('dilate'), (1,) * nd) or (1,) * nd,
        'groups': int(node.attr('num_group', '1')),
        'channels': int(node.attr('num_filter')),
    }
