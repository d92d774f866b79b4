"""An independent numpy model of gluonq's quantized layers, for the tests.

It recomputes a layer from its float32 parameters and configuration with numpy only: exact
int64 integer convolution / matrix products and float32 epilogues built from the
primitives in ``gluonq.quant`` (which are themselves checked against hand-computed values in
test_quant.py). MXNet is not used here.
"""
import numpy as np

from gluonq import quant


def layer_params(layer):
    """numpy copies of a quantized layer's parameters, keyed by short name."""
    out = {}
    for name, p in layer.params.items():
        out[name[len(layer.params.prefix):]] = p.data().asnumpy()
    return out


def input_qparams(x, dtype, in_range):
    """QParams of the layer input (static range, or dynamic from the data)."""
    if in_range is not None:
        return quant.QParams(dtype, *in_range)
    x = np.asarray(x, np.float32)
    if dtype == 'uint8':
        return quant.QParams('uint8', 0.0, max(float(x.max()), quant.EPS_RANGE))
    m = max(float(np.abs(x).max()), quant.EPS_RANGE)
    return quant.QParams('int8', -m, m)


def layer_forward(layer, x, kind, geometry=None, residual=None):
    """numpy result of ``layer(x)``: float32 array, or ``(q, QParams)`` for int8 output.

    ``kind`` is 'dense' or 'conv'; ``geometry`` holds stride/pad/dilate/groups for conv;
    ``residual`` (float32 or ``(q, QParams)``) for layers built with ``residual=True``.
    """
    p = layer_params(layer)
    in_dtype = layer.in_dtype
    qp_in = input_qparams(x, in_dtype, None if layer._in_q is None else
                          (layer._in_q.min, layer._in_q.max))
    qx = quant.quantize_np(x, qp_in)
    if kind == 'dense':
        acc = quant.dense_int_np(qx, p['weight'], flatten=layer._flatten)
        shape = (-1,)                     # units are the last axis
    else:
        g = geometry
        acc = quant.conv_int_np(qx, p['weight'], g['stride'], g['pad'], g['dilate'],
                                g['groups'])
        shape = (1, -1) + (1,) * (acc.ndim - 2)
    inv_in = quant.inv_scale_np(qp_in.min, qp_in.max, qp_in.dtype)
    inv_w = quant.weight_inv_scale_np(p['weight_scale'])
    if 'bias' in p:
        b = p['bias']
        if b.dtype != np.int32:          # dynamic layer: float bias quantized at run time
            y = (b * inv_in).astype(np.float32) * inv_w.reshape(-1)
            b = np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -2147483520.0,
                        2147483520.0).astype(np.int32)
        acc = acc + b.reshape(shape).astype(np.int64)
    assert np.abs(acc).max(initial=0) < 2 ** 31
    units = p['weight'].shape[0]
    inv_w = np.broadcast_to(inv_w.reshape(-1), (units,)).reshape(shape)
    relu = layer._act_type == 'relu'
    if layer.out_dtype == 'float32':
        y = (acc.astype(np.float32) / (inv_in * inv_w).astype(np.float32)).astype(np.float32)
        if residual is not None:
            y = y + (residual if not isinstance(residual, tuple) else
                     quant.dequantize_np(*residual))
        return np.maximum(y, 0) if relu else y
    qp_out = quant.QParams(layer.out_dtype, p['output_min'][0], p['output_max'][0])
    inv_out = quant.inv_scale_np(qp_out.min, qp_out.max, qp_out.dtype)
    m = quant.requantize_multiplier_np(inv_out, inv_in, inv_w)
    terms = [(acc, m)]
    if residual is not None:
        rq, rqp = residual
        terms.append((rq, np.float32(inv_out / quant.inv_scale_np(rqp.min, rqp.max, rqp.dtype))))
    return quant.requantize_np(terms, qp_out.dtype, relu=relu, fused_sum=True), qp_out


def error_bound(w_float, x_float, qp_in, w_scale, kind, geometry=None, bias_scale=None):
    """Bound on |layer_int8(x) - layer_float(x)| per output for in-range inputs.

    With x = x^ + dx (|dx| <= s_x / 2) and w = w^ + dw (|dw| <= s_w / 2):
    |x.w - x^.w^| <= sum |dx| |w| + sum |x^| |dw| (+ s_x s_w / 2 for the int32 bias), so
    ``0.5 * s_x * conv(1, |w|) + 0.5 * conv(|x^|, s_w) + bias rounding``, plus float32
    rounding slack.
    """
    s_x = float(qp_in.scale)
    x_hat = quant.dequantize_np(quant.quantize_np(x_float, qp_in), qp_in).astype(np.float64)
    sw = np.asarray(w_scale, np.float64).reshape(-1)
    sw_full = np.broadcast_to(sw, (w_float.shape[0],)).reshape((-1,) + (1,) * (w_float.ndim - 1))
    wabs = np.abs(w_float).astype(np.float64)
    dw = np.broadcast_to(0.5 * sw_full, w_float.shape)
    if kind == 'dense':
        xf = x_hat.reshape(x_hat.shape[0], -1)
        t1 = 0.5 * s_x * np.ones_like(xf) @ wabs.T
        t2 = np.abs(xf) @ dw.T
        shape = (1, -1)
    else:
        g = geometry
        ones = np.ones_like(x_hat)
        t1 = 0.5 * s_x * _conv_float(ones, wabs, g)
        t2 = _conv_float(np.abs(x_hat), dw, g)
        shape = (1, -1) + (1,) * (t1.ndim - 2)
    bound = t1 + t2
    if bias_scale is not None:
        bound = bound + 0.5 * np.broadcast_to(s_x * sw, (w_float.shape[0],)).reshape(shape)
    return bound * (1 + 1e-5) + 1e-6


def _conv_float(x, w, g):
    return quant.conv_np(x, w, g['stride'], g['pad'], g['dilate'], g['groups'])
