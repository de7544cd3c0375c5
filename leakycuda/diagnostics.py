"""Diagnostics of a trained Leaky ResNet (docs/DESIGN.md §1): COI, energies in both forms, stationarity and
convergence, balancedness, spectra (raw, centred, and the weights with the batch mean's direction split off)."""
import dataclasses
import math
import warnings
from typing import NamedTuple

import torch

from . import _json
from . import _validate as check
from . import reference as _ref
# Imported by name: after `from .energies import energies` in __init__, the attribute leakycuda.energies
# is the function, not this module.
from .energies import DEFAULT_GAMMA0, cost_of_identity, energies, stable_rank


@dataclasses.dataclass
class Analysis:
    """Per-representation ([L+1], l = 0..L) and per-layer ([L], l = 1..L) diagnostics; float64 CPU tensors.

    Representations X_l:
      coi_exact, coi_residual, coi_rank (of sigma(X_l)), coi_infinite (residual > sqrt(eps) ||X_l||:
      the theory's COI is then +inf), coi_gamma (stable, gamma = gamma0 ||sigma(X_l)||_op^2), gamma,
      stable_rank (||X_l||_*^2 / ||X_l||_F^2), hamiltonian_momentum ((Lt/2)||B_l^T sigma(X_l)||^2 - Lt <B_l, X_l>,
      B_l = -(1/lam) dC/dX_l), rank_estimate_momentum (2 <B_l, X_l> - ||B_l^T sigma(X_l)||^2 = -2H/Lt, defined
      at Lt = 0 too), sv_X ([L+1, min(N, w)] singular values), positions (p_l = rho_1 + ... + rho_l, p_0 = 0),
      sv_X_centred and mean_share (of X_l minus its batch mean; see :func:`centred_spectra`).
    Layers l (metric from X_{l-1}, D_l = (X_l - X_{l-1})/rho_l):
      kinetic, potential, hamiltonian (Lagrangian form), rank_estimate (-2H/Lt), stationarity
      (||W_l - k B_l^T sigma(X_{l-1})||_F / ||W_l||_F, k = Lt, or 1 at Lt = 0), hamiltonian_staggered
      ((Lt/2)||B_l^T sigma(X_{l-1})||^2 - Lt <B_l, X_{l-1}>: the momentum form on the pair (X_{l-1}, B_l) that
      the discrete stack couples, see :func:`momentum_hamiltonian`), rank_estimate_staggered (its -2H/Lt),
      balance_lhs (||W_l||_F^2), balance_rhs (||W_1||^2 + Lt * trapezoid integral of ||b||^2 over p from p_1
      to p_l, b = bias column), sv_W ([L, w] singular values), sv_W_centred and weight_mean (the weights with
      the direction of the layer's mean output split off; see :func:`weight_mean_split`).
    Scalars: Lt, lam, gamma0, data_cost (the MSE C), regularization, balance_gap (max |lhs - rhs| / max lhs),
      and the convergence measures of :class:`Convergence`: grad_norm, stationarity_max, stationarity_total,
      scale_slope.
    """

    Lt: float
    lam: float
    gamma0: float
    data_cost: float
    regularization: float
    positions: torch.Tensor
    coi_exact: torch.Tensor
    coi_residual: torch.Tensor
    coi_rank: torch.Tensor
    coi_infinite: torch.Tensor
    coi_gamma: torch.Tensor
    gamma: torch.Tensor
    stable_rank: torch.Tensor
    hamiltonian_momentum: torch.Tensor
    rank_estimate_momentum: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor
    hamiltonian: torch.Tensor
    rank_estimate: torch.Tensor
    stationarity: torch.Tensor
    balance_lhs: torch.Tensor
    balance_rhs: torch.Tensor
    balance_gap: float
    sv_X: torch.Tensor
    sv_W: torch.Tensor
    hamiltonian_staggered: torch.Tensor
    rank_estimate_staggered: torch.Tensor
    sv_X_centred: torch.Tensor
    mean_share: torch.Tensor
    sv_W_centred: torch.Tensor
    weight_mean: torch.Tensor
    grad_norm: float
    stationarity_max: float
    stationarity_total: float
    scale_slope: float

    @property
    def depth(self):
        return self.kinetic.shape[0]

    def to_dict(self):
        """Plain Python values (lists and floats); non-finite floats become the strings "inf", "-inf", "nan"."""
        return _plain_fields(self)

    def to_json(self, path=None, indent=None):
        """The analysis as strict JSON (see :meth:`to_dict`); also written to ``path`` when given."""
        text = _json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def table(self, max_rows=40):
        """Aligned text, one row per representation l (layer columns blank at l = 0); at most ``max_rows``
        rows, evenly spaced (first and last always), when L+1 is larger."""
        L = self.depth
        cols = [
            ("l", None), ("p_l", self.positions), ("COI", self.coi_exact), ("resid", self.coi_residual),
            ("COI_g", self.coi_gamma), ("srank", self.stable_rank), ("KE", self.kinetic), ("V", self.potential),
            ("H", self.hamiltonian), ("-2H/Lt", self.rank_estimate), ("H_B", self.hamiltonian_momentum),
            ("-2H_B/Lt", self.rank_estimate_momentum), ("-2H_Bs/Lt", self.rank_estimate_staggered),
            ("station", self.stationarity), ("mean", self.mean_share), ("|W|^2", self.balance_lhs),
            ("balance", self.balance_rhs),
        ]
        per_layer = {"KE", "V", "H", "-2H/Lt", "-2H_Bs/Lt", "station", "|W|^2", "balance"}
        if max_rows is None or L + 1 <= max_rows:
            rows = list(range(L + 1))
        else:
            rows = sorted({round(i * L / (max_rows - 1)) for i in range(max_rows)})

        def fmt(name, l, t):
            if name == "l":
                return str(l)
            if name in per_layer:
                if l == 0:
                    return ""
                v = float(t[l - 1])
            else:
                v = float(t[l])
            s = "%.4g" % v
            if name == "COI" and bool(self.coi_infinite[l]):
                s += "*"
            return s

        cells = [[name for name, _ in cols]] + [[fmt(name, l, t) for name, t in cols] for l in rows]
        widths = [max(len(r[j]) for r in cells) for j in range(len(cols))]
        lines = ["  ".join(c.rjust(wd) for c, wd in zip(r, widths)) for r in cells]
        lines.insert(1, "  ".join("-" * wd for wd in widths))
        head = ("Lt = %g, lam = %g, gamma0 = %g, data cost = %.4g, balance gap = %.3g "
                "(COI*: residual > 0, infinite in theory)" % (self.Lt, self.lam, self.gamma0, self.data_cost,
                                                               self.balance_gap))
        conv = ("stationarity max %.3g, total %.3g; gradient norm %.3g; scale slope %.3g; "
                "mean: the batch mean's share of ||X_l||_F^2" % (self.stationarity_max, self.stationarity_total,
                                                                 self.grad_norm, self.scale_slope))
        return "\n".join([head, conv] + lines)

    def plot(self, path):
        """Writes a PNG with four panels: ranks (COI, stable rank, both estimates), energies, spectra of X_l and W_l."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        p = self.positions.numpy()
        pl = p[1:]
        fig, ax = plt.subplots(2, 2, figsize=(11, 8))
        fig.suptitle("diagnostics: Lt = %g, lam = %g, gamma0 = %g" % (self.Lt, self.lam, self.gamma0))
        a = ax[0, 0]
        coi = torch.where(self.coi_infinite, torch.full_like(self.coi_exact, float("nan")), self.coi_exact)
        a.plot(p, coi.numpy(), label="COI (exact; gaps: infinite)")
        a.plot(p, self.coi_gamma.numpy(), label="COI_gamma")
        a.plot(p, self.stable_rank.numpy(), label="stable rank")
        a.plot(pl, self.rank_estimate.numpy(), "--", label="-2H/Lt")
        a.plot(p, self.rank_estimate_momentum.numpy(), ":", label="-2H_B/Lt (momentum)")
        a.plot(pl, self.rank_estimate_staggered.numpy(), "-.", label="-2H_B/Lt (momentum, staggered)")
        a.set_yscale("symlog", linthresh=1.0)
        a.set_xlabel("depth p"), a.set_ylabel("rank (symlog)"), a.set_title("ranks"), a.legend(fontsize=7)
        a = ax[0, 1]
        a.plot(pl, self.kinetic.numpy(), label="kinetic")
        a.plot(pl, self.potential.numpy(), label="potential")
        a.plot(pl, self.hamiltonian.numpy(), label="H (Lagrangian)")
        a.plot(p, self.hamiltonian_momentum.numpy(), ":", label="H (momentum)")
        a.plot(pl, self.hamiltonian_staggered.numpy(), "-.", label="H (momentum, staggered)")
        a.set_yscale("symlog", linthresh=1.0)
        a.set_xlabel("depth p"), a.set_ylabel("energy (symlog)"), a.set_title("energies"), a.legend(fontsize=7)
        a = ax[1, 0]
        a.semilogy(p, self.sv_X.clamp_min(1e-300).numpy(), lw=0.8)
        a.semilogy(p, self.sv_X_centred[:, :10].clamp_min(1e-300).numpy(), "k--", lw=0.6)
        a.set_xlabel("depth p"), a.set_ylabel("singular value")
        a.set_title("singular values of X_l (dashed: centred, top 10)")
        a = ax[1, 1]
        a.semilogy(pl, self.sv_W.clamp_min(1e-300).numpy(), lw=0.8)
        a.set_xlabel("depth p"), a.set_ylabel("singular value")
        a.set_title("singular values of W_l (balance gap %.2g)" % self.balance_gap)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _plain(v):
    """Tensors and lists as plain lists and floats; non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(v, torch.Tensor):
        return _plain(v.tolist())
    if isinstance(v, list):
        return [_plain(u) for u in v]
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _plain_fields(obj):
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


@dataclasses.dataclass
class Convergence:
    """How far a model is from a critical point of its training loss ``C + lam/(2 Lt) sum_l rho_l ||W_l||_F^2``
    (``lam/2`` at Lt = 0); computed in float64 by :func:`convergence`.

    data_cost (C, the MSE), regularization, loss: the loss and its two terms.
    grad_norm: the Euclidean norm of the loss's gradient over every trainable tensor (``weight``, and
      ``proj_in``, ``proj_out`` when they are Parameters); grad_norm_weight and grad_norm_proj split it.
    stationarity ([L], float64): ``||W_l - k B_l^T sigma(X_{l-1})||_F / ||W_l||_F`` with
      ``B_l = -(1/lam) dC/dX_l`` (the data cost's gradient only) and k = Lt (1 at Lt = 0): the relative
      residual of the critical-point identity, equal to ``k ||dLoss/dW_l||_F / (lam rho_l ||W_l||_F)``;
      +inf where W_l = 0 but the residual is not (0 when both are).
    stationarity_max: its maximum over layers (the number to hold a run to).
    stationarity_total: ``sqrt(sum_l ||W_l - k B_l^T sigma(X_{l-1})||^2) / sqrt(sum_l ||W_l||^2)``.
    scale_slope: with learned projections the loss is invariant in C, but not in the regularization, under
      ``(P_in, b_l, P_out) -> (c P_in, c b_l, P_out / c)`` (relu is homogeneous, the bias is not); its slope
      ``d loss / dc`` at c = 1 is ``(lam/Lt) sum_l rho_l ||b_l||^2``. A critical point needs it to be 0 (no bias
      at all): while it is > 0 the loss can still fall by shrinking the representations, so the gradient
      cannot vanish. NaN when the projections are fixed (the rescaling is then not available to training).
    """

    data_cost: float
    regularization: float
    loss: float
    grad_norm: float
    grad_norm_weight: float
    grad_norm_proj: float
    stationarity: torch.Tensor
    stationarity_max: float
    stationarity_total: float
    scale_slope: float

    def to_dict(self):
        """Plain Python values (lists and floats); non-finite floats become the strings "inf", "-inf", "nan"."""
        return _plain_fields(self)


class CentredSpectra(NamedTuple):
    """Spectra of representations with the batch mean split off (see :func:`centred_spectra`); every field float64.

    sv: [..., min(N, w)] singular values of ``X - 1 mu^T``; mean_share: [...] ``N ||mu||^2 / ||X||_F^2``
    (the share of ``||X||_F^2`` the mean carries, since ``||X||^2 = ||X - 1 mu^T||^2 + N ||mu||^2``; 0 for
    X = 0); mean_norm: [...] ``||mu||``.
    """

    sv: torch.Tensor
    mean_share: torch.Tensor
    mean_norm: torch.Tensor


class WeightMeanSplit(NamedTuple):
    """Layer weights with the direction of the layer's mean output split off (see :func:`weight_mean_split`).

    sv: [L, w] singular values of ``(I - u_l u_l^T) W_l``; weight_mean: [L] ``||u_l^T W_l||`` (what W_l spends
    in that direction); direction: [L, w] the unit vectors u_l (0 where the mean output is 0).
    """

    sv: torch.Tensor
    weight_mean: torch.Tensor
    direction: torch.Tensor


def centred_spectra(X):
    """Singular values of the centred representations and the batch mean's share, of X [..., N, w] (rows are
    samples; a trajectory [L+1, N, w] is one call). With ``mu = mean over the N rows``: the singular values of
    ``X - 1 mu^T``, ``N ||mu||^2 / ||X||_F^2`` and ``||mu||`` (a :class:`CentredSpectra`, float64, X's device).

    A representation with a large mean shows it as one extra large singular value of X (the mean's
    direction mixed with the others); the centred spectrum is the spread of the samples alone.
    """
    check.tensor(X, "X", "[..., N, w]")
    if X.dim() < 2:
        check.fail(ValueError, "X", "a tensor [..., N, w]", "shape %s" % (list(X.shape),))
    X = check.finite(X, "X", "singular values of NaN or inf are undefined").detach().double()
    mu = X.mean(-2, keepdim=True) if X.shape[-2] > 0 else torch.zeros_like(X[..., :1, :])
    total = X.square().sum((-2, -1))
    mean2 = X.shape[-2] * mu.square().sum((-2, -1))
    share = torch.where(total > 0, mean2 / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    return CentredSpectra(torch.linalg.svdvals(X - mu), share, mu.norm(dim=(-2, -1)))


def weight_mean_split(W, xs):
    """The weights W [L, w, w+1] of a stack with the direction in which each layer writes the batch mean split off.

    xs: [L+1, N, w], the representations X_0..X_L of a batch. Layer l adds ``rho_l sigma(X_{l-1}) W_l^T``; its
    mean over the batch is ``rho_l W_l s_l`` with ``s_l`` the mean row of ``sigma(X_{l-1})`` (the ones column
    included). With ``u_l = W_l s_l / ||W_l s_l||`` (the output direction of the layer's mean), returns the
    singular values of ``(I - u_l u_l^T) W_l`` (interlacing: removing one output direction removes at most one
    large singular value) and ``||u_l^T W_l||``, as a :class:`WeightMeanSplit` (float64). ``W_l`` is then
    ``(I - u_l u_l^T) W_l + u_l (u_l^T W_l)``, two orthogonal parts: ``||W_l||^2 = ||.||^2 + weight_mean^2``.
    """
    if not (isinstance(W, torch.Tensor) and isinstance(xs, torch.Tensor) and W.dim() == 3 and xs.dim() == 3
            and xs.shape[0] == W.shape[0] + 1 and W.shape[-1] == W.shape[-2] + 1 and xs.shape[-1] == W.shape[-2]):
        raise ValueError("weight_mean_split needs W [L, w, w+1] and xs [L+1, N, w], got %s and %s"
                         % (tuple(getattr(W, "shape", ())), tuple(getattr(xs, "shape", ()))))
    check.finite(W, "W", "singular values of NaN or inf are undefined")
    check.finite(xs, "xs", "singular values of NaN or inf are undefined")
    W = W.detach().double()
    s = _ref.sigma(xs[:-1].detach().double()).mean(-2)
    m = (W @ s[..., None])[..., 0]
    n = m.norm(dim=-1, keepdim=True)
    u = torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(m))
    uW = (u[:, None, :] @ W)[:, 0, :]
    perp = W - u[:, :, None] * uW[:, None, :]
    return WeightMeanSplit(torch.linalg.svdvals(perp), uW.norm(dim=-1), u)


def momentum_hamiltonian(xs, B, Lt, *, staggered=True):
    """The momentum form of the Hamiltonian, ``H = (Lt/2) ||B^T sigma(X)||_F^2 - Lt <B, X>``, along a stack.

    xs, B: [L+1, N, w], the representations X_l and momenta ``B_l = -(1/lam) dC/dX_l``. Returns ``(H, -2H/Lt)``
    (the second written ``2 <B, X> - ||B^T sigma(X)||^2``, defined at Lt = 0 too).

    staggered=True: per layer l = 1..L on the pair (X_{l-1}, B_l), [L]. This is the pair the discrete stack
    couples: at a critical point ``W_l = Lt B_l^T sigma(X_{l-1})``, so layer l's forward step is
    ``X_l = X_{l-1} + rho_l dH/dB (X_{l-1}, B_l)`` and the backward step is ``B_{l-1} = B_l + rho_l dH/dX (X_{l-1}, B_l)``
    (symplectic Euler), and ``H(X_{l-1}, B_l) = ||W_l||^2 / (2 Lt) - Lt <B_l, X_{l-1}>`` there. Wherever layer l
    is stationary and X_{l-1} lies in the range of sigma(X_{l-1}), it equals the Lagrangian form with the exact
    metric, ``||D_l||^2_{K^+} / (2 Lt) - (Lt/2) ||X_{l-1}||^2_{K^+}``.
    staggered=False: per representation l = 0..L on (X_l, B_l), [L+1] (the continuous formula read at one depth).
    """
    S = _ref.sigma(xs)
    if staggered:
        xs, B, S = xs[:-1], B[1:], S[:-1]
    BtS2 = (B.transpose(-1, -2) @ S).square().sum((-2, -1))
    BX = (B * xs).sum((-2, -1))
    return Lt / 2 * BtS2 - Lt * BX, 2 * BX - BtS2


_DIVERGED = "the diagnostics of a diverged model are meaningless"


def _param(model, name, why=_DIVERGED):
    t = getattr(model, name, None)
    if not isinstance(t, torch.Tensor):
        check.fail(TypeError, "model", "a LeakyResNet-like model with a tensor .%s" % name, type(model).__name__)
    return check.finite(t.detach(), "model.%s" % name, why)


def _check_model(model, why=_DIVERGED):
    """One LeakyResNet-like model (see :func:`analyze`) with finite tensors of consistent shapes, checked before any
    work; returns (W, rho, P_in, P_out, Lt). A LeakyEnsemble is refused: its members are LeakyResNets."""
    from .ensemble import LeakyEnsemble

    if isinstance(model, LeakyEnsemble):
        check.fail(TypeError, "model", "one LeakyResNet (member b of a LeakyEnsemble is ensemble.member(b))",
                   "a LeakyEnsemble of B = %d members" % model.models)
    W, rho, P_in, P_out = (_param(model, n, why) for n in ("weight", "rho", "proj_in", "proj_out"))
    if W.dim() != 3 or W.shape[-1] != W.shape[-2] + 1 or rho.shape != W.shape[:1] or P_in.dim() != 2 \
            or P_in.shape[0] != W.shape[1] or P_out.dim() != 2 or P_out.shape[1] != W.shape[1]:
        check.fail(ValueError, "model", "a LeakyResNet-like model with weight [L, w, w+1], rho [L], proj_in [w, d_in] "
                   "and proj_out [d_out, w]", "weight %s, rho %s, proj_in %s, proj_out %s"
                   % tuple(list(t.shape) for t in (W, rho, P_in, P_out)))
    Lt = check.real(getattr(model, "effective_depth", None), "model.effective_depth", low=0.0)
    return W, rho, P_in, P_out, Lt


def _trainable(model, name):
    t = getattr(model, name, None)
    return isinstance(t, torch.nn.Parameter) and t.requires_grad


class _Pass(NamedTuple):
    W: torch.Tensor
    rho: torch.Tensor
    Lt: float
    xs: torch.Tensor       # [L+1, N, w]
    B: torch.Tensor        # [L+1, N, w], -(1/lam) dC/dX_l
    C: torch.Tensor
    out: torch.Tensor      # [N, d_out]
    grads: dict            # name -> gradient of the whole loss, for the trainable tensors


def _forward_backward(model, x, y, lam, *, device="cpu", dtype=torch.float64):
    """One float64 pass: every X_l, the momenta B_l and the loss's gradients, recomputed from the model's tensors."""
    lam = check.real(lam, "lam", low=0.0, strict=True, what="B_l = -(1/lam) dC/dX_l")
    kw = dict(device=check.device(device), dtype=check.float_dtype(dtype))
    # Copies (never views of the model's tensors): the leaves below get requires_grad and the caller keeps W.
    W, rho, P_in, P_out, Lt = _check_model(model)
    W, rho, P_in, P_out = W.to(**kw).clone(), rho.to(**kw), P_in.to(**kw).clone(), P_out.to(**kw).clone()
    x = check.finite(check.matrix(x, "x", None, P_in.shape[1], cols_name="d_in"), "x").detach().to(**kw)
    L, N = W.shape[0], x.shape[0]
    y = check.finite(check.matrix(y, "y", N, P_out.shape[0], cols_name="d_out"), "y").detach().to(**kw)
    leaves = {"weight": W.requires_grad_()}
    for name, t in (("proj_in", P_in), ("proj_out", P_out)):
        if _trainable(model, name):
            leaves[name] = t.requires_grad_()
    # Forward layer by layer, keeping every X_l in the graph: dC/dX_l is then the backpropagated G_l.
    with torch.enable_grad():
        X0 = x @ P_in.T
        xs_list = [X0 if X0.requires_grad else X0.requires_grad_()]
        for l in range(L):
            xs_list.append(_ref.leaky_layer(xs_list[-1], W[l], rho[l], Lt))
        out = xs_list[-1] @ P_out.T
        C = (out - y).square().sum() / max(N, 1)
        reg = (lam / 2.0 if Lt == 0 else lam / (2.0 * Lt)) * (rho * W.square().sum((-2, -1))).sum()
        G = torch.autograd.grad(C, xs_list, retain_graph=True)
        g = torch.autograd.grad(C + reg, list(leaves.values()))
    return _Pass(W.detach(), rho, Lt, torch.stack([t.detach() for t in xs_list]), -torch.stack(G) / lam,
                 C.detach(), out.detach(), dict(zip(leaves, g)))


def _convergence(fb, lam, scale_free):
    """Convergence from a :func:`_forward_backward` pass; ``scale_free``: the projections are learned."""
    W, rho, Lt, B, xs = fb.W, fb.rho, fb.Lt, fb.B, fb.xs
    k = Lt if Lt != 0 else 1.0
    W_star = k * B[1:].transpose(-1, -2) @ _ref.sigma(xs[:-1])
    Wn = W.norm(dim=(-2, -1))
    rn = (W - W_star).norm(dim=(-2, -1))
    stationarity = torch.where(Wn > 0, rn / torch.where(Wn > 0, Wn, torch.ones_like(Wn)),
                               torch.where(rn > 0, torch.full_like(rn, math.inf), torch.zeros_like(rn)))
    total = float(rn.norm() / Wn.norm()) if float(Wn.norm()) > 0 else (0.0 if float(rn.norm()) == 0 else math.inf)
    scale = lam / 2.0 if Lt == 0 else lam / (2.0 * Lt)
    reg = scale * float((rho * Wn.square()).sum())
    sq = {name: float(t.square().sum()) for name, t in fb.grads.items()}
    slope = 2 * scale * float((rho * W[:, :, -1].square().sum(-1)).sum()) if scale_free else math.nan
    f64 = dict(dtype=torch.float64, device="cpu")
    return Convergence(
        data_cost=float(fb.C), regularization=reg, loss=float(fb.C) + reg, grad_norm=math.sqrt(sum(sq.values())),
        grad_norm_weight=math.sqrt(sq["weight"]),
        grad_norm_proj=math.sqrt(sq.get("proj_in", 0.0) + sq.get("proj_out", 0.0)),
        stationarity=stationarity.to(**f64), stationarity_max=float(stationarity.max()) if len(W) else 0.0,
        stationarity_total=total, scale_slope=slope)


def convergence(model, x, y, lam, *, device="cpu", dtype=torch.float64):
    """How close ``model`` (a :class:`leakycuda.LeakyResNet`) is to a critical point of its training loss on
    inputs x [N, d_in] and targets y [N, d_out], with weight decay ``lam``; a :class:`Convergence`.

    Recomputed in ``dtype`` on ``device`` (float64 on the CPU by default) from the model's tensors, whatever
    its own device and dtype; the gradient is taken over the model's trainable tensors (``weight``, and the
    projections when they are Parameters). Cheap: one forward and backward pass of the batch.
    """
    fb = _forward_backward(model, x, y, lam, device=device, dtype=dtype)
    return _convergence(fb, lam, "proj_in" in fb.grads and "proj_out" in fb.grads)


def analyze(model, x, y, lam, gamma0=DEFAULT_GAMMA0, *, rcond=None, device="cpu", dtype=torch.float64):
    """Diagnostics of ``model`` (a :class:`leakycuda.LeakyResNet`: .weight [L, w, w+1], .rho [L],
    .effective_depth, .proj_in [w, d_in], .proj_out [d_out, w]) on inputs x [N, d_in] and targets y [N, d_out].

    lam: the weight-decay strength of the loss ``C + lam/(2 Lt) sum_l rho_l ||W_l||^2`` (C the MSE,
    ``(1/N)||f(x) - y||_F^2``); gamma0: the layer-relative ridge of COI_gamma and the energies; rcond: the
    exact COI's cutoff (default max(N, w+1) eps). Everything is recomputed in ``dtype`` on ``device``
    (float64 on CPU by default), so it is exact to float64 whatever the model's own device and dtype.
    Returns an :class:`Analysis`. Every argument is checked first (ValueError / TypeError naming it);
    x, y and the model's tensors must be finite.
    """
    gamma0 = check.real(gamma0, "gamma0", low=0.0, strict=True, what="the relative ridge of COI_gamma")
    fb = _forward_backward(model, x, y, lam, device=device, dtype=dtype)
    W, rho, Lt, xs, B = fb.W, fb.rho, fb.Lt, fb.xs, fb.B
    L = W.shape[0]
    with torch.no_grad():
        ref_out = model(x.to(device=_param(model, "weight").device, dtype=_param(model, "weight").dtype))
        gap = (ref_out.detach().to(device=device, dtype=dtype) - fb.out).norm() / fb.out.norm().clamp_min(1e-30)
        if gap > 1e-3:
            warnings.warn("the model's forward differs from its recomputation from .weight/.rho/.effective_depth/"
                          "projections by %.2g (relative): is it a plain LeakyResNet?" % float(gap))

    exact = cost_of_identity(xs, rcond=rcond)
    coi_g, gamma = cost_of_identity(xs, gamma0=gamma0, return_gamma=True)
    en = energies(xs, rho, Lt, gamma0=gamma0)
    ham_B, rank_B = momentum_hamiltonian(xs, B, Lt, staggered=False)
    ham_Bs, rank_Bs = momentum_hamiltonian(xs, B, Lt, staggered=True)
    conv = _convergence(fb, lam, "proj_in" in fb.grads and "proj_out" in fb.grads)
    centred = centred_spectra(xs)
    split = weight_mean_split(W, xs)

    positions = torch.cat([rho.new_zeros(1), torch.cumsum(rho, 0)])
    lhs = W.square().sum((-2, -1))
    b2 = W[:, :, -1].square().sum(-1)
    incr = rho[1:] * (b2[1:] + b2[:-1]) / 2
    rhs = torch.cat([lhs[:1], lhs[:1] + Lt * torch.cumsum(incr, 0)]) if L > 0 else lhs.clone()
    balance_gap = float(((lhs - rhs).abs().max() / lhs.max().clamp_min(1e-300))) if L > 0 else 0.0

    f64 = dict(dtype=torch.float64, device="cpu")
    return Analysis(
        Lt=Lt, lam=float(lam), gamma0=float(gamma0), data_cost=conv.data_cost, regularization=conv.regularization,
        positions=positions.to(**f64),
        coi_exact=exact.value.to(**f64), coi_residual=exact.residual.to(**f64), coi_rank=exact.rank.cpu(),
        coi_infinite=exact.is_infinite().cpu(), coi_gamma=coi_g.to(**f64), gamma=gamma.to(**f64),
        stable_rank=stable_rank(xs).to(**f64),
        hamiltonian_momentum=ham_B.to(**f64), rank_estimate_momentum=rank_B.to(**f64),
        kinetic=en.kinetic.to(**f64), potential=en.potential.to(**f64), hamiltonian=en.hamiltonian.to(**f64),
        rank_estimate=en.rank_estimate.to(**f64), stationarity=conv.stationarity,
        balance_lhs=lhs.to(**f64), balance_rhs=rhs.to(**f64), balance_gap=balance_gap,
        sv_X=torch.linalg.svdvals(xs).to(**f64), sv_W=torch.linalg.svdvals(W).to(**f64),
        hamiltonian_staggered=ham_Bs.to(**f64), rank_estimate_staggered=rank_Bs.to(**f64),
        sv_X_centred=centred.sv.to(**f64), mean_share=centred.mean_share.to(**f64),
        sv_W_centred=split.sv.to(**f64), weight_mean=split.weight_mean.to(**f64),
        grad_norm=conv.grad_norm, stationarity_max=conv.stationarity_max,
        stationarity_total=conv.stationarity_total, scale_slope=conv.scale_slope,
    )
