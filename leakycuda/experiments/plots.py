"""Matplotlib figures (Agg backend, small PNGs) of the demo and of the paper's Figures 1 and 2.

Every figure has a title, labelled axes with units or definitions, and a legend for every colour
and marker; log axes print plain numbers (2, 3, 5 rather than 2x10^0).
"""
import math
import os

import numpy as np

_DPI = 90


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def _np(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=float)


def _plain_number(v, _pos=None):
    """Tick label of a log axis: 0.5, 2, 30, 1e+04 (no mantissa x 10^k)."""
    if v <= 0 or not math.isfinite(v):
        return ""
    return "%g" % float("%.2g" % v)


def _log_y(ax):
    """A log y axis whose ticks read as plain numbers; minor ticks are labelled when the range is under two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    if hi / max(lo, 1e-300) < 100:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain_number))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _symlog_ticks(ax):
    """Plain-number ticks on a symlog y axis: a few in the linear part (multiples of linthresh/2), then
    1-2-5 steps outward."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = ax.get_ylim()
    lin = ax.yaxis.get_transform().linthresh
    steps = [m * 10 ** e for e in range(0, 6) for m in (1, 2, 5)]
    step = max(1, int(round(lin / 2)))
    inner = [float(v) for v in range(-int(lin) + step, int(lin), step)]
    outer = [v for v in steps if v > lin * 1.5] + [-v for v in steps if v > lin * 1.5]
    ticks = sorted(v for v in inner + outer if lo <= v <= hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: "%g" % v))


def _spectrum_panel(ax, p, svals, title, top, rank=None):
    """Singular values against depth: the first ``rank`` in red, the rest grey; returns legend handles."""
    s = _np(svals)[:, :top]
    handles = {}
    for j in range(s.shape[1]):
        big = rank is not None and j < rank
        line, = ax.plot(p, np.maximum(s[:, j], 1e-12), color="C3" if big else "0.55", lw=1.3 if big else 0.8)
        handles.setdefault(big, line)
    ax.set_xlabel("depth p")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _log_y(ax)
    labels = []
    if True in handles:
        labels.append((handles[True], "largest %d (k* = %d)" % (rank, rank)))
    if False in handles:
        labels.append((handles[False], "the others (top %d shown)" % top if rank is not None else "top %d" % top))
    return labels


def _layer_ticks(ax, p):
    """Marks the layer positions p_l as ticks along the bottom of a panel; returns the legend handle."""
    lo, hi = ax.get_ylim()
    handle, = ax.plot(p, np.full(len(p), lo), "|", color="k", ms=8, clip_on=False)
    ax.set_ylim(lo, hi)
    return handle, "layer positions $p_\\ell$"


def plot_spectra(p_x, sv_x, p_w, sv_w, path, *, rank=None, top=12, steps=None, title=None):
    """Singular values of every X_l (sv_x [L+1, k] at depths p_x) and W_l (sv_w [L, k] at p_w), as Fig. 1b.

    The first ``rank`` values are drawn in red (the expected bottleneck rank k*), the others in grey;
    ``steps`` (the p_l) are marked as ticks along the bottom of the weight panel.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    labels = _spectrum_panel(axes[0], _np(p_x), sv_x, "representations $X_p$", top, rank)
    _spectrum_panel(axes[1], _np(p_w), sv_w, "weights $W_p$ (drawn at the layer midpoints)", top, rank)
    axes[0].set_ylabel("singular value")
    if steps is not None:
        labels.append(_layer_ticks(axes[1], _np(steps)))
    axes[0].legend(*zip(*labels), fontsize=7, loc="best")
    fig.suptitle(title or "singular values across depth", fontsize=10)
    return _save(fig, path)


def plot_energies(p, kinetic, potential, hamiltonian, path, *, title=None):
    """Hamiltonian, kinetic and potential energy per layer against depth p, as Fig. 1c."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    p = _np(p)
    ax.plot(p, _np(hamiltonian), "-o", ms=3, label="Hamiltonian $H$ = kinetic + potential", color="k")
    ax.plot(p, _np(kinetic), "-", label="kinetic $\\|\\dot X\\|^2_{K}/(2\\tilde L)$", color="C0")
    ax.plot(p, _np(potential), "-", label="potential $-\\frac{\\tilde L}{2}$COI$_\\gamma$", color="C1")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_xlabel("depth p (layer midpoints)")
    ax.set_ylabel("energy per layer")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("energies along the network" + (": %s" % title if title else ""), fontsize=10)
    return _save(fig, path)


def _mean_err(a):
    a = _np(a)
    if a.ndim == 1:
        return a, None
    m = a.mean(axis=1)
    return m, (m - a.min(axis=1), a.max(axis=1) - m)


def plot_fig1a(Lts, rank_median, rank_min, rank_max, coi_min, path, *, k_star=None, stable_rank_min=None,
               init_switch=None, init_label="identity init", depth=None):
    """Rank estimate -2H/Lt (median over layers, min-max band) and min_l COI against Lt, as Fig. 1a.

    Each argument is [n_Lt] or [n_Lt, n_seeds] (seeds are averaged, their spread is drawn as error bars).
    The y axis is linear within 2 k* of zero and logarithmic beyond (symlog), so every value is shown
    and the region around k* stays readable. ``init_switch``: the Lt from which the identity init (or
    another start, named by ``init_label``) was
    used, marked by a dotted line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    Lts = _np(Lts)
    med, med_err = _mean_err(rank_median)
    lo, _ = _mean_err(rank_min)
    hi, _ = _mean_err(rank_max)
    coi, coi_err = _mean_err(coi_min)
    ax.fill_between(Lts, lo, hi, color="C0", alpha=0.2, label="$-2H/\\tilde L$, min..max over layers")
    ax.errorbar(Lts, med, yerr=med_err, fmt="-o", ms=4, color="C0", capsize=2,
                label="$-2H/\\tilde L$, median over layers (lower estimate)")
    ax.errorbar(Lts, coi, yerr=coi_err, fmt="-s", ms=4, color="C3", capsize=2,
                label="min$_\\ell$ COI$_\\gamma$ (upper estimate)")
    if stable_rank_min is not None:
        sr, _ = _mean_err(stable_rank_min)
        ax.plot(Lts, sr, ":", color="0.4", label="min$_\\ell$ stable rank")
    if k_star is not None:
        ax.axhline(k_star, color="k", ls="--", lw=0.8, label="teacher's rank $k^*=%d$" % k_star)
    ax.set_yscale("symlog", linthresh=2.0 * (k_star or 1.0), linscale=1.5)
    _symlog_ticks(ax)
    if init_switch is not None:
        ax.axvline(init_switch, color="0.5", ls=":", lw=1.0,
                   label="%s from $\\tilde L$ = %g" % (init_label, init_switch))
    ax.set_xlabel("effective depth $\\tilde L$")
    ax.set_ylabel("rank estimate (symlog scale)")
    seeds = _np(rank_median).shape[1] if _np(rank_median).ndim == 2 else 1
    ax.set_title("Fig. 1a: bottleneck rank estimates vs effective depth%s%s%s"
                 % (" (L = %d" % depth if depth else " (", ", %d seed%s)" % (seeds, "s" if seeds > 1 else ""),
                    "\npoints: mean over seeds, bars: min..max over seeds" if seeds > 1 else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_fig2a(depths, errors, path, *, title=None):
    """Test error against depth L, one line per step scheme: errors = {scheme: [n_L] or [n_L, n_seeds]}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    seeds = max((_np(e).shape[1] if _np(e).ndim == 2 else 1) for e in errors.values())
    for i, (scheme, err) in enumerate(errors.items()):
        m, spread = _mean_err(err)
        ax.errorbar(depths, m, yerr=spread, fmt="-o", ms=4, color="C%d" % i, capsize=2, label=scheme)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(depths))
    ax.set_xticklabels([str(d) for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("number of layers L")
    ax.set_ylabel("test MSE" + ("\n(mean over %d seeds, bars: min..max)" % seeds if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    _log_y(ax)
    ax.legend(title="step scheme", fontsize=8, title_fontsize=8)
    ax.set_title(title or "Fig. 2a: test error vs depth, per step scheme", fontsize=9)
    return _save(fig, path)


def plot_fig2b(panels, path, *, rank=None, top=12, title=None):
    """Weight spectra across p with the layer positions marked, one panel per scheme, as Fig. 2b.

    panels: {scheme: (p_mid [L], svals [L, k]) or (p_mid, svals, p [L+1])}: the spectra are drawn at the
    layer midpoints p_mid; the layer positions p_l (from ``p``, else p_mid) are ticks along the bottom of
    each panel, showing where each scheme puts its layers.
    """
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.1 * n + 0.6, 3.3), sharey=True, squeeze=False)
    labels = []
    for ax, (scheme, (p_mid, sv, *edges)) in zip(axes[0], panels.items()):
        labels = _spectrum_panel(ax, _np(p_mid), sv, "%s steps" % scheme, top, rank)
    for ax, (p_mid, sv, *edges) in zip(axes[0], panels.values()):
        handle = _layer_ticks(ax, _np(edges[0] if edges else p_mid))
    labels.append(handle)
    axes[0][0].set_ylabel("singular values of $W_p$")
    fig.legend(*zip(*labels), fontsize=8, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0))
    L = len(next(iter(panels.values()))[0]) if panels else 0
    fig.suptitle(title or "Fig. 2b: weight spectra across depth at L = %d; ticks: where each scheme puts its layers"
                 % L, fontsize=10)
    return _save(fig, path)


def plot_history(history, path, *, title=None, switch=None):
    """Loss (MSE + regularization), train MSE and test MSE against the optimizer step (from a fit history),
    with the switch from Adam to SGD marked at step ``switch`` (default: the last Adam record when SGD
    records follow)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    steps = [h["step"] for h in history]

    def positive(key):
        return [h[key] if h[key] > 0 else float("nan") for h in history]

    ax.plot(steps, positive("loss"), label="loss (MSE + regularization)")
    ax.plot(steps, positive("train_mse"), label="train MSE")
    if any(math.isfinite(h["test_mse"]) for h in history):
        ax.plot(steps, positive("test_mse"), label="test MSE")
    adam = [h["step"] for h in history if h.get("phase") == "adam"]
    if switch is None and adam and any(h.get("phase") == "sgd" for h in history):
        switch = max(adam)
    if switch is not None:
        ax.axvline(switch, color="0.3", ls="--", lw=0.8, label="Adam $\\to$ SGD at step %d" % switch)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss / mean squared error")
    ax.grid(alpha=0.3)
    _log_y(ax)
    ax.legend(fontsize=7)
    ax.set_title(title or "training history", fontsize=10)
    return _save(fig, path)
