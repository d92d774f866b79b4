"""``quantize_dynamic``: int8 weights offline, activation ranges from each batch, no
calibration data -- PyTorch's ``quantize_dynamic`` for MXNet Gluon networks.

The dense layers (``FullyConnected``, ``flatten`` either way) and the matrix products of two
activations (``batch_dot``, 2-d ``dot``, ``linalg_gemm2``) become gluonq blocks in dynamic
mode: each quantizes its float input(s) per tensor with the range of that tensor in the
current batch (``max|x|``, or ``max x`` for an input that cannot be negative), accumulates in
int32 and returns float32; a dense bias is quantized at the run-time scale. A fused ReLU,
residual add or scalar factor (``/ sqrt(d)`` after ``q k^T``) stays part of the unit.
Everything else runs in float. The result depends on the batch an example comes with (its
ranges are the batch's), as PyTorch's dynamic quantization does.

Recurrent layers (``rnn.LSTM``/``GRU``, MXNet's fused ``RNN`` operator) stay float.
MXNet 1.9.1's ``_contrib_quantized_rnn`` cannot be used exactly: it runs LSTM only, takes
its input as asymmetric uint8 (a scale and a shift, where gluonq's arithmetic is
symmetric), keeps the hidden and cell states in float32 and quantizes the recurrent input
inside oneDNN's kernel, so there is no integer tensor gluonq could reproduce or check.
"""
from __future__ import annotations

import mxnet as mx

from .. import __version__
from .convert import _build_spec, _set_values, trace_and_fold
from .plan import Unit, check_exclude, make_plan
from .qnet import QuantizedNet

__all__ = ['quantize_dynamic']

#: unit kinds that run in int8 with dynamic ranges
DYNAMIC_KINDS = ('dense', 'matmul')
_RNN_REASON = ("MXNet's _contrib_quantized_rnn (LSTM only) takes asymmetric uint8 input "
               'and quantizes the recurrent state inside oneDNN, which gluonq cannot '
               'reproduce exactly')
#: producers whose output is never negative: a dynamic input they feed is uint8
_NONNEGATIVE = {'relu': None, 'sigmoid': None, 'softmax': None, 'SoftmaxActivation': None,
                'Activation': ('relu', 'sigmoid', 'softrelu')}


def _nonnegative(graph, edge):
    node = graph.nodes[edge[0]]
    if node.is_var or node.op not in _NONNEGATIVE:
        if not node.is_var and node.op == 'clip':
            return float(node.attr('a_min', '-1')) >= 0
        return False
    acts = _NONNEGATIVE[node.op]
    return acts is None or node.attr('act_type') in acts


def _float_units(graph, u, reason):
    out = []
    for n in [u.node] + u.fused:
        fu = Unit('float', n, [e for e in n.inputs if e[0] not in graph.params], reason)
        fu.in_q = [False] * len(fu.inputs)
        out.append(fu)
    return out


def _dynamic_units(graph, units, act_dtype):
    """Dense and matmul units with float inputs and outputs; everything else float."""
    out = []
    for u in units:
        if u.kind not in DYNAMIC_KINDS:
            if u.kind == 'float' and u.node.op == 'RNN':
                reason = _RNN_REASON
            elif u.kind == 'float':
                reason = u.reason
            else:
                reason = 'dynamic quantization covers dense layers and matrix products only'
            out.extend(_float_units(graph, u, reason))
            continue
        clip = None
        if isinstance(u.act, tuple):           # clip(0, a) is not fused into float output
            clip = u.fused.pop()
            u.output = (u.fused[-1].name, 0) if u.fused else (u.node.name, 0)
            u.act = None
        u.in_q = [False] * len(u.inputs)
        u.out_q = False
        u.dynamic_dtypes = ['uint8' if act_dtype == 'uint8' or (
            act_dtype == 'auto' and _nonnegative(graph, e)) else 'int8' for e in u.inputs]
        out.append(u)
        if clip is not None:
            cu = Unit('float', clip, [u.output], 'clip after a layer with float output')
            cu.in_q = [False]
            out.append(cu)
    return out


def quantize_dynamic(net, input_shape, per_channel=True, act_dtype='auto', exclude=None):
    """Quantize the dense layers and matrix products of ``net`` with dynamic ranges.

    No calibration data: weights become int8 here; each activation is quantized with the
    range of the tensor in the current batch (see the module docstring).

    Parameters
    ----------
    net : HybridBlock
        The trained float network.
    input_shape : tuple
        Shape of one input batch (the batch size itself is free).
    per_channel : bool
        Per-output-channel weight scales (default) or one per tensor.
    act_dtype : {'auto', 'int8', 'uint8'}
        Integer type of the activations: 'auto' is uint8 for inputs that cannot be negative
        (after ReLU, sigmoid, softmax, ``clip(0, a)``), else int8.
    exclude : list of str, optional
        Node names or glob patterns that stay float.

    Returns
    -------
    QuantizedNet
        ``qnet.report`` marks the dynamic units ``int8 dense (dynamic ranges) -> float32``.
        It runs eager, hybridized (the fast path runs these units as gluonq's reference
        chain) and through :func:`gluonq.export_fast`; ONNX export needs static ranges.
    """
    if act_dtype not in ('auto', 'int8', 'uint8'):
        raise ValueError("act_dtype must be 'auto', 'int8' or 'uint8', got %r" % (act_dtype,))
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) < 2 or any(d <= 0 for d in input_shape):
        raise ValueError('quantize_dynamic: input_shape must be (batch, ...) with positive '
                         'sizes, got %s' % (input_shape,))
    exclude = list(exclude or [])
    graph = trace_and_fold(net, (1,) + input_shape[1:])
    check_exclude(graph, exclude)
    units = _dynamic_units(graph, make_plan(graph, exclude), act_dtype)
    spec, values = _build_spec(graph, units, {}, per_channel, act_dtype)
    spec['preadd_ranges'], spec['float_result_ranges'] = {}, {}
    spec['calibration'] = {'mode': 'dynamic', 'options': {}, 'num_examples': 0,
                           'num_batches': 0, 'per_channel': bool(per_channel),
                           'act_dtype': act_dtype, 'exclude': exclude, 'warnings': []}
    spec['versions'] = {'gluonq': __version__, 'mxnet': mx.__version__}
    qnet = QuantizedNet(spec)
    _set_values(qnet, values)
    return qnet
