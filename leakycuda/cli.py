"""The `leakycuda` command line: demo, reproduce fig1|fig2|dln-rank|dln-saddle|fcnn-bottleneck, merge, bench, info
and selftest. ``torchrun --nproc-per-node K -m leakycuda reproduce ...`` spreads an experiment's runs over K ranks.

Every flag is checked before any work runs; a bad value ends the command with one line,
"leakycuda <command>: error: argument --flag: ...", and exit code 2. A run whose training diverges
ends with one line and exit code 1 (its history is kept).
"""
import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time

# Settings of leakycuda.experiments.sweep.RunConfig and run_*() that a flag sets, where the names differ.
_FLAG_OF = {"adam_steps": "--steps", "adam_lr": "--lr"}
# A value that starts with "-" but is a number ("-1e-3", "-.5", "-inf"): argparse would take it for a flag.
_NEGATIVE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block): "<prog>: error: <message>", exit 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see %s --help)\n" % (self.prog, " ".join(str(message).split()), self.prog))


def _seeds(text):
    """ "3" -> seeds 0, 1, 2; "0,4,7" -> those seeds (checked later: distinct, >= 0)."""
    values = _ints(text)
    if len(values) == 1 and "," not in text:
        return values[0]  # a count
    return values


def _items(text, convert, kind):
    """ "1,2,3" -> [convert("1"), ...]; empty items are dropped (an empty list is refused by the checks)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                values.append(convert(part))
            except ValueError:
                raise argparse.ArgumentTypeError("expected a comma list of %s, got %r in %r" % (kind, part, text)) \
                    from None
    return values


def _floats(text):
    return _items(text, float, "numbers")


def _ints(text):
    return _items(text, int, "integers")


def _words(text):
    return _items(text, str, "names")


def _flag(name):
    """The flag that sets a setting (``n_train`` -> ``--n-train``)."""
    if name.startswith("each value of "):
        return _flag(name[len("each value of "):])
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def _checked(parser, fn, *args, **kwargs):
    """Runs a check of leakycuda's API and reports its ValueError / TypeError against the flag it is about."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        name = getattr(e, "name", None)
        if name is None:
            parser.error(str(e))
        each = "each value " if name.startswith("each value of ") else ""
        parser.error("argument %s: %smust be %s, got %s" % (_flag(name), each, e.expect, e.got))


def _add_run_options(p, defaults):
    g = p.add_argument_group("training (defaults: %s)" % defaults)
    g.add_argument("--steps", type=int, help="Adam steps (>= 0)")
    g.add_argument("--sgd-steps", type=int, help="SGD steps after Adam (>= 0)")
    g.add_argument("--lr", type=float, help="Adam learning rate (> 0)")
    g.add_argument("--sgd-lr", type=float, help="SGD learning rate (> 0)")
    g.add_argument("--lam", type=float, help="regularization strength lambda (> 0)")
    g.add_argument("--width", type=int, help="width w of the representations")
    g.add_argument("--n-train", type=int, help="training points (>= 2)")
    g.add_argument("--n-test", type=int, help="test points (>= 0)")
    g.add_argument("--init", choices=("auto", "random", "identity"),
                   help="weight init (auto: random below Lt = 8, identity from 8 on)")
    g.add_argument("--gamma0", type=float, help="relative ridge gamma0 of the COI / K-norms (> 0)")
    g.add_argument("--refine-steps", type=int, help="L-BFGS refinement iterations on W after training (>= 0; 0: none)")
    g.add_argument("--refine-target", type=float, help="stationarity residual at which refinement stops (> 0)")


def _overrides(args):
    names = {"steps": "adam_steps", "sgd_steps": "sgd_steps", "lr": "adam_lr", "sgd_lr": "sgd_lr", "lam": "lam",
             "width": "width", "n_train": "n_train", "n_test": "n_test", "init": "init", "gamma0": "gamma0",
             "refine_steps": "refine_steps", "refine_target": "refine_target", "continue_above": "continue_above",
             "continue_steps": "continue_steps"}
    return {field: getattr(args, a) for a, field in names.items() if getattr(args, a, None) is not None}


def _dtype(name):
    import torch

    return getattr(torch, name)


def _prepare_demo(args, parser):
    """The demo's checked settings, before anything runs: (cfg, out, seed, device, dtype)."""
    from . import _validate
    from .experiments import demo, sweep

    if _launch() is not None:
        parser.error("leakycuda demo trains one run: launch it without torchrun (WORLD_SIZE=%d); torchrun spreads "
                     "the runs of 'leakycuda reproduce'" % _launch()[1])

    over = _overrides(args)
    if args.Lt is not None:
        over["Lt"] = args.Lt
    if args.depth is not None:
        over["depth"] = args.depth
    cfg = dataclasses.replace(demo.DEMO, **over)
    out = os.path.join("leakycuda_out", "demo") if args.out is None else args.out
    seed = _checked(parser, _validate.integer, args.seed, "seed", low=0)
    cfg, out, _, device, dtype, _ = _checked(parser, sweep.check_run, cfg, out, seeds=[seed],
                                             device=args.device, dtype=_dtype(args.dtype))
    return cfg, out, seed, device, dtype


def _prepare_related(args, parser):
    """reproduce <preset experiment>'s checked settings: (out, keyword arguments of its run function)."""
    from . import _validate

    figure_only = ("Lts", "depths", "schemes", "continue_above", "continue_steps", "steps", "sgd_steps", "lr",
                   "sgd_lr", "lam", "width", "n_train", "n_test", "init", "gamma0", "refine_steps", "refine_target")
    given = [name for name in figure_only if getattr(args, name, None) is not None]
    if given:
        parser.error("argument --%s: applies to 'reproduce fig1|fig2' only; '%s' runs its own preset (--quick for "
                     "the small one)" % (given[0].replace("_", "-"), args.figure))
    if args.pad_depths:
        parser.error("argument --pad-depths: applies to 'reproduce fig2' only, not to %s (it trains no ensemble)"
                     % args.figure)
    if args.sequential:
        parser.error("argument --sequential: applies to 'reproduce fig1|fig2' only, not to %s (it trains its runs one "
                     "at a time already)" % args.figure)
    out = os.path.join("leakycuda_out", args.figure) if args.out is None else args.out
    out = _checked(parser, _validate.writable_path, out, "out", folder=True)
    seeds = args.seeds
    if isinstance(seeds, int):
        seeds = range(_checked(parser, _validate.integer, seeds, "seeds", low=1, what="a count"))
    seeds = list(_checked(parser, _validate.distinct, seeds, "seeds",
                          lambda v, n: _validate.integer(v, n, low=0), sort=False))
    device = _checked(parser, _validate.device, args.device, "device")
    if device.type == "meta":
        parser.error("argument --device: must be 'cpu' or 'cuda[:i]' (a run computes real numbers), got 'meta'")
    dtype = None if args.dtype is None else _dtype(args.dtype)
    kw = dict(quick=args.quick, device=device, dtype=dtype, seeds=seeds, progress=False if args.no_progress else None)
    return out, _distributed(args, parser, out, kw)


def _prepare_reproduce(args, parser):
    """reproduce's checked settings, before anything runs: (out, keyword arguments of the figure's run function)."""
    from . import experiments
    from .experiments import fig1, fig2
    from .experiments.sweep import check_run

    if experiments.get(args.figure).kind != "sweep":
        return _prepare_related(args, parser)
    args.dtype = args.dtype or "float32"
    other = {"fig1": ("depths", "schemes"), "fig2": ("Lts", "continue_above", "continue_steps")}[args.figure]
    for name in other:
        if getattr(args, name) is not None:
            parser.error("argument --%s: applies to 'reproduce %s' only, not to %s"
                         % (name.replace("_", "-"), "fig1" if args.figure == "fig2" else "fig2", args.figure))
    if args.pad_depths and args.figure != "fig2":
        parser.error("argument --pad-depths: applies to 'reproduce fig2' only, not to %s" % args.figure)
    if args.pad_depths and args.sequential:
        parser.error("argument --pad-depths: not allowed with --sequential (it pads the depths of one batched "
                     "ensemble; --sequential trains one run at a time)")
    preset = (fig1.FIG1 if args.figure == "fig1" else fig2.FIG2)["quick" if args.quick else "paper"]
    cfg = dataclasses.replace(preset["config"], **_overrides(args))
    out = os.path.join("leakycuda_out", args.figure) if args.out is None else args.out
    sweep = {"Lts": args.Lts} if args.figure == "fig1" else {"depths": args.depths, "schemes": args.schemes}
    _, out, seeds, device, dtype, _ = _checked(parser, check_run, cfg, out, seeds=args.seeds,
                                               device=args.device, dtype=_dtype(args.dtype), a=preset.get("a"),
                                               **sweep)
    kw = dict(quick=args.quick, device=device, dtype=dtype, seeds=seeds, overrides=_overrides(args),
              progress=False if args.no_progress else None, sequential=args.sequential, **sweep)
    if args.pad_depths:
        kw["pad_depths"] = True
    return out, _distributed(args, parser, out, kw)


def _launch():
    """(rank, world size, local rank) of a ``torchrun`` launch of more than one process, from its environment
    variables; None otherwise."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    return (rank, size, local) if size > 1 else None


def _distributed(args, parser, out, kw):
    """reproduce's keyword arguments with --shard (checked) or, under torchrun, the rank's device and log."""
    import torch

    from .experiments.distribute import parse_shard

    launch = _launch()
    if args.shard is not None:
        if launch is not None:
            parser.error("argument --shard: not with torchrun (WORLD_SIZE=%d): its ranks split the runs themselves; "
                         "use --shard i/n in single-process jobs of an array" % launch[1])
        kw["shard"] = _checked(parser, parse_shard, args.shard, "shard")
    elif launch is not None:
        rank, size, local = launch
        device = kw["device"]
        if device.type == "cuda" and device.index is None:  # one GPU per rank
            if local >= torch.cuda.device_count():
                parser.error("argument --device: rank %d (LOCAL_RANK %d) has no GPU of its own: this machine has %d; "
                             "launch at most that many processes per node" % (rank, local, torch.cuda.device_count()))
            kw["device"] = torch.device("cuda", local)
        prefix = "[rank %d of %d]" % (rank, size)
        kw["log"] = lambda *a: print(prefix, *a, flush=True)
        if rank != 0:
            kw["progress"] = False
    return kw


def _cmd_demo(args, prepared):
    from . import experiments

    cfg, out, seed, device, dtype = prepared
    experiments.get("demo").run(out, device=device, dtype=dtype, cfg=cfg, seed=seed,
                         progress=False if args.no_progress else None)
    print("results in %s" % os.path.abspath(out))
    return 0


def _cmd_reproduce(args, prepared):
    from . import experiments
    from .experiments.distribute import part_path

    out, kw = prepared
    launch = _launch()
    if launch is None:
        experiments.get(args.figure).run(out, **kw)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # the ranks exchange their runs' JSON records only, so the CPU backend
        try:
            experiments.get(args.figure).run(out, **kw)
        finally:
            # Every rank done before any tears gloo down (a rank that destroys its group while another still
            # talks to it can abort that one).
            dist.barrier()
            dist.destroy_process_group()
        if launch[0] != 0:
            return 0
    if "shard" in kw:
        i, n = kw["shard"]
        print("shard %d of %d in %s; once every shard has run: leakycuda merge %s %s"
              % (i, n, os.path.abspath(part_path(out, args.figure, "shard", i, n)), out,
                 part_path(out, args.figure, "shard", 0, n).replace("-0-of-", "-*-of-")))
        return 0
    print("results in %s" % os.path.abspath(out))
    return 0


def _prepare_merge(args, parser):
    """merge's checked parts, before anything is written: (OUT, what read_parts gives)."""
    from . import _validate
    from .experiments.distribute import read_parts

    try:
        out = _validate.writable_path(args.out, "OUT", folder=True)
        return out, read_parts(args.parts)
    except (TypeError, ValueError, OSError) as e:
        parser.error(" ".join(str(e).split()))


def _cmd_merge(args, prepared):
    from .experiments.distribute import write_merged

    out, parts = prepared
    write_merged(out, parts)
    print("results in %s" % os.path.abspath(out))
    return 0


def _bench_dir():
    """The repository's bench/ folder when the command runs in a clone (the current folder has it), else None:
    the installed package does not look outside itself."""
    path = os.path.join(os.getcwd(), "bench")
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


def _prepare_bench(args, parser):
    """bench's checked settings, before anything runs: (the bench_stack.py command or None, device, dtype)."""
    import torch

    from . import _validate

    device = _checked(parser, _validate.device, args.device, "device")
    if args.repeats is not None:
        _checked(parser, _validate.integer, args.repeats, "repeats", low=1)
    if args.dtype in ("float16", "bfloat16") and device.type != "cuda":
        parser.error("argument --dtype: %s runs on CUDA only, got --device %s" % (args.dtype, args.device))
    # Every value is checked first, whether or not bench/bench_stack.py then runs.
    extra = []
    if args.quick:
        extra += ["--quick"]
    if args.out is not None:
        extra += ["--out", _checked(parser, _validate.writable_path, args.out, "out", folder=False)]
    if args.Lt is not None:
        extra += ["--Lt", repr(_checked(parser, _validate.real, args.Lt, "Lt", low=0.0))]
    if args.variants is not None:
        variants = _checked(parser, _validate.distinct, args.variants, "variants",
                            lambda v, n: _validate.choice(v, n, BENCH_VARIANTS), sort=False)
        extra += ["--variants", ",".join(variants)]
    folder = _bench_dir()
    passed = [f for f in ("quick", "out", "Lt", "variants") if getattr(args, f) not in (None, False)]
    if args.builtin or folder is None:
        if passed:
            parser.error("argument --%s: applies to bench/bench_stack.py, which %s" % (
                passed[0], "--builtin does not run" if args.builtin else "is not in the current folder "
                "(run from the root of a clone of the repository)"))
        if args.dtype in ("float16", "bfloat16"):
            parser.error("argument --dtype: the built-in timing runs float32 or float64, got %s" % args.dtype)
        return None, device, getattr(torch, args.dtype)
    cmd = [sys.executable, os.path.join(folder, "bench_stack.py"), "--device", args.device, "--dtype", args.dtype]
    if args.repeats is not None:
        cmd += ["--repeats", str(args.repeats)]
    return cmd + extra, device, getattr(torch, args.dtype)


def _cmd_bench(args, prepared):
    cmd, device, dtype = prepared
    if cmd is not None:
        print("running %s" % " ".join(cmd), flush=True)
        return subprocess.call(cmd)
    _builtin_bench(device, dtype, 5 if args.repeats is None else args.repeats)
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


def _cmd_info(args, prepared):
    from . import _json

    d = info_dict()
    if args.json:
        print(_json.dumps(d, indent=1))
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
    print("check every op against the float64 reference: leakycuda selftest%s"
          % (" [--device cuda]" if d["cuda_kernels_compiled"] else " (--device cuda needs a CUDA build)"))
    return 0


def _prepare_selftest(args, parser):
    """selftest's checked settings, before anything runs: (device, JSON path or None)."""
    from . import _validate

    device = _checked(parser, _validate.device, args.device, "device")
    if device.type == "meta":
        parser.error("argument --device: must be 'cpu' or 'cuda[:i]' (the checks compute real numbers), got 'meta'")
    path = None if args.json is None else _checked(parser, _validate.writable_path, args.json, "json", folder=False)
    return device, path


def _cmd_selftest(args, prepared):
    from . import selftest

    device, path = prepared
    return selftest.run(device, quick=args.quick, json_path=path)


BENCH_VARIANTS = ("fused", "eager", "compile")


def _device_help(default="cpu"):
    return "cpu (default) or cuda[:i] (the GPU kernels)" if default == "cpu" else default


def build_parser():
    from . import __version__

    p = _Parser(prog="leakycuda", description="Leaky ResNets: demo, paper figures, benchmarks, build info.")
    p.add_argument("--version", action="version", version="leakycuda %s" % __version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,reproduce,merge,bench,info,selftest}")

    d = sub.add_parser("demo", help="train on the 30 -> 3 -> 30 task, print per-layer energies and the rank estimate, "
                                    "write PNGs and JSON (about a minute on a 2-core CPU)")
    d.add_argument("--device", default="cpu", help=_device_help())
    d.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    d.add_argument("--out", help="output folder (default ./leakycuda_out/demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the task and the init (>= 0)")
    d.add_argument("--Lt", type=float, help="effective depth (> 0 and <= 2 x depth, the stable range rho_l*Lt <= 2; "
                                            "default 6)")
    d.add_argument("--depth", type=int, help="number of layers L (default 20)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_run_options(d, "width 64, 500 points, 5000 Adam + 1000 SGD steps, lam 1e-2")
    d.set_defaults(func=_cmd_demo, prepare=_prepare_demo)

    from . import experiments

    names = [n for n, e in experiments.experiments().items() if e.kind != "demo"]
    r = sub.add_parser("reproduce", help="an experiment: the paper's Figure 1 (sweep Lt) or Figure 2 (sweep L and "
                                         "step schemes), or a related-paper one: %s" % ", ".join(names),
                       epilog="; ".join("%s: %s" % (n, experiments.get(n).help) for n in names))
    r.add_argument("figure", choices=names, metavar="experiment", help=", ".join(names))
    r.add_argument("--quick", action="store_true", help="tiny settings that finish in minutes on a CPU")
    r.add_argument("--device", default="cpu", help=_device_help())
    r.add_argument("--dtype", choices=("float32", "float64"),
                   help="default float32 (float64 for the deep-linear-network experiments)")
    r.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 -> seeds 0,1,2) or a comma list of seeds")
    r.add_argument("--out", help="output folder (default ./leakycuda_out/<figure>)")
    r.add_argument("--Lts", type=_floats, help="fig1: comma list of effective depths (> 0)")
    r.add_argument("--depths", type=_ints, help="fig2: comma list of depths L (>= 1)")
    r.add_argument("--schemes", type=_words, help="fig2: comma list of step schemes (equidistant, irregular, adaptive)")
    r.add_argument("--continue-above", type=float,
                   help="fig1: from this Lt on, each seed warm-starts from its previous Lt (default 8; inf: never)")
    r.add_argument("--continue-steps", type=int, help="fig1: Adam steps after a warm start (default 3000)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--sequential", action="store_true",
                   help="train the runs one at a time (default: batched, as one ensemble per group of runs that "
                        "share a depth; the same numbers up to float rounding)")
    r.add_argument("--shard", metavar="I/N",
                   help="train only shard I of N of the runs (1 <= I <= N; the same split for every shard) and write "
                        "OUT/parts/<experiment>.shard-I-of-N.json, for the tasks of a job array; 'leakycuda merge' "
                        "joins the parts. A rerun skips the runs its part file holds. Under torchrun the ranks split "
                        "the runs without it")
    r.add_argument("--pad-depths", action="store_true",
                   help="fig2: train every depth in one ensemble, the shallower stacks padded with identity layers "
                        "(rho_l = 0; default: one ensemble per depth)")
    _add_run_options(r, "the paper's size: width 100, 1000 points, 5000 Adam + 1000 SGD steps; lam 1e-2, ten "
                        "times the paper's lambda = 0.001 (docs/results.md)")
    r.set_defaults(func=_cmd_reproduce, prepare=_prepare_reproduce)

    m = sub.add_parser("merge", help="join the part files of 'reproduce ... --shard I/N' into the experiment's JSON "
                                     "and PNGs (parts of different settings, a missing or a duplicate shard are "
                                     "refused)")
    m.add_argument("out", metavar="OUT", help="output folder of the merged result")
    m.add_argument("parts", metavar="PART", nargs="+", help="the shards' part files (OUT/parts/<experiment>.shard-"
                                                            "I-of-N.json)")
    m.set_defaults(func=_cmd_merge, prepare=_prepare_merge)

    b = sub.add_parser("bench", help="run bench/bench_stack.py when the current folder is a clone, else a short "
                                     "built-in timing")
    b.add_argument("--builtin", action="store_true", help="the built-in timing even when bench/ is present")
    b.add_argument("--device", default="cpu", help=_device_help())
    b.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"),
                   help="float16 / bfloat16 on CUDA only")
    b.add_argument("--repeats", "--repeat", type=int, help="timed repetitions (>= 1; default 5 built-in, 7 bench)")
    g = b.add_argument_group("bench/bench_stack.py only")
    g.add_argument("--quick", action="store_true", help="one small size, 3 repeats")
    g.add_argument("--out", help="JSON file (default bench/results/stack_<device>_<time>.json)")
    g.add_argument("--Lt", type=float, help="effective depth of the timed stacks (default 3)")
    g.add_argument("--variants", type=_words, help="comma list of %s" % ", ".join(BENCH_VARIANTS))
    b.set_defaults(func=_cmd_bench, prepare=_prepare_bench)

    i = sub.add_parser("info", help="versions, build, devices, compiled kernels")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info, prepare=lambda args, parser: None)

    t = sub.add_parser("selftest", help="every op and path against the float64 reference on small shapes, one line "
                                        "per check; exit code 0 when none fails (under a minute on a CPU)")
    t.add_argument("--device", default="cpu", help=_device_help())
    t.add_argument("--quick", action="store_true", help="fewer shapes and activations (a few seconds)")
    t.add_argument("--json", help="also write every check's result to this JSON file")
    t.set_defaults(func=_cmd_selftest, prepare=_prepare_selftest)
    return p


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _join_negative_values(parser, argv):
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"], so that a negative number is read as the flag's value (then
    refused with a clear message) instead of as an unknown flag; argparse only knows "-5" and "-.5"."""
    takes_value = {o for sp in _subparsers(parser).values() for a in sp._actions
                   if a.option_strings and a.nargs is None for o in a.option_strings}
    out = []
    for tok in argv:
        if out and out[-1] in takes_value and _NEGATIVE.match(tok):
            out[-1] = "%s=%s" % (out[-1], tok)
        else:
            out.append(tok)
    return out


def _unknown(parser, args, rest):
    """A one-line error for flags the subcommand does not have, naming the subcommand they belong to."""
    subs = _subparsers(parser)
    sp = subs[args.command]
    flag = next((t.split("=")[0] for t in rest if t.startswith("-")), None)
    owners = [name for name, other in subs.items()
              if name != args.command and any(flag in a.option_strings for a in other._actions)]
    if flag is not None and owners:
        sp.error("%s is an option of 'leakycuda %s', not of '%s'" % (flag, "' and 'leakycuda ".join(owners),
                                                                     args.command))
    sp.error("unrecognized arguments: %s" % " ".join(rest))


def main(argv=None):
    """Parses and checks every flag (exit 2 with one line on a bad one), then runs the subcommand.

    Returns its exit code: 0, or 1 when training diverged (one line on stderr; the history is kept).
    """
    from .experiments.distribute import RunsFailed
    from .train import DivergenceError

    parser = build_parser()
    argv = _join_negative_values(parser, sys.argv[1:] if argv is None else list(argv))
    args, rest = parser.parse_known_args(argv)
    if rest:
        _unknown(parser, args, rest)
    sub = _subparsers(parser)[args.command]
    prepared = args.prepare(args, sub)
    try:
        return args.func(args, prepared)
    except DivergenceError as e:
        msg = " ".join(str(e).split())
        for name, flag in (("adam_lr", "--lr"), ("sgd_lr", "--sgd-lr")):  # the hint names the flag to change
            msg = msg.replace("lower %s" % name, "lower %s" % flag)
        print("%s: error: %s" % (sub.prog, msg), file=sys.stderr)
        return 1
    except RunsFailed as e:
        print("%s: error: %s" % (sub.prog, " ".join(str(e).split())), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
