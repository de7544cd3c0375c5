"""The build records what it was built against, and a mismatch at import says what to rebuild."""
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
