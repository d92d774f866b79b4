"""The converted network: a HybridBlock that runs a list of steps, each one a child block.

A step is a gluonq block (quantized layer, int8 op, Quantize/Dequantize) or a
:class:`FloatOp` (an MXNet operator left in float, with its parameters). The list of steps is
plain data (``QuantizedNet.spec``), so a converted network is rebuilt from its JSON sidecar
and its ``.params`` without the float model or calibration data (``gluonq.load_quantized``).
"""
from __future__ import annotations

import copy

import mxnet as mx
from mxnet.gluon import HybridBlock

from .. import nn as qnn

__all__ = ['QuantizedNet', 'FloatOp', 'BLOCKS']

#: block classes a step may name
BLOCKS = {cls.__name__: cls for cls in (
    qnn.QuantizedDense, qnn.QuantizedConv1D, qnn.QuantizedConv2D, qnn.QuantizedConv3D,
    qnn.QuantizedAdd, qnn.QuantizedConcat, qnn.QuantizedPooling, qnn.QuantizedFlatten,
    qnn.QuantizedActivation, qnn.Quantize, qnn.Dequantize)}


def _find_op(F, op):
    """The ``F`` function of a symbol-JSON operator name (``_plus_scalar``, ``_contrib_x``)."""
    for ns, name in ((F, op), (F._internal, op),
                     (getattr(F, 'contrib', None), op[len('_contrib_'):])):
        fn = getattr(ns, name, None) if ns is not None else None
        if fn is not None:
            return fn
    raise ValueError('MXNet has no operator %r' % op)


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


class QuantizedNet(HybridBlock):
    """A converted network: float inputs, float outputs, int8 inside.

    Build it with :func:`gluonq.quantize_net` or :func:`gluonq.load_quantized`.
    ``report`` lists each float op and what it became (and why a layer stayed float).

    Inputs:
        - the float network's inputs (float32).

    Outputs:
        - the float network's outputs (float32).
    """

    def __init__(self, spec, **kwargs):
        super().__init__(**kwargs)
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
