"""fcnn-bottleneck: deep fully-connected ReLU nets with L2 develop a bottleneck (few large singular values in the
middle representations)."""
import dataclasses
import os
import time

import torch

from . import plots
from .common import (check_depths, check_nonnegative, check_positive, check_preset_run, check_values, checked_config,
    finisher, log_header, plot_over_seeds, run_jobs)
from .distribute import Job, check_shard
from .linear_nets import entropy_rank, fully_connected_resnet
from .registry import Experiment
from .. import _validate as check
from ..data import bottleneck_task
from ..train import fit

__all__ = ["FCNNBottleneckConfig", "FCNN_BOTTLENECK", "plot_fcnn_bottleneck", "run_fcnn_bottleneck"]


@dataclasses.dataclass
class FCNNBottleneckConfig:
    """fcnn-bottleneck: deep ReLU fully-connected nets (LeakyResNet at rho_l * Lt = 1) with L2 on every learned
    weight, on the 30 -> 3 -> 30 bottleneck task (k* = 3), one lam, a sweep over the number of layers L.

    Projections are fixed (learn_projections=False), so every learned parameter is regularized. Init: He in the
    dense-layer parametrization M_l = rho_l W_l = W_l / L (V_l = L * N(0, 2/w), b_l = 0); Adam at lr_M * L on W
    is Adam at lr_M on M. "Large" singular values: above ``rtol`` times the largest one (``rtol_small`` too).
    """

    d: int = 30
    inner: tuple = (3,)
    n_train: int = 400
    n_test: int = 400
    width: int = 48
    depths: tuple = (2, 3, 4, 6, 8, 12)
    lam: float = 0.1
    adam_steps: int = 6000
    lr: float = 1e-3
    rtol: float = 0.1
    rtol_small: float = 0.01
    top: int = 12

    def check(self):
        """Checks every field (ValueError / TypeError naming it as config.<field>) before any work; returns self."""
        d = check.integer(self.d, "config.d", low=1, what="the input and output dimension")
        inner = check_values(self.inner, "config.inner", lambda v, n: check.integer(v, n, low=1), "inner dimensions")
        if min(inner) > d:
            check.fail(ValueError, "config.inner", "a bottleneck with min(inner) <= d = %d" % d, repr(self.inner))
        check.integer(self.n_train, "config.n_train", low=2, what="training points")
        check.integer(self.n_test, "config.n_test", low=0, what="test points")
        check.integer(self.width, "config.width", low=1, what="the width w of the representations")
        check_depths(self.depths)
        check_nonnegative(self.lam, "config.lam", "the weight decay")
        check.integer(self.adam_steps, "config.adam_steps", low=0, what="Adam steps")
        check_positive(self.lr, "config.lr", "the Adam learning rate of M_l")
        check_nonnegative(self.rtol, "config.rtol", "the relative cutoff of a large singular value")
        check_nonnegative(self.rtol_small, "config.rtol_small", "the relative cutoff of a small singular value")
        check.integer(self.top, "config.top", low=1, what="singular values kept per layer")
        return self


FCNN_BOTTLENECK = {"full": FCNNBottleneckConfig(),
                   "quick": FCNNBottleneckConfig(n_train=200, n_test=200, width=32, depths=(2, 4, 8), adam_steps=2500)}


def _spectrum_counts(X, rtol, rtol_small, top):
    """Singular values of X [N, w] (uncentered) and of X minus its mean row (centered): the top ones relative to the
    largest, and how many exceed rtol / rtol_small of the largest."""
    out = {}
    for name, M in (("centered", X - X.mean(0)), ("uncentered", X)):
        s = torch.linalg.svdvals(M)
        rel = s / s[0] if float(s[0]) > 0 else s
        out[name] = {"relative": rel[:top].tolist(), "count": int((rel > rtol).sum()),
                     "count_small": int((rel > rtol_small).sum()), "entropy_rank": entropy_rank(s)}
    return out


def run_fcnn_bottleneck(out, *, quick=False, device="cpu", dtype=None, seeds=(0,), progress=None, log=print,
                        config=None, shard=None):
    """fcnn-bottleneck: the number of large singular values of the representations of L2-regularized deep ReLU
    fully-connected nets against depth L, on :func:`leakycuda.data.bottleneck_task` (k* = min(inner)).

    For each seed (task and init) and L: :func:`fully_connected_resnet` trained by :func:`leakycuda.train.fit`
    (Adam only) on MSE + lam/2 sum_l ||M_l||_F^2. Measured on the training inputs, for every representation
    X_0..X_L ([N, w], the pre-activations): singular values relative to the largest, centered and uncentered, and
    the count above rtol (and rtol_small); singular values of every M_l. Reported: the centered count at the middle
    layer X_{L//2} and the smallest count over the hidden layers X_1..X_{L-1}. dtype None: float32.
    Writes fcnn_bottleneck.json and fcnn_bottleneck.png to ``out``.
    ``shard`` ("i/n"): only shard i of n of the runs, into a part file (leakycuda.experiments.distribute).
    """
    cfg = checked_config(config, FCNNBottleneckConfig, FCNN_BOTTLENECK, quick)
    out, device, dtype, seeds = check_preset_run(out, device, dtype or torch.float32, seeds)
    shard = check_shard(shard)
    t0 = time.perf_counter()
    plan = [(seed, L) for seed in seeds for L in cfg.depths]
    tasks = {}

    def task_of(seed):
        if seed not in tasks:
            tasks.clear()
            tasks[seed] = bottleneck_task(d=cfg.d, inner=cfg.inner, n_train=cfg.n_train, n_test=cfg.n_test,
                                          seed=seed, dtype=dtype, device=device)
        return tasks[seed]

    def run_one(i):
        seed, L = plan[i]
        task = task_of(seed)
        t = time.perf_counter()
        torch.manual_seed(30_000 + 100 * seed + L)
        model = fully_connected_resnet(cfg.d, cfg.d, cfg.width, L, device=device, dtype=dtype,
                                       generator=torch.Generator().manual_seed(40_000 + 100 * seed + L))
        result = fit(model, task, cfg.lam, adam_steps=cfg.adam_steps, adam_lr=cfg.lr * L, sgd_steps=0,
                     log_every=max(1, cfg.adam_steps // 50), progress=progress,
                     desc="fcnn-bottleneck L=%d seed=%d" % (L, seed))
        with torch.no_grad():
            xs = model.representations(task.x_train).double().cpu()
            sv_m = torch.linalg.svdvals(model.weight.double().cpu() / L)[:, : cfg.top]
        layers = [_spectrum_counts(X, cfg.rtol, cfg.rtol_small, cfg.top) for X in xs]
        hidden = [layers[l]["centered"]["count"] for l in range(1, L)]
        f = result.final
        run = {"seed": seed, "L": L, "seconds": time.perf_counter() - t,
               "final": {k: f[k] for k in ("loss", "train_mse", "reg", "test_mse")},
               "history": [{k: h[k] for k in ("step", "loss", "train_mse", "reg", "test_mse")}
                           for h in result.history],
               "layers": layers, "sv_m": sv_m.tolist(), "middle": L // 2,
               "count_middle": layers[L // 2]["centered"]["count"],
               "count_min_hidden": min(hidden) if hidden else None}
        log("fcnn-bottleneck seed=%d L=%-2d train MSE %.3g test MSE %.3g reg %.3g  large singular values of "
            "X_%d (centered, > %g max): %d; min over hidden layers %s; relative %s  (%.0f s)"
            % (seed, L, f["train_mse"], f["test_mse"], f["reg"], L // 2, cfg.rtol, run["count_middle"],
               run["count_min_hidden"], " ".join("%.2g" % v for v in layers[L // 2]["centered"]["relative"][:6]),
               run["seconds"]))
        return run

    header = log_header("fcnn-bottleneck", quick, cfg, dtype, seeds)
    header["task"] = task_of(seeds[-1]).describe()  # the task of the last seed (the others differ in "seed" only)
    jobs = [Job("seed=%d L=%d" % (seed, L), cost=float(L * cfg.adam_steps)) for seed, L in plan]
    return run_jobs("fcnn-bottleneck", header, jobs, run_one, out=out, device=device, shard=shard, log=log, t0=t0)


def plot_fcnn_bottleneck(data, out):
    """fcnn_bottleneck.png (first seed) from a fcnn_bottleneck.json dict: the middle representation's spectrum for
    each L, the count of large singular values per layer against p = l/L, and the counts against L."""
    plt = plots._plt()
    cfg, seed = data["config"], data["seeds"][0]
    k = min(cfg["inner"])
    runs = [r for r in data["runs"] if r["seed"] == seed]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.0))
    ax = axes[0]
    for i, r in enumerate(runs):
        rel = r["layers"][r["middle"]]["centered"]["relative"]
        ax.plot(range(1, len(rel) + 1), [max(v, 1e-6) for v in rel], "-o", ms=3, color="C%d" % i,
                label="L = %d ($X_{%d}$)" % (r["L"], r["middle"]))
    ax.axhline(cfg["rtol"], color="k", ls=":", lw=0.8, label="threshold %g" % cfg["rtol"])
    ax.axvline(k + 0.5, color="0.6", ls="--", lw=0.8, label="$k^* = %d$" % k)
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.5)
    ax.set_xlabel("index $i$")
    ax.set_ylabel("$s_i / s_1$ of the middle representation (centered)")
    ax.set_title("Spectrum of the middle layer", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, r in enumerate(runs):
        L = r["L"]
        ax.plot([l / L for l in range(L + 1)], [lay["centered"]["count"] for lay in r["layers"]], "-o", ms=3,
                color="C%d" % i, label="L = %d" % L)
    ax.axhline(k, color="k", ls="--", lw=0.8, label="$k^* = %d$" % k)
    ax.set_xlabel("depth position $p = \\ell / L$ of $X_\\ell$")
    ax.set_ylabel("# singular values > %g $s_1$ (centered)" % cfg["rtol"])
    ax.set_title("Large singular values across the layers", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[2]
    Ls = [r["L"] for r in runs]
    plot_over_seeds(ax, data["runs"], Ls, lambda r: r["count_middle"], "-o", "C0", "middle layer $X_{L//2}$")
    plot_over_seeds(ax, data["runs"], Ls, lambda r: r["count_min_hidden"], "-s", "C1", "fewest over hidden layers")
    plot_over_seeds(ax, data["runs"], Ls, lambda r: r["layers"][r["middle"]]["centered"]["count_small"], ":^", "0.5",
                "middle layer, > %g $s_1$" % cfg["rtol_small"])
    ax.axhline(k, color="k", ls="--", lw=0.8, label="$k^* = %d$" % k)
    ax.set_xlabel("number of layers $L$ ($\\rho_\\ell \\tilde L = 1$)")
    ax.set_ylabel("# large singular values")
    ax.set_title("Deep ReLU nets, $\\lambda = %g$: bottleneck vs depth" % cfg["lam"], fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return {"png": plots._save(fig, os.path.join(out, "fcnn_bottleneck.png"))}


EXPERIMENT = Experiment(
    name="fcnn-bottleneck", run=run_fcnn_bottleneck, finish=finisher("fcnn-bottleneck", plot_fcnn_bottleneck),
    plot=lambda data, out, json_path: plot_fcnn_bottleneck(data, out), fields=("config", "seeds", "runs"),
    matches=lambda data: data.get("experiment") == "fcnn-bottleneck",
    help="deep ReLU fully-connected nets (rho * Lt = 1) with L2: large singular values of the middle "
         "representations against depth",
    full="30 -> 3 -> 30 task, 400 points, width 48, lam = 0.1, L = 2, 3, 4, 6, 8, 12, 6000 Adam steps",
    quick="200 points, width 32, L = 2, 4, 8, 2500 Adam steps")
