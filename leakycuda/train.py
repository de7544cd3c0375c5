"""Full-batch training of a LeakyResNet: Adam then SGD, adaptive steps, history, checkpoints, DDP."""
import contextlib
import contextvars
import csv
import dataclasses
import math
import os
import sys
import time
import warnings

import torch

from . import _json
from . import _validate as check
from .steps import STABLE_RHO_LT, StepOvershootWarning, rho_Lt_violations

__all__ = ["DivergenceError", "FitResult", "fit", "load_checkpoint", "mse", "one_process", "save_history"]

CHECKPOINT_FORMAT = "leakycuda.fit/1"

#: The default of fit's ``diverge_factor`` (see :func:`fit`, "Divergence").
DIVERGE_FACTOR = 1e4


class DivergenceError(FloatingPointError):
    """:func:`fit` stopped because the loss diverged (see :func:`fit`, "Divergence").

    Attributes: ``step`` and ``phase`` where it was detected, ``loss`` (the value seen),
    ``threshold`` (None when the loss was not finite) and ``result``: a :class:`FitResult` whose
    history runs up to and including the diverged record (also written to ``history_path``).
    """

    def __init__(self, message, *, step, phase, loss, threshold, result):
        super().__init__(message)
        self.step, self.phase, self.loss, self.threshold, self.result = step, phase, loss, threshold, result


def mse(pred, target):
    """The paper's data cost C = (1/N) ||pred - target||_F^2 (sum over outputs, mean over samples).

    pred and target: tensors of the same shape [N, d] (no broadcasting).
    """
    check.tensor(pred, "pred", "[N, d]")
    check.tensor(target, "target", "[N, d]")
    if pred.shape != target.shape or pred.dim() < 1:
        check.fail(ValueError, "target", "of pred's shape %s" % (list(pred.shape),), "shape %s" % (list(target.shape),))
    return (pred - target).square().sum() / pred.shape[0]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the history records (one dict per logged step) and timings.

    Each record: ``step`` (optimizer steps done), ``phase`` ("adam" or "sgd"), ``loss`` (data cost +
    regularization), ``train_mse``, ``reg``, ``test_mse`` (NaN without test data), ``rho`` (list of L).
    ``max_rho_Lt``: the largest rho_l * Lt the steps reached during this call (above 1 the skip
    connection of that layer is negative; adaptive steps can get there, see :func:`fit`).
    """

    history: list
    steps: int
    wall_s: float
    resumed_from: int = 0
    max_rho_Lt: float = float("nan")

    @property
    def final(self):
        return self.history[-1] if self.history else {}

    def save(self, path):
        """Writes the history as JSON at ``path`` and as CSV next to it (same stem, .csv)."""
        save_history(self.history, path)


def save_history(history, path):
    """History records -> ``path`` (strict JSON, a list of records; a NaN or inf number is null, docs/DESIGN.md §3.4)
    and ``path`` with suffix .csv (rho_1..rho_L columns)."""
    path = os.fspath(path)
    root, _ = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _json.dump(history, path, indent=1)
    if not history:
        return
    L = len(history[0].get("rho", []))
    fields = [k for k in history[0] if k != "rho"] + ["rho_%d" % (i + 1) for i in range(L)]
    with open(root + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for rec in history:
            w.writerow([rec[k] for k in fields[: len(fields) - L]] + list(rec.get("rho", [])))


_ONE_PROCESS = contextvars.ContextVar("leakycuda_fit_one_process", default=False)


@contextlib.contextmanager
def one_process():
    """Inside it, :func:`fit` trains on this process's data alone even when ``torch.distributed`` is initialised:
    the ranks of a distributed sweep (leakycuda.experiments.distribute) train different runs, not shards of one
    run's batch."""
    token = _ONE_PROCESS.set(True)
    try:
        yield
    finally:
        _ONE_PROCESS.reset(token)


def _dist_info():
    dist = torch.distributed
    if not _ONE_PROCESS.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t):
    torch.distributed.all_reduce(t)
    return t


def load_checkpoint(path, map_location="cpu", *, expect_format=CHECKPOINT_FORMAT):
    """Loads a :func:`fit` checkpoint with ``torch.load(weights_only=True)``; returns its dict.

    Keys: ``format``, ``step``, ``phase``, ``model`` (the LeakyResNet state dict), ``optimizer``,
    ``history``, ``config``. A LeakyEnsemble's checkpoint (``expect_format="leakycuda.fit_ensemble/1"``)
    also holds ``diverged``.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001  (torch.load raises pickle, zip and runtime errors alike)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        check.fail(ValueError, "path", "a leakycuda.train.fit checkpoint (written by torch.save in fit)",
                   "%s, which torch.load cannot read (%s: %s): the file is corrupt, truncated or not a "
                   "checkpoint" % (os.fspath(path), type(e).__name__, first[:200]))
    if not isinstance(ckpt, dict) or ckpt.get("format") != expect_format:
        check.fail(ValueError, "path", "a leakycuda.train.fit checkpoint (format %r)" % expect_format,
                   "%s, which holds %s" % (os.fspath(path), "format %r" % ckpt.get("format")
                                           if isinstance(ckpt, dict) else type(ckpt).__name__))
    missing = [k for k in ("step", "phase", "model", "optimizer", "history", "config") if k not in ckpt]
    if missing:
        check.fail(ValueError, "path", "a complete fit checkpoint", "%s without %s" % (os.fspath(path), missing))
    return ckpt


def _save_atomic(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=False):
    if phase == "adam":
        return torch.optim.Adam(params, lr=adam_lr, capturable=capturable)
    return torch.optim.SGD(params, lr=sgd_lr, momentum=sgd_momentum)


def _task_tensor(task, name, rows, cols, cols_name):
    t = check.matrix(getattr(task, name), "task.%s" % name, rows, cols, rows_name="N", cols_name=cols_name)
    if t.is_complex():
        check.fail(TypeError, "task.%s" % name, "a real tensor", str(t.dtype))
    return check.finite(t, "task.%s" % name, "NaN or inf data would make every loss NaN")


def _divergence(loss, loss0, zero_mse, factor):
    """fit's divergence rule: (diverged, threshold, scale). Diverged: ``loss`` is not finite, or above
    threshold = factor * scale, scale = max(loss0 (the loss at step 0, if finite), zero_mse); threshold
    is None when ``factor`` is None or the scale is 0."""
    scale = max(loss0, zero_mse) if loss0 is not None and math.isfinite(loss0) else zero_mse
    threshold = None if factor is None or not scale > 0 else factor * scale
    return not (math.isfinite(loss) and (threshold is None or loss <= threshold)), threshold, scale


def _divergence_error(rec, loss0, zero_mse, factor, lrs, history_path, result, who=""):
    """The :class:`DivergenceError` of a diverged record ``rec`` (one model's step, phase and loss) under
    :func:`_divergence`'s rule; ``lrs`` = (adam_lr, sgd_lr) for the hint, ``who`` names the model when several train.
    The hint names the cause: steps outside the stable range (``result.max_rho_Lt`` > STABLE_RHO_LT, where the skip
    connection amplifies X whatever the learning rate), else the learning rate of the phase (after step 0) or the
    initial weights."""
    loss = rec["loss"]
    _, threshold, scale = _divergence(loss, loss0, zero_mse, factor)
    lr_name, lr = ("adam_lr", lrs[0]) if rec["phase"] == "adam" else ("sgd_lr", lrs[1])
    why = ("the loss became %s" % loss if not math.isfinite(loss) else
           "the loss %.4g exceeds diverge_factor %g x the starting scale %.4g" % (loss, factor, scale))
    where = "at the start (step 0)" if rec["step"] == 0 else "by step %d (%s phase)" % (rec["step"], rec["phase"])
    reached = getattr(result, "max_rho_Lt", math.nan)
    reached = max([r for r in reached if math.isfinite(r)] or [math.nan]) if isinstance(reached, list) else reached
    if reached > STABLE_RHO_LT:
        hint = ("the steps reached max rho_l*Lt = %.3g, outside the stable range rho_l*Lt <= %g (the skip connection "
                "1 - rho_l*Lt amplifies X there): lower Lt or use more layers" % (reached, STABLE_RHO_LT))
    elif rec["step"] > 0:
        hint = "lower %s (now %g)" % (lr_name, lr)
    else:
        hint = "check the model's initial weights"
    return DivergenceError("training diverged%s: %s %s; %s%s" % (who, why, where, hint, "; history in %s"
                                                               % history_path if history_path else ""),
                           step=rec["step"], phase=rec["phase"], loss=loss, threshold=threshold, result=result)


def _progress_bar(total, step, desc, progress):
    """A tqdm bar on stderr for steps step..total (None when there is nothing left); shown when stderr is a
    terminal with ``progress=None``."""
    if total <= step:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc=desc, file=sys.stderr, leave=False,
                disable=None if progress is None else not progress, dynamic_ncols=True)


def _resume_path(resume, checkpoint_path):
    """The checkpoint to resume from (``resume`` a path, or True: checkpoint_path), or None when there is none yet."""
    path = resume if isinstance(resume, str) else (checkpoint_path if resume else None)
    return path if path is not None and os.path.exists(path) else None


def _load_resume(path, device, config, expect_format):
    """The checkpoint at ``path``; warns when its settings differ from ``config`` (the result will then differ)."""
    ckpt = load_checkpoint(path, map_location=device, expect_format=expect_format)
    changed = [k for k in ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum", "adapt_every")
               if ckpt["config"].get(k) != config[k]]
    if changed:
        what = ", ".join("%s %r -> %r" % (k, ckpt["config"].get(k), config[k]) for k in changed)
        warnings.warn("fit: resuming %s with different settings (%s): the result will differ from an "
                      "uninterrupted run" % (path, what), stacklevel=4)
    return ckpt


def _check_fit_args(module, task, a):
    """Every argument of :func:`fit`, checked before anything runs; returns the normalised values in ``a``."""
    params = _check_model(module)
    _check_task(task, getattr(module, "in_features", None), getattr(module, "out_features", None))
    a["lam"] = check.real(a["lam"], "lam", low=0.0, what="the regularization strength")
    _check_settings(a)
    return params


def _check_model(module):
    """A trainable model with finite weights; returns its trainable parameters."""
    if not isinstance(module, torch.nn.Module) or not callable(getattr(module, "regularization", None)) \
            or not isinstance(getattr(module, "rho", None), torch.Tensor):
        check.fail(TypeError, "model", "a LeakyResNet (an nn.Module with .rho and .regularization)",
                   type(module).__name__)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        check.fail(ValueError, "model", "a model with trainable parameters", "one whose parameters all have "
                   "requires_grad=False")
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            check.finite(t, "model.%s" % name, "a model with NaN or inf weights cannot be trained")
    return params


def _check_task(task, d_in, d_out):
    """x_train [N, d_in], y_train [N, d_out] (N >= 1) and optionally x_test, y_test, all finite."""
    for name in ("x_train", "y_train"):
        if not isinstance(getattr(task, name, None), torch.Tensor):
            check.fail(TypeError, "task", "an object with tensors x_train [N, d_in] and y_train [N, d_out], "
                       "e.g. leakycuda.data.bottleneck_task()", "%s without a tensor .%s" % (type(task).__name__, name))
    x = _task_tensor(task, "x_train", None, d_in, "in_features")
    if x.shape[0] < 1:
        check.fail(ValueError, "task.x_train", "non-empty (at least one training sample)", "shape %s"
                   % (list(x.shape),))
    _task_tensor(task, "y_train", x.shape[0], d_out, "out_features")
    x_test, y_test = getattr(task, "x_test", None), getattr(task, "y_test", None)
    if (x_test is None) != (y_test is None):
        check.fail(ValueError, "task", "both x_test and y_test, or neither", "only %s"
                   % ("x_test" if y_test is None else "y_test"))
    if x_test is not None:
        xt = _task_tensor(task, "x_test", None, d_in, "in_features")
        _task_tensor(task, "y_test", xt.shape[0], d_out, "out_features")


def _check_settings(a):
    """fit's other arguments (all but model, task and lam), normalised in place in ``a``."""
    for name in ("adam_steps", "sgd_steps"):
        a[name] = check.integer(a[name], name, low=0)
    for name, what in (("adam_lr", "the Adam learning rate"), ("sgd_lr", "the SGD learning rate"),
                       ("sgd_momentum", "the SGD momentum")):
        a[name] = check.real(a[name], name, low=0.0, what=what)
    a["adapt_every"] = check.integer(a["adapt_every"], "adapt_every", low=1, what="steps between adaptive updates")
    a["log_every"] = check.integer(a["log_every"], "log_every", low=1)
    if a["checkpoint_every"] is not None:
        a["checkpoint_every"] = check.integer(a["checkpoint_every"], "checkpoint_every", low=0,
                                              what="0 or None: only at the end")
    for name in ("adapt_during_sgd",):
        if not isinstance(a[name], bool):
            check.fail(TypeError, name, "True or False", repr(a[name]))
    if a["progress"] is not None and not isinstance(a["progress"], bool):
        check.fail(TypeError, "progress", "None, True or False", repr(a["progress"]))
    if a["desc"] is not None and not isinstance(a["desc"], str):
        check.fail(TypeError, "desc", "None or a string", repr(a["desc"]))
    if a["callback"] is not None and not callable(a["callback"]):
        check.fail(TypeError, "callback", "None or a callable callback(step, model, record)", repr(a["callback"]))
    if a["diverge_factor"] is not None:
        a["diverge_factor"] = check.real(a["diverge_factor"], "diverge_factor", low=1.0, strict=True,
                                         what="None turns the explosion test off")
    for name in ("checkpoint_path", "history_path"):
        if a[name] is not None:
            a[name] = check.writable_path(a[name], name, folder=False)
    resume = a["resume"]
    if isinstance(resume, (str, os.PathLike)):
        a["resume"] = check.writable_path(resume, "resume", folder=False)
    elif not isinstance(resume, bool):
        check.fail(TypeError, "resume", "True, False or a checkpoint path", repr(resume))
    elif resume and a["checkpoint_path"] is None:
        check.fail(ValueError, "resume", "False when there is no checkpoint_path (or the path to resume from)",
                   "True with checkpoint_path=None")


def fit(model, task, lam, *, adam_steps=5000, adam_lr=1e-3, sgd_steps=1000, sgd_lr=1e-3, sgd_momentum=0.0,
        adapt_every=50, adapt_during_sgd=False, log_every=50, checkpoint_path=None, checkpoint_every=1000,
        resume=False, history_path=None, progress=None, desc=None, callback=None, diverge_factor=DIVERGE_FACTOR,
        cuda_graph=None):
    """Trains ``model`` (a :class:`~leakycuda.LeakyResNet`) full-batch on ``task``; returns a :class:`FitResult`.

    ``model`` may also be a :class:`~leakycuda.ensemble.LeakyEnsemble`: its B members train at once
    (``task`` one task or B tasks, ``lam`` one number or B), see
    :func:`leakycuda._ensemble_fit.fit_ensemble`, which then runs with these arguments and returns an
    :class:`~leakycuda._ensemble_fit.EnsembleFitResult`.

    Loss: ``mse(model(x), y) + model.regularization(lam)``, i.e. C + lam/(2 Lt) sum_l rho_l ||W_l||_F^2.
    Recipe (the paper's appendix): ``adam_steps`` of Adam at ``adam_lr``, then ``sgd_steps`` of SGD at
    ``sgd_lr`` (momentum ``sgd_momentum``) to tighten convergence. A step count is global: steps
    0..adam_steps-1 are Adam, the rest SGD.

    task: anything with ``x_train`` [N, d_in], ``y_train`` [N, d_out] (and optionally ``x_test``,
    ``y_test``) tensors, e.g. :func:`leakycuda.data.bottleneck_task`; moved to the model's device and
    dtype (move the model first).

    Every argument is checked before the first step (nothing is trained or written on a bad one):
    ValueError or TypeError naming it. The data and the model's weights must be finite, N >= 1, the
    widths must match the model's ``in_features`` / ``out_features``, lam, the learning rates and the
    momentum are finite and >= 0, and the history and checkpoint paths must be writable.

    Adaptive steps: when ``model.steps == "adaptive"``, ``model.adapt_steps(x_train)`` runs before
    every step whose index is a multiple of ``adapt_every`` (during Adam only, unless
    ``adapt_during_sgd``, so that the SGD phase converges on a fixed discretisation). An update may
    push some rho_l * Lt above 1; that is reported once, as a :class:`~leakycuda.steps.StepOvershootWarning`
    at the end of the call, and as ``FitResult.max_rho_Lt``.

    History: every ``log_every`` steps, at the Adam -> SGD switch and after the last step, a record
    of the loss, train and test MSE and rho; written to ``history_path`` (JSON, plus a CSV beside it) at the end and at checkpoints.
    Checkpoints: every ``checkpoint_every`` steps and at the end when ``checkpoint_path`` is given
    (model and optimizer state, step, history; ``torch.load(weights_only=True)`` loads them).
    ``resume=True`` continues from ``checkpoint_path`` when that file exists (the result is the same
    as an uninterrupted run: training is full-batch and deterministic); ``resume`` may also be a path.

    Divergence: at every logged step, and before every checkpoint, the loss is tested. The run has
    diverged when the loss is not finite, or when it exceeds ``diverge_factor`` times the scale
    ``max(loss at step 0, (1/N)||y_train||_F^2)`` (the second term is the MSE of predicting zero, so a
    model that starts near zero loss still has a scale). ``diverge_factor=None`` keeps only the
    non-finite test. fit then writes the history so far (the diverged record included) to
    ``history_path``, leaves the last checkpoint as it was (no diverged weights are saved), and
    raises :class:`DivergenceError`, which carries that history.

    Progress: a tqdm bar on stderr; ``progress=None`` shows it only when stderr is a terminal.
    ``callback(step, model, record)`` is called after each logged step.

    Data parallelism: when ``torch.distributed`` is initialised with more than one process, ``fit``
    wraps the model in ``DistributedDataParallel`` (or uses it as given when ``model`` already is
    one), gives each rank a contiguous shard of the training set and scales each rank's data cost so
    that DDP's gradient average is exactly the full-batch gradient; the adaptive statistics are
    all-reduced (summed) so every rank holds the same rho. The parameters then match a single
    process on the full batch up to float rounding. Only rank 0 shows progress and writes files.
    Use gloo on CPU and nccl on CUDA (the caller initialises the process group). Inside
    :func:`one_process` every process trains its own model on its own data instead.

    CUDA graphs: on a CUDA device in a single process (``cuda_graph=None``, the default) each training
    step (forward, backward, optimizer step) is captured once in a CUDA graph and replayed, after
    two eager warm-up steps (:class:`leakycuda._graph.TrainStep`); Adam is then created with
    ``capturable=True``. rho is read by the graph in place, so adaptive updates need no re-capture;
    the Adam -> SGD switch, or a changed Lt, re-captures. The results equal the eager path's within
    float rounding. ``cuda_graph=False`` turns it off; ``True`` insists (ValueError on a CPU model or
    under data parallelism). On the CPU it is always off.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from . import _graph
    from .ensemble import LeakyEnsemble

    if isinstance(model, DDP):
        ddp_model, module = model, model.module
    else:
        ddp_model, module = None, model
    a = dict(lam=lam, adam_steps=adam_steps, adam_lr=adam_lr, sgd_steps=sgd_steps, sgd_lr=sgd_lr,
             sgd_momentum=sgd_momentum, adapt_every=adapt_every, adapt_during_sgd=adapt_during_sgd,
             log_every=log_every, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
             history_path=history_path, progress=progress, desc=desc, callback=callback,
             diverge_factor=diverge_factor)
    if isinstance(module, LeakyEnsemble):
        from ._ensemble_fit import fit_ensemble

        return fit_ensemble(model, task, cuda_graph=cuda_graph, **a)
    params = _check_fit_args(module, task, a)
    lam, adam_steps, adam_lr, sgd_steps, sgd_lr, sgd_momentum = (
        a[k] for k in ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum"))
    adapt_every, log_every, checkpoint_every, resume = (a[k] for k in ("adapt_every", "log_every",
                                                                         "checkpoint_every", "resume"))
    checkpoint_path, history_path, diverge_factor = a["checkpoint_path"], a["history_path"], a["diverge_factor"]
    adaptive = getattr(module, "steps", None) == "adaptive"

    rank, world = _dist_info()
    if world > 1 and ddp_model is None:
        dev = next(module.parameters()).device
        ddp_model = DDP(module, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False)
    net = ddp_model if ddp_model is not None else module

    p0 = params[0]
    device, dtype = p0.device, p0.dtype
    graphed = _graph.use_cuda_graph(cuda_graph, device, world)
    x_train = task.x_train.to(device=device, dtype=dtype)
    y_train = task.y_train.to(device=device, dtype=dtype)
    x_test = getattr(task, "x_test", None)
    y_test = getattr(task, "y_test", None)
    has_test = x_test is not None and y_test is not None and x_test.shape[0] > 0
    if has_test:
        x_test, y_test = x_test.to(device=device, dtype=dtype), y_test.to(device=device, dtype=dtype)
    n_total = x_train.shape[0]
    if world > 1:
        x_shard = torch.tensor_split(x_train, world)[rank]
        y_shard = torch.tensor_split(y_train, world)[rank]
    else:
        x_shard, y_shard = x_train, y_train
    # Each rank's data cost is (world / N) * sum over its shard: DDP averages gradients over ranks,
    # which gives (1/N) * sum over the whole batch, the full-batch gradient.
    data_scale = world / n_total
    reduce = _all_reduce_sum if world > 1 else None
    zero_mse = float(task.y_train.detach().to(torch.float64).square().sum()) / n_total

    config = {"lam": lam, "adam_steps": adam_steps, "adam_lr": adam_lr, "sgd_steps": sgd_steps,
              "sgd_lr": sgd_lr, "sgd_momentum": sgd_momentum, "adapt_every": adapt_every if adaptive else None,
              "adapt_during_sgd": adapt_during_sgd, "world_size": world}
    total = adam_steps + sgd_steps

    step, history = 0, []
    resume_path = _resume_path(resume, checkpoint_path)
    if resume_path is not None:
        ckpt = _load_resume(resume_path, device, config, CHECKPOINT_FORMAT)
        try:
            module.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            check.fail(ValueError, "resume", "a checkpoint of this model", "%s, written for another one (%s)"
                       % (resume_path, str(e).strip().replace("\n\t", " ").replace("\n", " ")[:400]))
        step, history = int(ckpt["step"]), list(ckpt["history"])
        phase = ckpt["phase"]
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        opt.load_state_dict(ckpt["optimizer"])
    else:
        phase = "adam" if adam_steps > 0 else "sgd"
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
    resumed_from = step
    Lt = float(getattr(module, "effective_depth", 0.0))
    max_rho_Lt = float(module.rho.detach().max()) * Lt if module.rho.numel() else 0.0
    overshoots, updates = 0, 0

    def body(opt):
        loss = data_scale * (net(x_shard) - y_shard).square().sum() + module.regularization(lam)
        loss.backward()
        opt.step()

    runner = _graph.TrainStep(body, graphed=graphed, device=device,
                              watch=lambda: list(module.parameters()) + list(module.buffers()))

    def evaluate():
        with torch.no_grad():
            sq = (module(x_shard) - y_shard).square().sum().to(torch.float64).reshape(1)
            if reduce is not None:
                sq = reduce(sq)
            train = float(sq[0]) / n_total
            reg = float(module.regularization(lam))
            test = float(mse(module(x_test), y_test)) if has_test else float("nan")
        return {"step": step, "phase": phase, "loss": train + reg, "train_mse": train, "reg": reg,
                "test_mse": test, "rho": [float(r) for r in module.rho.detach().cpu()]}

    def checkpoint():
        if checkpoint_path is None or rank != 0:
            return
        _save_atomic({"format": CHECKPOINT_FORMAT, "step": step, "phase": phase, "model": module.state_dict(),
                      "optimizer": opt.state_dict(), "history": history, "config": config}, checkpoint_path)
        if history_path is not None:
            save_history(history, history_path)

    def check_divergence(rec):
        if not _divergence(rec["loss"], history[0]["loss"] if history else None, zero_mse, diverge_factor)[0]:
            return
        if history and history[-1] is not rec:
            history.append(rec)
        if bar is not None:
            bar.close()
        if history_path is not None and rank == 0:
            save_history(history, history_path)
        raise _divergence_error(rec, history[0]["loss"], zero_mse, diverge_factor, (adam_lr, sgd_lr), history_path,
                                FitResult(history=history, steps=rec["step"], wall_s=time.perf_counter() - t0,
                                          resumed_from=resumed_from, max_rho_Lt=max_rho_Lt))

    bar = _progress_bar(total, step, desc or "fit", progress) if rank == 0 else None
    t0 = time.perf_counter()
    if not history:
        history.append(evaluate())
        check_divergence(history[0])
    while step < total:
        if step == adam_steps and phase == "adam":
            phase = "sgd"
            opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        if adaptive and step % adapt_every == 0 and (phase == "adam" or adapt_during_sgd):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StepOvershootWarning)
                module.adapt_steps(x_shard, reduce=reduce)
            updates += 1
            if rho_Lt_violations(module.rho, Lt):
                overshoots += 1
            max_rho_Lt = max(max_rho_Lt, float(module.rho.detach().max()) * Lt)
        runner(opt, key=(phase, module.effective_depth))
        step += 1
        if bar is not None:
            bar.update(1)
        due = checkpoint_every and step % checkpoint_every == 0 and step < total
        if step % log_every == 0 or step == total or step == adam_steps:
            rec = evaluate()
            history.append(rec)
            check_divergence(rec)
            if bar is not None:
                bar.set_postfix(loss="%.4g" % rec["loss"], test="%.4g" % rec["test_mse"], refresh=False)
            if callback is not None:
                callback(step, module, rec)
        elif due and checkpoint_path is not None:
            check_divergence(evaluate())
        if due:
            checkpoint()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    if step > resumed_from or (checkpoint_path is not None and not os.path.exists(checkpoint_path)):
        checkpoint()
    if history_path is not None and rank == 0:
        save_history(history, history_path)
    if overshoots:
        warnings.warn("fit: adaptive steps pushed rho_l * Lt above 1 in %d of %d updates (max %.4g, Lt = %g): the "
                      "skip connection 1 - rho_l*Lt is negative there; use more layers or a smaller Lt"
                      % (overshoots, updates, max_rho_Lt, Lt), StepOvershootWarning, stacklevel=2)
    return FitResult(history=history, steps=step, wall_s=wall, resumed_from=resumed_from, max_rho_Lt=max_rho_Lt)
