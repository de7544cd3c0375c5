"""The related papers in the same kernels: deep linear networks (rank bias of L2, saddle-to-saddle dynamics) and the
bottleneck of deep fully-connected ReLU nets, each the rho_l * Lt = 1 limit of the leaky stack; JSON and PNGs."""
import dataclasses
import json
import math
import os
import time
import types

import torch
from torch import nn

from . import plots
from ._env import machine_info
from .data import bottleneck_task
from . import _validate as check
from .experiments import file_names
from .functional import leaky_stack
from .module import LeakyResNet
from .train import fit, mse

__all__ = ["EXPERIMENTS", "DLN_RANK", "DLN_SADDLE", "FCNN_BOTTLENECK", "DeepLinear", "entropy_rank",
           "fully_connected_steps", "low_rank_regression", "numerical_rank", "replot", "run_dln_rank",
           "run_dln_saddle", "run_fcnn_bottleneck", "schatten_minimizer", "schatten_thresholds"]


# --- the fully-connected limit and deep linear networks ------------------------------------------------------------


def fully_connected_steps(L, *, dtype=torch.float32, device=None):
    """(rho [L], Lt) with rho_l = 1/L and Lt = 1/rho_l: every layer has rho_l * Lt = 1, so the skip term
    (1 - rho_l Lt) X_{l-1} vanishes and layer l is the dense layer X_l = rho_l sigma(X_{l-1}) W_l^T.

    rho_l is 1/L rounded to ``dtype`` (float32 rounds 1/3 up); Lt is the largest float64 with rho_l * Lt <= 1,
    so Lt = L up to rounding and no layer overshoots (no warning from LeakyResNet).
    """
    rho = torch.full((L,), 1.0 / L, dtype=dtype, device=device)
    r = float(rho[0])
    Lt = 1.0 / r
    while r * Lt > 1.0:
        Lt = math.nextafter(Lt, 0.0)
    return rho, Lt


class DeepLinear(nn.Module):
    """A deep linear network x -> x A^T, A = P_out M_L ... M_1 P_in, run through ``leaky_stack``.

    x: [N, d_in] -> [N, d_out]; the layers M_l are ``layers`` [L, w, w] (the only parameter). The input is
    zero-padded to the width w (P_in = [I; 0]) and the output is the first d_out coordinates (P_out = [I, 0]);
    d_in = d_out = w (the default) is the plain square network. The stack runs with ``activation="linear"``
    (sigma(X) = [X, 1]), rho_l = 1/L, Lt = L (rho_l * Lt = 1, :func:`fully_connected_steps`) and
    W_l = [M_l / rho_l | 0], so layer l computes X_l = (1 - rho_l Lt) X_{l-1} + rho_l [X_{l-1}, 1] W_l^T =
    X_{l-1} M_l^T. The bias column of W is held at zero (a deep linear network is linear, not affine): it is built
    as zeros in :meth:`stack_weight` and is not a parameter, so no optimiser moves it.

    ``regularization(lam)`` = lam/2 sum_l ||M_l||_F^2, which equals LeakyResNet's lam/(2 Lt) sum_l rho_l ||W_l||_F^2
    at rho_l * Lt = 1. :meth:`end_to_end` gives A [d_out, d_in] by running the op on the identity.

    init: "orthogonal" (M_l = scale * Q_l with Haar-random orthogonal Q_l) or "gaussian" (entries of M_l i.i.d.
    N(0, scale^2 / w): singular values of order scale). ``generator``: a CPU ``torch.Generator`` for reproducible
    draws. float32 or float64, on the op's devices.
    """

    INITS = ("orthogonal", "gaussian")

    def __init__(self, width, depth, *, in_features=None, out_features=None, init="orthogonal", scale=1.0,
                 generator=None, device=None, dtype=None):
        super().__init__()
        if init not in self.INITS:
            raise ValueError("init must be one of %s, got %r" % (", ".join(map(repr, self.INITS)), init))
        self.width, self.depth = int(width), int(depth)
        w, L = self.width, self.depth
        self.in_features = w if in_features is None else int(in_features)
        self.out_features = w if out_features is None else int(out_features)
        if not (1 <= self.in_features <= w and 1 <= self.out_features <= w):
            raise ValueError("in_features and out_features must be in [1, width] = [1, %d], got %d and %d"
                             % (w, self.in_features, self.out_features))
        G = torch.randn(L, w, w, generator=generator, dtype=torch.float64)
        if init == "orthogonal":
            Q, R = torch.linalg.qr(G)
            G = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]  # Haar: fix the signs of R's diagonal
        else:
            G = G / math.sqrt(w)
        self.layers = nn.Parameter((scale * G).to(device=device, dtype=dtype))
        rho, self.Lt = fully_connected_steps(L, dtype=self.layers.dtype, device=self.layers.device)
        self.register_buffer("rho", rho)

    def stack_weight(self):
        """The op's weights W [L, w, w+1] = [M_l / rho_l | 0] (differentiable in ``layers``)."""
        V = self.layers / self.rho[:, None, None]
        return torch.cat([V, torch.zeros_like(V[..., :1])], dim=-1)

    def forward(self, x, *, return_all=False):
        """x: [N, d_in] -> x A^T [N, d_out]; with ``return_all``, every X_0..X_L [L+1, N, w] (padded width)."""
        x0 = torch.nn.functional.pad(x, (0, self.width - self.in_features))
        xs = leaky_stack(x0, self.stack_weight(), self.rho, self.Lt, return_all=return_all, activation="linear")
        return xs if return_all else xs[..., : self.out_features]

    def end_to_end(self):
        """A [d_out, d_in], through the op: the network maps the identity I_{d_in} to the rows of A^T."""
        eye = torch.eye(self.in_features, dtype=self.layers.dtype, device=self.layers.device)
        return self(eye).transpose(0, 1)

    def regularization(self, lam):
        """lam/2 * sum_l ||M_l||_F^2 (a 0-d tensor)."""
        return 0.5 * lam * self.layers.square().sum()


# --- the Schatten-2/L problem of an L2-regularized deep linear network ---------------------------------------------


def low_rank_regression(d, spectrum, n, *, noise=0.0, seed=0, dtype=torch.float64, device=None):
    """A whitened linear regression task with a low-rank teacher: y = A* x + noise.

    Inputs X [n, d] (n >= d) are whitened exactly: X^T X / n = I_d. A* = U diag(spectrum) V^T [d, d] with Haar-random
    U, V (rank = len(spectrum) <= d); Y = X A*^T + noise * Z, Z standard Gaussian. For every A,
    (1/n) ||X A^T - Y||_F^2 = ||A - B||_F^2 + const with B = Y^T X / n (the least-squares map). Everything is drawn in
    float64 on the CPU from a generator seeded with ``seed`` and then cast.
    Returns a dict: x [n, d], y [n, d], A_star [d, d], B [d, d].
    """
    spectrum = torch.as_tensor(spectrum, dtype=torch.float64)
    r = spectrum.numel()
    if not 1 <= r <= d or n < d:
        raise ValueError("need 1 <= len(spectrum) <= d <= n, got len(spectrum) = %d, d = %d, n = %d" % (r, d, n))
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    A_star = U[:, :r] @ torch.diag(spectrum) @ V[:, :r].T
    x = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0] * math.sqrt(n)
    y = x @ A_star.T + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
    B = y.T @ x / n
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return {"x": cast(x), "y": cast(y), "A_star": cast(A_star), "B": cast(B)}


def schatten_thresholds(lam, L):
    """(b_exist, b_star) of the scalar problem min_{s >= 0} (s - b)^2 + (lam L / 2) s^(2/L), L >= 1.

    b_star: the singular value of B above which the global minimizer is non-zero; b_exist <= b_star: the one above
    which a non-zero local minimizer exists. L = 1: both 0 (ridge never zeroes); L = 2: both lam/2 (soft threshold);
    L >= 3, with p = 2/L, c = lam L / 2, k = lam / 2, s0 = (k (1-p))^(1/(2-p)):
    b_exist = s0 (2-p)/(1-p) and b_star = (2-p)/(2(1-p)) * (c (1-p))^(1/(2-p)).
    """
    if L == 1:
        return 0.0, 0.0
    if L == 2:
        return lam / 2, lam / 2
    p, c, k = 2.0 / L, lam * L / 2.0, lam / 2.0
    s0 = (k * (1 - p)) ** (1 / (2 - p))
    return s0 * (2 - p) / (1 - p), (2 - p) / (2 * (1 - p)) * (c * (1 - p)) ** (1 / (2 - p))


def _scalar_minimizer(b, lam, L, branch):
    """s(b) for b [k] >= 0 (float64): the global minimizer (branch "global") or the largest local minimizer
    ("largest") of (s - b)^2 + (lam L / 2) s^(2/L) over s >= 0."""
    if L == 1:
        return b / (1 + lam / 2)
    if L == 2:
        return (b - lam / 2).clamp_min(0.0)
    # Non-zero stationary points solve g(s) = s + (lam/2) s^(p-1) = b; g is convex with its minimum at s0, so the
    # larger root lies in [s0, b] when b >= g(s0) and is the local minimizer. Bisection to float64 resolution.
    p, k = 2.0 / L, lam / 2.0
    s0 = (k * (1 - p)) ** (1 / (2 - p))
    g = lambda s: s + k * s ** (p - 1)  # noqa: E731
    exists = b >= g(torch.tensor(s0, dtype=b.dtype))
    lo, hi = torch.full_like(b, s0), torch.maximum(b, torch.full_like(b, s0))
    for _ in range(200):
        mid = (lo + hi) / 2
        below = g(mid) < b
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    s = torch.where(exists, (lo + hi) / 2, torch.zeros_like(b))
    if branch == "largest":
        return s
    f = (s - b).square() + (lam * L / 2) * s ** p
    return torch.where(f < b.square(), s, torch.zeros_like(b))


def schatten_minimizer(B, lam, L, *, branch="global"):
    """The end-to-end matrix an L2-regularized deep linear network of depth L converges to on a whitened regression.

    Problem. With whitened inputs the loss (1/n) ||X A^T - Y||_F^2 + lam/2 sum_l ||M_l||_F^2, A = M_L ... M_1, is
    ||A - B||_F^2 + lam/2 sum_l ||M_l||_F^2 + const (B: :func:`low_rank_regression`). Over all factorizations of a
    given A, sum_l ||M_l||_F^2 >= L sum_i s_i(A)^(2/L) = L ||A||_{S_{2/L}}^{2/L} (AM-GM on the singular values,
    equality for balanced factors M_l = U_l diag(s^(1/L)) U_{l-1}^T), so in A the problem is
        min_A ||A - B||_F^2 + (lam L / 2) sum_i s_i(A)^(2/L),
    the Schatten-2/L quasi-norm penalty. By von Neumann's trace inequality a minimizer shares B's singular vectors,
    so the problem separates over the singular values b_i of B into min_{s >= 0} (s - b_i)^2 + (lam L / 2) s^(2/L):
    L = 1: s = b / (1 + lam/2) (ridge shrinkage, no zeros); L = 2: s = max(b - lam/2, 0) (soft threshold, the
    nuclear norm); L >= 3: s = 0 below the threshold b_star of :func:`schatten_thresholds`, which grows with L, and
    above it the larger root of s + (lam/2) s^(2/L - 1) = b (a jump: hard-threshold-like). Depth raises the
    threshold, so the minimizer's rank falls with L.

    branch: "global" gives the global minimizer; "largest" the non-zero local minimizer wherever one exists
    (b >= b_exist), which is where gradient descent from singular values above it stops: for b in [b_exist, b_star)
    it keeps a singular value the global minimizer sets to zero. B: [d, d'] (float64 recommended). Returns A [d, d'].
    """
    if branch not in ("global", "largest"):
        raise ValueError("branch must be 'global' or 'largest', got %r" % (branch,))
    U, b, Vh = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    s = _scalar_minimizer(b, float(lam), int(L), branch)
    return (U * s) @ Vh


def numerical_rank(s, rtol=1e-3):
    """The number of singular values s [k] above rtol * max(s)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0


def entropy_rank(s):
    """The effective rank exp(H(p)), p_i = s_i / sum s (Roy & Vetterli 2007): a continuous count of the s [k]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# --- shared training and output helpers --------------------------------------------------------------------------


def _gradient_descent(model, x, y, lam, lr, steps, *, record_at=(), record=None, progress=None, desc=None):
    """Full-batch gradient descent (no momentum) on mse(model(x), y) + model.regularization(lam), run by :func:`fit`
    (SGD only); ``record(step, loss)`` is called before the update of every step in ``record_at`` (and after the
    last step)."""
    if record is not None and (0 in record_at or steps == 0):
        with torch.no_grad():
            loss = float(mse(model(x), y) + model.regularization(lam))
        record(0, loss)
    if steps == 0:
        return
    at = sorted({s for s in record_at if 0 < s < steps} | {steps})
    fit(model, types.SimpleNamespace(x_train=x, y_train=y), lam, adam_steps=0, sgd_steps=steps, sgd_lr=lr,
        log_every=at, checkpoint_every=None, progress=progress, desc=desc, diverge_factor=None, cuda_graph=False,
        callback=None if record is None else lambda step, _, rec: record(step, rec["loss"]))


def _rounded(values, digits=6):
    """A nested list of floats rounded to ``digits`` significant digits (trajectories for JSON)."""
    if isinstance(values, (list, tuple)):
        return [_rounded(v, digits) for v in values]
    return float("%.*g" % (digits, values))


def _finish(name, data, out, plot, t0, log):
    """Writes the PNGs and ``<name>.json`` (with the wall time; compact, as the trajectories make it long) to
    ``out``; returns the result dict."""
    os.makedirs(out, exist_ok=True)
    data["seconds"] = time.perf_counter() - t0
    files = plot(data, out)
    files["json"] = os.path.join(out, name.replace("-", "_") + ".json")
    data["files"] = file_names(files)
    with open(files["json"], "w") as f:
        json.dump(data, f, separators=(",", ":"))
    log("%s: wrote %s (%.1f s)" % (name, ", ".join(files.values()), data["seconds"]))
    return dict(data, files=files)


def _over_seeds(ax, runs, Ls, value, fmt, color, label):
    """Plots value(run) against L: the mean over seeds, with the min..max over seeds as error bars."""
    import numpy as np

    v = [[value(r) for r in runs if r["L"] == L] for L in Ls]
    mean = np.array([np.mean(a) for a in v])
    err = (mean - [min(a) for a in v], [max(a) for a in v] - mean)
    n = max(len(a) for a in v)
    ax.errorbar(Ls, mean, yerr=err if n > 1 else None, fmt=fmt, color=color, ms=5, capsize=2,
                label=label + (" (mean, min..max of %d seeds)" % n if n > 1 else ""))


def _check_run(out, device, dtype, seeds):
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


def _header(name, quick, cfg, device, dtype, seeds):
    return {"experiment": name, "quick": quick, "config": dataclasses.asdict(cfg), "seeds": seeds,
            "dtype": str(dtype).replace("torch.", ""), "machine": machine_info(device)}


# --- dln-rank -----------------------------------------------------------------------------------------------------


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


DLN_RANK = {"full": DLNRankConfig(), "quick": DLNRankConfig(steps=1500)}


def run_dln_rank(out, *, quick=False, device="cpu", dtype=None, seeds=(0,), progress=None, log=print, config=None):
    """dln-rank: singular values and effective rank of the end-to-end matrix of L2-regularized deep linear networks
    against depth L, next to the closed-form Schatten-2/L minimizer (:func:`schatten_minimizer`).

    For each seed (task and init) and depth L: a :class:`DeepLinear` of width d (orthogonal init, so A starts with
    every singular value 1) is trained by full-batch gradient descent at lr = lr0 / L (the curvature at the solution
    grows like L s^(2 - 2/L)) on :func:`low_rank_regression`, at one lam. Reported per run: the learned singular
    values, the global and the "largest" (local) closed-form minimizers, their numerical ranks (values above
    rtol * max) and entropy ranks, the largest gap between learned and each prediction, and the gradient norm at
    the end (stationarity). dtype None: float64. Writes dln_rank.json and dln_rank.png to ``out``.
    """
    cfg = config or DLN_RANK["quick" if quick else "full"]
    out, device, dtype, seeds = _check_run(out, device, dtype or torch.float64, seeds)
    t0 = time.perf_counter()
    data = _header("dln-rank", quick, cfg, device, dtype, seeds)
    data["thresholds"] = {str(L): dict(zip(("b_exist", "b_star"), schatten_thresholds(cfg.lam, L)))
                          for L in cfg.depths}
    runs = []
    for seed in seeds:
        task = low_rank_regression(cfg.d, cfg.spectrum, cfg.n, noise=cfg.noise, seed=seed, dtype=dtype, device=device)
        b = torch.linalg.svdvals(task["B"].double()).cpu()
        for L in cfg.depths:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(10_000 + 100 * seed + L)
            model = DeepLinear(cfg.d, L, init=cfg.init, scale=cfg.init_scale, generator=gen, device=device,
                               dtype=dtype)
            losses = []
            _gradient_descent(model, task["x"], task["y"], cfg.lam, cfg.lr0 / L, cfg.steps,
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
            runs.append(run)
            log("dln-rank seed=%d L=%d  learned rank %d (global minimizer %d, largest local %d)  max|s - s_global| "
                "%.2g  max|s - s_local| %.2g  |grad| %.1g  (%.1f s)"
                % (seed, L, run["rank"], run["rank_global"], run["rank_largest"], run["max_abs_diff_global"],
                   run["max_abs_diff_largest"], run["grad_norm"], run["seconds"]))
    data["runs"] = runs
    return _finish("dln-rank", data, out, plot_dln_rank, t0, log)


def plot_dln_rank(data, out):
    """dln_rank.png from a dln_rank.json dict (first seed): singular values against L, and the ranks against L."""
    plt = plots._plt()
    cfg, seed = data["config"], data["seeds"][0]
    runs = [r for r in data["runs"] if r["seed"] == seed]
    Ls = [r["L"] for r in runs]
    x = range(len(Ls))
    k = len(cfg["spectrum"]) + 2
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
        _over_seeds(ax2, data["runs"], Ls, lambda r: r[key], fmt, color, label)
    ax2.axhline(sum(1 for v in cfg["spectrum"] if v > 0), color="k", lw=0.8, ls="--", label="teacher rank")
    ax2.set_xlabel("depth $L$")
    ax2.set_ylabel("rank (values > %g max)" % cfg["rtol"])
    ax2.set_title("Depth strengthens the low-rank bias", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    return {"png": plots._save(fig, os.path.join(out, "dln_rank.png"))}


# --- dln-saddle ---------------------------------------------------------------------------------------------------


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


def run_dln_saddle(out, *, quick=False, device="cpu", dtype=None, seeds=(0,), progress=None, log=print, config=None):
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
    """
    cfg = config or DLN_SADDLE["quick" if quick else "full"]
    out, device, dtype, seeds = _check_run(out, device, dtype or torch.float64, seeds)
    t0 = time.perf_counter()
    data = _header("dln-saddle", quick, cfg, device, dtype, seeds)
    target = torch.tensor(cfg.spectrum, dtype=torch.float64)
    runs = []
    for seed in seeds:
        task = low_rank_regression(cfg.d, cfg.spectrum, cfg.n, seed=seed, dtype=dtype, device=device)
        U, _, Vh = torch.linalg.svd(task["A_star"].double().cpu())
        r = len(cfg.spectrum)
        for L in cfg.depths:
            for init in ("small", "large"):
                t = time.perf_counter()
                if init == "small":
                    lr = cfg.lr0 / (L * float(target[0]) ** (2 - 2 / L))
                    steps = int(math.ceil(cfg.horizon_small[L] / lr))
                else:
                    steps = cfg.steps_large
                    lr = cfg.horizon_large[L] / steps
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
                _gradient_descent(model, task["x"], task["y"], 0.0, lr, steps,
                                  record_at=set(range(min(steps, 50))) | set(range(0, steps, every)), record=record,
                                  progress=progress, desc="dln-saddle L=%d %s seed=%d" % (L, init, seed))
                rise = _rise_times(torch.tensor(times), torch.tensor(projs), target)
                change = float((model.layers.detach() - M0).norm() / M0.norm())
                run = {"seed": seed, "L": L, "init": init, "lr": lr, "steps": steps, "seconds": time.perf_counter() - t,
                       "t": _rounded(times), "singular_values": _rounded(svals), "projections": _rounded(projs),
                       "loss": _rounded(losses),
                       "weight_change": change, "rise": rise, "summary": _saddle_summary(rise)}
                runs.append(run)
                sm = run["summary"]
                log("dln-saddle seed=%d L=%d %-5s t50 %s  sequential %s  t50 spread %s  weight change %.3g  "
                    "final loss %.2g  (%d steps, %.1f s)"
                    % (seed, L, init, ", ".join("-" if v is None else "%.3g" % v for v in rise["t50"]),
                       sm.get("sequential"), "%.3g" % sm["t50_spread"] if sm["complete"] else "-", change,
                       losses[-1], steps, run["seconds"]))
    data["runs"] = runs
    return _finish("dln-saddle", data, out, plot_dln_saddle, t0, log)


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


# --- fcnn-bottleneck ----------------------------------------------------------------------------------------------


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


FCNN_BOTTLENECK = {"full": FCNNBottleneckConfig(),
                   "quick": FCNNBottleneckConfig(n_train=200, n_test=200, width=32, depths=(2, 4, 8), adam_steps=2500)}


def fully_connected_resnet(d_in, d_out, width, L, *, generator=None, device=None, dtype=None):
    """A LeakyResNet in the fully-connected limit (rho_l * Lt = 1): a dense ReLU net of L layers with fixed random
    projections, X_l = sigma(X_{l-1}) M_l^T with M_l = W_l / L, He-initialised in M (V_l = L * N(0, 2/w), b_l = 0).
    Its regularization lam/(2 Lt) sum_l rho_l ||W_l||_F^2 is lam/2 sum_l ||M_l||_F^2."""
    rho, Lt = fully_connected_steps(L, dtype=dtype or torch.get_default_dtype(), device=device)
    model = LeakyResNet(d_in, d_out, width, L, Lt, learn_projections=False, device=device, dtype=dtype)
    V = torch.randn(L, width, width, generator=generator, dtype=torch.float64) * (L * math.sqrt(2.0 / width))
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, :, :width].copy_(V)
    return model


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
                        config=None):
    """fcnn-bottleneck: the number of large singular values of the representations of L2-regularized deep ReLU
    fully-connected nets against depth L, on :func:`leakycuda.data.bottleneck_task` (k* = min(inner)).

    For each seed (task and init) and L: :func:`fully_connected_resnet` trained by :func:`leakycuda.train.fit`
    (Adam only) on MSE + lam/2 sum_l ||M_l||_F^2. Measured on the training inputs, for every representation
    X_0..X_L ([N, w], the pre-activations): singular values relative to the largest, centered and uncentered, and
    the count above rtol (and rtol_small); singular values of every M_l. Reported: the centered count at the middle
    layer X_{L//2} and the smallest count over the hidden layers X_1..X_{L-1}. dtype None: float32.
    Writes fcnn_bottleneck.json and fcnn_bottleneck.png to ``out``.
    """
    cfg = config or FCNN_BOTTLENECK["quick" if quick else "full"]
    out, device, dtype, seeds = _check_run(out, device, dtype or torch.float32, seeds)
    t0 = time.perf_counter()
    data = _header("fcnn-bottleneck", quick, cfg, device, dtype, seeds)
    runs = []
    for seed in seeds:
        task = bottleneck_task(d=cfg.d, inner=cfg.inner, n_train=cfg.n_train, n_test=cfg.n_test, seed=seed,
                               dtype=dtype, device=device)
        data["task"] = task.describe()
        for L in cfg.depths:
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
            runs.append(run)
            log("fcnn-bottleneck seed=%d L=%-2d train MSE %.3g test MSE %.3g reg %.3g  large singular values of "
                "X_%d (centered, > %g max): %d; min over hidden layers %s; relative %s  (%.0f s)"
                % (seed, L, f["train_mse"], f["test_mse"], f["reg"], L // 2, cfg.rtol, run["count_middle"],
                   run["count_min_hidden"], " ".join("%.2g" % v for v in layers[L // 2]["centered"]["relative"][:6]),
                   run["seconds"]))
    data["runs"] = runs
    return _finish("fcnn-bottleneck", data, out, plot_fcnn_bottleneck, t0, log)


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
    _over_seeds(ax, data["runs"], Ls, lambda r: r["count_middle"], "-o", "C0", "middle layer $X_{L//2}$")
    _over_seeds(ax, data["runs"], Ls, lambda r: r["count_min_hidden"], "-s", "C1", "fewest over hidden layers")
    _over_seeds(ax, data["runs"], Ls, lambda r: r["layers"][r["middle"]]["centered"]["count_small"], ":^", "0.5",
                "middle layer, > %g $s_1$" % cfg["rtol_small"])
    ax.axhline(k, color="k", ls="--", lw=0.8, label="$k^* = %d$" % k)
    ax.set_xlabel("number of layers $L$ ($\\rho_\\ell \\tilde L = 1$)")
    ax.set_ylabel("# large singular values")
    ax.set_title("Deep ReLU nets, $\\lambda = %g$: bottleneck vs depth" % cfg["lam"], fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return {"png": plots._save(fig, os.path.join(out, "fcnn_bottleneck.png"))}


# --- registry and replot ------------------------------------------------------------------------------------------

_PLOTS = {"dln-rank": plot_dln_rank, "dln-saddle": plot_dln_saddle, "fcnn-bottleneck": plot_fcnn_bottleneck}

#: ``leakycuda reproduce <name> [--quick]``: name -> the run function and what its two forms do.
EXPERIMENTS = {
    "dln-rank": {
        "run": run_dln_rank,
        "help": "L2-regularized deep linear nets: end-to-end spectrum and rank against depth, vs the closed-form "
                "Schatten-2/L minimizer",
        "full": "16 -> 16 whitened regression, rank-6 teacher + noise, lam = 0.2, L = 1, 2, 3, 4, 6, 8, 6000 GD steps",
        "quick": "the same with 1500 GD steps",
    },
    "dln-saddle": {
        "run": run_dln_saddle,
        "help": "deep linear nets: singular values over gradient descent, small init (saddle to saddle) vs large "
                "init (lazy)",
        "full": "16 -> 16 teacher with singular values 4, 2, 1, 0.5, width 64, L = 2, 3, 4, both inits",
        "quick": "the same at L = 3 only",
    },
    "fcnn-bottleneck": {
        "run": run_fcnn_bottleneck,
        "help": "deep ReLU fully-connected nets (rho * Lt = 1) with L2: large singular values of the middle "
                "representations against depth",
        "full": "30 -> 3 -> 30 task, 400 points, width 48, lam = 0.1, L = 2, 3, 4, 6, 8, 12, 6000 Adam steps",
        "quick": "200 points, width 32, L = 2, 4, 8, 2500 Adam steps",
    },
}


def replot(json_path, out=None):
    """Redraws the PNGs of a run from its JSON (dln_rank.json, dln_saddle.json or fcnn_bottleneck.json) into
    ``out`` (default: beside the JSON); returns {name: path}."""
    with open(json_path) as f:
        data = json.load(f)
    out = out or os.path.dirname(os.path.abspath(json_path))
    return _PLOTS[data["experiment"]](data, out)
