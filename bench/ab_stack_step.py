"""A/B timing of one batched leaky_stack forward+backward step between two checkouts (CPU, one thread).

    python bench/ab_stack_step.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3]

Each round runs one child process per checkout, alternating, each timing the model-batched op
(`leaky_stack(x0, W, rho, Lt, checkpoint=1)` then `.square().sum().backward()`) at two sizes; the
medians per round, the machine and both commits go to bench/results/ab_stack_step_<time>.json.
Both checkouts need their compiled extension in leakycuda/.
"""
import argparse
import json
import os
import subprocess
import sys
import time

SIZES = [(9, 200, 32, 20), (15, 1000, 100, 20)]  # (B models, N, w, L)

CHILD = r"""
import sys, time, json, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import leakycuda as lc
torch.manual_seed(0)
res = {}
for B, N, w, L in %r:
    x0 = torch.randn(B, N, w, requires_grad=True)
    W = (torch.randn(B, L, w, w + 1) * 0.1).requires_grad_()
    rho, Lt = torch.full((B, L), 1.0 / L), torch.linspace(1, 6, B, dtype=torch.float64)
    def step():
        lc.leaky_stack(x0, W, rho, Lt, checkpoint=1).square().sum().backward()
    for _ in range(3):
        step()
    ts = []
    for _ in range(15 if N * w < 10 ** 5 else 5):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    ts.sort()
    res["B%%d_N%%d_w%%d_L%%d" %% (B, N, w, L)] = ts[len(ts) // 2] * 1e3
print(json.dumps(res))
""" % (SIZES,)


def commit(path):
    r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("argument --rounds: must be >= 1, got %d" % args.rounds)
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(getattr(args, name))],
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print("%-22s %-28s %-28s" % ("size", "old ms (per round)", "new ms (per round)"))
    for key in runs["old"][0]:
        fmt = lambda name: " / ".join("%.1f" % r[key] for r in runs[name])
        print("%-22s %-28s %-28s" % (key, fmt("old"), fmt("new")))
    import platform, torch
    data = dict(bench="ab_stack_step", old=dict(path=args.old, commit=commit(args.old)),
                new=dict(path=args.new, commit=commit(args.new)), rounds=runs,
                machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                             python=platform.python_version(), load=os.getloadavg()))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "ab_stack_step_%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)  # strict JSON; this parent does not import leakycuda
    print("wrote", path)


if __name__ == "__main__":
    main()
