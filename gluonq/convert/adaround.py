"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Rounding each weight to the nearest integer minimizes the error of each weight, not of the
layer's output: the errors of one output channel add up over its inputs, and for correlated
inputs another choice of floor or ceil per weight can cancel them. For each conv/dense layer,
in network order (so that a layer sees the int8 network's input with the layers before it
already rounded), on :data:`NUM_EXAMPLES` calibration examples:

* ``x``: the layer's real input as the int8 network produces it (quantized, dequantized);
  at most ``max_rows`` output positions (rows of the im2col matrix) are sampled from it;
* the target is the float layer on that input, ``W x + b`` (pre-activation), and the soft
  layer ``W~ x + b_q`` with ``W~ = s * (floor(w / s) + h(V))``, ``h`` the rectified
  sigmoid ``clip(sigmoid(V) * 1.2 - 0.1, 0, 1)`` and ``b_q`` the int32 bias in real units;
* Adam on ``V`` (``V`` starts where ``h`` equals the fractional part of ``w / s``) minimizes
  ``mse / mse_nearest + lam * mean(1 - |2 h - 1| ** beta)``: the regularizer is off for the
  first :data:`WARMUP` of the ``iters`` steps, then ``beta`` falls from 20 to 2 (cosine),
  which pushes every ``h`` to 0 or 1;
* the integers are ``floor(w / s) + (h >= 0.5)``; if their output MSE on the sampled rows is
  not below nearest rounding's, the layer keeps nearest rounding.

What gluonq's other parts rely on stays: each channel's scale (chosen so that oneDNN's fused
kernels re-derive the integers from a float32 image, :func:`gluonq.quant.quantize_weight`)
and its +-127 elements (a weight nearest-rounded to +-127 is kept, every other one is
``floor`` or ``floor + 1``, within [-127, 127]), and the int32 bias quantize_net computed
from ``s_in`` and ``s_w``; only for an input with a zero point is the stored bias re-folded
(``b_q - z * sum(q_w)`` with the new ``q_w``, :func:`gluonq.quant.fold_zero_point`). The
result is ordinary int8 weights, so the reference chain, the fast path and every export run
it unchanged.

The time per layer is ``iters`` steps, each two products of :data:`BATCH_ROWS` random rows
``(batch, fan_in)`` with the ``(fan_in, channels)`` weights (AdaRound's mini-batches), or one
product with the exact ``(fan_in, fan_in)`` Gram matrix of all rows where that is cheaper
(fewer than ``2 * batch`` inputs per channel, as in depthwise convolutions).
"""
from __future__ import annotations

import itertools

import mxnet as mx
import numpy as np

from .. import quant
from ..arrays import to_numpy
from .replay import LAYER_BLOCKS, bias_scale, int32_bias, real_input, replay, subset

__all__ = ['adaround', 'round_layer', 'NUM_EXAMPLES', 'ITERS', 'MAX_ROWS', 'BATCH_ROWS',
           'LAM', 'LR', 'WARMUP']

#: calibration examples the rows are sampled from
NUM_EXAMPLES = 128
#: Adam steps per layer (the paper takes 10k, AIMET 10k; a few hundred already find most of
#: the gain on the shipped models)
ITERS = 300
#: output positions (rows) sampled per layer
MAX_ROWS = 2048
#: rows per step for the gradient of a layer with many inputs per channel (AdaRound's
#: mini-batches; the paper draws 32 images' positions per step)
BATCH_ROWS = 256
#: weight of the rounding regularizer against the normalized output MSE
LAM = 10.0
#: Adam's step size on V
LR = 0.05
#: fraction of the steps without the regularizer
WARMUP = 0.2
#: the rectified sigmoid's stretch: h = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA, GAMMA = 1.1, -0.1


def _rect_sigmoid(v):
    """``(h, dh/dV)`` of the rectified sigmoid."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0) & (raw < 1)
    return np.clip(raw, 0.0, 1.0), np.where(inside, sig * (1 - sig) * (ZETA - GAMMA), 0.0)


def _v_init(rest):
    """V at which the rectified sigmoid equals ``rest`` (in [0, 1))."""
    r = np.clip(rest, 1e-4, 1 - 1e-4)
    return -np.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def _positions(total, max_rows, rng):
    """Sorted row indices: all ``total`` rows, or ``max_rows`` of them drawn without
    replacement."""
    if total <= max_rows:
        return np.arange(total)
    return np.sort(rng.choice(total, max_rows, replace=False))


def _conv_rows(step, x, max_rows, rng):
    """im2col rows of sampled output positions of a convolution: ``(groups, rows, fan_in)``
    float32, each row laid out as the weight's ``(in_channels / groups, *kernel)``."""
    cfg = step['config']
    k, s, p, d = (tuple(cfg[n]) for n in ('kernel_size', 'strides', 'padding', 'dilation'))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pi, pi) for pi in p])   # the real zero pads
    out = [(n + 2 * pi - di * (ki - 1) - 1) // si + 1
           for n, ki, si, pi, di in zip(x.shape[2:], k, s, p, d)]
    idx = np.unravel_index(_positions(x.shape[0] * int(np.prod(out)), max_rows, rng),
                           (x.shape[0],) + tuple(out))
    taps = [xp[(idx[0], slice(None)) + tuple(o * si + t * di for o, si, t, di in
                                             zip(idx[1:], s, tap, d))]
            for tap in itertools.product(*(range(ki) for ki in k))]
    rows = np.stack(taps, axis=-1)                              # (rows, in_channels, taps)
    g = cfg['groups']
    rows = rows.reshape(rows.shape[0], g, -1)
    return np.ascontiguousarray(rows.transpose(1, 0, 2), dtype=np.float32)


def _rows(step, inputs, max_rows, rng):
    """``(groups, rows, fan_in)`` float32 rows of a layer's real input (numpy per batch)."""
    x = np.concatenate(inputs)
    if step['block'] != 'QuantizedDense':
        return _conv_rows(step, x, max_rows, rng)
    x = x.reshape(len(x), -1) if step['config']['flatten'] else x.reshape(-1, x.shape[-1])
    return x[_positions(len(x), max_rows, rng)][None].astype(np.float32)


class _Objective:
    """The output MSE of a layer, ``mean((x dW^T + db)^2)`` over rows and channels
    (float64), and its gradient in ``dW`` (``(groups, channels / groups, fan_in)``,
    float32): exact from the rows' Gram matrix where ``fan_in < 2 * batch`` (few inputs per
    channel), else from ``batch`` rows drawn at random for each step (the rows themselves
    when there are no more), whichever is cheaper."""

    def __init__(self, rows, db, batch, rng):
        self.rows, self.db, self.batch, self.rng = rows, db, batch, rng  # db: (g, channels/g)
        g, n, k = rows.shape
        self.gram = k < 2 * min(batch, n)
        if self.gram:
            self.h = np.matmul(rows.transpose(0, 2, 1), rows) / n
            self.mu = rows.mean(axis=1)                         # (groups, fan_in)

    def mse(self, dw):
        r = np.matmul(self.rows.astype(np.float64), dw.transpose(0, 2, 1)) + self.db[:, None]
        return float(np.mean(r ** 2))

    def grad(self, dw):
        dw = dw.astype(np.float32)
        if self.gram:
            g = np.matmul(dw, self.h) + self.db[..., None] * self.mu[:, None]
        else:
            x = self.rows
            if x.shape[1] > self.batch:
                x = x[:, self.rng.choice(x.shape[1], self.batch, replace=False)]
            r = np.matmul(x, dw.transpose(0, 2, 1)) + self.db[:, None]
            g = np.matmul(r.transpose(0, 2, 1), x) / x.shape[1]
        return 2 * g / self.db.size


def _adam(v, grad_fn, iters, lr):
    """``iters`` Adam steps on ``v`` (in place); ``grad_fn(v, t)`` gives the gradient."""
    m, s = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(iters):
        g = grad_fn(v, t)
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        v -= lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(s / (1 - b2 ** (t + 1))) + eps)
    return v


def round_layer(w, q0, scale, rows, db, rng, iters=ITERS, batch=BATCH_ROWS, lam=LAM, lr=LR):
    """AdaRound integers of one layer (see the module docstring).

    Parameters
    ----------
    w : ndarray
        Float weights ``(channels, ...)``.
    q0 : ndarray
        Their nearest-rounded int8 integers at ``scale``.
    scale : ndarray
        Per-channel ``(channels,)`` or per-tensor ``(1,)`` weight scales.
    rows : ndarray
        ``(groups, rows, fan_in)`` real inputs.
    db : ndarray
        ``(channels,)`` int8 bias minus float bias, in real units.
    rng : numpy.random.RandomState
        Draws the mini-batches.
    iters, batch, lam, lr : optional
        Adam steps, rows per step, regularizer weight and step size.

    Returns
    -------
    q : ndarray
        int8 integers of ``q0``'s shape.
    mse : tuple of float
        Output MSE on ``rows`` with ``q0`` and with ``q``.
    """
    g = rows.shape[0]
    c = w.shape[0]
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (c,))[:, None]
    wc = w.reshape(c, -1).astype(np.float64)
    ratio = wc / s
    low = np.floor(ratio)
    q0c = q0.reshape(c, -1).astype(np.float64)
    free = (np.abs(q0c) < 127) & (ratio != low)   # kept: the +-127 elements, exact integers
    shape = (g, c // g, -1)
    objective = _Objective(rows, db.reshape(g, -1), batch, rng)

    def delta(q):
        return (s * q - wc).reshape(shape)

    mse0 = objective.mse(delta(q0c))
    if mse0 <= 0 or not free.any():
        return q0, (mse0, mse0)
    v = _v_init(ratio - low)
    start = int(WARMUP * iters)

    def grad_fn(v, t):
        h, dh = _rect_sigmoid(v)
        h = np.where(free, h, q0c - low)
        gw = objective.grad(delta(low + h))
        gv = gw.reshape(c, -1) * s * dh / mse0
        if t >= start:
            beta = 2 + 9 * (1 + np.cos(np.pi * (t - start) / max(iters - start, 1)))
            a = np.abs(2 * h - 1)
            gv -= lam / free.sum() * beta * a ** (beta - 1) * 2 * np.sign(2 * h - 1) * dh
        return np.where(free, gv, 0.0)

    v = _adam(v, grad_fn, iters, lr)
    q = np.where(free, low + (_rect_sigmoid(v)[0] >= 0.5), q0c)
    mse = objective.mse(delta(q))
    if mse >= mse0:
        return q0, (mse0, mse0)
    return q.reshape(q0.shape).astype(np.int8), (mse0, mse)


def adaround(qnet, values, batches, iters=ITERS, max_rows=MAX_ROWS, seed=0):
    """Replace the nearest-rounded int8 weights of ``qnet``'s static layers by AdaRound's,
    in place and in network order (see the module docstring).

    Parameters
    ----------
    qnet : QuantizedNet
        A freshly converted network.
    values : dict
        Step name -> ``{'weight': ..., 'bias': ...}``: the float (folded) values it was
        built from.
    batches : list of numpy arrays
        The calibration batches (the first :data:`NUM_EXAMPLES` examples are used).
    iters : int
        Adam steps per layer.
    max_rows : int
        Output positions sampled per layer.
    seed : int
        Seed of the row sampling.

    Returns
    -------
    dict
        Step name -> ``{'mse_nearest', 'mse', 'changed', 'rows'}`` (output MSE on the sampled
        rows before and after, fraction of the integers changed, rows used), or None for a
        layer with a dynamic input range; also in
        ``qnet.spec['calibration']['weight_rounding']`` with the settings.
    """
    batches = subset(batches, NUM_EXAMPLES)
    layers = {}

    def hook(k, step, block, inputs):
        if step['block'] not in LAYER_BLOCKS:
            return None
        if not block.is_static:
            layers[step['name']] = None
            return None
        rng = np.random.RandomState([seed, k])
        rows = _rows(step, [real_input(step, block, x[0]).asnumpy() for x in inputs],
                     max_rows, rng)
        vals = values[step['name']]
        w = np.asarray(vals['weight'], np.float32)
        q0 = to_numpy(block.weight)
        c = q0.shape[0]
        db, b_q = np.zeros(c), None
        if block.bias is not None:
            b_q = int32_bias(block)
            b_f = np.zeros(c) if vals['bias'] is None else np.asarray(vals['bias'], np.float64)
            db = b_q * bias_scale(step, block) - b_f
        q, (mse0, mse) = round_layer(w, q0, to_numpy(block.weight_scale), rows, db,
                                     rng, iters)
        if q is not q0:
            block.weight.set_data(mx.nd.array(q, dtype=np.int8))
            if b_q is not None:      # the same int32 bias, re-folded with the new q_w
                z = block.in_zero_point
                head = quant.bias_headroom(q, step['config']['in_dtype'], z)
                new = quant.quantize_bias(b_q.astype(np.float64), 1.0, 1.0, head)
                block.bias.set_data(mx.nd.array(quant.fold_zero_point(new, q, z) if z else
                                                new, dtype=np.int32))
        layers[step['name']] = {'mse_nearest': mse0, 'mse': mse,
                                'changed': float(np.mean(q != q0)), 'rows': rows.shape[1]}
        return None

    replay(qnet, batches, hook)
    record = {'method': 'adaround', 'iters': iters, 'max_rows': max_rows,
              'num_examples': int(sum(len(b) for b in batches)), 'layers': layers}
    qnet._spec['calibration']['weight_rounding'] = record
    return layers
