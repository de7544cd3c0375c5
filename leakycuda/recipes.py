"""Training recipes beyond fit: full-batch L-BFGS refinement to stationarity, and continuation in Lt."""
import copy
import dataclasses
import time

import torch

from . import _validate as check
from . import reference as _ref
from .diagnostics import _check_model, convergence
from .train import _check_task

__all__ = ["RefineResult", "continue_run", "refine", "shift_effective_depth", "warm_start"]

#: The ridge of :func:`shift_effective_depth`, relative to ||sigma(X)||_op^2 (the COI's gamma0 in the experiments).
DEFAULT_SHIFT_GAMMA0 = 1e-2


@torch.no_grad()
def shift_effective_depth(model, x, Lt, *, gamma0=DEFAULT_SHIFT_GAMMA0):
    """Sets ``model``'s effective depth to ``Lt`` (in place) and adds to each W_l what keeps the representations
    of the batch x [N, d_in] (nearly) as they were: a warm start for training at a new Lt.

    Changing Lt changes layer l by ``-(Lt - Lt_old) rho_l X_{l-1}`` (the leak). Adding ``(Lt - Lt_old) Z_l^T``
    to W_l adds ``(Lt - Lt_old) rho_l sigma(X_{l-1}) Z_l`` back, where ``Z_l`` [w+1, w] is the ridge solution
    of ``sigma(X_{l-1}) Z = X_{l-1}`` (the weight of the stable Cost of Identity):
    ``Z_l = (S^T S + gamma_l I)^{-1} S^T X_{l-1}``, ``S = sigma(X_{l-1})``, ``gamma_l = gamma0 ||S||_op^2``
    (float64). The ridge keeps the directions of X_{l-1} weaker than ~sqrt(gamma0) of the strongest out
    of Z: they are left to the stronger leak, which is what the optimum at a larger Lt does, and W gets
    no bulk of large singular values (``gamma0=None``: the minimum-norm least-squares Z, exact where
    X_{l-1} lies in the range of S, but it copies every weak direction into W).
    Returns the relative change of the output on x, ``||f_new(x) - f_old(x)||_F / ||f_old(x)||_F``.
    Any device and dtype (the solves run in float64). ``model``: one LeakyResNet with finite tensors.
    """
    _check_net(model)
    Lt = check.real(Lt, "Lt", low=0.0, what="the new effective depth")
    if gamma0 is not None:
        gamma0 = check.real(gamma0, "gamma0", low=0.0, strict=True, what="the relative ridge, or None for the "
                            "minimum-norm shift")
    W = model.weight
    before = model(x)
    xs = model.representations(x).detach().double()[:-1]
    S = _ref.sigma(xs)
    if gamma0 is None:
        Z = torch.linalg.lstsq(S, xs, driver="gelsd" if S.device.type == "cpu" else None).solution
    else:
        gamma = gamma0 * torch.linalg.matrix_norm(S, ord=2).square()
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        Z = torch.linalg.solve(S.transpose(-1, -2) @ S + gamma[:, None, None] * eye, S.transpose(-1, -2) @ xs)
    W.add_(((float(Lt) - model.Lt) * Z.transpose(-1, -2)).to(W.dtype))
    model.Lt = float(Lt)
    after = model(x)
    return float((after - before).norm() / before.norm().clamp_min(1e-300))


def _check_net(model):
    """One LeakyResNet with finite tensors (refused before any work: the recipes' solves fail on NaN)."""
    from .module import LeakyResNet

    _check_model(model, "a diverged model cannot be refined or shifted")
    if not isinstance(model, LeakyResNet):
        check.fail(TypeError, "model", "a LeakyResNet", type(model).__name__)


@dataclasses.dataclass
class RefineResult:
    """What :func:`refine` returns: ``history`` (one dict per check: iteration, evaluations, seconds, loss,
    stationarity_max, stationarity_total, grad_norm), ``iterations``, ``evaluations``, ``wall_s`` and whether
    the target was ``reached``."""

    history: list
    iterations: int
    evaluations: int
    wall_s: float
    reached: bool


def _input_whitener(model, x, damping):
    """A_l = (S^T S / N + damping * lambda_max I)^{-1/2} and its inverse, S = sigma(X_{l-1}) of the batch x:
    [L, w+1, w+1] each (the input-side factor of a Kronecker-factored curvature; float64)."""
    with torch.no_grad():
        S = _ref.sigma(model.representations(x).detach()[:-1].double())
    ev, Q = torch.linalg.eigh(S.transpose(-1, -2) @ S / max(x.shape[0], 1))
    ev = ev + damping * ev[:, -1:].clamp_min(1e-300)
    Qt = Q.transpose(-1, -2)
    return Q @ torch.diag_embed(ev.rsqrt()) @ Qt, Q @ torch.diag_embed(ev.sqrt()) @ Qt


def refine(model, task, lam, *, iterations=500, target=1e-2, check_every=50, params="weight",
           precondition=1e-4, dtype=torch.float64, history_size=50, callback=None):
    """Full-batch L-BFGS (strong Wolfe line search) on ``C + model.regularization(lam)``, in place.

    Stops after ``iterations`` iterations, or at the first check (every ``check_every`` iterations) where the
    relative stationarity residual (:func:`leakycuda.diagnostics.convergence`, maximum over layers) is at most
    ``target`` (>= 0; 0 runs every iteration). ``params``: "weight" (the default: the projections stay fixed, so the problem has a minimiser
    even when they are learned, see DESIGN) or "all" (every trainable tensor).
    ``precondition``: L-BFGS runs on U with ``W_l = U_l A_l``, ``A_l = (S^T S/N + precondition lambda_max I)^{-1/2}``
    (S = sigma(X_{l-1}) at the start, fixed during the run): it whitens each layer's input, whose Gram is
    dominated by the batch mean (one eigenvalue ~30x the next), the stiffest part of the problem. None: plain
    L-BFGS on W. ``dtype``: the precision of the refinement (the model is cast for it and cast back).
    ``callback(record)`` after each check. Returns a :class:`RefineResult`.
    Every argument is checked first (ValueError / TypeError naming it; the model must be one LeakyResNet with
    finite tensors); if the refinement fails, the model is left as it was, dtype and values.
    """
    _check_net(model)
    _check_task(task, model.in_features, model.out_features)
    lam = check.real(lam, "lam", low=0.0, strict=True, what="the regularization strength; the stationarity "
                     "residual divides by it")
    check.choice(params, "params", ("weight", "all"))
    iterations = check.integer(iterations, "iterations", low=0)
    check_every = check.integer(check_every, "check_every", low=1)
    history_size = check.integer(history_size, "history_size", low=1)
    target = check.real(target, "target", low=0.0, finite=False, what="the stationarity residual at which to stop; "
                        "0: run every iteration")
    if precondition is not None:
        precondition = check.real(precondition, "precondition", low=0.0, strict=True,
                                  what="a damping relative to the largest eigenvalue, or None")
    check.float_dtype(dtype)
    if callback is not None and not callable(callback):
        check.fail(TypeError, "callback", "None or a callable taking one record", type(callback).__name__)
    p0 = next(model.parameters())
    home = dict(device=p0.device, dtype=p0.dtype)
    tensors = lambda: dict(list(model.named_parameters()) + list(model.named_buffers()))  # noqa: E731
    backup = {name: t.detach().clone() for name, t in tensors().items()}
    try:
        return _refine(model, task, lam, home, iterations, target, check_every, params, precondition, dtype,
                       history_size, callback)
    except BaseException:  # leave the model as it was: its dtype, and every tensor's values
        model.to(**home)
        with torch.no_grad():
            for name, t in tensors().items():
                t.copy_(backup[name])
        raise


def _refine(model, task, lam, home, iterations, target, check_every, params, precondition, dtype, history_size,
            callback):
    p0 = next(model.parameters())
    model.to(dtype=dtype)
    x = task.x_train.to(device=p0.device, dtype=dtype)
    y = task.y_train.to(device=p0.device, dtype=dtype)
    others = [] if params == "weight" else [t for n, t in model.named_parameters() if t.requires_grad and n != "weight"]
    if precondition is None:
        A = None
        weight_var = model.weight
    else:
        A, A_inv = (t.to(dtype) for t in _input_whitener(model, x, precondition))
        weight_var = (model.weight.detach() @ A_inv).requires_grad_()
    tensors = [weight_var] + others
    opt = torch.optim.LBFGS(tensors, lr=1.0, max_iter=check_every, history_size=history_size,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    evals = [0]

    def closure():
        opt.zero_grad(set_to_none=True)
        if A is None:
            out, reg = model(x), model.regularization(lam)
        else:
            W = weight_var @ A
            out = torch.func.functional_call(model, {"weight": W}, (x,))
            scale = lam / 2.0 if model.Lt == 0 else lam / (2.0 * model.Lt)
            reg = scale * (model.rho * W.square().sum((-2, -1))).sum()
        loss = (out - y).square().sum() / x.shape[0] + reg
        loss.backward()
        evals[0] += 1
        return loss

    t0, done, history = time.perf_counter(), 0, []

    def check():
        c = convergence(model, x, y, lam)
        rec = {"iteration": done, "evaluations": evals[0], "seconds": time.perf_counter() - t0, "loss": c.loss,
               "stationarity_max": c.stationarity_max, "stationarity_total": c.stationarity_total,
               "grad_norm": c.grad_norm}
        history.append(rec)
        if callback is not None:
            callback(rec)
        return c.stationarity_max <= target

    reached = check()
    while done < iterations and not reached:
        opt.param_groups[0]["max_iter"] = min(check_every, iterations - done)
        opt.step(closure)
        done = opt.state[tensors[0]]["n_iter"]
        if A is not None:
            with torch.no_grad():
                model.weight.copy_(weight_var @ A)
        if not all(torch.isfinite(t).all() for t in tensors):
            raise FloatingPointError("refine: L-BFGS produced non-finite weights after %d iterations" % done)
        reached = check()
    model.to(**home)
    return RefineResult(history, done, evals[0], time.perf_counter() - t0, reached)


def warm_start(start, task, Lt, *, gamma0=DEFAULT_SHIFT_GAMMA0):
    """The untrained part of :func:`continue_run`: a copy of ``start`` moved to effective depth ``Lt`` by
    :func:`shift_effective_depth` on ``task.x_train`` (ridge ``gamma0``); returns (model, shift)."""
    model = copy.deepcopy(start)
    p = next(model.parameters())
    shift = shift_effective_depth(model, task.x_train.to(device=p.device, dtype=p.dtype), Lt, gamma0=gamma0)
    return model, shift


def continue_run(start, task, lam, *, Lt, gamma0=DEFAULT_SHIFT_GAMMA0, adam_steps=3000, adam_lr=1e-3,
                 sgd_steps=1000, sgd_lr=1e-3, adapt_every=50, progress=None, desc=None):
    """Warm start: trains a copy of ``start`` (a trained :class:`~leakycuda.LeakyResNet`, any Lt) at ``Lt``.

    The copy is moved to ``Lt`` by :func:`shift_effective_depth` on ``task.x_train`` (ridge ``gamma0``), then
    trained by :func:`leakycuda.train.fit` on ``task`` with regularization ``lam``: ``adam_steps`` Adam steps
    at ``adam_lr``, then ``sgd_steps`` SGD steps at ``sgd_lr`` (adaptive steps every ``adapt_every``).
    ``start`` is not modified. Returns ``(model, result, shift)``: the new model, fit's
    :class:`~leakycuda.train.FitResult` and the relative output change the shift made before training.
    """
    from .train import fit

    model, shift = warm_start(start, task, Lt, gamma0=gamma0)
    result = fit(model, task, lam, adam_steps=adam_steps, adam_lr=adam_lr, sgd_steps=sgd_steps, sgd_lr=sgd_lr,
                 adapt_every=adapt_every, log_every=max(1, (adam_steps + sgd_steps) // 50), progress=progress,
                 desc=desc)
    return model, result, shift
