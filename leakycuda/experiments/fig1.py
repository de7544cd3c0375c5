"""The paper's Figure 1 (`leakycuda reproduce fig1`): the bottleneck rank as the effective depth Lt grows."""
import dataclasses
import os
import time

import torch

from . import plots
from .registry import Experiment
from .distribute import check_shard, execute
from .sweep import (RunConfig, check_run, convergence_summary, dump_json, file_names, final_losses, layer_stats,
    overshoot_note, rank_summary, sweep_jobs, sweep_train)

__all__ = ["FIG1", "finish_fig1", "plot_fig1", "run_fig1"]


# Figure 1: the 30 -> 3 -> 30 task, L = 20 equidistant layers, a sweep over Lt.
FIG1 = {
    # From Lt = 8 on, each seed's run warm-starts from its previous Lt (docs/DESIGN.md, "Training at large Lt"):
    # a random init collapses to zero weights there and the identity init forms no bottleneck.
    "paper": dict(config=RunConfig(continue_above=8.0), Lts=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)),
    "quick": dict(config=RunConfig(n_train=200, n_test=200, width=32, adam_steps=1500, sgd_steps=300),
                  Lts=(2.0, 4.0, 6.0)),
}


def run_fig1(out, *, quick=False, device="cpu", dtype=torch.float32, seeds=(0,), Lts=None, overrides=None,
             progress=None, log=print, sequential=False, shard=None):
    """Fig. 1a: sweep Lt at L = 20 on the 30 -> 3 -> 30 task; rank estimates and min COI against Lt.

    Writes ``fig1.json`` (config, machine, per run: final losses, rank summary and per-layer stats) and
    ``fig1a.png`` (plus ``fig1b_Lt<max>.png``, the spectra of the largest Lt, seed 0) to ``out``.
    Every Lt x seed trains at once as one ensemble (:func:`train_runs`; with continuation in Lt, one
    ensemble of the cold starts, then one of the seeds per warm-started Lt); ``sequential=True``
    trains them one at a time (the same numbers up to float rounding).

    ``shard`` ("i/n" or (i, n)): train only shard i of n of the runs and write its part file under ``out``/parts
    (``leakycuda merge`` joins the parts into fig1.json); returns None then. Under ``torchrun`` the runs are spread
    over the ranks the same way and rank 0 writes fig1.json (leakycuda.experiments.distribute).
    """
    preset = FIG1["quick" if quick else "paper"]
    cfg = dataclasses.replace(preset["config"], **(overrides or {}))
    cfg, out, seeds, device, dtype, sweep = check_run(cfg, out, seeds=seeds, device=device, dtype=dtype,
                                                      Lts=preset["Lts"] if Lts is None else Lts)
    shard = check_shard(shard)
    Lts = sweep["Lts"]
    t0 = time.perf_counter()
    plan, previous = [], {}
    for Lt in Lts:
        for seed in seeds:
            c = dataclasses.replace(cfg, Lt=Lt)
            start = previous.get(seed) if Lt >= c.continue_above else None  # warm start from the previous Lt
            previous[seed] = len(plan)
            plan.append((c, seed, "fig1 Lt=%g seed=%d" % (Lt, seed), start))

    def record(i, model, task, result, extra, seconds):
        (c, seed, _, start), t = plan[i], time.perf_counter()
        stats = layer_stats(model, task.x_train, c.gamma0, top=20)
        summary = rank_summary(stats)
        run = {"Lt": c.Lt, "seed": seed, "init": "warm start" if start is not None else c.resolved_init(),
               "seconds": 0.0, "final": final_losses(result), "max_rho_Lt": result.max_rho_Lt, "summary": summary,
               "layers": stats, "convergence": convergence_summary(model, task, c.lam), **extra}
        run["seconds"] = seconds + time.perf_counter() - t
        log("fig1 Lt=%-4g seed=%d  test MSE %.4g  -2H/Lt median %.3f [min %.3f, max %.3f]  min COI %.3f  "
            "stationarity %.2g  (%.0f s)%s"
            % (c.Lt, seed, result.final["test_mse"], summary["rank_median"], summary["rank_min"],
               summary["rank_max"], summary["coi_min"], run["convergence"]["stationarity_max"], run["seconds"],
               overshoot_note(result)))
        return run

    header = {"figure": "fig1", "quick": quick, "config": dataclasses.asdict(cfg), "Lts": list(Lts), "seeds": seeds,
              "dtype": str(dtype).replace("torch.", "")}
    train = sweep_train(plan, record, device=device, dtype=dtype, progress=progress, sequential=sequential)
    return execute("fig1", header, sweep_jobs(plan), train, out=out, device=device, shard=shard, log=log, t0=t0)


def finish_fig1(header, runs, *, out, log=print, machine=None, seconds=0.0, parts=None):
    """Writes fig1.json and the PNGs from the run's header and its runs in plan order (Lt, then seed); returns
    {"runs", "files"}."""
    data = dict(header, machine=machine, seconds=seconds, runs=runs)
    if parts is not None:
        data["parts"] = parts
    files = plot_fig1(data, out)
    files["json"] = os.path.join(out, "fig1.json")
    data["files"] = file_names(files)
    dump_json(data, files["json"])
    log("fig1: wrote %s (%.0f s)" % (", ".join(files.values()), seconds))
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
                                       else "warm start from the previous Lt", depth=data["config"]["depth"])}
    last = [r for r in runs if r["Lt"] == Lts[-1]][0]
    stats, Lt, L = last["layers"], last["Lt"], data["config"]["depth"]
    files["fig1b"] = plots.plot_spectra(stats["p"], stats["sv_x"], stats["p_mid"], stats["sv_w"],
                                        os.path.join(out, "fig1b_Lt%g.png" % Lt), rank=k,
                                        title="Lt = %g, L = %d" % (Lt, L))
    files["fig1c"] = plots.plot_energies(stats["p_mid"], stats["kinetic"], stats["potential"], stats["hamiltonian"],
                                         os.path.join(out, "fig1c_Lt%g.png" % Lt), title="Lt = %g" % Lt)
    return files


EXPERIMENT = Experiment(
    name="fig1", run=run_fig1, finish=finish_fig1, kind="sweep", plot=lambda data, out, json_path: plot_fig1(data, out),
    fields=("config", "Lts", "runs"),
    matches=lambda data: data.get("figure") == "fig1",
    help="the paper's Figure 1: the bottleneck rank as Lt grows (30 -> 3 -> 30 task, L = 20)",
    full="Lt = 1, 2, 3, 4, 6, 8, 10, 12, 16 (warm starts from Lt = 8), width 100, 1000 points, 5000 Adam + 1000 SGD",
    quick="Lt = 2, 4, 6, width 32, 200 points, 1500 Adam + 300 SGD steps")
