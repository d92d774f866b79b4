"""Deployment files for stock MXNet, and the fast path of ``QuantizedNet``.

* ``export_fast(qnet, prefix)`` writes symbol JSON + ``.params`` of the fast path
  (:mod:`gluonq.deploy.lower`): oneDNN's fused int8 kernels, fp32 images of the int8 weights
  on disk (``int8_weights=True``: the int8 weights themselves). Stock MXNet loads them
  (``SymbolBlock.imports`` or ``mx.mod.Module``) without gluonq.
* ``export_compact(qnet, prefix)`` (deprecated) writes the same pair for gluonq's unfused
  reference chain. ``export_fast(qnet, prefix, int8_weights=True, exact=True)`` has the same
  int8 weights on disk and gluonq's integers on every CPU, and (on CPUs with VNNI, or with
  ``exact=False``) ran 1.7-14x faster in a quarter to a sixteenth of the memory (README,
  "Deployment").

This module also registers the fast path with :class:`~gluonq.QuantizedNet`
(:func:`gluonq.convert.qnet.register_fast_path`): ``qnet.hybridize()`` runs
:func:`~gluonq.deploy.lower.lower`'s graph and ``qnet.export(prefix)`` is
:func:`export_fast`. ``gluonq.convert`` knows nothing of deployment.

Both writers go through :func:`gluonq.atomic.atomic_outputs`; outputs are byte-identical for
identical inputs.
"""
from __future__ import annotations

import warnings

import mxnet as mx

from ..atomic import atomic_outputs
from ..convert.qnet import register_fast_path
from .lower import int8_kernels_exact, lower

__all__ = ['export_fast', 'export_compact']


def export_fast(qnet, prefix, overwrite=False, exact=False, int8_weights=False, epoch=0):
    """Symbol JSON + .params of the fast path (:func:`gluonq.deploy.lower.lower`) for stock
    MXNet.

    Writes ``prefix-symbol.json`` and ``prefix-%04d.params`` (``epoch``; fp32 weight images
    that oneDNN's fused int8 kernels re-quantize into gluonq's int8 weights); they load with
    ``mx.gluon.SymbolBlock.imports(json, ['data'], params)`` or ``mx.mod.Module`` without
    gluonq. ``exact`` and ``int8_weights`` (int8 weights on disk, fp32 images computed in
    the graph at every call) are passed to :func:`gluonq.deploy.lower.lower`.
    """
    sym_path, params_path = prefix + '-symbol.json', '%s-%04d.params' % (prefix, epoch)
    low = lower(qnet, exact=exact, int8_weights=int8_weights)
    with atomic_outputs([sym_path, params_path], overwrite) as (tmp_sym, tmp_params):
        low.save(tmp_sym, tmp_params)
    return sym_path, params_path


def export_compact(qnet, prefix, overwrite=False):
    """Deprecated: symbol JSON + .params (int8 weights) of gluonq's unfused reference chain.

    Use ``export_fast(qnet, prefix, int8_weights=True, exact=True)``: int8 weights on disk
    too, gluonq's integers on every CPU, fused kernels. This one still writes
    ``prefix-symbol.json`` and ``prefix-0000.params``, which load with
    ``mx.gluon.SymbolBlock.imports(json, ['data'], params)`` or ``mx.mod.Module``.
    """
    warnings.warn('export_compact is deprecated: export_fast(qnet, prefix, int8_weights=True, '
                  'exact=True) has int8 weights on disk too and runs fused', DeprecationWarning,
                  stacklevel=2)
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


def _export_for_qnet(qnet, prefix, overwrite, epoch, exact):
    return export_fast(qnet, prefix, overwrite=overwrite, epoch=epoch, exact=exact)


register_fast_path(lower=lower, export=_export_for_qnet, kernels_exact=int8_kernels_exact)
