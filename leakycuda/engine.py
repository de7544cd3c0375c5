"""The training loop of :func:`leakycuda.train.fit`: B models trained full-batch at once (Adam then SGD, adaptive
steps, per-member divergence, history, checkpoints, data parallelism, CUDA graphs).

The B models are a LeakyEnsemble's members (:class:`Members`) or one model as B = 1 (:class:`OneModel`, which
keeps the single-model record, result and checkpoint formats). fit checks the arguments and prepares the data;
:func:`run` trains.
"""
import dataclasses
import os
import sys
import time
import warnings

import torch

from . import _graph
from . import _validate as check
from . import checkpoints, divergence
from .history import MEMBER_FIELDS, EnsembleFitResult, FitResult, save_ensemble_history, save_history
from .steps import StepOvershootWarning, rho_Lt_violations

__all__ = ["Data", "Members", "OneModel", "run"]

# The warnings of run name the line that called fit: run's caller is fit, whose caller is the user (stacklevel 3
# counted from run's own frame; one more per nested call).
_USER = 3


@dataclasses.dataclass
class Data:
    """A run's data on the model's device and dtype: x_train [N, d_in] and y_train [N, d_out] ([B, N, d] when each
    member has its own), the test pair likewise (None without test data), and ``zero_mse`` (B floats: the MSE of
    predicting zero, a scale of the divergence rule)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: object
    y_test: object
    zero_mse: list


class Members:
    """A LeakyEnsemble's B members as :func:`run` trains them, and the ensemble's formats: per-member history
    records (:class:`~leakycuda.history.EnsembleFitResult`), a leakycuda.fit_ensemble/1 checkpoint, a
    :class:`~leakycuda.divergence.MemberDivergedWarning` when members are stopped."""

    checkpoint_format = checkpoints.ENSEMBLE_FORMAT
    what = "ensemble"

    def __init__(self, module):
        self.module, self.B = module, module.models

    def default_desc(self):
        return "fit %d models" % self.B

    def config(self):
        """What a checkpoint's config holds besides the settings."""
        return {"models": self.B}

    def effective_depths(self):
        return list(self.module.effective_depths)

    def adaptive(self):
        """The members whose steps are adaptive."""
        return [b for b in range(self.B) if self.module.steps[b] == "adaptive"]

    def adapt(self, x, members, reduce):
        self.module.adapt_steps(x, members=members, reduce=reduce)

    def rho(self):
        """Each member's steps over its real layers: B tensors on the CPU."""
        rho = self.module.rho.detach().cpu()
        return [rho[b, :depth] for b, depth in enumerate(self.module.depths)]

    def record(self, step, phase, m, diverged):
        """A history record from the measurements ``m`` (lists of B) and the members' diverged flags."""
        return {"step": step, "phase": phase, **{k: m[k] for k in MEMBER_FIELDS}, "rho": m["rho"],
                "diverged": diverged}

    def losses(self, rec):
        """A record's B losses."""
        return list(rec["loss"])

    def postfix(self, rec):
        live = [v for v, d in zip(rec["loss"], rec["diverged"]) if not d]
        return {"loss": "%.4g" % min(live), "live": "%d/%d" % (len(live), self.B)}

    def save_history(self, history, path):
        save_ensemble_history(history, path)

    def result(self, history, steps, wall_s, resumed_from, diverged, max_rho_Lt):
        return EnsembleFitResult(history=history, steps=steps, wall_s=wall_s, resumed_from=resumed_from,
                                 diverged=diverged, max_rho_Lt=max_rho_Lt)

    def checkpoint_extra(self, diverged):
        return {"diverged": diverged}

    def saved_diverged(self, ckpt):
        return list(ckpt["diverged"])

    def stopped(self, newly, losses, step, left, stacklevel):
        """Members ``newly`` were found diverged at ``step`` (``left`` members still train)."""
        warnings.warn("fit: member(s) %s diverged by step %d (loss %s); they are stopped, the other %d go on"
                      % (newly, step, ["%.4g" % v for v in losses], left), divergence.MemberDivergedWarning,
                      stacklevel=stacklevel + 1)

    def who(self, b):
        """The DivergenceError's name for the run when member b was the last to diverge."""
        return " (every member of the ensemble; the last, member %d)" % b

    def whose(self, b):
        return "member %d's " % b


class OneModel(Members):
    """One model as B = 1 member, in the single-model formats: records of numbers (a
    :class:`~leakycuda.history.FitResult`), a leakycuda.fit/1 checkpoint, and no per-member warning (its
    divergence ends the run). A LeakyResNet, or any nn.Module with ``regularization(lam)``: ``rho``,
    ``effective_depth`` and ``steps == "adaptive"`` (with ``adapt_steps``) are used where it has them."""

    checkpoint_format = checkpoints.FIT_FORMAT
    what = "model"

    def __init__(self, module):
        self.module, self.B = module, 1

    def default_desc(self):
        return "fit"

    def config(self):
        return {}

    def effective_depths(self):
        return [float(getattr(self.module, "effective_depth", 0.0))]

    def adaptive(self):
        return [0] if getattr(self.module, "steps", None) == "adaptive" else []

    def adapt(self, x, members, reduce):
        self.module.adapt_steps(x, reduce=reduce)

    def rho(self):
        rho = getattr(self.module, "rho", None)
        return [rho.detach().cpu() if isinstance(rho, torch.Tensor) else torch.zeros(0)]

    def record(self, step, phase, m, diverged):
        return {"step": step, "phase": phase, **{k: m[k][0] for k in MEMBER_FIELDS}, "rho": m["rho"][0]}

    def losses(self, rec):
        return [rec["loss"]]

    def postfix(self, rec):
        return {"loss": "%.4g" % rec["loss"], "test": "%.4g" % rec["test_mse"]}

    def save_history(self, history, path):
        save_history(history, path)

    def result(self, history, steps, wall_s, resumed_from, diverged, max_rho_Lt):
        return FitResult(history=history, steps=steps, wall_s=wall_s, resumed_from=resumed_from,
                         max_rho_Lt=max_rho_Lt[0])

    def checkpoint_extra(self, diverged):
        return {}

    def saved_diverged(self, ckpt):
        return [None]

    def stopped(self, newly, losses, step, left, stacklevel):
        pass

    def who(self, b):
        return ""

    def whose(self, b):
        return ""


def _dist_info():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t):
    torch.distributed.all_reduce(t)
    return t


def _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=False):
    if phase == "adam":
        return torch.optim.Adam(params, lr=adam_lr, capturable=capturable)
    return torch.optim.SGD(params, lr=sgd_lr, momentum=sgd_momentum)


def _progress_bar(total, step, desc, progress):
    """A tqdm bar on stderr for steps step..total (None when there is nothing left); shown when stderr is a
    terminal with ``progress=None``."""
    if total <= step:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc=desc, file=sys.stderr, leave=False,
                disable=None if progress is None else not progress, dynamic_ncols=True)


def run(members, data, params, a, *, ddp_model=None, cuda_graph=None):
    """Trains ``members.module`` on ``data`` (a :class:`Data`) as :func:`leakycuda.train.fit` describes; returns
    ``members.result(...)`` (a FitResult or an EnsembleFitResult).

    ``params``: the trainable parameters; ``a``: fit's other arguments, checked and normalised (lam one number,
    or B in a list; ``log_every`` an int or a tuple of steps); ``ddp_model``: the model when the caller passed
    one wrapped in DistributedDataParallel. The loss is the sum over members of (data cost +
    regularization), the data cost ``world / N`` times the sum of squares over this rank's shard.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    module, B = members.module, members.B
    lam, adam_steps, adam_lr, sgd_steps, sgd_lr, sgd_momentum = (
        a[k] for k in ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum"))
    adapt_every, adapt_during_sgd, log_every, checkpoint_every = (
        a[k] for k in ("adapt_every", "adapt_during_sgd", "log_every", "checkpoint_every"))
    checkpoint_path, history_path, callback, factor = (
        a[k] for k in ("checkpoint_path", "history_path", "callback", "diverge_factor"))
    x_train, y_train, x_test, y_test, zero_mse = data.x_train, data.y_train, data.x_test, data.y_test, data.zero_mse
    device = x_train.device
    rank, world = _dist_info()
    graphed = _graph.use_cuda_graph(cuda_graph, device, world)
    adaptive = members.adaptive()

    if world > 1 and ddp_model is None:
        ddp_model = DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    net = ddp_model if ddp_model is not None else module
    n_total = x_train.shape[-2]
    x_shard, y_shard = x_train, y_train
    if world > 1:
        x_shard = torch.tensor_split(x_train, world, dim=-2)[rank]
        y_shard = torch.tensor_split(y_train, world, dim=-2)[rank]
    # Each rank's data cost is (world / N) * sum over its shard: DDP averages gradients over ranks,
    # which gives (1/N) * sum over the whole batch, the full-batch gradient.
    data_scale = world / n_total
    reduce = _all_reduce_sum if world > 1 else None

    config = {"lam": lam, "adam_steps": adam_steps, "adam_lr": adam_lr, "sgd_steps": sgd_steps,
              "sgd_lr": sgd_lr, "sgd_momentum": sgd_momentum, "adapt_every": adapt_every if adaptive else None,
              "adapt_during_sgd": adapt_during_sgd, "world_size": world, **members.config()}
    total = adam_steps + sgd_steps
    log_at = None if isinstance(log_every, int) else set(log_every)
    frozen = torch.zeros(B, dtype=torch.bool, device=device)
    diverged = [None] * B

    step, history = 0, []
    resume_path = checkpoints.resume_path(a["resume"], checkpoint_path)
    if resume_path is not None:
        ckpt = checkpoints.load_resume(resume_path, device, config, members.checkpoint_format, stacklevel=_USER)
        try:
            module.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            check.fail(ValueError, "resume", "a checkpoint of this %s" % members.what, "%s, written for another one "
                       "(%s)" % (resume_path, str(e).strip().replace("\n\t", " ").replace("\n", " ")[:400]))
        step, history, phase = int(ckpt["step"]), list(ckpt["history"]), ckpt["phase"]
        diverged = members.saved_diverged(ckpt)
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        opt.load_state_dict(ckpt["optimizer"])
    else:
        phase = "adam" if adam_steps > 0 else "sgd"
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
    resumed_from = step
    loss0 = members.losses(history[0]) if history else None

    def rho_Lt(rho):
        return [float(r.max()) * Lt if r.numel() else 0.0 for r, Lt in zip(rho, members.effective_depths())]

    max_rho_Lt = rho_Lt(members.rho())
    overshoots, updates = [0] * B, [0] * B

    def n_frozen():
        return sum(d is not None for d in diverged)

    def body(opt):
        data_cost = data_scale * (net(x_shard) - y_shard).square().sum(dim=(-2, -1))
        (data_cost + module.regularization(lam)).sum().backward()
        if n_frozen():
            for p in params:
                p.grad.masked_fill_(frozen.view((B,) + (1,) * (p.dim() - 1)), 0)
        opt.step()

    runner = _graph.TrainStep(body, graphed=graphed, device=device,
                              watch=lambda: list(module.parameters()) + list(module.buffers()))

    def measure():
        """The full-batch losses (lists of B floats, summed in float64) and each member's rho."""
        with torch.no_grad():
            sq = (module(x_shard) - y_shard).square().sum(dim=(-2, -1)).to(torch.float64).reshape(-1)
            if reduce is not None:
                sq = reduce(sq)
            train = sq / n_total
            reg = torch.as_tensor(module.regularization(lam), device=device).to(torch.float64).reshape(-1)
            if x_test is not None:
                test = ((module(x_test) - y_test).square().sum(dim=(-2, -1)).to(torch.float64).reshape(-1)
                        / x_test.shape[-2])
            else:
                test = torch.full_like(train, float("nan"))
            train, reg, test = torch.stack([train, reg.expand_as(train), test]).cpu().tolist()
        return {"loss": [t + r for t, r in zip(train, reg)], "train_mse": train, "reg": reg, "test_mse": test,
                "rho": [r.tolist() for r in members.rho()]}

    def result():
        return members.result(history, step, time.perf_counter() - t0, resumed_from, diverged, max_rho_Lt)

    def log(m, keep):
        """The record of the measurements ``m`` (appended to the history when ``keep``, or when it ends the run);
        stops the members it shows diverged, and raises DivergenceError when no member is left."""
        nonlocal loss0
        if loss0 is None:
            loss0 = m["loss"]
        newly = [b for b in range(B) if diverged[b] is None
                 and divergence.rule(m["loss"][b], loss0[b], zero_mse[b], factor)[0]]
        for b in newly:
            diverged[b] = step
        rec = members.record(step, phase, m, [d is not None for d in diverged])
        left = B - n_frozen()
        if keep or (newly and not left):
            history.append(rec)
        if newly:
            stop(newly, m, left)
        return rec

    def stop(newly, m, left):
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        if left:
            with torch.no_grad():
                for p in params:  # zero their moments too, or Adam would keep moving them
                    for v in opt.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            v[newly] = 0
        members.stopped(newly, [m["loss"][b] for b in newly], step, left, stacklevel=_USER + 2)
        if left:
            return
        if bar is not None:
            bar.close()
        if history_path is not None and rank == 0:
            members.save_history(history, history_path)
        b = newly[-1]
        raise divergence.divergence_error({"step": step, "phase": phase, "loss": m["loss"][b]}, loss0[b],
                                          zero_mse[b], factor, (adam_lr, sgd_lr), history_path, result(),
                                          who=members.who(b))

    def save_checkpoint():
        if checkpoint_path is None or rank != 0:
            return
        checkpoints.save_atomic({"format": members.checkpoint_format, "step": step, "phase": phase,
                                 "model": module.state_dict(), "optimizer": opt.state_dict(), "history": history,
                                 "config": config, **members.checkpoint_extra(diverged)}, checkpoint_path)
        if history_path is not None:
            members.save_history(history, history_path)

    bar = _progress_bar(total, step, a["desc"] or members.default_desc(), a["progress"]) if rank == 0 else None
    t0 = time.perf_counter()
    if not history:
        log(measure(), keep=True)
    while step < total:
        if step == adam_steps and phase == "adam":
            phase = "sgd"
            opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        if adaptive and step % adapt_every == 0 and (phase == "adam" or adapt_during_sgd):
            live = [b for b in adaptive if diverged[b] is None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StepOvershootWarning)
                members.adapt(x_shard, live, reduce)
            rho, Lts = members.rho(), members.effective_depths()
            now = rho_Lt(rho)
            for b in live:
                updates[b] += 1
                overshoots[b] += bool(rho_Lt_violations(rho[b], Lts[b]))
                max_rho_Lt[b] = max(max_rho_Lt[b], now[b])
        runner(opt, key=(phase, tuple(members.effective_depths()), n_frozen()))
        step += 1
        if bar is not None:
            bar.update(1)
        due = checkpoint_every and step % checkpoint_every == 0 and step < total
        if step == total or step == adam_steps or (step % log_every == 0 if log_at is None else step in log_at):
            rec = log(measure(), keep=True)
            if bar is not None:
                bar.set_postfix(**members.postfix(rec), refresh=False)
            if callback is not None:
                callback(step, module, rec)
        elif due and checkpoint_path is not None:
            log(measure(), keep=False)
        if due:
            save_checkpoint()
    if bar is not None:
        bar.close()
    res = result()
    if step > resumed_from or (checkpoint_path is not None and not os.path.exists(checkpoint_path)):
        save_checkpoint()
    if history_path is not None and rank == 0:
        members.save_history(history, history_path)
    for b in range(B):
        if overshoots[b]:
            warnings.warn("fit: %sadaptive steps pushed rho_l * Lt above 1 in %d of %d updates (max %.4g, Lt = %g): "
                          "the skip connection 1 - rho_l*Lt is negative there; use more layers or a smaller Lt"
                          % (members.whose(b), overshoots[b], updates[b], max_rho_Lt[b],
                             members.effective_depths()[b]), StepOvershootWarning, stacklevel=_USER)
    return res
