"""leakycuda: fused CPU/CUDA ops, modules and diagnostics for Leaky ResNets (DESIGN.md §3 is the API)."""
from . import reference
from ._ops import build_info
from .functional import leaky_layer, leaky_stack
from .module import LeakyResNet
from .steps import adaptive_step_sizes, step_sizes

__version__ = "0.1.0"

__all__ = [
    "LeakyResNet",
    "adaptive_step_sizes",
    "build_info",
    "leaky_layer",
    "leaky_stack",
    "reference",
    "step_sizes",
]
