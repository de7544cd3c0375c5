"""When a training run has diverged (:func:`leakycuda.train.fit`, "Divergence"): the rule, the error and its message."""
import math

__all__ = ["DIVERGE_FACTOR", "DivergenceError", "MemberDivergedWarning", "divergence_error", "rule"]

#: The default of fit's ``diverge_factor``.
DIVERGE_FACTOR = 1e4


class DivergenceError(FloatingPointError):
    """:func:`leakycuda.train.fit` stopped because the loss diverged.

    Attributes: ``step`` and ``phase`` where it was detected, ``loss`` (the value seen),
    ``threshold`` (None when the loss was not finite) and ``result``: a
    :class:`~leakycuda.train.FitResult` (an :class:`~leakycuda.train.EnsembleFitResult` for an
    ensemble) whose history runs up to and including the diverged record (also written to ``history_path``).
    """

    def __init__(self, message, *, step, phase, loss, threshold, result):
        super().__init__(message)
        self.step, self.phase, self.loss, self.threshold, self.result = step, phase, loss, threshold, result


class MemberDivergedWarning(UserWarning):
    """Some members of an ensemble diverged and were stopped; the others train on."""


def rule(loss, loss0, zero_mse, factor):
    """fit's divergence rule: (diverged, threshold, scale). Diverged: ``loss`` is not finite, or above
    threshold = factor * scale, scale = max(loss0 (the loss at step 0, if finite), zero_mse); threshold
    is None when ``factor`` is None or the scale is 0."""
    scale = max(loss0, zero_mse) if loss0 is not None and math.isfinite(loss0) else zero_mse
    threshold = None if factor is None or not scale > 0 else factor * scale
    return not (math.isfinite(loss) and (threshold is None or loss <= threshold)), threshold, scale


def divergence_error(rec, loss0, zero_mse, factor, lrs, history_path, result, who=""):
    """The :class:`DivergenceError` of a diverged record ``rec`` (one model's step, phase and loss) under
    :func:`rule`; ``lrs`` = (adam_lr, sgd_lr) for the hint, ``who`` names the model when several train."""
    loss = rec["loss"]
    _, threshold, scale = rule(loss, loss0, zero_mse, factor)
    lr_name, lr = ("adam_lr", lrs[0]) if rec["phase"] == "adam" else ("sgd_lr", lrs[1])
    why = ("the loss became %s" % loss if not math.isfinite(loss) else
           "the loss %.4g exceeds diverge_factor %g x the starting scale %.4g" % (loss, factor, scale))
    where = "at the start (step 0)" if rec["step"] == 0 else "by step %d (%s phase)" % (rec["step"], rec["phase"])
    hint = ("lower %s (now %g)" % (lr_name, lr)) if rec["step"] > 0 else "check the model's initial weights"
    return DivergenceError("training diverged%s: %s %s; %s%s" % (who, why, where, hint, "; history in %s"
                                                               % history_path if history_path else ""),
                           step=rec["step"], phase=rec["phase"], loss=loss, threshold=threshold, result=result)
