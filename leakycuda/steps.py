"""Layer-step schemes rho_1..rho_L (docs/DESIGN.md §1): equidistant, irregular and the adaptive update."""
import math
import numbers
import operator
import warnings

import torch

from . import _validate as check

__all__ = [
    "SCHEMES",
    "StepOvershootWarning",
    "adaptive_statistics",
    "adaptive_step_sizes",
    "step_sizes",
    "steps_from_statistics",
]

#: Fixed schemes that :func:`step_sizes` builds. "adaptive" is not one of them: it starts from the
#: equidistant steps and is then updated from the representations by :func:`adaptive_step_sizes`.
SCHEMES = ("equidistant", "irregular")

#: The stable range of a layer step: rho_l * Lt <= STABLE_RHO_LT. The layer is an explicit Euler step of
#: dX/dp = -Lt X + ... (docs/DESIGN.md §1.2), whose leak 1 - rho_l*Lt keeps |1 - rho_l*Lt| <= 1 there; above it
#: the skip connection amplifies X by |1 - rho_l*Lt| > 1 at every such layer, and training runs overflow.
STABLE_RHO_LT = 2.0


class StepOvershootWarning(UserWarning):
    """Some rho_l * Lt > 1: the skip connection 1 - rho_l*Lt of that layer is negative."""


# Layers per chunk are picked so that one chunk of float64 temporaries holds at most this many numbers.
_CHUNK_NUMEL = 1 << 22


def check_depth(L, name="L"):
    """Returns L as an int, or raises: L must be a positive integer (the number of layers)."""
    if not isinstance(L, bool):
        try:
            L = operator.index(L)  # NumPy and 0-d integer tensors too
        except TypeError:
            pass
    return check.integer(L, name, low=1, what="the number of layers")


def check_irregularity(a, name="a"):
    """Returns a as a float, or raises: the irregular-scheme parameter must be a real number in [0, 1)."""
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError("%s must be a real number in [0, 1) (the irregular-step parameter), got %r" % (name, a))
    a = float(a)
    if not (0.0 <= a < 1.0):  # also rejects NaN
        raise ValueError("%s must be in [0, 1) (the irregular-step parameter), got %r" % (name, a))
    return a


def check_scheme(scheme, allowed=SCHEMES, name="scheme"):
    """Returns scheme, or raises naming the allowed schemes."""
    if not isinstance(scheme, str) or scheme not in allowed:
        hint = ""
        if scheme == "adaptive" and "adaptive" not in allowed:
            hint = ("; adaptive steps depend on the representations: start from 'equidistant' and update "
                    "them with adaptive_step_sizes(xs, rho) (LeakyResNet(steps='adaptive') does this)")
        raise ValueError("%s must be one of %s, got %r%s"
                         % (name, ", ".join(repr(s) for s in allowed), scheme, hint))
    return scheme


def step_sizes(L, scheme="equidistant", a=0.0, *, dtype=None, device=None):
    """The layer steps rho [L] of a fixed scheme; they are positive and sum to 1.

    - ``"equidistant"``: rho_l = 1/L.
    - ``"irregular"``: rho_l ∝ 1 + a*(1/4 - |l/L - 1/2|) for l = 1..L, normalised to sum 1: small
      steps near the input and the output, large ones in the middle. ``a`` in [0, 1) (a = 0 is
      equidistant); the weights lie in [1 - a/4, 1 + a/4], so every step is positive.

    ``a`` is only used by the irregular scheme; a non-zero ``a`` with another scheme is an error.
    Computed in float64 and returned as ``dtype`` (a floating dtype; default: torch's default dtype)
    on ``device``.
    """
    L = check_depth(L)
    if dtype is not None:
        check.float_dtype(dtype)
    device = check.device(device)
    scheme = check_scheme(scheme)
    a = check_irregularity(a)
    if scheme != "irregular" and a != 0.0:
        raise ValueError("a = %r is the irregular-scheme parameter but scheme = %r; pass a = 0 or use "
                         "scheme = 'irregular'" % (a, scheme))
    if scheme == "equidistant":
        weights = torch.ones(L, dtype=torch.float64)
    else:
        p = torch.arange(1, L + 1, dtype=torch.float64) / L
        weights = 1.0 + a * (0.25 - (p - 0.5).abs())
    rho = weights / weights.sum()
    return rho.to(dtype=dtype if dtype is not None else torch.get_default_dtype(), device=device)


def _check_xs(xs, L=None):
    check.tensor(xs, "xs", "[L+1, N, w] of every representation X_0..X_L")
    check.float_dtype(xs.dtype, "xs's dtype")
    if xs.dim() != 3 or xs.shape[0] < 2:
        raise ValueError("xs must be [L+1, N, w] with L >= 1 (every representation X_0..X_L), got shape %s"
                         % (tuple(xs.shape),))
    if L is not None and xs.shape[0] != L + 1:
        raise ValueError("xs must be [L+1, N, w] = [%d, N, w] to match rho [L] = [%d], got shape %s"
                         % (L + 1, L, tuple(xs.shape)))


def _check_rho(rho):
    check.tensor(rho, "rho", "[L] of the current layer steps")
    if rho.dim() != 1 or rho.numel() < 1:
        raise ValueError("rho must be a 1-d tensor [L] of the current layer steps, got shape %s" % (tuple(rho.shape),))
    check.float_dtype(rho.dtype, "rho's dtype")
    r = rho.detach()
    if not bool(torch.isfinite(r).all()) or not bool((r > 0).all()):
        raise ValueError("rho must hold finite positive steps rho_l > 0, got %s" % (r.tolist(),))


def adaptive_statistics(xs):
    """Per-layer sums of squares that the adaptive update needs: [2, L] float64 on xs's device.

    xs: [L+1, N, w], the representations X_0..X_L of one batch (rows are samples).
    Row 0 holds ||X_l - X_{l-1}||_F^2, row 1 holds ||X_l||_F^2, for l = 1..L.

    These are plain sums over the batch rows, so under data parallelism (each rank holding a shard
    of the batch) the full-batch statistics are the sum over ranks: all-reduce (SUM) this tensor,
    then form the steps with :func:`steps_from_statistics`. The square roots are taken only after
    the reduction (reducing the norms themselves, or the c_l, would be wrong). Computed without
    autograd, in float64, a chunk of layers at a time.
    """
    _check_xs(xs)
    xs = xs.detach()
    L, N, w = xs.shape[0] - 1, xs.shape[1], xs.shape[2]
    stats = torch.empty(2, L, dtype=torch.float64, device=xs.device)
    chunk = max(1, _CHUNK_NUMEL // max(1, N * w))
    with torch.no_grad():
        for i in range(0, L, chunk):
            j = min(L, i + chunk)
            nxt = xs[i + 1:j + 1].to(torch.float64)
            prev = xs[i:j].to(torch.float64)
            stats[0, i:j] = (nxt - prev).square().sum(dim=(1, 2))
            stats[1, i:j] = nxt.square().sum(dim=(1, 2))
    return stats


def steps_from_statistics(stats, rho, *, eps=1e-8):
    """The adaptive steps from (already all-reduced) statistics: [2, L] and rho [L] -> new rho [L].

    With ||X_l - X_{l-1}|| = sqrt(stats[0, l]) and ||X_l|| = sqrt(stats[1, l]):
    c_l = ||X_l - X_{l-1}|| / (rho_l ||X_l||) (the relative speed of the representation per unit
    depth p), then rho_l <- c_l^{-1} / sum_i c_i^{-1}.

    Degenerate layers (documented behaviour; the result never holds NaN or zero steps):

    - a layer is *degenerate* when its statistics are not finite, when ||X_l|| <= eps * max_i ||X_i||
      (a zero representation: c_l is infinite or 0/0), or when ||X_l - X_{l-1}|| <= eps * ||X_l||
      (the layer does not move its representation: c_l = 0, an infinite step);
    - degenerate layers get the geometric mean of the other layers' c_l, i.e. a neutral step;
    - when every layer is degenerate (for instance a network whose representations are all zero)
      there is nothing to adapt to: rho is returned unchanged (renormalised to sum 1) with a
      RuntimeWarning;
    - with L = 1 the only normalised step is rho = [1], returned whatever the statistics.

    Returned in rho's dtype and on rho's device.
    """
    _check_rho(rho)
    L = rho.numel()
    if not isinstance(stats, torch.Tensor) or tuple(stats.shape) != (2, L):
        got = tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError("stats must be [2, L] = [2, %d] (from adaptive_statistics), got %s" % (L, got))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= float(eps) < 1.0):
        raise ValueError("eps must be a real number in [0, 1), got %r" % (eps,))
    r = rho.detach().to(device=stats.device, dtype=torch.float64)
    if L == 1:
        return torch.ones_like(rho)
    stats = stats.detach().to(torch.float64)
    norm_d = stats[0].clamp_min(0.0).sqrt()
    norm_x = stats[1].clamp_min(0.0).sqrt()
    finite = torch.isfinite(norm_d) & torch.isfinite(norm_x)
    x_max = torch.where(finite, norm_x, torch.zeros_like(norm_x)).max()
    valid = finite & (norm_x > eps * x_max) & (norm_x > 0) & (norm_d > eps * norm_x)
    if not bool(valid.any()):
        warnings.warn("adaptive steps: every layer's statistics are degenerate (zero or non-finite "
                      "representations, or layers that do not move them); rho is left unchanged",
                      RuntimeWarning, stacklevel=2)
        return (r / r.sum()).to(dtype=rho.dtype, device=rho.device)
    ones = torch.ones_like(norm_x)
    # log c_l = log ||dX_l|| - log rho_l - log ||X_l||, computed on valid layers only.
    log_c = torch.where(valid, norm_d, ones).log() - r.log() - torch.where(valid, norm_x, ones).log()
    neutral = log_c[valid].mean()
    log_c = torch.where(valid, log_c, neutral)
    # rho_l ∝ 1/c_l; shifting by the smallest log c_l keeps exp() in range.
    inv_c = torch.exp(-(log_c - log_c.min()))
    new = inv_c / inv_c.sum()
    return new.to(dtype=rho.dtype, device=rho.device)


def adaptive_step_sizes(xs, rho, *, eps=1e-8, reduce=None):
    """One adaptive update of the layer steps from the representations of a batch.

    xs: [L+1, N, w] (X_0..X_L, e.g. ``LeakyResNet.representations(x)``), rho: [L] the current steps.
    Returns the new steps [L] (rho's dtype and device), positive and summing to 1:
    c_l = ||X_l - X_{l-1}|| / (rho_l ||X_l||), rho_l <- c_l^{-1} / sum_i c_i^{-1}.
    Degenerate cases (zero representations, layers that do not move, L = 1) are handled as
    documented in :func:`steps_from_statistics`; ``eps`` is the relative threshold used there.

    ``reduce``: optional callable applied to the [2, L] float64 statistics (sums of squares from
    :func:`adaptive_statistics`) before the c_l are formed. Under data parallelism every rank must
    sum them over ranks, or the ranks' steps diverge; ``torch.distributed.all_reduce`` can be passed
    as is (it reduces in place and its return value is ignored when it is not a tensor), or any
    ``f(t) -> t`` that returns the summed tensor.
    """
    _check_rho(rho)
    _check_xs(xs, rho.numel())
    if reduce is not None and not callable(reduce):
        check.fail(TypeError, "reduce", "None or a callable that sums the [2, L] statistics over ranks", repr(reduce))
    stats = adaptive_statistics(xs)
    if reduce is not None:
        out = reduce(stats)
        if isinstance(out, torch.Tensor):
            stats = out
    return steps_from_statistics(stats, rho, eps=eps)


def rho_Lt_violations(rho, Lt):
    """Indices l (0-based) with rho_l * Lt > 1, where the skip connection changes sign."""
    r = rho.detach().to(torch.float64).cpu()
    return [int(i) for i in torch.nonzero(r * float(Lt) > 1.0).flatten()]


def warn_if_overshoot(rho, Lt, *, where, stacklevel=3):
    """Warns (a :class:`StepOvershootWarning`, not an error) when some rho_l * Lt > 1 (docs/DESIGN.md §1)."""
    bad = rho_Lt_violations(rho, Lt)
    if bad:
        worst = float(rho.detach().to(torch.float64).max()) * float(Lt)
        shown = bad if len(bad) <= 8 else bad[:8] + ["..."]
        warnings.warn("%s: rho_l * Lt > 1 at %d layer(s) %s (max rho_l * Lt = %.4g, Lt = %g): the skip "
                      "connection 1 - rho_l*Lt is negative there. Use more layers (depth >= %d for "
                      "equidistant steps) or a smaller effective_depth."
                      % (where, len(bad), shown, worst, float(Lt), max(1, math.ceil(float(Lt)))),
                      StepOvershootWarning, stacklevel=stacklevel)
    return bad
