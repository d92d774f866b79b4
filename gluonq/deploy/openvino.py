"""OpenVINO export of a QuantizedNet: an IR (``.xml`` + ``.bin``) that runs in int8.

OpenVINO reads QDQ ONNX directly: ``export_openvino(qnet, path)`` builds gluonq's QDQ model
laid out for OpenVINO (:func:`gluonq.onnx.to_onnx` with ``target='openvino'``: int8
weights, strided 1x1 convolutions on a subsampled input), converts it with
``openvino.convert_model`` and writes it with ``openvino.save_model(...,
compress_to_fp16=False)``, so that the int8 weights stay int8 and
the float32 scales stay float32 in the ``.bin``. OpenVINO turns each
``QuantizeLinear/DequantizeLinear`` pair into a ``FakeQuantize`` and fuses it into int8
convolutions; its runtime model (``compiled_model.get_runtime_model()``, each op's
``layerType`` and ``runtimePrecision``) shows what ran in int8.

How its results relate to gluonq's integers: the weights are gluonq's int8 integers and the
activation scales gluonq's, but OpenVINO re-derives the requantize step from the
``FakeQuantize`` ranges in its own float arithmetic (and may run a few layers in bf16 on CPUs
that have it), so an 8-bit result can differ by a step where gluonq's value lies near a
rounding boundary; the tests bound the difference by the output scales and count how many
values differ. The IR needs only OpenVINO to run, not gluonq or MXNet.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

from ..atomic import atomic_outputs
from .onnx import to_onnx

__all__ = ['to_openvino', 'export_openvino', 'runtime_precisions']


def _ov():
    try:
        import openvino
    except ImportError:
        raise ImportError('export_openvino needs OpenVINO: pip install "gluonq[openvino]"') \
            from None
    return openvino


def to_openvino(qnet, input_shape=None, calib_data=None, calib_mode=None, dynamic_batch=True):
    """The ``openvino.Model`` of ``qnet`` (see :func:`export_openvino` for the arguments)."""
    ov = _ov()
    model = to_onnx(qnet, input_shape, dynamic_batch=dynamic_batch, calib_data=calib_data,
                    calib_mode=calib_mode, weight_dtype='int8', target='openvino')
    folder = tempfile.mkdtemp(prefix='gluonq-ov-')
    try:                   # convert_model reads ONNX from a file, not from a ModelProto
        onnx_path = os.path.join(folder, 'model.onnx')
        with open(onnx_path, 'wb') as f:
            f.write(model.SerializeToString())
        ov_model = ov.convert_model(onnx_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ov_model


#: an op name OpenVINO made from a process-wide counter (``Constant_8070``)
_COUNTER_NAME = re.compile(r'(<layer id="(\d+)" name=")([A-Za-z]+)_\d+(")')


def _stable_names(xml_text):
    """The IR's counter-made op names replaced by their layer ids, so that the same network
    gives the same bytes in any process (OpenVINO numbers the ops it creates globally)."""
    return _COUNTER_NAME.sub(lambda m: '%s%s_gq%s%s' % (m.group(1), m.group(3), m.group(2),
                                                        m.group(4)), xml_text)


def export_openvino(qnet, path, input_shape=None, overwrite=False, calib_data=None,
                    calib_mode=None, dynamic_batch=True):
    """Write ``qnet`` as an OpenVINO IR: ``path`` (``.xml``) and the ``.bin`` beside it.

    Parameters
    ----------
    qnet : QuantizedNet
        A calibrated network (``gluonq.quantize_net`` or ``gluonq.load_quantized``).
    path : str
        The ``.xml`` file; the weights go to the same name with ``.bin``. Both are written
        atomically: a failed export leaves neither.
    input_shape : tuple, optional
        Shape of the input (batch first); default: the shape the network was traced with.
    overwrite : bool
        Replace existing files.
    calib_data, calib_mode :
        As for :func:`gluonq.export_onnx` (ranges of conv results before residual adds).
    dynamic_batch : bool
        Leave the batch dimension dynamic.

    Returns
    -------
    (str, str) : the ``.xml`` and ``.bin`` paths.
    """
    if not str(path).endswith('.xml'):
        raise ValueError('export_openvino writes an OpenVINO IR: path must end in .xml, '
                         'got %r' % (path,))
    ov = _ov()
    xml_path = os.path.abspath(path)
    bin_path = xml_path[:-len('.xml')] + '.bin'
    with atomic_outputs([xml_path, bin_path], overwrite) as (tmp_xml, tmp_bin):
        model = to_openvino(qnet, input_shape, calib_data, calib_mode, dynamic_batch)
        folder = tempfile.mkdtemp(prefix='.gluonq-ov-', dir=os.path.dirname(xml_path))
        try:
            ov.save_model(model, os.path.join(folder, 'model.xml'), compress_to_fp16=False)
            with open(os.path.join(folder, 'model.xml')) as f:
                xml_text = _stable_names(f.read())
            with open(tmp_xml, 'w') as f:
                f.write(xml_text)
            os.replace(os.path.join(folder, 'model.bin'), tmp_bin)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return xml_path, bin_path


def runtime_precisions(compiled_model):
    """``{(layerType, runtimePrecision): count}`` of a compiled OpenVINO model: which layers
    run in int8 (``u8``/``i8``) and which in float."""
    counts = {}
    for op in compiled_model.get_runtime_model().get_ops():
        info = op.get_rt_info()
        key = (str(info['layerType'].astype(str)), str(info['runtimePrecision'].astype(str)))
        counts[key] = counts.get(key, 0) + 1
    return counts
