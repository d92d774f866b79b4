"""Float network -> int8 network: tracing, BatchNorm folding, planning and building."""
from .convert import quantize_net, trace_and_fold
from .dynamic import quantize_dynamic
from .qnet import FloatOp, QuantizedNet
