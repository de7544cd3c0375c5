"""The fused CUDA energies kernels (csrc/kernels/energies.cuh) against the float64 reference, the CPU kernels
and the device-generic path on the same GPU: values, gradients, both activations, the gamma policies,
determinism, NaN, and which path ran. Every test needs a GPU and the CUDA build."""
import importlib

import pytest
import torch

from helpers import has_cuda_kernel

from leakycuda import reference as R
from leakycuda._ops import ops
from test_energies import ACTS, _paths_run

E = importlib.import_module("leakycuda.energies")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not has_cuda_kernel("energies"),
        reason="needs a CUDA device and leakycuda's CUDA kernels"),
]


def _traj(L, N, w, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(L + 1, N, w, generator=g, dtype=torch.float64) * scale
    rho = torch.rand(L, generator=g, dtype=torch.float64) * 0.5 / L + 0.5 / L
    return xs.to(dtype), rho.to(dtype)


def _weighted(out, seed=1):
    """A loss that weights every entry of every output differently (so every gradient block is used)."""
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.rand(t.shape, generator=g, dtype=torch.float64).to(t)).sum() for t in out)


def _assert_close(got, want, tol):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-300))


def _run(fn, *args):
    """fn(*leaves) -> outputs; returns (outputs, gradients of _weighted(outputs) w.r.t. the leaves, paths run)."""
    leaves = [a.clone().requires_grad_() for a in args]
    res = {}

    def go():
        out = fn(*leaves)
        res["out"] = out
        res["grads"] = torch.autograd.grad(_weighted(out), leaves)

    ran = _paths_run(go)
    return res["out"], res["grads"], ran


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("policy", ["gamma0", "fixed", "per-layer"])
def test_fused_energies_match_reference(dtype, act, policy):
    L, N, w = 40, 300, 24
    xs, rho = _traj(L, N, w, dtype)
    kw = {"gamma0": dict(gamma0=1e-3), "fixed": dict(gamma=0.2),
          "per-layer": dict(gamma=torch.linspace(0.05, 0.5, L, dtype=torch.float64))}[policy]
    if policy == "gamma0":
        ref_gamma = R.gamma_policy(xs[:-1].double(), 1e-3, activation=act)
        rkw = dict(gamma=ref_gamma)
    else:
        rkw = kw
    out, grads, ran = _run(lambda x, r: E.energies(x, r, 2.5, activation=act, **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()})[:5], xs.cuda(), rho.cuda())
    ref, rgrads, _ = _run(lambda x, r: R.energies(x, r, 2.5, activation=act, **rkw), xs.double(), rho.double())
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip(out, ref):
        _assert_close(a, b, tol)
    for a, b in zip(grads, rgrads):
        _assert_close(a, b, 10 * tol)
    assert ("fused", "energies") in ran and ("fused", "energies_backward") in ran
    # the linear activation's gamma0 policy has no certified lambda_max in the fused solve: the generic path
    assert (("generic", "energies") in ran) == (policy == "gamma0" and act == "linear")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_fused_matches_generic_and_cpu(dtype, bias, act):
    """The three implementations, on the same inputs: fused (CUDA), device-generic (CUDA) and the CPU kernel."""
    L, N, w = 12, 200, 10
    xs, rho = _traj(L, N, w, dtype, seed=2)
    M = torch.randn(L, N, 3, dtype=dtype)

    def every_op(x, r, m):
        e = ops.energies(x, r, 1.5, None, 1e-2, bias, act)
        c = ops.cost_of_identity(x, None, 1e-2, bias, act)
        k = ops.k_norm2(m, x[:-1], torch.tensor(0.3, dtype=torch.float64, device=x.device), 1.0, bias, act)
        return (*e[:5], c[0], k[0])

    fused, fgrads, ran = _run(every_op, xs.cuda(), rho.cuda(), M.cuda())
    assert {p for p, _ in ran} <= {"fused"} or act == "linear"
    cpu, cgrads, _ = _run(every_op, xs, rho, M)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip((*fused, *fgrads), (*cpu, *cgrads)):
        _assert_close(a, b, tol)


def test_generic_path_on_cuda_matches_cpu():
    """The device-generic code on CUDA (where the fused kernels do not apply: N < p) equals the CPU kernel."""
    xs, rho = _traj(6, 5, 16, torch.float64, seed=3)  # N = 5 < p = 17
    out, grads, ran = _run(lambda x, r: E.energies(x, r, 2.0)[:5], xs.cuda(), rho.cuda())
    cpu, cgrads, _ = _run(lambda x, r: E.energies(x, r, 2.0)[:5], xs, rho)
    assert ("generic", "energies") in ran and ("fused", "energies") not in ran
    for a, b in zip((*out, *grads), (*cpu, *cgrads)):
        _assert_close(a, b, 1e-9)


@pytest.mark.parametrize("w", [150, 200])
def test_wide_layers_use_the_aten_solve(w):
    """p > kSolveMaxP: fused Grams and backward, ATen's batched solves in between."""
    xs, rho = _traj(4, 400, w, torch.float64, seed=4)
    out, grads, ran = _run(lambda x, r: E.energies(x, r, 3.0, gamma=0.1)[:5], xs.cuda(), rho.cuda())
    ref, rgrads, _ = _run(lambda x, r: R.energies(x, r, 3.0, gamma=0.1), xs, rho)
    assert ("fused", "energies") in ran and ("generic", "energies") not in ran
    for a, b in zip((*out, *grads), (*ref, *rgrads)):
        _assert_close(a, b, 1e-8)


def test_coi_gradient_only_skips_the_kinetic_block():
    """Gradient of the COI alone (the bench workload): block 1 is skipped, and the result equals the full
    backward's and the reference's."""
    xs, rho = _traj(30, 256, 20, torch.float32, seed=5)
    x = xs.cuda().requires_grad_()
    e = E.energies(x, rho.cuda(), 2.0)
    (g,) = torch.autograd.grad(e.coi.sum(), x)
    xr = xs.double().requires_grad_()
    gam = R.gamma_policy(xr[:-1], E.DEFAULT_GAMMA0)
    (gr,) = torch.autograd.grad(R.cost_of_identity(xr[:-1], gam).sum(), xr)
    _assert_close(g, gr, 1e-4)


def test_deterministic():
    xs, rho = _traj(50, 500, 32, torch.float32, seed=6)
    runs = []
    for _ in range(3):
        out, grads, _ = _run(lambda x, r: E.energies(x, r, 2.0)[:5], xs.cuda(), rho.cuda())
        runs.append([t.cpu() for t in (*out, *grads)])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_like_cpu(poison):
    """Non-finite inputs send the call to the generic path: the same NaN/inf pattern as the CPU kernels."""
    xs, rho = _traj(5, 64, 8, torch.float64, seed=7)
    xs[2, 3, 1] = poison
    gamma = torch.linspace(0.1, 0.5, 5, dtype=torch.float64)
    out, grads, _ = _run(lambda x, r: E.energies(x, r, 2.0, gamma=gamma.to(x.device))[:5], xs.cuda(), rho.cuda())
    cpu, cgrads, _ = _run(lambda x, r: E.energies(x, r, 2.0, gamma=gamma)[:5], xs, rho)
    for a, b in zip((*out, *grads), (*cpu, *cgrads)):
        a = a.detach().cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin].detach(), rtol=1e-9, atol=1e-9)


def test_tiny_gamma_falls_back_to_the_residual_form():
    """gamma0 = 1e-12: the Gram-form value would lose its digits; the flagged call runs the generic path."""
    A = torch.rand(200, 3, dtype=torch.float64) @ torch.rand(3, 20, dtype=torch.float64)
    X = torch.stack([A, 2 * A])
    s = torch.linalg.svdvals(X)
    gamma = 1e-12 * s[:, 0] ** 2
    coi, ran = None, None

    def go():
        nonlocal coi
        coi = E.cost_of_identity(X.cuda(), gamma.cuda(), bias=False)

    ran = _paths_run(go)
    closed = (s.square() / (s.square() + gamma[:, None])).sum(-1)
    assert ("generic", "cost_of_identity") in ran
    _assert_close(coi, closed, 1e-9)


def test_exact_coi_on_cuda():
    X = torch.randn(4, 50, 7, dtype=torch.float64)
    X[2, 0, 0] = float("nan")
    a, b = E.cost_of_identity(X), E.cost_of_identity(X.cuda())
    for u, v in zip(a, b):
        v = v.cpu()
        assert torch.equal(torch.isnan(u), torch.isnan(v))
        torch.testing.assert_close(v[~torch.isnan(u)], u[~torch.isnan(u)], rtol=1e-8, atol=1e-10)


def test_opcheck_cuda():
    xs, rho = _traj(3, 40, 6, torch.float64, seed=8)
    xs, rho = xs.cuda().requires_grad_(), rho.cuda().requires_grad_()
    torch.library.opcheck(ops.energies, (xs, rho, 2.0, None, 1e-2, True))
    torch.library.opcheck(ops.cost_of_identity, (xs, None, 1e-2, True))
    g = torch.tensor(0.4, dtype=torch.float64, device="cuda")
    torch.library.opcheck(ops.k_norm2, (xs[1:], xs[:-1], g, 1.0, False, "linear"))


def test_gradcheck_cuda():
    xs, rho = _traj(3, 12, 4, torch.float64, seed=9)
    xs, rho = (xs + 0.2).cuda().requires_grad_(), rho.cuda().requires_grad_()
    gamma = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda x, r: E.energies(x, r, 1.7, gamma=gamma)[:5], (xs, rho))
