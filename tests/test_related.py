"""Tests of leakycuda.related: deep linear networks through the op, the Schatten-2/L minimizer, tiny experiment runs."""
import json
import math

import pytest
import torch

import leakycuda as lc
from leakycuda import experiments
from leakycuda.experiments import dln_rank, dln_saddle, fcnn_bottleneck, linear_nets
from leakycuda.steps import rho_Lt_violations

f64 = torch.float64


def _product(model):
    """P_out M_L ... M_1 P_in by plain matrix products (float64)."""
    A = torch.eye(model.width, dtype=f64)[:, : model.in_features]
    for M in model.layers.detach().double():
        A = M @ A
    return A[: model.out_features]


@pytest.mark.parametrize("L", [1, 3, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_fully_connected_steps_reach_but_never_pass_one(L, dtype):
    rho, Lt = linear_nets.fully_connected_steps(L, dtype=dtype)
    assert rho.shape == (L,) and rho.dtype == dtype
    assert rho_Lt_violations(rho, Lt) == []
    assert Lt == pytest.approx(L, rel=1e-6)
    assert float(rho[0]) * Lt == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("L", [1, 2, 5])
@pytest.mark.parametrize("shape", [(6, 6, 6), (9, 4, 3)])  # (width, d_in, d_out)
def test_deep_linear_end_to_end_through_the_op_is_the_product_of_the_layers(L, shape):
    w, d_in, d_out = shape
    gen = torch.Generator().manual_seed(L)
    model = linear_nets.DeepLinear(w, L, in_features=d_in, out_features=d_out, init="gaussian", scale=1.3,
                               generator=gen, dtype=f64)
    A = model.end_to_end()
    torch.testing.assert_close(A, _product(model), rtol=1e-12, atol=1e-13)
    x = torch.randn(11, d_in, generator=gen, dtype=f64)
    torch.testing.assert_close(model(x), x @ _product(model).T, rtol=1e-12, atol=1e-13)
    W = model.stack_weight()
    assert W.shape == (L, w, w + 1) and torch.all(W[..., -1] == 0)
    xs = model(x, return_all=True)
    assert xs.shape == (L + 1, 11, w)
    torch.testing.assert_close(xs[-1][:, :d_out], model(x))


def test_deep_linear_gradient_and_regularization_match_plain_matmuls():
    gen = torch.Generator().manual_seed(0)
    model = linear_nets.DeepLinear(5, 3, generator=gen, dtype=f64)
    x, y = torch.randn(7, 5, generator=gen, dtype=f64), torch.randn(7, 5, generator=gen, dtype=f64)
    lam = 0.3
    loss = lc.train.mse(model(x), y) + model.regularization(lam)
    (g,) = torch.autograd.grad(loss, [model.layers])
    M = model.layers.detach().clone().requires_grad_()
    A = M[2] @ M[1] @ M[0]
    ref = lc.train.mse(x @ A.T, y) + 0.5 * lam * M.square().sum()
    (g_ref,) = torch.autograd.grad(ref, [M])
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)
    # the same penalty as LeakyResNet's lam/(2 Lt) sum_l rho_l ||W_l||^2 at rho_l * Lt = 1
    leaky = lam / (2 * model.Lt) * (model.rho * model.stack_weight().square().sum((1, 2))).sum()
    torch.testing.assert_close(model.regularization(lam), leaky, rtol=1e-13, atol=0)


def test_deep_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        linear_nets.DeepLinear(4, 2, init="zeros")
    with pytest.raises(ValueError, match="in_features"):
        linear_nets.DeepLinear(4, 2, in_features=5)


def test_low_rank_regression_is_whitened_and_its_least_squares_map_gives_the_cost():
    task = linear_nets.low_rank_regression(5, (2.0, 0.5), 12, noise=0.1, seed=3)
    x, y, B = task["x"], task["y"], task["B"]
    torch.testing.assert_close(x.T @ x / 12, torch.eye(5, dtype=f64), rtol=0, atol=1e-12)
    s = torch.linalg.svdvals(task["A_star"])
    torch.testing.assert_close(s[:2], torch.tensor([2.0, 0.5], dtype=f64))
    assert float(s[2]) < 1e-12
    A1, A2 = torch.randn(5, 5, dtype=f64), torch.randn(5, 5, dtype=f64)
    cost = lambda A: lc.train.mse(x @ A.T, y) - (A - B).square().sum()  # noqa: E731  (the same constant for every A)
    torch.testing.assert_close(cost(A1), cost(A2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="spectrum"):
        linear_nets.low_rank_regression(3, (1.0, 1.0, 1.0, 1.0), 10)


def _scalar_objective(s, b, lam, L):
    return (s - b) ** 2 + lam * L / 2 * s ** (2 / L)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6, 8])
def test_scalar_minimizer_is_the_grid_minimum(L):
    lam = 0.2
    b = torch.linspace(0.0, 2.0, 41, dtype=f64)
    s = linear_nets._scalar_minimizer(b, lam, L, "global")
    grid = torch.linspace(0.0, 2.0, 100_001, dtype=f64)
    f = _scalar_objective(grid[None, :], b[:, None], lam, L)
    best = f.min(dim=1).values
    mine = _scalar_objective(s, b, lam, L)
    assert torch.all(mine <= best + 1e-12)  # nothing on the grid does better
    assert torch.all(mine >= best - 1e-7)  # and the grid gets within its resolution of it
    largest = linear_nets._scalar_minimizer(b, lam, L, "largest")
    assert torch.all((largest >= s - 1e-15))


@pytest.mark.parametrize("L", [2, 3, 4, 8])
def test_schatten_thresholds_locate_the_jumps(L):
    lam = 0.2
    b_exist, b_star = linear_nets.schatten_thresholds(lam, L)
    eps = 1e-9
    b = torch.tensor([b_star - eps, b_star + eps, b_exist - eps, b_exist + eps], dtype=f64)
    g = linear_nets._scalar_minimizer(b, lam, L, "global")
    big = linear_nets._scalar_minimizer(b, lam, L, "largest")
    assert g[0] == 0 and g[1] > 0
    assert big[2] == 0 and big[3] > 0
    assert b_exist <= b_star
    if L >= 3:  # a jump: the global minimizer leaves zero at s = 2 b (1 - p) / (2 - p), p = 2/L
        p = 2 / L
        assert float(g[1]) == pytest.approx(2 * b_star * (1 - p) / (2 - p), rel=1e-4)


def _factorized_objective(Ms, B, lam):
    A = Ms[0]
    for M in Ms[1:]:
        A = M @ A
    return (A - B).square().sum() + 0.5 * lam * sum(M.square().sum() for M in Ms)


STARTS = 12


def test_schatten_minimizer_against_direct_minimisation_of_the_deep_linear_loss():
    """Many L-BFGS runs on the factorized loss ||M_3 M_2 M_1 - B||^2 + lam/2 sum ||M_l||^2 from random starts:
    none ends below the closed-form value, and the best reaches it."""
    L, lam = 3, 0.2
    b_exist, b_star = linear_nets.schatten_thresholds(lam, L)
    U = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=f64))[0]
    b = torch.tensor([1.5, (b_exist + b_star) / 2, 0.1], dtype=f64)  # the middle one: a local, not a global, value
    B = U @ torch.diag(b) @ U.T.flip(0)
    A = linear_nets.schatten_minimizer(B, lam, L)
    s = linear_nets._scalar_minimizer(b, lam, L, "global")  # exact zeros (svdvals of A would give ~1e-16, and ^(2/3))
    torch.testing.assert_close(torch.linalg.svdvals(A), s, rtol=0, atol=1e-14)
    closed = float((A - B).square().sum() + lam * L / 2 * (s ** (2 / L)).sum())
    gen = torch.Generator().manual_seed(0)
    values = []
    for k in range(STARTS):
        scale = 0.2 + 1.3 * k / STARTS
        Ms = [(scale * torch.randn(3, 3, generator=gen, dtype=f64)).requires_grad_() for _ in range(L)]
        opt = torch.optim.LBFGS(Ms, lr=1, max_iter=100, tolerance_grad=1e-13, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = _factorized_objective(Ms, B, lam)
            loss.backward()
            return loss

        opt.step(closure)
        values.append(float(_factorized_objective(Ms, B, lam).detach()))
    assert min(values) >= closed - 1e-12
    assert min(values) == pytest.approx(closed, abs=1e-10)
    # the largest local minimizer keeps the middle value, and costs more than the global one
    A_big = linear_nets.schatten_minimizer(B, lam, L, branch="largest")
    s_big = linear_nets._scalar_minimizer(b, lam, L, "largest")
    assert int((s_big > 0).sum()) == 2 and int((s > 0).sum()) == 1
    assert any(v == pytest.approx(float((A_big - B).square().sum() + lam * L / 2 * (s_big ** (2 / L)).sum()), abs=1e-10)
               for v in values)  # some starts stop at the local one
    assert float((A_big - B).square().sum() + lam * L / 2 * (s_big ** (2 / L)).sum()) > closed


def test_balanced_factors_attain_the_schatten_penalty():
    """sum_l ||M_l||^2 >= L sum_i s_i(A)^(2/L) over factorizations of A, with equality for balanced factors."""
    gen = torch.Generator().manual_seed(2)
    L = 4
    U, s, Vh = torch.linalg.svd(torch.randn(5, 5, generator=gen, dtype=f64))
    Qs = [torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=f64))[0] for _ in range(L - 1)]
    frames = [Vh.T] + Qs + [U]
    Ms = [frames[l + 1] @ torch.diag(s ** (1 / L)) @ frames[l].T for l in range(L)]
    A = Ms[3] @ Ms[2] @ Ms[1] @ Ms[0]
    torch.testing.assert_close(A, U @ torch.diag(s) @ Vh)
    bound = L * (s ** (2 / L)).sum()
    torch.testing.assert_close(sum(M.square().sum() for M in Ms), bound)
    G = torch.randn(5, 5, generator=gen, dtype=f64)  # an unbalanced factorization of the same A costs more
    unbalanced = [Ms[0], G @ Ms[1], Ms[2] @ torch.linalg.inv(G), Ms[3]]
    assert float(sum(M.square().sum() for M in unbalanced)) > float(bound)


def test_rank_measures():
    assert linear_nets.numerical_rank([3.0, 1.0, 1e-4]) == 2
    assert linear_nets.numerical_rank([0.0, 0.0]) == 0
    assert linear_nets.entropy_rank([1.0, 1.0, 1.0, 0.0]) == pytest.approx(3.0)
    assert linear_nets.entropy_rank([1.0, 0.0]) == pytest.approx(1.0)


def _check_outputs(result, out, name):
    with open(out / (name.replace("-", "_") + ".json")) as f:
        data = json.load(f)
    assert data["experiment"] == name and data["seconds"] > 0 and data["machine"]["torch"] == torch.__version__
    pngs = [p for k, p in result["files"].items() if k != "json"]
    assert pngs
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = experiments.replot(str(out / (name.replace("-", "_") + ".json")), str(out / "replot"))
    assert sorted(again) == sorted(k for k in result["files"] if k != "json")
    return data


def test_tiny_dln_rank_runs_and_matches_the_local_minimizer(tmp_path):
    cfg = dln_rank.DLNRankConfig(d=4, n=8, spectrum=(1.0, 0.3), noise=0.0, lam=0.2, depths=(1, 3), steps=400)
    res = dln_rank.run_dln_rank(tmp_path, config=cfg, log=lambda *a: None, progress=False)
    data = _check_outputs(res, tmp_path, "dln-rank")
    for run in data["runs"]:
        assert run["max_abs_diff_largest"] < 1e-4
        assert math.isfinite(run["final_loss"])
    assert [r["rank"] for r in data["runs"]] == [2, 1]  # 0.3 < b_star(L=3) = 0.356 is zeroed at L = 3


def test_tiny_dln_saddle_runs(tmp_path):
    cfg = dln_saddle.DLNSaddleConfig(d=3, width=6, n=6, spectrum=(2.0, 0.5), depths=(2,), horizon_small={2: 6.0},
                                  horizon_large={2: 1.0}, steps_large=60, records=60)
    res = dln_saddle.run_dln_saddle(tmp_path, config=cfg, log=lambda *a: None, progress=False)
    data = _check_outputs(res, tmp_path, "dln-saddle")
    small = next(r for r in data["runs"] if r["init"] == "small")
    assert small["summary"]["complete"] and small["summary"]["ordered"]  # the larger value is learned first


def test_tiny_fcnn_bottleneck_runs(tmp_path):
    cfg = fcnn_bottleneck.FCNNBottleneckConfig(d=6, inner=(2,), n_train=16, n_test=8, width=8, depths=(2, 3), adam_steps=20)
    res = fcnn_bottleneck.run_fcnn_bottleneck(tmp_path, config=cfg, log=lambda *a: None, progress=False)
    data = _check_outputs(res, tmp_path, "fcnn-bottleneck")
    assert [len(r["layers"]) for r in data["runs"]] == [3, 4]


def test_fully_connected_resnet_is_a_dense_relu_net():
    model = linear_nets.fully_connected_resnet(4, 3, 6, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    x = torch.randn(5, 4, dtype=f64)
    X = x @ model.proj_in.T
    for W in model.weight.detach():
        X = torch.cat([torch.relu(X), torch.ones_like(X[:, :1])], 1) @ (W / 3).T
    torch.testing.assert_close(model(x), X @ model.proj_out.T, rtol=1e-12, atol=1e-13)


def test_registry_lists_every_experiment():
    found = experiments.experiments()
    assert set(found) == {"demo", "fig1", "fig2", "dln-rank", "dln-saddle", "fcnn-bottleneck"}
    assert {n for n, e in found.items() if e.kind == "preset"} == {"dln-rank", "dln-saddle", "fcnn-bottleneck"}
    for name, entry in found.items():
        assert entry.name == name and callable(entry.run) and callable(entry.plot) and entry.help and entry.full
        assert entry.kind == "demo" or entry.quick
    with pytest.raises(ValueError, match="name"):
        experiments.get("fig3")
