"""Diagnostics of a trained Leaky ResNet (docs/DESIGN.md §1): COI, energies in both forms, stationarity, balancedness, spectra."""
import dataclasses
import json
import math
import warnings

import torch

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
      at Lt = 0 too), sv_X ([L+1, min(N, w)] singular values), positions (p_l = rho_1 + ... + rho_l, p_0 = 0).
    Layers l (metric from X_{l-1}, D_l = (X_l - X_{l-1})/rho_l):
      kinetic, potential, hamiltonian (Lagrangian form), rank_estimate (-2H/Lt), stationarity
      (||W_l - k B_l^T sigma(X_{l-1})||_F / ||W_l||_F, k = Lt, or 1 at Lt = 0), balance_lhs (||W_l||_F^2),
      balance_rhs (||W_1||^2 + Lt * trapezoid integral of ||b||^2 over p from p_1 to p_l, b = bias column),
      sv_W ([L, w] singular values).
    Scalars: Lt, lam, gamma0, data_cost (the MSE C), regularization, balance_gap (max |lhs - rhs| / max lhs).
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

    @property
    def depth(self):
        return self.kinetic.shape[0]

    def to_dict(self):
        """Plain Python values (lists and floats); non-finite floats become the strings "inf", "-inf", "nan"."""
        def conv(v):
            if isinstance(v, torch.Tensor):
                return conv(v.tolist())
            if isinstance(v, list):
                return [conv(u) for u in v]
            if isinstance(v, float) and not math.isfinite(v):
                return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return v

        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self, path=None, indent=None):
        """The analysis as strict JSON (see :meth:`to_dict`); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
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
            ("-2H_B/Lt", self.rank_estimate_momentum), ("station", self.stationarity),
            ("|W|^2", self.balance_lhs), ("balance", self.balance_rhs),
        ]
        per_layer = {"KE", "V", "H", "-2H/Lt", "station", "|W|^2", "balance"}
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
        return "\n".join([head] + lines)

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
        a.set_yscale("symlog", linthresh=1.0)
        a.set_xlabel("depth p"), a.set_ylabel("rank (symlog)"), a.set_title("ranks"), a.legend(fontsize=7)
        a = ax[0, 1]
        a.plot(pl, self.kinetic.numpy(), label="kinetic")
        a.plot(pl, self.potential.numpy(), label="potential")
        a.plot(pl, self.hamiltonian.numpy(), label="H (Lagrangian)")
        a.plot(p, self.hamiltonian_momentum.numpy(), ":", label="H (momentum)")
        a.set_yscale("symlog", linthresh=1.0)
        a.set_xlabel("depth p"), a.set_ylabel("energy (symlog)"), a.set_title("energies"), a.legend(fontsize=7)
        a = ax[1, 0]
        a.semilogy(p, self.sv_X.clamp_min(1e-300).numpy(), lw=0.8)
        a.set_xlabel("depth p"), a.set_ylabel("singular value"), a.set_title("singular values of X_l")
        a = ax[1, 1]
        a.semilogy(pl, self.sv_W.clamp_min(1e-300).numpy(), lw=0.8)
        a.set_xlabel("depth p"), a.set_ylabel("singular value")
        a.set_title("singular values of W_l (balance gap %.2g)" % self.balance_gap)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _param(model, name):
    t = getattr(model, name, None)
    if not isinstance(t, torch.Tensor):
        check.fail(TypeError, "model", "a LeakyResNet-like model with a tensor .%s" % name, type(model).__name__)
    return check.finite(t.detach(), "model.%s" % name, "the diagnostics of a diverged model are meaningless")


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
    lam = check.real(lam, "lam", low=0.0, strict=True, what="B_l = -(1/lam) dC/dX_l")
    gamma0 = check.real(gamma0, "gamma0", low=0.0, strict=True, what="the relative ridge of COI_gamma")
    kw = dict(device=check.device(device), dtype=check.float_dtype(dtype))
    W, rho = _param(model, "weight").to(**kw), _param(model, "rho").to(**kw)
    P_in, P_out = _param(model, "proj_in").to(**kw), _param(model, "proj_out").to(**kw)
    Lt = check.real(getattr(model, "effective_depth", None), "model.effective_depth", low=0.0)
    x = check.finite(check.matrix(x, "x", None, P_in.shape[1], cols_name="d_in"), "x").detach().to(**kw)
    N = x.shape[0]
    y = check.finite(check.matrix(y, "y", N, P_out.shape[0], cols_name="d_out"), "y").detach().to(**kw)
    L, w = W.shape[0], W.shape[1]

    # Forward layer by layer, keeping every X_l in the graph: dC/dX_l is then the backpropagated G_l.
    with torch.enable_grad():
        X = (x @ P_in.T).requires_grad_()
        xs_list = [X]
        for l in range(L):
            xs_list.append(_ref.leaky_layer(xs_list[-1], W[l], rho[l], Lt))
        out = xs_list[-1] @ P_out.T
        C = (out - y).square().sum() / max(N, 1)
        G = torch.autograd.grad(C, xs_list)
    C = C.detach()
    xs = torch.stack([t.detach() for t in xs_list])
    B = -torch.stack(G) / lam
    with torch.no_grad():
        ref_out = model(x.to(device=_param(model, "weight").device, dtype=_param(model, "weight").dtype))
        gap = (ref_out.detach().to(**kw) - out.detach()).norm() / out.detach().norm().clamp_min(1e-30)
        if gap > 1e-3:
            warnings.warn("the model's forward differs from its recomputation from .weight/.rho/.effective_depth/"
                          "projections by %.2g (relative): is it a plain LeakyResNet?" % float(gap))

    exact = cost_of_identity(xs, rcond=rcond)
    coi_g, gamma = cost_of_identity(xs, gamma0=gamma0, return_gamma=True)
    en = energies(xs, rho, Lt, gamma0=gamma0)

    S = _ref.sigma(xs)
    BtS2 = (B.transpose(-1, -2) @ S).square().sum((-2, -1))
    BX = (B * xs).sum((-2, -1))
    ham_B = Lt / 2 * BtS2 - Lt * BX
    rank_B = 2 * BX - BtS2

    k = Lt if Lt != 0 else 1.0
    W_star = k * B[1:].transpose(-1, -2) @ S[:-1]
    Wn = W.norm(dim=(-2, -1))
    rn = (W - W_star).norm(dim=(-2, -1))
    stationarity = torch.where(Wn > 0, rn / torch.where(Wn > 0, Wn, torch.ones_like(Wn)),
                               torch.where(rn > 0, torch.full_like(rn, math.inf), torch.zeros_like(rn)))

    positions = torch.cat([rho.new_zeros(1), torch.cumsum(rho, 0)])
    lhs = Wn.square()
    b2 = W[:, :, -1].square().sum(-1)
    incr = rho[1:] * (b2[1:] + b2[:-1]) / 2
    rhs = torch.cat([lhs[:1], lhs[:1] + Lt * torch.cumsum(incr, 0)]) if L > 0 else lhs.clone()
    balance_gap = float(((lhs - rhs).abs().max() / lhs.max().clamp_min(1e-300))) if L > 0 else 0.0

    reg = (lam / 2.0 if Lt == 0 else lam / (2.0 * Lt)) * float((rho * Wn.square()).sum())
    f64 = dict(dtype=torch.float64, device="cpu")
    return Analysis(
        Lt=Lt, lam=float(lam), gamma0=float(gamma0), data_cost=float(C), regularization=reg,
        positions=positions.to(**f64),
        coi_exact=exact.value.to(**f64), coi_residual=exact.residual.to(**f64), coi_rank=exact.rank.cpu(),
        coi_infinite=exact.is_infinite().cpu(), coi_gamma=coi_g.to(**f64), gamma=gamma.to(**f64),
        stable_rank=stable_rank(xs).to(**f64),
        hamiltonian_momentum=ham_B.to(**f64), rank_estimate_momentum=rank_B.to(**f64),
        kinetic=en.kinetic.to(**f64), potential=en.potential.to(**f64), hamiltonian=en.hamiltonian.to(**f64),
        rank_estimate=en.rank_estimate.to(**f64), stationarity=stationarity.to(**f64),
        balance_lhs=lhs.to(**f64), balance_rhs=rhs.to(**f64), balance_gap=balance_gap,
        sv_X=torch.linalg.svdvals(xs).to(**f64), sv_W=torch.linalg.svdvals(W).to(**f64),
    )
