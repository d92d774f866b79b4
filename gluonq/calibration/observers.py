"""Observers: small objects that watch one tensor and choose its quantization range.

Use them like PyTorch's: ``obs.observe(x)`` for every calibration batch, then
``obs.calculate_qparams()``. Each calibration method is one class:

* :class:`MinMaxObserver` (``'naive'``): the observed min and max.
* :class:`MovingAverageMinMaxObserver`: an exponential moving average of per-batch min/max.
* :class:`PercentileObserver` (``'percentile'``): the given percentile of ``|x|``.
* :class:`EntropyObserver` (``'entropy'``): the threshold that minimises the KL divergence
  between the histogram and its quantized version (TensorRT's method, as MXNet uses it).
* :class:`MSEObserver` (``'mse'``): the threshold with the least expected squared error,
  rounding noise and clipping together.

The histogram observers keep an exact histogram of ``|x|`` (fixed bin width; bins are added as
larger values arrive and merged in pairs past ``max_bins``), so the result does not depend on
how the data was batched, only on its order. Every threshold is checked against the
histogram: a method whose range clips more than a small fraction of the values *and* has
several times the expected squared error of the plain min/max range is overruled by the
MSE-optimal range, and ``fallback`` says why. This is the guard against a calibrator that
silently destroys a model.
"""
from __future__ import annotations

import numpy as np

from ..quant import QParams, QRANGE, dtype_for_range

__all__ = ['Observer', 'MinMaxObserver', 'MovingAverageMinMaxObserver', 'HistogramObserver',
           'PercentileObserver', 'EntropyObserver', 'MSEObserver', 'OBSERVERS', 'make_observer']


def _to_numpy(x):
    if hasattr(x, 'asnumpy'):
        x = x.asnumpy()
    return np.asarray(x, dtype=np.float32)


class Observer:
    """Base class: records the observed min/max and turns a range into :class:`QParams`.

    Parameters
    ----------
    dtype : {'auto', 'int8', 'uint8'}
        Quantized dtype of the tensor; 'auto' is uint8 when the observed min is >= 0.
    name : str, optional
        The tensor's name, used in error messages.
    """

    def __init__(self, dtype='auto', name=None):
        self.dtype = dtype
        self.name = name
        self.min_val = np.inf
        self.max_val = -np.inf
        self.num_batches = 0
        #: set by a method that was overruled by the guard: a sentence saying why.
        self.fallback = None

    def observe(self, x):
        """Record one batch of the tensor (NDArray or numpy array). Returns ``x``."""
        a = _to_numpy(x)
        if a.size == 0:
            return x
        if not np.all(np.isfinite(a)):
            raise ValueError('tensor %r holds NaN or Inf during calibration: check the '
                             'calibration data and the float model' % (self.name or '?'))
        self.min_val = min(self.min_val, float(a.min()))
        self.max_val = max(self.max_val, float(a.max()))
        self.num_batches += 1
        self._observe(a)
        return x

    def _observe(self, a):
        pass

    @property
    def resolved_dtype(self):
        """The quantized dtype this tensor gets."""
        self._check_observed()
        return dtype_for_range(min(self.min_val, 0.0), self.max_val, self.dtype)

    def _check_observed(self):
        if self.num_batches == 0:
            raise RuntimeError('observer of tensor %r saw no data: run calibration data through '
                               'the network before calculate_qparams()' % (self.name or '?'))

    def calculate_range(self):
        """The chosen real range ``(lo, hi)`` (float)."""
        self._check_observed()
        return self.min_val, self.max_val

    def calculate_qparams(self, scheme='symmetric'):
        """:class:`QParams` for the observed tensor: symmetric (dtype and range), or with
        ``scheme='affine'`` uint8 with a zero point covering the chosen range where the
        observed minimum is < 0 (the range is clipped to what was observed)."""
        lo, hi = self.calculate_range()
        if scheme == 'affine' and self.min_val < 0:
            return QParams.from_observed(max(lo, self.min_val), min(hi, self.max_val),
                                         'uint8', 'affine')
        return QParams.from_observed(lo, hi, self.resolved_dtype)

    def __repr__(self):
        return '%s(dtype=%s, min=%g, max=%g)' % (type(self).__name__, self.dtype,
                                                 self.min_val, self.max_val)


class MinMaxObserver(Observer):
    """The range is the observed [min, max] (calibration mode ``'naive'``)."""


class MovingAverageMinMaxObserver(Observer):
    """The range is an exponential moving average of the per-batch min and max.

    ``avg = avg + averaging_constant * (batch_value - avg)``, starting at the first batch.
    """

    def __init__(self, averaging_constant=0.01, **kwargs):
        super().__init__(**kwargs)
        self.averaging_constant = float(averaging_constant)
        self.avg_min = None
        self.avg_max = None

    def _observe(self, a):
        lo, hi = float(a.min()), float(a.max())
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo, hi
        else:
            c = self.averaging_constant
            self.avg_min += c * (lo - self.avg_min)
            self.avg_max += c * (hi - self.avg_max)

    def calculate_range(self):
        self._check_observed()
        return self.avg_min, self.avg_max


class HistogramObserver(Observer):
    """Keeps an exact histogram of ``|x|``; subclasses choose a threshold from it.

    Parameters
    ----------
    bins : int
        Number of bins the first non-zero batch's range is split into (sets the bin width).
    max_bins : int
        When more bins are needed for larger values, neighbouring bins are merged in pairs.
    guard_ratio, max_clipped : float
        A threshold that clips more than ``max_clipped`` of the non-zero values *and* has an
        expected squared error above ``guard_ratio`` times that of the plain max range is
        replaced by the MSE-optimal threshold (see ``fallback``). Clipping a few outliers
        (what entropy and percentile calibration are for) passes; clipping the body of a
        distribution does not.
    """

    def __init__(self, bins=2048, max_bins=16384, guard_ratio=4.0, max_clipped=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.max_clipped = float(max_clipped)
        self.bins = int(bins)
        self.max_bins = int(max_bins)
        self.guard_ratio = float(guard_ratio)
        self.width = None
        self.hist = np.zeros(0, dtype=np.int64)
        self.zeros = 0           # exact zeros: representable with any threshold

    def _observe(self, a):
        a = np.abs(a.ravel())
        nz = a[a > 0]
        self.zeros += a.size - nz.size
        if nz.size == 0:
            return
        top = float(nz.max())
        if self.width is None:
            self.width = top / self.bins
            self.hist = np.zeros(self.bins, dtype=np.int64)
        need = int(np.ceil(top / self.width))
        while need > self.max_bins:
            self._merge_pairs()
            need = int(np.ceil(top / self.width))
        if need > self.hist.size:
            self.hist = np.concatenate([self.hist, np.zeros(need - self.hist.size, np.int64)])
        idx = np.minimum((nz / self.width).astype(np.int64), self.hist.size - 1)
        self.hist += np.bincount(idx, minlength=self.hist.size)

    def _merge_pairs(self):
        h = self.hist
        if h.size % 2:
            h = np.concatenate([h, [0]])
        self.hist = h.reshape(-1, 2).sum(axis=1)
        self.width *= 2

    # -- threshold machinery ------------------------------------------------------------
    @property
    def levels(self):
        """Positive integer levels of the tensor's dtype (255 for uint8, 127 for int8)."""
        return QRANGE[self.resolved_dtype]

    def _candidates(self, max_count=512):
        """Bin indices ``k`` (threshold ``k * width``) worth trying, ascending."""
        n = self.hist.size
        first = max(1, min(n, self.levels // 2))
        stride = max(1, (n - first) // max_count)
        ks = np.arange(first, n + 1, stride)
        if ks[-1] != n:
            ks = np.append(ks, n)
        return ks

    def expected_sq_error(self, thresholds):
        """Expected total squared error of quantizing the histogram with each threshold.

        Values below the threshold get rounding error (evaluated at 4 points per bin), values
        above it get their clipping error; exact zeros have none.
        """
        ts = np.atleast_1d(np.asarray(thresholds, np.float64))
        n = self.hist.size
        sub = (np.arange(4) + 0.5) / 4.0
        x = ((np.arange(n)[:, None] + sub[None, :]) * self.width)[None]    # (1, n, 4)
        cnt = (self.hist[:, None] / 4.0)[None]                              # (1, n, 4)
        out = np.empty(ts.size)
        # a few thresholds at a time, so that the temporaries stay in cache (each row's
        # sum is the same whatever the chunk)
        per = max(1, (1 << 15) // (4 * n))
        for i in range(0, ts.size, per):
            t = ts[i:i + per, None, None]
            step = t / self.levels
            inside = x <= t
            rounding = x - step * np.rint(x / step)
            err = np.where(inside, rounding * rounding, (x - t) ** 2)
            out[i:i + per] = (err * cnt).sum(axis=(1, 2))
        return out

    def clipped_fraction(self, threshold):
        """Fraction of the non-zero values above ``threshold``."""
        total = self.hist.sum()
        k = int(np.floor(threshold / self.width))
        return float(self.hist[k + 1:].sum()) / total if total else 0.0

    def _mse_threshold(self):
        ks = self._candidates()
        errs = self.expected_sq_error(ks * self.width)
        return float(ks[int(np.argmin(errs))] * self.width)

    def _threshold(self):
        """The method's threshold on |x| (subclasses)."""
        raise NotImplementedError

    def calculate_range(self):
        self._check_observed()
        if self.hist.size == 0 or self.hist.sum() == 0:    # all zeros: nothing to choose
            return self.min_val, self.max_val
        top = max(abs(self.min_val), abs(self.max_val))
        th = min(self._threshold(), top)
        self.fallback = None
        err_th, err_max = self.expected_sq_error([th, top])
        clipped = self.clipped_fraction(th)
        if clipped > self.max_clipped and err_th > self.guard_ratio * err_max:
            mse_th = min(self._mse_threshold(), top)   # its last bin can end above max|x|
            self.fallback = ('%s threshold %.4g clips %.2g%% of the values and gives %.1fx the '
                             'squared error of the plain range %.4g; used the MSE-optimal '
                             'threshold %.4g instead'
                             % (type(self).__name__, th, 100 * clipped,
                                err_th / max(err_max, 1e-300), top, mse_th))
            th = mse_th
        if self.resolved_dtype == 'uint8':
            return 0.0, th
        return -th, th


class PercentileObserver(HistogramObserver):
    """Threshold at the ``percentile`` of ``|x|`` (exact zeros included in the count)."""

    def __init__(self, percentile=99.99, **kwargs):
        super().__init__(**kwargs)
        if not 0 < percentile <= 100:
            raise ValueError('percentile must be in (0, 100], got %r' % (percentile,))
        self.percentile = float(percentile)

    def _threshold(self):
        total = self.zeros + int(self.hist.sum())
        target = total * self.percentile / 100.0 - self.zeros
        if target <= 0:
            return self.width
        cum = np.cumsum(self.hist)
        k = int(np.searchsorted(cum, target))
        k = min(k, self.hist.size - 1)
        before = cum[k - 1] if k > 0 else 0
        frac = (target - before) / max(self.hist[k], 1)
        return float((k + min(max(frac, 0.0), 1.0)) * self.width)


class EntropyObserver(HistogramObserver):
    """Threshold minimising KL(P || Q) between the clipped histogram and its quantized form.

    The method of TensorRT (and MXNet's ``calib_mode='entropy'``) on the histogram of ``|x|``:
    for a candidate threshold, P is the histogram up to it with the clipped tail added to its
    last bin, Q spreads each of ``levels`` groups of bins evenly over its non-empty bins.
    """

    def _threshold(self):
        hist = self.hist.astype(np.float64)
        levels = self.levels
        best_k, best_kl = hist.size, np.inf
        for k in self._candidates():
            if k < levels:
                continue
            sliced = hist[:k]
            p = sliced.copy()
            p[-1] += hist[k:].sum()               # the clipped tail lands in the last bin
            nonzero = p > 0
            idx = np.minimum((np.arange(k) * levels) // k, levels - 1)
            group_sum = np.bincount(idx, weights=sliced, minlength=levels)
            group_cnt = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
            q = np.where(nonzero, group_sum[idx] / np.maximum(group_cnt[idx], 1), 0.0)
            kl = _kl_divergence(p, q)
            if kl < best_kl:
                best_kl, best_k = kl, k
        return float(best_k * self.width)


def _smooth(p, eps=1e-4):
    """Move a little mass onto the empty bins so that KL stays finite (as MXNet does)."""
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    return np.where(zeros, eps, p - eps1)


def _kl_divergence(p, q):
    """KL(P || Q) of two count histograms, smoothed on the counts as MXNet does."""
    ps, qs = _smooth(p), _smooth(q)
    if ps is None or qs is None or np.any(ps <= 0) or np.any(qs <= 0):
        return np.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


class MSEObserver(HistogramObserver):
    """Threshold with the least expected squared error (rounding plus clipping)."""

    def _threshold(self):
        return self._mse_threshold()


#: calibration mode name -> observer class
OBSERVERS = {
    'naive': MinMaxObserver,
    'minmax': MinMaxObserver,
    'moving_average': MovingAverageMinMaxObserver,
    'percentile': PercentileObserver,
    'entropy': EntropyObserver,
    'mse': MSEObserver,
}


def make_observer(calib_mode, dtype='auto', name=None, **kwargs):
    """Observer for calibration mode ``calib_mode`` (a name in :data:`OBSERVERS` or a class)."""
    if isinstance(calib_mode, type) and issubclass(calib_mode, Observer):
        cls = calib_mode
    else:
        try:
            cls = OBSERVERS[calib_mode]
        except KeyError:
            raise ValueError('unknown calib_mode %r: expected one of %s or an Observer class'
                             % (calib_mode, ', '.join(sorted(OBSERVERS)))) from None
    return cls(dtype=dtype, name=name, **kwargs)
