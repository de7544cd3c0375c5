"""The experiments: the paper's figures, the demo and the related-paper reproductions, one module each.

The library (leakycuda's other modules) never imports this package. Each experiment is a module here that
ends with ``EXPERIMENT = Experiment(...)`` (see :mod:`.registry`); ``leakycuda reproduce NAME`` and
:func:`replot` find it by name, so a new experiment is one new file. Shared pieces: :mod:`.sweep` (runs of the
paper's task, batched sweeps, per-layer measurements), :mod:`.linear_nets` and :mod:`.common` (the
fully-connected limit and what the related experiments share), :mod:`.plots`, :mod:`.tables`, and
:mod:`.distribute` (an experiment's runs spread over torchrun ranks or the shards of a job array, and their
merge).
"""
from .registry import Experiment, experiments, get, replot

__all__ = ["Experiment", "experiments", "get", "replot"]
