"""What the related-paper experiments share: full-batch gradient descent, progress, run checks and the JSON/PNG output."""
import dataclasses
import os
import sys

import torch

from .sweep import file_names
from .. import _json
from .. import _validate as check
from ..train import mse

__all__ = ["check_depths", "check_nonnegative", "check_positive", "check_preset_run", "check_values",
           "checked_config", "finisher", "gradient_descent", "log_header", "plot_over_seeds", "rounded", "run_jobs",
           "write_result"]


def _bar(total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if progress is None else not progress)


def gradient_descent(model, x, y, lam, lr, steps, *, record_at=(), record=None, progress=None, desc=None):
    """Full-batch gradient descent (no momentum) on mse(model(x), y) + model.regularization(lam);
    ``record(step, loss)`` is called before the update of every step in ``record_at`` (and after the last step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record_at = set(record_at)
    bar = _bar(steps, desc, progress)
    for step in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = mse(model(x), y) + model.regularization(lam)
        if record is not None and (step in record_at or step == steps):
            record(step, loss.detach().item())
        if step == steps:
            break
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()


def rounded(values, digits=6):
    """A nested list of floats rounded to ``digits`` significant digits (trajectories for JSON)."""
    if isinstance(values, (list, tuple)):
        return [rounded(v, digits) for v in values]
    return float("%.*g" % (digits, values))


def write_result(name, data, out, plot, seconds, log):
    """Writes the PNGs and ``<name>.json`` (with the wall time ``seconds``; compact, as the trajectories make it
    long) to ``out``; returns the result dict."""
    os.makedirs(out, exist_ok=True)
    data["seconds"] = seconds
    files = plot(data, out)
    files["json"] = os.path.join(out, name.replace("-", "_") + ".json")
    data["files"] = file_names(files)
    _json.dump(data, files["json"], separators=(",", ":"))
    log("%s: wrote %s (%.1f s)" % (name, ", ".join(files.values()), data["seconds"]))
    return dict(data, files=files)


def plot_over_seeds(ax, runs, Ls, value, fmt, color, label):
    """Plots value(run) against L: the mean over seeds, with the min..max over seeds as error bars."""
    import numpy as np

    v = [[value(r) for r in runs if r["L"] == L] for L in Ls]
    mean = np.array([np.mean(a) for a in v])
    err = (mean - [min(a) for a in v], [max(a) for a in v] - mean)
    n = max(len(a) for a in v)
    ax.errorbar(Ls, mean, yerr=err if n > 1 else None, fmt=fmt, color=color, ms=5, capsize=2,
                label=label + (" (mean, min..max of %d seeds)" % n if n > 1 else ""))


def check_preset_run(out, device, dtype, seeds):
    """A run's common arguments, checked before any work (ValueError / TypeError naming the argument):
    (out, device, dtype, seeds) with seeds a count (3 -> 0, 1, 2) or distinct integers >= 0."""
    out = check.writable_path(out, "out", folder=True)
    device = check.device(device)
    if device.type == "meta":
        check.fail(ValueError, "device", "'cpu' or 'cuda[:i]' (a run computes real numbers)", "'meta'")
    dtype = check.float_dtype(dtype)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = range(check.integer(seeds, "seeds", low=1, what="a count"))
    seeds = list(check.distinct(seeds, "seeds", lambda v, n: check.integer(v, n, low=0), sort=False))
    return out, device, dtype, seeds


def check_values(values, name, item, what):
    """A non-empty list or tuple, each value passed through ``item(value, "each value of <name>")`` (duplicates
    allowed)."""
    expect = "a non-empty list of %s" % what
    if not isinstance(values, (list, tuple)):
        check.fail(TypeError, name, expect, repr(values))
    if not values:
        check.fail(ValueError, name, expect, repr(values))
    return [item(v, "each value of %s" % name) for v in values]


def check_positive(value, name, what=""):
    return check.real(value, name, low=0.0, strict=True, what=what)


def check_nonnegative(value, name, what=""):
    return check.real(value, name, low=0.0, what=what)


def check_depths(values, name="config.depths"):
    return check.distinct(values, name, lambda v, n: check.integer(v, n, low=1), what="numbers of layers L >= 1",
                          sort=False)


def checked_config(config, cls, presets, quick):
    """``config`` (checked before any work), or the preset when None."""
    if config is None:
        return presets["quick" if quick else "full"]
    if not isinstance(config, cls):
        check.fail(TypeError, "config", "None (the preset) or a %s" % cls.__name__, type(config).__name__)
    return config.check()


def log_header(name, quick, cfg, dtype, seeds):
    """What a related experiment's result depends on (its JSON's first fields; its part files are matched on it)."""
    return {"experiment": name, "quick": quick, "config": dataclasses.asdict(cfg), "seeds": seeds,
            "dtype": str(dtype).replace("torch.", "")}


def run_jobs(name, header, jobs, run_one, *, out, device, shard, log, t0):
    """A related experiment's runs ``jobs`` (leakycuda.experiments.distribute.Job), trained one at a time by
    ``run_one(i)`` -> the run's JSON record, in this process or spread over shards or ranks
    (:func:`~leakycuda.experiments.distribute.execute`)."""
    from .distribute import execute

    def train(indices, emit):
        for i in indices:
            emit(i, run_one(i))

    return execute(name, header, jobs, train, out=out, device=device, shard=shard, log=log, t0=t0)


def finisher(name, plot, derived=None):
    """The ``finish`` of a related experiment (leakycuda.experiments.registry.Experiment): its JSON is the header,
    the machine, ``derived(header)`` (a dict of fields computed from the config), the runs, where the parts ran
    (when spread over shards or ranks) and the wall time."""

    def finish(header, runs, *, out, log=print, machine=None, seconds=0.0, parts=None):
        data = dict(header, machine=machine)
        if derived is not None:
            data.update(derived(header))
        data["runs"] = runs
        if parts is not None:
            data["parts"] = parts
        return write_result(name, data, out, plot, seconds, log)

    return finish
