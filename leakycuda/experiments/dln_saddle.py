"""dln-saddle: singular values learned one at a time from a small init (saddle to saddle), together from a large one
(lazy)."""
import dataclasses
import math
import os
import time

import torch

from . import plots
from .common import (check_depths, check_positive, check_preset_run, check_values, checked_config, finisher,
    gradient_descent, log_header, rounded, run_jobs)
from .distribute import Job, check_shard
from .linear_nets import DeepLinear, low_rank_regression
from .registry import Experiment
from .. import _validate as check

__all__ = ["DLNSaddleConfig", "DLN_SADDLE", "plot_dln_saddle", "run_dln_saddle"]


@dataclasses.dataclass
class DLNSaddleConfig:
    """dln-saddle: a noiseless whitened regression 16 -> 16 with singular values 4, 2, 1, 0.5; no regularization.

    The network has width 64 (inputs zero-padded, the first 16 outputs read; :class:`DeepLinear`): a width well
    above d makes the large init lazy (relative weight change ~0.1). small_scale: the end-to-end scale alpha of the
    small init (Gaussian layers of scale alpha^(1/L)); large_scale: the per-layer scale of the large (orthogonal)
    init. horizon_small / horizon_large: the gradient-flow time t = lr * step trained, per depth. Small init:
    lr = lr0 / (L s_1^(2 - 2/L)) (s_1 the top target value: the curvature at the solution is 2 L s_1^(2 - 2/L));
    large init: steps_large steps over its (short) horizon, so that the fast lazy phase is resolved.
    """

    d: int = 16
    width: int = 64
    n: int = 64
    spectrum: tuple = (4.0, 2.0, 1.0, 0.5)
    depths: tuple = (2, 3, 4)
    small_scale: float = 1e-4
    large_scale: float = 1.5
    horizon_small: dict = dataclasses.field(default_factory=lambda: {2: 8.0, 3: 40.0, 4: 90.0})
    horizon_large: dict = dataclasses.field(default_factory=lambda: {2: 1.0, 3: 0.3, 4: 0.1})
    lr0: float = 0.25
    steps_large: int = 600
    records: int = 300

    def check(self):
        """Checks every field (ValueError / TypeError naming it as config.<field>) before any work; returns self."""
        d = check.integer(self.d, "config.d", low=1, what="the input and output dimension")
        check.integer(self.width, "config.width", low=d, what="the network's width, at least d")
        check.integer(self.n, "config.n", low=d, what="samples, at least d to whiten the inputs")
        spectrum = check_values(self.spectrum, "config.spectrum", lambda v, n: check_positive(v, n), "teacher singular "
                           "values > 0")
        if len(spectrum) > d:
            check.fail(ValueError, "config.spectrum", "at most d = %d values (the teacher's rank)" % d,
                       "%d values" % len(spectrum))
        depths = check_depths(self.depths)
        check_positive(self.small_scale, "config.small_scale", "the end-to-end scale of the small init")
        check_positive(self.large_scale, "config.large_scale", "the per-layer scale of the large init")
        for name in ("horizon_small", "horizon_large"):
            horizon = getattr(self, name)
            if not isinstance(horizon, dict) or any(L not in horizon for L in depths):
                check.fail(TypeError if not isinstance(horizon, dict) else ValueError, "config." + name,
                           "a dict with a gradient-flow time for each depth in config.depths %s" % (list(depths),),
                           repr(horizon))
            for L in depths:
                check_positive(horizon[L], "config.%s[%d]" % (name, L), "a gradient-flow time")
        check_positive(self.lr0, "config.lr0", "the learning-rate scale")
        check.integer(self.steps_large, "config.steps_large", low=1, what="steps of the large init")
        check.integer(self.records, "config.records", low=1, what="recorded points per run")
        return self


DLN_SADDLE = {"full": DLNSaddleConfig(), "quick": DLNSaddleConfig(depths=(3,), records=200)}


def _crossing(t, progress, level):
    """The first time the progress curve [T] reaches ``level`` (linear interpolation), or None."""
    above = (progress >= level).nonzero()
    if not len(above):
        return None
    j = int(above[0])
    if j == 0:
        return float(t[0])
    p0, p1 = float(progress[j - 1]), float(progress[j])
    return float(t[j - 1] + (t[j] - t[j - 1]) * (level - p0) / (p1 - p0))


def _rise_times(t, proj, target):
    """t10, t50, t90 of each target direction: when u_i^T A(t) v_i [T, r] has covered 10/50/90% of its way from
    its initial value to the target value b_i."""
    progress = (proj - proj[0]) / (target - proj[0])
    return {"t%d" % int(100 * q): [_crossing(t, progress[:, i], q) for i in range(len(target))]
            for q in (0.1, 0.5, 0.9)}


def _saddle_summary(rise):
    """Sequential (saddle-to-saddle) and simultaneous (lazy) measures from the rise times of the directions."""
    t10, t50, t90 = rise["t10"], rise["t50"], rise["t90"]
    if any(v is None for v in t10 + t50 + t90):
        return {"complete": False}
    gaps = [t10[i + 1] - t90[i] for i in range(len(t50) - 1)]
    return {"complete": True, "ordered": all(a < b for a, b in zip(t50, t50[1:])),
            "gaps": gaps, "sequential": all(g > 0 for g in gaps), "t50_spread": max(t50) / min(t50),
            "rise_width": sum((c - a) / b for a, b, c in zip(t10, t50, t90)) / len(t50)}


def run_dln_saddle(out, *, quick=False, device="cpu", dtype=None, seeds=(0,), progress=None, log=print, config=None,
                   shard=None):
    """dln-saddle: the end-to-end singular values of a deep linear network over gradient descent, from a small
    init (they rise one at a time, from saddle to saddle) and from a large orthogonal init (they move together).

    No regularization. For each seed, depth L and init, a :class:`DeepLinear` is trained on a noiseless
    :func:`low_rank_regression`; every few steps the end-to-end matrix A(t) (through the op) gives its singular
    values and its projections e_i(t) = u_i^T A(t) v_i on the target's singular pairs. Per direction i:
    t10, t50, t90 (gradient-flow time t = lr * step at which e_i has covered 10/50/90% of its way to b_i).
    "sequential": every next direction starts (t10) only after the previous one has finished (t90);
    "t50_spread": max t50 / min t50 (1 when all move together); "rise_width": the mean of (t90 - t10) / t50
    (how abrupt each rise is). Also the relative weight change
    ||M(T) - M(0)||_F / ||M(0)||_F (large: feature learning; small: lazy). dtype None: float64.
    Writes dln_saddle.json and dln_saddle_L<L>.png (one per depth, first seed) to ``out``.
    ``shard`` ("i/n"): only shard i of n of the runs, into a part file (leakycuda.experiments.distribute).
    """
    cfg = checked_config(config, DLNSaddleConfig, DLN_SADDLE, quick)
    out, device, dtype, seeds = check_preset_run(out, device, dtype or torch.float64, seeds)
    shard = check_shard(shard)
    t0 = time.perf_counter()
    target = torch.tensor(cfg.spectrum, dtype=torch.float64)
    r = len(cfg.spectrum)
    plan = [(seed, L, init) for seed in seeds for L in cfg.depths for init in ("small", "large")]
    tasks = {}

    def steps_lr(L, init):
        if init == "small":
            lr = cfg.lr0 / (L * float(target[0]) ** (2 - 2 / L))
            return int(math.ceil(cfg.horizon_small[L] / lr)), lr
        return cfg.steps_large, cfg.horizon_large[L] / cfg.steps_large

    def run_one(i):
        seed, L, init = plan[i]
        if seed not in tasks:
            tasks.clear()
            task = low_rank_regression(cfg.d, cfg.spectrum, cfg.n, seed=seed, dtype=dtype, device=device)
            U, _, Vh = torch.linalg.svd(task["A_star"].double().cpu())
            tasks[seed] = task, U, Vh
        task, U, Vh = tasks[seed]
        t = time.perf_counter()
        steps, lr = steps_lr(L, init)
        gen = torch.Generator().manual_seed(20_000 + 100 * seed + L)
        shape = dict(in_features=cfg.d, out_features=cfg.d, generator=gen, device=device, dtype=dtype)
        if init == "small":
            model = DeepLinear(cfg.width, L, init="gaussian", scale=cfg.small_scale ** (1 / L), **shape)
        else:
            model = DeepLinear(cfg.width, L, init="orthogonal", scale=cfg.large_scale, **shape)
        M0 = model.layers.detach().clone()
        times, svals, projs, losses = [], [], [], []

        def record(step, loss):
            with torch.no_grad():
                A = model.end_to_end().double().cpu()
            times.append(step * lr)
            svals.append(torch.linalg.svdvals(A)[: r + 2].tolist())
            projs.append(torch.einsum("ji,jk,ki->i", U[:, :r], A, Vh[:r].T).tolist())
            losses.append(loss)

        every = max(1, steps // cfg.records)
        gradient_descent(model, task["x"], task["y"], 0.0, lr, steps,
                         record_at=set(range(min(steps, 50))) | set(range(0, steps, every)), record=record,
                         progress=progress, desc="dln-saddle L=%d %s seed=%d" % (L, init, seed))
        rise = _rise_times(torch.tensor(times), torch.tensor(projs), target)
        change = float((model.layers.detach() - M0).norm() / M0.norm())
        run = {"seed": seed, "L": L, "init": init, "lr": lr, "steps": steps, "seconds": time.perf_counter() - t,
               "t": rounded(times), "singular_values": rounded(svals), "projections": rounded(projs),
               "loss": rounded(losses),
               "weight_change": change, "rise": rise, "summary": _saddle_summary(rise)}
        sm = run["summary"]
        log("dln-saddle seed=%d L=%d %-5s t50 %s  sequential %s  t50 spread %s  weight change %.3g  "
            "final loss %.2g  (%d steps, %.1f s)"
            % (seed, L, init, ", ".join("-" if v is None else "%.3g" % v for v in rise["t50"]),
               sm.get("sequential"), "%.3g" % sm["t50_spread"] if sm["complete"] else "-", change,
               losses[-1], steps, run["seconds"]))
        return run

    jobs = [Job("seed=%d L=%d %s" % (seed, L, init), cost=float(L * steps_lr(L, init)[0])) for seed, L, init in plan]
    return run_jobs("dln-saddle", log_header("dln-saddle", quick, cfg, dtype, seeds), jobs, run_one, out=out,
                    device=device, shard=shard, log=log, t0=t0)


def plot_dln_saddle(data, out):
    """dln_saddle_L<L>.png for each depth (first seed) from a dln_saddle.json dict, small init (left) and large init
    (right) against gradient-flow time: the singular values of A(t); the progress of each target direction
    (u_i^T A(t) v_i from its start, 0, to b_i, 1) with its t50 dashed; the loss."""
    import numpy as np

    plt = plots._plt()
    cfg, seed = data["config"], data["seeds"][0]
    target = np.asarray(cfg["spectrum"], dtype=float)
    files = {}
    for L in cfg["depths"]:
        fig, axes = plt.subplots(3, 2, figsize=(10.0, 7.6), sharex="col", gridspec_kw={"height_ratios": [2, 1.4, 1]})
        for col, init in enumerate(("small", "large")):
            run = next(r for r in data["runs"] if r["seed"] == seed and r["L"] == L and r["init"] == init)
            t, sv, proj = run["t"], plots._np(run["singular_values"]), plots._np(run["projections"])
            ax = axes[0][col]
            for j, b in enumerate(target):
                ax.axhline(b, color="0.75", ls=":", lw=0.8, label="targets $b_i$" if j == 0 else None)
            for j in range(sv.shape[1]):
                ax.plot(t, sv[:, j], color="C%d" % j, lw=1.4, label="$s_%d(A(t))$" % (j + 1))
            what = ("small init (Gaussian layers)" if init == "small"
                    else "large init (orthogonal layers $\\times %g$)" % cfg["large_scale"])
            what += ", $s_1(A(0)) = %.2g$" % sv[0, 0]
            sm = run["summary"]
            note = ("\nt50 spread %.1fx, %s" % (sm["t50_spread"], "one at a time" if sm["sequential"] else
                                                  "overlapping") if sm["complete"] else "")
            ax.set_title("L = %d, %s%s" % (L, what, note), fontsize=9)
            ax.set_ylabel("singular values of $A(t)$")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2, loc="center right")
            ax = axes[1][col]
            progress = (proj - proj[0]) / (target - proj[0])
            for j, b in enumerate(target):
                ax.plot(t, progress[:, j], color="C%d" % j, lw=1.4, label="$b_%d = %g$" % (j + 1, b))
                t50 = run["rise"]["t50"][j]
                if t50 is not None:
                    ax.axvline(t50, color="C%d" % j, ls="--", lw=0.7)
            ax.set_ylim(-0.1, 1.15)
            ax.set_ylabel("progress of $u_i^T A(t) v_i$")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax = axes[2][col]
            ax.plot(t, run["loss"], color="k", lw=1.2)
            ax.set_yscale("log")
            ax.set_xlabel("gradient-flow time $t$ = learning rate $\\times$ step")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
        fig.suptitle("Deep linear network, L = %d: saddle to saddle (small init) vs lazy (large init)" % L, fontsize=11)
        files["png_L%d" % L] = plots._save(fig, os.path.join(out, "dln_saddle_L%d.png" % L))
    return files


EXPERIMENT = Experiment(
    name="dln-saddle", run=run_dln_saddle, finish=finisher("dln-saddle", plot_dln_saddle), plot=lambda data, out, json_path: plot_dln_saddle(data, out),
    fields=("config", "seeds", "runs"),
    matches=lambda data: data.get("experiment") == "dln-saddle",
    help="deep linear nets: singular values over gradient descent, small init (saddle to saddle) vs large init (lazy)",
    full="16 -> 16 teacher with singular values 4, 2, 1, 0.5, width 64, L = 2, 3, 4, both inits",
    quick="the same at L = 3 only")
