"""gluonq: real int8 inference for MXNet Gluon networks.

* :mod:`gluonq.nn` -- quantized blocks with int8 parameters (QuantizedDense, QuantizedConv2D, ...)
* :func:`quantize_net` -- calibrate and convert a float network
* :func:`quantize_dynamic` -- int8 dense layers and matmuls with ranges from each batch
* :func:`save_quantized` / :func:`load_quantized` -- int8 checkpoints
* :mod:`gluonq.deploy` -- deployment, one module per target (the next three functions)
* :func:`export_fast` -- deployment files for stock MXNet (:func:`export_compact`: deprecated)
* :func:`export_onnx` -- QDQ ONNX for onnxruntime (needs ``pip install gluonq[onnx]``)
* :func:`export_openvino` -- OpenVINO IR, int8 (needs ``pip install gluonq[openvino]``)
* :func:`import_onnx` -- a float ONNX model as a Gluon SymbolBlock (needs ``gluonq[onnx]``)
* :mod:`gluonq.debug` -- layer-by-layer comparison with the float network
"""
__version__ = '0.1.0'

from . import init, nn, quant                       # noqa: E402
from .convert import QuantizedNet, quantize_dynamic, quantize_net  # noqa: E402
from .checkpoint import load_quantized, save_quantized            # noqa: E402
from .deploy import (ONNXExportError, export_compact, export_fast, export_onnx,  # noqa: E402
                     export_openvino)
from . import export, lower, onnx, openvino  # noqa: E402,F401  (compatibility modules)
from .onnx_import import ONNXImportError, import_onnx      # noqa: E402
