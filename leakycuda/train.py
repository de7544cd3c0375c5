"""Full-batch training: :func:`fit` (Adam then SGD, adaptive steps, history, checkpoints, DDP) of a LeakyResNet, of a
LeakyEnsemble (every member at once) or of another model with ``regularization(lam)``; the loop is :mod:`.engine`."""
import numbers
import os

import torch

from . import _validate as check
from . import engine
from .checkpoints import load_checkpoint
from .divergence import DIVERGE_FACTOR, DivergenceError, MemberDivergedWarning
from .ensemble import LeakyEnsemble
from .history import EnsembleFitResult, FitResult, save_ensemble_history, save_history

__all__ = ["DIVERGE_FACTOR", "DivergenceError", "EnsembleFitResult", "FitResult", "MemberDivergedWarning", "fit",
           "load_checkpoint", "mse", "save_ensemble_history", "save_history"]


def mse(pred, target):
    """The paper's data cost C = (1/N) ||pred - target||_F^2 (sum over outputs, mean over samples).

    pred and target: tensors of the same shape [N, d] (no broadcasting).
    """
    check.tensor(pred, "pred", "[N, d]")
    check.tensor(target, "target", "[N, d]")
    if pred.shape != target.shape or pred.dim() < 1:
        check.fail(ValueError, "target", "of pred's shape %s" % (list(pred.shape),), "shape %s" % (list(target.shape),))
    return (pred - target).square().sum() / pred.shape[0]


def _task_tensor(task, name, rows, cols, cols_name):
    t = check.matrix(getattr(task, name), "task.%s" % name, rows, cols, rows_name="N", cols_name=cols_name)
    if t.is_complex():
        check.fail(TypeError, "task.%s" % name, "a real tensor", str(t.dtype))
    return check.finite(t, "task.%s" % name, "NaN or inf data would make every loss NaN")


def _check_fit_args(module, task, a):
    """Every argument of :func:`fit`, checked before anything runs; returns the normalised values in ``a``."""
    params = _check_model(module)
    _check_task(task, getattr(module, "in_features", None), getattr(module, "out_features", None))
    a["lam"] = check.real(a["lam"], "lam", low=0.0, what="the regularization strength")
    _check_settings(a)
    return params


def _check_ensemble_args(module, task, a):
    """:func:`_check_fit_args` for a LeakyEnsemble (lam one number or B, task one or B); returns its trainable
    parameters and its :class:`~leakycuda.engine.Data`."""
    params = _check_model(module)
    B = module.models
    lam = a["lam"]
    lams = list(lam) if isinstance(lam, (list, tuple)) else [lam]
    if len(lams) not in (1, B):
        check.fail(ValueError, "lam", "one number or B = %d numbers (one per member)" % B, "%d numbers" % len(lams))
    lams = [check.real(v, "lam", low=0.0, what="the regularization strength") for v in lams]
    a["lam"] = lams if len(lams) == B and isinstance(lam, (list, tuple)) else lams[0]
    _check_settings(a)
    data = _ensemble_data(task, B, module.in_features, module.out_features, module.weight.device, module.weight.dtype)
    return params, data


def _check_model(module):
    """A trainable model with finite weights; returns its trainable parameters."""
    if not isinstance(module, torch.nn.Module) or not callable(getattr(module, "regularization", None)):
        check.fail(TypeError, "model", "a LeakyResNet, a LeakyEnsemble or another nn.Module with .regularization(lam)",
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
    if isinstance(a["log_every"], numbers.Integral) or not hasattr(a["log_every"], "__iter__"):
        a["log_every"] = check.integer(a["log_every"], "log_every", low=1,
                                       what="steps between records, or a list of the steps to record")
    else:
        a["log_every"] = check.distinct(a["log_every"], "log_every", lambda v, n: check.integer(v, n, low=0),
                                        what="the steps after which to record")
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

    ``model`` may also be a :class:`~leakycuda.ensemble.LeakyEnsemble` (see "Ensembles" below; it returns an
    :class:`EnsembleFitResult`), or any other ``nn.Module`` with ``regularization(lam)`` (e.g. the deep linear
    networks of :mod:`leakycuda.related`): its ``rho``, ``effective_depth`` and adaptive steps are then used
    where it has them. Every kind runs the same loop (:func:`leakycuda.engine.run`; one model is B = 1).

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

    History: a record of the loss, train and test MSE and rho at step 0, every ``log_every`` steps (or,
    when ``log_every`` is a list of steps, after each of those), at the Adam -> SGD switch and after the
    last step; written to ``history_path`` (JSON, plus a CSV beside it) at the end and at checkpoints.
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
    Use gloo on CPU and nccl on CUDA (the caller initialises the process group).

    CUDA graphs: on a CUDA device in a single process (``cuda_graph=None``, the default) each training
    step (forward, backward, optimizer step) is captured once in a CUDA graph and replayed, after
    two eager warm-up steps (:class:`leakycuda._graph.TrainStep`); Adam is then created with
    ``capturable=True``. rho is read by the graph in place, so adaptive updates need no re-capture;
    the Adam -> SGD switch, or a changed Lt, re-captures. The results equal the eager path's within
    float rounding. ``cuda_graph=False`` turns it off; ``True`` insists (ValueError on a CPU model or
    under data parallelism). On the CPU it is always off.

    Ensembles: for a LeakyEnsemble the loss is the sum over members of (data cost + regularization);
    member b's parameters enter only its own term, so the gradients are the B single-model gradients,
    and Adam and SGD, being elementwise, update each member exactly as a separate optimizer would.
    ``lam``: one number or B (one per member). ``task``: one task shared by every member, or a sequence
    of B tasks of equal shapes (e.g. one per seed). Member b's history and results are then those of fit
    on member b alone, up to float rounding (the batched op and reductions may round differently).
    Divergence is tested per member; a diverged member is stopped, not the run: a
    :class:`MemberDivergedWarning` names it, its gradients are masked to zero and its optimizer state
    (Adam's moments, SGD's momentum) is zeroed, so its parameters stay bitwise where they were, its
    adaptive steps stop too, and the other members go on unaffected (members never mix). When every
    member has diverged, fit raises :class:`DivergenceError` (its ``result`` an :class:`EnsembleFitResult`).
    The adaptive statistics of every member are all-reduced at once under data parallelism.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_model, module = (model, model.module) if isinstance(model, DDP) else (None, model)
    a = dict(lam=lam, adam_steps=adam_steps, adam_lr=adam_lr, sgd_steps=sgd_steps, sgd_lr=sgd_lr,
             sgd_momentum=sgd_momentum, adapt_every=adapt_every, adapt_during_sgd=adapt_during_sgd,
             log_every=log_every, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
             history_path=history_path, progress=progress, desc=desc, callback=callback,
             diverge_factor=diverge_factor)
    if isinstance(module, LeakyEnsemble):
        params, data = _check_ensemble_args(module, task, a)
        members = engine.Members(module)
    else:
        params = _check_fit_args(module, task, a)
        data = _model_data(task, params[0].device, params[0].dtype)
        members = engine.OneModel(module)
    return engine.run(members, data, params, a, ddp_model=ddp_model, cuda_graph=cuda_graph)


def _model_data(task, device, dtype):
    """One model's :class:`~leakycuda.engine.Data`: the (checked) task on the model's device and dtype; no test pair
    when it has no test points."""
    x_train = task.x_train.to(device=device, dtype=dtype)
    y_train = task.y_train.to(device=device, dtype=dtype)
    x_test, y_test = getattr(task, "x_test", None), getattr(task, "y_test", None)
    if x_test is not None and y_test is not None and x_test.shape[0] > 0:
        x_test, y_test = x_test.to(device=device, dtype=dtype), y_test.to(device=device, dtype=dtype)
    else:
        x_test = y_test = None
    zero_mse = float(task.y_train.detach().to(torch.float64).square().sum()) / x_train.shape[0]
    return engine.Data(x_train, y_train, x_test, y_test, [zero_mse])


def _ensemble_data(task, B, d_in, d_out, device, dtype):
    """A LeakyEnsemble's :class:`~leakycuda.engine.Data` from one task shared by the members, or a sequence of B
    tasks of equal shapes: [N, d] when shared, [B, N, d] when stacked; no test pair when there are no test points.
    Checked as fit checks a task (finite, matching widths, N >= 1)."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if len(tasks) not in (1, B):
        check.fail(ValueError, "task", "one task (shared by the members) or a sequence of B = %d tasks" % B,
                   "a sequence of %d" % len(tasks))
    for t in tasks:
        _check_task(t, d_in, d_out)
    out = []
    for name in ("x_train", "y_train", "x_test", "y_test"):
        ts = [getattr(t, name, None) for t in tasks]
        if ts[0] is None:
            out.append(None)
            continue
        shapes = sorted({tuple(t.shape) for t in ts})
        if len(shapes) != 1:
            check.fail(ValueError, "task", "B tasks whose %s have one shape (they train together)" % name,
                       "shapes %s" % shapes)
        out.append((ts[0] if len(ts) == 1 else torch.stack(ts)).to(device=device, dtype=dtype))
    if out[2] is not None and out[2].shape[-2] == 0:
        out[2] = out[3] = None
    y_train = out[1]
    zero_mse = (y_train.detach().to(torch.float64).square().sum(dim=(-2, -1)) / y_train.shape[-2]).expand(B).tolist()
    return engine.Data(*out, zero_mse)
