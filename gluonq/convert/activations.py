"""Activations as imported graphs spell them out: hardswish, hardsigmoid and squeeze-excite
gates, recognized whatever ops an exporter wrote (``recognize``), and hardswish and
hardsigmoid rewritten into MXNet's one-op ``hard_sigmoid`` (``simplify``).

paddle2onnx writes hardswish as ``x * clip(x + 3, 0, 6) / 6`` (four or five MXNet ops) and
hardsigmoid as ``clip(0.2 x + 0.5, 0, 1)`` (three); every float op is a pass over the
tensor in each runtime. ``x * hard_sigmoid(x; a, b)`` computes the same function in two.
"""
from __future__ import annotations

import numpy as np

from .fold import SCALAR_ARITH, _fresh
from .graph import Node

__all__ = ['recognize', 'simplify', 'relu_like']


def relu_like(node):
    """'relu', ('clip', a_max) or None for an activation node that clamps at 0."""
    if node.op == 'Activation' and node.attr('act_type') == 'relu':
        return 'relu'
    if node.op == 'relu':
        return 'relu'
    if node.op == 'clip':
        try:
            lo, hi = float(node.attr('a_min')), float(node.attr('a_max'))
        except (TypeError, ValueError):
            return None
        if lo == 0.0 and hi > 0:
            return ('clip', hi)
    return None


_UNARY = tuple(SCALAR_ARITH) + ('clip', 'hard_sigmoid', 'relu', 'Activation')
_MUL_OPS = ('elemwise_mul', 'broadcast_mul')
_PROBE = np.linspace(-8.0, 8.0, 161)


def _apply_unary(node, t):
    """float64 value of a one-input elementwise op on ``t`` (None if not one of _UNARY)."""
    if node.op in SCALAR_ARITH:
        c = float(node.attr('scalar'))
        return {'add': t + c, 'sub': t - c, 'rsub': c - t, 'mul': t * c, 'div': t / c,
                'rdiv': np.divide(c, t, out=np.full_like(t, np.inf), where=t != 0)}[
            SCALAR_ARITH[node.op]]
    if node.op == 'clip':
        return np.clip(t, float(node.attr('a_min')), float(node.attr('a_max')))
    if node.op == 'hard_sigmoid':
        return np.clip(float(node.attr('alpha', '0.2')) * t + float(node.attr('beta', '0.5')),
                       0.0, 1.0)
    if relu_like(node) == 'relu':
        return np.maximum(t, 0.0)
    return None


def _unary_chain(graph, edge, users, stop=None):
    """Walk back from ``edge`` through one-input elementwise ops that have no other reader:
    ``(source edge, nodes from source to edge)``; stops at ``stop`` (an edge) if given."""
    nodes = []
    while edge != stop:
        node = graph.nodes[edge[0]]
        if node.is_var or node.op not in _UNARY or len(node.inputs) != 1 or \
                _apply_unary(node, _PROBE) is None or \
                (nodes and len(users.get(edge, [])) != 1):
            break
        nodes.insert(0, node)
        edge = node.inputs[0]
    return edge, nodes


def _evaluate(nodes, t):
    for n in nodes:
        t = _apply_unary(n, t)
    return t


def _hardsigmoid_params(values):
    """``(a, b)`` if ``values`` (on _PROBE) are ``clip(a t + b, 0, 1)`` with a > 0."""
    inside = (values > 1e-9) & (values < 1 - 1e-9)
    if inside.sum() < 2:
        return None
    a, b = np.polyfit(_PROBE[inside], values[inside], 1)
    if a <= 0 or not np.allclose(values, np.clip(a * _PROBE + b, 0, 1), atol=1e-9):
        return None
    return a, b


def recognize(graph):
    """Hardswish, hardsigmoid and squeeze-excite gates, however an exporter spelled them:
    ``{node name: what the node is part of}``. They stay float between int8 layers; the
    int8 layer after them quantizes their float output with its calibrated range."""
    users = graph.edge_users()
    found = {}
    keep = ('kept float between int8 layers; the next int8 layer quantizes its float output '
            'with the calibrated range')

    def mark(nodes, text):
        for n in nodes:
            found.setdefault(n.name, text)

    for node in graph.op_nodes():          # first: a hardswish holds a hardsigmoid
        m = _hardswish_match(graph, node, users)
        if m is not None:
            _, nodes, a, b, _ = m
            mark(nodes, 'hardswish x * clip(%.4g x + %.4g, 0, 1) (%d ops): %s'
                 % (a, b, len(nodes), keep))
    for node in graph.op_nodes():
        if node.name in found:
            continue
        if node.op in _MUL_OPS and len(node.inputs) == 2 and \
                not any(e[0] in graph.params for e in node.inputs):
            gs, xs = sorted((graph.shape(e) or () for e in node.inputs), key=np.prod)
            if len(xs) == len(gs) == 4 and gs[2:] == (1, 1) and xs[:2] == gs[:2] and \
                    xs[2] * xs[3] > 1:
                mark([node], 'squeeze-excite gate x * g(x) per channel: ' + keep)
        elif node.op in ('clip', 'hard_sigmoid') and node.name not in found:
            src, chain = _unary_chain(graph, (node.name, 0), users)
            hs = _hardsigmoid_params(_evaluate(chain, _PROBE)) \
                if len(chain) > 1 or node.op == 'hard_sigmoid' else None
            if hs is not None:
                mark(chain, 'hardsigmoid clip(%.4g x + %.4g, 0, 1): %s' % (hs[0], hs[1], keep))
    return found


#: chain ops whose composition is piecewise linear (no reciprocal)
_LINEAR = ('add', 'sub', 'rsub', 'mul', 'div')
#: points far outside _PROBE where a rewritten chain must still agree (saturated)
_FAR = np.array([-1e6, -1e3, -100.0, -10.0, 10.0, 100.0, 1e3, 1e6])


def _exact_hardsigmoid(chain, scale):
    """``(a, b)`` if the node chain is ``scale * clip(a t + b, 0, 1)`` everywhere: a fit on
    _PROBE, saturated at both ends there, checked far outside it; None otherwise."""
    if any(n.op in SCALAR_ARITH and SCALAR_ARITH[n.op] not in _LINEAR for n in chain):
        return None
    values = _evaluate(chain, _PROBE) / scale
    hs = _hardsigmoid_params(values)
    if hs is None or (values <= 1e-9).sum() < 2 or (values >= 1 - 1e-9).sum() < 2:
        return None
    far = _evaluate(chain, _FAR) / scale
    if not np.allclose(far, np.clip(hs[0] * _FAR + hs[1], 0, 1), atol=1e-9):
        return None
    return hs


def _hardswish_match(graph, node, users):
    """``(x, removed nodes, a, b, k)`` if ``node`` (a multiply) ends a hardswish
    ``k * x * clip(a x + b, 0, 1)`` (with the scalar mul/div after it), else None."""
    if node.op not in _MUL_OPS or len(node.inputs) != 2 or \
            any(e[0] in graph.params for e in node.inputs):
        return None
    for i in (0, 1):
        x, g = node.inputs[i], node.inputs[1 - i]
        src, chain = _unary_chain(graph, g, users, stop=x)
        if src != x or not chain:
            continue
        top = _evaluate(chain, _PROBE).max()
        hs = _exact_hardsigmoid(chain, top) if top > 0 else None
        if hs is None:
            continue
        tail, out = [], (node.name, 0)
        while len(users.get(out, [])) == 1 and users[out][0] is not None and \
                graph.nodes[users[out][0]].op in ('_div_scalar', '_mul_scalar'):
            tail.append(graph.nodes[users[out][0]])
            out = (tail[-1].name, 0)
        k = float(_evaluate(tail, np.array([top]))[0])
        return x, chain + [node] + tail, hs[0], hs[1], k
    return None


def simplify(graph):
    """Rewrite each hardswish as ``x * hard_sigmoid(x)`` (times a scalar where the spelled-out
    form scales it) and each multi-op hardsigmoid as one ``hard_sigmoid``, where the chain
    computes exactly that function (in real arithmetic; float32 results move by rounding).
    The removed nodes get a note. Returns the number of rewrites."""
    users = graph.edge_users()
    rewrites = []            # (removed nodes, input edge, a, b, k or None for hardsigmoid)
    taken = set()

    def free(nodes):         # no node taken, and nothing outside reads one but the last
        names = {n.name for n in nodes}
        return not taken.intersection(names) and all(
            set(users.get((n.name, 0), ())) <= names for n in nodes[:-1])

    for node in graph.op_nodes():
        if node.name in taken:
            continue
        m = _hardswish_match(graph, node, users)
        if m is not None and free(m[1]):
            rewrites.append((m[1], m[0], m[2], m[3], m[4]))
            taken.update(n.name for n in m[1])
    for node in graph.op_nodes():
        if node.op != 'clip' or node.name in taken:
            continue
        src, chain = _unary_chain(graph, (node.name, 0), users)
        hs = _exact_hardsigmoid(chain, 1.0) if len(chain) > 1 else None
        if hs is not None and free(chain):
            rewrites.append((chain, src, hs[0], hs[1], None))
            taken.update(n.name for n in chain)
    for removed, x, a, b, k in rewrites:
        _rewrite(graph, removed, x, a, b, k)
    graph.remove_unused()
    return len(rewrites)


def _rewrite(graph, removed, x, a, b, k):
    """Replace the nodes ``removed`` (a chain ending in the one whose output the graph reads)
    by ``hard_sigmoid(x; a, b)``, times ``x`` and the scalar ``k`` for a hardswish (``k``
    None: a hardsigmoid)."""
    last = removed[-1]
    base = last.name
    hs = Node(_fresh(graph, base + '_hard_sigmoid'), 'hard_sigmoid',
              {'alpha': repr(float(a)), 'beta': repr(float(b))}, [x])
    new = [hs]
    what = 'hardsigmoid clip(%.4g x + %.4g, 0, 1)' % (a, b)
    if k is not None:
        new.append(Node(_fresh(graph, base + '_hardswish'), 'broadcast_mul', {},
                        [x, (hs.name, 0)]))
        if abs(k - 1.0) > 1e-12:
            new.append(Node(_fresh(graph, base + '_hardswish_scale'), '_mul_scalar',
                            {'scalar': repr(k)}, [(new[-1].name, 0)]))
        what = 'hardswish x * clip(%.4g x + %.4g, 0, 1)' % (a, b)
    nodes = list(graph.nodes.values())
    at = nodes.index(last)
    graph.nodes.clear()
    for n in nodes[:at] + new + nodes[at:]:
        graph.nodes[n.name] = n
    graph.replace_uses((last.name, 0), (new[-1].name, 0))
    for n in removed:
        graph.notes[n.name] = '%s was part of %s: rewritten as %s' % (
            n.op, what, ' and '.join(m.op for m in new))
