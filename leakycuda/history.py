"""What :func:`leakycuda.train.fit` returns and writes: FitResult (one model), EnsembleFitResult (a LeakyEnsemble)
and their history files (JSON plus a CSV beside it)."""
import csv
import dataclasses
import json
import os

__all__ = ["MEMBER_FIELDS", "EnsembleFitResult", "FitResult", "save_ensemble_history", "save_history"]

#: The per-member numbers of an ensemble's history record (besides ``rho`` and ``diverged``).
MEMBER_FIELDS = ("loss", "train_mse", "reg", "test_mse")


@dataclasses.dataclass
class FitResult:
    """What :func:`~leakycuda.train.fit` returns: the history records (one dict per logged step) and timings.

    Each record: ``step`` (optimizer steps done), ``phase`` ("adam" or "sgd"), ``loss`` (data cost +
    regularization), ``train_mse``, ``reg``, ``test_mse`` (NaN without test data), ``rho`` (list of L).
    ``max_rho_Lt``: the largest rho_l * Lt the steps reached during this call (above 1 the skip
    connection of that layer is negative; adaptive steps can get there, see :func:`~leakycuda.train.fit`).
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
        """Member b's records as :func:`~leakycuda.train.fit` writes them for one model (up to its divergence, that
        record included)."""
        out = []
        for rec in self.history:
            out.append({"step": rec["step"], "phase": rec["phase"], **{k: rec[k][b] for k in MEMBER_FIELDS},
                        "rho": rec["rho"][b]})
            if rec["diverged"][b]:
                break
        return out

    def member(self, b):
        """Member b's run as a :class:`FitResult` (``steps``: where it stopped)."""
        steps = self.steps if self.diverged[b] is None else self.diverged[b]
        return FitResult(history=self.member_history(b), steps=steps, wall_s=self.wall_s,
                         resumed_from=self.resumed_from, max_rho_Lt=self.max_rho_Lt[b])

    def save(self, path):
        """Writes the history as JSON at ``path`` and as a long CSV beside it (see :func:`save_ensemble_history`)."""
        save_ensemble_history(self.history, path)


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
        w.writerow(["step", "phase", "member", *MEMBER_FIELDS, "diverged"] + ["rho_%d" % (i + 1) for i in range(L)])
        for rec in history:
            for b, rho in enumerate(rec["rho"]):
                w.writerow([rec["step"], rec["phase"], b] + [rec[k][b] for k in MEMBER_FIELDS]
                           + [rec["diverged"][b]] + list(rho))
