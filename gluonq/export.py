"""Compatibility module: checkpoints live in :mod:`gluonq.checkpoint`, the MXNet exports in
:mod:`gluonq.deploy.mxnet_export`, the atomic writers in :mod:`gluonq.atomic`."""
from .atomic import atomic_outputs
from .checkpoint import FORMAT, CheckpointError, load_quantized, save_quantized
from .deploy.mxnet_export import export_compact, export_fast

__all__ = ['save_quantized', 'load_quantized', 'export_compact', 'export_fast',
           'atomic_outputs', 'CheckpointError', 'FORMAT']
