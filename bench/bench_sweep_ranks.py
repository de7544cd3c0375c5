"""Times one sweep spread over K torchrun ranks against the same sweep in one process with the same CPU threads in
total (JSON + table): `leakycuda reproduce EXPERIMENT --quick --seeds S`.

Variants, each a child process (``--rounds`` rounds, alternating the order; wall seconds, and the CPU seconds of
the children):
- one process: OMP_NUM_THREADS = K (torch's intra-op threads over the whole ensemble);
- one process, one thread: the serial baseline (how well the one process's threads scale);
- K ranks: ``python -m torch.distributed.run --standalone --nproc-per-node K -m leakycuda reproduce ...``, gloo,
  OMP_NUM_THREADS = 1 in each rank (leakycuda.experiments.distribute: the runs split by cost, each rank trains its
  share as one ensemble, rank 0 writes the one result).
Also the largest relative difference between the two results' numbers (final losses, rank summaries) and the
share of the runs (and of their cost) each rank held.

Usage: python bench/bench_sweep_ranks.py [--experiment fig1] [--ranks 2] [--seeds 3] [--rounds 2] [--device cpu]
                                         [--out FILE] [--tiny]
--tiny: a few steps at width 6 (a rehearsal of the script; its numbers mean nothing).
On CUDA (--device cuda): the ranks take cuda:LOCAL_RANK, the one process cuda:0.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info, print_table, write_json  # noqa: E402
from bench_ensemble import _leaves  # noqa: E402
from leakycuda import _json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "12", "--sgd-steps", "4", "--width", "6", "--n-train", "24", "--n-test", "8"]


def max_rel_diff(a, b, fields=("final", "summary")):
    """The largest relative difference between two results' runs in ``fields``."""
    worst = 0.0
    assert len(a["runs"]) == len(b["runs"]), "the two results hold different numbers of runs"
    for ra, rb in zip(a["runs"], b["runs"]):
        for field in fields:
            if field not in ra:
                continue
            va, vb = dict(_leaves(ra[field])), dict(_leaves(rb[field]))
            for k in va:
                worst = max(worst, abs(va[k] - vb[k]) / max(abs(va[k]), abs(vb[k]), 1e-12))
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="fig1")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file (default bench/results/sweep_ranks_<device>_<time>.json)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.ranks < 2 or args.rounds < 1 or args.seeds < 1:
        p.error("--ranks must be >= 2, --rounds and --seeds >= 1")
    import leakycuda

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(leakycuda.__file__)))
    flags = ["reproduce", args.experiment, "--quick", "--seeds", str(args.seeds), "--device", args.device,
             "--no-progress"] + (TINY if args.tiny else [])
    K = args.ranks
    variants = {"one process": ([sys.executable, "-m", "leakycuda"], K),
                "one process, 1 thread": ([sys.executable, "-m", "leakycuda"], 1),
                "%d ranks" % K: ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  str(K), "-m", "leakycuda"], 1)}
    walls = {v: [] for v in variants}
    cpus = {v: [] for v in variants}
    results, inside = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                launcher, threads = variants[name]
                out = os.path.join(tmp, "%s_%d" % (name.replace(" ", "_"), r))
                cmd = launcher + flags + ["--out", out]
                env = dict(os.environ, PYTHONPATH=pkg_root, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if res.returncode != 0:
                    raise RuntimeError("%s failed:\n%s" % (" ".join(cmd), (res.stdout + res.stderr)[-3000:]))
                walls[name].append(wall)
                cpus[name].append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
                print("%s round %d: %.1f s wall, %.1f s CPU" % (name, r, wall, cpus[name][-1]), flush=True)
                results.setdefault(name, _json.load(os.path.join(out, "%s.json" % args.experiment.replace("-", "_"))))
                inside.setdefault(name, []).append(results[name]["seconds"] if r == 0 else _json.load(
                    os.path.join(out, "%s.json" % args.experiment.replace("-", "_")))["seconds"])
    one, serial, ranks = list(variants)
    row = "reproduce %s --quick --seeds %d" % (args.experiment, args.seeds)
    rows = [{"row": row, "variant": v, "threads": "%d x %d" % ((1, K) if v == one else (1, 1) if v == serial else (K, 1)),
             "wall_s": statistics.median(walls[v]), "walls_s": walls[v], "cpu_s": statistics.median(cpus[v]),
             "cpus_s": cpus[v], "inside_s": statistics.median(inside[v])} for v in variants]
    parts = results[ranks].get("parts", [])
    rows.append({"row": row, "variant": "%s vs %s" % (ranks, one),
                 "speedup": statistics.median(walls[one]) / statistics.median(walls[ranks]),
                 "max_rel_diff": max_rel_diff(results[one], results[ranks]),
                 "runs_per_rank": [p["jobs"] for p in parts], "rank_seconds": [p["seconds"] for p in parts]})
    rows.append({"row": row, "variant": "%s vs %s (thread scaling)" % (one, serial),
                 "speedup": statistics.median(walls[serial]) / statistics.median(walls[one]),
                 "max_rel_diff": max_rel_diff(results[serial], results[one])})
    print()
    print_table(rows, [("variant", "variant", "{}"), ("threads", "procs x threads", "{}"), ("wall_s", "wall s", "{:.1f}"),
                       ("cpu_s", "CPU s", "{:.1f}"),
                       ("inside_s", "in run s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
                       ("max_rel_diff", "max rel diff", "{:.1e}")])
    print("runs per rank %s, their training seconds %s" % (rows[-2]["runs_per_rank"],
                                                          ["%.1f" % s for s in rows[-2]["rank_seconds"]]))
    print("in run s: the result's own wall time (training, measuring, plotting; not the imports or the launcher)")
    out = args.out or os.path.join(ROOT, "bench", "results", "sweep_ranks_%s_%s.json"
                                   % (args.device.split(":")[0], time.strftime("%Y%m%d-%H%M%S")))
    write_json(out, {"bench": "sweep_ranks", "machine": machine_info(args.device), "command": flags,
                     "ranks": K, "rounds": args.rounds, "tiny": args.tiny, "rows": rows})


if __name__ == "__main__":
    main()
