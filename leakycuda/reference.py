"""Plain-PyTorch definition of every leakycuda op: the reference tests and benchmarks compare against."""
import torch


def sigma(X, bias=True):
    """sigma(X) = [relu(X), 1]: [..., N, w] -> [..., N, w+1] (or relu(X) alone when bias=False)."""
    R = torch.relu(X)
    if not bias:
        return R
    return torch.cat([R, torch.ones_like(X[..., :1])], dim=-1)


def leaky_layer(x, W_l, rho_l, Lt):
    """One leaky residual layer: (1 - rho_l*Lt) x + rho_l * sigma(x) @ W_l^T; x [N, w], W_l [w, w+1]."""
    return (1 - rho_l * Lt) * x + rho_l * (sigma(x) @ W_l.transpose(-1, -2))


def leaky_stack(x0, W, rho, Lt, *, return_all=False):
    """The stack of L leaky layers: x0 [N, w], W [L, w, w+1], rho [L] -> X_L [N, w] or all [L+1, N, w]."""
    xs = [x0]
    for l in range(W.shape[0]):
        xs.append(leaky_layer(xs[-1], W[l], rho[l], Lt))
    return torch.stack(xs) if return_all else xs[-1]
