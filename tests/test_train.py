"""Tests of leakycuda.train.fit: the loss decreases, history files, checkpoints (weights_only), exact resume."""
import json

import pytest
import torch

from leakycuda.data import bottleneck_task
from leakycuda.module import LeakyResNet
from leakycuda.steps import StepOvershootWarning
from leakycuda.train import DivergenceError, FitResult, _divergence_error, fit, load_checkpoint

F64 = torch.float64


def _setup(steps="equidistant", seed=0, dtype=F64):
    task = bottleneck_task(d=6, inner=(2,), n_train=40, n_test=20, seed=seed, hidden=16, dtype=dtype)
    torch.manual_seed(seed)
    model = LeakyResNet(6, 6, 8, 4, 2.0, steps=steps, dtype=dtype)
    return model, task


def test_loss_decreases_and_history_files(tmp_path, capsys):
    model, task = _setup(dtype=torch.float32)
    path = tmp_path / "hist.json"
    r = fit(model, task, 1e-2, adam_steps=60, adam_lr=1e-2, sgd_steps=10, sgd_lr=1e-3, log_every=10,
            history_path=path)
    assert r.steps == 70 and [h["step"] for h in r.history] == list(range(0, 71, 10))
    assert r.history[-1]["phase"] == "sgd" and r.history[5]["phase"] == "adam"
    assert r.history[-1]["loss"] < 0.5 * r.history[0]["loss"]
    assert r.history[-1]["train_mse"] < r.history[0]["train_mse"]
    assert all(len(h["rho"]) == 4 for h in r.history)
    assert json.loads(path.read_text()) == r.history
    lines = (tmp_path / "hist.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["step", "phase"] and lines[0].endswith("rho_4") and len(lines) == 9
    # stderr is not a terminal under pytest: the progress bar turns itself off.
    assert "fit" not in capsys.readouterr().err


def _interrupt_at(n):
    def cb(step, model, rec):
        if step == n:
            raise KeyboardInterrupt
    return cb


@pytest.mark.parametrize("steps", ["equidistant", "adaptive"])
def test_resume_is_exact(tmp_path, steps):
    kw = dict(adam_steps=12, adam_lr=5e-3, sgd_steps=8, sgd_lr=1e-3, adapt_every=3, log_every=1, checkpoint_every=5)
    ref, task = _setup(steps)
    full = fit(ref, task, 1e-2, **kw)

    ckpt = str(tmp_path / "run.pt")
    model, _ = _setup(steps)
    with pytest.raises(KeyboardInterrupt):
        fit(model, task, 1e-2, checkpoint_path=ckpt, callback=_interrupt_at(13), **kw)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 10 and saved["phase"] == "adam"
    assert load_checkpoint(ckpt)["step"] == 10

    fresh, _ = _setup(steps, seed=5)  # different init: everything must come from the checkpoint
    resumed = fit(fresh, task, 1e-2, checkpoint_path=ckpt, resume=True, **kw)
    assert resumed.resumed_from == 10 and resumed.steps == 20
    for (name, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert resumed.history == full.history
    if steps == "adaptive":
        assert not torch.allclose(ref.rho, torch.full_like(ref.rho, 0.25))
    final = load_checkpoint(ckpt)
    assert final["step"] == 20 and final["phase"] == "sgd"
    # Resuming a finished run does nothing.
    again = fit(fresh, task, 1e-2, checkpoint_path=ckpt, resume=True, **kw)
    assert again.steps == 20 and again.history == full.history


def test_bad_arguments():
    model, task = _setup()
    with pytest.raises(ValueError, match="adam_steps"):
        fit(model, task, 1e-2, adam_steps=-1)
    with pytest.raises(ValueError, match="log_every"):
        fit(model, task, 1e-2, adam_steps=1, sgd_steps=0, log_every=0)


def test_resume_with_other_settings_warns(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    model, task = _setup()
    fit(model, task, 1e-2, adam_steps=4, sgd_steps=0, log_every=2, checkpoint_path=ckpt)
    with pytest.warns(UserWarning, match="lam"):
        fit(model, task, 1e-1, adam_steps=6, sgd_steps=0, log_every=2, checkpoint_path=ckpt, resume=True)


def test_divergence_hint_names_the_cause():
    """Steps outside the stable range (max rho_l * Lt > 2: the skip connection amplifies X) are blamed on Lt and
    the depth, not on the learning rate; a run inside it that diverges is told to lower its phase's rate."""
    _, task = _setup(dtype=torch.float32)
    torch.manual_seed(0)
    with pytest.warns(StepOvershootWarning):  # rho_l * Lt = 2.5e5: X grows ~2.5e5-fold a layer, the loss overflows
        model = LeakyResNet(6, 6, 8, 4, 1e6)
    with pytest.raises(DivergenceError) as e:
        fit(model, task, 1e-2, adam_steps=5, sgd_steps=0)
    msg = str(e.value)
    assert "at the start" in msg and "max rho_l*Lt = 2.5e+05" in msg and "lower Lt or use more layers" in msg, msg
    assert "_lr" not in msg and "initial weights" not in msg, msg
    model, task = _setup()
    with pytest.raises(DivergenceError) as e:
        fit(model, task, 1e-2, adam_steps=50, adam_lr=10.0, sgd_steps=0, log_every=5)
    assert "lower adam_lr (now 10)" in str(e.value) and "stable range" not in str(e.value), str(e.value)
    rec = {"step": 30, "phase": "sgd", "loss": float("nan")}  # adaptive steps can leave the range during training
    for reached, hint in ((5.0, "lower Lt or use more layers"), (1.5, "lower sgd_lr (now 0.002)"),
                          ([0.5, 3.0], "max rho_l*Lt = 3,")):
        result = FitResult(history=[], steps=30, wall_s=0.0, max_rho_Lt=reached)
        assert hint in str(_divergence_error(rec, 1.0, 1.0, 1e4, (1e-3, 2e-3), None, result))
