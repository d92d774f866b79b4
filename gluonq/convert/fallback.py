"""Accuracy-driven fallback: put the most sensitive int8 layers back to float until the
metric drop is within a bound, as ``nncf.quantize_with_accuracy_control(max_drop=...)``.

1. ``eval_fn`` scores the float network and the int8 one (2 calls). If the drop is within
   ``max_drop``, nothing changes.
2. Sensitivity, without calling ``eval_fn``: for each int8 layer with weights, the gain in
   logit SQNR (int8 network outputs against the float network's, on the first
   :data:`RANK_EXAMPLES` calibration examples) when that layer alone is put back to float
   (emulated: the float layer on the dequantized input, its output rounded to the same
   int8 range). This measures each layer where the metric is computed, downstream layers
   included; a layer's own SQNR does not (a per-tensor layer whose one huge channel holds
   the energy scores well while the small channels the next layer reads are lost).
3. Layers are reverted in that order: the first ``k`` for ``k = 1, 2, 4, ...`` until the drop
   is met, then a bisection between the last two ``k``. Each candidate is converted again
   (same settings, the layers added to ``exclude``) and scored with ``eval_fn``. For ``L``
   ranked layers that is at most ``2 + 2 * ceil(log2(L))`` calls of ``eval_fn`` in all
   (:func:`eval_budget`). The bisection assumes the metric grows with ``k``; the result is
   always a measured one.
4. If even all ``L`` layers in float miss the bound, a warning says so and the best
   candidate measured is returned. ``spec['calibration']['fallback']`` records the outcome.
"""
from __future__ import annotations

import logging
import math
import warnings

import mxnet as mx
import numpy as np

from .. import quant
from ..nn import as_qtensor
from .replay import LAYER_BLOCKS, finish_layer, float_layer, replay, subset

__all__ = ['accuracy_fallback', 'rank_layers', 'search_prefix', 'eval_budget', 'RANK_EXAMPLES']

log = logging.getLogger('gluonq')

#: calibration examples the sensitivity ranking runs on
RANK_EXAMPLES = 32


def eval_budget(num_layers):
    """The most ``eval_fn`` calls :func:`accuracy_fallback` makes for ``num_layers`` ranked
    layers: 2 (float and int8) + the doubling and the bisection."""
    return 2 + (2 * math.ceil(math.log2(num_layers)) if num_layers > 1 else num_layers)


def search_prefix(n, attempt):
    """The smallest ``k`` in 1..n with ``attempt(k)`` True, found by doubling ``k`` and then
    bisecting between the last miss and the first hit (exact when ``attempt`` is monotone);
    None if ``attempt(n)`` is False. Calls ``attempt`` at most ``2 * ceil(log2(n))`` times
    (once for n = 1)."""
    lo, k = 0, 1                                  # lo: the largest k known to miss
    if n < 1:
        return None
    while not attempt(k):
        lo = k
        if k == n:
            return None
        k = min(2 * k, n)
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _outputs(outs):
    return np.concatenate([np.concatenate([o.asnumpy().reshape(len(o), -1) for o in b], 1)
                           for b in outs])


def rank_layers(float_net, qnet, values, batches):
    """Int8 layers of ``qnet`` by the logit SQNR gained when each alone is put back to float.

    Returns a list of ``(node name, step name, gain in dB)``, largest gain first (ties in
    network order).
    """
    ref = []
    for b in batches:
        out = float_net(mx.nd.array(b))
        ref.append(list(out) if isinstance(out, (list, tuple)) else [out])
    ref = _outputs(ref)
    base = quant.sqnr_db(ref, _outputs(replay(qnet, batches)))
    layers = [s for s in qnet._spec['steps'] if s['block'] in LAYER_BLOCKS]
    gains = []
    for layer in layers:
        v = values[layer['name']]

        def hook(k, step, block, inputs, _name=layer['name'], _v=v):
            if step['name'] != _name:
                return None
            res = []
            for x in inputs:
                qt = as_qtensor(x[0])
                xf = quant.dequantize_f(mx.nd, qt) if qt is not None else x[0]
                y = float_layer(step, xf, _v['weight'], _v['bias'])
                res.append(finish_layer(step, block, y, x[1] if len(x) > 1 else None))
            return res
        gains.append(quant.sqnr_db(ref, _outputs(replay(qnet, batches, hook))) - base)
    order = sorted(range(len(layers)), key=lambda i: (-gains[i], i))
    return [(layers[i]['node'], layers[i]['name'], float(gains[i])) for i in order]


def accuracy_fallback(float_net, qnet, values, batches, eval_fn, max_drop, convert):
    """Revert the most sensitive layers of ``qnet`` to float until
    ``eval_fn(float_net) - eval_fn(int8 net) <= max_drop`` (see the module docstring).

    Parameters
    ----------
    float_net : Block
        The float network ``qnet`` was converted from.
    qnet : QuantizedNet
        The int8 network.
    values : dict
        Step name -> ``{'weight', 'bias'}``, the float values of ``qnet``'s layers.
    batches : list of numpy arrays
        Calibration batches (the first :data:`RANK_EXAMPLES` examples rank the layers).
    eval_fn : callable
        ``eval_fn(net) -> float``, higher is better.
    max_drop : float
        Largest acceptable ``metric(float) - metric(int8)``, in the metric's units.
    convert : callable
        ``convert(nodes) -> QuantizedNet``: the same conversion with the graph nodes
        ``nodes`` also kept in float.

    Returns
    -------
    QuantizedNet
        ``qnet`` or a reconverted network; ``spec['calibration']['fallback']`` holds
        ``layers`` (the graph nodes put back to float), ``met``, ``max_drop``,
        ``metric_float``, ``metric_int8`` (no fallback), ``metric``, ``evaluations`` and
        ``ranking`` (``[node, gain dB]``).
    """
    if not (isinstance(max_drop, (int, float)) and np.isfinite(max_drop)):
        raise ValueError('max_drop must be a finite number (metric units), got %r'
                         % (max_drop,))
    f_metric = _score(eval_fn, float_net, 'the float network')
    q_metric = _score(eval_fn, qnet, 'the int8 network')
    record = {'max_drop': float(max_drop), 'metric_float': f_metric, 'metric_int8': q_metric,
              'metric': q_metric, 'layers': [], 'met': f_metric - q_metric <= max_drop,
              'evaluations': 2, 'ranking': []}
    best = (q_metric, 0, qnet)
    if not record['met']:
        ranking = rank_layers(float_net, qnet, values, subset(batches, RANK_EXAMPLES))
        record['ranking'] = [[node, round(g, 3)] for node, _, g in ranking]
        nodes = [node for node, _, _ in ranking]
        tried = {}

        def attempt(k):
            net = convert(nodes[:k])
            m = _score(eval_fn, net, 'the network with %d layer(s) in float' % k)
            tried[k] = (m, net)
            log.info('fallback: %d layer(s) in float (%s): metric %g (float %g)', k,
                     ', '.join(nodes[:k]), m, f_metric)
            return f_metric - m <= max_drop

        hi = search_prefix(len(nodes), attempt)
        record['evaluations'] += len(tried)
        if hi is not None:
            best = (tried[hi][0], hi, tried[hi][1])
        else:
            k_best = max(tried, key=lambda j: (tried[j][0], -j), default=0)
            if k_best and tried[k_best][0] > q_metric:
                best = (tried[k_best][0], k_best, tried[k_best][1])
            msg = ('accuracy fallback: a drop of at most %g (max_drop) cannot be met: float '
                   '%g, int8 %g, with all %d int8 layers with weights in float %s; keeping %d '
                   'layer(s) in float (metric %g)'
                   % (max_drop, f_metric, q_metric, len(nodes),
                      '%g' % tried[len(nodes)][0] if nodes else '(none to revert)',
                      best[1], best[0]))
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
        record.update(metric=best[0], layers=nodes[:best[1]], met=hi is not None)
    qnet = best[2]
    qnet._spec['calibration']['fallback'] = record
    return qnet


def _score(eval_fn, net, what):
    value = eval_fn(net)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError('eval_fn must return a number (higher is better); on %s it returned '
                        '%r' % (what, value)) from None
    if not np.isfinite(value):
        raise ValueError('eval_fn returned %r on %s; it must return a finite number'
                         % (value, what))
    return value
