"""leakycuda: fused CPU/CUDA ops, modules and diagnostics for Leaky ResNets (docs/DESIGN.md §3 is the API)."""
from . import reference
from ._ops import build_info
from .energies import Energies, ExactCOI, cost_of_identity, k_norm2, stable_rank
from .energies import energies  # binds lc.energies to the function, shadowing the submodule (docs/DESIGN.md §3.2)
from .functional import leaky_layer, leaky_stack
from .module import LeakyResNet
from .ensemble import LeakyEnsemble
from .steps import adaptive_step_sizes, step_sizes
from . import data, diagnostics, train  # noqa: E402  (they import the module and energies above)

__version__ = "0.1.0"

__all__ = [
    "Energies",
    "ExactCOI",
    "LeakyEnsemble",
    "LeakyResNet",
    "adaptive_step_sizes",
    "build_info",
    "cost_of_identity",
    "data",
    "diagnostics",
    "energies",
    "k_norm2",
    "leaky_layer",
    "leaky_stack",
    "reference",
    "stable_rank",
    "step_sizes",
    "train",
]
