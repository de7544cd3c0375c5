"""Issue 13 for the energy ops: fake (meta) kernels check what the kernels check, NaN/inf propagate as in
the reference, and bad arguments get ValueError/TypeError naming the argument. Every test runs on both
CPU implementations (the energy_impl fixture of test_energies)."""
import importlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from leakycuda import reference as R
from leakycuda._ops import ops
from test_energies import ACTS, energy_impl  # noqa: F401  (autouse: both implementations)

E = importlib.import_module("leakycuda.energies")
NAN, INF = math.nan, math.inf


def _stack(seed=0, L=3, N=10, w=4):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(L + 1, N, w, generator=g, dtype=torch.float64)
    return xs, torch.full((L,), 1.0 / L, dtype=torch.float64)


# --- fake (meta) kernels refuse what the kernels refuse ---------------------------------------------------


def bad_shape_cases():
    """(op, args, error type, message) for inputs wrong in shape, dtype or a scalar argument only: what the
    Meta kernels must refuse exactly as the real ones do."""
    X = torch.randn(4, 10, 3, dtype=torch.float64)
    M = torch.randn(4, 10, 2, dtype=torch.float64)
    g = torch.tensor(0.5, dtype=torch.float64)
    xs, rho = _stack()
    _, gam, Z = ops.cost_of_identity(X, g, 1.0, True)
    _, kgam, kZ = ops.k_norm2(M, X, g, 1.0, True)
    e = ops.energies(xs, rho, 2.0, None, 1e-2, True)
    ones4, ones3 = torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    C, K, En = ops.cost_of_identity, ops.k_norm2, ops.energies
    return [
        (C, (X[0, 0], g, 1.0, True), ValueError, r"X must be \[\.\.\., N, w\]"),
        (C, (X[..., :0], g, 1.0, True), ValueError, r"width w >= 1"),
        (C, (X.long(), g, 1.0, True), TypeError, r"X must be a float32 or float64 tensor, got Long"),
        (C, (X, torch.ones(3, dtype=torch.float64), 1.0, True), ValueError, r"gamma must be one value or one per batch"),
        (C, (X, g.long(), 1.0, True), TypeError, r"gamma must be a floating tensor"),
        (C, (X, None, -1.0, True), ValueError, r"gamma0 must be finite and > 0"),
        (C, (X, g, 1.0, True, "tanh"), ValueError, r'activation must be "relu" or "linear", got "tanh"'),
        (K, (M[:, :9], X, g, 1.0, True), ValueError, r"M must be \[\.\.\., N, m\] with the leading dims and N of X"),
        (K, (M.float(), X, g, 1.0, True), TypeError, r"M must have the dtype of X"),
        (En, (xs[0], rho, 2.0, None, 1e-2, True), ValueError, r"xs must be \[L\+1, N, w\]"),
        (En, (xs, rho[:2], 2.0, None, 1e-2, True), ValueError, r"rho must be \[L\] = \[3\]"),
        (En, (xs, rho.long(), 2.0, None, 1e-2, True), TypeError, r"rho must be a floating tensor"),
        (En, (xs, rho, NAN, None, 1e-2, True), ValueError, r"Lt must be finite"),
        (En, (xs, rho, 2.0, ones4, 1.0, True), ValueError, r"gamma must be one value or one per layer"),
        (ops.cost_of_identity_backward, (ones3, X, Z, gam, True), ValueError, r"grad must hold one value per batch"),
        (ops.cost_of_identity_backward, (ones4, X, Z[..., :2], gam, True), ValueError, r"Z must be the forward's solve"),
        (ops.cost_of_identity_backward, (ones4, X, Z.float(), gam, True), TypeError, r"float64 tensors the forward"),
        (ops.k_norm2_backward, (ones4, M, X, kZ, kgam[:2], True), ValueError, r"gamma must be the forward's gamma_used"),
        (ops.energies_backward, (ones3, ones3, ones3, ones3, ones4, xs, rho, 2.0, e[6], e[5], True), ValueError,
         r"grad_rank must hold one value per batch entry"),
        (ops.energies_backward, (ones3,) * 5 + (xs, rho, 2.0, e[6][:, :, :4], e[5], True), ValueError,
         r"Z must be the forward's solve"),
        (ops.cost_of_identity_exact, (X.long(), None, True), TypeError, r"X must be a floating tensor"),
        (ops.cost_of_identity_exact, (X, -1.0, True), ValueError, r"rcond must be finite and >= 0"),
    ]


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
def test_fake_and_meta_kernels_check_like_the_kernels(mode):
    for op, args, exc, match in bad_shape_cases():
        if mode == "meta":
            args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        if mode == "fake":
            with FakeTensorMode() as fake_mode:
                fargs = tuple(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
                with pytest.raises(exc, match=match):
                    op(*fargs)
        else:
            with pytest.raises(exc, match=match):
                op(*args)


def test_meta_kernels_give_the_output_shapes():
    X = torch.empty(2, 3, 10, 4, device="meta", dtype=torch.float32)
    M = torch.empty(2, 3, 10, 5, device="meta", dtype=torch.float32)
    xs, rho = torch.empty(7, 10, 4, device="meta"), torch.empty(6, device="meta")

    def meta(shape_dtypes):
        return [(tuple(t.shape), t.dtype) for t in shape_dtypes]

    f32, f64 = torch.float32, torch.float64
    assert meta(ops.cost_of_identity(X, None, 1e-2, True)) == [((2, 3), f32), ((2, 3), f64), ((2, 3, 5, 4), f64)]
    assert meta(ops.cost_of_identity(X, None, 1e-2, False, "linear"))[2] == ((2, 3, 4, 4), f64)
    assert meta(ops.k_norm2(M, X, None, 1e-2, True)) == [((2, 3), f32), ((2, 3), f64), ((2, 3, 5, 5), f64)]
    assert meta(ops.cost_of_identity_exact(X, None, True)) == [((2, 3), f32), ((2, 3), f32), ((2, 3), torch.int64)]
    e = ops.energies(xs, rho, 2.0, None, 1e-2, True)
    assert meta(e) == [((6,), f32)] * 5 + [((6,), f64), ((6, 5, 8), f64)]
    g = torch.empty(6, device="meta")
    assert meta(ops.energies_backward(g, g, g, g, g, xs, rho, 2.0, e[6], e[5], True)) == [((7, 10, 4), f32),
                                                                                         ((6,), f32)]
    Z = torch.empty(2, 3, 5, 4, device="meta", dtype=f64)
    gam = torch.empty(2, 3, device="meta", dtype=f64)
    assert meta([ops.cost_of_identity_backward(gam.float(), X, Z, gam, True)]) == [((2, 3, 10, 4), f32)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_matches_eager(dynamic):
    """torch.compile(fullgraph=True) of the energies and the COI with their backward, static and dynamic
    shapes (the Meta kernels' checks run on symbolic sizes); a bad shape still raises the kernel's message."""
    torch._dynamo.reset()

    def f(xs, rho):
        e = E.energies(xs, rho, 2.0, gamma=0.3)
        return e.hamiltonian.sum() + E.cost_of_identity(xs, 0.2).sum() + E.k_norm2(xs[1:], xs[:-1], 0.4).sum()

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L, N, w in [(3, 10, 4), (5, 12, 4), (4, 9, 6)]:
        xs, rho = _stack(L, L, N, w)
        a = [t.clone().requires_grad_() for t in (xs, rho)]
        b = [t.clone().requires_grad_() for t in (xs, rho)]
        got, want = cf(*a), f(*b)
        got.backward(), want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for u, v in zip(a, b):
            torch.testing.assert_close(u.grad, v.grad, rtol=1e-10, atol=1e-10)
    xs, rho = _stack()
    with pytest.raises(Exception, match=r"rho must be \[L\]"):
        cf(xs, rho[:2])


# --- NaN and inf propagate as in the reference --------------------------------------------------------------


def _same_nonfinite(got, want, rtol=1e-9):
    """NaN and inf exactly where the reference has them (same signs), the finite values close."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.equal(torch.isinf(got) & (got > 0), torch.isinf(want) & (want > 0)), (got, want)
    assert torch.equal(torch.isinf(got) & (got < 0), torch.isinf(want) & (want < 0)), (got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=rtol)


POISONS = {"nan": NAN, "+inf": INF, "-inf": -INF}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("N", [3, 10])  # N-space and Gram forms
@pytest.mark.parametrize("act", ACTS)
def test_coi_nonfinite_like_reference(poison, N, act):
    X = torch.randn(3, N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    X[1, 2, 1] = POISONS[poison]
    Xa, Xb = X.clone().requires_grad_(), X.clone().requires_grad_()
    got, want = E.cost_of_identity(Xa, 0.5, activation=act), R.cost_of_identity(Xb, 0.5, activation=act)
    _same_nonfinite(got, want)
    (ga,) = torch.autograd.grad((got * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), Xa)
    (gb,) = torch.autograd.grad((want * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), Xb)
    _same_nonfinite(ga, gb, rtol=1e-7)
    # the gamma0 policy: the poisoned entry's ridge (and so its COI) is NaN unless sigma(X) stays finite
    coi, gam = E.cost_of_identity(X, gamma0=1e-2, activation=act, return_gamma=True)
    assert torch.isfinite(gam[[0, 2]]).all() and torch.isfinite(coi[[0, 2]]).all() and torch.isnan(coi[1])
    assert torch.isnan(gam[1]) == (poison != "-inf" or act == "linear")


@pytest.mark.parametrize("poison", POISONS)
def test_k_norm2_nonfinite_in_M_like_reference(poison):
    g = torch.Generator().manual_seed(1)
    X, M = torch.randn(2, 12, 3, generator=g, dtype=torch.float64), torch.randn(2, 12, 2, generator=g, dtype=torch.float64)
    X[0, 4] = -1.0  # a zero row of sigma(X) without bias: an inf of M there stays inf
    M[0, 4, 0] = POISONS[poison]
    for bias in (True, False):
        _same_nonfinite(E.k_norm2(M, X, 0.5, bias=bias), R.k_norm2(M, X, 0.5, bias=bias))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("act", ACTS)
def test_energies_nonfinite_like_reference(poison, act):
    xs, rho = _stack(L=4)
    xs[2, 3, 1] = POISONS[poison]
    rho = rho.clone().requires_grad_()
    a, b = xs.clone().requires_grad_(), xs.clone().requires_grad_()
    gamma = torch.linspace(0.3, 0.9, 4, dtype=torch.float64)
    got = E.energies(a, rho, 2.0, gamma=gamma, activation=act)[:5]
    want = R.energies(b, rho, 2.0, gamma=gamma, activation=act)
    for u, v in zip(got, want):
        _same_nonfinite(u, v)
    wts = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    ga = torch.autograd.grad(sum((t * wts).sum() for t in got), (a, rho))
    gb = torch.autograd.grad(sum((t * wts).sum() for t in want), (b, rho))
    for u, v in zip(ga, gb):
        _same_nonfinite(u, v, rtol=1e-7)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("act", ACTS)
def test_exact_coi_nonfinite(poison, act):
    """No torch error from the SVD: NaN (rank -1) where sigma(X) is not finite, the reference's arithmetic
    where only X is (-inf under relu)."""
    X = torch.randn(3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    X[1, 2, 1] = POISONS[poison]
    ex = E.cost_of_identity(X, activation=act)
    clean = E.cost_of_identity(X[[0, 2]], activation=act)
    assert torch.equal(ex.value[[0, 2]], clean.value) and torch.equal(ex.rank[[0, 2]], clean.rank)
    if poison == "-inf" and act == "relu":
        v, r = R.cost_of_identity_exact(X, activation=act)
        _same_nonfinite(ex.value, v)
        _same_nonfinite(ex.residual, r)
        assert ex.rank[1] >= 0
    else:
        assert torch.isnan(ex.value[1]) and torch.isnan(ex.residual[1]) and ex.rank[1] == -1
    assert not ex.is_infinite()[1]


def test_stable_rank_nonfinite_and_dtypes():
    X = torch.randn(3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X[1, 0, 0] = NAN
    sr = E.stable_rank(X)
    assert torch.isnan(sr[1]) and torch.isfinite(sr[[0, 2]]).all()
    A = torch.tensor([[1, 2], [3, 5]])
    with pytest.raises(TypeError, match="X must be a floating tensor"):
        E.stable_rank(A)
    s = torch.linalg.svdvals(A.double())
    assert E.stable_rank(A.float()).item() == pytest.approx((s.sum() ** 2 / s.square().sum()).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"X must be \[\.\.\., N, w\] \(at least 2 dimensions\), got shape \(4,\)"):
        E.stable_rank(torch.ones(4))


# --- gamma = 0 and other argument errors -------------------------------------------------------------------


def test_gamma_zero_is_coherent():
    """gamma=0 (a number) is the exact COI in cost_of_identity; elsewhere a ridge is required, and every
    message says what is accepted instead."""
    X = torch.randn(2, 10, 3, dtype=torch.float64)
    assert isinstance(E.cost_of_identity(X, 0), E.ExactCOI) and isinstance(E.cost_of_identity(X, 0.0), E.ExactCOI)
    with pytest.raises(ValueError, match=r"gamma must be finite and > 0 \(or None / the number 0 for the exact COI\)"):
        E.cost_of_identity(X, -1.0)
    with pytest.raises(ValueError, match=r"gamma\[0\] = 0 \(a zero ridge is the exact COI: cost_of_identity\(X\) with "
                                         r"gamma=None or the number 0"):
        E.cost_of_identity(X, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gamma must be finite and > 0 \(a ridge; or give gamma0"):
        E.k_norm2(X, X, 0)
    xs, rho = _stack()
    with pytest.raises(ValueError, match=r"gamma must be finite and > 0 \(a ridge; or give gamma0"):
        E.energies(xs, rho, 2.0, gamma=0)


API_ERRORS = [
    (lambda X, xs, rho: E.cost_of_identity(X, gamma0=True), TypeError, r"gamma0 must be a finite number > 0"),
    (lambda X, xs, rho: E.cost_of_identity(X, gamma0="1e-3"), TypeError, r"gamma0 must be a finite number > 0.*'1e-3'"),
    (lambda X, xs, rho: E.cost_of_identity(X, gamma0=math.inf), ValueError, r"gamma0 must be a finite number > 0.*inf"),
    (lambda X, xs, rho: E.cost_of_identity(X, "0.5"), TypeError, r"gamma must be a number, a tensor or None"),
    (lambda X, xs, rho: E.cost_of_identity(X, 0.5, bias="yes"), TypeError, r"bias must be True or False, got 'yes'"),
    (lambda X, xs, rho: E.cost_of_identity(X, rcond="tiny"), TypeError, r"rcond must be a number >= 0"),
    (lambda X, xs, rho: E.cost_of_identity(X, rcond=-1.0), ValueError, r"rcond must be finite and >= 0"),
    (lambda X, xs, rho: E.cost_of_identity(X, 0.5, rcond=1e-3), ValueError, r"rcond only applies to the exact COI"),
    (lambda X, xs, rho: E.cost_of_identity(X.tolist(), 0.5), TypeError, r"X must be a tensor \[\.\.\., N, w\], got list"),
    (lambda X, xs, rho: E.k_norm2(X, X), ValueError, r"k_norm2 needs a ridge"),
    (lambda X, xs, rho: E.k_norm2(X, X, 0.5, return_gamma=1), TypeError, r"return_gamma must be True or False"),
    (lambda X, xs, rho: E.energies(xs, [0.5, "a", 0.5], 2.0), TypeError, r"rho must be a tensor \[L\] or a sequence"),
    (lambda X, xs, rho: E.energies(xs, rho, torch.ones(2)), ValueError, r"Lt must be a number or a one-element tensor"),
    (lambda X, xs, rho: E.energies(xs, rho, "2"), TypeError, r"Lt must be a real number"),
    (lambda X, xs, rho: E.energies(xs, rho, 2.0, bias=None), TypeError, r"bias must be True or False"),
    (lambda X, xs, rho: E.energies(xs, -rho, 2.0), ValueError, r"rho must hold finite steps rho_l > 0 .*got rho\[0\]"),
    (lambda X, xs, rho: E.energies(xs, rho.int(), 2.0), TypeError, r"rho must be a floating tensor"),
    (lambda X, xs, rho: E.energies(xs.int(), rho, 2.0), TypeError, r"xs must be a float32 or float64 tensor, got Int"),
]


@pytest.mark.parametrize("case", range(len(API_ERRORS)))
def test_api_argument_errors(case):
    fn, exc, match = API_ERRORS[case]
    xs, rho = _stack()
    with pytest.raises(exc, match=match):
        fn(torch.randn(2, 10, 3, dtype=torch.float64), xs, rho)
