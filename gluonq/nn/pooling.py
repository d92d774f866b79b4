"""Quantized pooling: the int8 twins of ``nn.MaxPool2D``, ``nn.AvgPool2D`` and the global
poolings. They take and return a :class:`~gluonq.nn.QTensor` whose range passes through."""
from __future__ import annotations

from mxnet.base import numeric_types

from ._base import QTensor, QuantizedBlock, as_qtensor

__all__ = ['QuantizedMaxPool2D', 'QuantizedAvgPool2D', 'QuantizedGlobalMaxPool2D',
           'QuantizedGlobalAvgPool2D', 'QuantizedPooling']


class QuantizedPooling(QuantizedBlock):
    """2-d pooling on int8/uint8 data with MXNet's ``contrib.quantized_pooling``.

    Max pooling is exact; average pooling divides the integer sum in float32 and rounds half
    to even. With ``count_include_pad=True`` MXNet's int8 kernel divides every window by the
    full kernel size, also the windows that ``ceil_mode`` lets run past the padded input
    (float ``Pooling`` divides those by the clipped size).

    Inputs:
        - **data**: QTensor of shape `(batch_size, channels, height, width)`.

    Outputs:
        - **out**: QTensor `(batch_size, channels, out_height, out_width)`, same dtype and
          range as the input.
    """

    def __init__(self, pool_size, strides, padding, ceil_mode, global_pool, pool_type,
                 count_include_pad=None, layout='NCHW', **kwargs):
        super().__init__(**kwargs)
        if layout != 'NCHW':
            raise ValueError('%s supports layout NCHW only, got %r' % (type(self).__name__,
                                                                      layout))
        pool_size = (pool_size,) * 2 if isinstance(pool_size, numeric_types) else pool_size
        strides = pool_size if strides is None else strides
        strides = (strides,) * 2 if isinstance(strides, numeric_types) else strides
        padding = (padding,) * 2 if isinstance(padding, numeric_types) else padding
        self._kwargs = {'kernel': tuple(pool_size), 'stride': tuple(strides),
                        'pad': tuple(padding), 'global_pool': global_pool,
                        'pool_type': pool_type,
                        'pooling_convention': 'full' if ceil_mode else 'valid'}
        if count_include_pad is not None:
            self._kwargs['count_include_pad'] = count_include_pad

    def hybrid_forward(self, F, x):
        qt = as_qtensor(x)
        if qt is None:
            raise self._type_error('expected a QTensor (quantize float data with '
                                   'gluonq.nn.Quantize first)')
        return QTensor(*F.contrib.quantized_pooling(qt.data, qt.min, qt.max, **self._kwargs))

    def __repr__(self):
        k = self._kwargs
        if k['global_pool']:
            return '%s(global, %s)' % (type(self).__name__, k['pool_type'])
        return '{}(size={}, stride={}, padding={}, ceil_mode={})'.format(
            type(self).__name__, k['kernel'], k['stride'], k['pad'],
            k['pooling_convention'] == 'full')


class QuantizedMaxPool2D(QuantizedPooling):
    """Quantized twin of ``nn.MaxPool2D`` (same arguments)."""

    def __init__(self, pool_size=(2, 2), strides=None, padding=0, layout='NCHW',
                 ceil_mode=False, **kwargs):
        super().__init__(pool_size, strides, padding, ceil_mode, False, 'max', layout=layout,
                         **kwargs)


class QuantizedAvgPool2D(QuantizedPooling):
    """Quantized twin of ``nn.AvgPool2D`` (same arguments)."""

    def __init__(self, pool_size=(2, 2), strides=None, padding=0, ceil_mode=False,
                 layout='NCHW', count_include_pad=True, **kwargs):
        super().__init__(pool_size, strides, padding, ceil_mode, False, 'avg',
                         count_include_pad, layout=layout, **kwargs)


class QuantizedGlobalMaxPool2D(QuantizedPooling):
    """Quantized twin of ``nn.GlobalMaxPool2D``."""

    def __init__(self, layout='NCHW', **kwargs):
        super().__init__((1, 1), None, 0, True, True, 'max', layout=layout, **kwargs)


class QuantizedGlobalAvgPool2D(QuantizedPooling):
    """Quantized twin of ``nn.GlobalAvgPool2D``."""

    def __init__(self, layout='NCHW', **kwargs):
        super().__init__((1, 1), None, 0, True, True, 'avg', layout=layout, **kwargs)
