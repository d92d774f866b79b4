"""int8 checkpoints and deployment files, written atomically.

* ``save_quantized(qnet, prefix)`` writes ``prefix.params`` (int8 weights, int32 biases,
  float32 scales and ranges) and ``prefix.json`` (the network's steps, the qparams table,
  calibration settings, gluonq and MXNet versions). ``load_quantized(prefix)`` rebuilds the
  QuantizedNet from them, with no float model and no calibration data.
* ``export_compact(qnet, prefix)`` writes symbol JSON + ``.params`` for stock
  MXNet (``SymbolBlock.imports`` or ``mx.mod.Module``): gluonq's own int8 chain, int8 weights
  on disk.
* ``export_fast(qnet, prefix)`` writes the same pair for the fast path
  (:mod:`gluonq.lower`): oneDNN's fused int8 kernels, fp32 weight images on disk.

Every writer refuses to replace an existing file unless ``overwrite=True``, writes to a
temporary file in the same folder and renames it into place, so a failure leaves nothing
half-written; outputs are byte-identical for identical inputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import mxnet as mx

from .convert.qnet import QuantizedNet

__all__ = ['save_quantized', 'load_quantized', 'export_compact', 'export_fast',
           'atomic_outputs', 'CheckpointError']

FORMAT = 'gluonq.QuantizedNet'


class CheckpointError(ValueError):
    """A file that is not a gluonq checkpoint, or one that does not match its network."""


@contextlib.contextmanager
def atomic_outputs(paths, overwrite=False):
    """Yield temporary paths for ``paths``; on success move them into place together.

    Refuses existing targets unless ``overwrite``; on any error removes every temporary
    file and leaves the targets untouched.
    """
    paths = [os.path.abspath(p) for p in paths]
    if not overwrite:
        existing = [p for p in paths if os.path.exists(p)]
        if existing:
            raise FileExistsError('refusing to overwrite %s (pass overwrite=True / --overwrite)'
                                  % ', '.join(existing))
    temps = []
    try:
        for p in paths:
            folder = os.path.dirname(p) or '.'
            if not os.path.isdir(folder):
                raise FileNotFoundError('output folder %s does not exist' % folder)
            fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(p) + '.', suffix='.tmp',
                                       dir=folder)
            os.close(fd)
            temps.append(tmp)
        yield temps
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
        temps = []
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


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


def export_compact(qnet, prefix, overwrite=False):
    """Symbol JSON + .params (int8 weights) of gluonq's int8 chain for stock MXNet.

    Writes ``prefix-symbol.json`` and ``prefix-0000.params``; they load with
    ``mx.gluon.SymbolBlock.imports(json, ['data'], params)`` or ``mx.mod.Module``.
    """
    sym_path, params_path = prefix + '-symbol.json', prefix + '-0000.params'
    data = mx.sym.var(qnet.spec['inputs'][0])
    out = qnet(data)
    out = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
    params = {p.name: p for p in qnet.collect_params().values()}
    arg_names, aux_names = set(out.list_arguments()), set(out.list_auxiliary_states())
    arrays = {}
    for name in sorted(params):
        kind = 'arg' if name in arg_names else 'aux' if name in aux_names else None
        if kind:
            arrays['%s:%s' % (kind, name)] = params[name].data().copyto(mx.cpu())
    with atomic_outputs([sym_path, params_path], overwrite) as (tmp_sym, tmp_params):
        with open(tmp_sym, 'w') as f:
            f.write(out.tojson())
        mx.nd.save(tmp_params, arrays)
    return sym_path, params_path


def export_fast(qnet, prefix, overwrite=False, exact=False, int8_weights=False, epoch=0):
    """Symbol JSON + .params of the fast path (:func:`gluonq.lower.lower`) for stock MXNet.

    Writes ``prefix-symbol.json`` and ``prefix-%04d.params`` (``epoch``; fp32 weight images
    that oneDNN's fused int8 kernels re-quantize into gluonq's int8 weights); they load with
    ``mx.gluon.SymbolBlock.imports(json, ['data'], params)`` or ``mx.mod.Module`` without
    gluonq. ``exact`` and ``int8_weights`` (int8 weights on disk, fp32 images computed in
    the graph at every call) are passed to :func:`gluonq.lower.lower`.
    """
    from .lower import lower
    sym_path, params_path = prefix + '-symbol.json', '%s-%04d.params' % (prefix, epoch)
    low = lower(qnet, exact=exact, int8_weights=int8_weights)
    with atomic_outputs([sym_path, params_path], overwrite) as (tmp_sym, tmp_params):
        low.save(tmp_sym, tmp_params)
    return sym_path, params_path
