"""Compatibility module: the code lives in :mod:`gluonq.deploy.lower`."""
from .deploy.lower import *  # noqa: F401,F403
from .deploy.lower import __all__  # noqa: F401
