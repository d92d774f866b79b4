"""Quantized twins of ``mxnet.gluon.nn``'s convolution layers."""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet.base import numeric_types

from .. import quant
from ..arrays import to_numpy
from ._base import QuantizedLayer

__all__ = ['QuantizedConv1D', 'QuantizedConv2D', 'QuantizedConv3D']

_LAYOUTS = {1: 'NCW', 2: 'NCHW', 3: 'NCDHW'}


class _QuantizedConv(QuantizedLayer):
    """N-d convolution with int8 weights (shared by the 1-d, 2-d and 3-d layers).

    The int32 accumulator ``sum(q_x * q_w)`` is computed exactly. MXNet's
    ``contrib.quantized_conv`` cannot do that for every layer: it takes only uint8 data and
    ``num_group=1``, has no 1-d layout, and on this kind of CPU oneDNN picks kernels for some
    channel counts (4, 8, 12, 16, 20, 24, 32, ...) that saturate pairs of products to int16
    (``TestMXNetQuirks`` in tests/test_quant.py pins all of it). So the block convolves the
    integers with the float32 ``Convolution`` operator, where every partial sum is an integer
    below 2**24 and therefore exact; when the scales allow larger sums the input channels are
    split into chunks that each stay below that bound, and the chunks are added in int32. The
    fast path (``gluonq.lower``) runs the same integers through oneDNN's fused int8 kernels.
    """

    def __init__(self, channels, kernel_size, strides, padding, dilation, groups, layout,
                 in_channels=0, activation=None, use_bias=True, **kwargs):
        nd = len(kernel_size)
        if layout != _LAYOUTS[nd]:
            raise ValueError('%s supports layout %r only, got %r'
                             % (type(self).__name__, _LAYOUTS[nd], layout))
        if channels % groups or (in_channels and in_channels % groups):
            raise ValueError('%s: channels (%d) and in_channels (%d) must be divisible by '
                             'groups (%d)' % (type(self).__name__, channels, in_channels, groups))
        super().__init__(channels, use_bias, activation, **kwargs)
        self._channels = channels
        self._in_channels = in_channels
        self._kwargs = {'kernel': tuple(kernel_size), 'stride': tuple(strides),
                        'dilate': tuple(dilation), 'pad': tuple(padding),
                        'num_filter': channels, 'num_group': groups, 'layout': layout}
        with self.name_scope():
            self._make_weight_params((channels, in_channels // groups if in_channels else 0)
                                     + tuple(kernel_size))

    def _chunks(self, cin_per_group):
        """Ranges of the input channels of a group whose integer partial sums stay below
        2**24 (exact in float32); a chunk takes the same channels of every group."""
        taps = int(np.prod(self._kwargs['kernel']))
        per_chan = taps * quant.QRANGE_MAX_ABS[self._in_dtype] * 127
        if cin_per_group * per_chan < 2 ** 24:
            return [(0, cin_per_group)]
        step = max(1, (2 ** 24 - 1) // per_chan)
        return [(c, min(c + step, cin_per_group)) for c in range(0, cin_per_group, step)]

    def hybrid_forward(self, F, x, residual=None, **params):
        qt, inv_in = self._input(F, x, params)
        xf = F.cast(qt.data, 'float32')
        wf = F.cast(params['weight'], 'float32')
        kw = dict(self._kwargs, no_bias=True)
        if self.in_zero_point and any(kw['pad']):   # the padding holds a real 0: z
            xf = _pad_constant(F, xf, kw['pad'], self.in_zero_point)
            kw['pad'] = (0,) * len(kw['pad'])
        acc = None
        cg, groups = self.weight.shape[1], self._kwargs['num_group']
        for c0, c1 in self._chunks(cg):
            if c0 == 0 and c1 == cg:
                part = F.Convolution(xf, wf, **kw)
            else:                                   # channels c0:c1 of every group
                xs = [F.slice_axis(xf, axis=1, begin=g * cg + c0, end=g * cg + c1)
                      for g in range(groups)]
                part = F.Convolution(xs[0] if groups == 1 else F.concat(*xs, dim=1),
                                     F.slice_axis(wf, axis=1, begin=c0, end=c1), **kw)
            part = F.cast(part, 'int32')        # exact: an integer below 2**24
            acc = part if acc is None else F.broadcast_add(acc, part)
        return self._epilogue(F, acc, inv_in, params, residual)

    def _channel_bcast_shape(self):
        return (1, -1) + (1,) * len(self._kwargs['kernel'])

    def _check_input_shape(self, shape):
        nd = len(self._kwargs['kernel'])
        cin = self.weight.shape[1] * self._kwargs['num_group']
        if len(shape) != nd + 2 or (cin and shape[1] != cin):
            raise ValueError('%s %r: expected a %s input with %s channels, got shape %s'
                             % (type(self).__name__, self.name, self._kwargs['layout'],
                                cin or 'any', shape))

    def __repr__(self):
        s = '{name}({mapping}, kernel_size={kernel}, stride={stride}'
        nd = len(self._kwargs['kernel'])
        if self._kwargs['pad'] != (0,) * nd:
            s += ', padding={pad}'
        if self._kwargs['dilate'] != (1,) * nd:
            s += ', dilation={dilate}'
        if self._kwargs['num_group'] != 1:
            s += ', groups={num_group}'
        if self.bias is None:
            s += ', bias=False'
        if self._act_type:
            s += ', ' + self._act_type
        s += ', ' + self._quant_repr() + ')'
        shape = self.weight.shape
        return s.format(name=type(self).__name__,
                        mapping='{0} -> {1}'.format(shape[1] * self._kwargs['num_group']
                                                    if shape[1] else None, shape[0]),
                        **self._kwargs)

    @classmethod
    def from_float(cls, conv, in_range=None, out_range=None, **kwargs):
        """Quantized twin of a trained float ``nn.Conv{1,2,3}D``.

        ``in_range``/``out_range`` are the calibrated real ranges of the input and output
        (None: dynamic); the other keyword arguments are :class:`QuantizedLayer`'s.
        """
        nd = cls._ndim
        if not isinstance(conv, mx.gluon.nn.conv_layers._Conv) or conv._op_name != 'Convolution' \
                or len(conv._kwargs['kernel']) != nd:
            raise TypeError('%s.from_float needs an nn.Conv%dD, got %s'
                            % (cls.__name__, nd, type(conv).__name__))
        k = conv._kwargs
        weight = to_numpy(conv.weight)
        kwargs.setdefault('activation', conv.act._act_type if conv.act is not None else None)
        layer = cls(k['num_filter'], k['kernel'], strides=k['stride'], padding=k['pad'],
                    dilation=k['dilate'], groups=k['num_group'], layout=k['layout'],
                    in_channels=weight.shape[1] * k['num_group'],
                    use_bias=conv.bias is not None, in_range=in_range, out_range=out_range,
                    **kwargs)
        layer.initialize(ctx=conv.weight.list_ctx())
        layer.set_float_params(weight, None if conv.bias is None else conv.bias.data())
        return layer


def _pad_constant(F, x, pad, value):
    """Pad the spatial axes of an N-C-... float tensor by ``pad`` on both sides with ``value``
    (``F.pad`` takes 4-d and 5-d tensors; a 1-d layout goes through a unit axis)."""
    if len(pad) == 1:
        y = _pad_constant(F, F.expand_dims(x, axis=2), (0,) + tuple(pad), value)
        return F.squeeze(y, axis=2)
    width = (0, 0, 0, 0) + tuple(p for p in pad for _ in range(2))
    return F.pad(x, mode='constant', constant_value=float(value), pad_width=width)


def _tuple(v, n):
    return (v,) * n if isinstance(v, numeric_types) else tuple(v)


_DOC = """{nd}-d convolution with int8 weights: the quantized twin of ``nn.Conv{nd}D``.

    Takes the same arguments as ``nn.Conv{nd}D`` (``channels``, ``kernel_size``, ``strides``,
    ``padding``, ``dilation``, ``groups`` including depthwise, ``layout`` ({layout} only),
    ``activation``, ``use_bias``, ``in_channels``) plus the quantization settings of
    :class:`~gluonq.nn.QuantizedLayer` (``in_dtype``, ``in_range``, ``out_dtype``,
    ``out_range``, ``per_channel``, ``residual``).

    Parameters held: ``weight`` int8 (channels, in_channels / groups, *kernel_size) in
    [-127, 127]; ``weight_scale`` float32 (channels,) or (1,); ``bias`` int32 (channels,) at
    ``s_in * s_w`` (float32 in dynamic mode); calibrated ranges as float32 (1,) parameters.

    Inputs:
        - **data**: float32 {layout} tensor `(batch_size, in_channels, *spatial)`, or a
          :class:`~gluonq.nn.QTensor` of that shape.
        - **residual** (only with ``residual=True``): a tensor of the output's shape, added
          before the activation.

    Outputs:
        - **out**: float32 `(batch_size, channels, *out_spatial)`, or a QTensor when
          ``out_dtype`` is int8/uint8/auto; ``out_spatial`` as for ``nn.Conv{nd}D``.
    """


class QuantizedConv1D(_QuantizedConv):
    __doc__ = _DOC.format(nd=1, layout='NCW')
    _ndim = 1

    def __init__(self, channels, kernel_size, strides=1, padding=0, dilation=1, groups=1,
                 layout='NCW', activation=None, use_bias=True, in_channels=0, **kwargs):
        super().__init__(channels, _tuple(kernel_size, 1), _tuple(strides, 1),
                         _tuple(padding, 1), _tuple(dilation, 1), groups, layout,
                         in_channels, activation, use_bias, **kwargs)


class QuantizedConv2D(_QuantizedConv):
    __doc__ = _DOC.format(nd=2, layout='NCHW')
    _ndim = 2

    def __init__(self, channels, kernel_size, strides=(1, 1), padding=(0, 0),
                 dilation=(1, 1), groups=1, layout='NCHW', activation=None, use_bias=True,
                 in_channels=0, **kwargs):
        super().__init__(channels, _tuple(kernel_size, 2), _tuple(strides, 2),
                         _tuple(padding, 2), _tuple(dilation, 2), groups, layout,
                         in_channels, activation, use_bias, **kwargs)


class QuantizedConv3D(_QuantizedConv):
    __doc__ = _DOC.format(nd=3, layout='NCDHW')
    _ndim = 3

    def __init__(self, channels, kernel_size, strides=(1, 1, 1), padding=(0, 0, 0),
                 dilation=(1, 1, 1), groups=1, layout='NCDHW', activation=None,
                 use_bias=True, in_channels=0, **kwargs):
        super().__init__(channels, _tuple(kernel_size, 3), _tuple(strides, 3),
                         _tuple(padding, 3), _tuple(dilation, 3), groups, layout,
                         in_channels, activation, use_bias, **kwargs)
