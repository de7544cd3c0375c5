"""dln-rank: L2 on a deep linear net is a Schatten-2/L penalty, so depth lowers the rank of the end-to-end matrix."""
import dataclasses
import os
import time

import torch

from . import plots
from .common import (check_depths, check_nonnegative, check_positive, check_preset_run, check_values, checked_config,
    finisher, gradient_descent, log_header, plot_over_seeds, run_jobs)
from .distribute import Job, check_shard
from .linear_nets import (DeepLinear, entropy_rank, low_rank_regression, numerical_rank, schatten_minimizer, schatten_thresholds)
from .registry import Experiment
from .. import _validate as check
from ..train import mse

__all__ = ["DLNRankConfig", "DLN_RANK", "plot_dln_rank", "run_dln_rank"]


@dataclasses.dataclass
class DLNRankConfig:
    """dln-rank: a whitened regression 16 -> 16 with a rank-6 teacher, depths L at one lam, gradient descent."""

    d: int = 16
    n: int = 64
    spectrum: tuple = (2.0, 1.2, 0.8, 0.6, 0.42, 0.25)
    noise: float = 0.05
    lam: float = 0.2
    depths: tuple = (1, 2, 3, 4, 6, 8)
    init: str = "orthogonal"
    init_scale: float = 1.0
    lr0: float = 0.15
    steps: int = 6000
    rtol: float = 1e-3

    def check(self):
        """Checks every field (ValueError / TypeError naming it as config.<field>) before any work; returns self."""
        d = check.integer(self.d, "config.d", low=1, what="the input and output dimension")
        check.integer(self.n, "config.n", low=d, what="samples, at least d to whiten the inputs")
        spectrum = check_values(self.spectrum, "config.spectrum", lambda v, n: check_nonnegative(v, n), "teacher singular "
                           "values >= 0")
        if len(spectrum) > d:
            check.fail(ValueError, "config.spectrum", "at most d = %d values (the teacher's rank)" % d,
                       "%d values" % len(spectrum))
        check_nonnegative(self.noise, "config.noise", "the label noise")
        check_nonnegative(self.lam, "config.lam", "the weight decay")
        check_depths(self.depths)
        check.choice(self.init, "config.init", DeepLinear.INITS)
        check_positive(self.init_scale, "config.init_scale", "the layers' scale")
        check_positive(self.lr0, "config.lr0", "the learning rate times L")
        check.integer(self.steps, "config.steps", low=0, what="gradient-descent steps")
        check_nonnegative(self.rtol, "config.rtol", "the relative cutoff of the numerical rank")
        return self


DLN_RANK = {"full": DLNRankConfig(), "quick": DLNRankConfig(steps=1500)}


def run_dln_rank(out, *, quick=False, device="cpu", dtype=None, seeds=(0,), progress=None, log=print, config=None,
                 shard=None):
    """dln-rank: singular values and effective rank of the end-to-end matrix of L2-regularized deep linear networks
    against depth L, next to the closed-form Schatten-2/L minimizer (:func:`schatten_minimizer`).

    For each seed (task and init) and depth L: a :class:`DeepLinear` of width d (orthogonal init, so A starts with
    every singular value 1) is trained by full-batch gradient descent at lr = lr0 / L (the curvature at the solution
    grows like L s^(2 - 2/L)) on :func:`low_rank_regression`, at one lam. Reported per run: the learned singular
    values, the global and the "largest" (local) closed-form minimizers, their numerical ranks (values above
    rtol * max) and entropy ranks, the largest gap between learned and each prediction, and the gradient norm at
    the end (stationarity). dtype None: float64. Writes dln_rank.json and dln_rank.png to ``out``.
    ``shard`` ("i/n"): only shard i of n of the runs, into a part file (leakycuda.experiments.distribute).
    """
    cfg = checked_config(config, DLNRankConfig, DLN_RANK, quick)
    out, device, dtype, seeds = check_preset_run(out, device, dtype or torch.float64, seeds)
    shard = check_shard(shard)
    t0 = time.perf_counter()
    runs = [(seed, L) for seed in seeds for L in cfg.depths]
    tasks = {}

    def run_one(i):
        seed, L = runs[i]
        if seed not in tasks:
            tasks.clear()
            task = low_rank_regression(cfg.d, cfg.spectrum, cfg.n, noise=cfg.noise, seed=seed, dtype=dtype,
                                       device=device)
            tasks[seed] = task, torch.linalg.svdvals(task["B"].double()).cpu()
        task, b = tasks[seed]
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(10_000 + 100 * seed + L)
        model = DeepLinear(cfg.d, L, init=cfg.init, scale=cfg.init_scale, generator=gen, device=device, dtype=dtype)
        losses = []
        gradient_descent(model, task["x"], task["y"], cfg.lam, cfg.lr0 / L, cfg.steps,
                         record_at=range(0, cfg.steps, max(1, cfg.steps // 100)),
                         record=lambda step, loss: losses.append((step, loss)), progress=progress,
                         desc="dln-rank L=%d seed=%d" % (L, seed))
        model.zero_grad(set_to_none=True)
        (mse(model(task["x"]), task["y"]) + model.regularization(cfg.lam)).backward()
        with torch.no_grad():
            s = torch.linalg.svdvals(model.end_to_end().double()).cpu()
        pred = {br: torch.linalg.svdvals(schatten_minimizer(task["B"], cfg.lam, L, branch=br)).cpu()
                for br in ("global", "largest")}
        run = {"seed": seed, "L": L, "lr": cfg.lr0 / L, "seconds": time.perf_counter() - t,
               "b": b.tolist(), "learned": s.tolist(), "final_loss": losses[-1][1], "loss_history": losses,
               "grad_norm": float(model.layers.grad.norm()),
               "rank": numerical_rank(s, cfg.rtol), "entropy_rank": entropy_rank(s)}
        for br, sp in pred.items():
            run[br] = sp.tolist()
            run["rank_" + br] = numerical_rank(sp, cfg.rtol)
            run["entropy_rank_" + br] = entropy_rank(sp)
            run["max_abs_diff_" + br] = float((s - sp).abs().max())
        log("dln-rank seed=%d L=%d  learned rank %d (global minimizer %d, largest local %d)  max|s - s_global| "
            "%.2g  max|s - s_local| %.2g  |grad| %.1g  (%.1f s)"
            % (seed, L, run["rank"], run["rank_global"], run["rank_largest"], run["max_abs_diff_global"],
               run["max_abs_diff_largest"], run["grad_norm"], run["seconds"]))
        return run

    jobs = [Job("seed=%d L=%d" % (seed, L), cost=float(L * cfg.steps)) for seed, L in runs]
    return run_jobs("dln-rank", log_header("dln-rank", quick, cfg, dtype, seeds), jobs, run_one, out=out,
                    device=device, shard=shard, log=log, t0=t0)


def _thresholds(header):
    cfg = header["config"]
    return {"thresholds": {str(L): dict(zip(("b_exist", "b_star"), schatten_thresholds(cfg["lam"], L)))
                           for L in cfg["depths"]}}


def plot_dln_rank(data, out):
    """dln_rank.png from a dln_rank.json dict (first seed): singular values against L, and the ranks against L."""
    plt = plots._plt()
    cfg, seed = data["config"], data["seeds"][0]
    runs = [r for r in data["runs"] if r["seed"] == seed]
    Ls = [r["L"] for r in runs]
    x = range(len(Ls))
    k = min(len(cfg["spectrum"]) + 2, len(runs[0]["b"]))  # two past the teacher's rank, at most d
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    for j, bj in enumerate(runs[0]["b"][:k]):
        ax.axhline(bj, color="0.8", lw=0.8, ls=":", label="singular values of $B$ (least squares)" if j == 0 else None)
    for i, r in enumerate(runs):
        ax.plot([i] * k, r["learned"][:k], "o", color="C0", ms=6,
                label="learned (gradient descent)" if i == 0 else None)
        ax.plot([i - 0.18] * k, r["global"][:k], "x", color="C3", ms=6,
                label="global minimizer (closed form)" if i == 0 else None)
        ax.plot([i + 0.18] * k, r["largest"][:k], "+", color="C2", ms=7,
                label="largest local minimizer" if i == 0 else None)
    for i, L in enumerate(Ls):
        b_exist, b_star = (data["thresholds"][str(L)][k] for k in ("b_exist", "b_star"))
        ax.hlines(b_star, i - 0.3, i + 0.3, color="C3", lw=1.2,
                  label="$b^*$: values of $B$ below it are zeroed (global)" if i == 0 else None)
        ax.hlines(b_exist, i - 0.3, i + 0.3, color="C2", lw=1.2, ls="--",
                  label="$b_{exist}$: below it no local minimizer $\\neq 0$" if i == 0 else None)
    ax.set_xticks(list(x), [str(L) for L in Ls])
    ax.set_xlabel("depth $L$")
    ax.set_ylabel("singular values of $A = M_L \\cdots M_1$")
    ax.set_title("Deep linear nets, $\\lambda = %g$: end-to-end spectrum" % cfg["lam"], fontsize=10)
    ax.set_ylim(-0.08, 1.6 * runs[0]["b"][0])
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.grid(alpha=0.3)
    for key, fmt, color, label in (("rank", "-o", "C0", "learned: numerical rank"),
                                   ("rank_global", "--x", "C3", "global minimizer: rank"),
                                   ("rank_largest", ":+", "C2", "largest local minimizer: rank"),
                                   ("entropy_rank", "-s", "0.5", "learned: entropy rank")):
        plot_over_seeds(ax2, data["runs"], Ls, lambda r: r[key], fmt, color, label)
    ax2.axhline(sum(1 for v in cfg["spectrum"] if v > 0), color="k", lw=0.8, ls="--", label="teacher rank")
    ax2.set_xlabel("depth $L$")
    ax2.set_ylabel("rank (values > %g max)" % cfg["rtol"])
    ax2.set_title("Depth strengthens the low-rank bias", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    return {"png": plots._save(fig, os.path.join(out, "dln_rank.png"))}


EXPERIMENT = Experiment(
    name="dln-rank", run=run_dln_rank, finish=finisher("dln-rank", plot_dln_rank, _thresholds), plot=lambda data, out, json_path: plot_dln_rank(data, out),
    fields=("config", "seeds", "runs", "thresholds"),
    matches=lambda data: data.get("experiment") == "dln-rank",
    help="L2-regularized deep linear nets: end-to-end spectrum and rank against depth, vs the closed-form "
         "Schatten-2/L minimizer",
    full="16 -> 16 whitened regression, rank-6 teacher + noise, lam = 0.2, L = 1, 2, 3, 4, 6, 8, 6000 GD steps",
    quick="the same with 1500 GD steps")
