"""Shared pytest fixtures: the devices to run on (CUDA cases carry the `cuda` marker and skip without a GPU)."""
import pytest
import torch

from helpers import CUDA

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
        ],
    ),
]


def has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("leakycuda::leaky_stack", "CUDA")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not has_cuda_kernels():
        pytest.skip("leakycuda was built without CUDA kernels")
    return request.param
