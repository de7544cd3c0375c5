"""The fully-connected limit (rho_l * Lt = 1) of the leaky stack: deep linear networks through the op, their regression
tasks and the closed-form Schatten-2/L minimizer; deep ReLU nets."""
import math

from torch import nn
import torch

from .. import _validate as check
from ..functional import leaky_stack
from ..module import LeakyResNet, _check_factory, _check_input, _check_lam

__all__ = ["DeepLinear", "entropy_rank", "fully_connected_resnet", "fully_connected_steps", "low_rank_regression",
           "numerical_rank", "schatten_minimizer", "schatten_thresholds"]


def fully_connected_steps(L, *, dtype=torch.float32, device=None):
    """(rho [L], Lt) with rho_l = 1/L and Lt = 1/rho_l: every layer has rho_l * Lt = 1, so the skip term
    (1 - rho_l Lt) X_{l-1} vanishes and layer l is the dense layer X_l = rho_l sigma(X_{l-1}) W_l^T.

    rho_l is 1/L rounded to ``dtype`` (float32 rounds 1/3 up); Lt is the largest float64 with rho_l * Lt <= 1,
    so Lt = L up to rounding and no layer overshoots (no warning from LeakyResNet).
    """
    rho = torch.full((L,), 1.0 / L, dtype=dtype, device=device)
    r = float(rho[0])
    Lt = 1.0 / r
    while r * Lt > 1.0:
        Lt = math.nextafter(Lt, 0.0)
    return rho, Lt


class DeepLinear(nn.Module):
    """A deep linear network x -> x A^T, A = P_out M_L ... M_1 P_in, run through ``leaky_stack``.

    x: [N, d_in] -> [N, d_out]; the layers M_l are ``layers`` [L, w, w] (the only parameter). The input is
    zero-padded to the width w (P_in = [I; 0]) and the output is the first d_out coordinates (P_out = [I, 0]);
    d_in = d_out = w (the default) is the plain square network. The stack runs with ``activation="linear"``
    (sigma(X) = [X, 1]), rho_l = 1/L, Lt = L (rho_l * Lt = 1, :func:`fully_connected_steps`) and
    W_l = [M_l / rho_l | 0], so layer l computes X_l = (1 - rho_l Lt) X_{l-1} + rho_l [X_{l-1}, 1] W_l^T =
    X_{l-1} M_l^T. The bias column of W is held at zero (a deep linear network is linear, not affine): it is built
    as zeros in :meth:`stack_weight` and is not a parameter, so no optimiser moves it.

    ``regularization(lam)`` = lam/2 sum_l ||M_l||_F^2, which equals LeakyResNet's lam/(2 Lt) sum_l rho_l ||W_l||_F^2
    at rho_l * Lt = 1. :meth:`end_to_end` gives A [d_out, d_in] by running the op on the identity.

    init: "orthogonal" (M_l = scale * Q_l with Haar-random orthogonal Q_l) or "gaussian" (entries of M_l i.i.d.
    N(0, scale^2 / w): singular values of order scale). ``generator``: a CPU ``torch.Generator`` for reproducible
    draws. float32 or float64, on the op's devices.
    """

    INITS = ("orthogonal", "gaussian")

    def __init__(self, width, depth, *, in_features=None, out_features=None, init="orthogonal", scale=1.0,
                 generator=None, device=None, dtype=None):
        super().__init__()
        _check_factory(device, dtype)
        self.width = check.integer(width, "width", low=1, what="w, the width of every layer")
        self.depth = check.integer(depth, "depth", low=1, what="L, the number of layers")
        w, L = self.width, self.depth
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if value is not None and check.integer(value, name, low=1) > w:
                check.fail(ValueError, name, "an integer in [1, width] = [1, %d], or None for width" % w, repr(value))
        self.in_features = w if in_features is None else int(in_features)
        self.out_features = w if out_features is None else int(out_features)
        check.choice(init, "init", self.INITS)
        scale = check.real(scale, "scale", low=0.0, strict=True, what="the scale of the layers' singular values")
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            check.fail(TypeError, "generator", "None or a CPU torch.Generator", repr(generator))
        G = torch.randn(L, w, w, generator=generator, dtype=torch.float64)
        if init == "orthogonal":
            Q, R = torch.linalg.qr(G)
            G = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]  # Haar: fix the signs of R's diagonal
        else:
            G = G / math.sqrt(w)
        self.layers = nn.Parameter((scale * G).to(device=device, dtype=dtype))
        rho, self.Lt = fully_connected_steps(L, dtype=self.layers.dtype, device=self.layers.device)
        self.register_buffer("rho", rho)

    def stack_weight(self):
        """The op's weights W [L, w, w+1] = [M_l / rho_l | 0] (differentiable in ``layers``)."""
        V = self.layers / self.rho[:, None, None]
        return torch.cat([V, torch.zeros_like(V[..., :1])], dim=-1)

    def forward(self, x, *, return_all=False):
        """x: [N, d_in] -> x A^T [N, d_out]; with ``return_all``, every X_0..X_L [L+1, N, w] (padded width)."""
        d = self.in_features
        _check_input(x, self.layers, "[N, in_features] = [N, %d]" % d, lambda x: x.dim() == 2 and x.shape[1] == d)
        x0 = torch.nn.functional.pad(x, (0, self.width - self.in_features))
        xs = leaky_stack(x0, self.stack_weight(), self.rho, self.Lt, return_all=return_all, activation="linear")
        return xs if return_all else xs[..., : self.out_features]

    def end_to_end(self):
        """A [d_out, d_in], through the op: the network maps the identity I_{d_in} to the rows of A^T."""
        eye = torch.eye(self.in_features, dtype=self.layers.dtype, device=self.layers.device)
        return self(eye).transpose(0, 1)

    def regularization(self, lam):
        """lam/2 * sum_l ||M_l||_F^2 (a 0-d tensor); lam >= 0."""
        return 0.5 * _check_lam(lam) * self.layers.square().sum()


def low_rank_regression(d, spectrum, n, *, noise=0.0, seed=0, dtype=torch.float64, device=None):
    """A whitened linear regression task with a low-rank teacher: y = A* x + noise.

    Inputs X [n, d] (n >= d) are whitened exactly: X^T X / n = I_d. A* = U diag(spectrum) V^T [d, d] with Haar-random
    U, V (rank = len(spectrum) <= d); Y = X A*^T + noise * Z, Z standard Gaussian. For every A,
    (1/n) ||X A^T - Y||_F^2 = ||A - B||_F^2 + const with B = Y^T X / n (the least-squares map). Everything is drawn in
    float64 on the CPU from a generator seeded with ``seed`` and then cast.
    Returns a dict: x [n, d], y [n, d], A_star [d, d], B [d, d].
    """
    spectrum = torch.as_tensor(spectrum, dtype=torch.float64)
    r = spectrum.numel()
    if not 1 <= r <= d or n < d:
        raise ValueError("need 1 <= len(spectrum) <= d <= n, got len(spectrum) = %d, d = %d, n = %d" % (r, d, n))
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    A_star = U[:, :r] @ torch.diag(spectrum) @ V[:, :r].T
    x = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0] * math.sqrt(n)
    y = x @ A_star.T + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
    B = y.T @ x / n
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return {"x": cast(x), "y": cast(y), "A_star": cast(A_star), "B": cast(B)}


def schatten_thresholds(lam, L):
    """(b_exist, b_star) of the scalar problem min_{s >= 0} (s - b)^2 + (lam L / 2) s^(2/L), L >= 1.

    b_star: the singular value of B above which the global minimizer is non-zero; b_exist <= b_star: the one above
    which a non-zero local minimizer exists. L = 1: both 0 (ridge never zeroes); L = 2: both lam/2 (soft threshold);
    L >= 3, with p = 2/L, c = lam L / 2, k = lam / 2, s0 = (k (1-p))^(1/(2-p)):
    b_exist = s0 (2-p)/(1-p) and b_star = (2-p)/(2(1-p)) * (c (1-p))^(1/(2-p)). lam >= 0, L an integer >= 1.
    """
    lam, L = _check_schatten(lam, L)
    if L == 1:
        return 0.0, 0.0
    if L == 2:
        return lam / 2, lam / 2
    p, c, k = 2.0 / L, lam * L / 2.0, lam / 2.0
    s0 = (k * (1 - p)) ** (1 / (2 - p))
    return s0 * (2 - p) / (1 - p), (2 - p) / (2 * (1 - p)) * (c * (1 - p)) ** (1 / (2 - p))


def _check_schatten(lam, L):
    """The weight decay lam >= 0 and the depth L >= 1 of the Schatten-2/L problem."""
    return (check.real(lam, "lam", low=0.0, what="the weight decay"),
            check.integer(L, "L", low=1, what="the depth, the number of layers"))


def _scalar_minimizer(b, lam, L, branch):
    """s(b) for b [k] >= 0 (float64): the global minimizer (branch "global") or the largest local minimizer
    ("largest") of (s - b)^2 + (lam L / 2) s^(2/L) over s >= 0."""
    if lam == 0.0:  # no penalty: s = b (the bisection below would meet 0 * inf at s0 = 0)
        return b.clone()
    if L == 1:
        return b / (1 + lam / 2)
    if L == 2:
        return (b - lam / 2).clamp_min(0.0)
    # Non-zero stationary points solve g(s) = s + (lam/2) s^(p-1) = b; g is convex with its minimum at s0, so the
    # larger root lies in [s0, b] when b >= g(s0) and is the local minimizer. Bisection to float64 resolution.
    p, k = 2.0 / L, lam / 2.0
    s0 = (k * (1 - p)) ** (1 / (2 - p))
    g = lambda s: s + k * s ** (p - 1)  # noqa: E731
    exists = b >= g(torch.tensor(s0, dtype=b.dtype))
    lo, hi = torch.full_like(b, s0), torch.maximum(b, torch.full_like(b, s0))
    for _ in range(200):
        mid = (lo + hi) / 2
        below = g(mid) < b
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    s = torch.where(exists, (lo + hi) / 2, torch.zeros_like(b))
    if branch == "largest":
        return s
    f = (s - b).square() + (lam * L / 2) * s ** p
    return torch.where(f < b.square(), s, torch.zeros_like(b))


def schatten_minimizer(B, lam, L, *, branch="global"):
    """The end-to-end matrix an L2-regularized deep linear network of depth L converges to on a whitened regression.

    Problem. With whitened inputs the loss (1/n) ||X A^T - Y||_F^2 + lam/2 sum_l ||M_l||_F^2, A = M_L ... M_1, is
    ||A - B||_F^2 + lam/2 sum_l ||M_l||_F^2 + const (B: :func:`low_rank_regression`). Over all factorizations of a
    given A, sum_l ||M_l||_F^2 >= L sum_i s_i(A)^(2/L) = L ||A||_{S_{2/L}}^{2/L} (AM-GM on the singular values,
    equality for balanced factors M_l = U_l diag(s^(1/L)) U_{l-1}^T), so in A the problem is
        min_A ||A - B||_F^2 + (lam L / 2) sum_i s_i(A)^(2/L),
    the Schatten-2/L quasi-norm penalty. By von Neumann's trace inequality a minimizer shares B's singular vectors,
    so the problem separates over the singular values b_i of B into min_{s >= 0} (s - b_i)^2 + (lam L / 2) s^(2/L):
    L = 1: s = b / (1 + lam/2) (ridge shrinkage, no zeros); L = 2: s = max(b - lam/2, 0) (soft threshold, the
    nuclear norm); L >= 3: s = 0 below the threshold b_star of :func:`schatten_thresholds`, which grows with L, and
    above it the larger root of s + (lam/2) s^(2/L - 1) = b (a jump: hard-threshold-like). Depth raises the
    threshold, so the minimizer's rank falls with L.

    branch: "global" gives the global minimizer; "largest" the non-zero local minimizer wherever one exists
    (b >= b_exist), which is where gradient descent from singular values above it stops: for b in [b_exist, b_star)
    it keeps a singular value the global minimizer sets to zero. B: [d, d'] (float64 recommended). Returns A [d, d'].
    """
    check.matrix(B, "B", rows_name="d", cols_name="d'")
    if not B.is_floating_point():
        check.fail(TypeError, "B", "a real floating tensor (float64 recommended)", str(B.dtype))
    check.finite(B, "B", "the singular values of NaN or inf are undefined")
    lam, L = _check_schatten(lam, L)
    check.choice(branch, "branch", ("global", "largest"))
    U, b, Vh = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    s = _scalar_minimizer(b, lam, L, branch)
    return (U * s) @ Vh


def numerical_rank(s, rtol=1e-3):
    """The number of singular values s [k] above rtol * max(s)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0


def entropy_rank(s):
    """The effective rank exp(H(p)), p_i = s_i / sum s (Roy & Vetterli 2007): a continuous count of the s [k]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def fully_connected_resnet(d_in, d_out, width, L, *, generator=None, device=None, dtype=None):
    """A LeakyResNet in the fully-connected limit (rho_l * Lt = 1): a dense ReLU net of L layers with fixed random
    projections, X_l = sigma(X_{l-1}) M_l^T with M_l = W_l / L, He-initialised in M (V_l = L * N(0, 2/w), b_l = 0).
    Its regularization lam/(2 Lt) sum_l rho_l ||W_l||_F^2 is lam/2 sum_l ||M_l||_F^2."""
    rho, Lt = fully_connected_steps(L, dtype=dtype or torch.get_default_dtype(), device=device)
    model = LeakyResNet(d_in, d_out, width, L, Lt, learn_projections=False, device=device, dtype=dtype)
    V = torch.randn(L, width, width, generator=generator, dtype=torch.float64) * (L * math.sqrt(2.0 / width))
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, :, :width].copy_(V)
    return model
