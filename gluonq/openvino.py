"""Compatibility module: the code lives in :mod:`gluonq.deploy.openvino`."""
from .deploy.openvino import *  # noqa: F401,F403
from .deploy.openvino import __all__  # noqa: F401
