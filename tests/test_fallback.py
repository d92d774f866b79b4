"""Accuracy-driven fallback (``quantize_net(eval_fn=..., max_drop=...)``) on a network made
sensitive on purpose: one weight of its middle layer is 1000x the others, on an input the
data never activates, so the float network ignores it but per-tensor int8 weights round
every other weight of that layer to zero."""
import warnings

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gluonq
from gluonq import debug
from gluonq.convert.fallback import eval_budget, search_prefix

SENSITIVE = 'fbnet_dense1_fwd'


def _sensitive_net(seed):
    rng = np.random.RandomState(seed)
    net = mx.gluon.nn.HybridSequential(prefix='fbnet_')
    with net.name_scope():
        net.add(mx.gluon.nn.Dense(32, in_units=64, activation='relu'),
                mx.gluon.nn.Dense(32, in_units=32, activation='relu'),
                mx.gluon.nn.Dense(10, in_units=32))
    net.initialize()
    w1, b1 = rng.normal(0, 0.3, (32, 64)), rng.normal(0, 0.1, 32)
    w1[0], b1[0] = -1.0, -1.0                 # unit 0 is never active on inputs in [0, 1)
    w2, b2 = rng.normal(0, 0.3, (32, 32)), rng.normal(0, 0.1, 32)
    w2[5, 0] = 1000.0                         # the outlier reads the dead unit
    w3, b3 = rng.normal(0, 0.3, (10, 32)), np.zeros(10)
    for d, (w, b) in zip(net, ((w1, b1), (w2, b2), (w3, b3))):
        d.weight.set_data(mx.nd.array(w))
        d.bias.set_data(mx.nd.array(b))
    calib = rng.rand(128, 64).astype(np.float32)
    held_out = rng.rand(400, 64).astype(np.float32)
    return net, calib, held_out


def _top1(net, x, labels):
    return 100.0 * float((net(mx.nd.array(x)).asnumpy().argmax(1) == labels).mean())


@pytest.mark.parametrize('seed', [0, 1])
def test_fallback_reverts_the_sensitive_layer_first_and_meets_the_drop(seed):
    net, calib, x = _sensitive_net(seed)
    labels = net(mx.nd.array(x)).asnumpy().argmax(1)       # float top-1 is 100 by design
    calls = []

    def eval_fn(n):
        calls.append(type(n).__name__)
        return _top1(n, x, labels)
    plain = gluonq.quantize_net(net, calib, per_channel=False, progress=False)
    assert _top1(plain, x, labels) < 90            # per-tensor int8: a drop of > 10 points
    q = gluonq.quantize_net(net, calib, per_channel=False, progress=False, eval_fn=eval_fn,
                            max_drop=3.0)
    rec = q.spec['calibration']['fallback']
    assert rec['layers'][0] == SENSITIVE and rec['ranking'][0][0] == SENSITIVE
    assert rec['met'] and rec['metric_float'] == 100.0
    assert 100.0 - _top1(q, x, labels) <= 3.0             # measured again, independently
    assert rec['metric'] == _top1(q, x, labels)
    assert len(calls) == rec['evaluations'] <= eval_budget(3)
    assert calls[0] == 'HybridSequential' and 'QuantizedNet' in calls[1:]
    assert SENSITIVE in q.spec['calibration']['exclude']
    kinds = {r['node']: r['kind'] for r in q.report}
    assert kinds[SENSITIVE] == 'float'
    # gluonq.debug shows the reverted layer and the SQNR of the others
    rows = debug.compare_methods(net, {'int8': plain, 'fallback': q}, calib)
    row = {r['step']: r for r in rows}['fbnet_dense1']
    assert row['fallback'] == {'int8': False, 'fallback': True}
    assert row['sqnr_db']['fallback'] is None and row['sqnr_db']['int8'] is not None
    assert 'fallback to float' in debug.format_methods(rows)


def test_fallback_keeps_a_net_that_meets_the_drop():
    net, calib, x = _sensitive_net(0)
    labels = net(mx.nd.array(x)).asnumpy().argmax(1)
    calls = []
    q = gluonq.quantize_net(net, calib, progress=False, max_drop=3.0,   # per-channel is fine
                            eval_fn=lambda n: calls.append(1) or _top1(n, x, labels))
    rec = q.spec['calibration']['fallback']
    assert rec['met'] and rec['layers'] == [] and len(calls) == 2 == rec['evaluations']


def test_fallback_that_cannot_meet_the_drop_warns_and_stops():
    net, calib, x = _sensitive_net(0)
    labels = net(mx.nd.array(x)).asnumpy().argmax(1)
    calls = []

    def eval_fn(n):
        calls.append(1)
        return _top1(n, x, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        q = gluonq.quantize_net(net, calib, per_channel=False, progress=False,
                                eval_fn=eval_fn, max_drop=-1.0)   # beat float by 1 point
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any('cannot be met' in m for m in msgs)
    rec = q.spec['calibration']['fallback']
    assert not rec['met'] and len(calls) == rec['evaluations'] <= eval_budget(3)
    assert rec['metric'] == max(rec['metric_int8'], rec['metric'])


def test_eval_fn_must_return_a_number():
    net, calib, _ = _sensitive_net(0)
    with pytest.raises(TypeError, match='eval_fn must return a number'):
        gluonq.quantize_net(net, calib, progress=False, eval_fn=lambda n: 'good')
    with pytest.raises(ValueError, match='max_drop must be a finite number'):
        gluonq.quantize_net(net, calib, progress=False, eval_fn=lambda n: 1.0,
                            max_drop=float('nan'))


@given(st.integers(1, 200), st.data())
@settings(max_examples=200, deadline=None)
def test_search_finds_the_first_k_within_the_budget(n, data):
    """Doubling then bisection over the number of reverted layers: the smallest k that
    meets the drop (for a metric that grows with k), or None, in at most the budget."""
    need = data.draw(st.integers(1, n + 1))        # n + 1: never met
    calls = []

    def attempt(k):
        assert 1 <= k <= n and k not in calls
        calls.append(k)
        return k >= need
    assert search_prefix(n, attempt) == (need if need <= n else None)
    assert 2 + len(calls) <= eval_budget(n)
