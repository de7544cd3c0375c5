"""fit for a LeakyEnsemble: every member trained at once, per-member history, divergence, checkpoints, DDP."""
import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings

import torch

from . import _graph
from .train import FitResult, _all_reduce_sum, _dist_info, _make_optimizer, _save_atomic, load_checkpoint

__all__ = ["EnsembleFitResult", "fit_ensemble", "save_ensemble_history"]

CHECKPOINT_FORMAT = "leakycuda.fit_ensemble/1"
_MEMBER_FIELDS = ("loss", "train_mse", "reg", "test_mse")


@dataclasses.dataclass
class EnsembleFitResult:
    """What :func:`leakycuda.train.fit` returns for a :class:`~leakycuda.ensemble.LeakyEnsemble`.

    Each history record: ``step``, ``phase`` and, per member (lists of B), ``loss``, ``train_mse``,
    ``reg``, ``test_mse``, ``rho`` (member b's real layers) and ``diverged`` (True from the record on
    which member b was found diverged). ``diverged[b]``: the step at which member b was stopped, or
    None. :meth:`member_history` and :meth:`member` give member b's history in the single-model format.
    """

    history: list
    steps: int
    wall_s: float
    resumed_from: int = 0
    diverged: list = dataclasses.field(default_factory=list)

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
                         resumed_from=self.resumed_from)

    def save(self, path):
        """Writes the history as JSON at ``path`` and as a long CSV beside it (see :func:`save_ensemble_history`)."""
        save_ensemble_history(self.history, path)


def save_ensemble_history(history, path):
    """Ensemble history records -> ``path`` (JSON, a list of records) and ``path`` with suffix .csv: one row per
    record and member (step, phase, member, loss, train_mse, reg, test_mse, diverged, rho_1..rho_L)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(history, f, indent=1)
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


def _data(task, B, device, dtype):
    """task (one task, or a sequence of B tasks) -> (x_train, y_train, x_test, y_test): [N, d] shared by all
    members or [B, N, d] one per member; the test pair may be None."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if len(tasks) not in (1, B):
        raise ValueError("task must be one task (shared by the members, or holding [B, N, d] tensors) or a sequence "
                         "of B = %d tasks (one per member), got %d tasks" % (B, len(tasks)))
    out = []
    for name in ("x_train", "y_train", "x_test", "y_test"):
        ts = [getattr(t, name, None) for t in tasks]
        if any(t is None for t in ts):
            if name.endswith("train"):
                raise TypeError("task must have tensors x_train and y_train, got %s without .%s"
                                % (type(tasks[0]).__name__, name))
            out.append(None)
            continue
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) != 1:
            raise ValueError("the members' task.%s must have one shape to be trained together, got %s"
                             % (name, sorted(shapes)))
        t = ts[0] if len(ts) == 1 else torch.stack(ts)
        if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != B):
            raise ValueError("task.%s must be [N, d] (shared) or [B, N, d] = [%d, N, d], got %s"
                             % (name, B, tuple(t.shape)))
        out.append(t.to(device=device, dtype=dtype))
    x_test, y_test = out[2], out[3]
    if x_test is None or y_test is None or x_test.shape[-2] == 0:
        out[2] = out[3] = None
    return out


def _diverged(loss, loss0, zero_mse, factor):
    """The divergence rule of :func:`leakycuda.train.fit` for one loss: not finite, or above
    ``factor`` times max(loss at step 0, the MSE of predicting zero)."""
    if not math.isfinite(loss):
        return True
    if factor is None:
        return False
    scale = max(loss0, zero_mse) if math.isfinite(loss0) else zero_mse
    return scale > 0 and loss > factor * scale


def fit_ensemble(model, task, lam, *, adam_steps=5000, adam_lr=1e-3, sgd_steps=1000, sgd_lr=1e-3, sgd_momentum=0.0,
                 adapt_every=50, adapt_during_sgd=False, log_every=50, checkpoint_path=None, checkpoint_every=1000,
                 resume=False, history_path=None, progress=None, desc=None, callback=None, diverge_factor=1e4,
                 cuda_graph=None):
    """:func:`leakycuda.train.fit` for a :class:`~leakycuda.ensemble.LeakyEnsemble` (it dispatches here).

    The loss is the sum over members of (data cost + regularization); member b's parameters enter
    only its own term, so the gradients are the B single-model gradients, and Adam and SGD, being
    elementwise, update each member exactly as a separate optimizer would. ``lam`` may be one
    number or B numbers. ``task``: one task (x [N, d] shared, or [B, N, d] tensors) or a sequence of
    B tasks of equal shapes (e.g. one per seed).

    Divergence is tested per member at every logged step (the rule of ``fit``); a diverged member
    is stopped, not the run: its gradients are masked to zero and its optimizer state (Adam's
    moments, SGD's momentum) zeroed, so its parameters stay bitwise where they were, and the others
    go on unaffected (members never mix). Its adaptive steps stop too. A UserWarning names it; when
    every member has diverged fit raises FloatingPointError.

    Everything else (recipe, adaptive steps, logging, checkpoints and ``resume``, progress,
    callback, data parallelism, ``cuda_graph``) is as in ``fit``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_model, module = (model, model.module) if isinstance(model, DDP) else (None, model)
    for name, v in (("adam_steps", adam_steps), ("sgd_steps", sgd_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("%s must be an integer >= 0, got %r" % (name, v))
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError("log_every must be an integer >= 1, got %r" % (log_every,))
    B = module.models
    adaptive = [b for b in range(B) if module.steps[b] == "adaptive"]
    if adaptive and not (isinstance(adapt_every, int) and adapt_every >= 1):
        raise ValueError("adapt_every must be an integer >= 1 for members with adaptive steps, got %r" % (adapt_every,))
    reg_lam = [float(v) for v in lam] if isinstance(lam, (list, tuple)) else float(lam)
    module.regularization(reg_lam)  # checks lam's length

    rank, world = _dist_info()
    params = [p for p in module.parameters() if p.requires_grad]
    device, dtype = module.weight.device, module.weight.dtype
    graphed = _graph.use_cuda_graph(cuda_graph, device, world)
    if world > 1 and ddp_model is None:
        ddp_model = DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    net = ddp_model if ddp_model is not None else module

    x_train, y_train, x_test, y_test = _data(task, B, device, dtype)
    n_total = x_train.shape[-2]
    x_shard, y_shard = x_train, y_train
    if world > 1:
        x_shard = torch.tensor_split(x_train, world, dim=-2)[rank]
        y_shard = torch.tensor_split(y_train, world, dim=-2)[rank]
    data_scale = world / n_total  # as in fit: DDP's gradient average is then the full-batch gradient
    reduce = _all_reduce_sum if world > 1 else None
    zero_mse = (y_train.detach().to(torch.float64).square().sum(dim=(-2, -1)) / n_total).expand(B).tolist()

    config = {"lam": reg_lam, "adam_steps": adam_steps, "adam_lr": adam_lr, "sgd_steps": sgd_steps,
              "sgd_lr": sgd_lr, "sgd_momentum": sgd_momentum, "adapt_every": adapt_every if adaptive else None,
              "adapt_during_sgd": adapt_during_sgd, "world_size": world, "models": B}
    total = adam_steps + sgd_steps
    frozen = torch.zeros(B, dtype=torch.bool, device=device)
    diverged = [None] * B

    step, history = 0, []
    resume_path = resume if isinstance(resume, (str, os.PathLike)) else (checkpoint_path if resume else None)
    if resume_path is not None and os.path.exists(resume_path):
        ckpt = load_checkpoint(resume_path, map_location=device, expect_format=CHECKPOINT_FORMAT)
        changed = [k for k in ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum", "adapt_every")
                   if ckpt["config"].get(k) != config[k]]
        if changed:
            what = ", ".join("%s %r -> %r" % (k, ckpt["config"].get(k), config[k]) for k in changed)
            warnings.warn("fit: resuming %s with different settings (%s): the result will differ from an "
                          "uninterrupted run" % (resume_path, what), stacklevel=3)
        module.load_state_dict(ckpt["model"])
        step, history, phase = int(ckpt["step"]), list(ckpt["history"]), ckpt["phase"]
        diverged = list(ckpt["diverged"])
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        opt.load_state_dict(ckpt["optimizer"])
    else:
        phase = "adam" if adam_steps > 0 else "sgd"
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
    resumed_from = step

    def n_frozen():
        return sum(d is not None for d in diverged)

    def body(opt):
        data = data_scale * (net(x_shard) - y_shard).square().sum(dim=(-2, -1))
        (data + module.regularization(reg_lam)).sum().backward()
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
            reg = module.regularization(reg_lam).to(torch.float64)
            if x_test is not None:
                test = (module(x_test) - y_test).square().sum(dim=(-2, -1)).to(torch.float64) / x_test.shape[-2]
            else:
                test = torch.full_like(train, float("nan"))
            train, reg, test = torch.stack([train, reg, test]).cpu().tolist()
            rho = module.rho.detach().cpu()
        return {"step": step, "phase": phase, "loss": [t + r for t, r in zip(train, reg)], "train_mse": train,
                "reg": reg, "test_mse": test, "rho": [rho[b, :module.depths[b]].tolist() for b in range(B)],
                "diverged": [d is not None for d in diverged]}

    def check(rec):
        newly = [b for b in range(B) if diverged[b] is None
                 and _diverged(rec["loss"][b], history[0]["loss"][b], zero_mse[b], diverge_factor)]
        if not newly:
            return
        for b in newly:
            diverged[b] = rec["step"]
            rec["diverged"][b] = True
        frozen.copy_(torch.tensor([d is not None for d in diverged]))
        with torch.no_grad():
            for p in params:  # zero the members' moments too, or Adam would keep moving them
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v[newly] = 0
        warnings.warn("fit: member(s) %s diverged by step %d (loss %s); they are stopped, the other %d go on"
                      % (newly, rec["step"], [rec["loss"][b] for b in newly], B - n_frozen()), UserWarning,
                      stacklevel=4)
        if n_frozen() == B:
            if history_path is not None and rank == 0:
                save_ensemble_history(history, history_path)
            raise FloatingPointError("fit: every member of the ensemble diverged (the last by step %d); lower the "
                                     "learning rate" % rec["step"])

    def checkpoint():
        if checkpoint_path is None or rank != 0:
            return
        _save_atomic({"format": CHECKPOINT_FORMAT, "step": step, "phase": phase, "model": module.state_dict(),
                      "optimizer": opt.state_dict(), "history": history, "config": config, "diverged": diverged},
                     os.fspath(checkpoint_path))
        if history_path is not None:
            save_ensemble_history(history, history_path)

    bar = None
    if rank == 0 and total > step:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=desc or "fit %d models" % B, file=sys.stderr, leave=False,
                   disable=None if progress is None else not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    if not history:
        history.append(evaluate())
        check(history[0])
    while step < total:
        if step == adam_steps and phase == "adam":
            phase = "sgd"
            opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        if adaptive and step % adapt_every == 0 and (phase == "adam" or adapt_during_sgd):
            module.adapt_steps(x_shard, members=[b for b in adaptive if diverged[b] is None], reduce=reduce)
        runner(opt, key=(phase, module.effective_depths, n_frozen()))
        step += 1
        if bar is not None:
            bar.update(1)
        if step % log_every == 0 or step == total:
            rec = evaluate()
            history.append(rec)
            check(rec)
            if bar is not None:
                live = [v for v, d in zip(rec["loss"], rec["diverged"]) if not d]
                bar.set_postfix(loss="%.4g" % min(live), live="%d/%d" % (len(live), B), refresh=False)
            if callback is not None:
                callback(step, module, rec)
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            checkpoint()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    if step > resumed_from or (checkpoint_path is not None and not os.path.exists(checkpoint_path)):
        checkpoint()
    if history_path is not None and rank == 0:
        save_ensemble_history(history, history_path)
    return EnsembleFitResult(history=history, steps=step, wall_s=wall, resumed_from=resumed_from, diverged=diverged)
