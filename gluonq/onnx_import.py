"""Import of float ONNX models as Gluon ``SymbolBlock`` s (needs ``pip install gluonq[onnx]``).

``import_onnx(path, input_shape)`` parses the model with the ``onnx`` package and builds one
MXNet symbol for it:

* **Constant folding.** A node whose inputs are all constants (initializers, ``Constant``
  nodes, results of earlier folding) is evaluated once with ONNX's own numpy reference
  implementation (``onnx.reference``); ``Shape`` of a tensor is its shape for the given input
  shape. So the shape arithmetic that exporters write (``Shape -> Gather/Slice -> Cast ->
  Concat -> Reshape``), reshaped biases and ``Constant`` weights become plain values before
  any MXNet op is emitted.
* **One small handler per op kind** (:data:`_HANDLERS`, the reverse of MXNet's
  ``mx2onnx`` table) translates every other node into MXNet ops that gluonq's converter
  knows: ``Conv`` -> ``Convolution`` (its bias included), ``ConvTranspose`` ->
  ``Deconvolution``, ``MatMul``/``Gemm`` with a constant weight -> ``FullyConnected``,
  ``BatchNormalization`` -> ``BatchNorm``, ``Relu``/``Sigmoid`` -> ``Activation``,
  ``Clip`` -> ``clip`` (``Clip(0, inf)`` -> ``Activation(relu)``), ``HardSigmoid`` ->
  ``hard_sigmoid``, ``HardSwish`` -> ``x * hard_sigmoid(x)``, pooling -> ``Pooling``,
  nearest ``Resize`` by an integer factor -> ``UpSampling``, ``MatMul`` of two tensors ->
  ``dot``/``batch_dot``, arithmetic with a scalar constant -> ``_plus_scalar``,
  ``_mul_scalar``, ..., with a tensor constant or between tensors -> ``broadcast_*``.
  :data:`SUPPORTED_OPS` lists them.
* **Biases.** With ``fuse_bias=True`` (default) an ``Add`` of a per-output-channel (or
  scalar) constant right after a ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` whose result
  nothing else reads becomes that layer's bias, as the exporters of PaddlePaddle and
  TensorFlow meant it (they write a bias as ``Conv -> Add(initializer)``).
* **Batch size.** The network is built for the spatial shape of ``input_shape``. Its batch
  size stays free (``batch_free=True``): the shapes are folded at two batch sizes, and a
  reshape target entry that follows the batch becomes MXNet's ``0`` (copy) or ``-1``
  (infer). A folded value that depends on the batch anywhere else is an error unless
  ``batch_free=False`` (then the network takes exactly ``input_shape``).

Parameters are float32 and named after the ONNX tensors they come from (initializers,
``Constant`` outputs, or the tensor a folded reshape/transpose copied), sanitized to
``[A-Za-z0-9_]`` and made unique; op nodes are named after their ONNX nodes. Every problem
(an unsupported op or attribute, a value that must be constant and is not, a missing or
invalid file) raises :class:`ONNXImportError` naming the node, its op type and what was
expected.
"""
import os
import re
from typing import NamedTuple

import numpy as np

__all__ = ['import_onnx', 'ImportedONNX', 'ONNXImportError', 'SUPPORTED_OPS']

_F32_MAX = float(np.finfo(np.float32).max)


class ONNXImportError(ValueError):
    """An ONNX model (or one of its nodes) that :func:`import_onnx` cannot translate."""


class ImportedONNX(NamedTuple):
    """What :func:`import_onnx` returns (a named tuple: ``net, name, shape, meta = ...``).

    Attributes
    ----------
    net : mxnet.gluon.SymbolBlock
        The float network, parameters initialized on the CPU.
    input_name : str
        Name of its input variable (the ONNX input name, sanitized).
    input_shape : tuple of int
        The shape the network was built for (the batch entry is free unless
        ``batch_free=False``).
    metadata : dict
        The model's ``metadata_props`` (for example the recognizer's ``character`` list).
    """
    net: object
    input_name: str
    input_shape: tuple
    metadata: dict


def _sanitize(name):
    return re.sub(r'[^A-Za-z0-9_]', '_', name) or 'node'


def _node_label(node):
    return '%r (%s)' % (node.name or node.output[0], node.op_type)


class _Layer:
    """A Convolution/Deconvolution/FullyConnected just emitted, which an Add may still give a
    bias: ``build(bias_var)`` makes its symbol again with that bias."""
    __slots__ = ('build', 'channels', 'spatial', 'bias', 'bias_key')

    def __init__(self, build, channels, spatial, bias, bias_key):
        self.build, self.channels, self.spatial = build, channels, spatial
        self.bias, self.bias_key = bias, bias_key


class _Importer:
    """State of one import: constants, emitted symbols, parameters, shapes."""

    def __init__(self, model, input_shape, batch_free, fuse_bias):
        import mxnet as mx
        self.mx = mx
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
                          None)
        if self.opset is None:
            raise ONNXImportError('the model imports no version of the default ONNX domain')
        self.fuse_bias = fuse_bias
        self.consts = {}          # tensor name -> numpy value at the given input shape
        self.alt = {}             # tensor name -> value at the other batch size (if it differs)
        self.syms = {}            # tensor name -> MXNet symbol
        self.origin = {}          # folded tensor name -> tensor name its data was copied from
        self.layers = {}          # tensor name -> _Layer
        self.params = {}          # MXNet parameter name -> float32 value
        self.param_vars = {}      # (tensor name, transform) -> MXNet variable
        self.used = set()
        self.users = {}
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.users[i] = self.users.get(i, 0) + 1
        for o in self.graph.output:
            self.users[o.name] = self.users.get(o.name, 0) + 1
        self._shape_cache = {}
        self._set_input(input_shape, batch_free)

    # -- inputs, names, errors --------------------------------------------------------------
    def _set_input(self, input_shape, batch_free):
        from onnx import numpy_helper
        for init in self.graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ONNXImportError('import_onnx takes models with one input; this one has %d: %s'
                                  % (len(inputs), [i.name for i in inputs]))
        inp = inputs[0]
        dims = [d.dim_value if d.HasField('dim_value') and d.dim_value > 0 else None
                for d in inp.type.tensor_type.shape.dim]
        if input_shape is None:
            if dims and dims[0] is None:
                dims[0] = 1
            if not dims or any(d is None for d in dims):
                raise ONNXImportError(
                    'input %r has the free dimensions %s: pass input_shape=(N, ...)'
                    % (inp.name, [d.dim_param or d.dim_value
                                  for d in inp.type.tensor_type.shape.dim]))
            input_shape = tuple(dims)
        input_shape = tuple(int(d) for d in input_shape)
        if dims and (len(dims) != len(input_shape) or
                     any(d is not None and d != s for d, s in zip(dims, input_shape))):
            raise ONNXImportError('input_shape %s does not fit input %r of shape %s'
                                  % (input_shape, inp.name, dims))
        if not input_shape or min(input_shape) < 1:
            raise ONNXImportError('input_shape must be positive integers, got %s'
                                  % (input_shape,))
        self.onnx_input = inp.name
        self.input_name = self.unique(inp.name)
        self.input_shape = input_shape
        self.alt_shape = (input_shape[0] + 1,) + input_shape[1:] if batch_free else None
        self.syms[inp.name] = self.mx.sym.var(self.input_name, dtype='float32')

    def unique(self, name):
        base = _sanitize(name)
        name, k = base, 1
        while name in self.used:
            name, k = '%s_%d' % (base, k), k + 1
        self.used.add(name)
        return name

    def op_name(self, node, suffix=''):
        return self.unique((node.name or node.output[0]) + suffix)

    @staticmethod
    def error(node, what):
        return ONNXImportError('node %s: %s' % (_node_label(node), what))

    # -- values -----------------------------------------------------------------------------
    def is_const(self, name):
        return name in self.consts

    def const(self, node, pos, what, batch_ok=False):
        """The constant value at input ``pos`` (None if the input is absent)."""
        if pos >= len(node.input) or not node.input[pos]:
            return None
        name = node.input[pos]
        if name not in self.consts:
            raise self.error(node, 'its %s (input %d, %r) must be a constant (an initializer '
                             'or computed from constants and shapes), but it is computed from '
                             'the network input' % (what, pos, name))
        if name in self.alt and not batch_ok:
            raise self.error(node, 'its %s (input %d, %r) depends on the batch size; import '
                             'with batch_free=False to build the network for batch %d only'
                             % (what, pos, name, self.input_shape[0]))
        return self.consts[name]

    def attr(self, node, name, default=None):
        from onnx import helper
        for a in node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def tensor(self, node, pos):
        """The MXNet symbol of input ``pos``: an activation, or a constant as a parameter."""
        name = node.input[pos]
        if name in self.syms:
            return self.syms[name]
        if name in self.consts:
            self.const(node, pos, 'operand')               # refuses batch-dependent values
            return self.param(name, self.consts[name])
        raise self.error(node, 'input %r is produced by no earlier node (the graph must be '
                         'topologically sorted)' % name)

    def param(self, key, value, transform=''):
        """A float32 parameter variable holding ``value``, named after tensor ``key``."""
        if (key, transform) not in self.param_vars:
            value = np.ascontiguousarray(value, dtype=np.float32)
            name = self.unique(self.origin.get(key, key))
            self.params[name] = value
            self.param_vars[(key, transform)] = self.mx.sym.var(name, shape=value.shape,
                                                                dtype='float32')
        return self.param_vars[(key, transform)]

    def shape(self, name, alt=False):
        """Shape of activation ``name`` at the input shape (or at the other batch size)."""
        key = (name, alt)
        if key not in self._shape_cache:
            shp = self.alt_shape if alt else self.input_shape
            _, out, _ = self.syms[name].infer_shape(**{self.input_name: shp})
            self._shape_cache[key] = tuple(out[0])
        return self._shape_cache[key]

    def batch_axes(self, name):
        """Axes of activation ``name`` whose size follows the batch size."""
        if self.alt_shape is None:
            return set()
        a, b = self.shape(name), self.shape(name, alt=True)
        return {i for i in range(len(a)) if a[i] != b[i]}

    # -- the pass -----------------------------------------------------------------------------
    def run(self):
        for node in self.graph.node:
            if node.domain not in ('', 'ai.onnx'):
                raise self.error(node, 'op domain %r is not supported (only the default ONNX '
                                 'domain)' % node.domain)
            present = [i for i in node.input if i]
            if node.op_type == 'Constant':
                self._fold_constant(node)
            elif node.op_type == 'Shape' and present and present[0] in self.syms:
                self._fold_shape(node)
            elif all(i in self.consts for i in present) and node.op_type not in _NEVER_FOLD:
                self._fold(node)
            else:
                handler = _HANDLERS.get(node.op_type)
                if handler is None:
                    computed = [i for i in present if i not in self.consts]
                    raise self.error(node, 'op %s is not supported on tensors computed from '
                                     'the network input (input %r is); it is only evaluated '
                                     'when all its inputs are constants. Supported ops: %s'
                                     % (node.op_type, computed[0] if computed else '',
                                        ', '.join(SUPPORTED_OPS)))
                outs = handler(self, node)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                for name, sym in zip(node.output, outs):
                    self.syms[name] = sym
                for extra in node.output[len(outs):]:
                    if extra and self.users.get(extra):
                        raise self.error(node, 'its output %r is used, but only the first '
                                         'output is supported' % extra)
        outs = []
        for o in self.graph.output:
            if o.name not in self.syms:
                raise ONNXImportError('graph output %r is a constant or is never computed'
                                      % o.name)
            outs.append(self.syms[o.name])
        return outs[0] if len(outs) == 1 else self.mx.sym.Group(outs)

    def _fold_constant(self, node):
        from onnx import numpy_helper
        for a in node.attribute:
            if a.name == 'value':
                value = numpy_helper.to_array(a.t)
            elif a.name in ('value_float', 'value_int'):
                value = np.array(a.f if a.name == 'value_float' else a.i,
                                 np.float32 if a.name == 'value_float' else np.int64)
            elif a.name in ('value_floats', 'value_ints'):
                value = np.array(list(a.floats) if a.name == 'value_floats' else list(a.ints),
                                 np.float32 if a.name == 'value_floats' else np.int64)
            else:
                raise self.error(node, 'Constant attribute %r is not supported' % a.name)
            self.consts[node.output[0]] = value
            return
        raise self.error(node, 'Constant without a value')

    def _fold_shape(self, node):
        start, end = self.attr(node, 'start', 0), self.attr(node, 'end', None)
        src = node.input[0]
        self.consts[node.output[0]] = np.array(self.shape(src)[start:end], np.int64)
        if self.alt_shape is not None:
            alt = np.array(self.shape(src, alt=True)[start:end], np.int64)
            if not np.array_equal(alt, self.consts[node.output[0]]):
                self.alt[node.output[0]] = alt

    def _fold(self, node):
        from onnx.reference import ReferenceEvaluator
        names = list(node.input)
        feeds = {n: self.consts[n] for n in names if n}
        try:
            ref = ReferenceEvaluator(node, opsets={'': self.opset})
            outs = ref.run(None, feeds)
            alt_outs = None
            if any(n in self.alt for n in names):
                alt_outs = ref.run(None, {n: self.alt.get(n, v) for n, v in feeds.items()})
        except Exception as e:              # onnx raises many types here
            raise self.error(node, 'constant folding failed: %s: %s'
                             % (type(e).__name__, e)) from e
        for i, name in enumerate(node.output):
            if not name:
                continue
            self.consts[name] = np.asarray(outs[i])
            if alt_outs is not None and not np.array_equal(alt_outs[i], outs[i]):
                self.alt[name] = np.asarray(alt_outs[i])
            if node.op_type in _COPY_OPS and names and names[0]:
                self.origin[name] = self.origin.get(names[0], names[0])


#: ops never evaluated at import time even on constant inputs
_NEVER_FOLD = frozenset(['RandomNormal', 'RandomUniform', 'RandomNormalLike',
                         'RandomUniformLike', 'Multinomial', 'Bernoulli'])
#: ops whose folded output is a copy of input 0's data (it keeps that tensor's name)
_COPY_OPS = frozenset(['Reshape', 'Transpose', 'Squeeze', 'Unsqueeze', 'Flatten', 'Identity',
                       'Cast'])


# -- helpers shared by handlers ---------------------------------------------------------------
def _ints(ctx, node, name, default):
    v = ctx.attr(node, name, None)
    return tuple(int(x) for x in v) if v is not None else default


def _norm_axis(axis, ndim):
    return axis + ndim if axis < 0 else axis


def _spatial_pads(ctx, node, kernel, strides, dilations):
    """(begin, end) pads per spatial axis, from ``pads`` or ``auto_pad``."""
    k = len(kernel)
    auto = ctx.attr(node, 'auto_pad', 'NOTSET')
    if auto in ('NOTSET', ''):
        pads = _ints(ctx, node, 'pads', (0,) * (2 * k))
        return pads[:k], pads[k:]
    if auto == 'VALID':
        return (0,) * k, (0,) * k
    if auto not in ('SAME_UPPER', 'SAME_LOWER'):
        raise ctx.error(node, 'auto_pad %r is not supported' % auto)
    spatial = ctx.shape(node.input[0])[2:]
    begin, end = [], []
    for size, kk, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (kk - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == 'SAME_UPPER' else big)
        end.append(big if auto == 'SAME_UPPER' else small)
    return tuple(begin), tuple(end)


def _window(ctx, node, kernel):
    k = len(kernel)
    strides = _ints(ctx, node, 'strides', (1,) * k)
    dilations = _ints(ctx, node, 'dilations', (1,) * k)
    begin, end = _spatial_pads(ctx, node, kernel, strides, dilations)
    return strides, dilations, begin, end


def _pad_explicitly(ctx, node, x, begin, end):
    """``x`` zero-padded by ``begin``/``end`` on its spatial axes (for asymmetric pads)."""
    if len(begin) not in (2, 3):
        raise ctx.error(node, 'asymmetric pads %s/%s are supported on 2-d and 3-d inputs only'
                        % (begin, end))
    width = (0, 0, 0, 0) + tuple(v for be in zip(begin, end) for v in be)
    return ctx.mx.sym.pad(x, mode='constant', pad_width=width, constant_value=0.0,
                          name=ctx.op_name(node, '_pad'))


# -- layers -----------------------------------------------------------------------------------
def _conv(ctx, node):
    mx = ctx.mx
    w = ctx.const(node, 1, 'weight')
    b = ctx.const(node, 2, 'bias')
    kernel = _ints(ctx, node, 'kernel_shape', tuple(w.shape[2:]))
    strides, dilations, begin, end = _window(ctx, node, kernel)
    x = ctx.tensor(node, 0)
    if begin != end:
        x, begin = _pad_explicitly(ctx, node, x, begin, end), (0,) * len(kernel)
    wvar = ctx.param(node.input[1], w)
    name = ctx.op_name(node)

    def build(bias_var):
        return mx.sym.Convolution(x, wvar, bias_var, kernel=kernel, stride=strides,
                                  dilate=dilations, pad=begin, num_filter=w.shape[0],
                                  num_group=ctx.attr(node, 'group', 1),
                                  no_bias=bias_var is None, name=name)
    return _layer(ctx, node, build, w.shape[0], len(kernel), b)


def _conv_transpose(ctx, node):
    mx = ctx.mx
    w = ctx.const(node, 1, 'weight')
    b = ctx.const(node, 2, 'bias')
    kernel = _ints(ctx, node, 'kernel_shape', tuple(w.shape[2:]))
    if ctx.attr(node, 'output_shape') is not None:
        raise ctx.error(node, 'attribute output_shape is not supported (give pads)')
    if ctx.attr(node, 'auto_pad', 'NOTSET') not in ('NOTSET', ''):
        raise ctx.error(node, 'auto_pad %r is not supported (give pads)'
                        % ctx.attr(node, 'auto_pad'))
    strides, dilations, begin, end = _window(ctx, node, kernel)
    if begin != end:
        raise ctx.error(node, 'asymmetric pads %s/%s are not supported' % (begin, end))
    adj = _ints(ctx, node, 'output_padding', (0,) * len(kernel))
    group = ctx.attr(node, 'group', 1)
    x = ctx.tensor(node, 0)
    wvar = ctx.param(node.input[1], w)
    name = ctx.op_name(node)
    channels = w.shape[1] * group

    def build(bias_var):
        return mx.sym.Deconvolution(x, wvar, bias_var, kernel=kernel, stride=strides,
                                    dilate=dilations, pad=begin, adj=adj,
                                    num_filter=channels, num_group=group,
                                    no_bias=bias_var is None, name=name)
    return _layer(ctx, node, build, channels, len(kernel), b)


def _dense(ctx, node, x, weight, wkey, transform, bias, flatten):
    """FullyConnected of ``x`` with ``weight`` (units, in) from tensor ``wkey``."""
    wvar = ctx.param(wkey, weight, transform)
    name = ctx.op_name(node)

    def build(bias_var):
        return ctx.mx.sym.FullyConnected(x, wvar, bias_var, num_hidden=weight.shape[0],
                                         no_bias=bias_var is None, flatten=flatten, name=name)
    return _layer(ctx, node, build, weight.shape[0], 0, bias)


def _layer(ctx, node, build, channels, spatial, bias):
    """Register a layer for bias fusion and return its symbol (``bias``: ONNX input 2)."""
    key = node.input[2] if bias is not None else None
    if bias is not None:
        bias = np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (channels,))
    layer = _Layer(build, channels, spatial, bias, key)
    ctx.layers[node.output[0]] = layer
    return build(None if bias is None else ctx.param(key, bias, 'bias'))


def _gemm(ctx, node):
    if ctx.attr(node, 'transA', 0):
        raise ctx.error(node, 'transA=1 is not supported')
    b = ctx.const(node, 1, 'weight B')
    c = ctx.const(node, 2, 'bias C')
    alpha, beta = ctx.attr(node, 'alpha', 1.0), ctx.attr(node, 'beta', 1.0)
    weight = b if ctx.attr(node, 'transB', 0) else b.T
    transform = 'gemm'
    if alpha != 1.0:
        weight, transform = weight * np.float32(alpha), 'gemm*%r' % alpha
    units = weight.shape[0]
    if c is not None:
        if c.size not in (1, units) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise ctx.error(node, 'bias C of shape %s is not per output unit (%d)'
                            % (c.shape, units))
        c = c * np.float32(beta) if beta != 1.0 else c
    x = ctx.tensor(node, 0)
    return _dense(ctx, node, x, weight, node.input[1], transform, c, True)


def _matmul(ctx, node):
    mx = ctx.mx
    a, b = node.input[0], node.input[1]
    if a in ctx.syms and ctx.is_const(b) and ctx.const(node, 1, 'weight').ndim == 2:
        w = ctx.const(node, 1, 'weight')
        flatten = len(ctx.shape(a)) == 2
        return _dense(ctx, node, ctx.syms[a], w.T, b, 'T', None, flatten)
    xa, xb = ctx.tensor(node, 0), ctx.tensor(node, 1)
    sa = ctx.shape(a) if a in ctx.syms else ctx.consts[a].shape
    sb = ctx.shape(b) if b in ctx.syms else ctx.consts[b].shape
    if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2]:
        raise ctx.error(node, 'MatMul of shapes %s and %s: only equal ranks >= 2 with equal '
                        'batch dimensions (no broadcasting) are supported' % (sa, sb))
    op = mx.sym.dot if len(sa) == 2 else mx.sym.batch_dot
    return op(xa, xb, name=ctx.op_name(node))


def _batchnorm(ctx, node):
    if ctx.attr(node, 'training_mode', 0):
        raise ctx.error(node, 'training_mode=1 is not supported')
    if len([o for o in node.output if o]) > 1:
        raise ctx.error(node, 'training outputs (running mean/var) are not supported')
    names = ('scale', 'bias', 'mean', 'var')
    params = [ctx.param(node.input[i], ctx.const(node, i, names[i - 1])) for i in (1, 2, 3, 4)]
    return ctx.mx.sym.BatchNorm(ctx.tensor(node, 0), *params,
                                eps=ctx.attr(node, 'epsilon', 1e-5), fix_gamma=False,
                                use_global_stats=True, axis=1, name=ctx.op_name(node))


# -- elementwise ------------------------------------------------------------------------------
#: ONNX op -> (tensor-tensor op, scalar op x OP c, scalar op c OP x)
_BINARY = {
    'Add': ('broadcast_add', '_plus_scalar', '_plus_scalar'),
    'Sub': ('broadcast_sub', '_minus_scalar', '_rminus_scalar'),
    'Mul': ('broadcast_mul', '_mul_scalar', '_mul_scalar'),
    'Div': ('broadcast_div', '_div_scalar', '_rdiv_scalar'),
    'Pow': ('broadcast_power', '_power_scalar', '_rpower_scalar'),
}


def _bias_candidate(ctx, node, x_name, c):
    """The _Layer an Add of constant ``c`` to ``x_name`` can be folded into, or None."""
    layer = ctx.layers.get(x_name)
    if not ctx.fuse_bias or node.op_type != 'Add' or layer is None or \
            ctx.users.get(x_name) != 1:
        return None
    shape = list(c.shape)
    while shape and shape[0] == 1 and len(shape) > 1 + layer.spatial:
        shape.pop(0)
    if c.size == 1 or (len(shape) == 1 + layer.spatial and shape[0] == layer.channels and
                       all(s == 1 for s in shape[1:])):
        return layer if c.ndim <= 2 + layer.spatial else None
    return None


def _binary(ctx, node):
    mx = ctx.mx
    ops = _BINARY[node.op_type]
    a, b = node.input[0], node.input[1]
    if a in ctx.syms and b in ctx.syms:
        return getattr(mx.sym, ops[0])(ctx.syms[a], ctx.syms[b], name=ctx.op_name(node))
    pos = 1 if a in ctx.syms else 0                  # position of the constant
    x_name = node.input[1 - pos]
    if x_name not in ctx.syms:
        ctx.tensor(node, 1 - pos)                    # raises: produced by no earlier node
    c = np.asarray(ctx.const(node, pos, 'operand'), dtype=np.float32)
    layer = _bias_candidate(ctx, node, x_name, c)
    if layer is not None:
        bias = np.broadcast_to(c.reshape(-1), (layer.channels,))
        key = node.input[pos]
        if layer.bias is not None:
            bias, key = layer.bias + bias, layer.bias_key
        layer.bias, layer.bias_key = bias, key
        ctx.layers[node.output[0]] = layer
        ctx.layers.pop(x_name)
        return layer.build(ctx.param(key, bias, 'bias+%s' % node.output[0]))
    x = ctx.syms[x_name]
    if c.size == 1 and (c.ndim <= 1 or c.ndim <= len(ctx.shape(x_name))):
        op = ops[1] if pos == 1 else ops[2]
        return getattr(mx.sym._internal, op)(x, scalar=float(c.reshape(())),
                                             name=ctx.op_name(node))
    cvar = ctx.param(node.input[pos], c)
    lhs, rhs = (x, cvar) if pos == 1 else (cvar, x)
    return getattr(mx.sym, ops[0])(lhs, rhs, name=ctx.op_name(node))


def _unary(op, **kwargs):
    def handler(ctx, node):
        return getattr(ctx.mx.sym, op)(ctx.tensor(node, 0), name=ctx.op_name(node), **kwargs)
    handler.__name__ = '_' + op
    return handler


def _clip(ctx, node):
    if ctx.opset < 11:
        lo, hi = ctx.attr(node, 'min', None), ctx.attr(node, 'max', None)
    else:
        lo, hi = (ctx.const(node, i, what) for i, what in ((1, 'min'), (2, 'max')))
    lo = None if lo is None else float(np.asarray(lo).reshape(()))
    hi = None if hi is None else float(np.asarray(hi).reshape(()))
    x = ctx.tensor(node, 0)
    if lo == 0.0 and hi is None:
        return ctx.mx.sym.Activation(x, act_type='relu', name=ctx.op_name(node))
    return ctx.mx.sym.clip(x, a_min=-_F32_MAX if lo is None else lo,
                           a_max=_F32_MAX if hi is None else hi, name=ctx.op_name(node))


def _hard_sigmoid(ctx, node):
    return ctx.mx.sym.hard_sigmoid(ctx.tensor(node, 0), alpha=ctx.attr(node, 'alpha', 0.2),
                                   beta=ctx.attr(node, 'beta', 0.5), name=ctx.op_name(node))


def _hard_swish(ctx, node):
    x = ctx.tensor(node, 0)
    gate = ctx.mx.sym.hard_sigmoid(x, alpha=1.0 / 6, beta=0.5, name=ctx.op_name(node, '_gate'))
    return ctx.mx.sym.elemwise_mul(x, gate, name=ctx.op_name(node))


def _softmax(ctx, node):
    mx = ctx.mx
    ndim = len(ctx.shape(node.input[0]))
    axis = _norm_axis(ctx.attr(node, 'axis', 1 if ctx.opset < 13 else -1), ndim)
    x = ctx.tensor(node, 0)
    if ctx.opset >= 13 or axis == ndim - 1:
        return mx.sym.softmax(x, axis=axis, name=ctx.op_name(node))
    # opset < 13: softmax over all axes from ``axis`` on, as one flattened axis
    rows = ctx.shape(node.input[0])[axis:]
    flat = mx.sym.reshape(x, shape=(-1, int(np.prod(rows))), name=ctx.op_name(node, '_2d'))
    soft = mx.sym.softmax(flat, axis=-1, name=ctx.op_name(node, '_soft'))
    return mx.sym.reshape_like(soft, x, name=ctx.op_name(node))


# -- pooling ----------------------------------------------------------------------------------
def _global_avg_pool(ctx, node):
    k = len(ctx.shape(node.input[0])) - 2
    return ctx.mx.sym.Pooling(ctx.tensor(node, 0), kernel=(1,) * k, pool_type='avg',
                              global_pool=True, name=ctx.op_name(node))


def _pool(pool_type):
    def handler(ctx, node):
        kernel = _ints(ctx, node, 'kernel_shape', None)
        strides, dilations, begin, end = _window(ctx, node, kernel)
        if any(d != 1 for d in dilations):
            raise ctx.error(node, 'dilations %s are not supported' % (dilations,))
        if begin != end:
            raise ctx.error(node, 'asymmetric pads %s/%s are not supported' % (begin, end))
        extra = {}
        if pool_type == 'avg':
            extra['count_include_pad'] = bool(ctx.attr(node, 'count_include_pad', 0))
        return ctx.mx.sym.Pooling(
            ctx.tensor(node, 0), kernel=kernel, stride=strides, pad=begin,
            pool_type=pool_type, name=ctx.op_name(node),
            pooling_convention='full' if ctx.attr(node, 'ceil_mode', 0) else 'valid', **extra)
    handler.__name__ = '_%s_pool' % pool_type
    return handler


# -- shapes -----------------------------------------------------------------------------------
def _resolve_reshape(in_shape, target, node, ctx):
    """ONNX's output shape of a Reshape (0 = copy, -1 = infer)."""
    if ctx.attr(node, 'allowzero', 0) and 0 in list(target):
        raise ctx.error(node, 'allowzero=1 with a zero in the shape is not supported')
    out = [in_shape[i] if t == 0 else int(t) for i, t in enumerate(target)]
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    return out


def _reshape(ctx, node):
    x = ctx.tensor(node, 0)
    target = [int(t) for t in ctx.const(node, 1, 'shape', batch_ok=True)]
    mx_target = list(target)
    alt = ctx.alt.get(node.input[1])
    if alt is not None:
        # entries folded from the batch size: MXNet's 0 (copy) where they copy the input's
        # dimension, else -1 (infer); ONNX's own 0 and -1 mean the same in MXNet
        alt = [int(t) for t in alt]
        s0, s1 = ctx.shape(node.input[0]), ctx.shape(node.input[0], alt=True)
        o0 = _resolve_reshape(s0, target, node, ctx)
        o1 = _resolve_reshape(s1, alt, node, ctx)
        follow = [i for i in range(len(target)) if target[i] != alt[i]]
        free = []
        for i in follow:
            if i < len(s0) and o0[i] == s0[i] and o1[i] == s1[i]:
                mx_target[i] = 0
            else:
                free.append(i)
        if len(free) > 1 or (free and -1 in mx_target):
            raise ctx.error(node, 'reshape target %s (at batch %d) has several entries that '
                            'follow the batch size; import with batch_free=False'
                            % (target, ctx.input_shape[0]))
        for i in free:
            mx_target[i] = -1
    return ctx.mx.sym.reshape(x, shape=tuple(mx_target), name=ctx.op_name(node))


def _flatten(ctx, node):
    mx = ctx.mx
    shape = ctx.shape(node.input[0])
    axis = _norm_axis(ctx.attr(node, 'axis', 1), len(shape))
    x = ctx.tensor(node, 0)
    if axis == 1:
        return mx.sym.Flatten(x, name=ctx.op_name(node))
    target = (1, -1) if axis == 0 else (-1, int(np.prod(shape[axis:])))
    return mx.sym.reshape(x, shape=target, name=ctx.op_name(node))


def _raw_axes(ctx, node, pos):
    """Axes from attribute ``axes`` (old opsets) or input ``pos`` (newer opsets), or None."""
    axes = ctx.attr(node, 'axes', None)
    if axes is None and len(node.input) > pos and node.input[pos]:
        axes = ctx.const(node, pos, 'axes')
    return None if axes is None else [int(a) for a in np.ravel(axes)]


def _axes(ctx, node, pos, ndim):
    axes = _raw_axes(ctx, node, pos)
    return None if axes is None else [_norm_axis(a, ndim) for a in axes]


def _squeeze(ctx, node):
    shape = ctx.shape(node.input[0])
    axes = _axes(ctx, node, 1, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
        if set(axes) & ctx.batch_axes(node.input[0]):
            raise ctx.error(node, 'Squeeze without axes would squeeze the batch dimension at '
                            'batch 1; give an input_shape with batch > 1 or batch_free=False')
    return ctx.mx.sym.squeeze(ctx.tensor(node, 0), axis=tuple(axes), name=ctx.op_name(node))


def _unsqueeze(ctx, node):
    raw = _raw_axes(ctx, node, 1)
    if raw is None:
        raise ctx.error(node, 'Unsqueeze without axes')
    ndim = len(ctx.shape(node.input[0])) + len(raw)
    axes = [_norm_axis(a, ndim) for a in raw]
    x = ctx.tensor(node, 0)
    for i, axis in enumerate(sorted(axes)):
        x = ctx.mx.sym.expand_dims(x, axis=axis, name=ctx.op_name(node, '' if i == len(axes) - 1
                                                                  else '_%d' % i))
    return x


def _transpose(ctx, node):
    ndim = len(ctx.shape(node.input[0]))
    perm = _ints(ctx, node, 'perm', tuple(reversed(range(ndim))))
    return ctx.mx.sym.transpose(ctx.tensor(node, 0), axes=perm, name=ctx.op_name(node))


def _concat(ctx, node):
    first = next(i for i in node.input if i in ctx.syms)
    axis = _norm_axis(ctx.attr(node, 'axis'), len(ctx.shape(first)))
    parts = [ctx.tensor(node, i) for i in range(len(node.input))]
    return ctx.mx.sym.concat(*parts, dim=axis, name=ctx.op_name(node))


def _slice(ctx, node):
    src = node.input[0]
    shape = ctx.shape(src)
    if ctx.opset < 10:
        starts, ends = ctx.attr(node, 'starts'), ctx.attr(node, 'ends')
        axes, steps = ctx.attr(node, 'axes', None), None
    else:
        starts, ends = ctx.const(node, 1, 'starts'), ctx.const(node, 2, 'ends')
        axes, steps = ctx.const(node, 3, 'axes'), ctx.const(node, 4, 'steps')
    starts, ends = [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else \
        [_norm_axis(int(a), len(shape)) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.ravel(steps)]
    follow = ctx.batch_axes(src)
    begin, end, step = [None] * len(shape), [None] * len(shape), [None] * len(shape)
    for ax, s, e, st in zip(axes, starts, ends, steps):
        dim = shape[ax]
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        if st == 0:
            raise ctx.error(node, 'step 0 on axis %d' % ax)
        if (st > 0 and s >= e) or (st < 0 and s <= e):
            raise ctx.error(node, 'empty slice on axis %d is not supported' % ax)
        if (s, e, st) == (0, dim, 1):
            continue
        if ax in follow:
            raise ctx.error(node, 'slices axis %d, which follows the batch size; import with '
                            'batch_free=False' % ax)
        begin[ax], end[ax], step[ax] = s, (None if e == -1 else e), st
    last = max([i for i in range(len(shape)) if begin[i] is not None], default=-1)
    if last < 0:
        return ctx.tensor(node, 0)
    return ctx.mx.sym.slice(ctx.tensor(node, 0), begin=tuple(begin[:last + 1]),
                            end=tuple(end[:last + 1]), step=tuple(step[:last + 1]),
                            name=ctx.op_name(node))


def _reduce_mean(ctx, node):
    ndim = len(ctx.shape(node.input[0]))
    axes = _axes(ctx, node, 1, ndim)
    keep = bool(ctx.attr(node, 'keepdims', 1))
    if axes is None and ctx.attr(node, 'noop_with_empty_axes', 0):
        return ctx.tensor(node, 0)
    return ctx.mx.sym.mean(ctx.tensor(node, 0), axis=None if axes is None else tuple(axes),
                           keepdims=keep, name=ctx.op_name(node))


def _nearest_index(out_size, in_size, scale, coord, rounding):
    """ONNX Resize's nearest source index for each output position along one axis."""
    x = np.arange(out_size, dtype=np.float64)
    if coord == 'asymmetric':
        src = x / scale
    elif coord in ('half_pixel', 'pytorch_half_pixel'):
        src = (x + 0.5) / scale - 0.5
        if coord == 'pytorch_half_pixel' and out_size == 1:
            src = np.zeros_like(x)
    elif coord == 'align_corners':
        src = x * (in_size - 1) / max(out_size - 1, 1)
    elif coord == 'tf_half_pixel_for_nn':
        src = (x + 0.5) / scale
    else:
        return None
    if rounding == 'floor':
        idx = np.floor(src)
    elif rounding == 'ceil':
        idx = np.ceil(src)
    elif rounding == 'round_prefer_floor':
        idx = np.where(src - np.floor(src) == 0.5, np.floor(src), np.round(src))
    elif rounding == 'round_prefer_ceil':
        idx = np.where(src - np.floor(src) == 0.5, np.ceil(src), np.round(src))
    else:
        return None
    return np.clip(idx, 0, in_size - 1).astype(np.int64)


def _resize(ctx, node):
    mode = ctx.attr(node, 'mode', 'nearest')
    coord = ctx.attr(node, 'coordinate_transformation_mode', 'half_pixel')
    rounding = ctx.attr(node, 'nearest_mode', 'round_prefer_floor')
    if mode != 'nearest':
        raise ctx.error(node, "mode %r is not supported (only 'nearest' with an integer "
                        "scale)" % mode)
    shape = ctx.shape(node.input[0])
    scales = ctx.const(node, 1 if ctx.opset < 11 else 2, 'scales')
    sizes = None if ctx.opset < 11 else ctx.const(node, 3, 'sizes')
    if sizes is not None and sizes.size:
        out = [int(v) for v in sizes]
        scales = np.array(out, np.float64) / np.array(shape, np.float64)
    elif scales is not None and scales.size:
        out = [int(np.floor(d * float(s))) for d, s in zip(shape, scales)]
    else:
        raise ctx.error(node, 'neither scales nor sizes is given')
    if len(shape) != 4 or out[:2] != list(shape[:2]):
        raise ctx.error(node, 'only the spatial axes of a 4-d tensor may be resized (from %s '
                        'to %s)' % (shape, out))
    factors = {o // d for o, d in zip(out[2:], shape[2:])}
    factor = factors.pop() if len(factors) == 1 else None
    exact = factor is not None and all(
        o == d * factor and np.array_equal(
            _nearest_index(o, d, float(s), coord, rounding), np.arange(o) // factor)
        for o, d, s in zip(out[2:], shape[2:], scales[2:]))
    if not exact:
        raise ctx.error(node, 'nearest resize from %s to %s with coordinate mode %r and '
                        'nearest_mode %r is not a repetition by one integer factor, the only '
                        'kind supported' % (shape, out, coord, rounding))
    x = ctx.tensor(node, 0)
    if factor == 1:
        return x
    return ctx.mx.sym.UpSampling(x, scale=factor, sample_type='nearest', num_args=1,
                                 name=ctx.op_name(node))


def _identity(ctx, node):
    return ctx.tensor(node, 0)


def _cast(ctx, node):
    from onnx import TensorProto
    if ctx.attr(node, 'to') != TensorProto.FLOAT:
        raise ctx.error(node, 'casts of tensors computed from the input are supported to '
                        'float32 only (to=%s)' % ctx.attr(node, 'to'))
    return ctx.tensor(node, 0)


#: ONNX op type -> handler(ctx, node) returning the MXNet symbol of its output
_HANDLERS = {
    'Conv': _conv,
    'ConvTranspose': _conv_transpose,
    'Gemm': _gemm,
    'MatMul': _matmul,
    'BatchNormalization': _batchnorm,
    'Add': _binary, 'Sub': _binary, 'Mul': _binary, 'Div': _binary, 'Pow': _binary,
    'Sqrt': _unary('sqrt'),
    'Relu': _unary('Activation', act_type='relu'),
    'Sigmoid': _unary('Activation', act_type='sigmoid'),
    'Clip': _clip,
    'HardSigmoid': _hard_sigmoid,
    'HardSwish': _hard_swish,
    'Softmax': _softmax,
    'GlobalAveragePool': _global_avg_pool,
    'AveragePool': _pool('avg'),
    'MaxPool': _pool('max'),
    'Reshape': _reshape,
    'Flatten': _flatten,
    'Squeeze': _squeeze,
    'Unsqueeze': _unsqueeze,
    'Transpose': _transpose,
    'Concat': _concat,
    'Slice': _slice,
    'ReduceMean': _reduce_mean,
    'Resize': _resize,
    'Identity': _identity,
    'Cast': _cast,
}

#: ops that import_onnx translates (plus any op on constants only, which it evaluates)
SUPPORTED_OPS = tuple(sorted(set(_HANDLERS) | {'Constant', 'Shape'}))


def _load(path):
    try:
        import onnx
    except ImportError as e:                       # pragma: no cover - depends on install
        raise ImportError('import_onnx needs the onnx package: pip install gluonq[onnx]') from e
    if isinstance(path, onnx.ModelProto):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ONNXImportError('ONNX file %s not found' % path)
    try:
        model = onnx.load(path)
    except Exception as e:                         # protobuf raises DecodeError and others
        raise ONNXImportError('%s is not an ONNX model: %s: %s'
                              % (path, type(e).__name__, e)) from e
    if not model.graph.node:
        raise ONNXImportError('%s is not an ONNX model with a graph (no nodes)' % path)
    return model


def import_onnx(path, input_shape=None, batch_free=True, fuse_bias=True):
    """Import a float ONNX model as a Gluon ``SymbolBlock``.

    Parameters
    ----------
    path : str, os.PathLike or onnx.ModelProto
        The ``.onnx`` file, or a model already loaded (one input; any number of outputs).
    input_shape : tuple of int, optional
        The input's shape ``(N, C, ...)``; shape arithmetic in the graph is folded for it.
        Default: the shape the model declares, with a free batch dimension taken as 1 (any
        other free dimension makes it required).
    batch_free : bool, default True
        Keep the batch size free: the returned network takes any batch size (see the module
        docstring). With False it is built for ``input_shape`` exactly.
    fuse_bias : bool, default True
        Make an ``Add`` of a per-channel constant right after a conv or dense layer that
        layer's bias. False keeps it as the ONNX graph writes it (``broadcast_add`` with a
        parameter).

    Returns
    -------
    ImportedONNX
        ``(net, input_name, input_shape, metadata)``: a float32 ``SymbolBlock`` with
        initialized parameters, its input's name and shape, and the model's metadata.

    Raises
    ------
    ONNXImportError
        For a missing or invalid file, or a node that cannot be translated (the message
        names the node, its op type and what is unsupported).

    Inputs:
        - **data**: float32 array of shape ``input_shape`` (any batch size if
          ``batch_free``).

    Outputs:
        - **out**: the model's output(s), float32, as onnxruntime computes them.
    """
    import mxnet as mx
    model = _load(path)
    ctx = _Importer(model, input_shape, batch_free, fuse_bias)
    sym = ctx.run()
    net = mx.gluon.SymbolBlock(sym, [ctx.syms[ctx.onnx_input]])
    params = net.collect_params()
    missing = set(params.keys()) - set(ctx.params)
    if missing:
        raise ONNXImportError('internal: parameters without a value: %s' % sorted(missing))
    for name, p in params.items():
        value = ctx.params[name]
        p.shape = value.shape
        p.initialize(init=mx.init.Zero(), ctx=mx.cpu())
        p.set_data(mx.nd.array(value, dtype='float32'))
    meta = {p.key: p.value for p in model.metadata_props}
    return ImportedONNX(net, ctx.input_name, ctx.input_shape, meta)
