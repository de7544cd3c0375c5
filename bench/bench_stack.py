"""Times the whole-stack forward and forward+backward: fused op vs eager reference vs torch.compile (JSON + table).

Each (size, variant) runs in a child process so that its memory is its own; the peak is measured over
one forward+backward above the level before it (sampled RSS on CPU, the allocator's peak on CUDA). Usage: python bench/bench_stack.py [--device cpu] [--quick] [--out FILE]
"""
import argparse
import json
import os
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


def make_inputs(w, N, L, device, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, w, generator=g, dtype=dtype)
    W = torch.randn(L, w, w + 1, generator=g, dtype=dtype) * (2.0 / w) ** 0.5
    rho = torch.full((L,), 1.0 / L, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (x0, W, rho)]


def run_child(w, N, L, variant, device, dtype, Lt, repeats):
    """Measures one variant at one size in this process; returns a result row."""
    import leakycuda as lc

    dtype = getattr(torch, dtype)
    x0, W, rho = make_inputs(w, N, L, device, dtype)
    if variant == "fused":
        f = lambda: lc.leaky_stack(x0, W, rho, Lt)
    elif variant == "eager":
        f = lambda: lc.reference.leaky_stack(x0, W, rho, Lt)
    else:
        compiled = torch.compile(lc.reference.leaky_stack)
        f = lambda: compiled(x0, W, rho, Lt)
    t0 = time.perf_counter()
    f().sum().backward()  # first call: compiles for "compile"
    first_s = time.perf_counter() - t0

    def forward():
        with torch.no_grad():
            f()

    def step():
        for t in (x0, W, rho):
            t.grad = None
        f().sum().backward()

    row = {"w": w, "N": N, "L": L, "variant": variant, "dtype": str(dtype).replace("torch.", ""),
           "first_call_s": first_s}
    fwd = time_fn(forward, device=device, repeats=repeats)
    for t in (x0, W, rho):
        t.grad = None
    with PeakMemory(device) as mem:  # one forward+backward, gradients not yet allocated
        step()
    fb = time_fn(step, device=device, repeats=repeats)
    row.update(
        fwd_ms=fwd["median_ms"],
        fwdbwd_ms=fb["median_ms"],
        fwdbwd_min_ms=fb["min_ms"],
        fwdbwd_us_per_layer=fb["median_ms"] * 1e3 / L,
        peak_extra_mib=mem.peak_bytes / 2**20,
        gflops=6 * N * w * (w + 1) * L / (fb["median_ms"] * 1e-3) / 1e9,
    )
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--Lt", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="one small size, 3 repeats")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/stack_<device>_<time>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        w, N, L, variant = a.child.split(",")
        print(json.dumps(run_child(int(w), int(N), int(L), variant, a.device, a.dtype, a.Lt, a.repeats)))
        return
    sizes = QUICK_SIZES if a.quick else SIZES
    repeats = 3 if a.quick else a.repeats
    rows = []
    for w, N, L in sizes:
        for variant in a.variants.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{w},{N},{L},{variant}",
                   "--device", a.device, "--dtype", a.dtype, "--Lt", str(a.Lt), "--repeats", str(repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{variant} at w={w} N={N} L={L} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows:  # speed-up of the fused op over each variant, same size, same run
        fused = next((f for f in rows if f["variant"] == "fused" and (f["w"], f["N"], f["L"]) == (r["w"], r["N"], r["L"])), None)
        if fused:
            r["fused_speedup"] = r["fwdbwd_ms"] / fused["fwdbwd_ms"]
    print_table(rows, [
        ("w", "w", "{}"), ("N", "N", "{}"), ("L", "L", "{}"), ("variant", "variant", "{}"),
        ("fwd_ms", "fwd ms", "{:.2f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.2f}"),
        ("fwdbwd_us_per_layer", "us/layer", "{:.1f}"), ("gflops", "GFLOP/s", "{:.1f}"),
        ("peak_extra_mib", "peak MiB", "{:.1f}"), ("first_call_s", "1st call s", "{:.2f}"),
        ("fused_speedup", "fused x", "{:.2f}"),
    ])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"stack_{a.device.split(':')[0]}_{stamp}.json")
    write_json(out, {"benchmark": "leaky_stack", "Lt": a.Lt, "machine": machine_info(a.device), "results": rows})


if __name__ == "__main__":
    main()
