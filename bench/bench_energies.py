"""Times COI_gamma + its gradient over a whole trajectory, and the energies op: fused op vs autograd through the reference (JSON + table).

The target size is L = 500 layers of [N, w] = [1000, 100] (one call over [L, N, w]); "eager" is autograd
through leakycuda.reference (torch.linalg.solve on the (w+1)x(w+1) Grams, matrix_norm(ord=2) for the
gamma0 policy), "compile" the same under torch.compile (optional, slow to compile on small CPUs).
Usage: python bench/bench_energies.py [--device cpu] [--quick] [--dtype float32] [--compile] [--out FILE]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import PeakMemory, machine_info, print_table, time_fn, write_json  # noqa: E402

SIZES = [(500, 1000, 100), (50, 1000, 100)]  # (L, N, w)
QUICK_SIZES = [(50, 1000, 100)]
GAMMA0, GAMMA = 1e-3, 1.0


def make_xs(L, N, w, device, dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(L, N, w, generator=g, dtype=dtype).to(device)


def cases(lc, E, X, policy, variant):
    """A forward+backward closure of COI_gamma over X [L, N, w]."""
    kw = dict(gamma0=GAMMA0) if policy == "gamma0" else dict(gamma=GAMMA)
    if variant == "fused":
        f = lambda x: E.cost_of_identity(x, **kw)
    elif variant == "eager":
        f = lambda x: lc.reference.cost_of_identity(x, **kw)
    else:
        f = torch.compile(lambda x: lc.reference.cost_of_identity(x, **kw))
    Xg = X.clone().requires_grad_()

    def step():
        Xg.grad = None
        f(Xg).sum().backward()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--quick", action="store_true", help="only the small size")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import importlib

    import leakycuda as lc

    E = importlib.import_module("leakycuda.energies")  # lc.energies is the function once exported

    dtype = getattr(torch, args.dtype)
    variants = ["fused", "eager"] + (["compile"] if args.compile else [])
    rows = []
    for L, N, w in (QUICK_SIZES if args.quick else SIZES):
        X = make_xs(L, N, w, args.device, dtype)
        for policy in ("gamma0", "fixed"):
            base = None
            for variant in variants:
                step = cases(lc, E, X, policy, variant)
                t0 = time.perf_counter()
                step()
                first_s = time.perf_counter() - t0
                with PeakMemory(args.device) as pm:
                    step()
                t = time_fn(step, device=args.device, warmup=0, repeats=args.repeats)
                row = dict(what="coi+grad", policy=policy, L=L, N=N, w=w, variant=variant, dtype=args.dtype,
                           median_ms=t["median_ms"], min_ms=t["min_ms"], per_layer_us=1e3 * t["median_ms"] / L,
                           peak_mb=None if pm.peak_bytes is None else pm.peak_bytes / 2**20, first_call_s=first_s)
                if variant == "eager":
                    base = row
                rows.append(row)
            for r in rows:
                if r["what"] == "coi+grad" and r["L"] == L and r["policy"] == policy and base is not None:
                    r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
        # The energies of every layer (forward only): fused op vs the reference.
        xs = torch.cat([X, X[-1:] * 0.9])
        rho = torch.full((L,), 1.0 / L, dtype=dtype, device=args.device)
        fused = time_fn(lambda: E.energies(xs, rho, 3.0, gamma0=GAMMA0), device=args.device,
                        warmup=1, repeats=args.repeats)
        eager = time_fn(lambda: lc.reference.energies(xs, rho, 3.0, gamma0=GAMMA0), device=args.device,
                        warmup=1, repeats=args.repeats)
        for variant, t in (("fused", fused), ("eager", eager)):
            rows.append(dict(what="energies", policy="gamma0", L=L, N=N, w=w, variant=variant, dtype=args.dtype,
                             median_ms=t["median_ms"], min_ms=t["min_ms"], per_layer_us=1e3 * t["median_ms"] / L,
                             speedup_vs_eager=eager["median_ms"] / t["median_ms"]))

    print_table(rows, [("what", "what", "{}"), ("policy", "gamma", "{}"), ("L", "L", "{}"), ("N", "N", "{}"),
                       ("w", "w", "{}"), ("variant", "variant", "{}"), ("median_ms", "median ms", "{:.1f}"),
                       ("min_ms", "min ms", "{:.1f}"), ("per_layer_us", "us/layer", "{:.0f}"),
                       ("peak_mb", "peak MB", "{:.0f}"), ("speedup_vs_eager", "x eager", "{:.2f}")])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "energies_%s_%s.json" % (args.device.split(":")[0], args.dtype))
    write_json(out, {"bench": "energies", "machine": machine_info(args.device), "gamma0": GAMMA0,
                     "gamma": GAMMA, "rows": rows})


if __name__ == "__main__":
    main()
