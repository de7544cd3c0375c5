"""Tests of the COI / K-norm / energies ops against independent float64 computations (N-space solves, pinv, SVD closed forms)."""
import importlib
import math

import pytest
import torch

from leakycuda import reference as R
from leakycuda._ops import ops

# The module by its import name: lc.energies is the energies() function once __init__ exports it.
E = importlib.import_module("leakycuda.energies")

from helpers import CUDA, has_cuda_kernel as _has_cuda_kernel

# Set to 1, the CPU ops run the device-generic implementation (the code CUDA falls back to).
GENERIC_ENV = "LEAKYCUDA_CPU_ATEN_ENERGIES"


def _paths_run(fn):
    """The (path, op) pairs the kernels record while fn() runs: RECORD_FUNCTION "leakycuda::<path>::<op>",
    path "cpu" (CPU kernels), "generic" (device-generic implementation) or "fused" (fused CUDA kernels)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    out = set()
    for e in prof.events():
        parts = e.name.split("::")
        if len(parts) == 3 and parts[0] == "leakycuda" and parts[1] in ("cpu", "generic", "fused"):
            out.add((parts[1], parts[2]))
    return out


def _probe():
    X = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(E.cost_of_identity(X, 0.5).sum(), X)


@pytest.fixture(autouse=True, params=["kernel", "generic"])
def energy_impl(request, monkeypatch):
    """Every CPU test runs twice: on the CPU kernels, then on the device-generic implementation
    (LEAKYCUDA_CPU_ATEN_ENERGIES=1, read at every call). Before each test a probe proves, through the
    profiler, that the ops run the intended implementation in the test's environment."""
    if request.param == "generic":
        if request.node.get_closest_marker("cuda") is not None:
            pytest.skip("CUDA tests choose their own path")
        monkeypatch.setenv(GENERIC_ENV, "1")
    else:
        monkeypatch.delenv(GENERIC_ENV, raising=False)
    path = "generic" if request.param == "generic" else "cpu"
    assert _paths_run(_probe) == {(path, "cost_of_identity"), (path, "cost_of_identity_backward")}
    return request.param


# --- independent float64 computations (no Gram form, no ridge objective) ----------------------


ACTS = ["relu", "linear"]


def _sigma64(X, bias, act="relu"):
    X = X.double()
    R_ = torch.relu(X) if act == "relu" else X
    return torch.cat([R_, torch.ones_like(X[..., :1])], -1) if bias else R_


def nspace_knorm2(M, X, gamma, bias=True, act="relu"):
    """Tr[M^T (K + gamma I_N)^{-1} M] by a direct N x N solve per entry; gamma broadcast to the batch."""
    S = _sigma64(X, bias, act)
    M = M.double()
    batch, N = S.shape[:-2], S.shape[-2]
    g = torch.broadcast_to(torch.as_tensor(gamma, dtype=torch.float64), batch).reshape(-1)
    Sf, Mf = S.reshape(-1, N, S.shape[-1]), M.reshape(-1, N, M.shape[-1])
    out = []
    for b in range(Sf.shape[0]):
        K = Sf[b] @ Sf[b].T + g[b] * torch.eye(N, dtype=torch.float64)
        out.append((Mf[b] * torch.linalg.solve(K, Mf[b])).sum())
    return torch.stack(out).reshape(batch) if out else torch.zeros(batch, dtype=torch.float64)


def op_norm2(X, bias=True, act="relu"):
    S = _sigma64(X, bias, act)
    return torch.linalg.matrix_norm(S, ord=2).square()


def pinv_exact(X, bias=True, rcond=None, act="relu"):
    """(||S^+ X||^2, ||S S^+ X - X||) through torch.linalg.pinv."""
    S, X = _sigma64(X, bias, act), X.double()
    if rcond is None:
        rcond = max(S.shape[-2], S.shape[-1]) * torch.finfo(torch.float64).eps
    P = torch.linalg.pinv(S, rtol=rcond)
    W = P @ X
    return W.square().sum((-2, -1)), torch.linalg.vector_norm(S @ W - X, dim=(-2, -1))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item() if a.numel() else 0.0


# --- stable COI and K-norm values ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
@pytest.mark.parametrize("N,w", [(1, 4), (5, 8), (40, 6), (120, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_coi_fixed_gamma_matches_nspace(dtype, batch, N, w, bias):
    torch.manual_seed(N * 31 + w)
    X = torch.randn(*batch, N, w, dtype=dtype)
    gamma = 0.3 if not batch else torch.rand(batch, dtype=torch.float64) + 0.05
    X0 = X.clone()
    coi = E.cost_of_identity(X, gamma, bias=bias)
    assert coi.shape == batch and coi.dtype == dtype
    assert torch.equal(X, X0)
    ind = nspace_knorm2(X, X, gamma, bias)
    assert rel_err(coi, ind) < (1e-10 if dtype == torch.float64 else 1e-5)
    assert rel_err(R.cost_of_identity(X.double(), gamma, bias=bias), ind) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,w", [(3, 8), (60, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_coi_gamma0_policy(dtype, N, w, bias, act):
    torch.manual_seed(7)
    X = torch.randn(4, N, w, dtype=dtype)
    coi, gam = E.cost_of_identity(X, gamma0=1e-2, bias=bias, activation=act, return_gamma=True)
    g_ind = 1e-2 * op_norm2(X, bias, act)
    assert rel_err(gam, g_ind) < 1e-12
    assert rel_err(coi, nspace_knorm2(X, X, g_ind, bias, act)) < (1e-10 if dtype == torch.float64 else 1e-5)
    ref = R.cost_of_identity(X.double(), gamma0=1e-2, bias=bias, activation=act)
    assert rel_err(ref, nspace_knorm2(X, X, g_ind, bias, act)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,w", [(1, 4), (5, 8), (120, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_coi_fixed_gamma_matches_nspace(dtype, N, w, bias):
    torch.manual_seed(N * 37 + w)
    X = torch.randn(3, N, w, dtype=dtype)
    gamma = torch.rand(3, dtype=torch.float64) + 0.05
    coi = E.cost_of_identity(X, gamma, bias=bias, activation="linear")
    assert coi.shape == (3,) and coi.dtype == dtype
    ind = nspace_knorm2(X, X, gamma, bias, "linear")
    assert rel_err(coi, ind) < (1e-10 if dtype == torch.float64 else 1e-5)
    assert rel_err(R.cost_of_identity(X.double(), gamma, bias=bias, activation="linear"), ind) < 1e-10
    # linear without bias: COI_gamma = sum_i s_i^2 / (s_i^2 + gamma), from the SVD of X alone
    if not bias:
        s = torch.linalg.svdvals(X.double())
        closed = (s.square() / (s.square() + gamma[:, None])).sum(-1)
        assert rel_err(coi, closed) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("N,m", [(2, 3), (50, 5), (50, 1)])
@pytest.mark.parametrize("act", ACTS)
def test_k_norm2_matches_nspace(N, m, act):
    torch.manual_seed(N + m)
    X, M = torch.randn(3, N, 6, dtype=torch.float64), torch.randn(3, N, m, dtype=torch.float64)
    val = E.k_norm2(M, X, 0.5, activation=act)
    assert val.shape == (3,)
    assert rel_err(val, nspace_knorm2(M, X, 0.5, act=act)) < 1e-10
    assert rel_err(R.k_norm2(M, X, 0.5, activation=act), nspace_knorm2(M, X, 0.5, act=act)) < 1e-10
    val0, g = E.k_norm2(M, X, gamma0=0.1, activation=act, return_gamma=True)
    assert rel_err(val0, nspace_knorm2(M, X, g, act=act)) < 1e-10


def test_noncontiguous_input_and_determinism():
    torch.manual_seed(0)
    Xt = torch.randn(2, 7, 30, dtype=torch.float64).transpose(-1, -2)  # [2, 30, 7], not contiguous
    a = E.cost_of_identity(Xt, 0.2)
    b = E.cost_of_identity(Xt.contiguous(), 0.2)
    assert torch.equal(a, b)
    assert rel_err(a, nspace_knorm2(Xt, Xt, 0.2)) < 1e-10


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("N,w", [(4, 6), (30, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("policy", ["fixed", "gamma0"])
@pytest.mark.parametrize("act", ACTS)
def test_coi_grad_matches_autograd_of_nspace(N, w, bias, policy, act):
    torch.manual_seed(N * w)
    X = torch.randn(3, N, w, dtype=torch.float64, requires_grad=True)
    if policy == "fixed":
        coi = E.cost_of_identity(X, 0.4, bias=bias, activation=act)
        gamma = 0.4
    else:
        coi, gamma = E.cost_of_identity(X, gamma0=0.05, bias=bias, activation=act, return_gamma=True)
    wts = torch.randn(3, dtype=torch.float64)
    (g,) = torch.autograd.grad((coi * wts).sum(), X)
    X2 = X.detach().clone().requires_grad_()
    gam = gamma.detach() if policy == "gamma0" else gamma
    (g2,) = torch.autograd.grad((nspace_knorm2(X2, X2, gam, bias, act) * wts).sum(), X2)
    torch.testing.assert_close(g, g2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_k_norm2_grad_matches_autograd_of_nspace(act):
    torch.manual_seed(3)
    X = torch.randn(2, 25, 4, dtype=torch.float64, requires_grad=True)
    M = torch.randn(2, 25, 3, dtype=torch.float64, requires_grad=True)
    gM, gX = torch.autograd.grad(E.k_norm2(M, X, 0.7, activation=act).sum(), (M, X))
    X2, M2 = X.detach().clone().requires_grad_(), M.detach().clone().requires_grad_()
    hM, hX = torch.autograd.grad(nspace_knorm2(M2, X2, 0.7, act=act).sum(), (M2, X2))
    torch.testing.assert_close(gM, hM, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gX, hX, rtol=1e-8, atol=1e-10)


def test_float32_grad_close_to_float64():
    torch.manual_seed(4)
    X = torch.randn(2, 80, 10, dtype=torch.float64)
    X32 = X.float().requires_grad_()
    X64 = X32.detach().double().requires_grad_()
    (g32,) = torch.autograd.grad(E.cost_of_identity(X32, gamma0=1e-3).sum(), X32)
    (g64,) = torch.autograd.grad(E.cost_of_identity(X64, gamma0=1e-3).sum(), X64)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-6 * g64.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(bias, act):
    torch.manual_seed(5)
    for N in (3, 9):  # N-space and Gram paths (w+1 = 5)
        X = (torch.randn(2, N, 4, dtype=torch.float64) + 0.3).requires_grad_()
        assert torch.autograd.gradcheck(lambda x: E.cost_of_identity(x, 0.5, bias=bias, activation=act), (X,))
        M = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda m, x: E.k_norm2(m, x, 0.5, bias=bias, activation=act), (M, X))


@pytest.mark.parametrize("act", ACTS)
def test_energies_gradcheck(act):
    torch.manual_seed(6)
    xs = (torch.randn(4, 9, 3, dtype=torch.float64) + 0.2).requires_grad_()
    rho = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)

    def f(xs, rho):
        e = E.energies(xs, rho, 1.7, gamma=gamma, activation=act)
        return e.coi, e.kinetic, e.potential, e.hamiltonian, e.rank_estimate

    assert torch.autograd.gradcheck(f, (xs, rho))


def test_energies_grad_lt0():
    xs = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([0.5, 0.5], dtype=torch.float64)
    e = E.energies(xs, rho, 0.0, gamma=0.5)
    (g,) = torch.autograd.grad(e.coi.sum() + e.potential.sum(), xs)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="Lt = 0"):
        torch.autograd.grad(E.energies(xs, rho, 0.0, gamma=0.5).kinetic.sum(), xs)


# --- energies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [3, 40])
@pytest.mark.parametrize("act", ACTS)
def test_energies_match_independent(dtype, N, act):
    torch.manual_seed(N)
    L, w, Lt = 5, 6, 2.5
    xs = torch.randn(L + 1, N, w, dtype=dtype)
    rho = torch.rand(L, dtype=dtype) + 0.1
    e = E.energies(xs, rho, Lt, gamma0=1e-2, activation=act)
    X, D = xs[:-1].double(), (xs[1:].double() - xs[:-1].double()) / rho.double()[:, None, None]
    g = 1e-2 * op_norm2(X, act=act)
    coi, v = nspace_knorm2(X, X, g, act=act), nspace_knorm2(D, X, g, act=act)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert rel_err(e.gamma, g) < 1e-12
    assert rel_err(e.coi, coi) < tol
    assert rel_err(e.kinetic, v / (2 * Lt)) < tol
    assert rel_err(e.potential, -Lt / 2 * coi) < tol
    H = v / (2 * Lt) - Lt / 2 * coi
    assert ((e.hamiltonian.double() - H).abs() <= tol * (v / (2 * Lt) + Lt / 2 * coi)).all()
    assert ((e.rank_estimate.double() + 2 * H / Lt).abs() <= tol * (v / Lt**2 + coi)).all()
    ref = R.energies(xs.double(), rho.double(), Lt, gamma0=1e-2, activation=act)
    assert rel_err(ref[0], coi) < 1e-10 and rel_err(ref[1], v / (2 * Lt)) < 1e-10


def test_energies_many_layers_against_reference():
    torch.manual_seed(8)
    L = 300
    xs = torch.randn(L + 1, 12, 5, dtype=torch.float64)
    rho = torch.full((L,), 1.0 / L, dtype=torch.float64)
    e = E.energies(xs, rho, 4.0, gamma=torch.linspace(0.1, 2.0, L, dtype=torch.float64))
    ref = R.energies(xs, rho, 4.0, gamma=torch.linspace(0.1, 2.0, L, dtype=torch.float64))
    for a, b in zip(e[:5], ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_energies_lt0_and_default_gamma():
    xs = torch.randn(3, 10, 4, dtype=torch.float64)
    rho = torch.tensor([0.5, 0.5], dtype=torch.float64)
    xs[2] = xs[1]  # D_2 = 0
    e = E.energies(xs, rho, 0.0)
    assert e.kinetic[0] == math.inf and e.kinetic[1] == 0
    assert (e.potential == 0).all() and torch.equal(e.hamiltonian, e.kinetic)
    assert e.rank_estimate[0] == -math.inf and e.rank_estimate[1] == e.coi[1]
    g = E.DEFAULT_GAMMA0 * op_norm2(xs[:-1])
    assert rel_err(e.gamma, g) < 1e-12


# --- exact COI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,w", [(1, 3), (6, 10), (50, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_exact_matches_pinv(N, w, bias, act):
    torch.manual_seed(N + w)
    X = torch.randn(3, N, w, dtype=torch.float64)
    ex = E.cost_of_identity(X, bias=bias, activation=act)
    v, r = pinv_exact(X, bias, act=act)
    assert rel_err(ex.value, v) < 1e-9
    torch.testing.assert_close(ex.residual, r, rtol=1e-8, atol=1e-10 * X.norm().item())
    rv, rr = R.cost_of_identity_exact(X, bias=bias, activation=act)
    assert rel_err(rv, v) < 1e-9
    assert torch.equal(E.cost_of_identity(X, 0, bias=bias, activation=act).value, ex.value)
    if act == "linear":  # X is in the range of [X, 1]: a finite COI, equal to rank X without bias
        assert (ex.residual < 1e-10 * X.norm()).all()
        if not bias:
            assert torch.equal(ex.rank, torch.linalg.matrix_rank(X)) and (ex.value - ex.rank).abs().max() < 1e-9


def test_exact_rank_deficient_and_duplicates():
    torch.manual_seed(9)
    A = torch.rand(40, 3, dtype=torch.float64) @ torch.rand(3, 12, dtype=torch.float64)  # X >= 0, rank 3
    X = torch.cat([A, A[:5]])  # duplicated samples
    ex = E.cost_of_identity(X, bias=False)
    assert ex.rank.item() == 3 and abs(ex.value.item() - 3) < 1e-9 and ex.residual.item() < 1e-10
    assert not ex.is_infinite() and ex.theory() == ex.value
    v, r = pinv_exact(X, False)
    assert abs(ex.value.item() - v.item()) < 1e-9
    # COI_gamma with duplicates (K singular) stays finite and matches the N-space solve
    assert rel_err(E.cost_of_identity(X, 1e-3, bias=False), nspace_knorm2(X, X, 1e-3, False)) < 1e-9


def test_exact_outside_range_is_infinite_in_theory():
    torch.manual_seed(10)
    X = torch.randn(60, 5, dtype=torch.float64)  # N > w+1: X is generally not in the range of sigma(X)
    ex = E.cost_of_identity(X)
    assert torch.isfinite(ex.value) and ex.residual > 1e-3 * ex.x_norm
    assert ex.is_infinite() and ex.theory() == math.inf


def test_exact_rcond():
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(30, 4, dtype=torch.float64, generator=gen)
    X[:, 3] = X[:, 2] + 1e-9 * torch.rand(30, dtype=torch.float64, generator=gen)  # sigma_min / sigma_max ~ 1e-10
    assert E.cost_of_identity(X, bias=False).rank == 4
    assert E.cost_of_identity(X, bias=False, rcond=1e-6).rank == 3
    with pytest.raises(ValueError, match="rcond"):
        E.cost_of_identity(X, 0.5, rcond=1e-3)


# --- the paper's identities as properties ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_coi_equals_rank_for_nonnegative_without_bias(seed):
    g = torch.Generator().manual_seed(seed)
    N, w = int(torch.randint(2, 40, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
    r = int(torch.randint(1, min(N, w) + 1, (1,), generator=g))
    X = torch.rand(N, r, generator=g, dtype=torch.float64) @ torch.rand(r, w, generator=g, dtype=torch.float64)
    ex = E.cost_of_identity(X, bias=False)
    assert ex.rank.item() == r
    assert abs(ex.value.item() - r) < 1e-8 and not ex.is_infinite()
    # COI_gamma -> rank from below as gamma -> 0, matching the SVD closed form sum s^2 / (s^2 + gamma)
    s = torch.linalg.svdvals(X)
    for g0 in (1e-2, 1e-8, 1e-13):
        gamma = g0 * s[0].item() ** 2
        coi = E.cost_of_identity(X, gamma, bias=False)
        closed = (s.square() / (s.square() + gamma)).sum()
        # documented accuracy: ~eps + (eps/gamma0)^2 relative (the Gram's rounding, to second order)
        assert rel_err(coi, closed) < 1e-10 + 100 * (2.2e-16 / g0) ** 2 and coi <= r * (1 + 1e-10 + 100 * (2.2e-16 / g0) ** 2)


@pytest.mark.parametrize("seed", range(8))
def test_coi_upper_bounds_stable_rank_without_bias(seed):
    g = torch.Generator().manual_seed(100 + seed)
    N, w = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    X = torch.randn(N, w, generator=g, dtype=torch.float64) * 3
    ex = E.cost_of_identity(X, bias=False)
    sr = E.stable_rank(X)
    assert ex.theory() >= sr - 1e-9
    if N <= w:  # relu(X) then generically has full row rank: X is in its range, the COI finite
        assert not ex.is_infinite() and ex.value >= sr - 1e-9


def test_stable_rank_bound_can_fail_with_bias():
    # Documented counterexample: with the ones column, X = c 11^T (c < 0) costs c^2 w < 1 = stable rank.
    X = torch.full((5, 4), -0.01, dtype=torch.float64)
    ex = E.cost_of_identity(X, bias=True)
    assert not ex.is_infinite()
    assert abs(ex.value.item() - 4e-4) < 1e-12 and E.stable_rank(X).item() == pytest.approx(1.0)


# --- edge inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_all_zero(bias):
    X = torch.zeros(2, 20, 5, dtype=torch.float64, requires_grad=True)
    for kw in (dict(gamma=0.5), dict(gamma0=1e-3)):
        coi = E.cost_of_identity(X, **kw, bias=bias)
        assert torch.equal(coi, torch.zeros(2, dtype=torch.float64))
        (g,) = torch.autograd.grad(coi.sum(), X)
        assert torch.equal(g, torch.zeros_like(X))
    ex = E.cost_of_identity(X, bias=bias)
    assert (ex.value == 0).all() and (ex.residual == 0).all() and not ex.is_infinite().any()


def test_all_negative():
    torch.manual_seed(11)
    X = -torch.rand(2, 15, 4, dtype=torch.float64) - 0.1
    Xg = X.clone().requires_grad_()
    # with bias: S = [0 | 1], finite
    coi = E.cost_of_identity(Xg, gamma0=1e-3)
    assert rel_err(coi, nspace_knorm2(X, X, 1e-3 * op_norm2(X))) < 1e-9
    (g,) = torch.autograd.grad(coi.sum(), Xg)
    assert torch.isfinite(g).all()
    ex = E.cost_of_identity(X)
    assert torch.isfinite(ex.value).all() and ex.is_infinite().all()
    # without bias: S = 0. A fixed gamma gives ||X||^2 / gamma and gradient 2X/gamma ...
    coi = E.cost_of_identity(Xg, 0.5, bias=False)
    torch.testing.assert_close(coi, X.square().sum((-2, -1)) / 0.5)
    (g,) = torch.autograd.grad(coi.sum(), Xg)
    torch.testing.assert_close(g, 2 * X / 0.5)
    # ... the gamma0 policy has gamma = 0: the COI is +inf (documented), the gradient zero.
    coi, gam = E.cost_of_identity(Xg, gamma0=1e-3, bias=False, return_gamma=True)
    assert (gam == 0).all() and (coi == math.inf).all()
    (g,) = torch.autograd.grad(coi.sum(), Xg)
    assert torch.equal(g, torch.zeros_like(X))
    ex = E.cost_of_identity(X, bias=False)
    assert (ex.value == 0).all() and (ex.rank == 0).all() and (ex.theory() == math.inf).all()
    e = E.energies(X, torch.tensor([0.5], dtype=torch.float64), 2.0, gamma0=1e-3, bias=False)
    assert not torch.isnan(torch.stack(e[:5])).any()


def test_n_zero():
    X = torch.zeros(3, 0, 4, requires_grad=True)
    coi = E.cost_of_identity(X, 0.5)
    assert torch.equal(coi, torch.zeros(3))
    assert torch.equal(E.cost_of_identity(X, gamma0=1e-3), torch.zeros(3))
    (g,) = torch.autograd.grad(coi.sum(), X)
    assert g.shape == X.shape
    ex = E.cost_of_identity(X)
    assert (ex.value == 0).all() and (ex.residual == 0).all() and (ex.rank == 0).all()
    e = E.energies(torch.zeros(3, 0, 4), torch.ones(2), 1.0, gamma=1.0)
    assert all((t == 0).all() for t in e[:5])
    e = E.energies(torch.randn(1, 5, 4), torch.ones(0), 1.0)  # L = 0: no layers
    assert all(t.shape == (0,) for t in e)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e100), (torch.float64, 1e-100),
                                         (torch.float32, 1e18), (torch.float32, 1e-18)])
def test_huge_and_tiny_scales(dtype, scale):
    torch.manual_seed(12)
    X = torch.randn(2, 30, 5, dtype=torch.float64)
    Xs = (X * scale).to(dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    # bias=False, gamma0 policy: scale invariant
    coi = E.cost_of_identity(Xs, gamma0=1e-3, bias=False)
    assert torch.isfinite(coi).all() and rel_err(coi, E.cost_of_identity(X, gamma0=1e-3, bias=False)) < tol
    ex = E.cost_of_identity(Xs, bias=False)
    assert torch.isfinite(ex.value).all() and rel_err(ex.value, E.cost_of_identity(X, bias=False).value) < 1e-6
    # bias=True: against the independent solve on the same float64 numbers
    coi = E.cost_of_identity(Xs, gamma0=1e-3)
    ind = nspace_knorm2(Xs, Xs, 1e-3 * op_norm2(Xs))
    assert torch.isfinite(coi).all() and rel_err(coi, ind.to(dtype)) < tol
    Xg = Xs.clone().requires_grad_()
    (g,) = torch.autograd.grad(E.cost_of_identity(Xg, gamma0=1e-3, bias=False).sum(), Xg)
    assert torch.isfinite(g).all()


def test_tiny_gamma_is_stable():
    """The push-through subtraction (||X||^2 - <S^T X, Z>)/gamma loses eps/gamma0 here; the ridge form (eps/gamma0)^2."""
    torch.manual_seed(13)
    X = torch.rand(200, 3, dtype=torch.float64) @ torch.rand(3, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(X)
    gamma = 1e-12 * s[0].item() ** 2
    closed = (s.square() / (s.square() + gamma)).sum()
    coi = E.cost_of_identity(X, gamma, bias=False)
    assert rel_err(coi, closed) < 1e-10 + 100 * (2.2e-16 / 1e-12) ** 2
    S = X
    Z = torch.linalg.solve(S.T @ S + gamma * torch.eye(20, dtype=torch.float64), S.T @ X)
    naive = (X.square().sum() - (S.T @ X * Z).sum()) / gamma
    assert rel_err(naive, closed) > 100 * rel_err(coi, closed)  # error eps/gamma0 against (eps/gamma0)^2


# --- bad input --------------------------------------------------------------------------------------


_X = torch.randn(4, 10, 3)
_XS, _RHO = torch.randn(4, 10, 3), torch.ones(3) / 3
BAD_INPUTS = [
    (lambda: E.cost_of_identity(torch.randn(5), 0.1), ValueError, r"X must be \[\.\.\., N, w\]"),
    (lambda: E.cost_of_identity(torch.ones(4, 3, dtype=torch.int64), 0.1), TypeError, "X must be a float32 or float64"),
    (lambda: E.cost_of_identity(_X, -1.0), ValueError, "gamma must be finite and > 0"),
    (lambda: E.cost_of_identity(_X, torch.tensor([0.1, 0.0, 0.1, 0.1])), ValueError, r"gamma\[1\] = 0"),
    (lambda: E.cost_of_identity(_X, torch.ones(3)), ValueError, "broadcast"),
    (lambda: E.cost_of_identity(_X, 0.1, gamma0=0.1), ValueError, "not both"),
    (lambda: E.cost_of_identity(_X, gamma0=-1), ValueError, "gamma0"),
    (lambda: E.k_norm2(torch.randn(4, 9, 3), _X, 0.1), ValueError, "M must be"),
    (lambda: E.k_norm2(_X.double(), _X, 0.1), TypeError, "M must have the dtype of X"),
    (lambda: E.energies(_XS, torch.ones(4), 1.0), ValueError, r"rho must be \[L\]"),
    (lambda: E.energies(_XS, torch.tensor([0.5, 0.0, 0.5]), 1.0), ValueError, "rho_l > 0"),
    (lambda: E.energies(torch.randn(10, 3), _RHO, 1.0), ValueError, r"xs must be \[L\+1, N, w\]"),
    (lambda: E.energies(_XS, _RHO, math.inf), ValueError, "Lt must be finite"),
    (lambda: ops.cost_of_identity(_X, None, 0.0, True), ValueError, "gamma0 must be finite and > 0"),
    (lambda: ops.cost_of_identity_backward(torch.ones(3), _X, torch.zeros(4, 4, 3, dtype=torch.float64),
                                           torch.ones(4, dtype=torch.float64), True), ValueError, "grad must hold"),
    (lambda: ops.cost_of_identity_backward(torch.ones(4), _X, torch.zeros(4, 4, 3), torch.ones(4), True),
     TypeError, "float64 tensors the forward returned"),
    (lambda: E.cost_of_identity(_X, 0.1, activation="tanh"), ValueError, 'activation must be "relu" or "linear"'),
    (lambda: E.cost_of_identity(_X, activation="tanh"), ValueError, 'activation must be "relu" or "linear"'),
    (lambda: E.energies(_XS, _RHO, 1.0, activation=None), TypeError, "activation must be"),
    (lambda: ops.k_norm2(_X, _X, None, 0.1, True, "gelu"), ValueError, 'got "gelu"'),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs(case):
    fn, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        fn()


# --- the two CPU implementations ----------------------------------------------------------------------

ALL_OPS = {"cost_of_identity", "cost_of_identity_backward", "k_norm2", "k_norm2_backward", "energies",
           "energies_backward", "cost_of_identity_exact"}


def _every_op():
    torch.manual_seed(16)
    X = torch.randn(3, 12, 4, dtype=torch.float64, requires_grad=True)
    M = torch.randn(3, 12, 2, dtype=torch.float64, requires_grad=True)
    rho = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    E.cost_of_identity(X, 0.5).sum().backward()
    E.k_norm2(M, X, gamma0=1e-2).sum().backward()
    torch.stack(E.energies(X, rho, 2.0)[:5]).sum().backward()
    E.cost_of_identity(X)


def test_switch_selects_implementation(energy_impl):
    """Every op, forward and backward, runs the implementation the environment selects, and only that one."""
    path = "generic" if energy_impl == "generic" else "cpu"
    assert _paths_run(_every_op) == {(path, op) for op in ALL_OPS}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [5, 300])
@pytest.mark.parametrize("act", ACTS)
def test_generic_matches_kernel(monkeypatch, dtype, N, act, energy_impl):
    """Values, gamma, Z and every gradient of the two implementations agree (both run in float64 inside)."""
    g = torch.Generator().manual_seed(N)
    xs = torch.randn(7, N, 6, generator=g, dtype=torch.float64).to(dtype)
    rho = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    M = torch.randn(7, N, 3, generator=g, dtype=torch.float64).to(dtype)
    if energy_impl == "generic":
        pytest.skip("the test compares both implementations itself")
    out = {}
    for impl in ("0", "1"):
        monkeypatch.setenv(GENERIC_ENV, impl)
        x, r, m = (t.clone().requires_grad_() for t in (xs, rho, M))
        e = ops.energies(x, r, 2.5, None, 1e-2, True, act)
        c = ops.cost_of_identity(x, None, 1e-2, False, act)
        k = ops.k_norm2(m, x, None, 1e-2, True, act)
        loss = sum((t * torch.linspace(0.5, 1.5, t.numel(), dtype=dtype)).sum() for t in (*e[:5], c[0], k[0]))
        out[impl] = (*e, *c, *k, *torch.autograd.grad(loss, (x, r, m)))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for a, b in zip(out["0"], out["1"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())


# --- op registration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_opcheck_all_ops(act):
    opcheck = torch.library.opcheck
    torch.manual_seed(14)
    g = torch.tensor(0.5, dtype=torch.float64)
    for N in (3, 12):
        X = torch.randn(2, N, 4, dtype=torch.float64, requires_grad=True)
        M = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
        opcheck(ops.cost_of_identity, (X, g, 1.0, True, act))
        opcheck(ops.cost_of_identity, (X.detach(), None, 1e-2, False, act))
        opcheck(ops.k_norm2, (M, X, g, 1.0, True, act))
        opcheck(ops.cost_of_identity_exact, (X.detach(), None, True, act))
        opcheck(ops.cost_of_identity_exact, (X.detach(), 1e-6, False, act))
        _, gam, Z = ops.cost_of_identity(X.detach(), g, 1.0, True, act)
        opcheck(ops.cost_of_identity_backward, (torch.ones(2, dtype=torch.float64), X.detach(), Z, gam, True, act))
        _, gam, Z = ops.k_norm2(M.detach(), X.detach(), g, 1.0, True, act)
        opcheck(ops.k_norm2_backward, (torch.ones(2, dtype=torch.float64), M.detach(), X.detach(), Z, gam, True, act))
    xs = torch.randn(4, 8, 3, dtype=torch.float64, requires_grad=True)
    rho = torch.full((3,), 0.3, dtype=torch.float64, requires_grad=True)
    opcheck(ops.energies, (xs, rho, 2.0, None, 1e-2, True, act))
    out = ops.energies(xs.detach(), rho.detach(), 2.0, None, 1e-2, True, act)
    ones = torch.ones(3, dtype=torch.float64)
    opcheck(ops.energies_backward,
            (ones, ones, ones, ones, ones, xs.detach(), rho.detach(), 2.0, out[6], out[5], True, act))


def test_compile_fullgraph():
    torch._dynamo.reset()
    X = torch.randn(3, 20, 4, dtype=torch.float64)
    gamma = torch.full((3,), 0.2, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(X):
        return E.cost_of_identity(X, gamma) * 2

    torch.testing.assert_close(f(X), 2 * E.cost_of_identity(X, gamma))


# --- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_exact_cuda_matches_cpu():
    X = torch.randn(3, 40, 6, dtype=torch.float64)
    a, b = E.cost_of_identity(X), E.cost_of_identity(X.cuda())
    torch.testing.assert_close(b.value.cpu(), a.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.residual.cpu(), a.residual, rtol=1e-8, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda_kernel("cost_of_identity"), reason="needs a CUDA device and the CUDA COI kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(15)
    X = torch.randn(50, 200, 16, dtype=dtype)
    Xc = X.cuda().requires_grad_()
    Xh = X.clone().requires_grad_()
    a = E.cost_of_identity(Xh, gamma0=1e-3)
    b = E.cost_of_identity(Xc, gamma0=1e-3)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert rel_err(b.cpu(), a) < tol
    (ga,) = torch.autograd.grad(a.sum(), Xh)
    (gb,) = torch.autograd.grad(b.sum(), Xc)
    torch.testing.assert_close(gb.cpu(), ga, rtol=tol, atol=tol * ga.abs().max().item())
    xs, rho = X[:11], torch.full((10,), 0.1, dtype=dtype)
    ea, eb = E.energies(xs, rho, 3.0, gamma0=1e-3), E.energies(xs.cuda(), rho.cuda(), 3.0, gamma0=1e-3)
    for u, v in zip(ea[:5], eb[:5]):
        torch.testing.assert_close(v.cpu(), u, rtol=tol, atol=tol * u.abs().max().item())
