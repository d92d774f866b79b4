"""gluonq: real int8 inference for MXNet Gluon networks."""
__version__ = '0.1.0'
