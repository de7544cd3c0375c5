"""`leakycuda selftest`: every op and path against the float64 reference on small shapes, one line per check.

The check to run after installing, on any machine: ``leakycuda selftest [--device cpu|cuda[:i]] [--quick]``.
Each check prints ``PASS``, ``FAIL`` or ``SKIP``, its name and what it measured; a summary line follows and
the exit code is 0 when nothing failed, 1 otherwise. Checks:

* ``stack/<precision>/<activation>``: forward and every gradient (dx0, dW, drho) of the leaky stack on a few
  shapes (on CUDA one per width bucket of the kernels and one past them, the GEMM path). Precisions: fp64 and
  fp32 everywhere; tf32, bf16 and fp16 on CUDA (skipped with the reason on the CPU). float64 results must
  match the float64 reference to 1e-10; lower precision within 4 times the error the plain-PyTorch
  reference makes at that precision (:mod:`leakycuda._tolerance`, the rule the tests use).
* ``stack/checkpoint``, ``stack/return_all``, ``stack/models`` (B models with per-model Lt, one padded to a
  shallower depth with rho_l = 0), ``layer``: the same comparisons on those paths.
* ``coi/stable``, ``coi/exact``, ``k_norm2``, ``energies``: the Cost-of-Identity, K-norm and energies ops
  and every gradient against leakycuda.reference in float64 (float32 inputs to 2e-5, gradients to 2e-4,
  the CUDA energies tests' tolerances); on CUDA they must run the fused kernels where those apply.
* ``ensemble/train_step``: fit of a LeakyEnsemble (Adam then SGD steps) against the same steps taken by
  torch.optim on the float64 reference; on CUDA also with the step captured in a CUDA graph
  (``ensemble/train_step_graph``), and ``stack/cuda_graph``: capture of the batched op's forward and
  backward, replayed on new inputs and new per-model Lt.
* ``bad_input/...``: argument errors that once killed the process on CUDA (negative or NaN rho, W without
  its bias column); each runs in a child process, so a crash is reported (with the signal) instead of
  ending this one.

``LEAKYCUDA_SELFTEST_PERTURB=<pattern>`` (shell-style, on the check names) makes every matching check
compare a deliberately wrong result (one element off by half the reference's scale; the bad-input
children kill themselves with SIGSEGV), to show that a check can fail and how a failure reads.
"""
import contextlib
import fnmatch
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

import torch

from . import reference as R
from ._ops import ops
from ._tolerance import FLOAT64_RTOL, PRECISIONS, SAME_PRECISION_FACTOR, compare, max_abs_error, worst_element

PERTURB_ENV = "LEAKYCUDA_SELFTEST_PERTURB"

CUDA_ONLY_PRECISIONS = ("tf32", "bf16", "fp16")
ACTIVATIONS = ("relu", "linear")
#: Energies tolerances by input dtype: (values, gradients), relative to each result's largest entry.
ENERGIES_RTOL = {torch.float64: (1e-9, 1e-8), torch.float32: (2e-5, 2e-4)}
CHILD_TIMEOUT_S = 120
F64 = torch.float64


class Skip(Exception):
    """A check that does not apply here (the message says why)."""


class Failed(Exception):
    """A check whose results are off (the message says which and by how much)."""


class Context:
    """What a check gets: the device, and compare(), which records each result against its bound."""

    def __init__(self, device, perturb=False):
        self.device = device
        self.perturb = perturb
        self.results = []  # (label, ok, err, bound)
        self.notes = []

    def compare(self, label, got, want, same_precision_error=None, *, rtol=None):
        """got against the float64 want: the stack rule (rtol None) or a relative tolerance rtol."""
        if self.perturb and got.numel():
            got = got.detach().contiguous().clone()
            got.view(-1)[0] += 0.5 * (want.detach().abs().max().item() + 1.0)
            self.perturb = False
        if rtol is None:
            ok, err, bound = compare(got, want, same_precision_error)
        else:
            ok, err, bound = _relative(got, want, rtol)
        if not ok and same_precision_error is not None:
            label += " (%d x the same-precision reference's error %.3g, plus a floor)" % (SAME_PRECISION_FACTOR,
                                                                                       same_precision_error)
        self.results.append((label, ok, err, bound))

    def expect(self, condition, message):
        if not condition:
            raise Failed(message)

    def summary(self):
        """The check's line: the worst result relative to its bound; Failed naming every result off."""
        bad = [r for r in self.results if not r[1]]
        if bad:
            text = "; ".join("%s: err %.3g > bound %.3g" % (label, err, bound) for label, _, err, bound in bad[:4])
            raise Failed(text + (" (and %d more)" % (len(bad) - 4) if len(bad) > 4 else ""))
        if not self.results:
            return "; ".join(self.notes)
        label, _, err, bound = max(self.results, key=lambda r: r[2] / r[3] if r[3] > 0 else 0.0)
        text = "%d results, worst %s: err %.2g <= bound %.2g" % (len(self.results), label, err, bound)
        return "; ".join([text] + self.notes)


def _relative(got, want, rtol):
    """Elementwise |got - want| <= rtol * (|want| + max|want|) (torch.isclose): (ok, err, bound) at the element
    nearest its bound."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return False, float("inf"), 0.0
    if not want.numel():
        return True, 0.0, 0.0
    scale = max(want.abs().max().item(), 1e-300)
    ok = bool(torch.isclose(got, want, rtol=rtol, atol=rtol * scale).all())
    err, bound = worst_element(got, want, rtol * (want.abs() + scale))
    return ok, err, bound


@contextlib.contextmanager
def _tf32(flag):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# --- the leaky stack ------------------------------------------------------------------------------


def _stack_inputs(B, N, w, L, seed):
    """float64 CPU x0 [N, w], W [L, w, w+1] (He scale), rho [L] (non-uniform, summing to 1); a leading [B] with B."""
    g = _generator(seed)
    nb = 1 if B is None else B
    x0 = torch.randn(nb, N, w, generator=g, dtype=F64)
    W = torch.randn(nb, L, w, w + 1, generator=g, dtype=F64) * math.sqrt(2.0 / w)
    r = 0.5 + torch.rand(nb, L, generator=g, dtype=F64)
    r = r / r.sum(-1, keepdim=True)
    return (x0[0], W[0], r[0]) if B is None else (x0, W, r)


def _fwd_bwd(fn, x0, W, rho, Lt, gout, **kw):
    """[output, dx0, dW, drho] of <fn(x0, W, rho, Lt), gout> (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x0, W, rho)]
    out = fn(*leaves, Lt, **kw)
    grads = torch.autograd.grad(out, leaves, gout.to(device=out.device, dtype=out.dtype))
    return [out.detach(), *grads]


def _stack_case(ctx, precision, activation, N, w, L, *, B=None, Lt=2.0, checkpoint=None, return_all=False,
                pad=False, seed=0, tag=None):
    """The op at `precision` on ctx.device against the float64 reference (CPU): output and every gradient."""
    dtype, tf32 = PRECISIONS[precision]
    x0, W, r = _stack_inputs(B, N, w, L, seed)
    if pad:  # the last model is a stack of depth L // 2, padded with identity layers
        r[-1, L // 2:] = 0
        r[-1, :L // 2] /= r[-1, :L // 2].sum()
    lead = () if B is None else (B,)
    shape = lead + ((L + 1, N, w) if return_all else (N, w))
    gout = torch.randn(shape, generator=_generator(seed + 1), dtype=F64)
    want = _fwd_bwd(R.leaky_stack, x0, W, r, Lt, gout, return_all=return_all, activation=activation)
    args = [t.to(ctx.device, dtype) for t in (x0, W, r)]
    with _tf32(tf32):
        got = _fwd_bwd(_lc().leaky_stack, *args, Lt, gout.to(ctx.device), return_all=return_all,
                       checkpoint=checkpoint, activation=activation)
        errs = [None] * 4
        if dtype != F64:
            low = _fwd_bwd(R.leaky_stack, *args, Lt, gout.to(ctx.device), return_all=return_all,
                           activation=activation)
            errs = [max_abs_error(a, b) for a, b in zip(low, want)]
    ctx.expect(got[0].dtype == dtype and got[0].device.type == torch.device(ctx.device).type,
               "output is %s on %s, expected %s on %s" % (got[0].dtype, got[0].device, dtype, ctx.device))
    tag = tag or "N=%d w=%d L=%d" % (N, w, L)
    for label, a, b, e in zip(("out", "dx0", "dW", "drho"), got, want, errs):
        ctx.compare("%s %s" % (tag, label), a, b, e)


def _stack_shapes(ctx, quick):
    """(N, w, L): on CUDA one per width bucket of the persistent kernels (128, 256, 64) and one past them (the GEMM
    path); N > 32 and w >= 48 everywhere, shapes at which eager float32 matmuls take TF32 when allowed (the
    same-precision reference of tf32 must have been computed at TF32)."""
    if torch.device(ctx.device).type == "cuda":
        shapes = [(37, 100, 20), (41, 300, 4), (33, 60, 5), (35, 129, 6)]
    else:
        shapes = [(37, 20, 12), (6, 129, 5), (1, 1, 1)]
    return shapes[:1] if quick else shapes


def check_stack(precision, activation, quick):
    def run(ctx):
        for N, w, L in _stack_shapes(ctx, quick):
            _stack_case(ctx, precision, activation, N, w, L, Lt=2.0 + 0.5 * (L % 3))
        return ctx.summary()
    return run


def check_checkpoint(precision, quick):
    def run(ctx):
        for activation in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            for k in (3, "sqrt"):
                _stack_case(ctx, precision, activation, 40, 64, 23, checkpoint=k, tag="%s k=%s" % (activation, k))
        return ctx.summary()
    return run


def check_return_all(precision, quick):
    def run(ctx):
        for activation in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            for k in (None, 4):
                _stack_case(ctx, precision, activation, 33, 48, 9, return_all=True, checkpoint=k,
                            tag="%s k=%s" % (activation, k))
        return ctx.summary()
    return run


def check_models(precision, quick):
    def run(ctx):
        for activation in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            _stack_case(ctx, precision, activation, 34, 48, 8, B=3, Lt=[0.5, 1.5, 3.0], checkpoint=2, pad=True,
                        tag="%s B=3 per-model Lt" % activation)
            if not quick:
                _stack_case(ctx, precision, activation, 33, 300 if _is_cuda(ctx) else 40, 3, B=2, Lt=2.0,
                            tag="%s B=2 one Lt" % activation)
        return ctx.summary()
    return run


def check_layer(precision):
    def run(ctx):
        dtype, tf32 = PRECISIONS[precision]
        x, W, r = _stack_inputs(None, 50, 9, 1, seed=4)
        with _tf32(tf32):
            _layer_cases(ctx, dtype, x, W, r)
        return ctx.summary()
    return run


def _layer_cases(ctx, dtype, x, W, r):
    """leaky_layer (x [N, w], W_l = W[0], rho_l = r[0]) at dtype against the reference, both activations."""
    layer = lambda a, b, c, Lt, **kw: _lc().leaky_layer(a, b[0], c[0], Lt, **kw)  # noqa: E731
    ref = lambda a, b, c, Lt, **kw: R.leaky_layer(a, b[0], c[0], Lt, **kw)  # noqa: E731
    g = torch.randn(x.shape, generator=_generator(5), dtype=F64)
    args = [t.to(ctx.device, dtype) for t in (x, W, r)]
    for activation in ACTIVATIONS:
        want = _fwd_bwd(ref, x, W, r, 2.0, g, activation=activation)
        got = _fwd_bwd(layer, *args, 2.0, g.to(ctx.device), activation=activation)
        errs = [None] * 4
        if dtype != F64:
            low = _fwd_bwd(ref, *args, 2.0, g.to(ctx.device), activation=activation)
            errs = [max_abs_error(a, b) for a, b in zip(low, want)]
        for label, a, b, e in zip(("out", "dx", "dW_l", "drho_l"), got, want, errs):
            ctx.compare("%s %s" % (activation, label), a, b, e)


def check_cuda_graph(precision):
    """Forward and backward of 3 models (per-model Lt) captured in one CUDA graph, replayed on new inputs."""
    def run(ctx):
        dtype, tf32 = PRECISIONS[precision]
        B, N, w, L = 3, 64, 100, 8
        dev = ctx.device
        leaves = [t.to(dev, dtype).requires_grad_() for t in _stack_inputs(B, N, w, L, seed=9)]
        mlt = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=dev)
        gout = torch.randn(B, N, w, generator=_generator(10), dtype=F64).to(dev, dtype)

        def step():
            out, _ = ops.leaky_stack(*leaves, 1.0, False, 2, "relu", mlt)
            return (out, *torch.autograd.grad(out, leaves, gout))

        with _tf32(tf32):
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up outside the graph: allocator, handles, kernel attributes
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()
            for seed in (11, 12):
                new = _stack_inputs(B, N, w, L, seed)
                Lts = [0.25 * seed, 1.0, 0.0]
                g64 = torch.randn(B, N, w, generator=_generator(seed + 100), dtype=F64)
                with torch.no_grad():
                    for leaf, t in zip(leaves, new):
                        leaf.copy_(t)
                    mlt.copy_(torch.tensor(Lts, dtype=F64))
                    gout.copy_(g64)
                graph.replay()
                torch.cuda.synchronize(dev)
                want = _fwd_bwd(R.leaky_stack, *new, Lts, g64)
                errs = [None] * 4
                if dtype != F64:
                    low = _fwd_bwd(R.leaky_stack, *[t.to(dev, dtype) for t in new], Lts, g64.to(dev))
                    errs = [max_abs_error(a, b) for a, b in zip(low, want)]
                for label, a, b, e in zip(("out", "dx0", "dW", "drho"), captured, want, errs):
                    ctx.compare("replay %d %s" % (seed - 10, label), a, b, e)
        return ctx.summary()
    return run


# --- Cost of Identity, K-norms, energies ---------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to /dev/null for the body (some torch builds print a line at every profiler
    start and stop); a no-op where that cannot be done."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _paths(fn):
    """Runs fn(); returns the implementations ("cpu", "generic", "fused") whose kernels recorded an event.
    Only the profiler's start and stop run with stderr silenced, never fn."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with _quiet_stderr():
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    found = set()
    for e in prof.events():
        parts = e.name.split("::")
        if len(parts) == 3 and parts[0] == "leakycuda" and parts[1] in ("cpu", "generic", "fused"):
            found.add(parts[1])
    return found


def _weighted(outs, seed):
    """A loss weighting every entry of every output differently, so every gradient block is exercised."""
    g = _generator(seed)
    return sum((t * torch.rand(t.shape, generator=g, dtype=F64).to(t)).sum() for t in outs)


def _values_and_grads(fn, inputs, seed=3):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    return [o.detach() for o in outs], list(torch.autograd.grad(_weighted(outs, seed), leaves))


def _energies_compare(ctx, label, fn, ref_fn, inputs, dtype, expect_fused):
    """fn on ctx.device at dtype against ref_fn in float64 on the CPU: values and gradients."""
    rv, rg = _values_and_grads(ref_fn, [t.to(F64) for t in inputs])
    res = {}

    def go():
        res["v"], res["g"] = _values_and_grads(fn, [t.to(ctx.device, dtype) for t in inputs])

    ran = _paths(go)
    tol_v, tol_g = ENERGIES_RTOL[dtype]
    for i, (a, b) in enumerate(zip(res["v"], rv)):
        ctx.compare("%s value %d" % (label, i), a, b, rtol=tol_v)
    for i, (a, b) in enumerate(zip(res["g"], rg)):
        ctx.compare("%s grad %d" % (label, i), a, b, rtol=tol_g)
    if expect_fused and _is_cuda(ctx) and not os.environ.get("LEAKYCUDA_CUDA_ATEN_ENERGIES"):
        ctx.expect("fused" in ran, "%s: expected the fused CUDA kernels, ran %s" % (label, sorted(ran) or "nothing"))
    return ran


def _E():
    import importlib

    return importlib.import_module("leakycuda.energies")  # the module (lc.energies is the function)


def _trajectory(L, N, w, seed):
    g = _generator(seed)
    xs = torch.randn(L + 1, N, w, generator=g, dtype=F64)
    rho = torch.rand(L, generator=g, dtype=F64) * 0.5 / L + 0.5 / L
    return xs, rho


def check_coi_stable(precision, quick):
    def run(ctx):
        E, dtype = _E(), PRECISIONS[precision][0]
        X, _ = _trajectory(3, 64, 12, seed=20)  # N = 64 >= p = 13: the fused kernels' shape on CUDA
        ran = set()
        for act in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            for name, kw in (("gamma=0.3", dict(gamma=0.3)), ("gamma0=1e-2", dict(gamma0=1e-2))):
                ran |= _energies_compare(
                    ctx, "%s %s" % (act, name), lambda x: [E.cost_of_identity(x, activation=act, **kw)],
                    lambda x: [R.cost_of_identity(x, activation=act, **kw)], [X], dtype, expect_fused=act == "relu")
        ctx.notes.append("ran %s" % ",".join(sorted(ran)))
        return ctx.summary()
    return run


def check_coi_exact(quick):
    def run(ctx):
        E = _E()
        X = torch.randn(4, 50, 7, generator=_generator(21), dtype=F64)
        for act in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            for bias in (True, False):
                got = E.cost_of_identity(X.to(ctx.device), bias=bias, activation=act)
                value, residual = R.cost_of_identity_exact(X, bias=bias, activation=act)
                tag = "%s bias=%s" % (act, bias)
                ctx.compare(tag + " value", got.value, value, rtol=1e-9)
                ctx.compare(tag + " residual", got.residual, residual, rtol=1e-8)
                rank = torch.linalg.matrix_rank(R.sigma(X, bias, act))
                ctx.expect(torch.equal(got.rank.cpu(), rank), "%s rank %s, reference %s"
                           % (tag, got.rank.tolist(), rank.tolist()))
        return ctx.summary()
    return run


def check_k_norm2(precision, quick):
    def run(ctx):
        E, dtype = _E(), PRECISIONS[precision][0]
        g = _generator(22)
        X = torch.randn(3, 60, 10, generator=g, dtype=F64)
        M = torch.randn(3, 60, 4, generator=g, dtype=F64)
        gamma = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
        for act in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            _energies_compare(ctx, act, lambda m, x: [E.k_norm2(m, x, gamma.to(x.device), activation=act)],
                              lambda m, x: [R.k_norm2(m, x, gamma, activation=act)], [M, X], dtype,
                              expect_fused=act == "relu")
        return ctx.summary()
    return run


def check_energies(precision, activation):
    def run(ctx):
        E, dtype = _E(), PRECISIONS[precision][0]
        L = 6
        xs, rho = _trajectory(L, 64, 12, seed=23)
        per_layer = torch.linspace(0.05, 0.5, L, dtype=F64)
        ran = set()
        for name, kw in (("gamma0=1e-3", dict(gamma0=1e-3)), ("gamma=0.2", dict(gamma=0.2)),
                         ("per-layer gamma", dict(gamma=per_layer))):
            def fn(x, r):
                k = {a: (v.to(x.device) if torch.is_tensor(v) else v) for a, v in kw.items()}
                return list(E.energies(x, r, 2.5, activation=activation, **k)[:5])

            def ref(x, r):
                k = dict(gamma=R.gamma_policy(x[:-1], kw["gamma0"], activation=activation)) if "gamma0" in kw else kw
                return list(R.energies(x, r, 2.5, activation=activation, **k))

            # the fused kernels take every policy but linear's gamma0 (no certified lambda_max there)
            fused = not (activation == "linear" and "gamma0" in kw)
            ran |= _energies_compare(ctx, name, fn, ref, [xs, rho], dtype, expect_fused=fused)
        ctx.notes.append("coi, kinetic, potential, hamiltonian, rank_estimate and d/dxs, d/drho; ran %s"
                         % ",".join(sorted(ran)))
        return ctx.summary()
    return run


# --- a LeakyEnsemble training step --------------------------------------------------------------


def check_train_step(graph):
    """fit on a float64 LeakyEnsemble (5 Adam + 4 SGD steps, a loss record per step) against torch.optim on the
    reference: every record's per-member loss and the final parameters."""
    def run(ctx):
        from .ensemble import LeakyEnsemble
        from .train import fit

        B, d, w, L, N, lam, lr = 3, 4, 8, 6, 32, 1e-2, 1e-2
        adam_steps, sgd_steps = 5, 4
        Lts = [1.0, 2.0, 4.0]
        ens = LeakyEnsemble(d, d, w, L, Lts, seeds=[0, 1, 2], device=ctx.device, dtype=F64)
        g = _generator(30)
        x = torch.randn(N, d, generator=g, dtype=F64)
        y = torch.tanh(x @ torch.randn(d, d, generator=g, dtype=F64))
        task = types.SimpleNamespace(x_train=x.to(ctx.device), y_train=y.to(ctx.device))
        start = [t.detach().cpu().clone() for t in (ens.proj_in, ens.weight, ens.proj_out)]
        rho = ens.rho.detach().cpu().clone()
        res = fit(ens, task, lam, adam_steps=adam_steps, adam_lr=lr, sgd_steps=sgd_steps, sgd_lr=lr, log_every=1,
                  progress=False, cuda_graph=graph)

        Pin, W, Pout = [t.clone().requires_grad_() for t in start]

        def losses():
            pred = R.leaky_stack(x @ Pin.transpose(-1, -2), W, rho, Lts) @ Pout.transpose(-1, -2)
            data = (pred - y).square().sum(dim=(-2, -1)) / N
            reg = torch.stack([lam / (2 * Lts[b]) * (rho[b] * W[b].square().sum(dim=(1, 2))).sum() for b in range(B)])
            return data + reg

        want = [losses().detach()]
        opt = torch.optim.Adam([Pin, W, Pout], lr=lr)
        for step in range(adam_steps + sgd_steps):
            if step == adam_steps:
                opt = torch.optim.SGD([Pin, W, Pout], lr=lr, momentum=0.0)
            opt.zero_grad()
            losses().sum().backward()
            opt.step()
            with torch.no_grad():
                want.append(losses())
        got = torch.tensor([rec["loss"] for rec in res.history], dtype=F64)
        ctx.expect(got.shape == (len(want), B), "fit logged %s losses, expected %d records of %d members"
                   % (tuple(got.shape), len(want), B))
        ctx.compare("losses per step", got, torch.stack(want))
        for label, a, b in zip(("proj_in", "weight", "proj_out"), (ens.proj_in, ens.weight, ens.proj_out),
                               (Pin, W, Pout)):
            ctx.compare(label, a, b)
        ctx.notes.append("%d members, %d Adam + %d SGD steps" % (B, adam_steps, sgd_steps))
        return ctx.summary()
    return run


# --- bad input, in child processes --------------------------------------------------------------

# (name, statement, pattern its ValueError must match); x0 [5, 4], W [3, 4, 5], r [3] on the device.
BAD_INPUTS = [
    ("rho_negative", "ops.leaky_stack(x0, W, -r, 1.0, False, 1)", r"rho.*-0\.3"),
    ("rho_nan", "r[1] = float('nan'); ops.leaky_stack(x0, W, r, 1.0, False, 1)", r"rho.*nan"),
    ("W_without_bias", "ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)", r"W must be \[L, w, w\+1\].*bias"),
    ("W_without_bias_models", "x0, W, r = x0.expand(2, 5, 4), W.expand(2, 3, 4, 5), r.expand(2, 3); "
     "ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)", r"W must be \[B, L, w, w\+1\]"),
]
#: What a case runs instead when LEAKYCUDA_SELFTEST_PERTURB names it.
CRASH_STATEMENT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"

# Runs the cases of argv[2] (JSON [[name, statement, pattern], ...]) in order on device argv[1], one JSON line each.
_CHILD = r"""
import json, re, sys, time
import torch, leakycuda
ops = torch.ops.leakycuda
dev = sys.argv[1]
print(json.dumps({"ready": True}), flush=True)
for name, stmt, pattern in json.loads(sys.argv[2]):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, generator=g).to(dev)
    W = (torch.randn(3, 4, 5, generator=g) / 2).to(dev)
    r = torch.full((3,), 1.0 / 3).to(dev)
    t0 = time.perf_counter()
    try:
        exec(stmt)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        res = {"raised": None}
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        res = {"raised": type(e).__name__, "msg": msg, "matches": bool(re.search(pattern, msg))}
    res.update(case=name, seconds=time.perf_counter() - t0)
    print(json.dumps(res), flush=True)
"""


def _child_env():
    """The environment of a child that imports this same leakycuda (its parent folder first on PYTHONPATH)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + rest if rest else ""), OMP_NUM_THREADS="1")


def _ended(rc):
    """How a child that did not answer ended, from its return code."""
    if rc is None:
        return "hung"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "signal %d" % -rc
        return "killed by %s (exit code %d)" % (name, rc)
    return "exited with code %d" % rc


class _LineReader:
    """Lines from a pipe's file descriptor, each waited for at most a given time (unbuffered, so that a line
    already read never sits in a buffer that select() cannot see)."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(fd, selectors.EVENT_READ)

    def next(self, timeout):
        """The next line (text, with its newline), "" at the end of the output, None after timeout s of silence."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest.decode(errors="replace")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace") + "\n"

    def close(self):
        self.sel.close()


class BadInputs:
    """Runs the bad-input cases in child processes, started at once and waited for by a thread: one child runs
    them in order; when it crashes or hangs (no answer in ``timeout`` s, then it is killed; ``start_timeout`` s for
    its start, which imports torch and may initialise CUDA) on a case, that case gets the outcome and a new child
    runs the rest. ``outcomes()`` waits and returns {name: outcome}, each ("ok", the child's JSON line) or (how it
    ended, the last lines of its stderr)."""

    def __init__(self, device, cases, timeout=CHILD_TIMEOUT_S, start_timeout=CHILD_TIMEOUT_S):
        self.device, self.cases, self.timeout, self.start_timeout = str(device), list(cases), timeout, start_timeout
        self._outcomes = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        todo = list(self.cases)
        while todo:
            with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile(mode="w+") as err:
                proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", _CHILD, self.device,
                                         json.dumps(todo)], cwd=cwd, env=_child_env(), stdout=subprocess.PIPE,
                                        stderr=err)
                lines = _LineReader(proc.stdout.fileno())
                ready, hung = False, False
                while todo:
                    wait = self.timeout if ready else max(self.timeout, self.start_timeout)
                    line = lines.next(wait)
                    if line is None:
                        hung = True
                        proc.kill()
                        break
                    if not line:
                        break
                    try:
                        res = json.loads(line)
                    except ValueError:
                        continue
                    if res.get("ready"):
                        ready = True
                    elif res.get("case") == todo[0][0]:
                        self._outcomes[todo.pop(0)[0]] = ("ok", res)
                lines.close()
                proc.stdout.close()
                rc = proc.wait()
                err.seek(0)
                tail = [s.strip() for s in err.read().splitlines() if s.strip()][-200:]
            if not todo:
                break
            how = ("hung (no answer in %d s)" % wait) if hung else _ended(rc)
            if not ready:  # it died before its first case: the same for every case left
                for case in todo:
                    self._outcomes[case[0]] = ("before any case ran, the child " + how, tail)
                break
            self._outcomes[todo.pop(0)[0]] = (how, tail)

    def outcomes(self):
        self._thread.join()
        return self._outcomes


def _crash_summary(lines):
    """A crashed child's stderr in one line: faulthandler's "Fatal Python error" and innermost frame, else the
    last lines."""
    fatal = next((s for s in lines if s.startswith("Fatal Python error")), None)
    frame = next((s for s in lines if s.startswith('File "')), None)
    if fatal is not None:
        return fatal + (" at " + frame if frame else "")
    keep = [s for s in lines if not s.startswith(("Extension modules", "Current thread", "Thread 0x"))]
    return " | ".join(keep[-3:])


def judge_bad_input(outcome):
    """The detail of a bad-input check: its clear error, or Failed saying how it crashed or what it raised."""
    how, what = outcome
    if how != "ok":
        raise Failed("%s%s" % (how, "; stderr: " + _crash_summary(what) if what else ""))
    if what["raised"] is None:
        raise Failed("no error was raised")
    if what["raised"] != "ValueError" or not what["matches"]:
        raise Failed("raised %s: %s (expected a ValueError naming the argument)" % (what["raised"], what["msg"]))
    return "%s: %s" % (what["raised"], what["msg"][:150])


# --- running them -------------------------------------------------------------------------------


def _lc():
    import leakycuda

    return leakycuda


def _is_cuda(ctx):
    return torch.device(ctx.device).type == "cuda"


def plan(device, quick=False):
    """The checks for device: a list of (name, function(ctx) -> detail, reason to skip or None)."""
    cuda = torch.device(device).type == "cuda"
    cuda_only = None if cuda else "CUDA only (the CPU kernels run float32 and float64)"
    graph_only = None if cuda else "CUDA only (CUDA graphs)"
    checks = []
    for precision in PRECISIONS:
        skip = cuda_only if precision in CUDA_ONLY_PRECISIONS else None
        for activation in ACTIVATIONS:
            checks.append(("stack/%s/%s" % (precision, activation), check_stack(precision, activation, quick), skip))
    for precision in ("fp64", "fp32", "tf32"):
        skip = cuda_only if precision in CUDA_ONLY_PRECISIONS else None
        checks.append(("stack/checkpoint/%s" % precision, check_checkpoint(precision, quick), skip))
        checks.append(("stack/return_all/%s" % precision, check_return_all(precision, quick), skip))
    for precision in (("fp64", "fp32", "tf32") if quick else PRECISIONS):
        skip = cuda_only if precision in CUDA_ONLY_PRECISIONS else None
        checks.append(("stack/models/%s" % precision, check_models(precision, quick), skip))
    checks.append(("layer/fp64", check_layer("fp64"), None))
    checks.append(("layer/fp32", check_layer("fp32"), None))
    for precision in ("fp64", "tf32"):
        checks.append(("stack/cuda_graph/%s" % precision, check_cuda_graph(precision), graph_only))
    for precision in ("fp64", "fp32"):
        checks.append(("coi/stable/%s" % precision, check_coi_stable(precision, quick), None))
    checks.append(("coi/exact/fp64", check_coi_exact(quick), None))
    for precision in ("fp64", "fp32"):
        checks.append(("k_norm2/%s" % precision, check_k_norm2(precision, quick), None))
    for precision in ("fp64", "fp32"):
        for activation in ACTIVATIONS[:1] if quick else ACTIVATIONS:
            checks.append(("energies/%s/%s" % (precision, activation), check_energies(precision, activation), None))
    checks.append(("ensemble/train_step/fp64", check_train_step(False), None))
    checks.append(("ensemble/train_step_graph/fp64", check_train_step(True), graph_only))
    return checks


def _start_bad_inputs(device, perturb):
    """Starts the bad-input children (a perturbed case runs CRASH_STATEMENT instead of its own)."""
    cases = [(name, CRASH_STATEMENT if _matches(perturb, "bad_input/" + name) else stmt, pattern)
             for name, stmt, pattern in BAD_INPUTS]
    return BadInputs(device, cases)


def _cuda_works(dev):
    """Whether a small computation on dev still runs (a kernel fault leaves the CUDA context unusable)."""
    try:
        torch.cuda.synchronize(dev)
        return torch.ones(4, device=dev).sum().item() == 4.0
    except Exception:
        return False


def _matches(pattern, name):
    return bool(pattern) and any(fnmatch.fnmatchcase(name, p.strip()) for p in pattern.split(",") if p.strip())


def _build_problem(device):
    """Why the ops cannot run on device with this build (None when they can)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        for op in ("leaky_stack", "energies"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key("leakycuda::" + op, "CUDA"):
                b = _lc().build_info
                return ("leakycuda was built without CUDA kernels for %s (with_cuda=%s, built against torch %s, CUDA "
                        "%s): rebuild it with a CUDA torch and a matching nvcc"
                        % (op, getattr(b, "with_cuda", None), getattr(b, "torch_version", None),
                           getattr(b, "cuda_version", None)))
    return None


def run(device="cpu", quick=False, *, out=sys.stdout, json_path=None):
    """Runs every check on device, prints one line per check and a summary; returns the exit code (0: no failure).

    The CPU checks run on one thread (restored afterwards): their shapes are small, and on a machine shared with
    other jobs torch's threads waiting on each other made them many times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(device, quick, out, json_path)
    finally:
        torch.set_num_threads(threads)


def _run(device, quick, out, json_path):
    from ._env import machine_info

    t_start = time.perf_counter()
    perturb = os.environ.get(PERTURB_ENV, "")
    lc = _lc()
    dev = torch.device(device)
    where = dev.type if dev.type == "cpu" else "%s (%s)" % (dev, torch.cuda.get_device_name(dev))
    b = lc.build_info
    print("leakycuda %s selftest on %s: torch %s, %s; leakycuda from %s, built with_cuda=%s arch=%s" % (
        "quick" if quick else "full", where, torch.__version__,
        "CUDA %s" % torch.version.cuda if torch.version.cuda else "no CUDA",
        os.path.dirname(os.path.abspath(lc.__file__)), getattr(b, "with_cuda", None),
        getattr(b, "cuda_arch_list", None)), file=out, flush=True)
    if perturb:
        print("%s=%s: the matching checks compare a deliberately wrong result" % (PERTURB_ENV, perturb), file=out)
    results = []
    width = 31

    def report(name, status, detail, seconds):
        results.append({"name": name, "status": status, "detail": detail, "seconds": round(seconds, 3)})
        print("%-4s  %-*s  %s  (%.2f s)" % (status, width, name, " ".join(str(detail).split()), seconds),
              file=out, flush=True)

    problem = _build_problem(device)
    checks = plan(device, quick)
    # the children start first (they take a second or two to import torch) and are collected at the end
    bad = _start_bad_inputs(device, perturb) if problem is None else None
    if problem is not None:
        report("build", "FAIL", problem, 0.0)
    lost = None  # the check after whose failure the CUDA context no longer works
    for name, fn, skip in checks:
        if skip is None and problem is not None:
            skip = "not run: %s" % problem.split(":")[0]
        if skip is None and lost is not None:
            skip = "not run: the CUDA context stopped working at %s" % lost
        if skip is not None:
            report(name, "SKIP", skip, 0.0)
            continue
        t0 = time.perf_counter()
        try:
            ctx = Context(device, perturb=_matches(perturb, name))
            detail = fn(ctx)
            status = "PASS"
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Failed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # an error is a failure of this check, not of the selftest
            status, detail = "FAIL", "%s: %s" % (type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300])
        if dev.type == "cuda" and status == "FAIL" and not _cuda_works(dev):
            lost = name
            detail += " [the CUDA context no longer works: the later checks are not run]"
        report(name, status, detail, time.perf_counter() - t0)
    if bad is not None:
        outcomes = bad.outcomes()
        for name, _, _ in BAD_INPUTS:
            outcome = outcomes.get(name, ("not run", []))
            try:
                detail, status = judge_bad_input(outcome), "PASS"
            except Failed as e:
                detail, status = str(e), "FAIL"
            report("bad_input/" + name, status, detail + " (child process)",
                   outcome[1]["seconds"] if outcome[0] == "ok" else 0.0)
    else:
        for name, _, _ in BAD_INPUTS:
            report("bad_input/" + name, "SKIP", "not run: %s" % problem.split(":")[0], 0.0)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    seconds = time.perf_counter() - t_start
    failed = [r["name"] for r in results if r["status"] == "FAIL"]
    print("selftest %s: %d passed, %d failed, %d skipped in %.1f s%s" % (
        device, counts["PASS"], counts["FAIL"], counts["SKIP"], seconds,
        ("; failed: " + ", ".join(failed)) if failed else ""), file=out, flush=True)
    if json_path is not None:
        payload = {"selftest": "leakycuda", "device": str(device), "quick": quick, "perturb": perturb or None,
                   "machine": machine_info(device), "float64_rtol": FLOAT64_RTOL,
                   "same_precision_factor": SAME_PRECISION_FACTOR, "passed": counts["PASS"],
                   "failed": counts["FAIL"], "skipped": counts["SKIP"], "seconds": seconds, "results": results}
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    return 1 if counts["FAIL"] else 0
