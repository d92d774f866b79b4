"""Deployment of a QuantizedNet, one module per target.

* :mod:`~gluonq.deploy.lower` -- the fast path: one MXNet graph of oneDNN's fused int8
  kernels fed with gluonq's integers (``lower(qnet)`` -> ``LoweredNet``);
* :mod:`~gluonq.deploy.mxnet_export` -- files for stock MXNet (``export_fast``, the
  deprecated ``export_compact``), and the fast path of ``QuantizedNet.hybridize()`` /
  ``QuantizedNet.export()``, registered with it at import;
* :mod:`~gluonq.deploy.onnx` -- QDQ ONNX for onnxruntime (``export_onnx``);
* :mod:`~gluonq.deploy.openvino` -- OpenVINO IR from that QDQ model (``export_openvino``).

The lowering and the ONNX export are a small context object plus one handler per step kind
(block class name), found in a registry (``HANDLERS``): a new step kind is one new handler.
"""
from . import lower, mxnet_export, onnx, openvino
from .mxnet_export import export_compact, export_fast
from .onnx import ONNXExportError, export_onnx
from .openvino import export_openvino

__all__ = ['lower', 'mxnet_export', 'onnx', 'openvino', 'export_fast', 'export_compact',
           'export_onnx', 'ONNXExportError', 'export_openvino']
