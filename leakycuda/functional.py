"""Functional API of the leaky residual layer and stack (docs/DESIGN.md §3); the ops run on CPU or CUDA alike."""
import math
import numbers

import torch

from . import _validate as check
from ._ops import ops


def _as_Lt(Lt):
    if isinstance(Lt, (torch.Tensor, list, tuple)) and (not isinstance(Lt, torch.Tensor) or Lt.numel() != 1):
        raise ValueError("Lt must be a single number (the effective depth) for one model; one Lt per model "
                         "needs B models (a 4-D W [B, L, w, w+1]), got %s"
                         % ("a tensor of shape %s" % (tuple(Lt.shape),) if isinstance(Lt, torch.Tensor) else repr(Lt)))
    if isinstance(Lt, torch.Tensor):
        return float(Lt.item())
    if not isinstance(Lt, numbers.Real) or isinstance(Lt, bool):
        raise TypeError("Lt must be a real number (the effective depth), got %r" % (Lt,))
    return float(Lt)


def _as_model_Lt(Lt, like):
    """(Lt, model_Lt) for B models: a number gives (Lt, None); a [B] tensor or sequence gives
    (0.0, the float64 [B] tensor on like's device), whose shape and values the op checks."""
    if isinstance(Lt, torch.Tensor) and Lt.dim() == 0 or isinstance(Lt, numbers.Real):
        return _as_Lt(Lt), None
    if not isinstance(Lt, (torch.Tensor, list, tuple)):
        raise TypeError("Lt must be a real number or one per model (a [B] tensor or sequence), got %r" % (Lt,))
    if isinstance(Lt, torch.Tensor) and (Lt.is_complex() or Lt.dtype == torch.bool):
        raise TypeError("Lt must hold real numbers, got a %s tensor" % (Lt.dtype,))
    model_Lt = torch.as_tensor(Lt.detach() if isinstance(Lt, torch.Tensor) else Lt, dtype=torch.float64,
                               device=like.device)
    if model_Lt.dim() != 1:
        raise ValueError("Lt must be a real number or one per model, [B], got shape %s" % (tuple(model_Lt.shape),))
    return 0.0, model_Lt


def checkpoint_interval(L, checkpoint):
    """The interval k between saved representations: None -> 1 (save all), "sqrt" -> ceil(sqrt(L)), int k >= 1."""
    if checkpoint is None:
        return 1
    if isinstance(checkpoint, str):
        if checkpoint != "sqrt":
            raise ValueError('checkpoint must be None, "sqrt" or an interval k >= 1, got %r' % (checkpoint,))
        return max(1, math.ceil(math.sqrt(L)))
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, numbers.Integral) or checkpoint < 1:
        raise ValueError('checkpoint must be None, "sqrt" or an interval k >= 1, got %r' % (checkpoint,))
    return int(checkpoint)


ACTIVATIONS = ("relu", "linear")


def check_activation(activation):
    """The activation of sigma: "relu" (sigma(X) = [relu(X), 1]) or "linear" (sigma(X) = [X, 1])."""
    if not isinstance(activation, str):
        raise TypeError('activation must be "relu" or "linear", got %r' % (activation,))
    if activation not in ACTIVATIONS:
        raise ValueError('activation must be "relu" or "linear", got %r' % (activation,))
    return activation


def _check_tensor(t, name, shape_hint):
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s must be a tensor %s, got %s" % (name, shape_hint, type(t).__name__))


def leaky_stack(x0, W, rho, Lt, *, return_all=False, checkpoint=None, activation="relu"):
    """Runs the whole stack X_l = (1 - rho_l*Lt) X_{l-1} + rho_l * sigma(X_{l-1}) @ W_l^T, l = 1..L.

    One model: x0 [N, w] (or [*batch, w]), W [L, w, w+1] (W_l = [V_l | b_l]), rho [L] (a tensor of
    x0's dtype and device, or a sequence of numbers), Lt the effective depth (a float).
    Returns X_L [N, w], or every representation [L+1, N, w] when ``return_all``.

    B models in one call (a 4-D W says so): x0 [B, N, w] (or [B, *batch, w]), W [B, L, w, w+1],
    rho [B, L], Lt a float (every model) or one per model (a [B] tensor or sequence); returns
    [B, N, w] or [B, L+1, N, w], equal to B separate calls. Models of different depth batch by
    padding: a layer with rho_l = 0 is the identity (X_l = X_{l-1}; its W_l gets a zero gradient),
    so pad the shallower models' rho with zeros (and W with anything finite) up to the largest L.

    ``checkpoint``: None saves every representation for backward; an int k saves every k-th and
    recomputes the segments in backward; "sqrt" picks k = ceil(sqrt(L)).
    ``activation``: "relu" (sigma(X) = [relu(X), 1]) or "linear" (sigma(X) = [X, 1]: a deep linear
    network when rho_l * Lt = 1).
    float32 and float64 on CPU (plus float16/bfloat16 on CUDA); differentiable in x0, W and rho (not
    in Lt). NaN and inf propagate as in :func:`leakycuda.reference.leaky_stack`; rho and Lt must be
    finite, rho >= 0.
    """
    _check_tensor(x0, "x0", "[N, w]")
    _check_tensor(W, "W", "[L, w, w+1]")
    check_activation(activation)
    rho = check.reals(rho, "rho", "a tensor [L] ([B, L] for B models) or a list of numbers (the layer steps)",
                      like=x0)
    models = W.dim() == 4
    k = checkpoint_interval(W.shape[-3] if W.dim() >= 3 else 0, checkpoint)
    if models:
        Lt, model_Lt = _as_model_Lt(Lt, x0)
    else:
        Lt, model_Lt = _as_Lt(Lt), None
    # Extra batch dims of x0 (after the model dim, if any) are flattened into N and restored.
    lead = 1 if models else 0
    batch = x0.shape[lead:-1]
    flat = x0.dim() > lead + 2 or (not models and x0.dim() == 1)
    if flat:
        x0 = x0.reshape(x0.shape[:lead] + (-1, x0.shape[-1]))
    out, _ = ops.leaky_stack(x0, W, rho, Lt, bool(return_all), k, activation, model_Lt)
    if flat:
        out = out.reshape(out.shape[:-2] + batch + out.shape[-1:])
    return out


def leaky_layer(x, W_l, rho_l, Lt, *, activation="relu"):
    """One leaky residual layer: (1 - rho_l*Lt) x + rho_l * sigma(x) @ W_l^T.

    x: [N, w] (or [*batch, w]), W_l: [w, w+1] (last column the bias), rho_l: a number or 0-d tensor,
    Lt: the effective depth, ``activation``: "relu" or "linear" (as in :func:`leaky_stack`).
    Returns [N, w] (x's shape); differentiable in x, W_l and rho_l.
    """
    _check_tensor(x, "x", "[N, w]")
    _check_tensor(W_l, "W_l", "[w, w+1]")
    check_activation(activation)
    rho_l = check.reals(rho_l, "rho_l", "a number or a 0-d tensor (the layer step)", like=x)
    shape = x.shape
    flat = x.dim() != 2 and x.dim() > 0
    if flat:
        x = x.reshape(-1, x.shape[-1])
    out = ops.leaky_layer(x, W_l, rho_l, _as_Lt(Lt), activation)
    return out.reshape(shape) if flat else out
