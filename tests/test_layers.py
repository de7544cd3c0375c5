"""The library's layering: the core never imports the experiments (leakycuda.experiments), found statically."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "leakycuda")
# The command line is the application on top of both; everything else in leakycuda/ is the core.
NOT_CORE = {"cli.py", "__main__.py"}


def _core_modules():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and f not in NOT_CORE)


def _imports(path):
    """Every module an import statement in ``path`` names (function-level imports included), as absolute names."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "leakycuda" if node.level == 1 else ("" if node.level == 0 else "<outside>")
            mod = ".".join(p for p in (base, node.module) if p)
            out.append((node.lineno, mod))
            out += [(node.lineno, "%s.%s" % (mod, a.name)) for a in node.names]
    return out


def test_the_core_modules_are_found():
    assert {"module.py", "functional.py", "train.py", "energies.py", "diagnostics.py"} <= set(_core_modules())


@pytest.mark.parametrize("name", _core_modules())
def test_core_module_does_not_import_the_experiments(name):
    bad = [(line, mod) for line, mod in _imports(os.path.join(ROOT, name))
           if mod == "leakycuda.experiments" or mod.startswith("leakycuda.experiments.")]
    assert not bad, "%s imports the experiments: %s" % (name, bad)


def test_the_check_sees_an_import_of_the_experiments(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from .experiments import fig1\n")
    assert ("leakycuda.experiments" in [m for _, m in _imports(str(p))])
