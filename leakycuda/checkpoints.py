"""The checkpoints of :func:`leakycuda.train.fit`: their formats, atomic saving, loading, and what to resume from."""
import os
import warnings

import torch

from . import _validate as check

__all__ = ["ENSEMBLE_FORMAT", "FIT_FORMAT", "RESUME_SETTINGS", "load_checkpoint", "load_resume", "resume_path",
           "save_atomic"]

#: A LeakyResNet's (or any single model's) checkpoint: format, step, phase, model (its state dict), optimizer,
#: history (single-model records), config.
FIT_FORMAT = "leakycuda.fit/1"
#: A LeakyEnsemble's checkpoint: the keys of FIT_FORMAT (history in the per-member format) and ``diverged``.
ENSEMBLE_FORMAT = "leakycuda.fit_ensemble/1"
#: The settings whose change between a checkpoint and a resumed run makes the result differ (a warning).
RESUME_SETTINGS = ("lam", "adam_steps", "adam_lr", "sgd_steps", "sgd_lr", "sgd_momentum", "adapt_every")


def load_checkpoint(path, map_location="cpu", *, expect_format=FIT_FORMAT):
    """Loads a :func:`~leakycuda.train.fit` checkpoint with ``torch.load(weights_only=True)``; returns its dict.

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


def save_atomic(obj, path):
    """torch.save(obj) to ``path`` through a temporary file beside it: an interrupted save leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_path(resume, checkpoint_path):
    """The checkpoint to resume from (``resume`` a path, or True: checkpoint_path), or None when there is none yet."""
    path = resume if isinstance(resume, str) else (checkpoint_path if resume else None)
    return path if path is not None and os.path.exists(path) else None


def load_resume(path, device, config, expect_format, *, stacklevel=2):
    """The checkpoint at ``path``; warns when its settings (:data:`RESUME_SETTINGS`) differ from ``config`` (the
    result will then differ from an uninterrupted run). ``stacklevel``: the warning's, counted from the caller."""
    ckpt = load_checkpoint(path, map_location=device, expect_format=expect_format)
    changed = [k for k in RESUME_SETTINGS if ckpt["config"].get(k) != config[k]]
    if changed:
        what = ", ".join("%s %r -> %r" % (k, ckpt["config"].get(k), config[k]) for k in changed)
        warnings.warn("fit: resuming %s with different settings (%s): the result will differ from an "
                      "uninterrupted run" % (path, what), stacklevel=stacklevel + 1)
    return ckpt
