"""Times the whole-stack forward and forward+backward: fused op vs eager reference vs torch.compile,
and B models in one call vs a loop of B single calls (JSON + tables).

The variants of one size are timed in one process, round by round (median of the rounds). Peak
memory of one forward+backward, above the level before it, comes from a child process per variant
(sampled RSS with glibc returning big blocks at once on CPU; the allocator's peak on CUDA).
Usage: python bench/bench_stack.py [--device cpu] [--quick] [--only stack|models] [--out FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import PeakMemory, machine_info, print_table, time_fn, write_json  # noqa: E402

SIZES = [  # (w, N, L)
    (100, 1000, 20),
    (100, 1000, 200),
    (256, 4096, 50),
]
QUICK_SIZES = [(100, 1000, 20)]
VARIANTS = ["fused", "eager", "compile"]
MODEL_SIZES = [  # (B, w, N, L): a small-model sweep and the paper's size
    (8, 32, 200, 20),
    (3, 100, 1000, 20),
]


def make_inputs(w, N, L, device, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, w, generator=g, dtype=dtype)
    W = torch.randn(L, w, w + 1, generator=g, dtype=dtype) * (2.0 / w) ** 0.5
    rho = torch.full((L,), 1.0 / L, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (x0, W, rho)]


def make_step(variant, w, N, L, device, dtype, Lt):
    """(step, forward) closures of one variant at one size, after its first (compiling) call."""
    import leakycuda as lc

    x0, W, rho = make_inputs(w, N, L, device, getattr(torch, dtype))
    if variant == "fused":
        f = lambda: lc.leaky_stack(x0, W, rho, Lt)
    elif variant == "eager":
        f = lambda: lc.reference.leaky_stack(x0, W, rho, Lt)
    else:
        compiled = torch.compile(lc.reference.leaky_stack)
        f = lambda: compiled(x0, W, rho, Lt)

    def forward():
        with torch.no_grad():
            f()

    def step():
        for t in (x0, W, rho):
            t.grad = None
        f().sum().backward()

    if variant == "compile":
        print(f"torch.compile of the eager stack at w={w} N={N} L={L}: the first call compiles (a cold compile "
              "can take a minute or more; a warm inductor cache a few seconds) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    step()  # first call: compiles for "compile"
    first = time.perf_counter() - t0
    if variant == "compile":
        print(f"  compiled in {first:.1f} s", file=sys.stderr, flush=True)
    return step, forward, first


def child_memory(w, N, L, variant, device, dtype, Lt):
    """Peak memory of one forward+backward above the level before it, in its own process."""
    step, _, first_s = make_step(variant, w, N, L, device, dtype, Lt)
    step()
    with PeakMemory(device) as mem:
        step()
    return {"peak_extra_mib": mem.peak_bytes / 2**20, "first_call_s": first_s}


def measure_size(w, N, L, variants, device, dtype, Lt, repeats):
    """Times every variant at one size in this process, interleaved round by round so that a
    machine whose speed drifts treats them alike; memory comes from a child process each."""
    rows, steps = [], {}
    for v in variants:
        steps[v] = make_step(v, w, N, L, device, dtype, Lt)
    times = {v: {"fwd": [], "fb": []} for v in variants}
    for _ in range(repeats):
        for v in variants:
            step, forward, _ = steps[v]
            times[v]["fwd"].append(time_fn(forward, device=device, warmup=0, repeats=1)["median_ms"])
            times[v]["fb"].append(time_fn(step, device=device, warmup=0, repeats=1)["median_ms"])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for v in variants:
        fb = statistics.median(times[v]["fb"])
        row = {"w": w, "N": N, "L": L, "variant": v, "dtype": dtype, "first_call_s": steps[v][2],
               "fwd_ms": statistics.median(times[v]["fwd"]), "fwdbwd_ms": fb, "fwdbwd_min_ms": min(times[v]["fb"]),
               "fwdbwd_us_per_layer": fb * 1e3 / L, "gflops": 6 * N * w * (w + 1) * L / (fb * 1e-3) / 1e9}
        # Big buffers are mmapped and unmapped at once in the child, so RSS follows live memory.
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{w},{N},{L},{v}", "--device", device,
               "--dtype", dtype, "--Lt", str(Lt)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode == 0:
            row["peak_extra_mib"] = json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]
        else:
            print(f"memory of {v} at w={w} N={N} L={L} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        rows.append(row)
    return rows


def measure_models(B, w, N, L, device, dtype, Lt, repeats):
    """B models in one leaky_stack call (a 4-D W, one Lt per model) vs a loop of B single calls on
    the same inputs, forward and forward+backward, timed interleaved round by round."""
    import leakycuda as lc

    ins = [make_inputs(w, N, L, device, getattr(torch, dtype)) for _ in range(B)]
    x0, W, rho = (torch.stack([t.detach() for t in ts]).requires_grad_() for ts in zip(*ins))
    Lts = torch.linspace(1.0, Lt, B, dtype=torch.float64, device=device)
    leaves = {"models": [x0, W, rho], "loop": [t for i in ins for t in i]}

    def run(variant):
        if variant == "models":
            return lc.leaky_stack(x0, W, rho, Lts).sum()
        return sum(lc.leaky_stack(*ins[b], float(Lts[b])).sum() for b in range(B))

    def make(variant):
        def forward():
            with torch.no_grad():
                run(variant)

        def step():
            for t in leaves[variant]:
                t.grad = None
            run(variant).backward()
        return forward, step

    fns = {v: make(v) for v in ("models", "loop")}
    times = {v: {"fwd": [], "fb": []} for v in fns}
    for v in fns:  # warm-up
        fns[v][1]()
    for _ in range(repeats):
        for v, (forward, step) in fns.items():
            times[v]["fwd"].append(time_fn(forward, device=device, warmup=0, repeats=1)["median_ms"])
            times[v]["fb"].append(time_fn(step, device=device, warmup=0, repeats=1)["median_ms"])
    rows = []
    for v in fns:
        fb = statistics.median(times[v]["fb"])
        rows.append({"B": B, "w": w, "N": N, "L": L, "variant": v, "dtype": dtype,
                     "fwd_ms": statistics.median(times[v]["fwd"]), "fwdbwd_ms": fb,
                     "fwdbwd_min_ms": min(times[v]["fb"]), "fwdbwd_ms_per_model": fb / B})
    for r in rows:
        r["models_speedup"] = r["fwdbwd_ms"] / rows[0]["fwdbwd_ms"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--Lt", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="one small size (and the first model size), 3 repeats")
    p.add_argument("--only", choices=["stack", "models"], default=None, help="run one of the two tables")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/stack_<device>_<time>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        w, N, L, variant = a.child.split(",")
        print(json.dumps(child_memory(int(w), int(N), int(L), variant, a.device, a.dtype, a.Lt)))
        return
    sizes = [] if a.only == "models" else QUICK_SIZES if a.quick else SIZES
    model_sizes = [] if a.only == "stack" else MODEL_SIZES[:1] if a.quick else MODEL_SIZES
    repeats = 3 if a.quick else a.repeats
    rows, model_rows = [], []
    for w, N, L in sizes:
        rows += measure_size(w, N, L, a.variants.split(","), a.device, a.dtype, a.Lt, repeats)
    for B, w, N, L in model_sizes:
        model_rows += measure_models(B, w, N, L, a.device, a.dtype, a.Lt, repeats)
    for r in rows:  # speed-up of the fused op over each variant, same size, same run
        fused = next((f for f in rows if f["variant"] == "fused" and (f["w"], f["N"], f["L"]) == (r["w"], r["N"], r["L"])), None)
        if fused:
            r["fused_speedup"] = r["fwdbwd_ms"] / fused["fwdbwd_ms"]
    if rows:
        print_table(rows, [
            ("w", "w", "{}"), ("N", "N", "{}"), ("L", "L", "{}"), ("variant", "variant", "{}"),
            ("fwd_ms", "fwd ms", "{:.2f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.2f}"),
            ("fwdbwd_us_per_layer", "us/layer", "{:.1f}"), ("gflops", "GFLOP/s", "{:.1f}"),
            ("peak_extra_mib", "peak MiB", "{:.1f}"), ("first_call_s", "1st call s", "{:.2f}"),
            ("fused_speedup", "fused x", "{:.2f}"),
        ])
    if model_rows:
        print("\nB models in one call vs a loop of B single calls (Lt from 1 to %g across the models):" % a.Lt)
        print_table(model_rows, [
            ("B", "B", "{}"), ("w", "w", "{}"), ("N", "N", "{}"), ("L", "L", "{}"), ("variant", "variant", "{}"),
            ("fwd_ms", "fwd ms", "{:.2f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.2f}"),
            ("fwdbwd_ms_per_model", "ms/model", "{:.2f}"), ("models_speedup", "one call x", "{:.2f}"),
        ])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"stack_{a.device.split(':')[0]}_{stamp}.json")
    write_json(out, {"benchmark": "leaky_stack", "Lt": a.Lt, "machine": machine_info(a.device), "results": rows,
                     "models": model_rows})


if __name__ == "__main__":
    main()
