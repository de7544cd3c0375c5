"""The demo and the sweeps behind the paper's Figures 1 and 2: train, measure, write JSON and PNGs."""
import dataclasses
import json
import math
import os
import time

import torch

from . import plots
from ._env import machine_info
from .data import bottleneck_task
from .module import LeakyResNet
from .recipes import continue_run, refine
from .train import fit

__all__ = ["DEMO", "FIG1", "FIG2", "RunConfig", "layer_stats", "layer_table", "rank_summary", "plot_fig1",
           "plot_fig2", "replot", "run_demo", "run_fig1", "run_fig2", "train_run"]


@dataclasses.dataclass
class RunConfig:
    """One training run: task, student and the Adam-then-SGD recipe (the paper's appendix by default)."""

    inner: tuple = (3,)
    teacher: str = "fcnn"
    n_train: int = 1000
    n_test: int = 1000
    width: int = 100
    depth: int = 20
    Lt: float = 3.0
    steps: str = "equidistant"
    a: float = 0.0
    init: str = "auto"
    lam: float = 1e-2
    adam_steps: int = 5000
    adam_lr: float = 1e-3
    sgd_steps: int = 1000
    sgd_lr: float = 1e-3
    adapt_every: int = 50
    gamma0: float = 1e-2
    # Recipe options (leakycuda.recipes; off by default). In a sweep over Lt, a run with Lt >= continue_above
    # warm-starts from the previous Lt's trained model of the same seed (shifted to the new Lt, ridge
    # continue_gamma0) and trains continue_steps Adam + sgd_steps SGD steps instead of starting from init.
    continue_above: float = math.inf
    continue_steps: int = 3000
    continue_gamma0: float = 1e-2
    # After training: up to refine_steps L-BFGS iterations on W (projections fixed) in float64, stopping early
    # once the relative stationarity residual (max over layers) is <= refine_target.
    refine_steps: int = 0
    refine_target: float = 1e-2

    def resolved_init(self):
        """ "auto": a random init below Lt = 8, V_l ≈ Lt*I + noise from Lt = 8 on.

        DESIGN.md §1: random inits collapse to all-zero weights at large Lt (seen here at Lt = 8 with
        width 48), the identity init trains there but keeps more large singular values.
        """
        if self.init != "auto":
            return self.init
        return "random" if self.Lt < 8.0 else "identity"


# The demo: the 30 -> 3 -> 30 task at Lt = 6 with the paper's step counts (5000 Adam + 1000 SGD), reduced
# to width 64 and 500 training points (paper: 100 and 1000) so that it runs in under a minute on 2 CPU cores.
DEMO = RunConfig(n_train=500, n_test=500, width=64, depth=20, Lt=6.0)

# Figure 1: the 30 -> 3 -> 30 task, L = 20 equidistant layers, a sweep over Lt.
FIG1 = {
    "paper": dict(config=RunConfig(), Lts=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0)),
    "quick": dict(config=RunConfig(n_train=200, n_test=200, width=32, adam_steps=1500, sgd_steps=300),
                  Lts=(2.0, 4.0, 6.0)),
}
# Figure 2: three random ResNets 30 -> 6 -> 3 -> 30, Lt = 3, a sweep over L and the step schemes.
FIG2 = {
    "paper": dict(config=RunConfig(inner=(6, 3), teacher="resnet", Lt=3.0), depths=(4, 8, 16, 32, 64),
                  schemes=("equidistant", "irregular", "adaptive"), a=0.9),
    "quick": dict(config=RunConfig(inner=(6, 3), teacher="resnet", Lt=3.0, n_train=200, n_test=200, width=32,
                                   adam_steps=1000, sgd_steps=200), depths=(4, 8, 16),
                  schemes=("equidistant", "irregular", "adaptive"), a=0.9),
}


def make_task(cfg, seed, device, dtype):
    return bottleneck_task(d=30, inner=cfg.inner, n_train=cfg.n_train, n_test=cfg.n_test, seed=seed,
                           teacher=cfg.teacher, dtype=dtype, device=device)


def train_run(cfg, seed=0, *, device="cpu", dtype=torch.float32, task=None, progress=None, desc=None,
              history_path=None, checkpoint_path=None, start=None):
    """Builds the task and a LeakyResNet (both seeded by ``seed``) and fits them; returns (model, task, result).

    ``start``: a trained model to warm-start from instead (:func:`leakycuda.recipes.continue_run`: shifted to
    ``cfg.Lt``, then ``cfg.continue_steps`` Adam + ``cfg.sgd_steps`` SGD steps).
    """
    if task is None:
        task = make_task(cfg, seed, device, dtype)
    if start is not None:
        model, result, _ = continue_run(start, cfg, task, progress=progress, desc=desc)
        return model, task, result
    torch.manual_seed(1000 + seed)
    model = LeakyResNet(task.d, task.d, cfg.width, cfg.depth, cfg.Lt, steps=cfg.steps,
                        a=cfg.a if cfg.steps == "irregular" else 0.0, init=cfg.resolved_init(),
                        device=device, dtype=dtype)
    result = fit(model, task, cfg.lam, adam_steps=cfg.adam_steps, adam_lr=cfg.adam_lr, sgd_steps=cfg.sgd_steps,
                 sgd_lr=cfg.sgd_lr, adapt_every=cfg.adapt_every,
                 log_every=max(1, (cfg.adam_steps + cfg.sgd_steps) // 50),
                 progress=progress, desc=desc, history_path=history_path, checkpoint_path=checkpoint_path)
    return model, task, result


def _field(res, name):
    value = res[name] if isinstance(res, dict) else getattr(res, name)
    return value.detach().double().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value).double()


@torch.no_grad()
def layer_stats(model, x, gamma0=1e-2, *, top=None):
    """Per-layer measurements of a trained model on inputs x [N, d_in] (float64 on the CPU, as lists).

    p: the depths p_0..p_L of X_0..X_L; p_mid: the midpoints of the layers (where W_l and the layer
    energies are drawn); coi, kinetic, potential, hamiltonian, rank_estimate (-2H/Lt), per layer l = 1..L
    from :func:`leakycuda.energies.energies` (metric from X_{l-1}, gamma_p = gamma0 ||sigma(X_p)||_op^2);
    sv_x [L+1][k] and sv_w [L][k]: singular values of X_l and W_l; sv_x_centred [L+1][k] and mean_share [L+1]:
    those of X_l minus its batch mean and the mean's share of ||X_l||_F^2
    (:func:`leakycuda.diagnostics.centred_spectra`); sv_w_centred [L][k] and weight_mean [L]: W_l with the
    direction of its mean output split off (:func:`leakycuda.diagnostics.weight_mean_split`).
    """
    from .diagnostics import centred_spectra, weight_mean_split
    from .energies import energies

    xs = model.representations(x).detach().double()
    rho = model.rho.detach().double()
    e = energies(xs, rho, model.Lt, gamma0=gamma0)
    p = torch.cat([rho.new_zeros(1), rho.cumsum(0)]).cpu()
    W = model.weight.detach().double()
    centred, split = centred_spectra(xs), weight_mean_split(W, xs)
    spectra = {"sv_x": torch.linalg.svdvals(xs), "sv_w": torch.linalg.svdvals(W), "sv_x_centred": centred.sv,
               "sv_w_centred": split.sv}
    out = {"p": p.tolist(), "p_mid": ((p[1:] + p[:-1]) / 2).tolist(), "rho": rho.cpu().tolist()}
    for name in ("coi", "kinetic", "potential", "hamiltonian", "rank_estimate"):
        out[name] = _field(e, name).tolist()
    for name, sv in spectra.items():
        out[name] = (sv if top is None else sv[:, :top]).cpu().tolist()
    out["mean_share"] = centred.mean_share.cpu().tolist()
    out["weight_mean"] = split.weight_mean.cpu().tolist()
    return out


def rank_summary(stats):
    """Median, min and max over layers of -2H/Lt, min_l COI, and the integer bottleneck-rank estimate.

    The theory brackets the bottleneck rank: -2H/Lt <= k* <= min_l COI (both tighten as Lt grows).
    ``rank`` is the integer nearest the middle of [median(-2H/Lt), min COI]; ``bracket_integers``
    counts the integers in that interval and ``bracket_ok`` says whether there is exactly one.
    With centred spectra in ``stats`` (:func:`layer_stats`), also the middle representation X_m (m = L//2):
    ``sv_x_centred_mid`` (its top 6 centred singular values), ``centred_count_mid`` (how many exceed 10% of
    the largest) and ``mean_share_mid``.
    """
    r = torch.tensor(stats["rank_estimate"], dtype=torch.float64)
    coi = torch.tensor(stats["coi"], dtype=torch.float64)
    lo, hi = float(r.median()), float(coi.min())
    ints = [k for k in range(max(0, math.ceil(lo)), math.floor(hi) + 1)] if math.isfinite(lo + hi) else []
    out = {"rank_median": lo, "rank_min": float(r.min()), "rank_max": float(r.max()), "coi_min": hi,
           "coi_argmin_layer": int(coi.argmin()) + 1,
           "rank": int(round((lo + hi) / 2)) if math.isfinite(lo + hi) else None,
           "bracket_ok": len(ints) == 1, "bracket_integers": len(ints)}
    if "sv_x_centred" in stats:
        mid = len(stats["sv_x_centred"]) // 2
        sv = stats["sv_x_centred"][mid]
        out.update(mid_layer=mid, sv_x_centred_mid=sv[:6], mean_share_mid=stats["mean_share"][mid],
                   centred_count_mid=sum(v > 0.1 * sv[0] for v in sv) if sv and sv[0] > 0 else 0)
    return out


def layer_table(report):
    """A compact aligned table of a :class:`leakycuda.diagnostics.Analysis`: one row per layer l = 1..L.

    COI_g: the stable COI_gamma(X_{l-1}); COI: the exact COI of X_{l-1} (* where the theory calls it
    infinite); KE, V, H: kinetic, potential and Hamiltonian energy of layer l; -2H/Lt: the rank estimate;
    srank: the stable rank of X_{l-1}; |W|^2: ||W_l||_F^2.
    """
    cols = ("l", "p_l", "COI_g", "COI", "KE", "V", "H", "-2H/Lt", "srank", "|W|^2")
    rows = [cols]
    for l in range(1, report.depth + 1):
        coi = "%.4g%s" % (float(report.coi_exact[l - 1]), "*" if bool(report.coi_infinite[l - 1]) else "")
        rows.append((str(l), "%.3f" % float(report.positions[l]), "%.4g" % float(report.coi_gamma[l - 1]), coi,
                     "%.4g" % float(report.kinetic[l - 1]), "%.4g" % float(report.potential[l - 1]),
                     "%.4g" % float(report.hamiltonian[l - 1]), "%.3f" % float(report.rank_estimate[l - 1]),
                     "%.3f" % float(report.stable_rank[l - 1]), "%.4g" % float(report.balance_lhs[l - 1])))
    widths = [max(len(r[j]) for r in rows) for j in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = ("per layer l (metric of X_{l-1}; Lt = %g, gamma0 = %g; COI*: residual > 0, infinite in theory)"
            % (report.Lt, report.gamma0))
    return "\n".join([head] + lines)


def _final(result):
    f = result.final
    return {k: f[k] for k in ("loss", "train_mse", "reg", "test_mse")}


def _train(cfg, seed, *, start, device, dtype, progress, desc):
    """train_run (warm-started from ``start`` when given), then cfg.refine_steps of L-BFGS refinement;
    returns (model, task, result, extra) with extra = {"warm_start": bool, "refine": dict or None}."""
    model, task, result = train_run(cfg, seed, device=device, dtype=dtype, progress=progress, desc=desc,
                                    start=start)
    extra = {"warm_start": start is not None, "refine": None}
    if cfg.refine_steps > 0:
        r = refine(model, task, cfg.lam, iterations=cfg.refine_steps, target=cfg.refine_target)
        extra["refine"] = {"iterations": r.iterations, "evaluations": r.evaluations, "seconds": r.wall_s,
                           "reached": r.reached, "history": r.history}
    return model, task, result, extra


def _convergence(model, task, lam):
    """The run's :class:`leakycuda.diagnostics.Convergence` on the training set, as a plain dict."""
    from .diagnostics import convergence

    return convergence(model, task.x_train, task.y_train, lam).to_dict()


def _dump(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def run_demo(out, *, device="cpu", dtype=torch.float32, cfg=DEMO, seed=0, progress=None, log=print):
    """Trains the demo model, prints the per-layer table and the rank estimate, writes PNGs and JSON to ``out``."""
    from .diagnostics import analyze

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    log("leakycuda demo: task 30 -> %s -> 30 (k* = %d), %d training points; LeakyResNet width %d, L = %d, "
        "Lt = %g, lam = %g, init %s; %d Adam + %d SGD steps on %s"
        % (" -> ".join(map(str, cfg.inner)), min(cfg.inner), cfg.n_train, cfg.width, cfg.depth, cfg.Lt, cfg.lam,
           cfg.resolved_init(), cfg.adam_steps, cfg.sgd_steps, device))
    model, task, result = train_run(cfg, seed, device=device, dtype=dtype, progress=progress, desc="demo",
                                    history_path=os.path.join(out, "history.json"))
    t_train = time.perf_counter() - t0
    fin = _final(result)
    log("trained in %.1f s: train MSE %.4g, test MSE %.4g, regularization %.4g"
        % (t_train, fin["train_mse"], fin["test_mse"], fin["reg"]))
    report = analyze(model, task.x_train, task.y_train, cfg.lam, gamma0=cfg.gamma0)
    stats = layer_stats(model, task.x_train, cfg.gamma0)
    summary = rank_summary(stats)
    log("")
    log(layer_table(report))
    log("")
    log("bottleneck rank estimate: %s   (median_l -2H/Lt = %.3f <= k* <= min_l COI_gamma = %.3f at layer %d; "
        "teacher's k* = %d)" % (summary["rank"], summary["rank_median"], summary["coi_min"],
                                summary["coi_argmin_layer"], task.rank))
    if summary["bracket_integers"] == 0:
        log("  no integer lies in that bracket (the two estimates have not met k* yet); the nearest one is shown")
    elif summary["bracket_integers"] > 1:
        log("  the bracket holds %d integers: train longer or raise Lt to tighten it" % summary["bracket_integers"])
    files = {
        "spectra": plots.plot_spectra(stats["p"], stats["sv_x"], stats["p_mid"], stats["sv_w"],
                                      os.path.join(out, "spectra.png"), rank=task.rank,
                                      title="Lt = %g, L = %d: singular values across depth" % (cfg.Lt, cfg.depth)),
        "energies": plots.plot_energies(stats["p_mid"], stats["kinetic"], stats["potential"], stats["hamiltonian"],
                                        os.path.join(out, "energies.png"), title="Lt = %g" % cfg.Lt),
        "history_plot": plots.plot_history(result.history, os.path.join(out, "history.png")),
        "history": os.path.join(out, "history.json"),
    }
    files["json"] = os.path.join(out, "demo.json")
    _dump({"config": dataclasses.asdict(cfg), "seed": seed, "task": task.describe(), "machine": machine_info(device),
           "train_seconds": t_train, "final": fin, "summary": summary, "layers": stats,
           "convergence": _convergence(model, task, cfg.lam),
           "diagnostics": json.loads(report.to_json()), "files": _names(files)}, files["json"])
    log("")
    log("wrote %s" % ", ".join(files[k] for k in ("spectra", "energies", "history_plot", "json")))
    log("total %.1f s" % (time.perf_counter() - t0))
    return {"summary": summary, "final": fin, "files": files, "layers": stats}


def _names(files):
    """File names relative to the output folder (the JSON stays valid when the folder moves)."""
    return {k: os.path.basename(v) for k, v in files.items()}


def _seed_list(seeds):
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def run_fig1(out, *, quick=False, device="cpu", dtype=torch.float32, seeds=(0,), Lts=None, overrides=None,
             progress=None, log=print):
    """Fig. 1a: sweep Lt at L = 20 on the 30 -> 3 -> 30 task; rank estimates and min COI against Lt.

    Writes ``fig1.json`` (config, machine, per run: final losses, rank summary and per-layer stats) and
    ``fig1a.png`` (plus ``fig1b_Lt<max>.png``, the spectra of the largest Lt, seed 0) to ``out``.
    """
    preset = FIG1["quick" if quick else "paper"]
    cfg = dataclasses.replace(preset["config"], **(overrides or {}))
    Lts = tuple(float(v) for v in (Lts or preset["Lts"]))
    seeds = _seed_list(seeds)
    t0 = time.perf_counter()
    runs, previous = [], {}
    for Lt in Lts:
        for seed in seeds:
            c = dataclasses.replace(cfg, Lt=Lt)
            t = time.perf_counter()
            start = previous.get(seed) if Lt >= c.continue_above else None
            model, task, result, extra = _train(c, seed, start=start, device=device, dtype=dtype,
                                                progress=progress, desc="fig1 Lt=%g seed=%d" % (Lt, seed))
            previous[seed] = model
            stats = layer_stats(model, task.x_train, c.gamma0, top=20)
            summary = rank_summary(stats)
            runs.append({"Lt": Lt, "seed": seed, "init": "warm start" if start is not None else c.resolved_init(),
                         "seconds": time.perf_counter() - t, "final": _final(result), "summary": summary,
                         "layers": stats, "convergence": _convergence(model, task, c.lam), **extra})
            log("fig1 Lt=%-4g seed=%d  test MSE %.4g  -2H/Lt median %.3f [min %.3f, max %.3f]  min COI %.3f  "
                "stationarity %.2g  (%.0f s)"
                % (Lt, seed, result.final["test_mse"], summary["rank_median"], summary["rank_min"],
                   summary["rank_max"], summary["coi_min"], runs[-1]["convergence"]["stationarity_max"],
                   runs[-1]["seconds"]))
    data = {"figure": "fig1", "quick": quick, "config": dataclasses.asdict(cfg), "Lts": list(Lts), "seeds": seeds,
            "machine": machine_info(device), "seconds": time.perf_counter() - t0, "runs": runs}
    files = plot_fig1(data, out)
    files["json"] = os.path.join(out, "fig1.json")
    data["files"] = _names(files)
    _dump(data, files["json"])
    log("fig1: wrote %s (%.0f s)" % (", ".join(files.values()), time.perf_counter() - t0))
    return {"runs": runs, "files": files}


def run_fig2(out, *, quick=False, device="cpu", dtype=torch.float32, seeds=(0,), depths=None, schemes=None,
             overrides=None, progress=None, log=print):
    """Fig. 2: Lt = 3 on the 30 -> 6 -> 3 -> 30 ResNet task; test error against L for each step scheme
    (``fig2a.png``) and the weight spectra across p with the layer positions marked at the largest L
    (``fig2b.png``); everything in ``fig2.json`` under ``out``."""
    preset = FIG2["quick" if quick else "paper"]
    cfg = dataclasses.replace(preset["config"], **(overrides or {}))
    depths = tuple(int(v) for v in (depths or preset["depths"]))
    schemes = tuple(schemes or preset["schemes"])
    seeds = _seed_list(seeds)
    t0 = time.perf_counter()
    runs = []
    for scheme in schemes:
        for L in depths:
            for seed in seeds:
                c = dataclasses.replace(cfg, depth=L, steps=scheme, a=preset["a"] if scheme == "irregular" else 0.0)
                t = time.perf_counter()
                model, task, result, extra = _train(c, seed, start=None, device=device, dtype=dtype,
                                                    progress=progress, desc="fig2 %s L=%d seed=%d" % (scheme, L, seed))
                stats = layer_stats(model, task.x_train, c.gamma0, top=20)
                runs.append({"scheme": scheme, "L": L, "seed": seed, "seconds": time.perf_counter() - t,
                             "final": _final(result), "summary": rank_summary(stats), "layers": stats,
                             "convergence": _convergence(model, task, c.lam), **extra})
                log("fig2 %-11s L=%-3d seed=%d  test MSE %.4g  train MSE %.4g  stationarity %.2g  (%.0f s)"
                    % (scheme, L, seed, result.final["test_mse"], result.final["train_mse"],
                       runs[-1]["convergence"]["stationarity_max"], runs[-1]["seconds"]))
    data = {"figure": "fig2", "quick": quick, "config": dataclasses.asdict(cfg), "depths": list(depths),
            "schemes": list(schemes), "a": preset["a"], "seeds": seeds, "machine": machine_info(device),
            "seconds": time.perf_counter() - t0, "runs": runs,
            "test_mse": {s: [[r["final"]["test_mse"] for r in runs if r["scheme"] == s and r["L"] == L]
                             for L in depths] for s in schemes}}
    files = plot_fig2(data, out)
    files["json"] = os.path.join(out, "fig2.json")
    data["files"] = _names(files)
    _dump(data, files["json"])
    log("fig2: wrote %s (%.0f s)" % (", ".join(files.values()), time.perf_counter() - t0))
    return {"runs": runs, "files": files}


def plot_fig1(data, out):
    """The Fig. 1 PNGs from a fig1.json dict: fig1a.png, and the spectra and energies of the largest Lt (first seed)."""
    runs, Lts, k = data["runs"], data["Lts"], min(data["config"]["inner"])
    grid = lambda key: [[r["summary"][key] for r in runs if r["Lt"] == Lt] for Lt in Lts]  # noqa: E731
    first = next((r for r in runs if r.get("init") in ("identity", "warm start")), None)
    files = {"fig1a": plots.plot_fig1a(Lts, grid("rank_median"), grid("rank_min"), grid("rank_max"), grid("coi_min"),
                                       os.path.join(out, "fig1a.png"), k_star=k,
                                       init_switch=first and first["Lt"],
                                       init_label="identity init" if first is None or first["init"] == "identity"
                                       else "warm start from the previous Lt")}
    last = [r for r in runs if r["Lt"] == Lts[-1]][0]
    stats, Lt, L = last["layers"], last["Lt"], data["config"]["depth"]
    files["fig1b"] = plots.plot_spectra(stats["p"], stats["sv_x"], stats["p_mid"], stats["sv_w"],
                                        os.path.join(out, "fig1b_Lt%g.png" % Lt), rank=k,
                                        title="Lt = %g, L = %d" % (Lt, L))
    files["fig1c"] = plots.plot_energies(stats["p_mid"], stats["kinetic"], stats["potential"], stats["hamiltonian"],
                                         os.path.join(out, "fig1c_Lt%g.png" % Lt), title="Lt = %g" % Lt)
    return files


def plot_fig2(data, out):
    """The Fig. 2 PNGs from a fig2.json dict: fig2a.png (test MSE against L), fig2b.png (weight spectra, largest L)."""
    depths, schemes, k = data["depths"], data["schemes"], min(data["config"]["inner"])
    spectra = {}
    for s in schemes:
        r = [r for r in data["runs"] if r["scheme"] == s and r["L"] == depths[-1]][0]
        spectra[s] = (r["layers"]["p_mid"], r["layers"]["sv_w"])
    return {"fig2a": plots.plot_fig2a(depths, data["test_mse"], os.path.join(out, "fig2a.png")),
            "fig2b": plots.plot_fig2b(spectra, os.path.join(out, "fig2b.png"), rank=k)}


def replot(json_path, out=None):
    """Redraws the PNGs of a figure run from its fig1.json or fig2.json into ``out`` (default: beside the JSON)."""
    with open(json_path) as f:
        data = json.load(f)
    out = out or os.path.dirname(os.path.abspath(json_path))
    return (plot_fig1 if data["figure"] == "fig1" else plot_fig2)(data, out)
