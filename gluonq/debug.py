"""Layer-by-layer comparison of a float network with its quantized twin.

Like PyTorch's Numeric Suite: for every int8 step, the SQNR and largest error of its output
against the float network's value of the same tensor (errors accumulated from the input
onward), and, for layers with weights, the SQNR of the int8 weights against the float
(BatchNorm-folded) weights. ``plot`` draws it as a bar chart.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

from . import quant
from .arrays import to_numpy
from .calibration.collect import as_batches
from .convert.convert import trace_and_fold
from .convert.replay import float_tensors
from .nn import as_qtensor

__all__ = ['compare', 'format_table', 'compare_methods', 'format_methods', 'plot']

_LAYER_BLOCKS = ('QuantizedConv1D', 'QuantizedConv2D', 'QuantizedConv3D', 'QuantizedDense')


def _edge(key):
    name, _, idx = key.partition(':')
    return (name, int(idx) if idx else 0)


def _as_float(value):
    qt = as_qtensor(value)
    return qt.dequantize().asnumpy() if qt is not None else value.asnumpy()


def compare(float_net, qnet, data, num_examples=64):
    """Per int8 step of ``qnet``: output SQNR/max error vs ``float_net``, weight SQNR.

    ``data`` is anything ``quantize_net`` takes as calibration data; the first
    ``num_examples`` examples are used. Returns a list of dicts (one per step, in order)
    with keys ``step``, ``block``, ``tensor``, ``sqnr_db``, ``max_abs_err``,
    ``weight_sqnr_db`` (None without weights).
    """
    x = np.concatenate(as_batches(data, num_examples=num_examples))
    spec = qnet.spec
    graph = trace_and_fold(float_net, (1,) + x.shape[1:])
    layers = [s for s in spec['steps'] if s['block'] not in ('FloatOp', 'Quantize',
                                                               'Dequantize')]
    keys = [s['outputs'][0] for s in layers]
    edges = [_edge(k) for k in keys]
    missing = [k for k, e in zip(keys, edges) if e[0] not in graph.nodes]
    if missing:
        raise ValueError('the float network has no tensors %s: is it the network that was '
                         'quantized?' % missing[:5])
    fouts = float_tensors(graph, edges)(mx.nd.array(x))
    env = qnet.forward_all(mx.nd.array(x))
    rows = []
    for step, key, fval in zip(layers, keys, fouts):
        ref, got = fval.asnumpy(), _as_float(env[key])
        row = {'step': step['name'], 'block': step['block'], 'tensor': key,
               'sqnr_db': quant.sqnr_db(ref, got),
               'max_abs_err': float(np.abs(ref - got).max()), 'weight_sqnr_db': None}
        if step['block'] in _LAYER_BLOCKS:
            block = qnet._children[step['name']]
            w = to_numpy(block.weight, np.float32)
            s = to_numpy(block.weight_scale)
            wq = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
            node = graph.nodes[step['node']]
            wf = graph.params[graph.param_of(node, 1)]
            row['weight_sqnr_db'] = quant.sqnr_db(wf, wq)
        rows.append(row)
    return rows


def format_table(rows):
    """The comparison as a fixed-width text table."""
    lines = ['%-42s %-18s %10s %12s %10s' % ('step', 'block', 'SQNR dB', 'max |err|',
                                              'weight dB')]
    for r in rows:
        w = '' if r['weight_sqnr_db'] is None else '%.1f' % r['weight_sqnr_db']
        lines.append('%-42s %-18s %10.1f %12.4g %10s' % (r['step'][:42], r['block'][:18],
                                                         r['sqnr_db'], r['max_abs_err'], w))
    return '\n'.join(lines)


def compare_methods(float_net, qnets, data, num_examples=64):
    """What each conversion method changed, per layer: :func:`compare` of several
    conversions of one float network, side by side.

    Parameters
    ----------
    float_net : Block
        The float network.
    qnets : dict
        Label -> QuantizedNet, e.g. ``{'naive': quantize_net(net, x,
        bias_correction=False), 'naive + bias correction': quantize_net(net, x)}``.
    data, num_examples :
        As for :func:`compare`.

    Returns
    -------
    list of dict
        One per step (in the first network's order, then steps only later ones have):
        ``step``, ``block`` and, per label, ``sqnr_db`` (None where the step is not int8
        in that network), ``bias_shift`` (the largest bias change of bias correction in
        output units, None without it) and ``fallback`` (True where the accuracy fallback
        put the layer back to float).
    """
    rows, index = [], {}
    for label, qnet in qnets.items():
        spec = qnet.spec
        calib = spec.get('calibration', {})
        shifts = calib.get('bias_correction') or {}
        reverted = set((calib.get('fallback') or {}).get('layers', []))
        cmp = {r['step']: r for r in compare(float_net, qnet, data, num_examples)}
        for step in spec['steps']:
            name = step['name']
            fell_back = step.get('node') in reverted
            if name not in cmp and not fell_back:
                continue
            if name not in index:
                index[name] = len(rows)
                rows.append({'step': name, 'block': step['block'], 'sqnr_db': {},
                             'bias_shift': {}, 'fallback': {}})
            row = rows[index[name]]
            if name in cmp:
                row['block'] = step['block']
            row['sqnr_db'][label] = cmp[name]['sqnr_db'] if name in cmp else None
            row['bias_shift'][label] = shifts.get(name)
            row['fallback'][label] = fell_back
    for row in rows:
        for label in qnets:
            row['sqnr_db'].setdefault(label, None)
            row['bias_shift'].setdefault(label, None)
            row['fallback'].setdefault(label, False)
    return rows


def format_methods(rows):
    """:func:`compare_methods` as a text table: output SQNR (dB) per method, ``float`` where
    the fallback reverted the layer, and the largest bias-correction shift."""
    labels = list(rows[0]['sqnr_db']) if rows else []
    head = '%-36s %-16s' % ('step', 'block') + ''.join(' %16s' % lab[:16] for lab in labels)
    lines = [head + '  changes']
    for r in rows:
        cells, notes = [], []
        for lab in labels:
            v = r['sqnr_db'][lab]
            cells.append(' %16s' % ('float' if r['fallback'][lab] else
                                    '-' if v is None else '%.1f' % v))
            if r['bias_shift'][lab]:
                notes.append('%s: bias shift %.3g' % (lab, r['bias_shift'][lab]))
            if r['fallback'][lab]:
                notes.append('%s: fallback to float' % lab)
        lines.append('%-36s %-16s' % (r['step'][:36], r['block'][:16]) + ''.join(cells) +
                     ('  ' + '; '.join(notes) if notes else ''))
    return '\n'.join(lines)


def plot(rows, path):
    """Save a bar chart of per-step output SQNR (and weight SQNR) to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from .atomic import atomic_outputs
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n + 2), 4))
    idx = np.arange(n)
    ax.bar(idx - 0.2, [min(r['sqnr_db'], 80) for r in rows], 0.4, label='output SQNR')
    ax.bar(idx + 0.2, [min(r['weight_sqnr_db'] or 0, 80) for r in rows], 0.4,
           label='weight SQNR')
    ax.set_xticks(idx)
    ax.set_xticklabels([r['step'] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel('dB')
    ax.set_title('int8 vs float32, per step')
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    with atomic_outputs([path], overwrite=True) as (tmp,):
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)
    return path
