"""int8 checkpoints: a QuantizedNet on disk, to be loaded back with gluonq.

* ``save_quantized(qnet, prefix)`` writes ``prefix.params`` (int8 weights, int32 biases,
  float32 scales and ranges) and ``prefix.json`` (the network's steps, the qparams table,
  calibration settings, gluonq and MXNet versions). ``load_quantized(prefix)`` rebuilds the
  QuantizedNet from them, with no float model and no calibration data.

Both files are written together by :func:`gluonq.atomic.atomic_outputs` (nothing is replaced
without ``overwrite=True``, a failure leaves nothing half-written); they are byte-identical
for identical inputs. Deployment files for runtimes without gluonq: :mod:`gluonq.deploy`.
"""
from __future__ import annotations

import json
import os

import mxnet as mx

from .atomic import atomic_outputs
from .convert.qnet import QuantizedNet

__all__ = ['save_quantized', 'load_quantized', 'CheckpointError', 'FORMAT']

FORMAT = 'gluonq.QuantizedNet'


class CheckpointError(ValueError):
    """A file that is not a gluonq checkpoint, or one that does not match its network."""


def _paths(prefix):
    return prefix + '.params', prefix + '.json'


def save_quantized(qnet, prefix, overwrite=False, extra=None):
    """Write ``prefix.params`` and ``prefix.json`` for ``qnet`` (see module docstring).

    ``extra`` (JSON-serialisable dict) is stored under ``"extra"`` in the sidecar.
    """
    if not isinstance(qnet, QuantizedNet):
        raise TypeError('save_quantized takes a QuantizedNet, got %s' % type(qnet).__name__)
    spec = qnet.spec
    spec['format'] = FORMAT
    if extra:
        spec['extra'] = extra
    params_path, json_path = _paths(prefix)
    with atomic_outputs([params_path, json_path], overwrite) as (tmp_params, tmp_json):
        arrays = {k: v.data().copyto(mx.cpu())
                  for k, v in sorted(qnet._collect_params_with_prefix().items())}
        mx.nd.save(tmp_params, arrays)
        with open(tmp_json, 'w') as f:
            json.dump(spec, f, indent=1, sort_keys=True)
            f.write('\n')
    return params_path, json_path


def load_quantized(prefix, ctx=None):
    """Rebuild the QuantizedNet saved by :func:`save_quantized` at ``prefix``."""
    params_path, json_path = _paths(prefix)
    for p in (params_path, json_path):
        if not os.path.exists(p):
            raise FileNotFoundError('gluonq checkpoint file %s not found' % p)
    try:
        with open(json_path) as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError('%s is not a JSON sidecar (truncated or corrupt?): %s'
                              % (json_path, err)) from None
    if not isinstance(spec, dict) or spec.get('format') != FORMAT:
        raise CheckpointError('%s is not a gluonq checkpoint sidecar (expected "format": %r, '
                              'got %r)' % (json_path, FORMAT, spec.get('format')
                                           if isinstance(spec, dict) else type(spec).__name__))
    try:
        qnet = QuantizedNet(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError('%s is a damaged gluonq sidecar: cannot rebuild the network '
                              '(%s: %s)' % (json_path, type(err).__name__, err)) from None
    try:
        loaded = mx.nd.load(params_path)
    except mx.base.MXNetError:
        raise CheckpointError('%s is not a readable MXNet .params file (truncated or '
                              'corrupt?): expected the arrays save_quantized wrote for %s'
                              % (params_path, json_path)) from None
    if not isinstance(loaded, dict):
        raise CheckpointError('%s holds unnamed arrays: expected the named parameters '
                              'save_quantized writes' % params_path)
    expected = qnet._collect_params_with_prefix()
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError('%s does not match %s: missing %s, unexpected %s'
                              % (params_path, json_path, missing[:10], unexpected[:10]))
    for name, param in expected.items():
        got = loaded[name].shape
        if param.shape and (len(got) != len(param.shape) or
                            any(s not in (0, t) for s, t in zip(param.shape, got))):
            raise CheckpointError('%s does not match %s: parameter %s has shape %s, the '
                                  'network expects %s' % (params_path, json_path, name, got,
                                                          param.shape))
    qnet.load_parameters(params_path, ctx=ctx or mx.cpu())
    return qnet
