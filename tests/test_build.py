"""The build records what it was built against, a mismatch at import says what to rebuild, and the CUDA
build compiles one generated unit per (storage type, activation) of the leaky stack's instance list."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import leakycuda
from leakycuda import _ops


def test_build_info_matches_this_torch():
    info = leakycuda.build_info
    assert info is not None and info.torch_version == torch.__version__
    assert info.with_cuda == torch._C._dispatch_has_kernel_for_dispatch_key("leakycuda::leaky_stack", "CUDA")


def test_mismatched_torch_raises_with_rebuild_command(monkeypatch):
    fake = types.ModuleType("leakycuda._build_info")
    fake.torch_version, fake.cuda_version = "1.0.0+other", None
    monkeypatch.setitem(sys.modules, "leakycuda._build_info", fake)
    monkeypatch.setattr(leakycuda, "_build_info", fake, raising=False)
    with pytest.raises(ImportError, match=r"built against torch 1.0.0\+other .* but torch .* is installed; "
                                          r"rebuild it in place: cd .* && pip install --no-build-isolation -e \."):
        _ops._load()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANCE_LIST = os.path.join(ROOT, "csrc", "kernels", "leaky_stack_instances.cuh")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _list_pairs_by_the_preprocessor():
    """(storage type, activation) of every unit the instance list asks for, as the C preprocessor itself
    expands LEAKY_STACK_TYPES x LEAKY_STACK_ACTIVATIONS (the list's own #defines, its #includes left out)."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ preprocessor on PATH")
    with open(INSTANCE_LIST) as f:
        text = "".join(line for line in f if not line.startswith("#include"))
    text += ("\n#define UNIT_TYPE(T) unit_type T ;\n#define UNIT_ACT(A, unused) unit_act A ;\n"
             "LEAKY_STACK_TYPES(UNIT_TYPE)\nLEAKY_STACK_ACTIVATIONS(UNIT_ACT, 0)\n")
    out = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-"], input=text, capture_output=True, text=True,
                         check=True).stdout
    types = re.findall(r"unit_type (\S+) ;", out)
    acts = re.findall(r"unit_act Act::(\w+) ;", out)
    assert types and acts, out
    return [(t, a) for t in types for a in acts]


@pytest.mark.parametrize("kind", ["launch", "kernels"])
def test_generated_units_are_one_per_type_and_activation_of_the_instance_list(kind):
    gen = _load("leakycuda_gen_units", os.path.join(ROOT, "csrc", "gen_units.py"))
    units = gen.units(kind)
    names = [name for name, _ in units]
    assert len(set(names)) == len(names), names
    got = []
    for name, text in units:
        t = re.search(r"^#define LEAKY_STACK_UNIT_TYPE (\S+)$", text, re.M)
        a = re.search(r"^#define LEAKY_STACK_UNIT_ACT (\w+)$", text, re.M)
        body = re.search(r'^#include "([^"]+)"$', text, re.M)
        assert t and a and body, (name, text)
        assert os.path.exists(os.path.join(ROOT, "csrc", body.group(1))), body.group(1)
        got.append((t.group(1), a.group(1)))
    assert got == _list_pairs_by_the_preprocessor()


def test_setup_compiles_every_generated_unit_with_cuda(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py globs its sources relative to the project root, as pip runs it
    setup = _load("leakycuda_setup", os.path.join(ROOT, "setup.py"))
    gen = _load("leakycuda_gen_units", os.path.join(ROOT, "csrc", "gen_units.py"))
    units_dir = tmp_path / "units"
    cuda = setup.extension_sources(True, units_dir=str(units_dir))
    cpu = setup.extension_sources(False, units_dir=str(tmp_path / "cpu_units"))
    expected = gen.units("launch")
    assert [p for p in cuda if p.startswith(str(units_dir))] == [str(units_dir / n) for n, _ in expected]
    for name, text in expected:
        assert (units_dir / name).read_text() == text
    launchers = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert launchers and set(launchers) <= set(cuda)
    assert not any(p.endswith(".cu") for p in cpu) and not (tmp_path / "cpu_units").exists()
    assert cpu == [p for p in cuda if not p.endswith(".cu")]
    assert "csrc/ops.cpp" in cpu
