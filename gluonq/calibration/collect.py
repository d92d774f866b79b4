"""Calibration data in, observed ranges out.

``as_batches`` turns what users have (a Gluon DataLoader yielding arrays or (data, label)
tuples, an iterable of NDArrays, a numpy array) into float32 numpy batches, with limits and
checks. ``collect`` runs them through a float symbol that outputs every tensor to observe
and feeds one observer per tensor.
"""
from __future__ import annotations

import os
import sys
import warnings

import mxnet as mx
import numpy as np

__all__ = ['as_batches', 'collect', 'CalibrationDataError']


class CalibrationDataError(ValueError):
    """The calibration data is empty, badly shaped or not finite."""


def _as_numpy(x, what):
    if isinstance(x, mx.nd.NDArray):
        return x.asnumpy()
    if isinstance(x, np.ndarray):
        return x
    raise CalibrationDataError('%s: expected an NDArray or numpy array, got %s'
                               % (what, type(x).__name__))


def _caller_stacklevel():
    """``stacklevel`` of the first frame outside gluonq (a warning points at the user's line)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_if_unnormalized(data, i):
    """Integer data (e.g. uint8 0-255 pixels) is rarely what a float network was trained on."""
    if np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_:
        warnings.warn('calibration batch %d holds %s values (%g..%g): is it normalized the way '
                      'the network was trained? It is calibrated as float32 of these values; '
                      'apply the training preprocessing (e.g. x / 255, mean and std) first'
                      % (i, data.dtype.name, data.min(), data.max()), UserWarning,
                      stacklevel=_caller_stacklevel())


def as_batches(calib_data, num_batches=None, num_examples=None, batch_size=32,
               with_labels=False):
    """Float32 numpy batches (and labels, if present and asked for) from ``calib_data``.

    Accepts a numpy array or NDArray of examples (split into ``batch_size`` batches), a Gluon
    DataLoader or any iterable of arrays or of ``(data, label, ...)`` tuples. At most
    ``num_batches`` batches / ``num_examples`` examples are taken. Integer data (e.g.
    uint8 0-255 images) is taken as it is, with a warning that it looks unnormalized.
    """
    for name, value in (('num_batches', num_batches), ('num_examples', num_examples),
                        ('batch_size', batch_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise CalibrationDataError('%s must be a positive integer, got %r' % (name, value))
    if isinstance(calib_data, (np.ndarray, mx.nd.NDArray)):
        arr = _as_numpy(calib_data, 'calib_data')
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise CalibrationDataError('calib_data is empty (shape %s)' % (arr.shape,))
        source = (arr[i:i + batch_size] for i in range(0, arr.shape[0], batch_size))
    else:
        try:
            source = iter(calib_data)
        except TypeError:
            raise CalibrationDataError('calib_data must be a numpy array, an NDArray, a '
                                       'DataLoader or an iterable of batches, got %s'
                                       % type(calib_data).__name__) from None
    batches, labels, seen = [], [], 0
    shape = None
    for i, item in enumerate(source):
        if num_batches is not None and i >= num_batches:
            break
        label = None
        if isinstance(item, (list, tuple)):
            if not item:
                raise CalibrationDataError('calibration batch %d is an empty tuple' % i)
            data = _as_numpy(item[0], 'calibration batch %d (data)' % i)
            if len(item) > 1 and item[1] is not None:
                label = _as_numpy(item[1], 'calibration batch %d (label)' % i)
        else:
            data = _as_numpy(item, 'calibration batch %d' % i)
        if num_examples is not None:
            data = data[:num_examples - seen]
            label = None if label is None else label[:num_examples - seen]
        if data.ndim < 2 or data.shape[0] == 0:
            raise CalibrationDataError('calibration batch %d has shape %s: expected '
                                       '(batch, ...) with at least one example'
                                       % (i, data.shape))
        if shape is not None and data.shape[1:] != shape:
            raise CalibrationDataError('calibration batch %d has example shape %s, the first '
                                       'batch had %s' % (i, data.shape[1:], shape))
        shape = data.shape[1:]
        if i == 0:
            _warn_if_unnormalized(data, i)
        data = data.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            raise CalibrationDataError('calibration batch %d holds NaN or Inf' % i)
        batches.append(data)
        labels.append(label)
        seen += data.shape[0]
        if num_examples is not None and seen >= num_examples:
            break
    if not batches:
        raise CalibrationDataError('calib_data yielded no examples')
    if with_labels:
        return batches, (labels if all(l is not None for l in labels) else None)
    return batches


def collect(sym, input_name, params, batches, observers, progress=True):
    """Run ``batches`` through ``sym`` (outputs in the order of ``observers``) and observe.

    ``params`` maps argument/auxiliary names to numpy arrays.
    """
    from tqdm.auto import tqdm
    block = mx.gluon.SymbolBlock(sym, [mx.sym.var(input_name, dtype=np.float32)])
    arg_params = {k: mx.nd.array(v, dtype=v.dtype) for k, v in params.items()}
    for name, p in block.collect_params().items():
        if name not in arg_params:
            raise ValueError('calibration graph needs parameter %r, which the network lacks'
                             % name)
        p.shape = arg_params[name].shape
        p.initialize(init=mx.init.Constant(0))
        p.set_data(arg_params[name])
    block.hybridize(static_alloc=True, static_shape=True)
    it = tqdm(batches, desc='calibrating', unit='batch', disable=not progress, leave=False)
    for data in it:
        outs = block(mx.nd.array(data))
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for obs, out in zip(observers, outs):
            obs.observe(out)
    return observers
