"""Plain-PyTorch definition of every leakycuda op: the reference tests and benchmarks compare against."""
import torch


def sigma(X, bias=True, activation="relu"):
    """sigma(X) = [act(X), 1]: [..., N, w] -> [..., N, w+1] (or act(X) alone when bias=False);
    act is relu (activation="relu") or the identity ("linear")."""
    if activation not in ("relu", "linear"):
        raise ValueError('activation must be "relu" or "linear", got %r' % (activation,))
    R = torch.relu(X) if activation == "relu" else X
    if not bias:
        return R
    return torch.cat([R, torch.ones_like(X[..., :1])], dim=-1)


def leaky_layer(x, W_l, rho_l, Lt, *, activation="relu"):
    """One leaky residual layer: (1 - rho_l*Lt) x + rho_l * sigma(x) @ W_l^T; x [N, w], W_l [w, w+1]."""
    return (1 - rho_l * Lt) * x + rho_l * (sigma(x, activation=activation) @ W_l.transpose(-1, -2))


def leaky_stack(x0, W, rho, Lt, *, return_all=False, activation="relu"):
    """The stack of L leaky layers: x0 [N, w], W [L, w, w+1], rho [L] -> X_L [N, w] or all [L+1, N, w].

    B models (W [B, L, w, w+1]): x0 [B, N, w], rho [B, L], Lt a float or one per model ([B]); model
    b's stack runs on x0[b] -> [B, N, w] or [B, L+1, N, w].
    """
    if W.dim() == 4:
        Lts = Lt if isinstance(Lt, (torch.Tensor, list, tuple)) else [Lt] * W.shape[0]
        return torch.stack([leaky_stack(x0[b], W[b], rho[b], float(Lts[b]), return_all=return_all,
                                        activation=activation) for b in range(W.shape[0])])
    xs = [x0]
    for l in range(W.shape[0]):
        xs.append(leaky_layer(xs[-1], W[l], rho[l], Lt, activation=activation))
    return torch.stack(xs) if return_all else xs[-1]


# --- Cost of Identity, K-norms, energies (docs/DESIGN.md §1) ---------------------------------------


def gamma_policy(X, gamma0, bias=True, activation="relu"):
    """The layer-relative ridge gamma0 * ||sigma(X)||_op^2 of X [..., N, w] -> [...], detached (held fixed)."""
    S = sigma(X.detach(), bias, activation)
    if S.shape[-2] == 0:
        return S.new_zeros(S.shape[:-2])
    return gamma0 * torch.linalg.matrix_norm(S, ord=2).square()


def k_norm2(M, X, gamma, *, bias=True, activation="relu"):
    """||M||^2_{K,gamma} = Tr[M^T (S S^T + gamma I)^{-1} M], S = sigma(X): M [..., N, m], X [..., N, w] -> [...].

    Ridge form: with Z = (S^T S + gamma I)^{-1} S^T M (or S^T (S S^T + gamma I)^{-1} M when N < p),
    the value is ||M - S Z||_F^2 / gamma + ||Z||_F^2. gamma > 0: a number or a tensor broadcastable to [...].
    """
    S = sigma(X, bias, activation)
    N, p = S.shape[-2], S.shape[-1]
    gamma = torch.as_tensor(gamma, dtype=S.dtype, device=S.device)
    g = torch.broadcast_to(gamma, S.shape[:-2])[..., None, None]
    St = S.transpose(-1, -2)
    if N >= p:
        Z = torch.linalg.solve(St @ S + g * torch.eye(p, dtype=S.dtype, device=S.device), St @ M)
    else:
        Z = St @ torch.linalg.solve(S @ St + g * torch.eye(N, dtype=S.dtype, device=S.device), M)
    R = M - S @ Z
    return R.square().sum((-2, -1)) / g[..., 0, 0] + Z.square().sum((-2, -1))


def cost_of_identity_exact(X, *, bias=True, rcond=None, activation="relu"):
    """Exact COI ||S^+ X||_F^2 and residual ||S S^+ X - X||_F of X [..., N, w] -> ([...], [...]).

    Singular values of S below rcond * sigma_max are dropped (default rcond = max(N, p) * eps(X.dtype)).
    """
    S = sigma(X, bias, activation)
    if rcond is None:
        rcond = max(S.shape[-2], S.shape[-1]) * torch.finfo(X.dtype).eps
    U, s, _ = torch.linalg.svd(S, full_matrices=False)
    keep = s > rcond * s[..., :1]
    Y = U.transpose(-1, -2) @ X * keep[..., None]
    inv2 = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)).square(), torch.zeros_like(s))
    value = (Y.square().sum(-1) * inv2).sum(-1)
    residual = torch.linalg.vector_norm(X - U @ Y, dim=(-2, -1))
    return value, residual


def cost_of_identity(X, gamma=None, *, gamma0=None, bias=True, activation="relu"):
    """COI_gamma(X) = ||X||^2_{K(X),gamma} (gamma > 0, or gamma0 * ||sigma(X)||_op^2 held fixed);
    with gamma None/0 and no gamma0, the exact (value, residual) of :func:`cost_of_identity_exact`."""
    if gamma0 is not None:
        gamma = gamma_policy(X, gamma0, bias, activation)
    elif gamma is None or (not isinstance(gamma, torch.Tensor) and gamma == 0):
        return cost_of_identity_exact(X, bias=bias, activation=activation)
    return k_norm2(X, X, gamma, bias=bias, activation=activation)


def energies(xs, rho, Lt, *, gamma=None, gamma0=None, bias=True, activation="relu"):
    """Per-layer (coi, kinetic, potential, hamiltonian, rank_estimate), each [L], of a trajectory
    xs [L+1, N, w]: metric from X_{l-1}, D_l = (X_l - X_{l-1}) / rho_l, Lt != 0."""
    X, D = xs[:-1], (xs[1:] - xs[:-1]) / rho[:, None, None]
    if gamma0 is not None:
        gamma = gamma_policy(X, gamma0, bias, activation)
    coi = k_norm2(X, X, gamma, bias=bias, activation=activation)
    kinetic = k_norm2(D, X, gamma, bias=bias, activation=activation) / (2 * Lt)
    potential = -(Lt / 2) * coi
    hamiltonian = kinetic + potential
    return coi, kinetic, potential, hamiltonian, -2 * hamiltonian / Lt
