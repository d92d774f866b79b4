"""Observers: each calibration method against an independent computation on known data."""
import numpy as np
import pytest

from gluonq.calibration import observers as obs


def _feed(o, x, nbatch=4):
    for part in np.array_split(x, nbatch):
        o.observe(part)
    return o


def test_minmax_and_dtype():
    x = np.random.RandomState(1).randn(1000).astype(np.float32)
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


def _numpy_hist(x, width, nbins):
    """Counts of |x| (non-zero) in bins [k w, (k+1) w), the last bin taking everything above."""
    a = np.abs(x[x != 0]).astype(np.float64)
    return np.histogram(np.minimum(a, nbins * width), bins=np.arange(nbins + 1) * width)[0]


def _near_edges(x, width, nbins):
    """Values within float32 rounding of an inner bin edge (they may land on either side)."""
    a = np.abs(x[x != 0]).astype(np.float64)
    k = np.rint(a / width)
    return int(np.sum((np.abs(a / width - k) < 1e-5) & (k > 0) & (k < nbins)))


def test_histogram_is_exact_and_independent_of_batching():
    x = np.abs(np.random.RandomState(2).randn(20000)).astype(np.float32)
    x[::50] = 0
    one = _feed(obs.HistogramObserver(bins=256), x, 1)
    np.testing.assert_allclose(one.width, float(x.max()) / 256, rtol=1e-12)
    diff = np.abs(one.hist - _numpy_hist(x, one.width, one.hist.size)).sum()
    assert diff <= 2 * _near_edges(x, one.width, one.hist.size)
    assert one.hist.sum() + one.zeros == x.size and one.zeros == (x == 0).sum()
    # the same data in batches, the first holding the maximum (it sets the bin width)
    y = np.concatenate([x[np.argmax(x)][None], np.delete(x, np.argmax(x))])
    split = _feed(obs.HistogramObserver(bins=256), y, 7)
    np.testing.assert_array_equal(split.hist, _feed(obs.HistogramObserver(bins=256), y, 1).hist)
    # a small first batch: bins are added for larger values, then merged in pairs; the
    # merged bins are still exact bins of the final width
    grow = obs.HistogramObserver(bins=256, max_bins=1024)
    grow.observe(x[:100] * 0.01)
    grow.observe(x[100:])
    z = np.concatenate([x[:100] * 0.01, x[100:]])
    assert grow.hist.size <= 1024 and grow.hist.sum() + grow.zeros == z.size
    diff = np.abs(grow.hist - _numpy_hist(z, grow.width, grow.hist.size)).sum()
    assert diff <= 2 * _near_edges(z, grow.width, grow.hist.size)


def test_percentile_matches_numpy():
    x = np.random.RandomState(3).randn(50000).astype(np.float32)
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
    rng = np.random.RandomState(4)
    x = np.concatenate([rng.randn(20000), rng.randn(20) * 30]).astype(np.float32)
    o = _feed(obs.MSEObserver(), x)
    _, t = o.calculate_range()
    e_t = _mse_bruteforce(x, t, 127)
    for other in np.linspace(np.abs(x).max() * 0.05, np.abs(x).max(), 60):
        assert e_t <= _mse_bruteforce(x, other, 127) * 1.05
    assert e_t < _mse_bruteforce(x, np.abs(x).max(), 127)     # beats min/max


def test_entropy_clips_long_tails():
    rng = np.random.RandomState(5)
    x = np.concatenate([rng.randn(50000), rng.randn(10) * 50]).astype(np.float32)
    o = _feed(obs.EntropyObserver(), x)
    _, t = o.calculate_range()
    assert 2.0 < t < np.abs(x).max() / 2
    assert o.fallback is None


def test_guard_overrules_a_destructive_threshold():
    """A bimodal tensor (a spike at 0.36, signal up to 3) fools KL into a tiny threshold;
    the guard replaces it with the MSE-optimal one and says so."""
    spike = np.full(50000, -0.3635, np.float32)
    signal = np.random.RandomState(6).uniform(0, 3.0, 8000).astype(np.float32)
    x = np.concatenate([spike, signal])
    o = _feed(obs.EntropyObserver(), x)
    lo, hi = o.calculate_range()
    plain = _mse_bruteforce(x, np.abs(x).max(), 127)
    # without the guard, KL's threshold clips the signal with many times the error
    raw = _feed(obs.EntropyObserver(max_clipped=1.0), x)
    _, raw_hi = raw.calculate_range()
    assert raw.fallback is None and raw_hi < 1.0
    assert _mse_bruteforce(x, raw_hi, 127) > 4.0 * plain
    # with it, the MSE-optimal threshold, and a sentence saying so
    assert o.fallback is not None and 'MSE-optimal' in o.fallback
    assert hi == o._mse_threshold() and -lo == hi
    assert _mse_bruteforce(x, hi, 127) <= 4.0 * plain


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
