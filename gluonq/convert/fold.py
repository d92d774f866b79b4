"""Float graph passes that run before quantization: identity removal and BatchNorm folding.

All arithmetic is float64 and the results are stored as float32, so folding changes the float
network by rounding only (the tests check it against the unfolded network).
"""
from __future__ import annotations

import numpy as np

from .graph import Node, parse_tuple

__all__ = ['remove_identities', 'fold_batchnorm', 'batchnorm_to_conv', 'prepare']

IDENTITY_OPS = ('Dropout', '_copy', 'identity', 'BlockGrad', 'stop_gradient')


def remove_identities(graph):
    """Drop ops that are the identity at inference (Dropout, copies)."""
    for node in graph.op_nodes():
        if node.op in IDENTITY_OPS and len(node.inputs) >= 1:
            graph.replace_uses((node.name, 0), node.inputs[0])
            graph.notes[node.name] = '%s is the identity at inference: removed' % node.op
    graph.remove_unused()
    return graph


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


def _channel_axis_ok(graph, producer, bn):
    out_shape = producer.shapes[0] if producer.shapes else None
    if out_shape is None:
        return False
    axis = int(bn.attr('axis', '1'))
    axis = axis % len(out_shape)
    if producer.op == 'Convolution':
        layout = producer.attr('layout', 'None')
        return axis == 1 and (layout in ('None', None) or layout.startswith('NC'))
    return axis == len(out_shape) - 1          # FullyConnected: units on the last axis


def fold_batchnorm(graph):
    """Fold every inference BatchNorm that directly follows a Convolution or FullyConnected
    (whose output nothing else reads) into that layer's weight and bias."""
    users = graph.consumers()
    for bn in graph.op_nodes():
        if not _is_foldable_bn(graph, bn):
            continue
        src, idx = bn.inputs[0]
        producer = graph.nodes[src]
        if producer.op not in ('Convolution', 'FullyConnected') or idx != 0:
            continue
        if len(users[src]) != 1 or (src, 0) in graph.outputs:
            continue
        wname = graph.param_of(producer, 1)
        if wname is None or len(users[wname]) != 1 or not _channel_axis_ok(graph, producer, bn):
            continue
        alpha, shift = _bn_alpha_beta(graph, bn)
        w = graph.params[wname].astype(np.float64)
        graph.params[wname] = (w * alpha.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        no_bias = producer.bool_attr('no_bias', False)
        if no_bias:
            bname = graph.add_param(_fresh(graph, producer.name + '_folded_bias'),
                                    shift.astype(np.float32))
            producer.inputs.append((bname, 0))
            producer.attrs['no_bias'] = 'False'
        else:
            bname = graph.param_of(producer, 2)
            if bname is None or len(users[bname]) != 1:
                continue
            b = graph.params[bname].astype(np.float64)
            graph.params[bname] = (b * alpha + shift).astype(np.float32)
        graph.replace_uses((bn.name, 0), (producer.name, 0))
        graph.notes[bn.name] = 'BatchNorm folded into %s' % producer.name
        users = graph.consumers()
    graph.remove_unused()
    return graph


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
    """The float passes in order: identities out, BN folded, lone BNs as depthwise convs."""
    remove_identities(graph)
    fold_batchnorm(graph)
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
