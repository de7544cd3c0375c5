"""Fake (meta) and autograd registrations of the Cost-of-Identity, K-norm and energies ops."""
import torch

from ._ops import ops

_F64 = torch.float64


def _p(w, bias):
    return w + 1 if bias else w


@torch.library.register_fake("leakycuda::cost_of_identity")
def _cost_of_identity_fake(X, gamma, gamma0, bias, activation="relu"):
    batch, (N, w) = X.shape[:-2], X.shape[-2:]
    return X.new_empty(batch), X.new_empty(batch, dtype=_F64), X.new_empty(batch + (_p(w, bias), w), dtype=_F64)


@torch.library.register_fake("leakycuda::cost_of_identity_backward")
def _cost_of_identity_backward_fake(grad, X, Z, gamma, bias, activation="relu"):
    return torch.empty_like(X)


@torch.library.register_fake("leakycuda::cost_of_identity_exact")
def _cost_of_identity_exact_fake(X, rcond, bias, activation="relu"):
    batch = X.shape[:-2]
    return X.new_empty(batch), X.new_empty(batch), X.new_empty(batch, dtype=torch.int64)


@torch.library.register_fake("leakycuda::k_norm2")
def _k_norm2_fake(M, X, gamma, gamma0, bias, activation="relu"):
    batch, w, m = X.shape[:-2], X.shape[-1], M.shape[-1]
    return M.new_empty(batch), M.new_empty(batch, dtype=_F64), M.new_empty(batch + (_p(w, bias), m), dtype=_F64)


@torch.library.register_fake("leakycuda::k_norm2_backward")
def _k_norm2_backward_fake(grad, M, X, Z, gamma, bias, activation="relu"):
    return torch.empty_like(M), torch.empty_like(X)


@torch.library.register_fake("leakycuda::energies")
def _energies_fake(xs, rho, Lt, gamma, gamma0, bias, activation="relu"):
    L, w = xs.shape[0] - 1, xs.shape[-1]
    per_layer = [xs.new_empty((L,)) for _ in range(5)]
    return (*per_layer, xs.new_empty((L,), dtype=_F64), xs.new_empty((L, _p(w, bias), 2 * w), dtype=_F64))


@torch.library.register_fake("leakycuda::energies_backward")
def _energies_backward_fake(g_coi, g_kin, g_pot, g_ham, g_rank, xs, rho, Lt, Z, gamma, bias, activation="relu"):
    return torch.empty_like(xs), torch.empty_like(rho)


# Autograd: gamma (given, or from the gamma0 policy) is held fixed; the backward ops recompute
# Q = (M - S Z) / gamma from the saved inputs and the small saved solve Z.

def _coi_setup(ctx, inputs, output):
    X, _, _, bias, activation = inputs
    _, gamma, Z = output
    ctx.mark_non_differentiable(gamma, Z)
    ctx.bias, ctx.activation = bias, activation
    ctx.save_for_backward(X, Z, gamma)


def _coi_grad(ctx, dcoi, dgamma, dZ):
    X, Z, gamma = ctx.saved_tensors
    dX = ops.cost_of_identity_backward(dcoi, X, Z, gamma, ctx.bias, ctx.activation) if ctx.needs_input_grad[0] else None
    return dX, None, None, None, None


def _k_norm2_setup(ctx, inputs, output):
    M, X, _, _, bias, activation = inputs
    _, gamma, Z = output
    ctx.mark_non_differentiable(gamma, Z)
    ctx.bias, ctx.activation = bias, activation
    ctx.save_for_backward(M, X, Z, gamma)


def _k_norm2_grad(ctx, dvalue, dgamma, dZ):
    M, X, Z, gamma = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None
    dM, dX = ops.k_norm2_backward(dvalue, M, X, Z, gamma, ctx.bias, ctx.activation)
    return (dM if ctx.needs_input_grad[0] else None), (dX if ctx.needs_input_grad[1] else None), None, None, None, None


def _energies_setup(ctx, inputs, output):
    xs, rho, Lt, _, _, bias, activation = inputs
    gamma, Z = output[5], output[6]
    ctx.mark_non_differentiable(gamma, Z)
    ctx.Lt, ctx.bias, ctx.activation = Lt, bias, activation
    ctx.save_for_backward(xs, rho, Z, gamma)


def _energies_grad(ctx, *grads):
    xs, rho, Z, gamma = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None, None
    L = xs.shape[0] - 1
    g = [gr if gr is not None else xs.new_zeros((L,)) for gr in grads[:5]]
    dxs, drho = ops.energies_backward(*g, xs, rho, ctx.Lt, Z, gamma, ctx.bias, ctx.activation)
    return (dxs if ctx.needs_input_grad[0] else None), (drho if ctx.needs_input_grad[1] else None), None, None, None, None, None


torch.library.register_autograd("leakycuda::cost_of_identity", _coi_grad, setup_context=_coi_setup)
torch.library.register_autograd("leakycuda::k_norm2", _k_norm2_grad, setup_context=_k_norm2_setup)
torch.library.register_autograd("leakycuda::energies", _energies_grad, setup_context=_energies_setup)
