"""Runs of the paper's task shared by the demo and Figures 1 and 2: the run config, training one run or a planned sweep
(batched as ensembles), the per-layer measurements and their JSON."""
import contextlib
import dataclasses
import math
import os
import time
import warnings

import torch

from .. import _json
from .. import _validate as check
from .._ensemble_fit import MemberDivergedWarning
from ..data import TEACHERS, bottleneck_task
from ..ensemble import LeakyEnsemble
from ..module import INITS, LeakyResNet, STEP_SCHEMES
from ..recipes import continue_run, refine, warm_start
from ..steps import STABLE_RHO_LT, StepOvershootWarning, check_irregularity, step_sizes
from ..train import DIVERGE_FACTOR, DivergenceError, _divergence_error, fit

__all__ = ["ENSEMBLE_SHARED", "RunConfig", "TASK_D", "check_run", "check_stable", "convergence_summary", "dump_json",
           "file_names", "final_losses", "layer_stats", "layer_table", "make_task", "overshoot_note", "plain_floats",
           "rank_summary", "sweep_jobs", "sweep_train", "train_and_refine", "train_run", "train_runs"]


@dataclasses.dataclass
class RunConfig:
    """One training run: task, student and the Adam-then-SGD recipe (the paper's appendix by default)."""

    inner: tuple = (3,)
    teacher: str = "fcnn"
    n_train: int = 1000
    n_test: int = 1000
    width: int = 100
    depth: int = 20
    Lt: float = 3.0
    steps: str = "equidistant"
    a: float = 0.0
    init: str = "auto"
    lam: float = 1e-2
    adam_steps: int = 5000
    adam_lr: float = 1e-3
    sgd_steps: int = 1000
    sgd_lr: float = 1e-3
    adapt_every: int = 50
    gamma0: float = 1e-2
    # Recipe options (leakycuda.recipes; off by default). In a sweep over Lt, a run with Lt >= continue_above
    # warm-starts from the previous Lt's trained model of the same seed (shifted to the new Lt, ridge
    # continue_gamma0) and trains continue_steps Adam + sgd_steps SGD steps instead of starting from init.
    continue_above: float = math.inf
    continue_steps: int = 3000
    continue_gamma0: float = 1e-2
    # After training: up to refine_steps L-BFGS iterations on W (projections fixed) in float64, stopping early
    # once the relative stationarity residual (max over layers) is <= refine_target.
    refine_steps: int = 0
    refine_target: float = 1e-2

    def check(self):
        """Checks every field (ValueError / TypeError naming it), so that a run fails before any training.

        The energies and the rank estimate -2H/Lt need Lt > 0, the diagnostics lam > 0.
        """
        inner = tuple(check.integer(k, "inner", low=1) for k in self.inner)
        if not inner or min(inner) > TASK_D:
            check.fail(ValueError, "inner", "non-empty with min(inner) <= d = %d" % TASK_D, repr(self.inner))
        check.choice(self.teacher, "teacher", TEACHERS)
        check.integer(self.n_train, "n_train", low=2, what="training points")
        check.integer(self.n_test, "n_test", low=0, what="test points")
        check.integer(self.width, "width", low=1, what="the width w of the representations")
        check.integer(self.depth, "depth", low=1, what="the number of layers L")
        check.real(self.Lt, "Lt", low=0.0, strict=True, what="the effective depth; the energies need Lt > 0")
        check.choice(self.steps, "steps", STEP_SCHEMES)
        check_irregularity(self.a)
        check.choice(self.init, "init", ("auto",) + INITS)
        check.real(self.lam, "lam", low=0.0, strict=True, what="the regularization strength")
        check.integer(self.adam_steps, "adam_steps", low=0, what="Adam steps")
        check.integer(self.sgd_steps, "sgd_steps", low=0, what="SGD steps")
        check.real(self.adam_lr, "adam_lr", low=0.0, strict=True, what="the Adam learning rate")
        check.real(self.sgd_lr, "sgd_lr", low=0.0, strict=True, what="the SGD learning rate")
        check.integer(self.adapt_every, "adapt_every", low=1)
        check.real(self.gamma0, "gamma0", low=0.0, strict=True, what="the relative ridge of COI_gamma")
        check.real(self.continue_above, "continue_above", low=0.0, finite=False,
                   what="the Lt from which a sweep warm-starts from the previous Lt")
        check.integer(self.continue_steps, "continue_steps", low=0, what="Adam steps after a warm start")
        check.real(self.continue_gamma0, "continue_gamma0", low=0.0, strict=True,
                   what="the relative ridge of the warm start's weight shift")
        check.integer(self.refine_steps, "refine_steps", low=0, what="L-BFGS refinement iterations")
        check.real(self.refine_target, "refine_target", low=0.0, strict=True,
                   what="the stationarity residual at which refinement stops")
        check_stable(self.Lt, self.depth, self.steps, self.a)
        return self

    def resolved_init(self):
        """ "auto": a random init below Lt = 8, V_l ≈ Lt*I + noise from Lt = 8 on.

        docs/DESIGN.md §1: random inits collapse to all-zero weights at large Lt (seen here at Lt = 8 with
        width 48), the identity init trains there but keeps more large singular values.
        """
        if self.init != "auto":
            return self.init
        return "random" if self.Lt < 8.0 else "identity"


#: The input and output dimension d of every task here (the paper's 30).
TASK_D = 30


def check_stable(Lt, depth, steps="equidistant", a=0.0, *, name="Lt"):
    """Refuses (ValueError naming ``name``: "Lt", or the sweep "each value of Lts" / "each value of depths") an
    effective depth and initial layer steps outside the stable range max_l rho_l * Lt <= STABLE_RHO_LT = 2, where
    the skip connection 1 - rho_l*Lt does not amplify X (leakycuda.steps.STABLE_RHO_LT). "adaptive" steps start
    equidistant; how far their updates go is reported after training (FitResult.max_rho_Lt, the divergence hint).
    """
    irregular = steps == "irregular"
    rho_max = float(step_sizes(depth, "irregular" if irregular else "equidistant", a if irregular else 0.0,
                               dtype=torch.float64).max())
    worst = rho_max * Lt
    if worst <= STABLE_RHO_LT * (1 + 1e-12):
        return
    why = "max rho_l*Lt <= %g, where the skip connection 1 - rho_l*Lt does not amplify" % STABLE_RHO_LT
    scheme = "%s steps%s" % (steps, " (equidistant at the start)" if steps == "adaptive" else "")
    if name.endswith("depths"):
        check.fail(ValueError, name, "deep enough for the stable range at Lt = %g (%s; equidistant steps need "
                   "L >= %d)" % (Lt, why, math.ceil(Lt / STABLE_RHO_LT - 1e-12)),
                   "%d (max rho_l*Lt = %.3g with %s)" % (depth, worst, scheme))
    check.fail(ValueError, name, "<= %.4g at depth %d with %s (the stable range: %s; more layers allow a larger "
               "Lt)" % (STABLE_RHO_LT / rho_max, depth, scheme, why), "%g (max rho_l*Lt = %.3g)" % (Lt, worst))


def check_run(cfg, out, *, seeds=(0,), device="cpu", dtype=torch.float32, a=None, **sweep):
    """Checks a run's settings before any training (ValueError / TypeError naming the setting) and returns
    them normalised: (cfg, out, seeds, device, dtype, sweep). ``seeds``: an int count or distinct seeds >= 0;
    ``sweep``: Lts (distinct, > 0), depths (distinct, >= 1), schemes (distinct step schemes); None keeps the preset.
    Every Lt x depth x scheme of the sweep must lie in the stable range (:func:`check_stable`); ``a`` is the
    irregular scheme's parameter in a schemes sweep (default ``cfg.a``).
    The command line reports the same errors against its flags.
    """
    if not isinstance(cfg, RunConfig):
        check.fail(TypeError, "cfg", "a RunConfig", type(cfg).__name__)
    cfg.check()
    out = check.writable_path(out, "out", folder=True)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = range(check.integer(seeds, "seeds", low=1, what="a count"))
    seeds = list(check.distinct(seeds, "seeds", lambda v, n: check.integer(v, n, low=0), sort=False))
    device = check.device(device)
    if device.type == "meta":
        check.fail(ValueError, "device", "'cpu' or 'cuda[:i]' (a run computes real numbers)", "'meta'")
    dtype = check.float_dtype(dtype)
    items = {"Lts": lambda v, n: check.real(v, n, low=0.0, strict=True, what="an effective depth"),
             "depths": lambda v, n: check.integer(v, n, low=1, what="a number of layers"),
             "schemes": lambda v, n: check.choice(v, n, STEP_SCHEMES)}
    for name, values in sweep.items():
        if values is not None:
            sweep[name] = check.distinct(values, name, items[name], sort=name != "schemes")
    a = cfg.a if a is None else check_irregularity(a)
    for Lt in sweep.get("Lts") or ():
        check_stable(Lt, cfg.depth, cfg.steps, cfg.a, name="each value of Lts")
    for L in sweep.get("depths") or ():
        for scheme in sweep.get("schemes") or (cfg.steps,):
            check_stable(cfg.Lt, L, scheme, a if scheme == "irregular" else 0.0, name="each value of depths")
    return cfg, out, seeds, device, dtype, sweep


def make_task(cfg, seed, device, dtype):
    return bottleneck_task(d=TASK_D, inner=cfg.inner, n_train=cfg.n_train, n_test=cfg.n_test, seed=seed,
                           teacher=cfg.teacher, dtype=dtype, device=device)


def train_run(cfg, seed=0, *, device="cpu", dtype=torch.float32, task=None, progress=None, desc=None,
              history_path=None, checkpoint_path=None, start=None):
    """Builds the task and a LeakyResNet (both seeded by ``seed``) and fits them; returns (model, task, result).

    ``start``: a trained model to warm-start from instead (:func:`leakycuda.recipes.continue_run`: shifted to
    ``cfg.Lt``, then ``cfg.continue_steps`` Adam + ``cfg.sgd_steps`` SGD steps).
    Steps with rho_l * Lt > 1 (from the settings or from adaptive updates) are not warned about here:
    ``result.max_rho_Lt`` holds the largest value reached, and the runners print it with the run.
    """
    if task is None:
        task = make_task(cfg, seed, device, dtype)
    if start is not None:
        model, result, _ = continue_run(start, task, cfg.lam, Lt=cfg.Lt, gamma0=cfg.continue_gamma0,
                                        adam_steps=cfg.continue_steps, adam_lr=cfg.adam_lr, sgd_steps=cfg.sgd_steps,
                                        sgd_lr=cfg.sgd_lr, adapt_every=cfg.adapt_every, progress=progress, desc=desc)
        return model, task, result
    torch.manual_seed(1000 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepOvershootWarning)
        model = LeakyResNet(task.d, task.d, cfg.width, cfg.depth, cfg.Lt, steps=cfg.steps,
                            a=cfg.a if cfg.steps == "irregular" else 0.0, init=cfg.resolved_init(),
                            device=device, dtype=dtype)
        result = fit(model, task, cfg.lam, adam_steps=cfg.adam_steps, adam_lr=cfg.adam_lr, sgd_steps=cfg.sgd_steps,
                     sgd_lr=cfg.sgd_lr, adapt_every=cfg.adapt_every,
                     log_every=max(1, (cfg.adam_steps + cfg.sgd_steps) // 50),
                     progress=progress, desc=desc, history_path=history_path, checkpoint_path=checkpoint_path)
    return model, task, result


#: The RunConfig fields that runs trained together as one LeakyEnsemble must share: the task's shape and the
#: recipe. Lt, steps, a, init, lam and the seed may differ between members (and depth, by padding).
ENSEMBLE_SHARED = ("inner", "teacher", "n_train", "n_test", "width", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr",
                   "adapt_every")


def train_runs(plan, done, *, device="cpu", dtype=torch.float32, progress=None, sequential=False, pad_depths=False):
    """Trains the runs ``plan`` = [(cfg, seed, desc, start), ...] and calls
    ``done(i, model, task, result, extra, seconds)`` for each as soon as it has trained (model a LeakyResNet,
    result a FitResult, extra = {"warm_start", "refine"} as :func:`train_and_refine` gives it, seconds its training
    time): sequential, in plan order; batched, group by group (each group's runs in plan order), so a
    caller that wants plan order sorts by i.

    ``start``: None, or the index of an earlier run whose trained model this one warm-starts from
    (:func:`leakycuda.recipes.continue_run`: shifted to cfg.Lt, then cfg.continue_steps Adam steps).
    Runs with cfg.refine_steps > 0 are refined after training (L-BFGS, one model at a time).

    ``sequential=True``: :func:`train_and_refine` one run after the other, each reported as soon as it ends.
    Batched (the default): the runs that share :data:`ENSEMBLE_SHARED`, the depth (unless
    ``pad_depths``) and their place in the warm-start chain train together as one
    :class:`~leakycuda.ensemble.LeakyEnsemble`: a member starts from the weights train_run(cfg, seed)
    would draw (or from its warm start), trains on the same task with the same recipe, and is
    reported as its LeakyResNet (:meth:`~leakycuda.ensemble.LeakyEnsemble.member`) with its own
    history, so the outputs equal the sequential ones up to float rounding. A group's wall time is
    shared out evenly between its runs. Either way a diverged run raises the
    :class:`~leakycuda.train.DivergenceError` that train_run would, named by its desc (batched: once
    its group has trained).
    """
    for name, flag in (("sequential", sequential), ("pad_depths", pad_depths)):
        if not isinstance(flag, bool):
            check.fail(TypeError, name, "True or False", repr(flag))
    if sequential:
        models = {}
        for i, (cfg, seed, desc, start) in enumerate(plan):
            t = time.perf_counter()
            with _named_run(desc):
                model, task, result, extra = train_and_refine(cfg, seed, start=None if start is None else models[start],
                                                    device=device, dtype=dtype, progress=progress, desc=desc)
            models[i] = model
            done(i, model, task, result, extra, time.perf_counter() - t)
        return
    level, groups = [], {}
    for i, (cfg, _, _, start) in enumerate(plan):
        level.append(0 if start is None else level[start] + 1)
        key = ((level[i],) + tuple(getattr(cfg, f) for f in ENSEMBLE_SHARED) + (() if pad_depths else (cfg.depth,))
               + (() if start is None else (cfg.continue_steps,)))
        groups.setdefault(key, []).append(i)
    trained = {}
    for key in sorted(groups, key=lambda k: k[0]):  # a warm start's group after the group it starts from
        index = groups[key]
        starts = [None if plan[i][3] is None else trained[plan[i][3]][0] for i in index]
        group = _train_group([plan[i] for i in index], index, starts, device, dtype, progress)
        trained.update(group)
        for i in index:  # reported now, not after the whole sweep: a long sweep shows its results as it goes
            done(i, *group[i])


def sweep_jobs(plan):
    """The :class:`~leakycuda.experiments.distribute.Job` of each run of a :func:`train_runs` plan: its desc as the
    key, layers x steps as the cost, and the desc of the run it warm-starts from."""
    from .distribute import Job

    return [Job(desc, cost=float(cfg.depth * ((cfg.continue_steps if start is not None else cfg.adam_steps)
                                              + cfg.sgd_steps + cfg.refine_steps)),
                after=None if start is None else plan[start][2]) for cfg, _, desc, start in plan]


def sweep_train(plan, record, **options):
    """The ``train(indices, emit)`` of a :func:`train_runs` plan for leakycuda.experiments.distribute: trains the
    runs ``indices`` (whole warm-start chains) with :func:`train_runs` (``options``: device, dtype, progress,
    sequential, pad_depths) and emits ``record(i, model, task, result, extra, seconds)`` for each."""

    def train(indices, emit):
        where = {i: k for k, i in enumerate(indices)}
        sub = [(cfg, seed, desc, None if start is None else where[start])
               for cfg, seed, desc, start in (plan[i] for i in indices)]
        train_runs(sub, lambda k, *trained: emit(indices[k], record(indices[k], *trained)), **options)

    return train


def _train_group(runs, index, starts, device, dtype, progress):
    """One LeakyEnsemble fit of runs [(cfg, seed, desc, start)] that share ENSEMBLE_SHARED (from the trained models
    ``starts`` when they warm-start) -> {index[b]: (model, task, result, extra, seconds)}."""
    t = time.perf_counter()
    cfgs, seeds = [r[0] for r in runs], [r[1] for r in runs]
    c, warm = cfgs[0], starts[0] is not None
    tasks = [make_task(cfg, seed, device, dtype) for cfg, seed in zip(cfgs, seeds)]
    steps = c.continue_steps if warm else c.adam_steps
    desc = "%s (%d runs at once)" % (runs[0][2], len(runs)) if len(runs) > 1 else runs[0][2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepOvershootWarning)
        warnings.simplefilter("ignore", MemberDivergedWarning)  # a diverged run raises below, as train_run's would
        if warm:
            model = LeakyEnsemble.from_models([warm_start(s, task, cfg.Lt, gamma0=cfg.continue_gamma0)[0]
                                               for s, cfg, task in zip(starts, cfgs, tasks)])
        else:
            model = LeakyEnsemble(TASK_D, TASK_D, c.width, [cfg.depth for cfg in cfgs], [cfg.Lt for cfg in cfgs],
                                  steps=[cfg.steps for cfg in cfgs],
                                  a=[cfg.a if cfg.steps == "irregular" else 0.0 for cfg in cfgs],
                                  init=[cfg.resolved_init() for cfg in cfgs], seeds=[1000 + seed for seed in seeds],
                                  device=device, dtype=dtype)
        try:
            result = fit(model, tasks, [cfg.lam for cfg in cfgs], adam_steps=steps, adam_lr=c.adam_lr,
                         sgd_steps=c.sgd_steps, sgd_lr=c.sgd_lr, adapt_every=c.adapt_every,
                         log_every=max(1, (steps + c.sgd_steps) // 50), progress=progress, desc=desc)
        except DivergenceError as e:  # every member diverged
            result = e.result
    first = next((b for b, step in enumerate(result.diverged) if step is not None), None)
    if first is not None:
        hist = result.member_history(first)
        y = tasks[first].y_train
        with _named_run(runs[first][2]):
            raise _divergence_error(hist[-1], hist[0]["loss"], float(y.double().square().sum()) / y.shape[0],
                                    DIVERGE_FACTOR, (c.adam_lr, c.sgd_lr), None, result.member(first))
    share = (time.perf_counter() - t) / len(runs)
    out = {}
    for b, i in enumerate(index):
        t = time.perf_counter()
        member = model.member(b)
        extra = _refined(member, tasks[b], cfgs[b], warm)
        out[i] = (member, tasks[b], result.member(b), extra, share + time.perf_counter() - t)
    return out


@contextlib.contextmanager
def _named_run(desc):
    """Puts the name of a sweep's run in front of a DivergenceError's message."""
    try:
        yield
    except DivergenceError as e:
        e.args = ("%s: %s" % (desc, e.args[0]),) + e.args[1:]
        raise


def overshoot_note(result):
    """A note for a run's log line when some rho_l * Lt exceeded 1 (the skip connection went negative)."""
    r = result.max_rho_Lt
    return "  [max rho_l*Lt = %.3g > 1: negative skip connection]" % r if r > 1.0 else ""


def _field(res, name):
    value = res[name] if isinstance(res, dict) else getattr(res, name)
    return value.detach().double().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value).double()


@torch.no_grad()
def layer_stats(model, x, gamma0=1e-2, *, top=None):
    """Per-layer measurements of a trained model on inputs x [N, d_in] (float64 on the CPU, as lists).

    p: the depths p_0..p_L of X_0..X_L; p_mid: the midpoints of the layers (where W_l and the layer
    energies are drawn); coi, kinetic, potential, hamiltonian, rank_estimate (-2H/Lt), per layer l = 1..L
    from :func:`leakycuda.energies.energies` (metric from X_{l-1}, gamma_p = gamma0 ||sigma(X_p)||_op^2);
    sv_x [L+1][k] and sv_w [L][k]: singular values of X_l and W_l; sv_x_centred [L+1][k] and mean_share [L+1]:
    those of X_l minus its batch mean and the mean's share of ||X_l||_F^2
    (:func:`leakycuda.diagnostics.centred_spectra`); sv_w_centred [L][k] and weight_mean [L]: W_l with the
    direction of its mean output split off (:func:`leakycuda.diagnostics.weight_mean_split`).
    """
    from ..diagnostics import centred_spectra, weight_mean_split
    from ..energies import energies

    xs = model.representations(x).detach().double()
    rho = model.rho.detach().double()
    e = energies(xs, rho, model.Lt, gamma0=gamma0)
    p = torch.cat([rho.new_zeros(1), rho.cumsum(0)]).cpu()
    W = model.weight.detach().double()
    centred, split = centred_spectra(xs), weight_mean_split(W, xs)
    spectra = {"sv_x": torch.linalg.svdvals(xs), "sv_w": torch.linalg.svdvals(W), "sv_x_centred": centred.sv,
               "sv_w_centred": split.sv}
    out = {"p": p.tolist(), "p_mid": ((p[1:] + p[:-1]) / 2).tolist(), "rho": rho.cpu().tolist()}
    for name in ("coi", "kinetic", "potential", "hamiltonian", "rank_estimate"):
        out[name] = _field(e, name).tolist()
    for name, sv in spectra.items():
        out[name] = (sv if top is None else sv[:, :top]).cpu().tolist()
    out["mean_share"] = centred.mean_share.cpu().tolist()
    out["weight_mean"] = split.weight_mean.cpu().tolist()
    return out


def rank_summary(stats):
    """Median, min and max over layers of -2H/Lt, min_l COI, and the integer bottleneck-rank estimate.

    The theory brackets the bottleneck rank: -2H/Lt <= k* <= min_l COI (both tighten as Lt grows).
    ``rank`` is the integer nearest the middle of [median(-2H/Lt), min COI] (at least 0: a rank is never
    negative; None when an end is not finite); ``bracket_integers``
    counts the integers in that interval and ``bracket_ok`` says whether there is exactly one.
    With centred spectra in ``stats`` (:func:`layer_stats`), also the middle representation X_m (m = L//2):
    ``sv_x_centred_mid`` (its top 6 centred singular values), ``centred_count_mid`` (how many exceed 10% of
    the largest) and ``mean_share_mid``.
    """
    r = torch.tensor(stats["rank_estimate"], dtype=torch.float64)
    coi = torch.tensor(stats["coi"], dtype=torch.float64)
    lo, hi = float(r.median()), float(coi.min())
    ints = [k for k in range(max(0, math.ceil(lo)), math.floor(hi) + 1)] if math.isfinite(lo + hi) else []
    out = {"rank_median": lo, "rank_min": float(r.min()), "rank_max": float(r.max()), "coi_min": hi,
           "coi_argmin_layer": int(coi.argmin()) + 1,
           "rank": max(0, int(round((lo + hi) / 2))) if math.isfinite(lo + hi) else None,
           "bracket_ok": len(ints) == 1, "bracket_integers": len(ints)}
    if "sv_x_centred" in stats:
        mid = len(stats["sv_x_centred"]) // 2
        sv = stats["sv_x_centred"][mid]
        out.update(mid_layer=mid, sv_x_centred_mid=sv[:6], mean_share_mid=stats["mean_share"][mid],
                   centred_count_mid=sum(v > 0.1 * sv[0] for v in sv) if sv and sv[0] > 0 else 0)
    return out


def layer_table(report):
    """A compact aligned table of a :class:`leakycuda.diagnostics.Analysis`: one row per layer l = 1..L,
    under a legend of its columns (COI_g, COI, resid and srank describe X_{l-1}, the layer's input).

    COI_g: the stable COI_gamma (``<`` marks its minimum over layers, the upper end of the rank
    bracket); COI: the exact COI's finite pseudo-inverse value; resid: ||S S^+ X - X||_F / ||X||_F,
    how far X lies outside the range of S = sigma(X) (the theory's COI is infinite unless it is 0);
    KE, V, H: kinetic, potential and Hamiltonian energy of layer l; -2H/Lt: the rank estimate;
    srank: the stable rank; |W|^2: ||W_l||_F^2.
    """
    cols = ("l", "p_l", "COI_g", "COI", "resid", "KE", "V", "H", "-2H/Lt", "srank", "|W|^2")
    x_norm = report.sv_X.square().sum(-1).sqrt()
    resid = report.coi_residual / x_norm.clamp_min(1e-300)
    argmin = int(report.coi_gamma[:-1].argmin()) + 1 if report.depth else 0
    rows = [cols]
    for l in range(1, report.depth + 1):
        rows.append((str(l), "%.3f" % float(report.positions[l]),
                     "%s%.4g" % ("<" if l == argmin else "", float(report.coi_gamma[l - 1])),
                     "%.4g" % float(report.coi_exact[l - 1]), "%.1e" % float(resid[l - 1]),
                     "%.4g" % float(report.kinetic[l - 1]), "%.4g" % float(report.potential[l - 1]),
                     "%.4g" % float(report.hamiltonian[l - 1]), "%.3f" % float(report.rank_estimate[l - 1]),
                     "%.3f" % float(report.stable_rank[l - 1]), "%.4g" % float(report.balance_lhs[l - 1])))
    widths = [max(len(r[j]) for r in rows) for j in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = [
        "per layer l = 1..L (Lt = %g, gamma0 = %g); COI_g, COI, resid and srank describe X_{l-1}, the layer's input:"
        % (report.Lt, report.gamma0),
        "  p_l     depth of X_l (rho_1 + ... + rho_l)",
        "  COI_g   stable Cost of Identity, gamma = gamma0 ||sigma(X)||_op^2; '<' marks its minimum over the layers",
        "  COI     exact Cost of Identity ||S^+ X||_F^2 with S = sigma(X) (the pseudo-inverse's finite value)",
        "  resid   ||S S^+ X - X||_F / ||X||_F: how far X lies outside the range of S (the theory's COI is "
        "infinite unless 0)",
        "  KE, V, H  kinetic, potential and Hamiltonian energy of layer l (metric of X_{l-1});  -2H/Lt  the rank "
        "estimate",
        "  srank   stable rank ||X||_*^2 / ||X||_F^2;  |W|^2  ||W_l||_F^2",
    ]
    return "\n".join(legend + [""] + lines)


def final_losses(result):
    f = result.final
    return {k: f[k] for k in ("loss", "train_mse", "reg", "test_mse")}


def train_and_refine(cfg, seed, *, start, device, dtype, progress, desc, history_path=None):
    """train_run (warm-started from ``start`` when given), then cfg.refine_steps of L-BFGS refinement;
    returns (model, task, result, extra) with extra = {"warm_start": bool, "refine": dict or None}."""
    model, task, result = train_run(cfg, seed, device=device, dtype=dtype, progress=progress, desc=desc,
                                    start=start, history_path=history_path)
    return model, task, result, _refined(model, task, cfg, start is not None)


def _refined(model, task, cfg, warm):
    """cfg.refine_steps of L-BFGS refinement of a trained model (in place, none when 0); returns the run's
    extra record {"warm_start": warm, "refine": dict or None}."""
    extra = {"warm_start": warm, "refine": None}
    if cfg.refine_steps > 0:
        r = refine(model, task, cfg.lam, iterations=cfg.refine_steps, target=cfg.refine_target)
        extra["refine"] = {"iterations": r.iterations, "evaluations": r.evaluations, "seconds": r.wall_s,
                           "reached": r.reached, "history": r.history}
    return extra


def convergence_summary(model, task, lam):
    """The run's :class:`leakycuda.diagnostics.Convergence` on the training set, as a plain dict."""
    from ..diagnostics import convergence

    return plain_floats(convergence(model, task.x_train, task.y_train, lam))


def plain_floats(report):
    """A diagnostics dataclass as a dict of floats and lists of floats (non-finite ones kept as floats: the result
    files write them as null, leakycuda._json's convention, rather than as to_dict's "inf" / "nan" strings)."""
    return {f.name: (v.tolist() if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(report) for v in [getattr(report, f.name)]}


def dump_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _json.dump(obj, path, indent=1)


def file_names(files):
    """File names relative to the output folder (the JSON stays valid when the folder moves)."""
    return {k: os.path.basename(v) for k, v in files.items()}
