"""Replay a QuantizedNet one step at a time on calibration batches, with a float twin of
each quantized layer.

Bias correction (:mod:`.bias_correction`) and the sensitivity ranking of the accuracy
fallback (:mod:`.fallback`) both need what the int8 network feeds each layer and what the
float layer would compute from the same input. :func:`replay` runs the steps in order over
every batch (a tensor is dropped after its last reader) and lets a hook look at, change or
replace each step before it runs.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import quant
from ..arrays import to_numpy
from ..nn import QTensor, as_qtensor

__all__ = ['LAYER_BLOCKS', 'replay', 'float_tensors', 'subset', 'real_input', 'float_layer',
           'int8_layer', 'bias_scale', 'finish_layer']

#: steps with int8 weights and an int32 bias
LAYER_BLOCKS = ('QuantizedConv1D', 'QuantizedConv2D', 'QuantizedConv3D', 'QuantizedDense')


def replay(qnet, batches, hook=None):
    """Run ``qnet``'s steps in order on every batch; return the network outputs per batch.

    ``hook(k, step, block, inputs)`` is called before step ``k`` runs, with ``inputs`` the
    step's input values per batch (float NDArrays or QTensors). It may change the block (its
    parameters) and returns None to run the block, or the step's outputs per batch to use
    instead.
    """
    spec = qnet._spec
    steps = spec['steps']
    last = {}                                     # tensor -> index of its last reader
    for k, st in enumerate(steps):
        for t in st['inputs']:
            last[t] = k
    keep = set(spec['outputs'])
    envs = [{spec['inputs'][0]: mx.nd.array(b)} for b in batches]
    for k, (st, (block, ins, outs)) in enumerate(zip(steps, qnet._steps)):
        inputs = [[env[t] for t in ins] for env in envs]
        res = hook(k, st, block, inputs) if hook is not None else None
        if res is None:
            res = [block(*x) for x in inputs]
        for env, r in zip(envs, res):
            env.update({outs[0]: r} if len(outs) == 1 else zip(outs, r))
            for t in ins:
                if last[t] == k and t not in keep:
                    env.pop(t, None)
    return [[env[t] for t in spec['outputs']] for env in envs]


def float_tensors(graph, edges):
    """A SymbolBlock computing the float tensors ``edges`` of a traced, folded ``graph``;
    called on an input batch (NDArray) it returns them as a list."""
    sym = graph.to_symbol(edges)
    block = mx.gluon.SymbolBlock(sym, [mx.sym.var(graph.inputs[0], dtype=np.float32)])
    for name, p in block.collect_params().items():
        p.shape = graph.params[name].shape
        p.initialize(mx.init.Constant(0))
        p.set_data(mx.nd.array(graph.params[name]))

    def run(x):
        out = block(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return run


def subset(batches, num_examples):
    """The first ``num_examples`` examples of a list of batches (as batches)."""
    out, seen = [], 0
    for b in batches:
        if seen >= num_examples:
            break
        out.append(b[:num_examples - seen])
        seen += len(out[-1])
    return out


def real_input(step, block, x):
    """The real values a layer step computes with: its quantized input, dequantized (a
    float input is first quantized with the layer's calibrated input range)."""
    qt = as_qtensor(x)
    z = block.in_zero_point
    if qt is None:
        lo, hi = block.input_min.data(), block.input_max.data()
        qt = QTensor(*(quant.quantize_affine_f(mx.nd, x, lo, hi, z) if z else
                       quant.quantize_f(mx.nd, x, lo, hi, step['config']['in_dtype'])))
    return quant.dequantize_affine_f(mx.nd, qt) if z else quant.dequantize_f(mx.nd, qt)


def float_layer(step, x, weight, bias):
    """A layer step's pre-activation output in float: convolution or dense of real input
    ``x`` with float ``weight`` and ``bias`` (numpy; bias None for none)."""
    cfg = step['config']
    args = [x, mx.nd.array(weight, dtype=np.float32)]
    if bias is not None:
        args.append(mx.nd.array(bias, dtype=np.float32))
    if step['block'] == 'QuantizedDense':
        return mx.nd.FullyConnected(*args, num_hidden=cfg['units'], flatten=cfg['flatten'],
                                    no_bias=bias is None)
    return mx.nd.Convolution(*args, kernel=tuple(cfg['kernel_size']),
                             stride=tuple(cfg['strides']), pad=tuple(cfg['padding']),
                             dilate=tuple(cfg['dilation']), num_group=cfg['groups'],
                             num_filter=cfg['channels'], no_bias=bias is None)


def int8_layer(step, block):
    """``(weight, bias)`` as real values: the int8 weights times their scales and the int32
    bias at ``s_in * s_w`` (bias None for a layer without one)."""
    q = to_numpy(block.weight, np.float64)
    s_w = to_numpy(block.weight_scale, np.float64)
    w = (q * s_w.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)
    if block.bias is None:
        return w, None
    b = int32_bias(block).astype(np.float64) * bias_scale(step, block)
    return w, b.astype(np.float32)


def int32_bias(block):
    """A static layer's int32 bias at ``s_in * s_w`` without its folded zero point term
    (int64 numpy)."""
    b = to_numpy(block.bias, np.int64)
    z = block.in_zero_point
    if z:
        w = to_numpy(block.weight, np.int64)
        b = b + z * w.reshape(len(w), -1).sum(axis=1)
    return b


def bias_scale(step, block):
    """Per output channel, the real value of one step of the int32 bias: ``s_in * s_w``."""
    cfg = step['config']
    s_in = quant.QParams(cfg['in_dtype'], *cfg['in_range'],
                         cfg.get('in_scheme', 'symmetric')).scale
    s_w = to_numpy(block.weight_scale, np.float64)
    return np.float64(s_in) * np.broadcast_to(s_w, (block.weight.shape[0],))


def finish_layer(step, block, y, residual=None):
    """The rest of a layer step after its float pre-activation output ``y``: the residual
    add, the ReLU and, for a step with int8 output, quantization to its output range."""
    cfg = step['config']
    if residual is not None:
        r = as_qtensor(residual)
        y = y + (quant.dequantize_f(mx.nd, r) if r is not None else residual)
    if cfg['activation'] == 'relu':
        y = mx.nd.relu(y)
    if block.out_dtype == 'float32':
        return y
    return QTensor(*quant.quantize_f(mx.nd, y, block.output_min.data(),
                                     block.output_max.data(), block.out_dtype))
