"""Full-batch training of a LeakyResNet: Adam then SGD, adaptive steps, history, checkpoints, DDP."""
import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings

import torch

__all__ = ["FitResult", "fit", "load_checkpoint", "mse", "save_history"]

CHECKPOINT_FORMAT = "leakycuda.fit/1"


def mse(pred, target):
    """The paper's data cost C = (1/N) ||pred - target||_F^2 (sum over outputs, mean over samples)."""
    return (pred - target).square().sum() / pred.shape[0]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the history records (one dict per logged step) and timings.

    Each record: ``step`` (optimizer steps done), ``phase`` ("adam" or "sgd"), ``loss`` (data cost +
    regularization), ``train_mse``, ``reg``, ``test_mse`` (NaN without test data), ``rho`` (list of L).
    """

    history: list
    steps: int
    wall_s: float
    resumed_from: int = 0

    @property
    def final(self):
        return self.history[-1] if self.history else {}

    def save(self, path):
        """Writes the history as JSON at ``path`` and as CSV next to it (same stem, .csv)."""
        save_history(self.history, path)


def save_history(history, path):
    """History records -> ``path`` (JSON: a list of records) and ``path`` with suffix .csv (rho_1..rho_L columns)."""
    path = os.fspath(path)
    root, _ = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(history, f, indent=1)
    if not history:
        return
    L = len(history[0].get("rho", []))
    fields = [k for k in history[0] if k != "rho"] + ["rho_%d" % (i + 1) for i in range(L)]
    with open(root + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for rec in history:
            w.writerow([rec[k] for k in fields[: len(fields) - L]] + list(rec.get("rho", [])))


def _dist_info():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t):
    torch.distributed.all_reduce(t)
    return t


def load_checkpoint(path, map_location="cpu", *, expect_format=CHECKPOINT_FORMAT):
    """Loads a :func:`fit` checkpoint with ``torch.load(weights_only=True)``; returns its dict.

    Keys: ``format``, ``step``, ``phase``, ``model`` (the LeakyResNet state dict), ``optimizer``,
    ``history``, ``config`` (an ensemble's checkpoint, ``expect_format="leakycuda.fit_ensemble/1"``,
    also holds ``diverged``).
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != expect_format:
        raise ValueError("%s is not a leakycuda.train.fit checkpoint of format %r (it holds %r)"
                         % (path, expect_format, ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__))
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


def fit(model, task, lam, *, adam_steps=5000, adam_lr=1e-3, sgd_steps=1000, sgd_lr=1e-3, sgd_momentum=0.0,
        adapt_every=50, adapt_during_sgd=False, log_every=50, checkpoint_path=None, checkpoint_every=1000,
        resume=False, history_path=None, progress=None, desc=None, callback=None, cuda_graph=None):
    """Trains ``model`` (a :class:`~leakycuda.LeakyResNet`) full-batch on ``task``; returns a :class:`FitResult`.

    ``model`` may also be a :class:`~leakycuda.ensemble.LeakyEnsemble` (B models trained at once, ``task``
    one task or B tasks, ``lam`` one number or B): see :func:`leakycuda._ensemble_fit.fit_ensemble`,
    which then runs with these arguments and returns an :class:`~leakycuda._ensemble_fit.EnsembleFitResult`.

    Loss: ``mse(model(x), y) + model.regularization(lam)``, i.e. C + lam/(2 Lt) sum_l rho_l ||W_l||_F^2.
    Recipe (the paper's appendix): ``adam_steps`` of Adam at ``adam_lr``, then ``sgd_steps`` of SGD at
    ``sgd_lr`` (momentum ``sgd_momentum``) to tighten convergence. A step count is global: steps
    0..adam_steps-1 are Adam, the rest SGD.

    task: anything with ``x_train``, ``y_train`` (and optionally ``x_test``, ``y_test``) tensors, e.g.
    :func:`leakycuda.data.bottleneck_task`; moved to the model's device and dtype (move the model first).

    Adaptive steps: when ``model.steps == "adaptive"``, ``model.adapt_steps(x_train)`` runs before
    every step whose index is a multiple of ``adapt_every`` (during Adam only, unless
    ``adapt_during_sgd``, so that the SGD phase converges on a fixed discretisation).

    History: every ``log_every`` steps (and after the last) a record of the loss, train and test MSE
    and rho; written to ``history_path`` (JSON, plus a CSV beside it) at the end and at checkpoints.
    Checkpoints: every ``checkpoint_every`` steps and at the end when ``checkpoint_path`` is given
    (model and optimizer state, step, history; ``torch.load(weights_only=True)`` loads them).
    ``resume=True`` continues from ``checkpoint_path`` when that file exists (the result is the same
    as an uninterrupted run: training is full-batch and deterministic); ``resume`` may also be a path.

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
    two eager warm-up steps (see :class:`leakycuda._graph.TrainStep`); Adam is then created with
    ``capturable=True``. rho is read by the graph in place, so adaptive updates need no re-capture;
    the Adam -> SGD switch (or a changed Lt) re-captures. The results equal the eager path's within
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
    if isinstance(module, LeakyEnsemble):
        from ._ensemble_fit import fit_ensemble

        return fit_ensemble(model, task, lam, adam_steps=adam_steps, adam_lr=adam_lr, sgd_steps=sgd_steps,
                            sgd_lr=sgd_lr, sgd_momentum=sgd_momentum, adapt_every=adapt_every,
                            adapt_during_sgd=adapt_during_sgd, log_every=log_every, checkpoint_path=checkpoint_path,
                            checkpoint_every=checkpoint_every, resume=resume, history_path=history_path,
                            progress=progress, desc=desc, callback=callback, cuda_graph=cuda_graph)
    for name, v in (("adam_steps", adam_steps), ("sgd_steps", sgd_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("%s must be an integer >= 0, got %r" % (name, v))
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError("log_every must be an integer >= 1, got %r" % (log_every,))
    adaptive = getattr(module, "steps", None) == "adaptive"
    if adaptive and not (isinstance(adapt_every, int) and adapt_every >= 1):
        raise ValueError("adapt_every must be an integer >= 1 for a model with adaptive steps, got %r" % (adapt_every,))

    rank, world = _dist_info()
    if world > 1 and ddp_model is None:
        dev = next(module.parameters()).device
        ddp_model = DDP(module, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False)
    net = ddp_model if ddp_model is not None else module

    p0 = next(module.parameters())
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

    config = {"lam": float(lam), "adam_steps": adam_steps, "adam_lr": adam_lr, "sgd_steps": sgd_steps,
              "sgd_lr": sgd_lr, "sgd_momentum": sgd_momentum, "adapt_every": adapt_every if adaptive else None,
              "adapt_during_sgd": adapt_during_sgd, "world_size": world}
    total = adam_steps + sgd_steps
    params = [p for p in module.parameters() if p.requires_grad]

    step, history = 0, []
    resume_path = resume if isinstance(resume, (str, os.PathLike)) else (checkpoint_path if resume else None)
    if resume_path is not None and os.path.exists(resume_path):
        ckpt = load_checkpoint(resume_path, map_location=device)
        changed = [k for k in ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum", "adapt_every")
                   if ckpt["config"].get(k) != config[k]]
        if changed:
            what = ", ".join("%s %r -> %r" % (k, ckpt["config"].get(k), config[k]) for k in changed)
            warnings.warn("fit: resuming %s with different settings (%s): the result will differ from an "
                          "uninterrupted run" % (resume_path, what), stacklevel=2)
        module.load_state_dict(ckpt["model"])
        step, history = int(ckpt["step"]), list(ckpt["history"])
        phase = ckpt["phase"]
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        opt.load_state_dict(ckpt["optimizer"])
    else:
        phase = "adam" if adam_steps > 0 else "sgd"
        opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
    resumed_from = step

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
                      "optimizer": opt.state_dict(), "history": history, "config": config}, os.fspath(checkpoint_path))
        if history_path is not None:
            save_history(history, history_path)

    bar = None
    if rank == 0 and total > step:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=desc or "fit", file=sys.stderr, leave=False,
                   disable=None if progress is None else not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    if not history:
        history.append(evaluate())
    while step < total:
        if step == adam_steps and phase == "adam":
            phase = "sgd"
            opt = _make_optimizer(phase, params, adam_lr, sgd_lr, sgd_momentum, capturable=graphed)
        if adaptive and step % adapt_every == 0 and (phase == "adam" or adapt_during_sgd):
            module.adapt_steps(x_shard, reduce=reduce)
        runner(opt, key=(phase, module.effective_depth))
        step += 1
        if bar is not None:
            bar.update(1)
        if step % log_every == 0 or step == total:
            rec = evaluate()
            history.append(rec)
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError("fit: the loss became %s by step %d (phase %s); lower the learning rate"
                                         % (rec["loss"], step, phase))
            if bar is not None:
                bar.set_postfix(loss="%.4g" % rec["loss"], test="%.4g" % rec["test_mse"], refresh=False)
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
        save_history(history, history_path)
    return FitResult(history=history, steps=step, wall_s=wall, resumed_from=resumed_from)
