"""Times sweeps in one launch: `reproduce fig1` batched vs --sequential, training steps of an ensemble
vs one model at a time, and on CUDA the issue's GPU rows (JSON + table).

Rows (every row on the device given; the variants of a row are timed in one session, interleaved):
- fig1: `leakycuda reproduce fig1 --seeds S` (``--quick`` on CPU, the paper preset on CUDA), batched and
  --sequential, each as its own niced child process, ``--rounds`` rounds alternating the order; wall and CPU
  seconds (user + system of the child), and the largest relative differences between the two paths'
  fig1.json numbers (final losses, rank summaries).
  On CUDA only the batched run, once, unless ``--fig1-sequential``.
- step: one training step per model (fit's own loop: the time of fit at two step counts, differenced),
  B models as one ensemble vs one model at a time; on CUDA with and without the CUDA graph.
  CPU: the fig1 --quick members (B = 9: 3 Lt x 3 seeds, w = 32, N = 200, L = 20);
  CUDA: the paper's size (w = 100, N = 1000, L = 20), B = 16.
- stack (CUDA): 16 models at L = 20, N = 1000, w = 100, forward+backward of the batched op vs 16 calls.

CPU threads: ``--threads`` (default 1) for this process and the children. On a machine shared with other jobs, torch's
two OpenMP threads on two cores wait on each other at every parallel region and ran a small stack 20x slower than
one thread did, so the committed CPU numbers use one thread per process.

Usage: python bench/bench_ensemble.py [--device cpu|cuda] [--threads 1] [--rounds 2] [--seeds 3] [--skip-fig1]
                                [--tiny] [--out FILE]
--tiny: the step rows at B = 2, w = 8, N = 20, L = 4 (a rehearsal of the script; its numbers mean nothing).
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info, print_table, time_fn, write_json  # noqa: E402
from leakycuda import _json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(obj, prefix=""):
    """Every number in a JSON value, keyed by its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, "%s/%s" % (prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, "%s/%d" % (prefix, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)


def compare_fig1(a, b):
    """The largest relative difference between two fig1.json files in the final losses and the rank summaries."""
    worst = {"final": 0.0, "summary": 0.0}
    for ra, rb in zip(a["runs"], b["runs"]):
        assert (ra["Lt"], ra["seed"]) == (rb["Lt"], rb["seed"]), "the two runs list different sweeps"
        for part in worst:
            va, vb = dict(_leaves(ra[part])), dict(_leaves(rb[part]))
            for k in va:
                scale = max(abs(va[k]), abs(vb[k]), 1e-12)
                worst[part] = max(worst[part], abs(va[k] - vb[k]) / scale)
    return worst


def fig1_rows(device, seeds, rounds, quick, threads, variants=("batched", "sequential")):
    """`reproduce fig1` batched and --sequential, alternating, each in a niced child process that imports the
    leakycuda this process did (the source tree's, or an installed copy)."""
    import leakycuda

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(leakycuda.__file__)))
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for variant in (variants if r % 2 == 0 else variants[::-1]):
                out = os.path.join(tmp, "%s_%d" % (variant, r))
                cmd = ["nice", "-n", "5", sys.executable, "-m", "leakycuda.cli", "reproduce", "fig1", "--seeds",
                       str(seeds), "--device", device, "--out", out, "--no-progress"]
                cmd += ["--quick"] if quick else []
                cmd += ["--sequential"] if variant == "sequential" else []
                t0 = time.perf_counter()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                     env=dict(os.environ, PYTHONPATH=pkg_root, OMP_NUM_THREADS=str(threads)))
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if res.returncode != 0:
                    raise RuntimeError("%s failed:\n%s" % (" ".join(cmd), res.stderr[-3000:]))
                times[variant].append(wall)
                cpu[variant].append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
                print("fig1 %s round %d: %.1f s wall, %.1f s CPU" % (variant, r, wall, cpu[variant][-1]), flush=True)
                outputs.setdefault(variant, _json.load(os.path.join(out, "fig1.json")))
    name = "reproduce fig1%s --seeds %d" % (" --quick" if quick else "", seeds)
    rows = [{"row": name, "variant": v, "wall_s": statistics.median(times[v]), "walls_s": times[v],
             "cpu_s": statistics.median(cpu[v]), "cpus_s": cpu[v]} for v in variants]
    if len(variants) == 2:
        diff = compare_fig1(outputs["batched"], outputs["sequential"])
        rows.append({"row": name, "variant": "batched vs sequential",
                     "speedup": statistics.median(times["sequential"]) / statistics.median(times["batched"]),
                     "cpu_speedup": statistics.median(cpu["sequential"]) / statistics.median(cpu["batched"]),
                     "max_rel_diff_final": diff["final"], "max_rel_diff_summary": diff["summary"]})
    return rows


def step_rows(device, B, width, n, depth, repeats):
    """Training-step time per model through fit: B models one at a time vs one ensemble (and, on CUDA, with and
    without the CUDA graph). A step's time is the difference of fit at two step counts over the steps between."""
    import leakycuda as lc
    from leakycuda.data import bottleneck_task
    from leakycuda.ensemble import LeakyEnsemble
    from leakycuda.train import fit

    task = bottleneck_task(d=30, n_train=n, n_test=0, seed=0, device=device)
    Lts = [2.0 + 4.0 * b / max(1, B - 1) for b in range(B)]
    short, long = 20, 20 + repeats

    def per_step(make, graph):
        def run(steps):
            model = make()
            t0 = time.perf_counter()
            fit(model, task, 1e-2, adam_steps=steps, sgd_steps=0, log_every=steps, cuda_graph=graph, progress=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        run(short)  # warm caches and kernels
        return (statistics.median(run(long) for _ in range(3)) - statistics.median(run(short) for _ in range(3))) \
            / (long - short) * 1e3

    single = lambda: lc.LeakyResNet(30, 30, width, depth, Lts[0], device=device)  # noqa: E731
    ensemble = lambda: LeakyEnsemble(30, 30, width, depth, Lts, device=device)  # noqa: E731
    graphs = (False, True) if device.startswith("cuda") else (False,)
    rows = []
    size = "w=%d N=%d L=%d" % (width, n, depth)
    for graph in graphs:
        tag = " + CUDA graph" if graph else ""
        try:
            one = per_step(single, graph)
            ens = per_step(ensemble, graph) / B
        except Exception as e:  # recorded, not fatal: the other variant's rows still stand
            rows.append({"row": "train step, " + size, "variant": "ensemble of %d%s" % (B, tag), "error": repr(e)[:500]})
            continue
        rows.append({"row": "train step, " + size, "variant": "one model at a time" + tag, "ms_per_model": one})
        rows.append({"row": "train step, " + size, "variant": "ensemble of %d%s" % (B, tag), "ms_per_model": ens,
                     "speedup": one / ens})
    return rows


def stack_rows(B=16, L=20, N=1000, w=100):
    """CUDA: forward+backward of 16 stacks, one batched op call vs 16 calls."""
    import leakycuda as lc

    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(B, N, w, device="cuda", generator=g).requires_grad_()
    W = (torch.randn(B, L, w, w + 1, device="cuda", generator=g) * (2.0 / w) ** 0.5).requires_grad_()
    rho = torch.full((B, L), 1.0 / L, device="cuda")
    Lt = torch.linspace(1.0, 6.0, B, device="cuda", dtype=torch.float64)

    def batched():
        x0.grad = W.grad = None
        lc.leaky_stack(x0, W, rho, Lt).sum().backward()

    def looped():
        x0.grad = W.grad = None
        sum(lc.leaky_stack(x0[b], W[b], rho[b], float(Lt[b])).sum() for b in range(B)).backward()

    rows = []
    for name, fn in (("16 calls", looped), ("one batched call", batched)):
        t = time_fn(fn, device="cuda", warmup=3, repeats=20)["median_ms"]
        rows.append({"row": "stack fwd+bwd, %d models L=%d N=%d w=%d" % (B, L, N, w), "variant": name, "ms": t,
                     "ms_per_model": t / B})
    rows[1]["speedup"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of this process and the fig1 children")
    p.add_argument("--rounds", type=int, default=2, help="fig1 runs of each path (alternating order)")
    p.add_argument("--repeats", type=int, default=40, help="extra fit steps timed per step row")
    p.add_argument("--skip-fig1", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny step rows (a rehearsal; the numbers mean nothing)")
    p.add_argument("--fig1-sequential", action="store_true",
                   help="CUDA: also time the paper-preset fig1 --sequential (CPU always times both)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/ensemble_<device>_<time>.json)")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    torch.set_num_threads(a.threads)
    rows = []
    if a.tiny:
        rows += step_rows(a.device, 2, 8, 20, 6, a.repeats)
    elif cuda:
        try:
            rows += stack_rows()
        except Exception as e:  # recorded, not fatal: the step rows still run
            rows.append({"row": "stack fwd+bwd, 16 models", "variant": "-", "error": repr(e)[:500]})
        rows += step_rows(a.device, 16, 100, 1000, 20, a.repeats)
    else:
        rows += step_rows(a.device, 9, 32, 200, 20, a.repeats)
    if not a.skip_fig1:
        both = not cuda or a.fig1_sequential
        rows += fig1_rows(a.device, a.seeds, a.rounds if both else 1, quick=not cuda, threads=a.threads,
                          variants=("batched", "sequential") if both else ("batched",))
    print_table(rows, [
        ("row", "row", "{}"), ("variant", "variant", "{}"), ("wall_s", "wall s", "{:.1f}"),
        ("cpu_s", "CPU s", "{:.1f}"),
        ("ms", "ms", "{:.3f}"), ("ms_per_model", "ms/model", "{:.3f}"), ("speedup", "speed-up", "{:.2f}x"),
        ("cpu_speedup", "CPU speed-up", "{:.2f}x"),
        ("max_rel_diff_final", "max rel diff (final)", "{:.2g}"),
        ("max_rel_diff_summary", "max rel diff (ranks)", "{:.2g}"), ("error", "error", "{:.120}"),
    ])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(ROOT, "bench", "results", "ensemble_%s_%s.json" % (a.device.split(":")[0], stamp))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_json(out, {"benchmark": "ensemble", "machine": machine_info(a.device), "load_average_at_end": load,
                     "note": "the machine may be shared with other jobs; the variants of a row ran interleaved",
                     "results": rows})


if __name__ == "__main__":
    main()
