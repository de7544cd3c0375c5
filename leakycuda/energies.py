"""Cost of Identity, K-norms and the energies along a trajectory (docs/DESIGN.md §1, §3); the ops run on CPU or CUDA alike.

Notation: ``S = sigma(X) = [act(X), 1]`` (``[N, w+1]``; ``[N, w]`` with ``bias=False``), act = relu
(``activation="relu"``, the default) or the identity (``"linear"``: deep linear networks), ``K = S S^T`` and

* ``k_norm2(M, X, gamma) = ||M||^2_{K,gamma} = Tr[M^T (K + gamma I_N)^{-1} M]``;
* stable COI ``COI_gamma(X) = ||X||^2_{K(X),gamma}`` (gamma > 0, or the layer-relative
  ``gamma = gamma0 * ||sigma(X)||_op^2``);
* exact COI ``||S^+ X||_F^2`` with the residual ``||S S^+ X - X||_F`` (the theory calls the COI
  infinite when the residual is not zero; :meth:`ExactCOI.theory` applies that).

All internal sums, Grams and solves run in float64 whatever the input dtype (float32 or float64),
so float32 inputs neither over- nor underflow; float64 inputs should stay within ~1e-150 < |X| < 1e150.
The stable value is computed as the ridge objective ``||M - S Z||^2/gamma + ||Z||^2`` at
``Z = (S^T S + gamma I)^{-1} S^T M`` (the ``(w+1) x (w+1)`` Gram form, or the N-space form when
N < w+1): it has no cancellation however small gamma is, and errors in Z only enter to second order.
Gradients hold gamma fixed (for the gamma0 policy too: gamma is computed, then treated as a constant).
NaN and inf propagate as in leakycuda/reference.py.

Implementations (the same results to float64 rounding): the CPU kernel; the device-generic one (batched
float64 ATen calls; what CUDA falls back to, and what the CPU ops run under LEAKYCUDA_CPU_ATEN_ENERGIES=1);
on CUDA, fused kernels (float64 tensor cores: one Gram pass over every layer, one small-solve launch,
one gradient pass; the value from the float64 Grams, with a cancellation check that hands ill-conditioned
calls, e.g. gamma0 below ~1e-6, to the residual form above). LEAKYCUDA_CUDA_ATEN_ENERGIES=1 skips them.
"""
import math
import numbers
from typing import NamedTuple

import torch

from . import _energy_ops  # noqa: F401  (autograd registrations)
from ._ops import ops

#: gamma0 of the layer-relative ridge used when energies() gets neither gamma nor gamma0.
DEFAULT_GAMMA0 = 1e-3


class ExactCOI(NamedTuple):
    """The exact Cost of Identity of X [..., N, w]; every field is [...].

    value: ``||S^+ X||_F^2`` (pseudo-inverse with the relative cutoff, finite even where the theory says
    infinite); residual: ``||S S^+ X - X||_F``; rank: numerical rank of S (int64); x_norm: ``||X||_F``.
    Non-finite X: where sigma(X) is not finite (NaN or +inf in X; any inf with "linear") value and
    residual are NaN and rank is -1 (no SVD is taken); where only X is (-inf under relu) rank is that of
    the finite sigma(X) and value and residual follow the arithmetic (inf, NaN), as in the reference.
    """

    value: torch.Tensor
    residual: torch.Tensor
    rank: torch.Tensor
    x_norm: torch.Tensor

    def is_infinite(self, rtol=None):
        """Where X is not in the range of sigma(X): residual > rtol * ||X||_F (rtol default sqrt(eps) of the dtype)."""
        if rtol is None:
            rtol = math.sqrt(torch.finfo(self.value.dtype).eps)
        return self.residual > rtol * self.x_norm

    def theory(self, rtol=None):
        """The COI as the theory defines it: ``value``, or +inf where :meth:`is_infinite`."""
        return torch.where(self.is_infinite(rtol), torch.full_like(self.value, math.inf), self.value)


class Energies(NamedTuple):
    """Per-layer energies along a trajectory, each [L] (layer l = 1..L, metric from X_{l-1}).

    coi: ``COI_gamma(X_{l-1})``; kinetic: ``||D_l||^2_{K,gamma} / (2 Lt)`` with ``D_l = (X_l - X_{l-1})/rho_l``;
    potential: ``-(Lt/2) COI_gamma(X_{l-1})``; hamiltonian: kinetic + potential; rank_estimate: ``-2 H / Lt``
    (``= COI - ||D||^2_K / Lt^2``); gamma: the ridge each layer used (float64).
    """

    coi: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor
    hamiltonian: torch.Tensor
    rank_estimate: torch.Tensor
    gamma: torch.Tensor


def _check_tensor(t, name, hint):
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s must be a tensor %s, got %s" % (name, hint, type(t).__name__))


def _real(v, name, what):
    """v as a float when it is a real number (not a bool); TypeError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError("%s must be %s, got %r" % (name, what, v))
    return float(v)


def _flag(v, name):
    if not isinstance(v, bool):
        raise TypeError("%s must be True or False, got %r" % (name, v))
    return v


def _activation_arg(activation):
    if not isinstance(activation, str):
        raise TypeError('activation must be "relu" or "linear", got %r' % (activation,))
    return activation


def _is_zero_number(g):
    return isinstance(g, numbers.Real) and not isinstance(g, bool) and g == 0


# What a gamma <= 0 is told, per function.
_COI_RIDGE = "finite and > 0 (or None / the number 0 for the exact COI)"
_RIDGE = "finite and > 0 (a ridge; or give gamma0 for the layer-relative gamma0 * ||sigma(X)||_op^2)"


def _gamma_arg(gamma, gamma0, like, batch, name="X", positive=_RIDGE):
    """(gamma tensor or None, gamma0 float) as the ops take them; gamma broadcast to the batch shape.
    A number gamma must be ``positive`` (the message says what else the caller accepts)."""
    if gamma is not None and gamma0 is not None:
        raise ValueError("give either gamma (a fixed ridge) or gamma0 (gamma = gamma0 * ||sigma(X)||_op^2), not both")
    if gamma0 is not None:
        gamma0 = _real(gamma0, "gamma0", "a finite number > 0 (gamma = gamma0 * ||sigma(X)||_op^2)")
        if not 0 < gamma0 < math.inf:
            raise ValueError("gamma0 must be a finite number > 0 (gamma = gamma0 * ||sigma(X)||_op^2), got %r"
                             % (gamma0,))
        return None, gamma0
    if isinstance(gamma, torch.Tensor):
        try:
            g = torch.broadcast_to(gamma, batch)
        except RuntimeError:
            raise ValueError("gamma must broadcast to the batch shape %s of %s, got shape %s"
                             % (tuple(batch), name, tuple(gamma.shape))) from None
        return g.to(device=like.device), 1.0
    gamma = _real(gamma, "gamma", "a number, a tensor or None")
    if not 0 < gamma < math.inf:
        raise ValueError("gamma must be %s, got %r" % (positive, gamma))
    return torch.tensor(gamma, dtype=torch.float64, device=like.device), 1.0


def cost_of_identity(X, gamma=None, *, gamma0=None, bias=True, activation="relu", rcond=None, return_gamma=False):
    """Cost of Identity of X [..., N, w] over its leading dims (a whole trajectory [L+1, N, w] is one call).

    * ``gamma > 0`` (a number, or a tensor broadcastable to ``X.shape[:-2]``, e.g. one per layer) or
      ``gamma0 > 0`` (``gamma = gamma0 * ||sigma(X)||_op^2`` per entry): the stable ``COI_gamma(X)``,
      a tensor [...] in X's dtype, differentiable in X (gamma held fixed). ``return_gamma=True`` also
      returns the gamma used ([...], float64).
    * ``gamma=None`` or ``0`` (and no gamma0): the exact COI as an :class:`ExactCOI`
      ``(value, residual, rank, x_norm)``; singular values of S below ``rcond * sigma_max`` are dropped
      (default ``rcond = max(N, w+1) * eps(X.dtype)``). Not differentiable: the pseudo-inverse jumps
      where the numerical rank changes and the theory's COI is infinite off the range of sigma(X), so
      no gradient would be meaningful; differentiate ``COI_gamma`` instead.

    ``bias=False`` drops the ones column of sigma (bias-free nets); then COI(X) = rank X for X >= 0.
    ``activation="linear"``: sigma(X) = [X, 1] (deep linear networks).
    N = 0 gives 0. Edge values: an all-zero X gives 0; where gamma0 meets S = 0 (bias=False and X <= 0)
    gamma is 0 and the value is +inf (0 if X = 0), with a zero gradient.
    float32/float64 on CPU (CUDA when built with it).
    """
    _check_tensor(X, "X", "[..., N, w]")
    activation, bias, return_gamma = _activation_arg(activation), _flag(bias, "bias"), _flag(return_gamma, "return_gamma")
    exact = gamma0 is None and (gamma is None or _is_zero_number(gamma))
    if exact:
        if rcond is not None:
            rcond = _real(rcond, "rcond", "a number >= 0 (relative singular-value cutoff) or None")
        value, residual, rank = ops.cost_of_identity_exact(X.detach(), rcond, bias, activation)
        x_norm = torch.linalg.vector_norm(X.detach(), dim=(-2, -1)) if X.dim() >= 2 else X.new_zeros(())
        return ExactCOI(value, residual, rank, x_norm.to(value.dtype))
    if rcond is not None:
        raise ValueError("rcond only applies to the exact COI (gamma=None or 0)")
    g, g0 = _gamma_arg(gamma, gamma0, X, X.shape[:-2], positive=_COI_RIDGE)
    coi, gamma_used, _ = ops.cost_of_identity(X, g, g0, bias, activation)
    return (coi, gamma_used) if return_gamma else coi


def k_norm2(M, X, gamma=None, *, gamma0=None, bias=True, activation="relu", return_gamma=False):
    """``||M||^2_{K(X),gamma} = Tr[M^T (sigma(X) sigma(X)^T + gamma I)^{-1} M]``, batched.

    M: [..., N, m] (same leading dims and N as X), X: [..., N, w]; gamma > 0 (number or tensor
    broadcastable to ``X.shape[:-2]``) or gamma0 > 0 for ``gamma = gamma0 * ||sigma(X)||_op^2``.
    Returns [...] in M's dtype; differentiable in M and X (gamma held fixed). ``bias`` and ``activation``
    as in :func:`cost_of_identity`.
    """
    _check_tensor(M, "M", "[..., N, m]")
    _check_tensor(X, "X", "[..., N, w]")
    if gamma is None and gamma0 is None:
        raise ValueError("k_norm2 needs a ridge: gamma > 0 or gamma0 > 0")
    bias, return_gamma = _flag(bias, "bias"), _flag(return_gamma, "return_gamma")
    g, g0 = _gamma_arg(gamma, gamma0, X, X.shape[:-2])
    value, gamma_used, _ = ops.k_norm2(M, X, g, g0, bias, _activation_arg(activation))
    return (value, gamma_used) if return_gamma else value


def energies(xs, rho, Lt, *, gamma=None, gamma0=None, bias=True, activation="relu"):
    """Per-layer energies of a trajectory xs [L+1, N, w] (every X_l of one batch), rho [L] (> 0), Lt.

    Layer l = 1..L uses the metric of X_{l-1} and ``D_l = (X_l - X_{l-1}) / rho_l``; returns an
    :class:`Energies` of [L] tensors (coi, kinetic, potential, hamiltonian, rank_estimate in xs's dtype,
    gamma float64), differentiable in xs and rho (gamma held fixed).
    gamma: > 0, one value or [L]; gamma0: layer-relative ridge; neither: ``gamma0 = DEFAULT_GAMMA0``.
    ``bias`` and ``activation`` as in :func:`cost_of_identity`.
    ``Lt = 0``: kinetic = +inf (0 where D_l = 0), potential = 0, hamiltonian = kinetic and
    rank_estimate = -inf (COI where D_l = 0); their gradients are then undefined (an error), while coi
    and potential stay differentiable.
    """
    _check_tensor(xs, "xs", "[L+1, N, w]")
    if not isinstance(rho, torch.Tensor):
        try:
            rho = torch.as_tensor(rho, dtype=torch.float64, device=xs.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("rho must be a tensor [L] or a sequence of L numbers, got %r" % (rho,)) from None
    if isinstance(Lt, torch.Tensor):
        if Lt.numel() != 1:
            raise ValueError("Lt must be a number or a one-element tensor, got a tensor of shape %s" % (tuple(Lt.shape),))
        Lt = Lt.item()
    Lt = _real(Lt, "Lt", "a real number (the effective depth)")
    bias = _flag(bias, "bias")
    if gamma is None and gamma0 is None:
        gamma0 = DEFAULT_GAMMA0
    L = xs.shape[0] - 1 if xs.dim() > 0 else 0
    g, g0 = _gamma_arg(gamma, gamma0, xs, (L,), name="xs (one per layer)")
    out = ops.energies(xs, rho, Lt, g, g0, bias, _activation_arg(activation))
    return Energies(*out[:6])


def stable_rank(X):
    """``||X||_*^2 / ||X||_F^2`` of a floating X [..., N, w] -> [...] (float64 inside, X's dtype out); 0 for
    X = 0, NaN where X is not finite.

    A cheap, continuous lower bound of the exact COI for bias-free sigma (see docs/DESIGN.md §1).
    """
    _check_tensor(X, "X", "[..., N, w]")
    if not X.is_floating_point():
        raise TypeError("X must be a floating tensor [..., N, w], got %s" % (X.dtype,))
    if X.dim() < 2:
        raise ValueError("X must be [..., N, w] (at least 2 dimensions), got shape %s" % (tuple(X.shape),))
    X64 = X.detach().double()
    finite = torch.isfinite(X64).all(-1).all(-1)
    s = torch.linalg.svdvals(torch.where(finite[..., None, None], X64, torch.zeros_like(X64)))
    fro2 = s.square().sum(-1)
    nuc = s.sum(-1)
    out = torch.where(fro2 > 0, nuc.square() / torch.where(fro2 > 0, fro2, torch.ones_like(fro2)), torch.zeros_like(fro2))
    return torch.where(finite, out, torch.full_like(out, math.nan)).to(X.dtype)
