"""The fused leaky stack and layer ops against the float64 reference: values, every gradient, gradcheck, opcheck, bad input."""
import math
import pytest
import torch

import leakycuda as lc
from leakycuda import reference as ref
from leakycuda._ops import ops
from leakycuda._tolerance import assert_close_to_reference  # float64 tight; else 4x the same-precision error

def make_stack(N, w, L, *, Lt=3.0, dtype=torch.float64, device="cpu", seed=0, rho="random", scale=1.0):
    """Random x0 [N,w], W [L,w,w+1] with a He-like scale, and non-uniform steps summing to 1."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, w, generator=g, dtype=torch.float64)
    W = torch.randn(L, w, w + 1, generator=g, dtype=torch.float64) * scale * math.sqrt(2.0 / w)
    if rho == "random":
        r = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
        r = r / r.sum()
    else:
        r = torch.full((L,), 1.0 / L, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x0, W, r)]


def reference_and_grads(x0, W, rho, Lt, gout, return_all, activation="relu"):
    """Float64 reference output and the gradients of <out, gout> in x0, W and rho."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x0, W, rho)]
    out = ref.leaky_stack(*leaves, Lt, return_all=return_all, activation=activation)
    grads = torch.autograd.grad(out, leaves, gout.double().cpu())
    return out.detach(), grads


def fused_and_grads(x0, W, rho, Lt, gout, return_all, checkpoint=None, activation="relu"):
    leaves = [t.detach().clone().requires_grad_() for t in (x0, W, rho)]
    out = lc.leaky_stack(*leaves, Lt, return_all=return_all, checkpoint=checkpoint, activation=activation)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return out.detach(), grads


def check_stack(N, w, L, Lt, dtype, device, return_all=False, checkpoint=None, rho="random", scale=1.0,
                activation="relu"):
    x0, W, r = make_stack(N, w, L, dtype=torch.float64, rho=rho, scale=scale)
    shape = (L + 1, N, w) if return_all else (N, w)
    gout = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want, want_grads = reference_and_grads(x0, W, r, Lt, gout, return_all, activation)
    args = [t.to(device=device, dtype=dtype) for t in (x0, W, r)]
    got, got_grads = fused_and_grads(*args, Lt, gout.to(device), return_all, checkpoint, activation)
    assert got.shape == shape and got.dtype == dtype and got.device.type == device
    errs = [None] * 4
    if dtype != torch.float64:  # what the reference itself makes at this precision
        low, low_grads = reference_and_grads(*args, Lt, gout.to(dtype), return_all, activation)
        errs = [(a.double() - b).abs().max().item() for a, b in zip([low, *low_grads], [want, *want_grads])]
    assert_close_to_reference(got, want, errs[0], "out")
    for name, a, b, e in zip(["dx0", "dW", "drho"], got_grads, want_grads, errs[1:]):
        assert_close_to_reference(a, b, e, name)


ACTIVATIONS = ["relu", "linear"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("L", [1, 20, 300])
@pytest.mark.parametrize("N", [1, 5, 1000])
@pytest.mark.parametrize("w", [1, 7, 100, 129])
def test_stack_matches_reference_float64(w, N, L, activation, device):
    check_stack(N, w, L, 3.0, torch.float64, device, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("N,w,L", [(5, 7, 20), (1000, 100, 20), (5, 129, 300), (1, 1, 1)])
def test_stack_matches_reference_float32(N, w, L, activation, device):
    check_stack(N, w, L, 3.0, torch.float32, device, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("N,w,L", [(5, 7, 20), (1000, 100, 20), (5, 129, 300)])
def test_resnet_limit_Lt0(N, w, L, activation, device):
    check_stack(N, w, L, 0.0, torch.float64, device, scale=0.3, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("N,w,L", [(5, 7, 1), (5, 7, 20), (1000, 100, 20)])
def test_fully_connected_limit(N, w, L, activation, device):
    # rho_l * Lt = 1: each layer is X_l = rho_l sigma(X_{l-1}) W_l^T (with "linear", a deep linear
    # network); W scaled by L keeps the signal alive.
    check_stack(N, w, L, float(L), torch.float64, device, rho="equidistant", scale=float(L), activation=activation)
    x0, W, r = make_stack(N, w, L, rho="equidistant", scale=float(L), device=device)
    y = lc.leaky_stack(x0, W, r, float(L), return_all=True, activation=activation)
    for l in range(1, L + 1):
        want = r[l - 1] * (ref.sigma(y[l - 1], activation=activation) @ W[l - 1].T)
        torch.testing.assert_close(y[l], want, rtol=1e-12, atol=1e-12)


def test_linear_activation_is_a_deep_linear_network():
    """activation="linear", rho_l * Lt = 1, zero biases: X_L = X_0 (r_1 V_1)^T ... (r_L V_L)^T, a
    product of matrices (relu gives something else)."""
    x0, W, r = make_stack(6, 5, 4, rho="equidistant", scale=4.0)
    W[..., -1] = 0
    y = lc.leaky_stack(x0, W, r, 4.0, activation="linear")
    want = x0
    for l in range(4):
        want = want @ (r[l] * W[l, :, :5]).T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert (y - lc.leaky_stack(x0, W, r, 4.0)).abs().max() > 1e-3


def assert_same_nonfinite(got, want, name):
    """NaN and ±inf at the same positions as the reference, the finite entries close to it."""
    got = got.double().cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(want)), f"{name}: {kind.__name__} at {kind(got).sum()} positions, reference {kind(want).sum()}"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-9, atol=1e-9, msg=name)


NONFINITE_SITES = {  # where one non-finite value goes: (tensor, index)
    "x0": ("x0", (2, 1)),
    "W": ("W", (3, 2, 0)),
    "bias": ("W", (0, 1, 5)),
    "grad": ("gout", (4, 3)),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("site", sorted(NONFINITE_SITES))
@pytest.mark.parametrize("checkpoint", [None, 3])
@pytest.mark.parametrize("return_all", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nonfinite_values_propagate_like_the_reference(site, value, checkpoint, return_all, activation, device):
    """Issue 13: NaN/inf in x0, W or the incoming gradient reach the same outputs and gradients as in
    the float64 reference (torch.relu keeps NaN; its backward passes the gradient where X is NaN)."""
    N, w, L = 7, 5, 6
    x0, W, r = make_stack(N, w, L)
    shape = (L + 1, N, w) if return_all else (N, w)
    gout = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tensors = {"x0": x0, "W": W, "gout": gout}
    name, index = NONFINITE_SITES[site]
    tensors[name][(index[0] % shape[0],) + index[1:] if name == "gout" and return_all else index] = value
    want, want_grads = reference_and_grads(x0, W, r, 2.0, gout, return_all, activation)
    args = [t.to(device) for t in (x0, W, r)]
    got, got_grads = fused_and_grads(*args, 2.0, gout.to(device), return_all, checkpoint, activation)
    assert not torch.isfinite(want).all() or site == "grad"
    for n, a, b in zip(["out", "dx0", "dW", "drho"], [got, *got_grads], [want, *want_grads]):
        assert_same_nonfinite(a, b, n)


def test_nan_in_x0_reaches_a_whole_row():
    """The issue's case: x0[0, 0] = NaN makes all w outputs of row 0 NaN (the relu no longer maps it to 0)."""
    x0, W, r = make_stack(5, 4, 3)
    x0[0, 0] = float("nan")
    assert lc.leaky_stack(x0, W, r, 1.0).isnan().sum() == 4
    W[1, 2, 3] = float("nan")
    assert lc.leaky_stack(x0, W, r, 1.0).isnan().all()


def test_nonfinite_steps_and_depth_are_refused():
    """rho and Lt are hyper-parameters: a non-finite (or negative) step is an error, not a NaN run."""
    x0, W, r = make_stack(5, 4, 3)
    for v in (float("nan"), float("inf")):
        rr = r.clone()
        rr[2] = v
        bad(lambda: lc.leaky_stack(x0, W, rr, 1.0), r"rho must hold finite steps rho_l >= 0, got rho\[2\] = ")
        bad(lambda: lc.leaky_stack(x0, W, r, v), r"Lt must be finite")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("checkpoint", [None, 1, 2, 3, "sqrt", 7, 50])
@pytest.mark.parametrize("return_all", [False, True])
def test_checkpointing_same_gradients(checkpoint, return_all, activation, device):
    check_stack(9, 13, 23, 2.0, torch.float64, device, return_all=return_all, checkpoint=checkpoint,
                activation=activation)


def test_checkpoint_saves_fewer_states():
    x0, W, r = make_stack(4, 5, 100)
    for k, S in [(1, 100), (10, 10), (7, 15), (100, 1), (1000, 1)]:
        out, states = ops.leaky_stack(x0, W, r, 1.0, False, k)
        assert states.shape == (S, 4, 5)
        torch.testing.assert_close(states, ref.leaky_stack(x0, W, r, 1.0, return_all=True)[::k][:S])
    assert lc.functional.checkpoint_interval(1000, "sqrt") == 32


def test_return_all_matches_every_reference_layer(device):
    x0, W, r = make_stack(6, 8, 12, device=device)
    torch.testing.assert_close(lc.leaky_stack(x0, W, r, 2.5, return_all=True),
                               ref.leaky_stack(x0, W, r, 2.5, return_all=True), rtol=1e-12, atol=1e-12)


def test_zero_layers(device):
    x0, W, r = make_stack(3, 4, 0, device=device)
    x0.requires_grad_()
    y = lc.leaky_stack(x0, W, r, 1.0)
    torch.testing.assert_close(y, x0)
    assert y.data_ptr() != x0.data_ptr()
    (g,) = torch.autograd.grad(y.sum(), x0)
    torch.testing.assert_close(g, torch.ones_like(x0))
    assert lc.leaky_stack(x0, W, r, 1.0, return_all=True).shape == (1, 3, 4)


def test_batch_dims_are_flattened(device):
    x0, W, r = make_stack(6, 5, 4, device=device)
    y = lc.leaky_stack(x0.reshape(2, 3, 5), W, r, 1.0, return_all=True)
    assert y.shape == (5, 2, 3, 5)
    torch.testing.assert_close(y.reshape(5, 6, 5), ref.leaky_stack(x0, W, r, 1.0, return_all=True))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_leaky_layer_matches_reference(dtype, activation, device):
    x, W, r = make_stack(50, 9, 1, dtype=torch.float64)
    leaves = [x, W[0], r[0].clone()]
    want = ref.leaky_layer(*[t.requires_grad_() for t in leaves], 2.0, activation=activation)
    gout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, gout)
    got_leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    got = lc.leaky_layer(*got_leaves, 2.0, activation=activation)
    got_grads = torch.autograd.grad(got, got_leaves, gout.to(device=device, dtype=dtype))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double().cpu(), want.detach(), **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double().cpu(), b, **tol)
    # rho_l as a plain number
    torch.testing.assert_close(lc.leaky_layer(got_leaves[0], got_leaves[1], float(r[0]), 2.0, activation=activation), got)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("return_all,checkpoint", [(False, 1), (False, 2), (True, 1)])
def test_gradcheck_stack(return_all, checkpoint, activation, device):
    x0, W, r = make_stack(3, 4, 5, device=device, seed=3)
    args = [t.requires_grad_() for t in (x0, W, r)]
    f = lambda a, b, c: lc.leaky_stack(a, b, c, 1.5, return_all=return_all, checkpoint=checkpoint, activation=activation)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_layer(activation, device):
    x0, W, r = make_stack(4, 3, 1, device=device, seed=4)
    args = [x0.requires_grad_(), W[0].clone().requires_grad_(), r[0].clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, b, c: lc.leaky_layer(a, b, c, 0.7, activation=activation), args)


def opcheck_cases(device, activation):
    x0, W, r = make_stack(5, 4, 6, device=device, seed=5)
    out, states = ops.leaky_stack(x0, W, r, 1.0, False, 2, activation)
    g, g_all = torch.randn_like(out), torch.randn(7, 5, 4, dtype=x0.dtype, device=device)
    return [
        (ops.leaky_stack, (x0, W, r, 1.0, False, 1, activation)),
        (ops.leaky_stack, (x0, W, r, 1.0, False, 2, activation)),
        (ops.leaky_stack, (x0, W, r, 1.0, True, 1, activation)),
        (ops.leaky_stack_backward, (g, states, W, r, 1.0, 2, activation)),
        (ops.leaky_stack_backward, (g_all, torch.randn(7, 5, 4, dtype=x0.dtype, device=device), W, r, 1.0, 1, activation)),
        (ops.leaky_layer, (x0, W[0], r[0], 1.0, activation)),
        (ops.leaky_layer_backward, (g, x0, W[0], r[0], 1.0, activation)),
    ]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, activation, device):
    for op, args in opcheck_cases(device, activation):
        args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        backward_op = op in (ops.leaky_stack_backward, ops.leaky_layer_backward)
        # The backward ops refuse to be differentiated (test_double_backward_is_refused), so with
        # grad they are checked for schema and fake tensors only.
        utils = ("test_schema", "test_faketensor") if backward_op and requires_grad else None
        torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


def test_double_backward_is_refused(device):
    x0, W, r = make_stack(3, 4, 2, device=device)
    x0.requires_grad_(), W.requires_grad_()
    (g,) = torch.autograd.grad(lc.leaky_stack(x0, W, r, 1.0).sum(), x0, create_graph=True)
    with pytest.raises(RuntimeError, match="leaky_stack_backward is not differentiable"):
        g.sum().backward()


def test_inputs_are_not_modified(device):
    x0, W, r = make_stack(7, 6, 9, device=device)
    before = [t.clone() for t in (x0, W, r)]
    leaves = [t.requires_grad_() for t in (x0, W, r)]
    for k in (None, 4):
        lc.leaky_stack(*leaves, 3.0, checkpoint=k).sum().backward()
    for a, b in zip(leaves, before):
        assert torch.equal(a.detach(), b)


def test_noncontiguous_and_expanded_inputs(device):
    x0, W, r = make_stack(6, 5, 4, device=device)
    xt = x0.T.contiguous().T  # same values, transposed strides
    assert not xt.is_contiguous()
    grads = []
    for fn, x in [(lc.leaky_stack, xt), (ref.leaky_stack, x0)]:
        # one weight shared by every layer (stride 0) and one step expanded from a scalar
        leaves = [x.clone().requires_grad_(), W[:1].clone().requires_grad_(),
                  torch.tensor(0.25, dtype=r.dtype, device=device).requires_grad_()]
        y = fn(leaves[0], leaves[1].expand(4, 5, 6), leaves[2].expand(4), 2.0)
        grads.append([y] + list(torch.autograd.grad(y.sum(), leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_empty_batch(device):
    x0, W, r = make_stack(0, 5, 3, device=device)
    leaves = [t.requires_grad_() for t in (x0, W, r)]
    y = lc.leaky_stack(*leaves, 1.0)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(leaves[1].grad, torch.zeros_like(W)) and torch.equal(leaves[2].grad, torch.zeros_like(r))
    assert lc.leaky_stack(x0, W, r, 1.0, return_all=True).shape == (4, 0, 5)


def bad(fn, match, exc=ValueError):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_give_clear_errors():
    x0, W, r = make_stack(5, 4, 3)
    f = lambda *a, **k: lc.leaky_stack(*a, **k)
    bad(lambda: f(x0[0, 0], W, r, 1.0), r"x0 must be \[N, w\] \(2 dimensions\), got shape \[\]")
    bad(lambda: f(x0, W[0], r, 1.0), r"W must be \[L, w, w\+1\] \(one model\) or \[B, L, w, w\+1\] \(B models\), got shape \[4, 5\]")
    bad(lambda: f(x0, torch.randn(3, 5, 6, dtype=x0.dtype), r, 1.0),
        r"W must be \[L, w, w\+1\] with w = x0.size\(1\) = \[3, 4, 5\], got \[3, 5, 6\]")
    bad(lambda: f(x0, W[..., :4], r, 1.0), r"W must be \[L, w, w\+1\] = \[3, 4, 5\], got \[3, 4, 4\]; the last column is the bias")
    bad(lambda: f(x0, W, r[:2], 1.0), r"rho must be \[L\], one step per layer of W = \[3\], got \[2\]")
    bad(lambda: f(x0, W, r, float("nan")), r"Lt must be finite, got nan")
    bad(lambda: f(x0, W, r, float("inf")), r"Lt must be finite, got inf")
    bad(lambda: f(x0, W, torch.tensor([0.5, float("nan"), 0.5], dtype=x0.dtype), 1.0),
        r"rho must hold finite steps rho_l >= 0, got rho\[1\] = nan")
    bad(lambda: f(x0, W, torch.tensor([0.5, -0.1, 0.5], dtype=x0.dtype), 1.0), r"got rho\[1\] = -0.1")
    bad(lambda: f(x0, W.float(), r, 1.0), r"W must have the same dtype as x0 \(Double\), got Float", TypeError)
    bad(lambda: f(x0, W, r.float(), 1.0), r"rho must have the same dtype as x0 \(Double\), got Float", TypeError)
    bad(lambda: f(x0.long(), W.long(), r.long(), 1.0), r"x0 must be a floating tensor \(float32 or float64 on cpu\), got Long", TypeError)
    bad(lambda: f(x0.half(), W.half(), r.half(), 1.0), r"x0 must be a floating tensor .* got Half", TypeError)
    bad(lambda: f(x0, W.to("meta"), r, 1.0), r"W must be on the same device as x0 \(cpu\), got meta")
    bad(lambda: f(x0, W, r, 1.0, checkpoint=0), r"checkpoint must be None, \"sqrt\" or an interval k >= 1, got 0")
    bad(lambda: f(x0, W, r, 1.0, checkpoint="log"), r"checkpoint must be None")
    bad(lambda: f(x0, W, r, "3"), r"Lt must be a real number", TypeError)
    bad(lambda: f(x0.numpy(), W, r, 1.0), r"x0 must be a tensor \[N, w\], got ndarray", TypeError)
    bad(lambda: ops.leaky_stack(x0, W, r, 1.0, False, 0), r"checkpoint must be an interval k >= 1, got 0")
    bad(lambda: ops.leaky_stack(x0, W, r, 1.0, False, 1, "tanh"), r'activation must be "relu" or "linear", got "tanh"')


def test_leaky_layer_errors_speak_of_the_layer():
    """leaky_layer's errors name x [N, w], W_l [w, w+1] and rho_l, never the stack it runs as."""
    x, W, r = make_stack(5, 4, 3)
    f = lc.leaky_layer
    bad(lambda: f(x, W, r[0], 1.0), r"W_l must be one layer's weight \[w, w\+1\] = \[4, 5\] with w = x.size\(1\), got \[3, 4, 5\]$")
    bad(lambda: f(x, W[0, :, :4], r[0], 1.0), r"W_l must be one layer's weight \[w, w\+1\] = \[4, 5\] .* got \[4, 4\]; the last column is the bias")
    bad(lambda: f(x, W[0], r, 1.0), r"rho_l must be a single step \(a number or a 0-d tensor\), got shape \[3\]")
    bad(lambda: f(x[0, 0], W[0], r[0], 1.0), r"x must be \[N, w\] \(2 dimensions\), got shape \[\]")
    bad(lambda: f(x, W[0].float(), r[0], 1.0), r"W_l must have the same dtype as x \(Double\), got Float", TypeError)
    bad(lambda: f(x.long(), W[0].long(), r[0].long(), 1.0), r"^x must be a floating tensor", TypeError)
    bad(lambda: f(x, W[0], r[0], float("nan")), r"Lt must be finite, got nan")
    bad(lambda: ops.leaky_layer_backward(x[:2], x, W[0], r[0], 1.0), r"grad must be x's shape \[N, w\] = \[5, 4\], got \[2, 4\]")
    for fn in (lambda: f(x, W, r[0], 1.0), lambda: f(x, W[0], r, 1.0)):
        with pytest.raises(ValueError) as e:
            fn()
        assert "x0" not in str(e.value) and "[L" not in str(e.value)


def bad_stack_cases():
    """(op, args, error type, message) for inputs wrong in shape or dtype only: what the fake (meta)
    kernels must refuse exactly as the real ones do."""
    x0, W, r = make_stack(5, 4, 3)
    out, states = ops.leaky_stack(x0, W, r, 1.0, False, 2)
    S, B = ops.leaky_stack, ops.leaky_stack_backward
    return [
        (S, (x0, W[..., :4], r, 1.0, False, 1), ValueError, r"got \[3, 4, 4\]; the last column is the bias"),
        (S, (x0, W, r[:2], 1.0, False, 1), ValueError, r"rho must be \[L\], one step per layer of W = \[3\], got \[2\]"),
        (S, (x0.long(), W.long(), r.long(), 1.0, False, 1), TypeError, r"x0 must be a floating tensor"),
        (S, (x0, W.float(), r, 1.0, False, 1), TypeError, r"W must have the same dtype as x0"),
        (S, (x0[0], W, r, 1.0, False, 1), ValueError, r"x0 must be \[N, w\] \(2 dimensions\)"),
        (S, (x0, W, r, 1.0, False, 0), ValueError, r"checkpoint must be an interval k >= 1"),
        (S, (x0, W, r, float("nan"), False, 1), ValueError, r"Lt must be finite"),
        (S, (x0, W, r, 1.0, False, 1, "gelu"), ValueError, r"activation must be"),
        (B, (out, states[:1], W, r, 1.0, 2), ValueError, r"states must hold the ceil\(L/k\) = 2 saved"),
        (B, (out[:, :3], states, W, r, 1.0, 2), ValueError, r"grad must be \[N, w\] = \[5, 4\] \(from W \[3, 4, 5\]\), got \[5, 3\]"),
        (B, (out, states, W, r[:1], 1.0, 2), ValueError, r"rho must be \[L\]"),
        (B, (out, states.float(), W, r, 1.0, 2), TypeError, r"states must have the same dtype as grad"),
        (ops.leaky_layer, (x0, W[0, :, :4], r[0], 1.0), ValueError, r"W_l must be one layer's weight \[w, w\+1\] = \[4, 5\]"),
        (ops.leaky_layer, (x0, W[0], r, 1.0), ValueError, r"rho_l must be a single step"),
    ]


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
def test_fake_and_meta_kernels_check_like_the_kernels(mode):
    """Issue 13: under tracing a bad shape or dtype raises the kernel's own error (one check per op,
    run by the CPU kernel and the Meta kernel alike), not a shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args, exc, match in bad_stack_cases():
        if mode == "meta":
            args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        if mode == "fake":
            with FakeTensorMode() as fake_mode:
                args = tuple(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
                with pytest.raises(exc, match=match):
                    op(*args)
        else:
            with pytest.raises(exc, match=match):
                op(*args)


def test_meta_kernels_give_the_output_shapes():
    x0, W, r = make_stack(5, 4, 7)
    m = [t.to("meta") for t in (x0, W, r)]
    for return_all, k, shapes in [(False, 3, [(5, 4), (3, 5, 4)]), (True, 1, [(8, 5, 4), (0, 5, 4)])]:
        assert [t.shape for t in ops.leaky_stack(*m, 1.0, return_all, k)] == shapes
    g = torch.empty(5, 4, device="meta")
    got = ops.leaky_stack_backward(g.double(), torch.empty(3, 5, 4, device="meta", dtype=x0.dtype), *m[1:], 1.0, 3)
    assert [t.shape for t in got] == [(5, 4), (7, 4, 5), (7,)]
    assert ops.leaky_layer(m[0], m[1][0], m[2][0], 1.0).shape == (5, 4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_matches_eager(dynamic):
    """torch.compile(fullgraph=True) over the op and its backward, static and dynamic shapes (the Meta
    kernels' checks run on symbolic sizes); a bad shape still raises the kernel's message."""
    f = torch.compile(lambda a, b, c: lc.leaky_stack(a, b, c, 1.5, checkpoint=2).square().sum(),
                      fullgraph=True, dynamic=dynamic)
    for N, w, L in [(5, 4, 3), (9, 4, 6), (7, 6, 5)]:
        x0, W, r = make_stack(N, w, L, seed=N)
        got_leaves = [t.clone().requires_grad_() for t in (x0, W, r)]
        want_leaves = [t.clone().requires_grad_() for t in (x0, W, r)]
        got, want = f(*got_leaves), ref.leaky_stack(*want_leaves, 1.5).square().sum()
        got.backward(), want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for a, b in zip(got_leaves, want_leaves):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    x0, W, r = make_stack(5, 4, 3)
    with pytest.raises(Exception, match=r"the last column is the bias"):
        f(x0, W[..., :4], r)


def test_aten_gemm_fallback_matches_reference():
    """The CPU kernel's ATen GEMM path (used where torch exports no BLAS symbols) in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, leakycuda as lc\n"
        "from leakycuda import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x0 = torch.randn(300, 17, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "W = (torch.randn(9, 17, 18, generator=g, dtype=torch.float64) * 0.3).requires_grad_()\n"
        "rho = torch.full((9,), 1 / 9, dtype=torch.float64, requires_grad=True)\n"
        "for f in (lc.leaky_stack, ref.leaky_stack):\n"
        "    y = f(x0, W, rho, 2.0)\n"
        "    gs = torch.autograd.grad((y * y).sum(), (x0, W, rho))\n"
        "    if f is lc.leaky_stack: got = (y, *gs)\n"
        "for a, b in zip(got, (y, *gs)): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)\n"
        "with torch.no_grad(): W[2, 3, 4] = float('inf')\n"  # drho's exact <G, P> form on this path too
        "for f in (lc.leaky_stack, ref.leaky_stack):\n"
        "    y = f(x0, W, rho, 2.0)\n"
        "    gs = torch.autograd.grad(y.sum(), (x0, W, rho))\n"
        "    if f is lc.leaky_stack: got = (y, *gs)\n"
        "for a, b in zip(got, (y, *gs)): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LEAKYCUDA_CPU_ATEN_GEMM="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# -- B models in one call (a 4-D W) ----------------------------------------------------------------


def make_models(B, N, w, L, *, seed=0, dtype=torch.float64, device="cpu"):
    """B independent stacks (make_stack with seeds seed..seed+B-1) stacked: x0 [B,N,w], W [B,L,w,w+1], rho [B,L]."""
    parts = [make_stack(N, w, L, seed=seed + b, dtype=dtype, device=device) for b in range(B)]
    return [torch.stack(ts) for ts in zip(*parts)]


def model_Lts(B, device="cpu"):
    return torch.linspace(0.5, 4.0, B, dtype=torch.float64, device=device)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("per_model_Lt", [False, True])
@pytest.mark.parametrize("return_all,checkpoint", [(False, None), (False, 3), (True, None), (False, "sqrt")])
@pytest.mark.parametrize("B,N,w,L", [(3, 40, 7, 12), (2, 1000, 33, 5), (4, 3, 5, 150)])
def test_models_match_the_reference_per_model(B, N, w, L, return_all, checkpoint, per_model_Lt, activation, device):
    """Output and every gradient (dx0, dW, drho) of each model against its own float64 reference."""
    x0, W, r = make_models(B, N, w, L, device=device)
    Lt = model_Lts(B, device) if per_model_Lt else 2.5
    gout = torch.randn((B, L + 1, N, w) if return_all else (B, N, w), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(9))
    got, got_grads = fused_and_grads(x0, W, r, Lt, gout.to(device), return_all, checkpoint, activation)
    for b in range(B):
        Lt_b = float(Lt[b]) if per_model_Lt else Lt
        want, want_grads = reference_and_grads(x0[b], W[b], r[b], Lt_b, gout[b], return_all, activation)
        assert_close_to_reference(got[b], want, name=f"out[{b}]")
        for name, a, c in zip(["dx0", "dW", "drho"], got_grads, want_grads):
            assert_close_to_reference(a[b], c, name=f"{name}[{b}]")


@pytest.mark.parametrize("return_all,checkpoint", [(False, None), (True, None), (False, 4)])
def test_models_equal_separate_calls_bitwise(return_all, checkpoint, device):
    """The result of B models is the one each model gets alone, to the bit (same chunks, same
    summation order), float32 and per-model Lt included; B = 1 is the single op."""
    x0, W, r = make_models(4, 300, 20, 9, dtype=torch.float32, device=device)
    Lt = model_Lts(4, device)
    gout = torch.randn((4, 10, 300, 20) if return_all else (4, 300, 20), device=device)
    got, got_grads = fused_and_grads(x0, W, r, Lt, gout, return_all, checkpoint)
    for b in range(4):
        one, one_grads = fused_and_grads(x0[b], W[b], r[b], float(Lt[b]), gout[b], return_all, checkpoint)
        for a, c in zip([got, *got_grads], [one, *one_grads]):
            assert torch.equal(a[b], c)
    one, one_grads = fused_and_grads(x0[:1], W[:1], r[:1], 1.5, gout[:1], return_all, checkpoint)
    single, single_grads = fused_and_grads(x0[0], W[0], r[0], 1.5, gout[0], return_all, checkpoint)
    for a, c in zip([one, *one_grads], [single, *single_grads]):
        assert a.shape[0] == 1 and torch.equal(a[0], c)


def test_models_do_not_depend_on_the_thread_count():
    x0, W, r = make_models(3, 700, 24, 6, dtype=torch.float32)
    gout = torch.randn(3, 700, 24)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got, grads = fused_and_grads(x0, W, r, model_Lts(3), gout, False, 2)
            results.append([got, *grads])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_padded_depths_batch_stacks_of_different_depth(device):
    """rho_l = 0 makes layer l the identity: a model of depth 4 padded to 9 layers gives the depth-4
    stack's output and gradients, and its padding weights get zero gradient."""
    x0, W, r = make_models(2, 30, 6, 9, device=device)
    r[1, 4:] = 0.0
    gout = torch.randn(2, 30, 6, dtype=torch.float64, device=device)
    got, (dx0, dW, drho) = fused_and_grads(x0, W, r, torch.tensor([2.0, 3.0], dtype=torch.float64), gout, False, 3)
    want, (wdx0, wdW, wdrho) = reference_and_grads(x0[1], W[1, :4], r[1, :4], 3.0, gout[1], False)
    assert_close_to_reference(got[1], want, name="out")
    assert_close_to_reference(dx0[1], wdx0, name="dx0")
    assert_close_to_reference(dW[1, :4], wdW, name="dW")
    assert_close_to_reference(drho[1, :4], wdrho, name="drho")
    assert torch.equal(dW[1, 4:], torch.zeros_like(dW[1, 4:]))
    all_layers = lc.leaky_stack(x0, W, r, 3.0, return_all=True)
    assert torch.equal(all_layers[1, 5:], all_layers[1, 4:5].expand(5, 30, 6))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_models(activation, device):
    x0, W, r = make_models(2, 3, 4, 5, device=device, seed=11)
    args = [t.requires_grad_() for t in (x0, W, r)]
    Lt = torch.tensor([0.7, 2.0], dtype=torch.float64, device=device)
    for return_all, k in [(False, 2), (True, None)]:
        f = lambda a, b, c: lc.leaky_stack(a, b, c, Lt, return_all=return_all, checkpoint=k, activation=activation)
        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_models(requires_grad, activation, device):
    x0, W, r = make_models(3, 5, 4, 6, device=device, seed=5)
    Lt = model_Lts(3, device)
    out, states = ops.leaky_stack(x0, W, r, 0.0, False, 2, activation, Lt)
    g_all = torch.randn(3, 7, 5, 4, dtype=x0.dtype, device=device)
    cases = [
        (ops.leaky_stack, (x0, W, r, 1.0, False, 1, activation, None)),
        (ops.leaky_stack, (x0, W, r, 0.0, False, 2, activation, Lt)),
        (ops.leaky_stack, (x0, W, r, 0.0, True, 1, activation, Lt)),
        (ops.leaky_stack_backward, (torch.randn_like(out), states, W, r, 0.0, 2, activation, Lt)),
        (ops.leaky_stack_backward, (g_all, torch.randn_like(g_all), W, r, 1.5, 1, activation, None)),
    ]
    for op, args in cases:
        # model_Lt (Lt here) is not differentiable: it keeps requires_grad off.
        args = tuple(a.clone().requires_grad_(requires_grad and a is not Lt) if isinstance(a, torch.Tensor) else a
                     for a in args)
        utils = ("test_schema", "test_faketensor") if op is ops.leaky_stack_backward and requires_grad else None
        torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


def test_models_compile_fullgraph():
    f = torch.compile(lambda a, b, c, Lt: lc.leaky_stack(a, b, c, Lt, checkpoint=2).square().sum(), fullgraph=True)
    x0, W, r = make_models(3, 8, 5, 4)
    Lt = model_Lts(3)
    got_leaves = [t.clone().requires_grad_() for t in (x0, W, r)]
    want_leaves = [t.clone().requires_grad_() for t in (x0, W, r)]
    got, want = f(*got_leaves, Lt), ref.leaky_stack(*want_leaves, Lt).square().sum()
    got.backward(), want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_leaves, want_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_models_batch_dims_and_meta_shapes():
    x0, W, r = make_models(2, 6, 5, 4)
    y = lc.leaky_stack(x0.reshape(2, 2, 3, 5), W, r, 1.0, return_all=True)
    assert y.shape == (2, 5, 2, 3, 5)
    torch.testing.assert_close(y.reshape(2, 5, 6, 5), ref.leaky_stack(x0, W, r, 1.0, return_all=True))
    m = [t.to("meta") for t in (x0, W, r)]
    out, states = ops.leaky_stack(*m, 1.0, False, 3)
    assert out.shape == (2, 6, 5) and states.shape == (2, 2, 6, 5)
    grads = ops.leaky_stack_backward(out, states, *m[1:], 1.0, 3)
    assert [t.shape for t in grads] == [(2, 6, 5), (2, 4, 5, 6), (2, 4)]


def test_models_zero_models_and_zero_layers():
    x0, W, r = make_models(2, 3, 4, 0)
    y = lc.leaky_stack(x0.requires_grad_(), W, r, 1.0)
    torch.testing.assert_close(y, x0)
    (g,) = torch.autograd.grad(y.sum(), x0)
    torch.testing.assert_close(g, torch.ones_like(x0))
    e = [t[:0] for t in make_models(2, 3, 4, 5)]
    assert lc.leaky_stack(*e, 1.0, return_all=True).shape == (0, 6, 3, 4)


def test_models_bad_inputs():
    x0, W, r = make_models(3, 5, 4, 6)
    f = lc.leaky_stack
    bad(lambda: f(x0[0], W, r, 1.0), r"x0 must be \[B, N, w\] \(B models: W is 4-D\) \(3 dimensions\), got shape \[5, 4\]")
    bad(lambda: f(x0[:2], W, r, 1.0), r"W must be \[B, L, w, w\+1\] with B and w of x0 \[B, N, w\] = \[2, 6, 4, 5\], got \[3, 6, 4, 5\]")
    bad(lambda: f(x0, W, r[:2], 1.0), r"rho must be \[B, L\], one step per layer of each model = \[3, 6\], got \[2, 6\]")
    bad(lambda: f(x0, W, r[0], 1.0), r"rho must be \[B, L\].* got \[6\]")
    bad(lambda: f(x0, W, r, [1.0, 2.0]), r"model_Lt must be \[B\], one Lt per model = \[3\], got \[2\]")
    bad(lambda: f(x0, W, r, torch.ones(3, 1)), r"Lt must be a real number or one per model, \[B\], got shape \(3, 1\)")
    bad(lambda: f(x0, W, r, [1.0, float("nan"), 2.0]), r"model_Lt must hold finite effective depths, got model_Lt\[1\] = nan")
    bad(lambda: f(x0, W, r, "2"), r"Lt must be a real number or one per model", TypeError)
    bad(lambda: f(x0[0], W[0], r[0], [1.0, 2.0]), r"Lt must be a single number", ValueError)
    r2 = r.clone()
    r2[2, 3] = -0.5
    bad(lambda: f(x0, W, r2, 1.0), r"rho must hold finite steps rho_l >= 0, got rho\[2, 3\] = -0.5")
    bad(lambda: ops.leaky_stack(x0[0], W[0], r[0], 1.0, False, 1, "relu", torch.ones(1, dtype=torch.float64)),
        r"model_Lt \(a per-model Lt\) needs B models \(a 4-D W \[B, L, w, w\+1\]\)")
    bad(lambda: ops.leaky_stack(x0, W, r, 1.0, False, 1, "relu", torch.ones(3)), r"model_Lt must be a float64 tensor \[B\], got Float", TypeError)
    out, states = ops.leaky_stack(x0, W, r, 1.0, False, 2)
    bad(lambda: ops.leaky_stack_backward(out[0], states, W, r, 1.0, 2), r"grad must be \[B, N, w\] \(of X_L\) or \[B, L\+1, N, w\]")
    bad(lambda: ops.leaky_stack_backward(out[:2], states, W, r, 1.0, 2), r"grad must be \[B, N, w\] = \[3, 5, 4\] \(from W \[3, 6, 4, 5\]\), got \[2, 5, 4\]")
    bad(lambda: ops.leaky_stack_backward(out, states[:, :2], W, r, 1.0, 2), r"states must hold the ceil\(L/k\) = 3 saved representations \[B, 3\+, 5, 4\]")
    bad(lambda: ops.leaky_stack_backward(out, states[:2], W, r, 1.0, 2), r"states must hold")
    # The same refusals under tracing, from the Meta kernel.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx, fW, fr = (mode.from_tensor(t) for t in (x0, W, r))
        bad(lambda: ops.leaky_stack(fx[:2], fW, fr, 1.0, False, 1), r"W must be \[B, L, w, w\+1\]")
        bad(lambda: ops.leaky_stack(fx, fW, fr[:2], 1.0, False, 1), r"rho must be \[B, L\]")
