"""fit for a LeakyEnsemble: every member trained at once, per-member history, divergence, checkpoints, DDP."""
import csv
import dataclasses
import os
import time
import warnings

import torch

from . import _graph, _json
from . import _validate as check
from .steps import StepOvershootWarning, rho_Lt_violations
from .train import (FitResult, _all_reduce_sum, _check_model, _check_settings, _check_task, _dist_info, _divergence,
                    _divergence_error, _load_resume, _make_optimizer, _progress_bar, _resume_path, _save_atomic)

__all__ = ["EnsembleFitResult", "MemberDivergedWarning", "fit_ensemble", "save_ensemble_history"]

CHECKPOINT_FORMAT = "leakycuda.fit_ensemble/1"
_MEMBER_FIELDS = ("loss", "train_mse", "reg", "test_mse")


class MemberDivergedWarning(UserWarning):
    """Some members of an ensemble diverged and were stopped; the others train on."""


@dataclasses.dataclass
class EnsembleFitResult:
    """What :func:`leakycuda.train.fit` returns for a :class:`~leakycuda.ensemble.LeakyEnsemble`.

    Each history record: ``step``, ``phase`` and, per member (lists of B), ``loss``, ``train_mse``,
    ``reg``, ``test_mse``, ``rho`` (member b's real layers) and ``diverged`` (True from the record on
    which member b was found diverged). ``diverged[b]``: the step at which member b was stopped, or
    None; ``max_rho_Lt[b]``: the largest rho_l * Lt member b's steps reached. :meth:`member_history`
    and :meth:`member` give member b's history in the single-model format.
    """

    history: list
    steps: int
    wall_s: float
    resumed_from: int = 0
    diverged: list = dataclasses.field(default_factory=list)
    max_rho_Lt: list = dataclasses.field(default_factory=list)

    @property
    def models(self):
        return len(self.diverged)

    @property
    def final(self):
        return self.history[-1] if self.history else {}

    def member_history(self, b):
        """Member b's records as :func:`fit` writes them for one model (up to its divergence, that record included)."""
        out = []
        for rec in self.history:
            out.append({"step": rec["step"], "phase": rec["phase"], **{k: rec[k][b] for k in _MEMBER_FIELDS},
                        "rho": rec["rho"][b]})
            if rec["diverged"][b]:
                break
        return out

    def member(self, b):
        """Member b's run as a :class:`~leakycuda.train.FitResult` (``steps``: where it stopped)."""
        steps = self.steps if self.diverged[b] is None else self.diverged[b]
        return FitResult(history=self.member_history(b), steps=steps, wall_s=self.wall_s,
                         resumed_from=self.resumed_from, max_rho_Lt=self.max_rho_Lt[b])

    def save(self, path):
        """Writes the history as JSON at ``path`` and as a long CSV beside it (see :func:`save_ensemble_history`)."""
        save_ensemble_history(self.history, path)


def save_ensemble_history(history, path):
    """Ensemble history records -> ``path`` (JSON, a list of records) and ``path`` with suffix .csv: one row per
    record and member (step, phase, member, loss, train_mse, reg, test_mse, diverged, rho_1..rho_L)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _json.dump(history, path, indent=1)
    if not history:
        return
    L = max(len(r) for r in history[0]["rho"])
    with open(os.path.splitext(path)[0] + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "phase", "member", *_MEMBER_FIELDS, "diverged"] + ["rho_%d" % (i + 1) for i in range(L)])
        for rec in history:
            for b, rho in enumerate(rec["rho"]):
                w.writerow([rec["step"], rec["phase"], b] + [rec[k][b] for k in _MEMBER_FIELDS]
                           + [rec["diverged"][b]] + list(rho))


def _data(task, B, d_in, d_out, device, dtype):
    """task (one task shared by the members, or a sequence of B tasks of equal shapes) -> (x_train, y_train,
    x_test, y_test): [N, d] when shared, [B, N, d] when stacked; the test pair may be None. Checked as fit checks
    a task (finite, matching widths, N >= 1)."""
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
    return out


def fit_ensemble(model, task, lam, *, adam_steps, adam_lr, sgd_steps, sgd_lr, sgd_momentum, adapt_every,
                 adapt_during_sgd, log_every, checkpoint_path, checkpoint_every, resume, history_path, progress, desc,
                 callback, diverge_factor, cuda_graph):
    """:func:`leakycuda.train.fit` for a :class:`~leakycuda.ensemble.LeakyEnsemble` (fit dispatches here; the
    arguments and their defaults are fit's).

    The loss is the sum over members of (data cost + regularization); member b's parameters enter
    only its own term, so the gradients are the B single-model gradients, and Adam and SGD, being
    elementwise, update each member exactly as a separate optimizer would. ``lam``: one number or B
    (one per member). ``task``: one task shared by every member, or a sequence of B tasks of equal
    shapes (e.g. one per seed). Member b's history and results are then those of fit on member b
    alone, up to float rounding (the batched op and reductions may round differently).

    Divergence: fit's rule, per member, at every logged step and before every checkpoint. A diverged
    member is stopped, not the run: a :class:`MemberDivergedWarning` names it, its gradients are
    masked to zero and its optimizer state (Adam's moments, SGD's momentum) is zeroed, so its
    parameters stay bitwise where they were (Adam would otherwise keep moving it on its momentum),
    its adaptive steps stop too, and the other members go on unaffected (members never mix). When
    every member has diverged, fit raises :class:`~leakycuda.train.DivergenceError` (its ``result``
    an :class:`EnsembleFitResult`).

    Everything else (recipe, adaptive steps with one all-reduce of every member's statistics,
    logging, checkpoints and ``resume``, progress, callback, data parallelism, ``cuda_graph``) is as in fit.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_model, module = (model, model.module) if isinstance(model, DDP) else (None, model)
    params = _check_model(module)
    B = module.models
    lams = list(lam) if isinstance(lam, (list, tuple)) else [lam]
    if len(lams) not in (1, B):
        check.fail(ValueError, "lam", "one number or B = %d numbers (one per member)" % B, "%d numbers" % len(lams))
    lams = [check.real(v, "lam", low=0.0, what="the regularization strength") for v in lams]
    lam = lams if len(lams) == B and isinstance(lam, (list, tuple)) else lams[0]
    a = dict(adam_steps=adam_steps, adam_lr=adam_lr, sgd_steps=sgd_steps, sgd_lr=sgd_lr, sgd_momentum=sgd_momentum,
             adapt_every=adapt_every, adapt_during_sgd=adapt_during_sgd, log_every=log_every,
             checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
             history_path=history_path, progress=progress, desc=desc, callback=callback,
             diverge_factor=diverge_factor)
    _check_settings(a)
    adam_steps, adam_lr, sgd_steps, sgd_lr, sgd_momentum, adapt_every, log_every, checkpoint_every = (
        a[k] for k in ("adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum", "adapt_every", "log_every",
                       "checkpoint_every"))
    checkpoint_path, history_path, resume, diverge_factor = (a[k] for k in ("checkpoint_path", "history_path",
                                                                             "resume", "diverge_factor"))
    device, dtype = module.weight.device, module.weight.dtype
    x_train, y_train, x_test, y_test = _data(task, B, module.in_features, module.out_features, device, dtype)
    rank, world = _dist_info()
    graphed = _graph.use_cuda_graph(cuda_graph, device, world)
    adaptive = [b for b in range(B) if module.steps[b] == "adaptive"]

    if world > 1 and ddp_model is None:
        ddp_model = DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    net = ddp_model if ddp_model is not None else module
    n_total = x_train.shape[-2]
    x_shard, y_shard = x_train, y_train
    if world > 1:
        x_shard = torch.tensor_split(x_train, world, dim=-2)[rank]
        y_shard = torch.tensor_split(y_train, world, dim=-2)[rank]
    data_scale = world / n_total  # as in fit: DDP's gradient average is then the full-batch gradient
    reduce = _all_reduce_sum if world > 1 else None
    zero_mse = (y_train.detach().to(torch.float64).square().sum(dim=(-2, -1)) / n_total).expand(B).tolist()

    config = {"lam": lam, "adam_steps": adam_steps, "adam_lr": adam_lr, "sgd_steps": sgd_steps,
              "sgd_lr": sgd_lr, "sgd_momentum": sgd_momentum, "adapt_every": adapt_every if adaptive else None,
              "adapt_during_sgd": adapt_during_sgd, "world_size": world, "models": B}
    total = adam_steps + sgd_steps
    frozen = torch.zeros(B, dtype=torch.bool, device=device)
    diverged = [None] * B

    step, history = 0, []
    resume_path = _resume_path(resume, checkpoint_path)
    if resume_path is not None:
        ckpt = _load_resume(resume_path, device, config, CHECKPOINT_FORMAT)
        try:
            module.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            check.fail(ValueError, "resume", "a checkpoint of this ensemble", "%s, written for another one (%s)"
                       % (resume_path, str(e).strip().replace("\n\t", " ").replace("\n", " ")[:400]))
        step, history, phase = int(ckpt["step"]), list(ckpt["history"]), ckpt["phase"]
        diverged = list(ckpt["diverged"])
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        opt.load_state_dict(ckpt["optimizer"])
    else:
        phase = "adam" if adam_steps > 0 else "sgd"
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
    resumed_from = step

    def rho_Lt():
        rho = module.rho.detach().to(torch.float64).max(dim=1).values.cpu()
        return [float(r) * Lt for r, Lt in zip(rho, module.effective_depths)]

    max_rho_Lt = rho_Lt()
    overshoots, updates = [0] * B, [0] * B

    def n_frozen():
        return sum(d is not None for d in diverged)

    def body(opt):
        data = data_scale * (net(x_shard) - y_shard).square().sum(dim=(-2, -1))
        (data + module.regularization(lam)).sum().backward()
        if n_frozen():
            for p in params:
                p.grad.masked_fill_(frozen.view((B,) + (1,) * (p.dim() - 1)), 0)
        opt.step()

    runner = _graph.TrainStep(body, graphed=graphed, device=device,
                              watch=lambda: list(module.parameters()) + list(module.buffers()))

    def evaluate():
        with torch.no_grad():
            sq = (module(x_shard) - y_shard).square().sum(dim=(-2, -1)).to(torch.float64)
            if reduce is not None:
                sq = reduce(sq)
            train = sq / n_total
            reg = module.regularization(lam).to(torch.float64)
            if x_test is not None:
                test = (module(x_test) - y_test).square().sum(dim=(-2, -1)).to(torch.float64) / x_test.shape[-2]
            else:
                test = torch.full_like(train, float("nan"))
            train, reg, test = torch.stack([train, reg, test]).cpu().tolist()
            rho = module.rho.detach().cpu()
        return {"step": step, "phase": phase, "loss": [t + r for t, r in zip(train, reg)], "train_mse": train,
                "reg": reg, "test_mse": test, "rho": [rho[b, :module.depths[b]].tolist() for b in range(B)],
                "diverged": [d is not None for d in diverged]}

    def result():
        return EnsembleFitResult(history=history, steps=step, wall_s=time.perf_counter() - t0,
                                 resumed_from=resumed_from, diverged=diverged, max_rho_Lt=max_rho_Lt)

    def stop_diverged(rec):
        """Stops the members that rec shows diverged; raises DivergenceError when none is left."""
        loss0 = history[0]["loss"] if history else rec["loss"]
        newly = [b for b in range(B) if diverged[b] is None
                 and _divergence(rec["loss"][b], loss0[b], zero_mse[b], diverge_factor)[0]]
        if not newly:
            return
        for b in newly:
            diverged[b] = rec["step"]
            rec["diverged"][b] = True
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        with torch.no_grad():
            for p in params:  # zero their moments too, or Adam would keep moving them
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v[newly] = 0
        warnings.warn("fit: member(s) %s diverged by step %d (loss %s); they are stopped, the other %d go on"
                      % (newly, rec["step"], ["%.4g" % rec["loss"][b] for b in newly], B - n_frozen()),
                      MemberDivergedWarning, stacklevel=4)
        if n_frozen() == B:
            if history and history[-1] is not rec:
                history.append(rec)
            if bar is not None:
                bar.close()
            if history_path is not None and rank == 0:
                save_ensemble_history(history, history_path)
            b = newly[-1]
            member_rec = {"step": rec["step"], "phase": rec["phase"], "loss": rec["loss"][b]}
            raise _divergence_error(member_rec, loss0[b], zero_mse[b], diverge_factor, (adam_lr, sgd_lr), history_path,
                                    result(), who=" (every member of the ensemble; the last, member %d)" % b)

    def checkpoint():
        if checkpoint_path is None or rank != 0:
            return
        _save_atomic({"format": CHECKPOINT_FORMAT, "step": step, "phase": phase, "model": module.state_dict(),
                      "optimizer": opt.state_dict(), "history": history, "config": config, "diverged": diverged},
                     checkpoint_path)
        if history_path is not None:
            save_ensemble_history(history, history_path)

    bar = _progress_bar(total, step, desc or "fit %d models" % B, progress) if rank == 0 else None
    t0 = time.perf_counter()
    if not history:
        history.append(evaluate())
        stop_diverged(history[0])
    while step < total:
        if step == adam_steps and phase == "adam":
            phase = "sgd"
            opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        if adaptive and step % adapt_every == 0 and (phase == "adam" or adapt_during_sgd):
            live = [b for b in adaptive if diverged[b] is None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StepOvershootWarning)
                module.adapt_steps(x_shard, members=live, reduce=reduce)
            now = rho_Lt()
            for b in live:
                updates[b] += 1
                overshoots[b] += bool(rho_Lt_violations(module.rho[b, :module.depths[b]], module.effective_depths[b]))
                max_rho_Lt[b] = max(max_rho_Lt[b], now[b])
        runner(opt, key=(phase, module.effective_depths, n_frozen()))
        step += 1
        if bar is not None:
            bar.update(1)
        due = checkpoint_every and step % checkpoint_every == 0 and step < total
        if step % log_every == 0 or step == total or step == adam_steps:
            rec = evaluate()
            history.append(rec)
            stop_diverged(rec)
            if bar is not None:
                live = [v for v, d in zip(rec["loss"], rec["diverged"]) if not d]
                bar.set_postfix(loss="%.4g" % min(live), live="%d/%d" % (len(live), B), refresh=False)
            if callback is not None:
                callback(step, module, rec)
        elif due and checkpoint_path is not None:
            stop_diverged(evaluate())
        if due:
            checkpoint()
    if bar is not None:
        bar.close()
    res = result()
    if step > resumed_from or (checkpoint_path is not None and not os.path.exists(checkpoint_path)):
        checkpoint()
    if history_path is not None and rank == 0:
        save_ensemble_history(history, history_path)
    for b in range(B):
        if overshoots[b]:
            warnings.warn("fit: member %d's adaptive steps pushed rho_l * Lt above 1 in %d of %d updates (max %.4g, "
                          "Lt = %g): the skip connection 1 - rho_l*Lt is negative there; use more layers or a smaller "
                          "Lt" % (b, overshoots[b], updates[b], max_rho_Lt[b], module.effective_depths[b]),
                          StepOvershootWarning, stacklevel=3)
    return res
