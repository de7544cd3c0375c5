"""Autograd registrations of the Cost-of-Identity, K-norm and energies ops (their fake impls are C++ Meta kernels)."""
import torch

from ._ops import ops

# The ops' fake (meta) implementations are C++ Meta kernels (csrc/generic/energies_checks.cpp) that run
# the kernels' own argument checks on symbolic sizes.


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
