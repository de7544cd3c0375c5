"""The paper's Figure 2 (`leakycuda reproduce fig2`): depth and layer-step schemes at Lt = 3."""
import dataclasses
import os
import time

import torch

from . import plots
from .registry import Experiment
from .distribute import check_shard, execute
from .sweep import (RunConfig, check_run, convergence_summary, dump_json, file_names, final_losses, layer_stats,
    overshoot_note, rank_summary, sweep_jobs, sweep_train)

__all__ = ["FIG2", "finish_fig2", "plot_fig2", "run_fig2"]


# Figure 2: three random ResNets 30 -> 6 -> 3 -> 30, Lt = 3, a sweep over L and the step schemes.
FIG2 = {
    "paper": dict(config=RunConfig(inner=(6, 3), teacher="resnet", Lt=3.0), depths=(4, 8, 16, 32, 64),
                  schemes=("equidistant", "irregular", "adaptive"), a=0.9),
    "quick": dict(config=RunConfig(inner=(6, 3), teacher="resnet", Lt=3.0, n_train=200, n_test=200, width=32,
                                   adam_steps=1000, sgd_steps=200), depths=(4, 8, 16),
                  schemes=("equidistant", "irregular", "adaptive"), a=0.9),
}


def run_fig2(out, *, quick=False, device="cpu", dtype=torch.float32, seeds=(0,), depths=None, schemes=None,
             overrides=None, progress=None, log=print, sequential=False, pad_depths=False, shard=None):
    """Fig. 2: Lt = 3 on the 30 -> 6 -> 3 -> 30 ResNet task; test error against L for each step scheme
    (``fig2a.png``) and the weight spectra across p with the layer positions marked at the largest L
    (``fig2b.png``); everything in ``fig2.json`` under ``out``.

    Per depth, every scheme x seed trains at once as one ensemble (:func:`train_runs`; with
    ``pad_depths`` every run in a single ensemble, the shallower ones padded with identity layers);
    ``sequential=True`` trains them one at a time (the same numbers up to float rounding).

    ``shard`` ("i/n" or (i, n)): train only shard i of n of the runs and write its part file under ``out``/parts
    (``leakycuda merge`` joins the parts into fig2.json); returns None then. Under ``torchrun`` the runs are spread
    over the ranks the same way and rank 0 writes fig2.json (leakycuda.experiments.distribute)."""
    preset = FIG2["quick" if quick else "paper"]
    cfg = dataclasses.replace(preset["config"], **(overrides or {}))
    cfg, out, seeds, device, dtype, sweep = check_run(
        cfg, out, seeds=seeds, device=device, dtype=dtype, a=preset["a"],
        depths=preset["depths"] if depths is None else depths,
        schemes=preset["schemes"] if schemes is None else schemes)
    shard = check_shard(shard)
    depths, schemes = sweep["depths"], sweep["schemes"]
    t0 = time.perf_counter()
    plan = [(dataclasses.replace(cfg, depth=L, steps=scheme, a=preset["a"] if scheme == "irregular" else 0.0), seed,
             "fig2 %s L=%d seed=%d" % (scheme, L, seed), None) for scheme in schemes for L in depths for seed in seeds]

    def record(i, model, task, result, extra, seconds):
        (c, seed, _, _), t = plan[i], time.perf_counter()
        stats = layer_stats(model, task.x_train, c.gamma0, top=20)
        run = {"scheme": c.steps, "L": c.depth, "seed": seed, "seconds": 0.0, "final": final_losses(result),
               "max_rho_Lt": result.max_rho_Lt, "summary": rank_summary(stats), "layers": stats,
               "convergence": convergence_summary(model, task, c.lam), **extra}
        run["seconds"] = seconds + time.perf_counter() - t
        log("fig2 %-11s L=%-3d seed=%d  test MSE %.4g  train MSE %.4g  stationarity %.2g  (%.0f s)%s"
            % (c.steps, c.depth, seed, result.final["test_mse"], result.final["train_mse"],
               run["convergence"]["stationarity_max"], run["seconds"], overshoot_note(result)))
        return run

    header = {"figure": "fig2", "quick": quick, "config": dataclasses.asdict(cfg), "depths": list(depths),
              "schemes": list(schemes), "a": preset["a"], "seeds": seeds, "dtype": str(dtype).replace("torch.", "")}
    train = sweep_train(plan, record, device=device, dtype=dtype, progress=progress, sequential=sequential,
                        pad_depths=pad_depths)
    return execute("fig2", header, sweep_jobs(plan), train, out=out, device=device, shard=shard, log=log, t0=t0)


def finish_fig2(header, runs, *, out, log=print, machine=None, seconds=0.0, parts=None):
    """Writes fig2.json and the PNGs from the run's header and its runs in plan order (scheme, L, seed); returns
    {"runs", "files"}."""
    depths, schemes = header["depths"], header["schemes"]
    data = dict(header, machine=machine, seconds=seconds, runs=runs,
                test_mse={s: [[r["final"]["test_mse"] for r in runs if r["scheme"] == s and r["L"] == L]
                              for L in depths] for s in schemes})
    if parts is not None:
        data["parts"] = parts
    files = plot_fig2(data, out)
    files["json"] = os.path.join(out, "fig2.json")
    data["files"] = file_names(files)
    dump_json(data, files["json"])
    log("fig2: wrote %s (%.0f s)" % (", ".join(files.values()), seconds))
    return {"runs": runs, "files": files}


def plot_fig2(data, out):
    """The Fig. 2 PNGs from a fig2.json dict: fig2a.png (test MSE against L), fig2b.png (weight spectra, largest L)."""
    depths, schemes, k = data["depths"], data["schemes"], min(data["config"]["inner"])
    spectra = {}
    for s in schemes:
        r = [r for r in data["runs"] if r["scheme"] == s and r["L"] == depths[-1]][0]
        spectra[s] = (r["layers"]["p_mid"], r["layers"]["sv_w"], r["layers"]["p"])
    return {"fig2a": plots.plot_fig2a(depths, data["test_mse"], os.path.join(out, "fig2a.png")),
            "fig2b": plots.plot_fig2b(spectra, os.path.join(out, "fig2b.png"), rank=k)}


EXPERIMENT = Experiment(
    name="fig2", run=run_fig2, finish=finish_fig2, kind="sweep", plot=lambda data, out, json_path: plot_fig2(data, out),
    fields=("config", "depths", "schemes", "runs", "test_mse"),
    matches=lambda data: data.get("figure") == "fig2",
    help="the paper's Figure 2: test error against depth L for three layer-step schemes (Lt = 3, 30 -> 6 -> 3 -> 30)",
    full="L = 4, 8, 16, 32, 64, equidistant / irregular (a = 0.9) / adaptive steps, width 100, 1000 points",
    quick="L = 4, 8, 16, width 32, 200 points, 1000 Adam + 200 SGD steps")
