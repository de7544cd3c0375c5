"""CUDA leaky stack against the float64 reference: both activations, B models, every precision, per-model Lt,
padded depths, checkpointing, determinism, NaN/inf, CUDA graphs, and bad input (each case in a subprocess)."""
import json
import math
import os
import selectors
import subprocess
import sys
import tempfile

import pytest
import torch

import leakycuda as lc
from leakycuda import reference as ref
from leakycuda._ops import ops
from helpers import has_cuda_kernel
from leakycuda._tolerance import PRECISIONS
from leakycuda._tolerance import assert_close_to_reference as assert_near_reference  # 4x eager at low precision

HAS_CUDA_KERNELS = has_cuda_kernel("leaky_stack")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and leakycuda's CUDA kernels"),
]

ACTIVATIONS = ["relu", "linear"]
MODELS = [None, 1, 3]  # None: one model (3-D W); B: B models (4-D W)
# (N, w, L): width buckets 128, 64 and 256 of the persistent kernels, and the large-width (GEMM) path.
SHAPES = [(37, 100, 20), (5, 7, 3), (19, 129, 6), (21, 300, 4)]


@pytest.fixture
def tf32():
    """set(flag) switches TF32 matmuls (what the kernels read) for one test and restores the setting after."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_(flag):
        torch.backends.cuda.matmul.allow_tf32 = flag
    yield set_
    torch.backends.cuda.matmul.allow_tf32 = before


def make_models(B, N, w, L, *, seed=0, scale=1.0):
    """Float64 CPU x0 [B, N, w], W [B, L, w, w+1], rho [B, L] (steps summing to 1 per model); B None: one model."""
    g = torch.Generator().manual_seed(seed)
    nb = 1 if B is None else B
    x0 = torch.randn(nb, N, w, generator=g, dtype=torch.float64)
    W = torch.randn(nb, L, w, w + 1, generator=g, dtype=torch.float64) * scale * math.sqrt(2.0 / w)
    r = 0.5 + torch.rand(nb, L, generator=g, dtype=torch.float64)
    r = r / r.sum(-1, keepdim=True)
    return (x0[0], W[0], r[0]) if B is None else (x0, W, r)


def out_shape(x0, L, return_all):
    lead, (N, w) = x0.shape[:-2], x0.shape[-2:]
    return (*lead, L + 1, N, w) if return_all else tuple(x0.shape)


def reference(x0, W, rho, Lt, gout, *, return_all=False, activation="relu", model_Lt=None):
    """Eager reference on the inputs' device and dtype (model by model): output and gradients of <out, gout>."""
    leaves = [t.detach().clone().requires_grad_() for t in (x0, W, rho)]
    Lts = Lt if model_Lt is None else model_Lt.tolist()
    out = ref.leaky_stack(*leaves, Lts, return_all=return_all, activation=activation)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return out.detach(), grads


def fused(x0, W, rho, Lt, gout, *, return_all=False, checkpoint=1, activation="relu", model_Lt=None):
    """The op (through its autograd registration): output and gradients of <out, gout>."""
    leaves = [t.detach().clone().requires_grad_() for t in (x0, W, rho)]
    out, _ = ops.leaky_stack(*leaves, Lt, return_all, checkpoint, activation, model_Lt)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return out.detach(), grads


def check_against_reference(x0, W, rho, Lt, *, precision, activation, return_all=False, checkpoint=1,
                            model_Lt=None, seed=1):
    """Output and every gradient of the op at `precision` against the float64 reference (CPU)."""
    dtype, _ = PRECISIONS[precision]
    L = W.shape[-3]
    gout = torch.randn(out_shape(x0, L, return_all), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mlt_cpu = None if model_Lt is None else model_Lt.cpu()
    want = reference(x0, W, rho, Lt, gout, return_all=return_all, activation=activation, model_Lt=mlt_cpu)
    args = [t.to(device="cuda", dtype=dtype) for t in (x0, W, rho)]
    mlt = None if model_Lt is None else model_Lt.to("cuda", torch.float64)
    got = fused(*args, Lt, gout.cuda(), return_all=return_all, checkpoint=checkpoint, activation=activation,
                model_Lt=mlt)
    assert got[0].shape == want[0].shape and got[0].dtype == dtype and got[0].is_cuda
    errs = [None] * 4
    if dtype != torch.float64:
        low = reference(*args, Lt, gout.cuda(), return_all=return_all, activation=activation, model_Lt=mlt_cpu)
        errs = [(a.double().cpu() - b).abs().max().item() if b.numel() else 0.0
                for a, b in zip([low[0], *low[1]], [want[0], *want[1]])]
    for name, a, b, e in zip(["out", "dx0", "dW", "drho"], [got[0], *got[1]], [want[0], *want[1]], errs):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_near_reference(a, b, e, f"{precision} {activation} {name}")


@pytest.mark.parametrize("N,w,L", SHAPES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("B", MODELS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(activation, B, precision, N, w, L, tf32):
    tf32(PRECISIONS[precision][1])
    x0, W, r = make_models(B, N, w, L)
    check_against_reference(x0, W, r, 2.0, precision=precision, activation=activation)


@pytest.mark.parametrize("return_all", [False, True])
@pytest.mark.parametrize("N,w,L", [(1000, 100, 20), (300, 300, 5)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_paper_size_and_return_all(activation, N, w, L, return_all, tf32):
    tf32(True)
    x0, W, r = make_models(3, N, w, L)
    check_against_reference(x0, W, r, 3.0, precision="tf32", activation=activation, return_all=return_all)


@pytest.mark.parametrize("precision", ["fp64", "tf32", "bf16"])
@pytest.mark.parametrize("N,w,L", [(37, 100, 20), (21, 300, 4)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_per_model_Lt(activation, N, w, L, precision, tf32):
    """model_Lt replaces Lt model by model (Lt = 0 is the ResNet limit); the scalar Lt is then unused."""
    tf32(PRECISIONS[precision][1])
    x0, W, r = make_models(3, N, w, L, seed=2)
    model_Lt = torch.tensor([0.0, 1.5, 4.0], dtype=torch.float64)
    check_against_reference(x0, W, r, 99.0, precision=precision, activation=activation, model_Lt=model_Lt)


@pytest.mark.parametrize("N,w,L", [(29, 24, 20), (13, 300, 9)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_padded_depths(activation, N, w, L):
    """Stacks of depths L, 7 and 1 batched by padding with rho_l = 0: each model equals its unpadded stack."""
    depths = [L, 7, 1]
    x0, W, r = make_models(3, N, w, L, seed=3)
    for b, d in enumerate(depths):
        r[b, d:] = 0
        r[b, :d] /= r[b, :d].sum()
    gout = torch.randn(3, N, w, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mlt = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    out, (dx0, dW, drho) = fused(*[t.cuda() for t in (x0, W, r)], 1.0, gout.cuda(), activation=activation,
                                 model_Lt=mlt.cuda())
    padded = reference(x0, W, r, 1.0, gout, activation=activation, model_Lt=mlt)
    for b, d in enumerate(depths):
        want, (wx, wW, wr) = reference(x0[b], W[b, :d], r[b, :d], mlt[b].item(), gout[b], activation=activation)
        assert_near_reference(out[b], want, name="out")
        assert_near_reference(dx0[b], wx, name="dx0")
        assert_near_reference(dW[b, :d], wW, name="dW")
        assert torch.equal(dW[b, d:].cpu(), torch.zeros_like(dW[b, d:].cpu())), "padded layers get dW = 0"
        assert_near_reference(drho[b, :d], wr, name="drho")
        # d loss / d rho_l of a padded layer is the true (non-zero) derivative at rho_l = 0
        assert_near_reference(drho[b, d:], padded[1][2][b, d:], name="drho of padded layers")


@pytest.mark.parametrize("return_all", [False, True])
@pytest.mark.parametrize("checkpoint", [2, 3, 5, 7, 50])
@pytest.mark.parametrize("N,w,L", [(9, 13, 23), (7, 300, 9)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_checkpointing_same_gradients(activation, N, w, L, checkpoint, return_all):
    x0, W, r = make_models(3, N, w, L, seed=5)
    mlt = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64, device="cuda")
    args = [t.cuda() for t in (x0, W, r)]
    gout = torch.randn(out_shape(x0, L, return_all), dtype=torch.float64, device="cuda")
    full = fused(*args, 1.0, gout, return_all=return_all, activation=activation, model_Lt=mlt)
    ck = fused(*args, 1.0, gout, return_all=return_all, checkpoint=checkpoint, activation=activation, model_Lt=mlt)
    for a, b in zip([full[0], *full[1]], [ck[0], *ck[1]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    check_against_reference(x0, W, r, 1.0, precision="fp64", activation=activation, return_all=return_all,
                            checkpoint=checkpoint, model_Lt=mlt)


@pytest.mark.parametrize("checkpoint", [1, 4])
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp64"])
@pytest.mark.parametrize("N,w,L", [(1000, 100, 20), (300, 300, 5)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_is_deterministic(activation, N, w, L, precision, checkpoint, tf32):
    dtype, allow = PRECISIONS[precision]
    tf32(allow)
    x0, W, r = make_models(3, N, w, L, seed=6)
    args = [t.to("cuda", dtype) for t in (x0, W, r)]
    gout = torch.randn(3, N, w, device="cuda").to(dtype)
    mlt = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device="cuda")
    runs = [fused(*args, 1.0, gout, checkpoint=checkpoint, activation=activation, model_Lt=mlt) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip([runs[0][0], *runs[0][1]], [run[0], *run[1]]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["fp64", "tf32"])
@pytest.mark.parametrize("N,w,L", [(37, 100, 20), (21, 300, 4)])
def test_batched_equals_separate_calls(N, w, L, precision, tf32):
    dtype, allow = PRECISIONS[precision]
    tf32(allow)
    x0, W, r = make_models(3, N, w, L, seed=7)
    args = [t.to("cuda", dtype) for t in (x0, W, r)]
    Lts = [0.5, 2.0, 3.5]
    gout = torch.randn(3, N, w, device="cuda", dtype=dtype)
    for activation in ACTIVATIONS:
        batched = fused(*args, 0.0, gout, activation=activation,
                        model_Lt=torch.tensor(Lts, dtype=torch.float64, device="cuda"))
        for b in range(3):
            one = fused(args[0][b], args[1][b], args[2][b], Lts[b], gout[b], activation=activation)
            for a, c in zip([batched[0], *batched[1]], [one[0], *one[1]]):
                torch.testing.assert_close(a[b], c, **({} if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)))


def poison(x0, W, gout, case):
    """Puts one NaN or inf into x0, W or the incoming gradient (model 0 of B models)."""
    x0, W, gout = x0.clone(), W.clone(), gout.clone()
    x, Wm, g = (x0, W, gout) if W.dim() == 3 else (x0[0], W[0], gout[0])
    w = x.shape[-1]
    where = {
        "x0_nan": (x, (0, 0), float("nan")),
        "x0_inf": (x, (1, 2), float("inf")),
        "x0_neginf": (x, (2, 1), float("-inf")),
        "W_nan": (Wm, (1, 3, 4), float("nan")),
        "W_inf": (Wm, (2, 1, 3), float("inf")),  # inf against relu's zeros: NaN in sigma(X) W^T
        "bias_inf": (Wm, (0, 2, w), float("inf")),
        "grad_nan": (g, (3, 1), float("nan")),
    }
    t, idx, v = where[case]
    t[idx] = v
    return x0, W, gout


NONFINITE_CASES = ["x0_nan", "x0_inf", "x0_neginf", "W_nan", "W_inf", "bias_inf", "grad_nan"]


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("N,w,L", [(6, 9, 4), (6, 300, 4)])
@pytest.mark.parametrize("B", [None, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_positions_match_eager(activation, B, N, w, L, precision, case, tf32):
    """NaN, +inf and -inf land where eager PyTorch (the reference, same device and dtype) puts them:
    relu keeps NaN, its backward passes the gradient at NaN (threshold_backward on relu's output), and
    drho is <G, sigma(X) W^T> - Lt <G, X> as the reference forms it."""
    dtype, allow = PRECISIONS[precision]
    tf32(allow)
    x0, W, r = make_models(B, N, w, L, seed=8)
    gout = torch.randn(out_shape(x0, L, False), dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x0, W, gout = poison(x0, W, gout, case)
    args = [t.to("cuda", dtype) for t in (x0, W, r)]
    gout = gout.to("cuda", dtype)
    got = fused(*args, 1.5, gout, activation=activation)
    want = reference(*args, 1.5, gout, activation=activation)
    for name, a, b in zip(["out", "dx0", "dW", "drho"], [got[0], *got[1]], [want[0], *want[1]]):
        for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            ma, mb = f(a), f(b)
            assert torch.equal(ma, mb), f"{name}: {kind} at {ma.sum().item()} places, eager has {mb.sum().item()}"
        fin = torch.isfinite(b)
        if fin.any():
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol * (b[fin].abs().max().item() + 1), msg=name)
    assert any(not torch.isfinite(t).all() for t in [got[0], *got[1]]), "the poisoned value reaches a result"


@pytest.mark.parametrize("N,w,L,precision", [(64, 100, 8, "tf32"), (16, 300, 3, "fp32"), (40, 7, 5, "bf16")])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_graph_capture_of_batched_op(activation, N, w, L, precision, tf32):
    """Forward and backward of 3 models captured in one CUDA graph; replays follow new inputs and new model_Lt."""
    dtype, allow = PRECISIONS[precision]
    tf32(allow)
    x0, W, r = make_models(3, N, w, L, seed=9)
    x0, W, r = [t.to("cuda", dtype).requires_grad_() for t in (x0, W, r)]
    mlt = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device="cuda")
    gout = torch.randn(3, N, w, device="cuda", dtype=dtype)

    def step():
        out, _ = ops.leaky_stack(x0, W, r, 1.0, False, 2, activation, mlt)
        return (out, *torch.autograd.grad(out, (x0, W, r), gout))

    for _ in range(3):  # warm-up outside the graph: allocator, cuBLAS handles, kernel attributes
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (10, 11):
        nx, nW, nr = make_models(3, N, w, L, seed=seed)
        with torch.no_grad():
            x0.copy_(nx), W.copy_(nW), r.copy_(nr)
            mlt.copy_(torch.tensor([0.5 * seed, 1.0, 0.0]))
            gout.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, step()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("checkpoint", [1, 2])
@pytest.mark.parametrize("w", [4, 300])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_models(activation, w, checkpoint):
    """float64 gradcheck of 2 models with per-model Lt; at w = 300 (the GEMM path) only rho varies, to stay cheap
    (its dx0 and dW are checked against the reference in test_matches_reference)."""
    x0, W, r = [t.cuda() for t in make_models(2, 3, w, 3, seed=12)]
    mlt = torch.tensor([0.7, 1.9], dtype=torch.float64, device="cuda")
    if w == 4:
        x0, W, r = [t.requires_grad_() for t in (x0, W, r)]
    else:
        r.requires_grad_()
    f = lambda a, b, c: ops.leaky_stack(a, b, c, 1.0, False, checkpoint, activation, mlt)[0]
    assert torch.autograd.gradcheck(f, (x0, W, r))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_models(activation, requires_grad):
    x0, W, r = [t.cuda() for t in make_models(2, 5, 4, 6, seed=13)]
    mlt = torch.tensor([1.0, 2.0], dtype=torch.float64, device="cuda")
    out, states = ops.leaky_stack(x0, W, r, 1.0, False, 2, activation, mlt)
    g_all = torch.randn(2, 7, 5, 4, dtype=x0.dtype, device="cuda")
    cases = [
        (ops.leaky_stack, (x0, W, r, 1.0, False, 1, activation, mlt)),
        (ops.leaky_stack, (x0, W, r, 1.0, False, 2, activation, None)),
        (ops.leaky_stack, (x0, W, r, 1.0, True, 1, activation, mlt)),
        (ops.leaky_stack, (x0[0], W[0], r[0], 1.0, False, 3, activation, None)),
        (ops.leaky_stack_backward, (torch.randn_like(out), states, W, r, 1.0, 2, activation, mlt)),
        (ops.leaky_stack_backward, (g_all, torch.randn_like(g_all), W, r, 1.0, 1, activation, None)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a is not mlt else a
                     for a in args)
        # The backward op refuses to be differentiated: with grad it is checked for schema and fake tensors.
        utils = ("test_schema", "test_faketensor") if op is ops.leaky_stack_backward and requires_grad else None
        torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


def test_public_api_activation_and_models(tf32):
    """lc.leaky_stack with activation= and a 4-D W (one Lt, or one per model) runs the same kernels as the op."""
    tf32(False)
    x0, W, r = [t.cuda() for t in make_models(3, 11, 10, 5, seed=14)]
    Lts = [0.5, 1.0, 2.0]
    for activation in ACTIVATIONS:
        got = lc.leaky_stack(x0, W, r, 2.0, activation=activation)
        want, _ = ops.leaky_stack(x0, W, r, 2.0, False, 1, activation, None)
        assert torch.equal(got, want)
        got = lc.leaky_stack(x0, W, r, Lts, activation=activation, checkpoint=2)
        want, _ = ops.leaky_stack(x0, W, r, 0.0, False, 2, activation,
                                  torch.tensor(Lts, dtype=torch.float64, device="cuda"))
        assert torch.equal(got, want)


# --- bad input: each case in a subprocess (a persistent worker, restarted when it dies) -----------

_WORKER = r"""
import json, sys, torch, leakycuda
ops = torch.ops.leakycuda

def data(dev, B=None, N=5, w=4, L=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lead = () if B is None else (B,)
    x0 = torch.randn(*lead, N, w, generator=g)
    W = torch.randn(*lead, L, w, w + 1, generator=g) / w ** 0.5
    r = torch.full((*lead, L), 1.0 / L)
    return [t.to(dev, dtype) for t in (x0, W, r)]

for line in sys.stdin:
    code = json.loads(line)
    try:
        exec(code, {"torch": torch, "ops": ops, "lc": leakycuda, "data": data})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        res = {"raised": None}
    except Exception as e:
        res = {"raised": type(e).__name__, "msg": str(e).split("\n")[0]}
    print(json.dumps(res), flush=True)
"""


class Worker:
    """A Python process that runs code snippets one at a time; a crash or hang fails that snippet only."""

    def __init__(self):
        self.proc, self.log = None, None

    def _start(self):
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(lc.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=tempfile.gettempdir())

    def run(self, code, timeout=120):
        """Runs code; returns {"raised": type name or None, "msg": ...}, or fails the test if the worker dies."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if sel.select(timeout) else None
        sel.close()
        if line:
            return json.loads(line)
        if line is None:
            self.proc.kill()
        rc = self.proc.wait()
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        self.proc = None
        pytest.fail(f"the worker {'hung' if line is None else 'died'} (exit code {rc}) running:\n{code}\n{tail}")

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# (id, code with {dev} for the device, message pattern, whether the CPU must raise the same error)
BAD_INPUTS = [
    ("rho_negative", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, -r, 1.0, False, 1)", r"rho.*-0\.3", True),
    ("rho_nan", "x0, W, r = data('{dev}'); r[1] = float('nan'); ops.leaky_stack(x0, W, r, 1.0, False, 1)", r"rho.*nan", True),
    ("rho_inf_models", "x0, W, r = data('{dev}', B=2); r[1, 2] = float('inf'); ops.leaky_stack(x0, W, r, 1.0, False, 1)", r"rho.*inf", True),
    ("W_without_bias", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)", r"W must be \[L, w, w\+1\].*bias", True),
    ("W_without_bias_models", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)", r"W must be \[B, L, w, w\+1\]", True),
    ("rho_wrong_length", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, r[:2], 1.0, False, 1)", r"rho must be \[L\]", True),
    ("models_B_mismatch", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0[:1], W, r, 1.0, False, 1)", r"W must be \[B, L, w, w\+1\]", True),
    ("models_x0_2d", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0[0], W, r, 1.0, False, 1)", r"x0 must be \[B, N, w\]", True),
    ("activation_unknown", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'tanh')", r'activation must be "relu" or "linear"', True),
    ("model_Lt_one_model", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'relu', torch.ones(1, dtype=torch.float64, device='{dev}'))", r"model_Lt", True),
    ("model_Lt_float32", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'relu', torch.ones(2, device='{dev}'))", r"model_Lt must be a float64", True),
    ("model_Lt_wrong_length", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'relu', torch.ones(3, dtype=torch.float64, device='{dev}'))", r"model_Lt must be \[B\]", True),
    ("model_Lt_nan", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'relu', torch.tensor([1.0, float('nan')], dtype=torch.float64, device='{dev}'))", r"model_Lt.*nan", True),
    ("model_Lt_on_cpu", "x0, W, r = data('{dev}', B=2); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'relu', torch.ones(2, dtype=torch.float64))", r"model_Lt must be on the same device", False),
    ("W_on_cpu", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W.cpu(), r, 1.0, False, 1)", r"W must be on the same device as x0", False),
    ("W_float64", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W.double(), r, 1.0, False, 1)", r"W must have the same dtype as x0", True),
    ("x0_int", "x0, W, r = data('{dev}'); ops.leaky_stack(x0.long(), W.long(), r.long(), 1.0, False, 1)", r"x0 must be a floating tensor", False),
    ("Lt_nan", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, r, float('nan'), False, 1)", r"Lt must be finite", True),
    ("checkpoint_zero", "x0, W, r = data('{dev}'); ops.leaky_stack(x0, W, r, 1.0, False, 0)", r"checkpoint must be", True),
    ("backward_rho_negative", "x0, W, r = data('{dev}'); o, s = ops.leaky_stack(x0, W, r, 1.0, False, 1); ops.leaky_stack_backward(o, s, W, -r, 1.0, 1)", r"rho.*-0\.3", True),
    ("backward_states_short", "x0, W, r = data('{dev}', B=2); o, s = ops.leaky_stack(x0, W, r, 1.0, False, 1); ops.leaky_stack_backward(o, s[:, :1], W, r, 1.0, 1)", r"states must hold", True),
    ("backward_grad_shape", "x0, W, r = data('{dev}', B=2); o, s = ops.leaky_stack(x0, W, r, 1.0, False, 1); ops.leaky_stack_backward(o[0], s, W, r, 1.0, 1)", r"grad must be", True),
    ("api_rho_negative_with_grad", "x0, W, r = data('{dev}'); lc.leaky_stack(x0.requires_grad_(), W.requires_grad_(), (-r).requires_grad_(), 1.0)", r"rho.*-0\.3", True),
    ("api_W_without_bias_with_grad", "x0, W, r = data('{dev}'); lc.leaky_stack(x0.requires_grad_(), W[..., :4].detach().requires_grad_(), r, 1.0)", r"W must be \[L, w, w\+1\].*bias", True),
]


@pytest.mark.parametrize("case,code,pattern,same_on_cpu", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(worker, case, code, pattern, same_on_cpu):
    """An argument error (ValueError/TypeError) naming the argument, never a crash; the same error as on CPU."""
    import re

    got = worker.run(code.format(dev="cuda"))
    assert got["raised"] in ("ValueError", "TypeError"), f"{case}: {got}"
    assert re.search(pattern, got["msg"]), f"{case}: message {got['msg']!r} does not match {pattern!r}"
    if same_on_cpu:
        cpu = worker.run(code.format(dev="cpu"))
        assert (cpu["raised"], cpu["msg"].replace("cpu", "DEV")) == (got["raised"], got["msg"].replace("cuda:0", "DEV").replace("cuda", "DEV")), \
            f"{case}: CPU raised {cpu}, CUDA {got}"


def test_worker_survives_a_good_call(worker):
    """The harness itself: a valid call raises nothing, so the cases above fail only for their own reason."""
    assert worker.run("x0, W, r = data('cuda', B=2); ops.leaky_stack(x0, W, r, 1.0, False, 1, 'linear')") == {"raised": None}
