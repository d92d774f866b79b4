"""Bias correction: remove, per output channel, the mean error of each int8 layer's output.

Rounding weights to int8 and activations to 8 bits shifts the mean of a layer's output:
``E[(W_q - W) x]`` is not zero per channel when the inputs are not centred (as after a
ReLU), and an error in the mean passes on to every later layer. As NNCF's BiasCorrection
does after MinMax, the converter measures the shift on calibration data and takes it out
of the int32 bias, layer by layer in network order, on the first :data:`NUM_EXAMPLES`
calibration examples:

* the int8 layer's pre-activation output (before its ReLU, residual add and requantize;
  the part a bias moves), computed from its input as the int8 network produces it, with
  the layers before it already corrected;
* its reference, the same tensor of the float (BatchNorm-folded) network;
* the int32 bias becomes ``b_q - round(mean(int8 - float) / (s_in * s_w))`` per output
  channel (mean over examples and positions), saturated as every int32 bias is.

Measuring against the float network, not the float layer on the int8 input, also removes
the mean error the layers before left behind (measured on the shipped MNIST models:
0.2-2.9 dB more logit SQNR, against 0.1-1.7 dB). Only the int32 bias changes, at the same
scale, so the reference chain, the fast path and every export compute the corrected
network with the same integers.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import quant
from ..arrays import to_numpy
from .replay import (LAYER_BLOCKS, bias_scale, float_layer, float_tensors, int32_bias,
                     int8_layer, real_input, replay, subset)

__all__ = ['correct_biases', 'channel_means', 'NUM_EXAMPLES']

#: calibration examples bias correction runs on (NNCF's BiasCorrection takes 20% of its
#: 300; the mean of a channel is estimated from examples times positions values)
NUM_EXAMPLES = 128


def channel_means(step, outputs):
    """float64 per-output-channel means of a layer step's outputs (one NDArray per batch)."""
    total, count = 0.0, 0
    channel_last = step['block'] == 'QuantizedDense' and not step['config']['flatten']
    for y in outputs:
        y = np.moveaxis(y.asnumpy().astype(np.float64), -1 if channel_last else 1, 0)
        y = y.reshape(y.shape[0], -1)
        total = total + y.sum(axis=1)
        count += y.shape[1]
    return total / count


def correct_biases(qnet, graph, batches):
    """Correct the int32 biases of ``qnet``'s layers in place (see the module docstring).

    Parameters
    ----------
    qnet : QuantizedNet
        A freshly converted network.
    graph : Graph
        The traced, folded float graph it was converted from.
    batches : list of numpy arrays
        The calibration batches.

    Returns
    -------
    dict
        Step name -> largest ``|bias change|`` in the layer's output units (0.0 where every
        channel's mean error was below half an int32 step); also in
        ``qnet.spec['calibration']['bias_correction']``. Layers without a bias, or with a
        dynamic input range (whose bias is quantized at run time), are listed with None.
    """
    batches = subset(batches, NUM_EXAMPLES)
    layers = [s for s in qnet._spec['steps'] if s['block'] in LAYER_BLOCKS]
    if not layers:
        qnet._spec['calibration']['bias_correction'] = {}
        return {}
    ref = float_tensors(graph, [(s['node'], 0) for s in layers])
    outs = [ref(mx.nd.array(b)) for b in batches]
    float_means = {s['name']: channel_means(s, [o[i] for o in outs])
                   for i, s in enumerate(layers)}
    del outs
    shifts = {}

    def hook(k, step, block, inputs):
        if step['block'] not in LAYER_BLOCKS:
            return None
        if block.bias is None or not block.is_static:
            shifts[step['name']] = None
            return None
        wq, bq = int8_layer(step, block)
        err = channel_means(step, [float_layer(step, real_input(step, block, x[0]), wq, bq)
                                   for x in inputs]) - float_means[step['name']]
        scale = bias_scale(step, block)
        b_q = int32_bias(block).astype(np.float64)
        w_q = to_numpy(block.weight)
        z = block.in_zero_point
        headroom = quant.bias_headroom(w_q, step['config']['in_dtype'], z)
        new = quant.quantize_bias(b_q - err / scale, 1.0, 1.0, headroom)   # in int32 steps
        stored = quant.fold_zero_point(new, w_q, z) if z else new
        block.bias.set_data(mx.nd.array(stored, dtype=np.int32))
        shifts[step['name']] = float(np.max(np.abs((new - b_q) * scale), initial=0.0))
        return None

    replay(qnet, batches, hook)
    qnet._spec['calibration']['bias_correction'] = shifts
    return shifts
