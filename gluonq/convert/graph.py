"""A small graph IR of a traced float network, and tracing into it.

``trace(net, input_shapes)`` calls a (hybridizable) Gluon block on symbols, which works for
any HybridBlock (gluoncv's model zoo, hand-written blocks, ``SymbolBlock.imports``), and turns
the symbol JSON into a :class:`Graph`: named nodes in topological order, each op input an
edge ``(producer, output_index)``, and the parameter values as float32 numpy arrays. Graph
passes (``fold.py``) rewrite it; ``Graph.to_symbol`` turns it back into an MXNet symbol, which
the calibration runs.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import mxnet as mx
import numpy as np

from ..arrays import to_numpy

__all__ = ['Node', 'Graph', 'trace', 'edge_key', 'parse_tuple']


def edge_key(edge):
    """String key of an edge ``(node, index)``: ``'node'`` or ``'node:index'``."""
    name, idx = edge
    return name if idx == 0 else '%s:%d' % (name, idx)


def parse_tuple(value, default=None):
    """Parse an MXNet tuple attribute like ``'(3, 3)'`` into a tuple of ints."""
    if value is None:
        return default
    value = value.strip()
    if value in ('', 'None', '()'):
        return default if value != '()' else ()
    return tuple(int(v) for v in value.strip('()[]').split(',') if v.strip() not in ('', 'None'))


class Node:
    """One op (or a variable when ``op == 'null'``) of the graph.

    ``inputs`` are edges ``(producer_name, output_index)``; ``attrs`` are MXNet's string
    attributes; ``shapes`` (filled by :meth:`Graph.infer_shapes`) are the output shapes.
    """
    __slots__ = ('name', 'op', 'attrs', 'inputs', 'shapes')

    def __init__(self, name, op, attrs=None, inputs=None):
        self.name = name
        self.op = op
        self.attrs = dict(attrs or {})
        self.inputs = [tuple(e) for e in (inputs or [])]
        self.shapes = None

    @property
    def is_var(self):
        return self.op == 'null'

    def attr(self, key, default=None):
        return self.attrs.get(key, default)

    def bool_attr(self, key, default=False):
        v = self.attrs.get(key)
        return default if v is None else v.strip().lower() in ('true', '1')

    def __repr__(self):
        return 'Node(%s: %s <- %s)' % (self.name, self.op, [edge_key(e) for e in self.inputs])


class Graph:
    """Nodes in topological order, data inputs, outputs and float32 parameter values."""

    def __init__(self, nodes, inputs, outputs, params):
        self.nodes = OrderedDict((n.name, n) for n in nodes)
        self.inputs = list(inputs)
        self.outputs = [tuple(e) for e in outputs]
        self.params = dict(params)
        #: what graph passes did to nodes that are gone: {node name: sentence}
        self.notes = {}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_symbol(cls, sym, input_names, params):
        """Graph of ``sym``; ``params`` maps variable names to arrays (NDArray or numpy)."""
        js = json.loads(sym.tojson())
        names = []
        seen = {}
        nodes = []
        for raw in js['nodes']:
            name = raw['name']
            if name in seen:                      # keep names unique (imported graphs)
                seen[name] += 1
                name = '%s_%d' % (name, seen[name])
            else:
                seen[name] = 0
            names.append(name)
            inputs = [(names[i[0]], i[1]) for i in raw['inputs']]
            attrs = raw.get('attrs', raw.get('attr', raw.get('param', {}))) or {}
            if raw['op'] == 'null':
                attrs = {}
            nodes.append(Node(name, raw['op'], attrs, inputs))
        outputs = [(names[h[0]], h[1]) for h in js['heads']]
        values = {}
        for n in nodes:
            if n.is_var and n.name not in input_names:
                if n.name not in params:
                    raise ValueError('the traced graph needs variable %r, which is neither a '
                                     'network input (%s) nor a parameter of the network'
                                     % (n.name, ', '.join(input_names)))
                v = params[n.name]
                values[n.name] = np.array(to_numpy(v), dtype=np.float32)
        return cls(nodes, input_names, outputs, values)

    # -- queries --------------------------------------------------------------------------
    def consumers(self):
        """``{node_name: [(consumer_name, input_position), ...]}`` over all op nodes."""
        users = {name: [] for name in self.nodes}
        for n in self.nodes.values():
            for pos, (src, _) in enumerate(n.inputs):
                users[src].append((n.name, pos))
        return users

    def edge_users(self):
        """``{edge: [consumer names]}``, graph outputs counted as consumer ``None``."""
        users = {}
        for n in self.nodes.values():
            for e in n.inputs:
                users.setdefault(e, []).append(n.name)
        for e in self.outputs:
            users.setdefault(e, []).append(None)
        return users

    def op_nodes(self):
        return [n for n in self.nodes.values() if not n.is_var]

    def param_of(self, node, pos):
        """Name of the parameter at input ``pos`` of ``node`` (or None if not a parameter)."""
        if pos >= len(node.inputs):
            return None
        src = node.inputs[pos][0]
        return src if src in self.params else None

    def shape(self, edge):
        node = self.nodes[edge[0]]
        if node.is_var:
            return self.params[node.name].shape if node.name in self.params else node.shapes[0]
        return node.shapes[edge[1]] if node.shapes else None

    # -- editing --------------------------------------------------------------------------
    def replace_uses(self, old, new):
        """Point every use of edge ``old`` (inputs and graph outputs) at edge ``new``."""
        for n in self.nodes.values():
            n.inputs = [new if e == old else e for e in n.inputs]
        self.outputs = [new if e == old else e for e in self.outputs]

    def remove_unused(self):
        """Drop nodes and parameters that no output depends on."""
        live = set()
        stack = [e[0] for e in self.outputs]
        while stack:
            name = stack.pop()
            if name in live:
                continue
            live.add(name)
            stack.extend(src for src, _ in self.nodes[name].inputs)
        for name in list(self.nodes):
            if name not in live and name not in self.inputs:
                del self.nodes[name]
                self.params.pop(name, None)

    def add_param(self, name, value):
        """Add a parameter variable (inserted before its first use by :meth:`to_symbol`)."""
        if name in self.nodes:
            raise ValueError('graph already has a node named %r' % name)
        self.params[name] = np.asarray(value, dtype=np.float32)
        node = Node(name, 'null')
        node.shapes = [self.params[name].shape]
        self.nodes[name] = node
        self.nodes.move_to_end(name, last=False)
        return name

    # -- back to MXNet --------------------------------------------------------------------
    def to_json(self, outputs=None):
        """Symbol JSON of the graph with ``outputs`` (edges) as its heads."""
        outputs = self.outputs if outputs is None else [tuple(e) for e in outputs]
        index = {}
        nodes = []
        for n in self.nodes.values():
            index[n.name] = len(nodes)
            d = {'op': n.op, 'name': n.name, 'inputs': [[index[s], i, 0] for s, i in n.inputs]}
            if n.attrs:
                d['attrs'] = dict(n.attrs)
            nodes.append(d)
        return json.dumps({
            'nodes': nodes,
            'arg_nodes': [i for i, n in enumerate(self.nodes.values()) if n.is_var],
            'heads': [[index[s], i, 0] for s, i in outputs],
            'attrs': {'mxnet_version': ['int', 10901]},
        })

    def to_symbol(self, outputs=None):
        return mx.sym.load_json(self.to_json(outputs))

    def infer_shapes(self, input_shapes):
        """Fill ``node.shapes`` for every node from the input shapes (dict name -> shape)."""
        sym = self.to_symbol([(n.name, i) for n in self.op_nodes()
                              for i in range(_num_outputs(n))])
        shapes = dict(input_shapes)
        shapes.update({k: v.shape for k, v in self.params.items()})
        arg_names = sym.list_arguments()
        aux_names = sym.list_auxiliary_states()
        known = {k: v for k, v in shapes.items() if k in arg_names or k in aux_names}
        arg_shapes, out_shapes, aux_shapes = sym.infer_shape(**known)
        if out_shapes is None or any(s is None for s in out_shapes):
            raise ValueError('cannot infer the shapes of the traced graph from input shapes %s'
                             % (input_shapes,))
        k = 0
        for n in self.op_nodes():
            cnt = _num_outputs(n)
            n.shapes = [tuple(s) for s in out_shapes[k:k + cnt]]
            k += cnt
        for name, s in zip(arg_names, arg_shapes):
            self.nodes[name].shapes = [tuple(s)]
        for name, s in zip(aux_names, aux_shapes):
            self.nodes[name].shapes = [tuple(s)]

    def __repr__(self):
        return 'Graph(%d ops, inputs=%s, outputs=%s)' % (
            len(self.op_nodes()), self.inputs, [edge_key(e) for e in self.outputs])


_NUM_OUTPUTS = {}


def _num_outputs(node):
    """Number of visible outputs of an op node (BatchNorm's mean/var outputs are hidden)."""
    key = (node.op, tuple(sorted(node.attrs.items())), len(node.inputs))
    if key not in _NUM_OUTPUTS:
        k = len(node.inputs)
        js = {'nodes': [{'op': 'null', 'name': 'x%d' % i, 'inputs': []} for i in range(k)]
                       + [{'op': node.op, 'name': 'op', 'attrs': dict(node.attrs),
                           'inputs': [[i, 0, 0] for i in range(k)]}],
              'arg_nodes': list(range(k)), 'heads': [[k, 0, 0]],
              'attrs': {'mxnet_version': ['int', 10901]}}
        internals = mx.sym.load_json(json.dumps(js)).get_internals()
        _NUM_OUTPUTS[key] = len(internals.list_outputs()) - k
    return _NUM_OUTPUTS[key]


def trace(net, input_shapes, input_names=None):
    """Trace a float Gluon block into a :class:`Graph`.

    Parameters
    ----------
    net : HybridBlock
        The float network, initialized (a forward pass on zeros finishes deferred init).
    input_shapes : list of tuple
        Shape of each data input (batch size included).
    input_names : list of str, optional
        Names of the data variables (default ``data`` for one input, ``data0``... for more).
    """
    if not isinstance(net, mx.gluon.HybridBlock):
        raise TypeError('gluonq needs a HybridBlock (hybridizable network), got %s'
                        % type(net).__name__)
    if input_names is None:
        input_names = ['data'] if len(input_shapes) == 1 else \
            ['data%d' % i for i in range(len(input_shapes))]
    params = net.collect_params()
    try:
        values = {p.name: p.data() for p in params.values()}
    except mx.gluon.parameter.DeferredInitializationError:
        net(*[mx.nd.zeros(s) for s in input_shapes])
        values = {p.name: p.data() for p in params.values()}
    except RuntimeError as err:
        raise ValueError('the float network is not initialized: %s' % err) from None
    for p in params.values():
        if p.dtype is not None and np.dtype(p.dtype) != np.float32:
            raise ValueError('parameter %r is %s: gluonq converts float32 networks'
                             % (p.name, np.dtype(p.dtype).name))
    syms = [mx.sym.var(n) for n in input_names]
    out = net(*syms)
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    graph = Graph.from_symbol(out, input_names, values)
    graph.infer_shapes(dict(zip(input_names, [tuple(s) for s in input_shapes])))
    return graph
