"""The `leakycuda` command line: demo, reproduce fig1|fig2, bench and info."""
import argparse
import dataclasses
import os
import subprocess
import sys
import time


def _seeds(text):
    """ "3" -> seeds 0, 1, 2; "0,4,7" -> those seeds."""
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError("--seeds takes a count (3 -> 0,1,2) or a comma list (0,4,7), got %r" % text)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError("--seeds count must be >= 1, got %r" % text)
        return list(range(values[0]))
    return values


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _device(name):
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("leakycuda: --device %s asked for, but torch sees no CUDA device (torch %s, CUDA %s)"
                         % (name, torch.__version__, torch.version.cuda))
    return dev


def _dtype(name):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _add_run_options(p, defaults):
    g = p.add_argument_group("training (defaults: %s)" % defaults)
    g.add_argument("--steps", type=int, help="Adam steps")
    g.add_argument("--sgd-steps", type=int, help="SGD steps after Adam")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--sgd-lr", type=float, help="SGD learning rate")
    g.add_argument("--lam", type=float, help="regularization strength lambda")
    g.add_argument("--width", type=int, help="width w of the representations")
    g.add_argument("--n-train", type=int, help="training points")
    g.add_argument("--n-test", type=int, help="test points")
    g.add_argument("--init", choices=("auto", "random", "identity"),
                   help="weight init (auto: random below Lt = 8, identity from 8 on)")
    g.add_argument("--gamma0", type=float, help="relative ridge gamma0 of the COI / K-norms")


def _overrides(args):
    names = {"steps": "adam_steps", "sgd_steps": "sgd_steps", "lr": "adam_lr", "sgd_lr": "sgd_lr", "lam": "lam",
             "width": "width", "n_train": "n_train", "n_test": "n_test", "init": "init", "gamma0": "gamma0"}
    return {field: getattr(args, a) for a, field in names.items() if getattr(args, a, None) is not None}


def _cmd_demo(args):
    from . import experiments

    device = _device(args.device)
    over = _overrides(args)
    if args.Lt is not None:
        over["Lt"] = args.Lt
    if args.depth is not None:
        over["depth"] = args.depth
    cfg = dataclasses.replace(experiments.DEMO, **over)
    out = args.out or os.path.join("leakycuda_out", "demo")
    experiments.run_demo(out, device=device, dtype=_dtype(args.dtype), cfg=cfg, seed=args.seed,
                         progress=False if args.no_progress else None)
    print("results in %s" % os.path.abspath(out))
    return 0


def _cmd_reproduce(args):
    from . import experiments

    device = _device(args.device)
    out = args.out or os.path.join("leakycuda_out", args.figure)
    kw = dict(quick=args.quick, device=device, dtype=_dtype(args.dtype), seeds=args.seeds,
              overrides=_overrides(args), progress=False if args.no_progress else None)
    if args.figure == "fig1":
        experiments.run_fig1(out, Lts=args.Lts, **kw)
    else:
        experiments.run_fig2(out, depths=args.depths, schemes=args.schemes, **kw)
    print("results in %s" % os.path.abspath(out))
    return 0


def _bench_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "bench")
    return path if os.path.isfile(os.path.join(path, "bench_stack.py")) else None


def _builtin_bench(device, dtype, repeat):
    import torch

    from . import reference
    from .functional import leaky_stack

    print("built-in timing of leaky_stack forward+backward vs. the eager reference on %s (%s); median of %d"
          % (device, str(dtype).replace("torch.", ""), repeat))
    print("%6s %6s %6s  %12s %12s %8s" % ("L", "w", "N", "leakycuda ms", "eager ms", "speedup"))
    gen = torch.Generator().manual_seed(0)
    for L, w, N in ((20, 100, 1000), (100, 100, 1000), (20, 256, 1024)):
        x0 = torch.randn(N, w, generator=gen, dtype=dtype).to(device).requires_grad_()
        W = (torch.randn(L, w, w + 1, generator=gen, dtype=dtype) * (2.0 / w) ** 0.5).to(device).requires_grad_()
        rho = torch.full((L,), 1.0 / L, dtype=dtype, device=device)

        def timed(fn):
            times = []
            for i in range(repeat + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                fn(x0, W, rho, 3.0).square().sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times.append(time.perf_counter() - t)
            return sorted(times)[len(times) // 2] * 1e3

        ours = timed(lambda *a: leaky_stack(*a))
        eager = timed(lambda *a: reference.leaky_stack(*a))
        print("%6d %6d %6d  %12.2f %12.2f %7.2fx" % (L, w, N, ours, eager, eager / ours))


def _cmd_bench(args):
    folder = _bench_dir()
    if folder is not None and not args.builtin:
        cmd = [sys.executable, os.path.join(folder, "bench_stack.py"), "--device", args.device, "--dtype", args.dtype]
        cmd += args.rest
        print("running %s" % " ".join(cmd))
        return subprocess.call(cmd)
    _builtin_bench(_device(args.device), _dtype(args.dtype), args.repeat)
    return 0


def info_dict():
    """Versions, the build, devices and which ops have CPU / CUDA kernels (what `leakycuda info` prints)."""
    import torch

    import leakycuda

    b = leakycuda.build_info
    build = {k: getattr(b, k, None) for k in ("torch_version", "cuda_version", "with_cuda", "cuda_arch_list")}
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("leakycuda::"))
    kernels = {}
    for name in ops:
        keys = [k for k in ("CPU", "CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        kernels[name] = keys
    devices = ["cpu (%d threads)" % torch.get_num_threads()]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append("cuda:%d %s (sm_%d%d, %.0f GiB)" % (i, p.name, p.major, p.minor, p.total_memory / 2 ** 30))
    return {"leakycuda": leakycuda.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "build": build, "devices": devices, "kernels": kernels,
            "cuda_kernels_compiled": any("CUDA" in v for v in kernels.values())}


def _cmd_info(args):
    import json

    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    b = d["build"]
    print("leakycuda %s  (python %s)" % (d["leakycuda"], d["python"]))
    print("torch installed:  %s (CUDA %s)" % (d["torch"], d["torch_cuda"]))
    print("built against:    torch %s, CUDA %s, with_cuda=%s, arch %s"
          % (b["torch_version"], b["cuda_version"], b["with_cuda"], b["cuda_arch_list"]))
    print("devices:          %s" % "; ".join(d["devices"]))
    print("CUDA kernels compiled: %s" % ("yes" if d["cuda_kernels_compiled"] else "no"))
    width = max([len(n) for n in d["kernels"]] + [4])
    for name, keys in d["kernels"].items():
        print("  %-*s  %s" % (width, name, ", ".join(keys) or "(no backend kernel)"))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="leakycuda",
                                description="Leaky ResNets: demo, paper figures, benchmarks, build info.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on the 30 -> 3 -> 30 task, print per-layer energies and the rank estimate, "
                                    "write PNGs and JSON (about a minute on a 2-core CPU)")
    d.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i] (the GPU kernels)")
    d.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    d.add_argument("--out", help="output folder (default ./leakycuda_out/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--Lt", type=float, help="effective depth (default 6)")
    d.add_argument("--depth", type=int, help="number of layers L (default 20)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_run_options(d, "width 64, 500 points, 5000 Adam + 1000 SGD steps, lam 1e-2")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("reproduce", help="the paper's Figure 1 (sweep Lt) or Figure 2 (sweep L and step schemes)")
    r.add_argument("figure", choices=("fig1", "fig2"))
    r.add_argument("--quick", action="store_true", help="tiny settings that finish in minutes on a CPU")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    r.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 -> seeds 0,1,2) or a comma list")
    r.add_argument("--out", help="output folder (default ./leakycuda_out/<figure>)")
    r.add_argument("--Lts", type=_floats, help="fig1: comma list of effective depths")
    r.add_argument("--depths", type=_ints, help="fig2: comma list of depths L")
    r.add_argument("--schemes", type=lambda s: [v for v in s.split(",") if v], help="fig2: comma list of step schemes")
    r.add_argument("--no-progress", action="store_true")
    _add_run_options(r, "the paper's: width 100, 1000 points, 5000 Adam + 1000 SGD steps, lam 1e-2")
    r.set_defaults(func=_cmd_reproduce)

    b = sub.add_parser("bench", help="run bench/bench_stack.py when present (other options, e.g. --quick, are passed "
                                     "on to it), else a short built-in timing")
    b.add_argument("--builtin", action="store_true", help="the built-in timing even when bench/ is present")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--repeat", type=int, default=5, help="built-in timing: repetitions")
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="versions, build, devices, compiled kernels")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error("unrecognized arguments: %s" % " ".join(rest))
    args.rest = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
