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
from .calibration.collect import as_batches
from .convert.convert import trace_and_fold
from .nn import as_qtensor

__all__ = ['compare', 'format_table', 'plot']

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
    sym = graph.to_symbol(edges)
    fblock = mx.gluon.SymbolBlock(sym, [mx.sym.var(graph.inputs[0], dtype=np.float32)])
    for name, p in fblock.collect_params().items():
        p.shape = graph.params[name].shape
        p.initialize(mx.init.Constant(0))
        p.set_data(mx.nd.array(graph.params[name]))
    fouts = fblock(mx.nd.array(x))
    fouts = fouts if isinstance(fouts, (list, tuple)) else [fouts]
    env = qnet.forward_all(mx.nd.array(x))
    rows = []
    for step, key, fval in zip(layers, keys, fouts):
        ref, got = fval.asnumpy(), _as_float(env[key])
        row = {'step': step['name'], 'block': step['block'], 'tensor': key,
               'sqnr_db': quant.sqnr_db(ref, got),
               'max_abs_err': float(np.abs(ref - got).max()), 'weight_sqnr_db': None}
        if step['block'] in _LAYER_BLOCKS:
            block = qnet._children[step['name']]
            w = block.weight.data().asnumpy().astype(np.float32)
            s = block.weight_scale.data().asnumpy()
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


def plot(rows, path):
    """Save a bar chart of per-step output SQNR (and weight SQNR) to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from .export import atomic_outputs
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
