"""What several test files share: the CUDA checks and a free local port (tests/ is on sys.path under pytest)."""
import socket

import torch

#: A CUDA device is present (the CUDA kernels may still be missing: see :func:`has_cuda_kernel`).
CUDA = torch.cuda.is_available()


def has_cuda_kernel(op):
    """A CUDA device is present and leakycuda's op ``op`` (e.g. "leaky_stack") has a CUDA kernel."""
    return CUDA and torch._C._dispatch_has_kernel_for_dispatch_key("leakycuda::" + op, "CUDA")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local gloo process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
