"""The import structure of the package, read statically (ast) from every leakycuda/**/*.py, function-level imports
included: no module imports another module's private names, and the modules import each other without a circle.

The rule on private names: no leakycuda module imports a name that starts with one underscore from another
leakycuda module (``from .x import _name``, ``from leakycuda.x import _name``, ``from . import _name`` where
``_name`` is not a module). Allowed: importing a module, internal ``_``-prefixed ones included
(``from . import _validate as check``, ``from . import _graph``), the public names of an internal module (its API:
``from ._ops import ops``, ``from ._env import machine_info``), and dunder names (``from . import __version__``).
Other packages' names (torch's) are outside the rule. A module's own private names are its business.

The import graph: an edge from a module to each leakycuda module it imports (``from .x import name`` and
``import leakycuda.x``: x; ``from . import name`` of a name that is not a module: the package's ``__init__``). The
package ``__init__`` that Python runs first for every submodule import is not an edge (it is already being
imported by then); a circle among the explicit edges is what can break an import order.
"""
import ast
import pathlib

import leakycuda

PKG = pathlib.Path(leakycuda.__file__).parent
ROOT = PKG.name
# Modules the build writes next to the sources (the compiled extension, the build's versions): a fresh checkout
# may not have them yet.
BUILT = {ROOT + "._C", ROOT + "._build_info"}


def _modules():
    """{dotted module name: (path, is_package)} of every .py file under the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(source, module, is_pkg, known):
    """The leakycuda imports in ``source`` (the text of ``module``): a list of (target module, imported name or
    None for a module import, line). ``known``: the dotted names of the package's modules."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = base + "." + node.module if node.module else base
            else:
                base = node.module
            if base.split(".")[0] != ROOT:
                continue
            for a in node.names:
                sub = base + "." + a.name
                found.append((sub, None, node.lineno) if sub in known else (base, a.name, node.lineno))
    return found


def _graph():
    mods = _modules()
    known = set(mods) | BUILT
    graph, private = {}, []
    for name, (path, is_pkg) in mods.items():
        edges = set()
        for target, imported, line in imports(path.read_text(), name, is_pkg, known):
            if target != name:
                edges.add(target)
                if imported is not None and _private(imported):
                    private.append("%s:%d imports %s from %s" % (path.relative_to(PKG.parent), line, imported, target))
        graph[name] = edges
    return graph, private


def find_cycle(graph):
    """One import circle of ``graph`` ({module: modules it imports}) as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_module_imports_private_names_of_another():
    graph, private = _graph()
    assert ROOT + "._validate" in graph[ROOT + ".train"]  # the graph is read (the checks below have something to check)
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_no_import_circle():
    graph, _ = _graph()
    assert ROOT + ".train" in graph[ROOT + ".related"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_see_what_they_must_refuse():
    """The two checks on made-up code: a private name across modules, a function-level import closing a circle."""
    known = {ROOT, ROOT + ".a", ROOT + ".b", ROOT + "._c"}
    src = ("from . import _c, __version__\nfrom .b import _hidden, shown\n"
           "def f():\n    from leakycuda.b import _also\n    import leakycuda.a\n")
    got = imports(src, ROOT + ".a", False, known)
    assert (ROOT + "._c", None, 1) in got and (ROOT, "__version__", 1) in got
    assert [(t, n) for t, n, _ in got if n is not None and _private(n)] == [(ROOT + ".b", "_hidden"),
                                                                              (ROOT + ".b", "_also")]
    assert imports("from .b import x\n", ROOT + ".a", False, known) == [(ROOT + ".b", "x", 1)]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
