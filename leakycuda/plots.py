"""Matplotlib figures (Agg backend, small PNGs) of the demo and of the paper's Figures 1 and 2."""
import os

import numpy as np

_DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _plt().close(fig)
    return path


def _np(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=float)


def _spectrum_panel(ax, p, svals, title, top, rank=None):
    s = _np(svals)[:, :top]
    for j in range(s.shape[1]):
        color = "C3" if rank is not None and j < rank else "0.55"
        ax.plot(p, np.maximum(s[:, j], 1e-12), color=color, lw=1.2 if color == "C3" else 0.8)
    ax.set_yscale("log")
    ax.set_xlabel("depth p")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_spectra(p_x, sv_x, p_w, sv_w, path, *, rank=None, top=12, steps=None, title=None):
    """Singular values of every X_l (sv_x [L+1, k] at depths p_x) and W_l (sv_w [L, k] at p_w), as Fig. 1b.

    The first ``rank`` values are drawn in red (the expected bottleneck rank k*); ``steps`` (the p_l)
    are marked as ticks along the bottom of the weight panel.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    _spectrum_panel(axes[0], _np(p_x), sv_x, "singular values of $X_p$", top, rank)
    _spectrum_panel(axes[1], _np(p_w), sv_w, "singular values of $W_p$", top, rank)
    if steps is not None:
        axes[1].plot(_np(steps), np.full(len(steps), axes[1].get_ylim()[0]), "|", color="k", ms=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_energies(p, kinetic, potential, hamiltonian, path, *, title=None):
    """Hamiltonian, kinetic and potential energy per layer against depth p, as Fig. 1c."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    p = _np(p)
    ax.plot(p, _np(hamiltonian), "-o", ms=3, label="Hamiltonian $H$", color="k")
    ax.plot(p, _np(kinetic), "-", label="kinetic", color="C0")
    ax.plot(p, _np(potential), "-", label="potential", color="C1")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_xlabel("depth p")
    ax.set_ylabel("energy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_fig1a(Lts, rank_median, rank_min, rank_max, coi_min, path, *, k_star=None, stable_rank_min=None,
               init_switch=None, init_label="identity init"):
    """Rank estimate -2H/Lt (median over layers, min-max band) and min_l COI against Lt, as Fig. 1a.

    Each argument is [n_Lt] or [n_Lt, n_seeds] (seeds are averaged, their spread is drawn as error bars).
    With ``k_star`` the y-axis is clipped to [-k*, 4 k*] (the full values are in the JSON);
    ``init_switch``: the Lt from which the identity init (or another start, named by ``init_label``) was
    used, marked by a dotted line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    Lts = _np(Lts)

    def mean_err(a):
        a = _np(a)
        if a.ndim == 1:
            return a, None
        return a.mean(axis=1), (a.mean(axis=1) - a.min(axis=1), a.max(axis=1) - a.mean(axis=1))

    med, med_err = mean_err(rank_median)
    lo, _ = mean_err(rank_min)
    hi, _ = mean_err(rank_max)
    coi, coi_err = mean_err(coi_min)
    ax.fill_between(Lts, lo, hi, color="C0", alpha=0.2, label="$-2H/\\tilde L$ min..max over layers")
    ax.errorbar(Lts, med, yerr=med_err, fmt="-o", ms=4, color="C0", label="$-2H/\\tilde L$ median")
    ax.errorbar(Lts, coi, yerr=coi_err, fmt="-s", ms=4, color="C3", label="min$_\\ell$ COI$_\\gamma$")
    if stable_rank_min is not None:
        sr, _ = mean_err(stable_rank_min)
        ax.plot(Lts, sr, ":", color="0.4", label="min$_\\ell$ stable rank")
    ax.set_ylabel("rank")
    if k_star is not None:
        ax.axhline(k_star, color="k", ls="--", lw=0.8, label="$k^*=%d$" % k_star)
        ax.set_ylim(-k_star, 4 * k_star)
        ax.set_ylabel("rank (clipped to [-k*, 4k*])")
    if init_switch is not None:
        ax.axvline(init_switch, color="0.5", ls=":", lw=0.8)
        ax.text(init_switch, ax.get_ylim()[1], " " + init_label, fontsize=7, va="top", color="0.4")
    ax.set_xlabel("effective depth $\\tilde L$")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_fig2a(depths, errors, path):
    """Test error against depth L, one line per step scheme: errors = {scheme: [n_L] or [n_L, n_seeds]}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for i, (scheme, err) in enumerate(errors.items()):
        e = _np(err)
        if e.ndim == 1:
            ax.plot(depths, e, "-o", ms=4, color="C%d" % i, label=scheme)
        else:
            m = e.mean(axis=1)
            ax.errorbar(depths, m, yerr=(m - e.min(axis=1), e.max(axis=1) - m), fmt="-o", ms=4, color="C%d" % i,
                        capsize=2, label=scheme)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of layers L")
    ax.set_ylabel("test MSE")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_fig2b(panels, path, *, rank=None, top=12):
    """Weight spectra across p with the layer positions marked, one panel per scheme, as Fig. 2b.

    panels: {scheme: (p [L], svals [L, k])}; the p_l are marked as ticks on each panel.
    """
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.0), sharey=True, squeeze=False)
    for ax, (scheme, (p, sv)) in zip(axes[0], panels.items()):
        p = _np(p)
        _spectrum_panel(ax, p, sv, scheme, top, rank)
        ax.plot(p, np.full(len(p), ax.get_ylim()[0]), "|", color="k", ms=8)
    axes[0][0].set_ylabel("singular values of $W_p$")
    return _save(fig, path)


def plot_history(history, path, *, title=None):
    """Train loss, regularized loss and test MSE against the optimizer step (from a fit history)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="loss (MSE + reg)")
    ax.plot(steps, [h["train_mse"] for h in history], label="train MSE")
    ax.plot(steps, [h["test_mse"] for h in history], label="test MSE")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
