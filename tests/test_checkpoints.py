"""Checkpoints and histories across versions, and what the one training engine accepts beyond a LeakyResNet.

tests/data holds files written by the training code before it became one engine (commit 5bd8629): a LeakyResNet
run (adaptive steps, float64, Adam 12 + SGD 8 steps, checkpoint every 5, logged every step) interrupted after its
step-10 checkpoint, and the same run uninterrupted; a 3-member LeakyEnsemble run (member 0 blown up after step 4,
so stopped at step 6; checkpoint every 10, logged every 2 steps) likewise. Resuming the old checkpoints must give
the old uninterrupted runs.
"""
import pathlib
import shutil
import warnings

import pytest
import torch
from torch import nn

from leakycuda import checkpoints
from leakycuda.data import bottleneck_task
from leakycuda.ensemble import LeakyEnsemble
from leakycuda.module import LeakyResNet
from leakycuda.train import FitResult, fit, load_checkpoint

DATA = pathlib.Path(__file__).parent / "data"
F64 = torch.float64
SINGLE = dict(adam_steps=12, adam_lr=5e-3, sgd_steps=8, sgd_lr=1e-3, adapt_every=3, log_every=1, checkpoint_every=5)
MEMBERS = dict(depth=[3, 5, 4], effective_depth=[1.0, 2.0, 0.5], steps=["equidistant", "irregular", "adaptive"],
               a=[0.0, 0.5, 0.0], init=["random", "identity", "random"], seeds=[0, 1, 2])
ENSEMBLE = dict(adam_steps=24, adam_lr=1e-2, sgd_steps=8, sgd_lr=1e-3, adapt_every=5, log_every=2, checkpoint_every=10)


def _task(seed=0):
    return bottleneck_task(d=6, inner=(2,), n_train=40, n_test=20, seed=seed, hidden=16, dtype=F64)


def _assert_state(model, state):
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            torch.testing.assert_close(model.state_dict()[name], t, rtol=1e-12, atol=1e-14, msg=name)


def _numbers(rec):
    for k, v in rec.items():
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            for j, y in enumerate(x if isinstance(x, list) else [x]):
                yield (k, i, j), y


def _assert_close(got, want):
    """Two history records: the same fields in the same order, the numbers equal up to float64 rounding."""
    assert list(got) == list(want)
    want = dict(_numbers(want))
    for key, value in _numbers(got):
        assert value == pytest.approx(want[key], rel=1e-12, abs=1e-14) if isinstance(value, float) \
            else value == want[key], (got["step"], key)


def test_a_single_model_resumes_from_a_checkpoint_of_the_earlier_code(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    shutil.copy(DATA / "old_fit_step10.pt", ckpt)
    old = torch.load(DATA / "old_fit_full.pt", weights_only=True)
    assert load_checkpoint(ckpt)["step"] == 10
    torch.manual_seed(5)
    model = LeakyResNet(6, 6, 8, 4, 2.0, steps="adaptive", dtype=F64)  # another init: all must come from the file
    r = fit(model, _task(), 1e-2, checkpoint_path=ckpt, resume=True, **SINGLE)
    assert isinstance(r, FitResult) and r.resumed_from == 10 and r.steps == 20
    _assert_state(model, old["state"])
    assert [h["step"] for h in r.history] == [h["step"] for h in old["history"]] == list(range(21))
    for got, want in zip(r.history, old["history"]):
        _assert_close(got, want)
    # What the new code writes is the old format: the same keys and settings.
    before, after = torch.load(DATA / "old_fit_step10.pt", weights_only=True), load_checkpoint(ckpt)
    assert list(after) == list(before) and after["format"] == checkpoints.FIT_FORMAT == "leakycuda.fit/1"
    assert after["config"] == before["config"] and after["step"] == 20


def test_an_ensemble_resumes_from_a_checkpoint_of_the_earlier_code(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    shutil.copy(DATA / "old_fit_ensemble_step10.pt", ckpt)
    old = torch.load(DATA / "old_fit_ensemble_full.pt", weights_only=True)
    assert old["diverged"] == [6, None, None]
    ens = LeakyEnsemble(6, 6, 8, dtype=F64, **dict(MEMBERS, seeds=[7, 8, 9]))
    tasks = [_task(s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # member 0 diverged before the checkpoint: no new warning on resume
        r = fit(ens, tasks, 1e-2, checkpoint_path=ckpt, resume=True, **ENSEMBLE)
    assert r.resumed_from == 10 and r.steps == 32 and r.diverged == old["diverged"]
    _assert_state(ens, old["state"])
    assert len(r.history) == len(old["history"]) == 17
    for got, want in zip(r.history, old["history"]):
        _assert_close(got, want)
    before = torch.load(DATA / "old_fit_ensemble_step10.pt", weights_only=True)
    after = load_checkpoint(ckpt, expect_format="leakycuda.fit_ensemble/1")
    assert list(after) == list(before) and after["config"] == before["config"] and after["diverged"] == [6, None, None]


def test_log_every_a_list_of_steps():
    torch.manual_seed(0)
    model = LeakyResNet(6, 6, 8, 4, 2.0, dtype=F64)
    r = fit(model, _task(), 1e-2, adam_steps=10, sgd_steps=5, log_every=[3, 4, 12])
    # step 0, the chosen steps, the Adam -> SGD switch and the last step
    assert [h["step"] for h in r.history] == [0, 3, 4, 10, 12, 15]
    with pytest.raises(ValueError, match="log_every"):
        fit(model, _task(), 1e-2, adam_steps=2, sgd_steps=0, log_every=[3, 3])
    with pytest.raises(ValueError, match="log_every"):
        fit(model, _task(), 1e-2, adam_steps=2, sgd_steps=0, log_every=[])
    with pytest.raises(TypeError, match="log_every"):
        fit(model, _task(), 1e-2, adam_steps=2, sgd_steps=0, log_every=[1.5])


class _Ridge(nn.Module):
    """A linear map with an L2 penalty: an nn.Module with regularization(lam) and nothing of a LeakyResNet."""

    def __init__(self):
        super().__init__()
        self.in_features = self.out_features = 6
        self.w = nn.Parameter(torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(1)) / 3)

    def forward(self, x):
        return x @ self.w.T

    def regularization(self, lam):
        return 0.5 * lam * self.w.square().sum()


def test_any_module_with_a_regularization_trains_as_plain_gradient_descent():
    """SGD only, momentum 0: fit is gradient descent on mse + regularization, step for step (40 points: the data
    cost (1/40) * sum of squares rounds like the mse's sum / 40 only up to float rounding)."""
    task = _task()
    model, ref = _Ridge(), _Ridge()
    r = fit(model, task, 0.1, adam_steps=0, sgd_steps=30, sgd_lr=0.05, log_every=10)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    losses = []
    for step in range(31):
        opt.zero_grad()
        loss = (ref(task.x_train) - task.y_train).square().sum() / 40 + ref.regularization(0.1)
        if step % 10 == 0:
            losses.append(loss.item())
        if step < 30:
            loss.backward()
            opt.step()
    torch.testing.assert_close(model.w, ref.w, rtol=1e-13, atol=1e-15)
    assert [h["loss"] for h in r.history] == pytest.approx(losses, rel=1e-13)
    assert all(h["rho"] == [] for h in r.history) and r.max_rho_Lt == 0.0
    assert r.history[-1]["test_mse"] == pytest.approx(
        ((ref(task.x_test) - task.y_test).square().sum() / task.x_test.shape[0]).item(), rel=1e-13)
