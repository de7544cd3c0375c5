"""Tests of leakycuda.LeakyResNet against the plain-PyTorch reference and the docs/DESIGN.md §1 formulas in float64."""
import math
import warnings

import pytest
import torch

import leakycuda as lc
from leakycuda import reference
from leakycuda.module import LeakyResNet

F64 = torch.float64


def _model(L=5, w=6, d_in=3, d_out=2, Lt=1.5, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dtype", F64)
    return LeakyResNet(d_in, d_out, w, L, Lt, **kw)


def _batch(N, d, seed=1, dtype=F64):
    return torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference_output(model, x):
    """y = reference.leaky_stack(x P_in^T, W, rho, Lt) P_out^T on leaf copies of the parameters."""
    leaves = {n: t.detach().clone().requires_grad_(True)
              for n, t in [("weight", model.weight), ("proj_in", model.proj_in), ("proj_out", model.proj_out)]}
    xr = x.detach().clone().requires_grad_(True)
    X = reference.leaky_stack(xr @ leaves["proj_in"].T, leaves["weight"], model.rho.detach(), model.Lt,
                              activation=model.activation)
    return X @ leaves["proj_out"].T, leaves, xr


def _formula_stack(X, W, rho, Lt):
    """X_l = (1 - rho_l Lt) X_{l-1} + rho_l [relu(X_{l-1}), 1] W_l^T, written out with V and b."""
    w = X.shape[1]
    for l in range(W.shape[0]):
        V, b = W[l, :, :w], W[l, :, w]
        X = (1 - float(rho[l]) * Lt) * X + float(rho[l]) * (torch.relu(X) @ V.T + b)
    return X


# -- forward and gradients vs the reference ---------------------------------------------------------

@pytest.mark.parametrize("L, steps, init, checkpoint, learn", [
    (1, "equidistant", "random", None, True),
    (7, "irregular", "random", 2, True),
    (7, "adaptive", "identity", None, False),
    (200, "equidistant", "identity", "sqrt", True),
    (30, "irregular", "random", None, False),
])
def test_forward_backward_vs_reference(L, steps, init, checkpoint, learn):
    kw = {"a": 0.4} if steps == "irregular" else {}
    m = _model(L=L, w=5, Lt=min(3.0, 0.9 * L), steps=steps, init=init, checkpoint=checkpoint,
               learn_projections=learn, **kw)
    with torch.no_grad():
        m.weight[:, :, -1].normal_(0.0, 0.3)  # non-zero biases, so the bias column is exercised
    x = _batch(9, 3).requires_grad_(True)
    y = m(x)
    y_ref, leaves, xr = _reference_output(m, x)
    assert y.shape == (9, 2) and y.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)

    g = _batch(9, 2, seed=7)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, leaves["weight"].grad, rtol=1e-10, atol=1e-12)
    if learn:
        torch.testing.assert_close(m.proj_in.grad, leaves["proj_in"].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.proj_out.grad, leaves["proj_out"].grad, rtol=1e-10, atol=1e-12)
        assert {n for n, _ in m.named_parameters()} == {"weight", "proj_in", "proj_out"}
    else:
        assert {n for n, _ in m.named_parameters()} == {"weight"}
        assert not m.proj_in.requires_grad and not m.proj_out.requires_grad
    assert m.rho.grad is None and not m.rho.requires_grad


@pytest.mark.parametrize("L, Lt, checkpoint", [(6, 1.5, None), (20, 3.0, 3)])
def test_linear_activation_vs_reference(L, Lt, checkpoint):
    """activation="linear": output, gradients and representations against the reference."""
    m = _model(L=L, w=5, Lt=Lt, checkpoint=checkpoint, activation="linear")
    x = _batch(9, 3).requires_grad_(True)
    y = m(x)
    y_ref, leaves, xr = _reference_output(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert (y - _model(L=L, w=5, Lt=Lt)(x)).abs().max() > 1e-3 * y.abs().max()  # same weights, relu: another function
    g = _batch(9, 2, seed=7)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for got, want in [(x.grad, xr.grad), (m.weight.grad, leaves["weight"].grad), (m.proj_in.grad, leaves["proj_in"].grad)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.representations(x)[-1], reference.leaky_stack(
        x @ m.proj_in.T, m.weight, m.rho, Lt, activation="linear"), rtol=1e-10, atol=1e-12)


def test_forward_vs_formula_written_out():
    m = _model(L=4, w=3, Lt=2.0, steps="irregular", a=0.5)
    with torch.no_grad():
        m.weight.normal_(0.0, 0.7)
    x = _batch(6, 3)
    rho = [0.25, 0.28125, 0.25, 0.21875]  # the irregular steps for L = 4, a = 0.5, by hand
    torch.testing.assert_close(m.rho, torch.tensor(rho, dtype=F64), rtol=0, atol=1e-15)
    X = _formula_stack(x @ m.proj_in.detach().T, m.weight.detach(), rho, 2.0)
    torch.testing.assert_close(m(x).detach(), X @ m.proj_out.detach().T, rtol=1e-12, atol=1e-12)


def test_representations():
    m = _model(L=6, w=4, Lt=2.0)
    x = _batch(5, 3)
    xs = m.representations(x)
    assert xs.shape == (7, 5, 4)
    W, rho = m.weight.detach(), m.rho
    torch.testing.assert_close(xs[0], x @ m.proj_in.detach().T)
    for l in range(1, 7):
        torch.testing.assert_close(xs[l], _formula_stack(xs[l - 1], W[l - 1:l], rho[l - 1:l], 2.0),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs[-1] @ m.proj_out.detach().T, m(x), rtol=1e-12, atol=1e-12)
    xs.square().sum().backward()
    assert m.weight.grad is not None and bool(m.weight.grad.abs().sum() > 0)


# -- regularization --------------------------------------------------------------------------------

@pytest.mark.parametrize("Lt", [0.0, 0.5, 3.0])
def test_regularization(Lt):
    m = _model(L=5, w=4, Lt=Lt, steps="irregular", a=0.7)
    lam = 0.37
    W, rho = m.weight.detach(), m.rho.tolist()
    scale = lam / 2 if Lt == 0 else lam / (2 * Lt)
    value = scale * math.fsum(rho[l] * W[l].square().sum().item() for l in range(5))
    r = m.regularization(lam)
    assert r.dim() == 0
    assert r.item() == pytest.approx(value, rel=1e-13)
    r.backward()
    grad = torch.stack([2 * scale * rho[l] * W[l] for l in range(5)])
    torch.testing.assert_close(m.weight.grad, grad, rtol=1e-13, atol=0)
    assert m.proj_in.grad is None and m.proj_out.grad is None


# -- adaptive steps --------------------------------------------------------------------------------

def test_adapt_steps_vs_formula():
    L = 6
    m = _model(L=L, w=5, Lt=2.0, steps="adaptive")
    x = _batch(8, 3)
    rho0 = m.rho.clone()
    torch.testing.assert_close(rho0, torch.full((L,), 1.0 / L, dtype=F64))
    X = [x @ m.proj_in.detach().T]
    for l in range(L):
        X.append(_formula_stack(X[-1], m.weight.detach()[l:l + 1], rho0[l:l + 1], 2.0))
    inv_c = [rho0[l].item() * torch.linalg.norm(X[l + 1]).item() / torch.linalg.norm(X[l + 1] - X[l]).item()
             for l in range(L)]
    expected = torch.tensor([v / math.fsum(inv_c) for v in inv_c], dtype=F64)
    new = m.adapt_steps(x)
    torch.testing.assert_close(new, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(m.rho, expected, rtol=1e-10, atol=0)
    new.zero_()  # a copy: the buffer is not aliased
    torch.testing.assert_close(m.rho, expected, rtol=1e-10, atol=0)
    assert m.weight.grad is None


def test_adapt_steps_reduce_hook():
    m = _model(L=4, w=5, Lt=1.0, steps="adaptive")
    x = _batch(8, 3)
    seen = []

    def double(t):  # two identical ranks: sums double, steps unchanged
        seen.append((tuple(t.shape), t.dtype))
        t.mul_(2)

    m2 = _model(L=4, w=5, Lt=1.0, steps="adaptive")
    a = m.adapt_steps(x)
    b = m2.adapt_steps(x, reduce=double)
    assert seen == [((2, 4), F64)]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_adapt_steps_with_torch_distributed_all_reduce(tmp_path):
    """torch.distributed.all_reduce passes as the hook as is (one-rank gloo group: the steps are unchanged)."""
    import torch.distributed as dist
    m, m2 = _model(L=4, steps="adaptive"), _model(L=4, steps="adaptive")
    x = _batch(6, 3)
    dist.init_process_group("gloo", init_method="file://%s" % (tmp_path / "store"), rank=0, world_size=1)
    try:
        got = m.adapt_steps(x, reduce=dist.all_reduce)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, m2.adapt_steps(x), rtol=1e-12, atol=0)


def test_adapt_steps_needs_adaptive():
    with pytest.raises(RuntimeError, match="steps='adaptive'.*'equidistant'"):
        _model(steps="equidistant").adapt_steps(_batch(4, 3))


# -- state dict, device and dtype -------------------------------------------------------------------

@pytest.mark.parametrize("learn", [True, False])
def test_state_dict_round_trip(tmp_path, learn):
    m = _model(L=4, w=5, Lt=1.5, steps="adaptive", learn_projections=learn, init="identity")
    x = _batch(8, 3)
    m.adapt_steps(x)
    path = tmp_path / "model.pt"
    torch.save(m.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) >= {"weight", "proj_in", "proj_out", "rho"}
    other = _model(L=4, w=5, Lt=0.5, seed=3, steps="equidistant", learn_projections=learn)
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"state_dict .*effective_depth=1\.5 \(this model: 0\.5\).*steps='adaptive'"):
        other.load_state_dict(sd)  # another Lt and scheme: refused, nothing loaded
    assert other.Lt == 0.5 and all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.warns(UserWarning, match="adopting the saved effective_depth=1.5"):
        other.load_state_dict(sd, strict=False)
    assert other.effective_depth == 1.5 and other.Lt == 1.5 and isinstance(other.Lt, float)
    assert other.steps == "adaptive" and other.init == "identity"
    for name in ("weight", "proj_in", "proj_out", "rho"):
        torch.testing.assert_close(getattr(other, name), getattr(m, name), rtol=0, atol=0)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)
    other.adapt_steps(x)  # the scheme came back too


def test_state_dict_keeps_the_activation(tmp_path):
    m = _model(L=4, activation="linear")
    torch.save(m.state_dict(), tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    other = _model(L=4, seed=5, activation="linear")
    other.load_state_dict(sd)
    torch.testing.assert_close(other(_batch(4, 3)), m(_batch(4, 3)), rtol=0, atol=0)
    relu = _model(L=4, seed=5)
    before = {k: v.clone() for k, v in relu.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"saved from a LeakyResNet with activation='linear', this one has "
                                         r"activation='relu'; build the model with activation='linear'"):
        relu.load_state_dict(sd)
    for k, v in before.items():  # refused before anything was copied in
        assert torch.equal(relu.state_dict()[k], v), k
    # A state dict from before the option (no "activation" entry) is a relu model's.
    sd["_extra_state"] = {k: v for k, v in sd["_extra_state"].items() if k != "activation"}
    relu.load_state_dict(sd)
    with pytest.raises(ValueError, match="activation='relu', this one has activation='linear'"):
        other.load_state_dict(sd)


def test_state_dict_irregular_a(tmp_path):
    m = _model(L=5, steps="irregular", a=0.6)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    other = _model(L=5, steps="irregular", a=0.6)
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert other.steps == "irregular" and other.a == 0.6
    with pytest.raises(ValueError, match=r"a=0\.6 \(this model: 0\.3\)"):
        _model(L=5, steps="irregular", a=0.3).load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(other.initial_steps(), lc.step_sizes(5, "irregular", 0.6, dtype=F64))


def test_device_dtype_kwargs():
    m = LeakyResNet(3, 2, 4, 5, 1.0, device="cpu", dtype=F64)
    for t in list(m.parameters()) + list(m.buffers()):
        assert t.dtype == F64 and t.device.type == "cpu"
    assert m(_batch(4, 3)).dtype == F64
    m32 = LeakyResNet(3, 2, 4, 5, 1.0)
    assert m32.weight.dtype == torch.get_default_dtype() and m32.rho.dtype == torch.get_default_dtype()
    m32.to(F64)
    assert m32.rho.dtype == F64 and m32.weight.dtype == F64
    assert m32(_batch(4, 3)).dtype == F64
    assert m.weight.shape == (5, 4, 5) and m.proj_in.shape == (4, 3) and m.proj_out.shape == (2, 4)


def test_init_statistics():
    torch.manual_seed(0)
    w, L, Lt = 64, 10, 2.0
    m = LeakyResNet(32, 8, w, L, Lt, dtype=F64)
    V, b = m.weight.detach()[:, :, :w], m.weight.detach()[:, :, w]
    assert bool((b == 0).all())
    assert V.var().item() == pytest.approx(2.0 / w, rel=0.05)
    assert m.proj_in.var().item() == pytest.approx(1 / 32, rel=0.1)
    assert m.proj_out.var().item() == pytest.approx(1 / w, rel=0.25)  # only 512 samples
    torch.manual_seed(0)
    mi = LeakyResNet(32, 8, w, L, Lt, init="identity", dtype=F64)
    Vi = mi.weight.detach()[:, :, :w]
    noise = Vi - Lt * torch.eye(w, dtype=F64)
    assert noise.mean().abs().item() < 0.01 and noise.var().item() == pytest.approx(2.0 / w, rel=0.05)
    # Identity init keeps the signal at large Lt; random init loses about e^{-Lt} of it.
    x = _batch(64, 32)
    for model, lo, hi in ((mi, 0.3, 2.0), (m, 0.2 * math.exp(-Lt), 5 * math.exp(-Lt))):
        xs = model.representations(x).detach()
        ratio = (xs[-1].norm() / xs[0].norm()).item()
        assert lo < ratio < hi


def test_reset_parameters_restores_rho():
    m = _model(L=4, steps="adaptive")
    m.adapt_steps(_batch(6, 3))
    assert not torch.allclose(m.rho, torch.full((4,), 0.25, dtype=F64))
    m.reset_parameters()
    torch.testing.assert_close(m.rho, torch.full((4,), 0.25, dtype=F64))


def test_extra_repr():
    r = repr(_model(L=4, w=6, Lt=1.5, steps="irregular", a=0.2, checkpoint=2))
    for part in ("in_features=3", "out_features=2", "width=6", "depth=4", "effective_depth=1.5",
                 "steps='irregular'", "a=0.2", "learn_projections=True", "init='random'", "checkpoint=2",
                 "activation='relu'"):
        assert part in r
    assert "activation='linear'" in repr(_model(activation="linear"))


# -- warnings and errors ---------------------------------------------------------------------------

def test_warns_when_rho_Lt_above_one():
    with pytest.warns(UserWarning, match=r"rho_l \* Lt > 1"):
        _model(L=4, Lt=4.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = _model(L=4, Lt=4.0)  # rho*Lt == 1 exactly: the fully-connected limit, allowed
    with pytest.warns(UserWarning, match=r"rho_l \* Lt > 1"):
        m.Lt = 6.0
    assert m.effective_depth == 6.0


def test_warns_after_adapt_steps(monkeypatch):
    m = _model(L=4, Lt=3.0, steps="adaptive")  # rho*Lt = 0.75
    monkeypatch.setattr(lc.steps, "adaptive_step_sizes",
                        lambda xs, rho, **kw: torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=rho.dtype))
    with pytest.warns(UserWarning, match=r"adapt_steps: rho_l \* Lt > 1 at 1 layer\(s\) \[1\]"):
        m.adapt_steps(_batch(4, 3))
    torch.testing.assert_close(m.rho, torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=F64))


@pytest.mark.parametrize("kwargs, err, match", [
    ({"in_features": 0}, ValueError, "in_features must be an integer >= 1 .*got 0"),
    ({"out_features": 2.0}, TypeError, "out_features must be an integer >= 1 .*got 2.0"),
    ({"width": -1}, ValueError, "width must be an integer >= 1 .*got -1"),
    ({"depth": 0}, ValueError, "depth must be an integer >= 1 .*got 0"),
    ({"depth": True}, TypeError, "depth must be an integer >= 1"),
    ({"effective_depth": -1.0}, ValueError, "effective_depth must be a finite real number Lt >= 0, got -1.0"),
    ({"effective_depth": float("inf")}, ValueError, "effective_depth must be a finite"),
    ({"effective_depth": "2"}, TypeError, "effective_depth must be a real number"),
    ({"steps": "uniform"}, ValueError, "steps must be one of 'equidistant', 'irregular', 'adaptive', got 'uniform'"),
    ({"steps": "irregular", "a": 1.0}, ValueError, r"a must be in \[0, 1\)"),
    ({"a": 0.5}, ValueError, "irregular-scheme parameter but steps = 'equidistant'"),
    ({"init": "orthogonal"}, ValueError, "init must be one of 'random', 'identity', got 'orthogonal'"),
    ({"learn_projections": "yes"}, TypeError, "learn_projections must be True or False"),
    ({"checkpoint": 0}, ValueError, "checkpoint must be None"),
    ({"checkpoint": "log"}, ValueError, "checkpoint must be None"),
    ({"activation": "tanh"}, ValueError, "activation must be \"relu\" or \"linear\", got 'tanh'"),
    ({"activation": None}, TypeError, "activation must be \"relu\" or \"linear\", got None"),
])
def test_bad_constructor_args(kwargs, err, match):
    args = {"in_features": 3, "out_features": 2, "width": 4, "depth": 5, "effective_depth": 1.0}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        LeakyResNet(**args)


def test_bad_input_shape_dtype():
    with pytest.raises(ValueError, match=r"x must be \[N, in_features\] = \[N, 3\], got shape \[4, 5\]"):
        _model()(torch.zeros(4, 5, dtype=F64))
    with pytest.raises(TypeError, match=r"x must be of the model's dtype torch.float64 .*got torch.float32"):
        _model()(torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"dtype must be one of torch.float32, torch.float64 on cpu.*got torch.float16"):
        LeakyResNet(3, 2, 4, 5, 1.0, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype .*got torch.int64"):
        LeakyResNet(3, 2, 4, 5, 1.0, dtype=torch.int64)


# -- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("init, Lt", [("random", 1.0), ("identity", 1.0), ("identity", 4.0)])
def test_trains(init, Lt):
    torch.manual_seed(0)
    d_in, d_out, N = 4, 2, 32
    x = torch.randn(N, d_in, dtype=F64)
    y = torch.sin(x[:, :d_out] * 1.5) + 0.5 * x[:, 2:3]
    m = LeakyResNet(d_in, d_out, 8, 8, Lt, init=init, dtype=F64)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (m(x) - y).square().sum(1).mean() + m.regularization(1e-3)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) > 0.8 * (len(losses) - 1)


# -- torch.compile ---------------------------------------------------------------------------------

def test_compile_fullgraph_matches_eager():
    m = _model(L=6, w=5, Lt=1.5, steps="irregular", a=0.3)
    with torch.no_grad():
        m.weight[:, :, -1].normal_(0.0, 0.3)
    x, y = _batch(10, 3), _batch(10, 2, seed=2)

    def loss_fn(x, y):
        return (m(x) - y).square().sum(1).mean() + m.regularization(0.1)

    eager = loss_fn(x, y)
    grads = torch.autograd.grad(eager, list(m.parameters()))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss_fn, fullgraph=True)  # raises on any graph break
        got = compiled(x, y)
        got_grads = torch.autograd.grad(got, list(m.parameters()))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
