"""The converted network: a HybridBlock that runs a list of steps, each one a child block.

A step is a gluonq block (quantized layer, int8 op, Quantize/Dequantize) or a
:class:`FloatOp` (an MXNet operator left in float, with its parameters). The list of steps is
plain data (``QuantizedNet.spec``), so a converted network is rebuilt from its JSON sidecar
and its ``.params`` without the float model or calibration data (``gluonq.load_quantized``).
"""
from __future__ import annotations

import copy
import re
import warnings

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from .. import nn as qnn

__all__ = ['QuantizedNet', 'FloatOp', 'BLOCKS', 'check_spec', 'register_fast_path']

#: block classes a step may name
BLOCKS = {cls.__name__: cls for cls in (
    qnn.QuantizedDense, qnn.QuantizedConv1D, qnn.QuantizedConv2D, qnn.QuantizedConv3D,
    qnn.QuantizedAdd, qnn.QuantizedConcat, qnn.QuantizedPooling, qnn.QuantizedFlatten,
    qnn.QuantizedActivation, qnn.QuantizedMatMul, qnn.QuantizedShapeOp, qnn.Quantize,
    qnn.Dequantize)}


#: what ``QuantizedNet.hybridize()`` and ``QuantizedNet.export()`` run, registered by
#: :mod:`gluonq.deploy.mxnet_export` (``gluonq.convert`` knows nothing of deployment)
_FAST_PATH = {}


def register_fast_path(lower, export, kernels_exact):
    """Set the fast path of every QuantizedNet.

    ``lower(qnet, exact=...)`` returns the LoweredNet ``hybridize()`` runs,
    ``export(qnet, prefix, overwrite, epoch, exact)`` writes what ``export()`` writes, and
    ``kernels_exact()`` says whether this CPU's fused int8 kernels are exact (VNNI).
    """
    _FAST_PATH.update(lower=lower, export=export, kernels_exact=kernels_exact)


def _fast_path(name):
    if not _FAST_PATH:
        raise RuntimeError('QuantizedNet has no fast path registered (gluonq.deploy registers '
                           'it when gluonq is imported)')
    return _FAST_PATH[name]


def mx_reason(err):
    """``(operator, reason)`` of an MXNetError: the innermost operator and its check."""
    text = str(err)
    at = text.rfind('Error in operator ')
    if at < 0:
        return '?', text.strip().splitlines()[0]
    op, _, reason = text[at + len('Error in operator '):].partition(':')
    reason = re.sub(r'^\s*\[[^\]]*\] \S+:\d+:\s*', '', reason)   # [time] file.cc:123:
    return op, (reason.strip().splitlines() or ['?'])[0]


def _find_op(F, op):
    """The ``F`` function of a symbol-JSON operator name (``_plus_scalar``, ``_contrib_x``)."""
    for ns, name in ((F, op), (F._internal, op),
                     (getattr(F, 'contrib', None), op[len('_contrib_'):])):
        fn = getattr(ns, name, None) if ns is not None else None
        if fn is not None:
            return fn
    raise ValueError('MXNet has no operator %r' % op)


def check_spec(spec):
    """Raise ValueError, naming the step and its graph node, unless every step of ``spec``
    reads only network inputs and tensors earlier steps produce, names a known block, and
    (for a FloatOp) lists each operator input once, as a data input or a parameter."""
    known = set(spec.get('inputs', []))
    if not known:
        raise ValueError('the network spec has no inputs')
    for k, step in enumerate(spec.get('steps', [])):
        where = 'step %d %r (%s%s)' % (k, step.get('name'), step.get('block'),
                                        ', from node %r' % step['node'] if 'node' in step else '')
        if step.get('block') != 'FloatOp' and step.get('block') not in BLOCKS:
            raise ValueError('%s: unknown block; known: FloatOp, %s'
                             % (where, ', '.join(sorted(BLOCKS))))
        if not step.get('inputs'):
            raise ValueError('%s reads no tensor (an op of constants only must be folded '
                             'into a parameter)' % where)
        for t in step['inputs']:
            if t not in known:
                raise ValueError('%s reads %r, which is neither a network input nor the '
                                 'output of an earlier step' % (where, t))
        if step['block'] == 'FloatOp':
            cfg = step.get('config', {})
            pos = [int(p[0]) for p in cfg.get('params', [])]
            n = int(cfg.get('num_inputs', -1))
            if len(set(pos)) != len(pos) or any(not 0 <= p < n for p in pos) or \
                    n != len(pos) + len(step['inputs']):
                raise ValueError('%s: operator %s has %d inputs, but the step lists %d data '
                                 'inputs and parameters at positions %s'
                                 % (where, cfg.get('op'), n, len(step['inputs']), pos))
        for t in step.get('outputs', []):
            if t in known:
                raise ValueError('%s writes %r, which an earlier step or input already '
                                 'holds' % (where, t))
            known.add(t)
    for t in spec.get('outputs', []):
        if t not in known:
            raise ValueError('network output %r is produced by no step' % t)


class FloatOp(HybridBlock):
    """One MXNet operator kept in float, holding its parameters (weights, BN statistics).

    Parameters
    ----------
    op : str
        Operator name as in symbol JSON (e.g. ``Convolution``, ``_plus_scalar``).
    attrs : dict
        Its attributes (strings).
    num_inputs : int
        Number of operator inputs, parameters included.
    params : list of (int, str, tuple)
        ``(input position, parameter name, shape)`` of the inputs that are parameters.
    """

    def __init__(self, op, attrs, num_inputs, params=(), **kwargs):
        super().__init__(**kwargs)
        self._op = op
        self._attrs = {k: v for k, v in attrs.items() if not k.startswith('__')}
        self._num_inputs = num_inputs
        self._param_pos = [(int(pos), name) for pos, name, _ in params]
        with self.name_scope():
            for _, name, shape in params:
                p = self.params.get(name, shape=tuple(shape), init=mx.init.Zero(),
                                    grad_req='null', differentiable=False)
                self._reg_params[name] = p

    def hybrid_forward(self, F, *inputs, **params):
        args = list(inputs)
        for pos, name in self._param_pos:
            args.insert(pos, params[name])
        return _find_op(F, self._op)(*args, **self._attrs)

    def __repr__(self):
        return 'FloatOp(%s)' % self._op


class _FastState:
    """What the fast path of a QuantizedNet holds (see ``QuantizedNet.hybridize``)."""
    __slots__ = ('on', 'exact', 'kwargs', 'block', 'lowered')

    def __init__(self, on, exact, kwargs):
        self.on, self.exact, self.kwargs = on, exact, kwargs
        self.block = self.lowered = None


class QuantizedNet(HybridBlock):
    """A converted network: float inputs, float outputs, int8 inside.

    Build it with :func:`gluonq.quantize_net` or :func:`gluonq.load_quantized`.
    ``report`` lists each float op and what it became (and why a layer stayed float).

    Parameters
    ----------
    spec : dict
        The network as plain data (:attr:`spec`).
    check_finite : bool, default False
        Also settable as the attribute ``qnet.check_finite``. int8 has no NaN or Inf: a
        NaN input value quantizes to an ordinary integer (127 in int8, 0 in uint8) and an
        Inf one saturates, so the outputs stay finite where the float network's are NaN
        (unless its ReLU, as MXNet's ``Activation`` does, maps NaN to 0). With ``True``
        every call on NDArrays first checks its inputs and raises ValueError naming the
        input and the examples that hold NaN or Inf (one numpy pass over the input per
        call, measured at about 0.01-0.02 ms for a 32x1x32x32 batch). The default leaves
        inputs unchecked. Symbolic calls (exports) are not checked.

    An input whose shape the network cannot take raises ValueError naming the input, the
    shape the network was converted for and the layer that rejects it.

    Inputs:
        - the float network's inputs (float32).

    Outputs:
        - the float network's outputs (float32).
    """

    def __init__(self, spec, check_finite=False, **kwargs):
        super().__init__(**kwargs)
        check_spec(spec)
        self.check_finite = bool(check_finite)
        self._spec = copy.deepcopy(spec)
        self._steps = []
        with self.name_scope():
            for step in self._spec['steps']:
                cls = FloatOp if step['block'] == 'FloatOp' else BLOCKS[step['block']]
                cfg = dict(step['config'])
                if step['block'] == 'FloatOp':
                    cfg['params'] = [tuple(p) for p in cfg.get('params', [])]
                block = cls(prefix=step['name'] + '_', **cfg)
                self.register_child(block, step['name'])
                self._steps.append((block, list(step['inputs']), list(step['outputs'])))

    @property
    def spec(self):
        """The network as plain data (JSON-serialisable); see :func:`gluonq.save_quantized`."""
        return copy.deepcopy(self._spec)

    @property
    def report(self):
        """Per float op: what it became (``int8 ...`` / ``float``) and why."""
        return self._spec.get('report', [])

    @property
    def qparams(self):
        """Quantization parameters of every int8 tensor: ``{tensor: QParams dict}``."""
        return copy.deepcopy(self._spec.get('qparams', {}))

    # -- the fast path ---------------------------------------------------------------------
    def hybridize(self, active=True, fast=True, exact=False, **kwargs):
        """Hybridize; by default onto oneDNN's fused int8 kernels (the fast path).

        ``fast=True``: calls on NDArrays run the graph of :func:`gluonq.lower.lower` (fused
        int8 convolutions and dense layers, int8 between layers) as a SymbolBlock hybridized
        with ``static_alloc``/``static_shape`` (and ``kwargs``). It is built at the first call
        and rebuilt after the parameters change (``load_parameters``, ``set_data``).
        ``exact`` is passed to :func:`gluonq.lower.lower`: with VNNI the fast graph gives
        gluonq's integers either way (``exact=False`` may differ by one step where a value
        lies within about 1e-5 of a rounding tie); on a CPU without VNNI ``exact=False``
        runs oneDNN's saturating int8 arithmetic (a warning says so) and ``exact=True`` the
        bit-exact, slower "split" convolutions. Symbolic calls (export) still trace the
        reference chain. ``fast=False``: Gluon's hybridize of the reference chain.
        """
        # not a Block attribute (it would register the SymbolBlock as a child) nor a
        # container of Blocks (Gluon warns about those)
        self._fast = _FastState(bool(active and fast), exact, dict(kwargs))
        super().hybridize(active and not fast, **kwargs)

    def forward(self, x, *args):
        if not isinstance(x, mx.nd.NDArray):
            return super().forward(x, *args)
        if self.check_finite:
            self._check_finite((x,) + args)
        fast = getattr(self, '_fast', None)
        try:
            if fast is not None and fast.on:
                return self.fast_block()(x, *args)
            return super().forward(x, *args)
        except mx.base.MXNetError as err:
            shape_err = self._shape_error((x,) + args, err)
            if shape_err is None:
                raise
            raise shape_err from None

    def _check_finite(self, inputs):
        for name, a in zip(self._spec['inputs'], inputs):
            arr = a.asnumpy()             # numpy's check costs less than MXNet's op + sync
            if not np.isfinite(arr).all():
                bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(1)
                raise ValueError('QuantizedNet input %r holds NaN or Inf in example(s) %s of '
                                 '%d; int8 cannot represent them (check_finite=True)'
                                 % (name, np.flatnonzero(bad)[:10].tolist(), a.shape[0]))

    def _shape_error(self, inputs, err):
        """ValueError for an MXNet error caused by an input of another shape than the
        network was converted for (None when the shapes agree)."""
        want = self._spec.get('input_shape') or []
        got = inputs[0].shape
        if not want or (len(got) == len(want) and tuple(got[1:]) == tuple(want[1:])):
            return None
        return ValueError('QuantizedNet input %r has shape %s; the network was converted for '
                          'inputs of shape %s (any batch size N), and operator %s rejects it '
                          '(%s)' % ((self._spec['inputs'][0], tuple(got),
                                     '(N, %s)' % ', '.join(str(d) for d in want[1:]))
                                    + mx_reason(err)))

    @property
    def lowered(self):
        """The :class:`gluonq.deploy.lower.LoweredNet` the fast path runs (None before its
        build)."""
        fast = getattr(self, '_fast', None)
        return fast.lowered if fast is not None else None

    def fast_block(self):
        """The hybridized SymbolBlock of the fast path (built on demand)."""
        fast = getattr(self, '_fast', None)
        if fast is None:
            self.hybridize()
            fast = self._fast
        if fast.block is None:
            if not fast.exact and not _fast_path('kernels_exact')():
                warnings.warn(
                    "this CPU has no VNNI: oneDNN's int8 kernels add pairs of uint8*int8 "
                    'products in int16 with saturation and round weights for int8 inputs (as '
                    "MXNet's own int8 and onnxruntime do on such CPUs), so the fast path can "
                    "differ slightly from gluonq's integers here; hybridize(exact=True) is "
                    'bit-exact but slower', RuntimeWarning, stacklevel=4)
            fast.lowered = _fast_path('lower')(self, exact=fast.exact)
            blk = fast.lowered.block(release=True)
            hyb = {'static_alloc': True, 'static_shape': True}
            hyb.update(fast.kwargs)
            blk.hybridize(**hyb)
            self._watch_params()
            fast.block = blk
        return fast.block

    def _watch_params(self):
        """Drop the fast graph when a parameter is written (its fp32 images derive from them)."""
        def stale():
            fast = getattr(self, '_fast', None)
            if fast is not None:
                fast.block = None
        for p in self.collect_params().values():
            if getattr(p, '_gluonq_watched', False):
                continue
            for meth in ('set_data', '_init_impl'):
                def wrapped(*a, _orig=getattr(p, meth), **k):
                    stale()
                    return _orig(*a, **k)
                setattr(p, meth, wrapped)
            p._gluonq_watched = True

    def export(self, path, epoch=0, overwrite=False):
        """Write the fast graph for stock MXNet, as Gluon's ``HybridBlock.export`` does.

        Writes ``path-symbol.json`` and ``path-%04d.params`` (``epoch``): the fast export
        (:func:`gluonq.export_fast`: oneDNN's fused int8 kernels, fp32 images of the int8
        weights), hybridized or not, before or after a forward. Stock MXNet loads them
        without gluonq: ``mx.gluon.SymbolBlock.imports(path + '-symbol.json', ['data'],
        path + '-0000.params')`` or ``mx.mod.Module``. Unlike Gluon, existing files are
        replaced only with ``overwrite=True``. Returns the two paths.
        """
        fast = getattr(self, '_fast', None)
        return _fast_path('export')(self, path, overwrite, epoch,
                                    bool(fast is not None and fast.exact))

    def hybrid_forward(self, F, *inputs):
        env = self._run(inputs)
        outs = [env[k] for k in self._spec['outputs']]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, inputs):
        env = dict(zip(self._spec['inputs'], inputs))
        for block, ins, outs in self._steps:
            res = block(*[env[k] for k in ins])
            if len(outs) == 1:
                env[outs[0]] = res
            else:
                env.update(zip(outs, res))
        return env

    def forward_all(self, *inputs):
        """Eager run returning every tensor by name (float or QTensor); for debugging."""
        return self._run(inputs)

    def __repr__(self):
        n_int8 = sum(1 for r in self.report if r['kind'].startswith('int8'))
        n_float = sum(1 for r in self.report if r['kind'] == 'float')
        lines = ['QuantizedNet(%d steps: %d int8, %d float)' % (len(self._steps), n_int8,
                                                                 n_float)]
        for block, ins, outs in self._steps:
            lines.append('  %s <- %s: %r' % (', '.join(outs), ', '.join(ins), block))
        return '\n'.join(lines)
