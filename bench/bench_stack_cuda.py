"""CUDA benchmark of the leaky stack (forward+backward): fused op vs eager reference, torch.compile, CUDA-graph replay
and a JAX jit(grad) of a lax.scan over the layers (when jax imports); B models in one batched call vs B separate calls
vs JAX vmap. --device cpu --tiny runs the same code on tiny sizes (a rehearsal; CUDA-only columns are left out).

Usage: python bench/bench_stack_cuda.py [--only ROWS] [--quick | --tiny] [--no-compile] [--no-jax] [--out FILE]"""
import argparse
import functools
import json
import math
import os
import sys
import time

import torch

import leakycuda
from leakycuda import _json, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info, time_fn  # noqa: E402


DEVICE = "cuda"  # set by main() from --device


def cuda():
    return DEVICE.startswith("cuda")


def timeit(fn, warmup=3, reps=10):
    """Median milliseconds of fn() over reps (CUDA events on a GPU, after warm-up)."""
    return time_fn(fn, device=DEVICE, warmup=warmup, repeats=reps)["median_ms"]


def make_inputs(N, w, L, dtype, Lt=2.0, seed=0, B=None):
    """x0 [N, w], W [L, w, w+1], rho [L] (leaves) and gout [N, w]; with B, a leading [B] on each (B models)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    lead = () if B is None else (B,)
    x0 = torch.randn(*lead, N, w, device=DEVICE, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(*lead, L, w, w + 1, device=DEVICE, generator=g) / math.sqrt(w)).to(dtype).requires_grad_()
    rho = torch.full((*lead, L), 1.0 / L, device=DEVICE, dtype=dtype, requires_grad=True)
    gout = torch.randn(*lead, N, w, device=DEVICE, generator=g).to(dtype)
    return x0, W, rho, Lt, gout


def need_cuda(what):
    if not cuda():
        raise RuntimeError("%s needs a CUDA device (this run: --device %s)" % (what, DEVICE))


def step_fn(stack, x0, W, rho, Lt, gout, **kw):
    def step():
        for t in (x0, W, rho):
            t.grad = None
        out = stack(x0, W, rho, Lt, **kw)
        out.backward(gout)
    return step


def graph_of(step):
    """CUDA-graph capture of one step (static inputs); returns the replay function."""
    need_cuda("a CUDA graph")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def compiled_stack(L, per_layer, activation="relu"):
    """torch.compile of the reference: the whole stack, or one layer called L times (long stacks)."""
    mode = "max-autotune-no-cudagraphs"
    if not per_layer:
        return torch.compile(functools.partial(reference.leaky_stack, activation=activation), mode=mode)
    layer = torch.compile(functools.partial(reference.leaky_layer, activation=activation), mode=mode)

    def stack(x0, W, rho, Lt):
        x = x0
        for l in range(W.shape[0]):
            x = layer(x, W[l], rho[l], Lt)
        return x
    return stack


def stack_flops(N, w, L):
    """Forward GEMM FLOPs of the stack; forward+backward counts three such GEMMs per layer."""
    return 2.0 * N * w * (w + 1) * L


def jax_stack_fn(Lt, activation):
    """The stack as a JAX function of (x [.., N, w], W [L, w, w+1], rho [L]): a lax.scan over the layers."""
    import jax

    def stack(x, Wm, r):
        def layer(x, wr):
            Wl, rl = wr
            s = jax.nn.relu(x) if activation == "relu" else x
            return (1 - rl * Lt) * x + rl * (s @ Wl[:, :-1].T + Wl[:, -1]), None
        return jax.lax.scan(layer, x, (Wm, r))[0]
    return stack


def jax_single(x0, W, rho, Lt, gout, activation, tf32, dW_op, reps):
    """JAX jit(grad) of a lax.scan over the layers, one model (forward+backward), wall-clock ms; matmuls at TF32
    (tf32) or full float32, as the op ran; and how far its dW is from the op's (max abs diff / max |dW|)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU memory to torch
    import jax
    import jax.numpy as jnp

    stack = jax_stack_fn(Lt, activation)
    f = jax.jit(jax.grad(lambda x, Wm, r, g: jnp.sum(stack(x, Wm, r) * g), argnums=(0, 1, 2)))
    a = [jnp.asarray(t.detach().float().cpu().numpy()) for t in (x0, W, rho, gout)]
    precision = "tensorfloat32" if tf32 else "float32"
    with jax.default_matmul_precision(precision):  # traced and compiled, then timed, under one precision
        t0 = time.perf_counter()
        grads = jax.block_until_ready(f(*a))
        compile_s = time.perf_counter() - t0
        t = time_fn(lambda: jax.block_until_ready(f(*a)), device="cpu", warmup=3, repeats=reps)
    dW = torch.from_numpy(jax.device_get(grads[1]).copy()).double()
    ref = dW_op.detach().double().cpu()
    return {"jax_ms": t["median_ms"], "jax_compile_s": compile_s, "jax_version": jax.__version__,
            "jax_device": str(jax.devices()[0]), "jax_matmul_precision": precision,
            "jax_dW_rel_diff": ((dW - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()}


def add_jax(res, fn, args):
    """res.update(fn()) when jax imports (else why not), without letting a JAX failure lose the torch columns."""
    if args.no_jax:
        res["jax"] = "skipped (--no-jax)"
        return
    try:
        res.update(fn())
    except ImportError:
        res["jax"] = "not installed"
    except Exception as e:  # recorded, not fatal: the torch columns still stand
        res["jax_error"] = repr(e)[:500]


def bench_small(name, N, w, L, dtype, tf32, args, rows, activation="relu"):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    x0, W, rho, Lt, gout = make_inputs(N, w, L, dtype)
    res = {"name": name, "N": N, "w": w, "L": L, "dtype": str(dtype), "tf32": tf32, "activation": activation}
    fused = step_fn(leakycuda.leaky_stack, x0, W, rho, Lt, gout, activation=activation)
    res["fused_ms"] = timeit(fused, reps=args.reps)
    fused()
    dW_op = W.grad.detach().clone()
    eager = step_fn(reference.leaky_stack, x0, W, rho, Lt, gout, activation=activation)
    res["eager_ms"] = timeit(eager, warmup=1, reps=max(3, args.reps // 3))
    if cuda():
        res["fused_graph_ms"] = timeit(graph_of(fused), reps=args.reps)
        res["eager_graph_ms"] = timeit(graph_of(eager), reps=args.reps)
    add_jax(res, lambda: jax_single(x0, W, rho, Lt, gout, activation, tf32, dW_op, args.reps), args)
    if not args.no_compile:
        per_layer = L > args.compile_max_layers
        res["compile_scope"] = "layer" if per_layer else "stack"
        t0 = time.perf_counter()
        try:
            comp = step_fn(compiled_stack(L, per_layer, activation), x0, W, rho, Lt, gout)
            comp()
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            res["compile_ms"] = timeit(comp, warmup=1, reps=max(3, args.reps // 3))
        except Exception as e:  # recorded, not fatal: the other columns still stand
            res["compile_error"] = repr(e)[:500]
    res["fused_us_per_layer"] = 1e3 * res["fused_ms"] / L
    for k in ("eager_ms", "eager_graph_ms", "compile_ms", "jax_ms"):
        if k in res:
            res["speedup_vs_" + k[:-3]] = res[k] / res["fused_ms"]
    res["fwd_bwd_tflops"] = 3 * stack_flops(N, w, L) / (res["fused_ms"] * 1e-3) / 1e12
    rows.append(res)


def fused_row(name, N, w, L, dtype, args):
    """A result row with the fused fwd+bwd time (TF32 allowed), and the weights it ran on."""
    torch.backends.cuda.matmul.allow_tf32 = True
    x0, W, rho, Lt, gout = make_inputs(N, w, L, dtype)
    res = {"name": name, "N": N, "w": w, "L": L, "dtype": str(dtype)}
    res["fused_ms"] = timeit(step_fn(leakycuda.leaky_stack, x0, W, rho, Lt, gout), reps=args.reps)
    return res, W


def bench_rate(name, N, w, L, dtype, args, rows):
    """Fused fwd+bwd rate against the dense matmul rate torch.matmul reaches in the same run."""
    need_cuda(name)
    res, W = fused_row(name, N, w, L, dtype, args)
    res["fwd_bwd_tflops"] = 3 * stack_flops(N, w, L) / (res["fused_ms"] * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = timeit(lambda: torch.matmul(a, a), reps=args.reps)
    res["matmul_8192_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    s = torch.randn(N, w + 1, device="cuda", dtype=dtype)
    ms = timeit(lambda: torch.matmul(s, W[0].detach().t()), reps=args.reps)
    res["matmul_same_shape_tflops"] = 2 * N * w * (w + 1) / (ms * 1e-3) / 1e12
    res["fraction_of_matmul_8192"] = res["fwd_bwd_tflops"] / res["matmul_8192_tflops"]
    res["fraction_of_matmul_same_shape"] = res["fwd_bwd_tflops"] / res["matmul_same_shape_tflops"]
    rows.append(res)


def bench_large(name, N, w, L, dtype, args, rows):
    """Large width: fused fwd+bwd against the same 3L GEMMs alone through torch.matmul."""
    need_cuda(name)
    res, W = fused_row(name, N, w, L, dtype, args)
    S = torch.randn(N, w + 1, device="cuda", dtype=dtype)
    G = torch.randn(N, w, device="cuda", dtype=dtype)
    Wd = W.detach()

    def gemms():
        for l in range(L):
            torch.matmul(S, Wd[l].t())
            torch.matmul(G, Wd[l, :, :w])
            torch.matmul(G.t(), S)
    res["gemms_ms"] = timeit(gemms, reps=args.reps)
    res["ratio_to_gemms"] = res["fused_ms"] / res["gemms_ms"]
    rows.append(res)


def jax_models(x0, W, rho, Lts, gout, activation, reps):
    """JAX jit(vmap(grad)) of a lax.scan over the layers, B models at once (forward+backward), wall-clock ms."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU memory to torch
    import jax
    import jax.numpy as jnp

    def loss(x, Wm, r, Lt, g):
        return jnp.sum(jax_stack_fn(Lt, activation)(x, Wm, r) * g)

    f = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))
    a = [jnp.asarray(t.detach().float().cpu().numpy()) for t in (x0, W, rho, Lts, gout)]
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    compile_s = time.perf_counter() - t0
    t = time_fn(lambda: jax.block_until_ready(f(*a)), device="cpu", warmup=3, repeats=reps)
    return {"jax_vmap_ms": t["median_ms"], "jax_compile_s": compile_s, "jax_version": jax.__version__,
            "jax_device": str(jax.devices()[0]),
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def bench_models(name, B, N, w, L, dtype, args, rows, activation="relu"):
    """B models (per-model Lt 1..4) forward+backward: one batched call vs B separate calls vs JAX vmap."""
    torch.backends.cuda.matmul.allow_tf32 = True
    x0, W, rho, Lt, gout = make_inputs(N, w, L, dtype, B=B)
    Lts = torch.linspace(1.0, 4.0, B, dtype=torch.float64, device=DEVICE)
    res = {"name": name, "B": B, "N": N, "w": w, "L": L, "dtype": str(dtype), "tf32": True, "activation": activation}
    batched = step_fn(leakycuda.leaky_stack, x0, W, rho, Lts, gout, activation=activation)
    res["batched_ms"] = timeit(batched, reps=args.reps)
    if cuda():
        res["batched_graph_ms"] = timeit(graph_of(batched), reps=args.reps)
    singles = [step_fn(leakycuda.leaky_stack, *[t[b].detach().clone().requires_grad_() for t in (x0, W, rho)],
                       Lts[b].item(), gout[b], activation=activation) for b in range(B)]

    def separate():
        for step in singles:
            step()
    res["separate_ms"] = timeit(separate, reps=args.reps)
    res["batched_per_model_ms"] = res["batched_ms"] / B
    res["speedup_vs_separate"] = res["separate_ms"] / res["batched_ms"]
    add_jax(res, lambda: jax_models(x0, W, rho, Lts, gout, activation, args.reps), args)
    if "jax_vmap_ms" in res:
        res["speedup_vs_jax_vmap"] = res["jax_vmap_ms"] / res["batched_ms"]
    rows.append(res)


def bench_checkpoint(name, N, w, L, dtype, args, rows):
    """checkpoint="sqrt" against full save: activation memory held for backward and step time."""
    need_cuda(name + " (the CUDA allocator's counters)")
    torch.backends.cuda.matmul.allow_tf32 = True
    x0, W, rho, Lt, gout = make_inputs(N, w, L, dtype)
    res = {"name": name, "N": N, "w": w, "L": L, "dtype": str(dtype)}
    for label, ck in (("full", None), ("sqrt", "sqrt")):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = leakycuda.leaky_stack(x0, W, rho, Lt, checkpoint=ck)
        torch.cuda.synchronize()
        res[label + "_activation_bytes"] = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
        del out
        res[label + "_ms"] = timeit(step_fn(leakycuda.leaky_stack, x0, W, rho, Lt, gout, checkpoint=ck), reps=args.reps)
    res["sqrt_bound_bytes"] = 3 * math.sqrt(L) * N * w * 4
    res["sqrt_time_ratio"] = res["sqrt_ms"] / res["full_ms"]
    rows.append(res)


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_stack_cuda.json")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a rehearsal with --tiny")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (N <= 40, w <= 12, L <= 5, B <= 3): a rehearsal "
                                                        "of the script, its numbers mean nothing")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-jax", action="store_true", help="leave out the JAX columns")
    ap.add_argument("--compile-max-layers", type=int, default=200,
                    help="compile the whole stack up to this depth, else one layer called L times")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    DEVICE = args.device
    if args.tiny:
        args.no_compile = True
    rows = []
    s = 10 if args.quick else 1

    def z(N, w, L):
        """(N, w, L), clamped with --tiny."""
        return (min(N, 40), min(w, 12), min(L, 5)) if args.tiny else (N, w, L)

    B16 = 3 if args.tiny else 16
    f32, bf16 = torch.float32, torch.bfloat16
    jobs = {
        "L20_tf32": lambda: bench_small("L20_tf32", *z(1000, 100, 20), f32, True, args, rows),
        "L20_fp32_exact": lambda: bench_small("L20_fp32_exact", *z(1000, 100, 20), f32, False, args, rows),
        "paper_tf32": lambda: bench_small("paper_tf32", *z(1000, 100, 1000 // s), f32, True, args, rows),
        "paper_fp32_exact": lambda: bench_small("paper_fp32_exact", *z(1000, 100, 1000 // s), f32, False, args, rows),
        "paper_linear_tf32": lambda: bench_small("paper_linear_tf32", *z(1000, 100, 1000 // s), f32, True, args, rows,
                                                 activation="linear"),
        "models16_L20_tf32": lambda: bench_models("models16_L20_tf32", B16, *z(1000, 100, 20), f32, args, rows),
        "wide_batch_bf16": lambda: bench_rate("wide_batch_bf16", *z(65536 // s, 128, 100), bf16, args, rows),
        "large_width_tf32": lambda: bench_large("large_width_tf32", *z(32768 // s, 1024, 32), f32, args, rows),
        "large_width_bf16": lambda: bench_large("large_width_bf16", *z(32768 // s, 1024, 32), bf16, args, rows),
        "checkpoint_sqrt": lambda: bench_checkpoint("checkpoint_sqrt", *z(1000, 100, 1000 // s), f32, args, rows),
    }
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(jobs))
    if unknown:
        ap.error("unknown --only rows %s; rows: %s" % (", ".join(unknown), ", ".join(jobs)))
    for name, job in jobs.items():
        if only and name not in only:
            continue
        try:
            job()
        except Exception as e:  # one failing config must not hide the others
            rows.append({"name": name, "error": repr(e)[:1000]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"environment": machine_info(DEVICE), "tiny": args.tiny, "quick": args.quick, "results": rows}
    _json.dump(result, args.out, indent=2)
    print()
    print("%-20s %10s %10s %12s %12s %12s %12s" % ("config", "fused ms", "us/layer", "x eager", "x compile", "x graph",
                                                  "x JAX scan"))
    for r in rows:
        if "batched_ms" in r:
            print("%-20s %d models: batched %.3f ms (%.3f ms/model, graph %s), %d separate calls %.3f ms (%.1fx), "
                  "JAX vmap %s" % (r["name"], r["B"], r["batched_ms"], r["batched_per_model_ms"],
                                   "%.3f" % r["batched_graph_ms"] if "batched_graph_ms" in r else "-",
                                   r["B"], r["separate_ms"], r["speedup_vs_separate"],
                                   "%.3f ms (%.1fx)" % (r["jax_vmap_ms"], r["speedup_vs_jax_vmap"])
                                   if "jax_vmap_ms" in r else r.get("jax", r.get("jax_error"))))
    for r in rows:
        if "fused_ms" in r:
            print("%-20s %10.3f %10.3f %12s %12s %12s %12s" % (
                r["name"], r["fused_ms"], 1e3 * r["fused_ms"] / r["L"],
                "%.1f" % r["speedup_vs_eager"] if "speedup_vs_eager" in r else "-",
                "%.1f" % r["speedup_vs_compile"] if "speedup_vs_compile" in r else "-",
                "%.1f" % r["speedup_vs_eager_graph"] if "speedup_vs_eager_graph" in r else "-",
                "%.1f" % r["speedup_vs_jax"] if "speedup_vs_jax" in r else "-"))
    for r in rows:
        extra = {k: v for k, v in r.items() if k.startswith(("fraction", "ratio", "sqrt_", "full_", "compile_s"))}
        if extra:
            print(r.get("name"), json.dumps(extra))


if __name__ == "__main__":
    main()
