"""Compatibility module: the code lives in :mod:`gluonq.deploy.onnx`."""
from .deploy.onnx import *  # noqa: F401,F403
from .deploy.onnx import __all__  # noqa: F401
