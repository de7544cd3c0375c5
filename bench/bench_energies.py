"""Times the energies of every layer plus the gradient of their Cost of Identity, on one device: the op's own
kernels ("fused": the fused CUDA kernels, or the CPU kernel on CPU), the device-generic implementation
("generic", LEAKYCUDA_{CPU,CUDA}_ATEN_ENERGIES=1) and autograd through leakycuda/reference.py ("reference",
gamma0 policy by matrix_norm(ord=2); "reference-fixed": a fixed gamma, no SVD), all in one process; JSON + table.

Workload: e = energies(xs, rho, Lt, gamma0=1e-3) on xs [L+1, N, w], then d(sum_l e.coi_l)/d xs. The floor is
reading every X_l once at the device's measured copy bandwidth (read + write bytes of a device-to-device
copy per second). Each row records which implementation actually ran (from the profiler).
Usage: python bench/bench_energies.py [--device cuda] [--quick] [--sizes L,N,w ...] [--out FILE]
"""
import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import PeakMemory, machine_info, print_table, time_fn, write_json  # noqa: E402

SIZES = [(500, 1000, 100), (100, 8192, 256)]  # (L, N, w): the paper's scale at depth, and a wide one
QUICK_SIZES = [(50, 1000, 100), (10, 8192, 256)]
GAMMA0, GAMMA, LT = 1e-3, 1.0, 3.0
ENV = {"cpu": "LEAKYCUDA_CPU_ATEN_ENERGIES", "cuda": "LEAKYCUDA_CUDA_ATEN_ENERGIES"}


def trajectory(L, N, w, device, dtype):
    """A smooth trajectory: X_l = X_{l-1} + rho * (a random direction), so D_l is O(1)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, w, generator=g)
    steps = torch.randn(L, N, w, generator=g) / L
    xs = torch.cat([x0[None], x0[None] + steps.cumsum(0)])
    return xs.to(device=device, dtype=dtype), torch.full((L,), 1.0 / L, dtype=dtype, device=device)


def workload(variant, E, R, xs, rho):
    """A closure running the energies and the COI gradient with one implementation."""
    xg = xs.clone().requires_grad_()

    def run():
        if variant in ("fused", "generic"):
            coi = E.energies(xg, rho, LT, gamma0=GAMMA0).coi
        elif variant == "reference":
            coi = R.energies(xg, rho, LT, gamma0=GAMMA0)[0]
        else:
            coi = R.energies(xg, rho, LT, gamma=GAMMA)[0]
        return torch.autograd.grad(coi.sum(), xg)[0]

    return run


def paths_run(fn):
    """The leakycuda implementations (cpu / generic / fused) whose kernels recorded a profiler event."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name.split("::")[1] for e in prof.events()
                   if e.name.count("::") == 2 and e.name.startswith("leakycuda::")})


def copy_bandwidth(nbytes, device):
    """Read + write bytes per second of a device copy of nbytes (median of several)."""
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeats=9)
    return 2 * src.numel() * 4 / (t["median_ms"] * 1e-3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--quick", action="store_true", help="the small sizes (%s)" % (QUICK_SIZES,))
    ap.add_argument("--sizes", nargs="+", metavar="L,N,w", help="sizes to run instead of the defaults")
    ap.add_argument("--variants", default="fused,generic,reference,reference-fixed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else (
            QUICK_SIZES if args.quick else SIZES)
        if any(len(s) != 3 or min(s) < 1 for s in sizes):
            raise ValueError
    except ValueError:
        ap.error("--sizes takes L,N,w triples of positive integers, got %s" % (args.sizes,))
    variants = args.variants.split(",")
    unknown = set(variants) - {"fused", "generic", "reference", "reference-fixed"}
    if unknown:
        ap.error("unknown --variants %s" % sorted(unknown))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import leakycuda  # noqa: F401  (loads the ops)
    from leakycuda import reference as R

    E = importlib.import_module("leakycuda.energies")  # lc.energies is the function once exported
    env = ENV[device.type]
    rows = []
    for L, N, w in sizes:
        xs, rho = trajectory(L, N, w, device, dtype)
        nbytes = xs.numel() * xs.element_size()
        bw = copy_bandwidth(nbytes, device)
        floor_ms = 1e3 * nbytes / bw
        for variant in variants:
            os.environ.pop(env, None)
            if variant == "generic":
                os.environ[env] = "1"
            run = workload(variant, E, R, xs, rho)
            try:
                ran = paths_run(run)
                with PeakMemory(device) as pm:
                    run()
                t = time_fn(run, device=device, warmup=1, repeats=args.repeats)
            except Exception as e:  # recorded, not fatal: the other variants still run
                rows.append(dict(L=L, N=N, w=w, dtype=args.dtype, variant=variant, error=repr(e)[:500]))
                continue
            rows.append(dict(L=L, N=N, w=w, dtype=args.dtype, variant=variant, ran=",".join(ran) or "-",
                             median_ms=t["median_ms"], min_ms=t["min_ms"], per_layer_us=1e3 * t["median_ms"] / L,
                             peak_mb=None if pm.peak_bytes is None else pm.peak_bytes / 2**20,
                             floor_ms=floor_ms, x_floor=t["median_ms"] / floor_ms, copy_gbps=bw / 1e9))
        os.environ.pop(env, None)
        ref = next((r for r in rows if r["variant"] == "reference" and "error" not in r
                    and (r["L"], r["N"], r["w"]) == (L, N, w)), None)
        for r in rows:
            if ref is not None and "error" not in r and (r["L"], r["N"], r["w"]) == (L, N, w):
                r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]

    print("energies + COI gradient, %s %s, gamma0 = %g (reference-fixed: gamma = %g), Lt = %g"
          % (device, args.dtype, GAMMA0, GAMMA, LT))
    print_table(rows, [("L", "L", "{}"), ("N", "N", "{}"), ("w", "w", "{}"), ("variant", "variant", "{}"),
                       ("ran", "ran", "{}"), ("median_ms", "median ms", "{:.3f}"), ("min_ms", "min ms", "{:.3f}"),
                       ("per_layer_us", "us/layer", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}"),
                       ("floor_ms", "floor ms", "{:.3f}"), ("x_floor", "x floor", "{:.1f}"),
                       ("speedup_vs_reference", "x reference", "{:.1f}"), ("error", "error", "{:.120}")])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "energies_%s_%s.json" % (device.type, args.dtype))
    write_json(out, {"bench": "energies", "workload": "energies(gamma0) + grad of sum(coi)", "machine":
                     machine_info(device), "gamma0": GAMMA0, "gamma_fixed": GAMMA, "Lt": LT, "rows": rows})


if __name__ == "__main__":
    main()
