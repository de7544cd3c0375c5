"""Tests of leakycuda.diagnostics.analyze: every field against an independent float64 computation."""
import importlib
import json
import math

import pytest
import torch

import leakycuda as lc
from leakycuda import diagnostics
from leakycuda import reference as R

# The module by its import name: lc.energies is the energies() function once __init__ exports it.
E = importlib.import_module("leakycuda.energies")


def _setup(Lt=1.5, L=6, w=5, N=14, seed=0):
    torch.manual_seed(seed)
    model = lc.LeakyResNet(3, 2, w, L, Lt, dtype=torch.float64)
    with torch.no_grad():
        model.weight[:, :, -1].normal_(0.0, 0.3)  # non-zero biases for the balancedness curve
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    return model, x, y


def _backprop(model, x, y):
    """G_l = dC/dX_l by the docs/DESIGN.md §1.3 backward recursion, written out (no autograd)."""
    W, rho, Lt = model.weight.detach(), model.rho.detach(), float(model.effective_depth)
    xs = model.representations(x).detach()
    L, N, w = W.shape[0], x.shape[0], W.shape[1]
    G = [None] * (L + 1)
    G[L] = 2.0 / N * (xs[L] @ model.proj_out.detach().T - y) @ model.proj_out.detach()
    for l in range(L, 0, -1):
        m = (xs[l - 1] > 0).double()
        G[l - 1] = (1 - rho[l - 1] * Lt) * G[l] + rho[l - 1] * (G[l] @ W[l - 1][:, :w]) * m
    return xs, torch.stack(G)


@pytest.mark.parametrize("Lt", [1.5, 0.0])
def test_analyze_fields_against_independent(Lt):
    model, x, y = _setup(Lt=Lt)
    lam, g0 = 0.05, 1e-2
    a = diagnostics.analyze(model, x, y, lam, gamma0=g0)
    L = model.depth
    xs, G = _backprop(model, x, y)
    B = -G / lam
    assert a.coi_exact.shape == (L + 1,) and a.kinetic.shape == (L,) and a.sv_X.shape == (L + 1, 5)
    # data cost, COI (exact via pinv, stable via the reference), stable rank, spectra
    assert a.data_cost == pytest.approx(((model(x) - y).square().sum() / x.shape[0]).item(), rel=1e-12)
    S = R.sigma(xs)
    Wp = torch.linalg.pinv(S) @ xs
    torch.testing.assert_close(a.coi_exact, Wp.square().sum((-2, -1)), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.coi_residual, (S @ Wp - xs).norm(dim=(-2, -1)), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.coi_gamma, R.cost_of_identity(xs, gamma0=g0), rtol=1e-9, atol=0)
    s = torch.linalg.svdvals(xs)
    torch.testing.assert_close(a.stable_rank, s.sum(-1).square() / s.square().sum(-1))
    torch.testing.assert_close(a.sv_X, s)
    torch.testing.assert_close(a.sv_W, torch.linalg.svdvals(model.weight.detach()))
    # energies: as the energies op gives them on the same representations
    e = E.energies(xs, model.rho.detach(), Lt, gamma0=g0)
    torch.testing.assert_close(a.kinetic, e.kinetic)
    torch.testing.assert_close(a.hamiltonian, e.hamiltonian)
    # momentum form from the hand-written backprop
    BtS2 = (B.mT @ S).square().sum((-2, -1))
    BX = (B * xs).sum((-2, -1))
    torch.testing.assert_close(a.hamiltonian_momentum, Lt / 2 * BtS2 - Lt * BX, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.rank_estimate_momentum, 2 * BX - BtS2, rtol=1e-9, atol=1e-9)
    # stationarity: W_l - k B_l^T sigma(X_{l-1}) = (k / (lam rho_l)) dLoss/dW_l at any point (k = Lt, or 1 at Lt = 0)
    model.zero_grad()
    loss = (model(x) - y).square().sum() / x.shape[0] + model.regularization(lam)
    loss.backward()
    k = Lt if Lt else 1.0
    resid = (k / (lam * model.rho.detach()))[:, None, None] * model.weight.grad
    expect = resid.norm(dim=(-2, -1)) / model.weight.detach().norm(dim=(-2, -1))
    torch.testing.assert_close(a.stationarity, expect, rtol=1e-8, atol=1e-12)
    # balancedness: ||W_1||^2 + Lt * trapezoid of ||b||^2
    Wd = model.weight.detach()
    b2, rho = Wd[:, :, -1].square().sum(-1), model.rho.detach()
    rhs = [Wd[0].square().sum().item()]
    for l in range(1, L):
        rhs.append(rhs[-1] + Lt * rho[l].item() * (b2[l] + b2[l - 1]).item() / 2)
    torch.testing.assert_close(a.balance_rhs, torch.tensor(rhs, dtype=torch.float64))
    torch.testing.assert_close(a.balance_lhs, Wd.square().sum((-2, -1)))
    torch.testing.assert_close(a.positions, torch.cat([torch.zeros(1, dtype=torch.float64), rho.cumsum(0)]))


def test_outputs_json_table_plot(tmp_path):
    model, x, y = _setup(L=30)
    a = diagnostics.analyze(model, x, y, 0.1)
    d = json.loads(a.to_json(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text()) == d
    assert len(d["kinetic"]) == 30 and len(d["coi_exact"]) == 31 and d["Lt"] == 1.5
    assert all(isinstance(v, (float, str)) for v in d["coi_exact"])
    t = a.table(max_rows=10)
    lines = t.splitlines()
    assert "stationarity max" in lines[1] and "COI_g" in lines[2] and len(lines) <= 10 + 4
    assert len({len(l) for l in lines[2:]}) == 1  # aligned
    assert len(a.table(max_rows=None).splitlines()) == 31 + 4
    path = a.plot(tmp_path / "a.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_inf_in_json():
    model, x, y = _setup(L=3)
    a = diagnostics.analyze(model, x, y, 0.1)
    a.kinetic[0] = math.inf
    assert json.loads(a.to_json())["kinetic"][0] == "inf"


def test_float32_model_and_bad_args():
    torch.manual_seed(1)
    model = lc.LeakyResNet(3, 2, 4, 5, 2.0)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    a = diagnostics.analyze(model, x, y, 0.1)
    assert a.coi_exact.dtype == torch.float64 and torch.isfinite(a.coi_gamma).all()
    with pytest.raises(ValueError, match="lam"):
        diagnostics.analyze(model, x, y, 0.0)
    with pytest.raises(ValueError, match="y must be"):
        diagnostics.analyze(model, x, torch.randn(10, 3), 0.1)


# --- centred spectra, the weights' mean direction, momentum Hamiltonians, convergence --------------------------


def test_centred_spectra_against_independent():
    torch.manual_seed(3)
    X = torch.randn(4, 9, 5, dtype=torch.float64) + torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    c = diagnostics.centred_spectra(X)
    for i in range(4):
        mu = X[i].mean(0)
        torch.testing.assert_close(c.sv[i], torch.linalg.svdvals(X[i] - mu.expand(9, 5)))
        assert c.mean_share[i].item() == pytest.approx(9 * mu.dot(mu).item() / X[i].square().sum().item(), rel=1e-12)
        assert c.mean_norm[i].item() == pytest.approx(mu.norm().item(), rel=1e-12)
        # ||X||^2 = ||X - 1 mu^T||^2 + N ||mu||^2
        assert c.sv[i].square().sum().item() == pytest.approx(X[i].square().sum().item() * (1 - c.mean_share[i].item()))
    # a constant representation is all mean; zero has no mean; float32 in, float64 out
    const = torch.ones(6, 3)
    cc = diagnostics.centred_spectra(const)
    assert cc.mean_share.item() == pytest.approx(1.0) and cc.sv.abs().max().item() < 1e-12
    assert cc.sv.dtype == torch.float64
    assert diagnostics.centred_spectra(torch.zeros(6, 3)).mean_share.item() == 0.0
    with pytest.raises(ValueError, match="X must be"):
        diagnostics.centred_spectra(torch.zeros(3))


def test_weight_mean_split_constructed():
    # W_l = W_c + a u s^T / |s|^2 with W_c s = 0 and u^T W_c = 0: the layer writes its mean along u, and
    # removing u leaves exactly the spectrum of W_c; the mean part has norm a / |s|.
    torch.manual_seed(4)
    L, N, w = 3, 11, 4
    xs = torch.randn(L + 1, N, w, dtype=torch.float64) + 1.0
    s = R.sigma(xs[:-1]).mean(-2)  # [L, w+1]
    W = torch.empty(L, w, w + 1, dtype=torch.float64)
    expect_sv, expect_mean = [], []
    for l in range(L):
        u = torch.randn(w, dtype=torch.float64)
        u /= u.norm()
        sh = s[l] / s[l].norm()
        Wc = (torch.eye(w, dtype=torch.float64) - torch.outer(u, u)) @ torch.randn(w, w + 1, dtype=torch.float64)
        Wc = Wc @ (torch.eye(w + 1, dtype=torch.float64) - torch.outer(sh, sh))
        a = 2.0 + l
        W[l] = Wc + a * torch.outer(u, s[l]) / s[l].dot(s[l])
        expect_sv.append(torch.linalg.svdvals(Wc))
        expect_mean.append(a / s[l].norm())
    sp = diagnostics.weight_mean_split(W, xs)
    torch.testing.assert_close(sp.sv, torch.stack(expect_sv), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sp.weight_mean, torch.stack(expect_mean).double(), rtol=1e-12, atol=0)
    # in general: an orthogonal split, ||W||^2 = ||perp||^2 + weight_mean^2, and the direction is W s / |W s|
    W2 = torch.randn(L, w, w + 1, dtype=torch.float64)
    sp2 = diagnostics.weight_mean_split(W2, xs)
    torch.testing.assert_close(sp2.sv.square().sum(-1) + sp2.weight_mean.square(), W2.square().sum((-2, -1)))
    m = (W2 @ s[..., None])[..., 0]
    torch.testing.assert_close(sp2.direction, m / m.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="W \\[L, w, w\\+1\\]"):
        diagnostics.weight_mean_split(W2, xs[1:])


def _last_layer_stationary(Lt=1.5, L=3, w=4, N=4, d_in=3, d_out=2, lam=0.05, seed=5):
    """A model whose last layer is exactly stationary: W_L = Lt B_L^T sigma(X_{L-1}).

    With the other layers and the projections fixed, the loss is quadratic in W_L (X_{L-1} does not depend on
    it), so one Newton step from anywhere lands on the exact minimiser in W_L. N <= w + 1, so sigma(X_{L-1})
    has full row rank and X_{L-1} lies in its range (the exact COI is finite).
    """
    torch.manual_seed(seed)
    model = lc.LeakyResNet(d_in, d_out, w, L, Lt, learn_projections=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight[:, :, -1].normal_(0.0, 0.3)
    x, y = torch.randn(N, d_in, dtype=torch.float64), torch.randn(N, d_out, dtype=torch.float64)
    X = model.representations(x).detach()[L - 1]
    rho = model.rho.detach()

    def loss(WL):
        XL = R.leaky_layer(X, WL, rho[L - 1], Lt)
        return (XL @ model.proj_out.detach().T - y).square().sum() / N + lam / (2 * Lt) * rho[L - 1] * WL.square().sum()

    W0 = model.weight.detach()[L - 1]
    g = torch.autograd.functional.jacobian(loss, W0).flatten()
    H = torch.autograd.functional.hessian(loss, W0).reshape(g.numel(), g.numel())
    with torch.no_grad():
        model.weight[L - 1] = W0 - torch.linalg.solve(H, g).reshape(W0.shape)
    return model, x, y, lam


def test_staggered_hamiltonian_at_a_stationary_layer():
    model, x, y, lam = _last_layer_stationary()
    Lt, L = model.Lt, model.depth
    cv = diagnostics.convergence(model, x, y, lam)
    assert cv.stationarity[-1] < 1e-12 and cv.stationarity[:-1].min() > 1e-3  # only layer L is stationary
    assert math.isnan(cv.scale_slope) and cv.grad_norm_proj == 0.0  # fixed projections
    a = diagnostics.analyze(model, x, y, lam)
    xs = model.representations(x).detach()
    rho = model.rho.detach()
    # layer L: the staggered momentum form on (X_{L-1}, B_L) equals the Lagrangian form with the exact metric
    # K^+ (K = S S^T, S = sigma(X_{L-1})), computed here from the representations alone
    S = R.sigma(xs[L - 1])
    Kp = torch.linalg.pinv(S @ S.T, hermitian=True)
    D = (xs[L] - xs[L - 1]) / rho[L - 1]
    lag = (D * (Kp @ D)).sum() / (2 * Lt) - Lt / 2 * (xs[L - 1] * (Kp @ xs[L - 1])).sum()
    assert a.hamiltonian_staggered[-1].item() == pytest.approx(lag.item(), rel=1e-9)
    assert a.rank_estimate_staggered[-1].item() == pytest.approx(-2 * lag.item() / Lt, rel=1e-9)
    # the collocated forms (B_L with X_L, or B_{L-1} with X_{L-1}) are other numbers: the pairing matters
    assert abs(a.hamiltonian_momentum[-1].item() - lag.item()) > 1e-3 * abs(lag.item())
    assert abs(a.hamiltonian_momentum[-2].item() - lag.item()) > 1e-3 * abs(lag.item())
    # and layer L's forward step is X_L = X_{L-1} + rho_L dH/dB at (X_{L-1}, B_L), B_L from the hand backprop
    _, G = _backprop(model, x, y)
    B = -G[L] / lam
    torch.testing.assert_close(xs[L], xs[L - 1] + rho[L - 1] * Lt * (S @ (S.T @ B) - xs[L - 1]), rtol=1e-10, atol=1e-12)
    # momentum_hamiltonian on its own: staggered [L] and collocated [L+1] from the same (xs, B)
    Bs = -G / lam
    Hs, rs = diagnostics.momentum_hamiltonian(xs, Bs, Lt)
    Hc, rc = diagnostics.momentum_hamiltonian(xs, Bs, Lt, staggered=False)
    assert Hs.shape == (L,) and Hc.shape == (L + 1,)
    torch.testing.assert_close(Hs, a.hamiltonian_staggered)
    torch.testing.assert_close(Hc, a.hamiltonian_momentum)
    torch.testing.assert_close(rs, -2 * Hs / Lt)


@pytest.mark.parametrize("Lt", [2.0, 0.0])
def test_convergence_against_autograd(Lt):
    model, x, y = _setup(Lt=Lt)
    lam = 0.05
    cv = diagnostics.convergence(model, x, y, lam)
    model.zero_grad()
    C = (model(x) - y).square().sum() / x.shape[0]
    (C + model.regularization(lam)).backward()
    g = {n: p.grad for n, p in model.named_parameters()}
    assert cv.data_cost == pytest.approx(C.item(), rel=1e-12)
    assert cv.regularization == pytest.approx(model.regularization(lam).item(), rel=1e-12)
    assert cv.grad_norm == pytest.approx(math.sqrt(sum(t.square().sum().item() for t in g.values())), rel=1e-9)
    assert cv.grad_norm_weight == pytest.approx(g["weight"].norm().item(), rel=1e-9)
    assert cv.grad_norm_proj == pytest.approx(math.hypot(g["proj_in"].norm().item(), g["proj_out"].norm().item()),
                                              rel=1e-9)
    k = Lt if Lt else 1.0
    resid = (k / (lam * model.rho.detach()))[:, None, None] * g["weight"]
    Wd = model.weight.detach()
    torch.testing.assert_close(cv.stationarity, resid.norm(dim=(-2, -1)) / Wd.norm(dim=(-2, -1)), rtol=1e-8, atol=0)
    assert cv.stationarity_max == cv.stationarity.max().item()
    assert cv.stationarity_total == pytest.approx((resid.norm() / Wd.norm()).item(), rel=1e-8)
    json.dumps(cv.to_dict())

    # the rescaling (P_in, b, P_out) -> (c P_in, c b, P_out / c) keeps C and has loss slope (lam/Lt) sum rho |b|^2
    def loss_at(c):  # through the model's own forward
        with torch.no_grad():
            saved = [t.clone() for t in (model.proj_in, model.proj_out, model.weight)]
            model.proj_in.mul_(c), model.proj_out.div_(c), model.weight[:, :, -1].mul_(c)
            C_c = (model(x) - y).square().sum() / x.shape[0]
            out = (C_c + model.regularization(lam)).item(), C_c.item()
            for t, s in zip((model.proj_in, model.proj_out, model.weight), saved):
                t.copy_(s)
        return out

    h = 1e-4
    (fp, Cp), (fm, Cm) = loss_at(1 + h), loss_at(1 - h)
    assert Cp == pytest.approx(C.item(), rel=1e-12) and Cm == pytest.approx(C.item(), rel=1e-12)
    assert cv.scale_slope == pytest.approx((fp - fm) / (2 * h), rel=1e-6)
    assert cv.scale_slope > 0


def test_analyze_new_fields():
    model, x, y = _setup()
    a = diagnostics.analyze(model, x, y, 0.05)
    xs = model.representations(x).detach()
    c = diagnostics.centred_spectra(xs)
    torch.testing.assert_close(a.sv_X_centred, c.sv)
    torch.testing.assert_close(a.mean_share, c.mean_share)
    sp = diagnostics.weight_mean_split(model.weight.detach(), xs)
    torch.testing.assert_close(a.sv_W_centred, sp.sv)
    torch.testing.assert_close(a.weight_mean, sp.weight_mean)
    cv = diagnostics.convergence(model, x, y, 0.05)
    assert (a.grad_norm, a.stationarity_max, a.stationarity_total, a.scale_slope) == pytest.approx(
        (cv.grad_norm, cv.stationarity_max, cv.stationarity_total, cv.scale_slope))
    torch.testing.assert_close(a.stationarity, cv.stationarity)
    assert a.hamiltonian_staggered.shape == (model.depth,) and a.sv_W_centred.shape == (model.depth, 5)
    d = json.loads(a.to_json())
    assert len(d["sv_X_centred"]) == model.depth + 1 and isinstance(d["grad_norm"], float)
