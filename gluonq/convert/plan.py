"""Decide what each op of a (folded) float graph becomes: which ops run in int8, what they
absorb (ReLU, a residual add), which tensors stay int8 between ops, and why an op stays float.

The result is a list of :class:`Unit` in topological order. A unit is one step of the
converted network: a quantized layer (conv/dense with fused activation and residual), an
int8 op (add, concat, pooling, flatten, relu) or a float op.
"""
from __future__ import annotations

import fnmatch

from .activations import recognize, relu_like
from .fold import affine_problem
from ..nn.matmul import MATMUL_OPS
from ..nn.shape_ops import SHAPE_OPS, SPLIT_OPS
from .graph import parse_tuple

__all__ = ['Unit', 'make_plan', 'check_exclude', 'affine_candidates', 'ADD_OPS']

ADD_OPS = ('elemwise_add', '_Plus', '_plus', '_add', 'broadcast_add')
LAYER_OPS = ('Convolution', 'FullyConnected')
LAYER_KINDS = ('conv', 'dense')
PASS_KINDS = ('add', 'concat', 'pool', 'flatten', 'relu', 'shape')
#: scalar ops a matrix product absorbs into its requantize (or float output) scale
MATMUL_SCALE_OPS = ('_mul_scalar', '_div_scalar')


class Unit:
    """One step-to-be. ``kind`` is conv, dense, add, concat, pool, flatten, relu or float."""

    def __init__(self, kind, node, inputs, reason=None):
        self.kind = kind
        self.node = node                  # the main graph node
        self.fused = []                   # nodes absorbed into this unit, in order
        self.inputs = list(inputs)        # data edges read (residual operand included)
        self.output = (node.name, 0)      # edge it produces
        self.act = None                   # None, 'relu' or ('clip', a_max)
        self.residual = None              # edge of the fused residual operand
        self.reason = reason              # why a unit is float
        self.out_q = False                # output stays int8
        self.in_q = []                    # per input: consumed as int8
        self.alpha = 1.0                  # matmul: factor of a fused scalar * or /
        self.num_outputs = 1              # a split (shape unit) produces several
        self.dynamic_dtypes = None        # dynamic mode: integer type of each input

    @property
    def outputs(self):
        """Every edge the unit produces (``output``, or each output of a split)."""
        if self.num_outputs == 1:
            return [self.output]
        return [(self.node.name, i) for i in range(self.num_outputs)]

    @property
    def is_int8(self):
        return self.kind != 'float'

    def describe(self):
        if self.kind == 'float':
            return 'float'
        parts = ['int8 %s' % self.kind + (' (dynamic ranges)' if self.dynamic_dtypes else '')]
        if self.residual is not None:
            parts.append('+ residual add')
        if self.act is not None:
            parts.append('+ relu' if self.act == 'relu' else '+ clip(0, %g)' % self.act[1])
        if self.alpha != 1.0:
            parts.append('* %g' % self.alpha)
        parts.append('-> int8' if self.out_q else '-> float32')
        return ' '.join(parts)

    def __repr__(self):
        return 'Unit(%s %s)' % (self.kind, self.node.name)


def _matches(name, patterns):
    base = name[:-4] if name.endswith('_fwd') else name
    for p in patterns:
        if p == name or p == base or fnmatch.fnmatchcase(name, p) or \
                fnmatch.fnmatchcase(base, p):
            return True
    return False


def _is_add(graph, node):
    """An add of two data tensors of one shape (a constant operand is never a residual)."""
    if node.op not in ADD_OPS or len(node.inputs) != 2 or \
            any(e[0] in graph.params for e in node.inputs):
        return False
    if node.op == 'broadcast_add':
        return graph.shape(node.inputs[0]) == graph.shape(node.inputs[1])
    return True


def _layer_problem(graph, node):
    """Why a Convolution/FullyConnected node cannot be quantized (None if it can)."""
    if graph.param_of(node, 1) is None:
        return 'its weight is computed, not a parameter'
    if not node.bool_attr('no_bias', False) and graph.param_of(node, 2) is None:
        return 'its bias is computed, not a parameter'
    if node.op == 'Convolution':
        kernel = parse_tuple(node.attr('kernel'))
        layout = node.attr('layout', 'None')
        if not kernel or len(kernel) > 3:
            return 'only 1-d, 2-d and 3-d convolutions are quantized'
        if layout not in ('None', None) and not layout.startswith('NC'):
            return 'layout %s (only channel-first layouts are quantized)' % layout
    return None


def _matmul_problem(graph, node):
    """Why a batch_dot / dot / linalg_gemm2 node is not an int8 matrix product (None if it
    is one)."""
    if len(node.inputs) != 2:
        return '%s with %d inputs' % (node.op, len(node.inputs))
    sa, sb = (graph.shape(e) for e in node.inputs)
    if sa is None or sb is None:
        return 'operand shapes unknown'
    if node.op == 'dot' and (len(sa) != 2 or len(sb) != 2):
        return 'dot of %d-d and %d-d operands (only a 2-d dot is a matrix product)' % (
            len(sa), len(sb))
    if len(sa) != len(sb) or len(sa) < 2 or tuple(sa[:-2]) != tuple(sb[:-2]):
        return 'operands of shapes %s and %s: an int8 matrix product needs equal leading ' \
               'axes' % (tuple(sa), tuple(sb))
    if node.op.endswith('linalg_gemm2') and int(node.attr('axis', '-2')) != -2:
        return 'linalg_gemm2 with axis=%s (only the last two axes)' % node.attr('axis')
    return None


def _pool_problem(graph, node):
    if node.op != 'Pooling':
        return 'not pooling'
    if node.attr('pool_type', 'max') not in ('max', 'avg'):
        return 'pool_type %s has no int8 kernel' % node.attr('pool_type')
    shape = graph.shape(node.inputs[0])
    if shape is None or len(shape) != 4:
        return 'int8 pooling is 2-d only'
    if node.attr('layout', 'None') not in ('None', None, 'NCHW'):
        return 'layout %s' % node.attr('layout')
    if node.attr('pool_type') == 'avg' and node.attr('pooling_convention', 'valid') == 'full' \
            and not node.bool_attr('global_pool'):
        return ("average pooling with ceil_mode: MXNet's int8 kernel divides edge windows by "
                "the full kernel size, float pooling by the clipped size")
    return None


def affine_candidates(units):
    """Float tensors that may be held as affine uint8 (with a zero point): those that int8
    units read only as the main input of a conv or dense layer with a calibrated range.

    Those layers fold the zero point into their int32 bias and pad with it; gluonq's other
    int8 ops (add, concat, pooling, matmul, ...) and a layer's residual operand take
    symmetric tensors only, and a tensor an int8 unit produces is requantized symmetrically.
    """
    produced_q = {e for u in units if u.is_int8 for e in u.outputs}
    readers = {}
    for u in units:
        for i, (e, q) in enumerate(zip(u.inputs, u.in_q)):
            if q:
                readers.setdefault(e, []).append(
                    u.kind in LAYER_KINDS and i == 0 and e != u.residual and
                    u.dynamic_dtypes is None)
    return [e for e, ok in readers.items() if all(ok) and e not in produced_q]


def check_exclude(graph, exclude):
    """Refuse ``exclude`` patterns that match no node of ``graph`` (nor a folded one)."""
    names = [n.name for n in graph.nodes.values()] + list(graph.notes)
    unknown = [p for p in exclude if not any(_matches(n, [p]) for n in names)]
    if unknown:
        raise ValueError('exclude: no layer matches %s; layer names look like %s'
                         % (unknown, [n.name for n in graph.op_nodes()][:5]))


def make_plan(graph, exclude=()):
    """Units of ``graph`` in topological order (see module docstring)."""
    users = graph.edge_users()
    absorbed = set()
    units = []

    def sole_user(edge):
        us = users.get(edge, [])
        if len(us) != 1 or us[0] is None:
            return None
        node = graph.nodes[us[0]]
        return None if _matches(node.name, exclude) else node

    patterns = recognize(graph)
    for node in graph.op_nodes():
        if node.name in absorbed:
            continue
        data_inputs = [e for e in node.inputs if e[0] not in graph.params]
        if _matches(node.name, exclude):
            units.append(Unit('float', node, data_inputs, 'excluded by the user'))
            continue
        if node.op not in LAYER_OPS and len(data_inputs) < len(node.inputs):
            units.append(Unit('float', node, data_inputs, _constant_reason(graph, node,
                                                                          patterns)))
            continue
        if node.op in LAYER_OPS:
            problem = _layer_problem(graph, node)
            if problem:
                units.append(Unit('float', node, data_inputs, problem))
                continue
            unit = Unit('conv' if node.op == 'Convolution' else 'dense', node, data_inputs)
            nxt = sole_user(unit.output)
            if nxt is not None and nxt.name not in absorbed and _is_add(graph, nxt):
                other = [e for e in nxt.inputs if e != unit.output]
                if len(other) == 1:
                    unit.residual = other[0]
                    unit.inputs.append(other[0])
                    unit.fused.append(nxt)
                    absorbed.add(nxt.name)
                    unit.output = (nxt.name, 0)
            nxt = sole_user(unit.output)
            if nxt is not None and relu_like(nxt):
                unit.act = relu_like(nxt)
                unit.fused.append(nxt)
                absorbed.add(nxt.name)
                unit.output = (nxt.name, 0)
            units.append(unit)
        elif _is_add(graph, node):
            unit = Unit('add', node, data_inputs)
            nxt = sole_user(unit.output)
            if nxt is not None and relu_like(nxt) == 'relu':
                unit.act = 'relu'
                unit.fused.append(nxt)
                absorbed.add(nxt.name)
                unit.output = (nxt.name, 0)
            units.append(unit)
        elif node.op in ('Concat', 'concat'):
            units.append(Unit('concat', node, data_inputs))
        elif node.op == 'Pooling':
            problem = _pool_problem(graph, node)
            units.append(Unit('float', node, data_inputs, problem) if problem else
                         Unit('pool', node, data_inputs))
        elif node.op in MATMUL_OPS:
            problem = _matmul_problem(graph, node)
            if problem:
                units.append(Unit('float', node, data_inputs, problem))
                continue
            unit = Unit('matmul', node, data_inputs)
            nxt = sole_user(unit.output)
            if nxt is not None and nxt.op in MATMUL_SCALE_OPS and \
                    0 < abs(float(nxt.attr('scalar'))) < float('inf'):
                c = float(nxt.attr('scalar'))
                unit.alpha = c if nxt.op == '_mul_scalar' else 1.0 / c
                unit.fused.append(nxt)
                absorbed.add(nxt.name)
                unit.output = (nxt.name, 0)
            units.append(unit)
        elif node.op in SHAPE_OPS:
            unit = Unit('shape', node, data_inputs)
            if node.op in SPLIT_OPS:
                unit.num_outputs = int(node.attr('num_outputs'))
            units.append(unit)
        elif node.op in ('Flatten', 'flatten'):
            units.append(Unit('flatten', node, data_inputs))
        elif relu_like(node) == 'relu':
            units.append(Unit('relu', node, data_inputs))
        else:
            units.append(Unit('float', node, data_inputs, patterns.get(node.name) or
                              affine_problem(graph, node) or
                              'no int8 kernel for %s' % node.op))
    _decide_int8_tensors(graph, units)
    return units


def _constant_reason(graph, node, patterns):
    """Why an op reading a constant (a parameter the folding passes left) stays float."""
    why = patterns.get(node.name) or affine_problem(graph, node)
    if why:
        return why
    consts = ', '.join(e[0] for e in node.inputs if e[0] in graph.params)
    return '%s reads the constant %s: constants are never quantized as activations' % (
        node.op, consts)


def _decide_int8_tensors(graph, units):
    """Which units run in int8 and which tensors stay int8 between them."""
    # int8 ops between layers only make sense on int8 inputs: otherwise they (and what
    # they absorbed) stay float
    kept, int8_edges = [], set()
    for u in _topological(units):
        if u.kind in PASS_KINDS and not all(e in int8_edges for e in u.inputs):
            for node in [u.node] + u.fused:
                kept.append(Unit('float', node, [e for e in node.inputs
                                                 if e[0] not in graph.params],
                                 'its inputs are float (no int8 layer before it)'))
            continue
        kept.append(u)
        if u.is_int8:
            int8_edges.update(u.outputs)
    # a unit's output stays int8 if an int8 unit reads it
    readers = set()
    for u in kept:
        u.in_q = [u.is_int8] * len(u.inputs)
        if u.is_int8:
            readers.update(u.inputs)
    result = []
    for u in kept:
        # pooling/flatten/relu/concat always produce int8 (then dequantized if needed)
        u.out_q = u.is_int8 and (u.output in readers or u.kind in ('pool', 'flatten', 'relu',
                                                                     'concat', 'shape'))
        result.append(u)
        if u.kind in ('conv', 'dense') and isinstance(u.act, tuple) and not u.out_q:
            clip = u.fused.pop()        # a float-output layer cannot absorb a clip
            u.output = (u.fused[-1].name, 0) if u.fused else (u.node.name, 0)
            u.act = None
            cu = Unit('float', clip, [u.output], 'clip after a layer with float output')
            cu.in_q = [False]
            result.append(cu)
    units[:] = result


def _topological(units):
    """Units ordered so that every input is produced before it is read (stable)."""
    producer = {e: u for u in units for e in u.outputs}
    done, order = set(), []
    visiting = set()

    def visit(u):
        if id(u) in done:
            return
        if id(u) in visiting:
            raise ValueError('cycle in the graph at %s' % u.node.name)
        visiting.add(id(u))
        for e in u.inputs:
            if e in producer and producer[e] is not u:
                visit(producer[e])
        visiting.discard(id(u))
        done.add(id(u))
        order.append(u)

    for u in units:
        visit(u)
    return order
