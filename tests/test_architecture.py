"""The shape of the package, read from its source with ``ast`` (nothing of gluonq is
imported): no import cycle among gluonq's modules, ``gluonq/convert/`` knows nothing of
deployment, no class is longer than 250 lines, and parameters are read into numpy only
through ``gluonq.arrays.to_numpy`` (MXNet's in-place weight reorder can race a plain
``asnumpy()``; see that module).

The import graph has an edge from module A to module B when A imports B anywhere (module
level or inside a function): ``import gluonq.x.y`` and ``from gluonq.x import y`` (relative
forms included) import ``gluonq.x.y`` when that is a module, else ``gluonq.x``, and also
every package above it, since Python runs their ``__init__`` first. An import of a
package that contains A itself (``from .. import __version__`` in ``gluonq/convert/``) is
not an edge: Python has started that package before A, so such an import never runs a
module, it reads a name of a package being initialized.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gluonq')
MAX_CLASS_LINES = 250
#: where deployment lives: the deploy package and the modules kept for compatibility
DEPLOYMENT = ('gluonq.deploy', 'gluonq.lower', 'gluonq.onnx', 'gluonq.export',
              'gluonq.openvino')


def _modules():
    """``{module name: (path, is_package)}`` of every ``.py`` file under gluonq/."""
    mods = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != '__pycache__')
        rel = os.path.relpath(folder, os.path.dirname(ROOT)).split(os.sep)
        for f in sorted(files):
            if not f.endswith('.py'):
                continue
            is_pkg = f == '__init__.py'
            name = '.'.join(rel if is_pkg else rel + [f[:-3]])
            mods[name] = (os.path.join(folder, f), is_pkg)
    return mods


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), path) for name, (path, _) in MODULES.items()}


def _ancestors(name):
    parts = name.split('.')
    return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def _targets(name, node):
    """gluonq modules named by one import statement of module ``name``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split('.')
        if not MODULES[name][1]:          # a module's level 1 is its package
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        pkg = '.'.join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module
    return [pkg + '.' + a.name if pkg + '.' + a.name in MODULES else pkg for a in node.names]


def _edges(name):
    """Modules that module ``name`` imports (see the module docstring)."""
    own = set(_ancestors(name)) | {name}
    out = set()
    for node in ast.walk(TREES[name]):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for t in _targets(name, node):
            if t.split('.')[0] != 'gluonq':
                continue
            while t not in MODULES and '.' in t:     # ``import gluonq.x.attr`` forms
                t = t.rpartition('.')[0]
            # (a folder without __init__.py runs nothing)
            out.update(m for m in _ancestors(t) + [t] if m not in own and m in MODULES)
    return out


GRAPH = {name: _edges(name) for name in MODULES}


def _find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 'open':
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 'done'
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports_it_must():
    """The parser resolves the forms the package uses (guards the checks below against
    passing on an empty graph)."""
    assert len(MODULES) > 30
    assert 'gluonq.convert.qnet' in GRAPH['gluonq.convert.convert']       # from .qnet import
    assert 'gluonq.quant' in GRAPH['gluonq.convert.convert']              # from .. import quant
    assert 'gluonq.deploy.onnx' in GRAPH['gluonq.deploy.openvino']
    assert 'gluonq.calibration.observers' in GRAPH['gluonq.deploy.onnx']  # inside a function
    assert 'gluonq.convert' in GRAPH['gluonq.checkpoint']                 # the package runs
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def _reach(start):
    seen, todo = set(), [start]
    while todo:
        for n in GRAPH[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.mark.parametrize('name', sorted(m for m in MODULES if m.startswith('gluonq.convert')))
def test_convert_knows_nothing_of_deployment(name):
    """No module of gluonq/convert/ imports a deployment module, directly or through
    others -- except ``python -m gluonq.convert`` (``__main__``), which runs the CLI."""
    bad = lambda mods: sorted(m for m in mods if m.startswith(DEPLOYMENT))    # noqa: E731
    assert not bad(GRAPH[name]), '%s imports %s' % (name, bad(GRAPH[name]))
    if not name.endswith('__main__'):
        assert not bad(_reach(name)), '%s reaches %s' % (name, bad(_reach(name)))


def test_no_class_is_longer_than_250_lines():
    long = ['%s.%s: %d lines' % (name, node.name, node.end_lineno - node.lineno + 1)
            for name, tree in sorted(TREES.items()) for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and
            node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert not long, long


def _asnumpy_of_data(node):
    """True for a call ``<x>.data(...).asnumpy()``: a parameter read past to_numpy."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
            node.func.attr == 'asnumpy' and isinstance(node.func.value, ast.Call) and
            isinstance(node.func.value.func, ast.Attribute) and
            node.func.value.func.attr == 'data')


def test_parameters_are_read_through_to_numpy():
    reads = ['%s:%d' % (MODULES[name][0], node.lineno)
             for name, tree in sorted(TREES.items()) if name != 'gluonq.arrays'
             for node in ast.walk(tree) if _asnumpy_of_data(node)]
    assert not reads, 'parameter reads that bypass gluonq.arrays.to_numpy: %s' % reads
