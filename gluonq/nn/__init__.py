"""Quantized Gluon blocks: int8 parameters, MXNet int8 operators, float in and out by default.

Layers with weights (:class:`QuantizedDense`, :class:`QuantizedConv2D`, ...) mirror their
``mxnet.gluon.nn`` twins and take float input and return float output unless told otherwise;
the ops between int8 layers (activation, pooling, flatten, add, concat) take and return
:class:`QTensor` (int8/uint8 data with its range). :class:`Quantize` and :class:`Dequantize`
mark where a network enters and leaves int8.
"""
from ._base import IntParameter, QTensor, QuantizedBlock, QuantizedLayer, as_qtensor
from .basic_layers import (Dequantize, Quantize, QuantizedActivation, QuantizedDense,
                           QuantizedFlatten)
from .conv_layers import QuantizedConv1D, QuantizedConv2D, QuantizedConv3D
from .matmul import QuantizedMatMul
from .merge import QuantizedAdd, QuantizedConcat
from .pooling import (QuantizedAvgPool2D, QuantizedGlobalAvgPool2D, QuantizedGlobalMaxPool2D,
                      QuantizedMaxPool2D, QuantizedPooling)
from .shape_ops import QuantizedShapeOp
