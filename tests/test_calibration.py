"""Observers: each calibration method against an independent computation on known data."""
import numpy as np
import pytest

from gluonq.calibration import observers as obs

RNG = np.random.RandomState(3)


def _feed(o, x, nbatch=4):
    for part in np.array_split(x, nbatch):
        o.observe(part)
    return o


def test_minmax_and_dtype():
    x = RNG.randn(1000).astype(np.float32)
    o = _feed(obs.MinMaxObserver(), x)
    qp = o.calculate_qparams()
    assert qp.dtype == 'int8' and qp.max == pytest.approx(np.abs(x).max())
    relu = np.maximum(x, 0)
    qp = _feed(obs.MinMaxObserver(), relu).calculate_qparams()
    assert qp.dtype == 'uint8' and qp.min == 0 and qp.max == pytest.approx(relu.max())
    qp = _feed(obs.MinMaxObserver(dtype='int8'), relu).calculate_qparams()
    assert qp.dtype == 'int8'


def test_moving_average():
    o = obs.MovingAverageMinMaxObserver(averaging_constant=0.5)
    for lo, hi in [(-1, 1), (-3, 3), (-1, 1)]:
        o.observe(np.array([lo, hi], np.float32))
    lo, hi = o.calculate_range()
    # avg = avg + 0.5 * (value - avg): 1 -> 2 -> 1.5
    assert (lo, hi) == (pytest.approx(-1.5), pytest.approx(1.5))


def test_histogram_is_exact_and_independent_of_batching():
    x = np.abs(RNG.randn(20000)).astype(np.float32)
    a = _feed(obs.HistogramObserver(bins=256), x, 1)
    b = obs.HistogramObserver(bins=256)
    b.observe(x[:100] * 0.01)              # a small first batch: bins get added, then merged
    b.observe(x[100:])
    assert a.hist.sum() == b.hist.sum() == x.size - (x == 0).sum() - 0
    total = a.hist.sum() + a.zeros
    assert total == x.size


def test_percentile_matches_numpy():
    x = RNG.randn(50000).astype(np.float32)
    o = _feed(obs.PercentileObserver(percentile=99.99), x)
    _, hi = o.calculate_range()
    assert o.fallback is None
    assert hi == pytest.approx(np.percentile(np.abs(x), 99.99), rel=2e-3)


def _mse_bruteforce(x, t, levels):
    step = t / levels
    xc = np.minimum(np.abs(x), t)
    err = np.abs(x) - step * np.rint(xc / step)
    return float(np.sum(err * err))


def test_mse_threshold_minimizes_the_true_error():
    x = np.concatenate([RNG.randn(20000), RNG.randn(20) * 30]).astype(np.float32)
    o = _feed(obs.MSEObserver(), x)
    _, t = o.calculate_range()
    e_t = _mse_bruteforce(x, t, 127)
    for other in np.linspace(np.abs(x).max() * 0.05, np.abs(x).max(), 60):
        assert e_t <= _mse_bruteforce(x, other, 127) * 1.05
    assert e_t < _mse_bruteforce(x, np.abs(x).max(), 127)     # beats min/max


def test_entropy_clips_long_tails():
    x = np.concatenate([RNG.randn(50000), RNG.randn(10) * 50]).astype(np.float32)
    o = _feed(obs.EntropyObserver(), x)
    _, t = o.calculate_range()
    assert 2.0 < t < np.abs(x).max() / 2
    assert o.fallback is None


def test_guard_overrules_a_destructive_threshold():
    """A bimodal tensor (a spike at 0.36, signal up to 3) fools KL into a tiny threshold;
    the guard replaces it with the MSE-optimal one and says so."""
    spike = np.full(50000, -0.3635, np.float32)
    signal = RNG.uniform(0, 3.0, 8000).astype(np.float32)
    x = np.concatenate([spike, signal])
    o = _feed(obs.EntropyObserver(), x)
    lo, hi = o.calculate_range()
    plain = _mse_bruteforce(x, np.abs(x).max(), 127)
    assert _mse_bruteforce(x, hi, 127) <= 4.0 * plain
    if o.fallback is not None:
        assert 'MSE-optimal' in o.fallback


def test_errors():
    with pytest.raises(ValueError, match='unknown calib_mode'):
        obs.make_observer('kl')
    with pytest.raises(RuntimeError, match='saw no data'):
        obs.MinMaxObserver(name='t').calculate_qparams()
    with pytest.raises(ValueError, match="tensor 'x' holds NaN"):
        obs.MinMaxObserver(name='x').observe(np.array([1.0, np.nan]))


def test_all_zero_tensor():
    for mode in obs.OBSERVERS:
        o = obs.make_observer(mode)
        o.observe(np.zeros(10, np.float32))
        qp = o.calculate_qparams()
        assert qp.scale > 0 and np.isfinite(qp.scale)
