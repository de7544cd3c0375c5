"""The demo (`leakycuda demo`): one run of the paper's bottleneck task at Lt = 6, its per-layer table, JSON and PNGs."""
import dataclasses
import os
import time

import torch

from . import plots
from .registry import Experiment, read_json
from .sweep import (RunConfig, check_run, convergence_summary, dump_json, file_names, final_losses, layer_stats, layer_table,
    overshoot_note, plain_floats, rank_summary, train_and_refine)
from .. import _validate as check
from .._env import machine_info

__all__ = ["DEMO", "plot_demo", "run_demo"]


# The demo: the 30 -> 3 -> 30 task at Lt = 6 with the paper's step counts (5000 Adam + 1000 SGD), reduced
# to width 64 and 500 training points (paper: 100 and 1000) so that it runs in under a minute on 2 CPU cores.
DEMO = RunConfig(n_train=500, n_test=500, width=64, depth=20, Lt=6.0)


def run_demo(out, *, device="cpu", dtype=torch.float32, cfg=DEMO, seed=0, progress=None, log=print):
    """Trains the demo model, prints the per-layer table and the rank estimate, writes PNGs and JSON to ``out``."""
    from ..diagnostics import analyze

    seed = check.integer(seed, "seed", low=0)
    cfg, out, _, device, dtype, _ = check_run(cfg, out, seeds=[seed], device=device, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    log("leakycuda demo: task 30 -> %s -> 30 (k* = %d), %d training points; LeakyResNet width %d, L = %d, "
        "Lt = %g, lam = %g, init %s; %d Adam + %d SGD steps on %s"
        % (" -> ".join(map(str, cfg.inner)), min(cfg.inner), cfg.n_train, cfg.width, cfg.depth, cfg.Lt, cfg.lam,
           cfg.resolved_init(), cfg.adam_steps, cfg.sgd_steps, device))
    model, task, result, extra = train_and_refine(cfg, seed, start=None, device=device, dtype=dtype, progress=progress,
                                        desc="demo", history_path=os.path.join(out, "history.json"))
    t_train = time.perf_counter() - t0
    fin = final_losses(result)
    log("trained in %.1f s: train MSE %.4g, test MSE %.4g, regularization %.4g%s"
        % (t_train, fin["train_mse"], fin["test_mse"], fin["reg"], overshoot_note(result)))
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
    files = plot_demo({"config": dataclasses.asdict(cfg), "task": task.describe(), "layers": stats}, result.history, out)
    files.update(history=os.path.join(out, "history.json"), history_csv=os.path.join(out, "history.csv"))
    files["json"] = os.path.join(out, "demo.json")
    dump_json({"config": dataclasses.asdict(cfg), "seed": seed, "task": task.describe(), "machine": machine_info(device),
           "train_seconds": t_train, "final": fin, "summary": summary, "layers": stats,
           "convergence": convergence_summary(model, task, cfg.lam), "refine": extra["refine"],
           "diagnostics": plain_floats(report), "files": file_names(files)}, files["json"])
    log("")
    log("wrote %s" % ", ".join(files[k] for k in ("spectra", "energies", "history_plot", "history", "history_csv",
                                                   "json")))
    log("total %.1f s" % (time.perf_counter() - t0))
    return {"summary": summary, "final": fin, "files": files, "layers": stats}


def plot_demo(data, history, out):
    """The demo's PNGs from a demo.json dict and its history records: spectra.png, energies.png, history.png."""
    cfg, stats, k = data["config"], data["layers"], data["task"]["rank"]
    return {
        "spectra": plots.plot_spectra(stats["p"], stats["sv_x"], stats["p_mid"], stats["sv_w"],
                                      os.path.join(out, "spectra.png"), rank=k,
                                      title="Lt = %g, L = %d: singular values across depth" % (cfg["Lt"], cfg["depth"])),
        "energies": plots.plot_energies(stats["p_mid"], stats["kinetic"], stats["potential"], stats["hamiltonian"],
                                        os.path.join(out, "energies.png"), title="Lt = %g" % cfg["Lt"]),
        "history_plot": plots.plot_history(history, os.path.join(out, "history.png"),
                                           title="demo training: Lt = %g, L = %d, lam = %g"
                                           % (cfg["Lt"], cfg["depth"], cfg["lam"]),
                                           switch=cfg["adam_steps"] if cfg["adam_steps"] and cfg["sgd_steps"] else None),
    }


def _replot(data, out, json_path):
    files = data.get("files", {})
    history = os.path.join(os.path.dirname(os.path.abspath(json_path)),
                           files.get("history", "history.json") if isinstance(files, dict) else "history.json")
    return plot_demo(data, read_json(history, "json_path", "a demo.json with the history.json it names beside it"),
                     out)


EXPERIMENT = Experiment(
    name="demo", run=run_demo, kind="demo", plot=_replot, fields=("config", "layers", "task"),
    matches=lambda data: "layers" in data and "figure" not in data and "experiment" not in data,
    help="train on the 30 -> 3 -> 30 task at Lt = 6, print per-layer energies and the rank estimate",
    full="width 64, 500 points, 5000 Adam + 1000 SGD steps, lam 1e-2")
