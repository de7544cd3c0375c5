"""Tests of the per-run measurements the experiments record (layer_stats, rank_summary, convergence in the JSON)."""
import json

import pytest
import torch

import leakycuda as lc
from leakycuda import diagnostics, experiments
from leakycuda.experiments import fig1, sweep


def _model(Lt=2.0, L=6, w=5, N=12, seed=0):
    torch.manual_seed(seed)
    model = lc.LeakyResNet(3, 2, w, L, Lt, dtype=torch.float64)
    with torch.no_grad():
        model.weight[:, :, -1].normal_(0.0, 0.3)
    return model, torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)


def test_layer_stats_spectra_and_summary():
    model, x, y = _model()
    st = sweep.layer_stats(model, x, 1e-2)
    xs = model.representations(x).detach()
    c = diagnostics.centred_spectra(xs)
    sp = diagnostics.weight_mean_split(model.weight.detach(), xs)
    torch.testing.assert_close(torch.tensor(st["sv_x_centred"], dtype=torch.float64), c.sv)
    torch.testing.assert_close(torch.tensor(st["mean_share"], dtype=torch.float64), c.mean_share)
    torch.testing.assert_close(torch.tensor(st["sv_w_centred"], dtype=torch.float64), sp.sv)
    torch.testing.assert_close(torch.tensor(st["weight_mean"], dtype=torch.float64), sp.weight_mean)
    top = sweep.layer_stats(model, x, 1e-2, top=2)
    assert all(len(r) == 2 for r in top["sv_x_centred"] + top["sv_w_centred"])
    s = sweep.rank_summary(st)
    mid = c.sv[3]
    assert s["mid_layer"] == 3 and s["sv_x_centred_mid"] == pytest.approx(mid[:6].tolist())
    assert s["centred_count_mid"] == int((mid > 0.1 * mid[0]).sum())
    assert s["mean_share_mid"] == pytest.approx(c.mean_share[3].item())
    # rank_summary still works on stats without the centred spectra (older JSON)
    old = {k: v for k, v in st.items() if k not in ("sv_x_centred", "mean_share")}
    assert "centred_count_mid" not in sweep.rank_summary(old)


def test_run_json_records_convergence(tmp_path):
    over = dict(n_train=30, n_test=10, width=6, depth=4, adam_steps=5, sgd_steps=2)
    fig1.run_fig1(str(tmp_path), quick=True, Lts=(2.0,), overrides=over, log=lambda *a: None)
    run = json.loads((tmp_path / "fig1.json").read_text())["runs"][0]
    assert {"stationarity_max", "stationarity_total", "grad_norm", "scale_slope"} <= set(run["convergence"])
    assert len(run["convergence"]["stationarity"]) == 4 and run["summary"]["centred_count_mid"] >= 1
    assert len(run["layers"]["sv_x_centred"]) == 5


# --- leakycuda.recipes ------------------------------------------------------------------------------------------

from leakycuda import recipes  # noqa: E402
from leakycuda import reference as R  # noqa: E402


def test_shift_effective_depth_exact_in_range():
    # X > 0 and N <= w + 1: sigma(X_{l-1}) = [X_{l-1}, 1] has full row rank, every X_{l-1} is in its range
    # and the minimum-norm shift keeps every representation exactly
    model, x, _ = _model(Lt=2.0, L=5, w=6, N=6)
    with torch.no_grad():
        model.proj_in.uniform_(0.5, 1.0), model.weight.uniform_(0.0, 0.5)
    x = x.abs() + 0.1
    before = model.representations(x).detach()
    assert (before > 0).all()
    W0 = model.weight.detach().clone()
    change = recipes.shift_effective_depth(model, x, 5.0, gamma0=None)
    assert model.Lt == 5.0 and change < 1e-10
    torch.testing.assert_close(model.representations(x).detach(), before, rtol=1e-9, atol=1e-10)
    assert (model.weight.detach() - W0).abs().max() > 0.1


def test_shift_effective_depth_ridge_against_independent():
    model, x, _ = _model(Lt=3.0, L=6, w=5, N=20)
    xs = model.representations(x).detach()
    out0 = model(x).detach()
    W0 = model.weight.detach().clone()
    change = recipes.shift_effective_depth(model, x, 4.5, gamma0=0.05)
    for l in range(6):
        S = R.sigma(xs[l])
        g = 0.05 * torch.linalg.matrix_norm(S, ord=2) ** 2
        Z = torch.linalg.solve(S.T @ S + g * torch.eye(6, dtype=torch.float64), S.T @ xs[l])
        torch.testing.assert_close(model.weight.detach()[l], W0[l] + 1.5 * Z.T, rtol=1e-10, atol=1e-12)
    assert change == pytest.approx(((model(x).detach() - out0).norm() / out0.norm()).item(), rel=1e-9)
    # back down to a smaller Lt works too; bad arguments are refused
    recipes.shift_effective_depth(model, x, 1.0)
    assert model.Lt == 1.0
    with pytest.raises(ValueError, match="Lt must be"):
        recipes.shift_effective_depth(model, x, -1.0)
    with pytest.raises(ValueError, match="gamma0 must be"):
        recipes.shift_effective_depth(model, x, 2.0, gamma0=0.0)


def _tiny_task(seed=0):
    from leakycuda.data import bottleneck_task

    return bottleneck_task(d=4, inner=(2,), n_train=24, n_test=8, seed=seed, dtype=torch.float32)


def test_refine_lowers_the_loss_and_reports_convergence():
    task = _tiny_task()
    torch.manual_seed(0)
    model = lc.LeakyResNet(4, 4, 6, 4, 2.0)  # float32: refined in float64, cast back
    P = model.proj_in.detach().clone()
    before = diagnostics.convergence(model, task.x_train, task.y_train, 1e-2)
    r = recipes.refine(model, task, 1e-2, iterations=60, check_every=20, target=1e-12)
    after = diagnostics.convergence(model, task.x_train, task.y_train, 1e-2)
    assert model.weight.dtype == torch.float32 and torch.equal(model.proj_in.detach(), P)
    assert r.iterations == 60 and not r.reached and len(r.history) == 4 and r.evaluations >= 60
    assert after.loss < 0.5 * before.loss
    assert r.history[0]["loss"] == pytest.approx(before.loss, rel=1e-6)
    assert r.history[-1]["stationarity_max"] == pytest.approx(after.stationarity_max, rel=1e-3)
    # a target already met stops at once; "all" also moves the projections
    r0 = recipes.refine(model, task, 1e-2, iterations=60, target=1e9)
    assert r0.reached and r0.iterations == 0
    recipes.refine(model, task, 1e-2, iterations=5, params="all", target=0.0)
    assert not torch.equal(model.proj_in.detach(), P)
    with pytest.raises(ValueError, match="params"):
        recipes.refine(model, task, 1e-2, params="bias")
    with pytest.raises(ValueError, match="precondition"):
        recipes.refine(model, task, 1e-2, precondition=0.0)
    with pytest.raises(ValueError, match="iterations"):
        recipes.refine(model, task, 1e-2, iterations=-1)


@pytest.mark.parametrize("precondition", [None, 1e-4])
def test_refine_preconditioned_and_plain_agree_on_the_problem(precondition):
    # both minimise the same loss in W: the loss falls, the projections stay, and the whitener is exact
    task = _tiny_task(1)
    torch.manual_seed(1)
    model = lc.LeakyResNet(4, 4, 6, 4, 2.0, dtype=torch.float64)
    x = task.x_train.double()
    A, A_inv = recipes._input_whitener(model, x, 1e-4)
    torch.testing.assert_close(A @ A_inv, torch.eye(7, dtype=torch.float64).expand(4, 7, 7), rtol=0, atol=1e-9)
    S = R.sigma(model.representations(x).detach()[:-1])
    G = S.mT @ S / x.shape[0]
    lmax = torch.linalg.eigvalsh(G)[:, -1:]
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(A @ (G + 1e-4 * lmax[..., None] * eye) @ A, eye.expand(4, 7, 7), rtol=0, atol=1e-8)
    P = model.proj_out.detach().clone()
    before = diagnostics.convergence(model, task.x_train, task.y_train, 1e-2).loss
    r = recipes.refine(model, task, 1e-2, iterations=40, check_every=20, target=0.0, precondition=precondition)
    assert r.history[-1]["loss"] < 0.5 * before and torch.equal(model.proj_out.detach(), P)
    assert r.history[-1]["loss"] == pytest.approx(diagnostics.convergence(model, task.x_train, task.y_train,
                                                                          1e-2).loss, rel=1e-12)


def test_continuation_in_a_fig1_sweep(tmp_path):
    over = dict(n_train=30, n_test=10, width=6, depth=4, adam_steps=20, sgd_steps=2, continue_above=3.0,
                continue_steps=10, refine_steps=4)
    fig1.run_fig1(str(tmp_path), quick=True, Lts=(2.0, 3.0, 4.0), overrides=over, log=lambda *a: None)
    runs = json.loads((tmp_path / "fig1.json").read_text())["runs"]
    assert [r["init"] for r in runs] == ["random", "warm start", "warm start"]
    assert [r["warm_start"] for r in runs] == [False, True, True]
    assert all(r["refine"]["iterations"] <= 4 for r in runs) and runs[0]["refine"]["history"]
    assert (tmp_path / "fig1a.png").stat().st_size > 0


def test_continue_run_leaves_the_start_alone():
    task = _tiny_task()
    torch.manual_seed(0)
    start = lc.LeakyResNet(4, 4, 6, 4, 2.0)
    W = start.weight.detach().clone()
    model, result, shift = recipes.continue_run(start, task, 1e-2, Lt=3.0, adam_steps=5, sgd_steps=1)
    assert torch.equal(start.weight.detach(), W) and start.Lt == 2.0
    assert model.Lt == 3.0 and result.steps == 6 and shift >= 0.0
