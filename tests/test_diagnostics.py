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
    assert "COI_g" in lines[1] and len(lines) <= 10 + 3
    assert len({len(l) for l in lines[1:]}) == 1  # aligned
    assert len(a.table(max_rows=None).splitlines()) == 31 + 3
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
