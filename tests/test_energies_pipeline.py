"""The main job's analysis (demo, reproduce, diagnostics.analyze) on the device-generic energies path, the
code CUDA runs: on CPU through LEAKYCUDA_CPU_ATEN_ENERGIES=1, and on CUDA where a GPU is present."""
import json
import math
import os

import pytest
import torch

from leakycuda import diagnostics
from leakycuda.experiments.demo import run_demo
from leakycuda.experiments.fig1 import run_fig1
from leakycuda.experiments.fig2 import run_fig2
from leakycuda.experiments.sweep import RunConfig, layer_stats, rank_summary, train_run
from test_energies import GENERIC_ENV, _paths_run

from helpers import CUDA

# A demo small enough for a test: the 30 -> 3 -> 30 task, 4 layers of width 8, 20 + 5 steps.
TINY = RunConfig(n_train=48, n_test=32, width=8, depth=4, Lt=2.0, adam_steps=20, sgd_steps=5, adapt_every=10)
DEMO_FILES = {"spectra.png", "energies.png", "history.png", "history.json", "demo.json"}


def _numbers(a, b, path="", rtol=1e-7):
    """Asserts that two JSON values agree: numbers within rtol (absolute below 1e-9), the same non-finite
    strings, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _numbers(a[k], b[k], "%s.%s" % (path, k), rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _numbers(u, v, "%s[%d]" % (path, i), rtol)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _demo(out, monkeypatch, generic, device="cpu"):
    if generic:
        monkeypatch.setenv(GENERIC_ENV, "1")
    else:
        monkeypatch.delenv(GENERIC_ENV, raising=False)
    result = {}
    ran = _paths_run(lambda: result.update(run_demo(str(out), device=device, cfg=TINY, log=lambda *a: None)))
    with open(os.path.join(out, "demo.json")) as f:
        data = json.load(f)
    return result, data, ran


# Fields that describe the run itself rather than its numbers.
_VOLATILE = ("train_seconds", "machine")


def test_demo_analysis_on_the_generic_path(tmp_path, monkeypatch):
    """The demo's whole analysis (analyze, layer_stats, the table, plots and JSON) runs through the
    device-generic implementation and writes the same files with the same numbers as the CPU kernels."""
    _, ref, ran_cpu = _demo(tmp_path / "cpu", monkeypatch, generic=False)
    _, got, ran = _demo(tmp_path / "generic", monkeypatch, generic=True)
    assert {p for p, _ in ran} == {"generic"} and {"energies", "cost_of_identity", "cost_of_identity_exact"} <= {
        op for _, op in ran}
    assert {p for p, _ in ran_cpu} == {"cpu"}
    assert set(os.listdir(tmp_path / "generic")) >= DEMO_FILES
    assert set(os.listdir(tmp_path / "generic")) == set(os.listdir(tmp_path / "cpu"))
    for k in _VOLATILE:
        ref.pop(k), got.pop(k)
    _numbers(got, ref)


def test_analyze_and_layer_stats_on_the_generic_path(monkeypatch):
    """analyze (computing in float64 on the model's device) and layer_stats (the model's dtype) agree
    between the two implementations, field by field."""
    model, task, _ = train_run(TINY, 0)
    out = {}
    for generic in (False, True):
        monkeypatch.setenv(GENERIC_ENV, "1" if generic else "0")
        a = diagnostics.analyze(model, task.x_train, task.y_train, TINY.lam, gamma0=TINY.gamma0)
        stats = layer_stats(model, task.x_train, TINY.gamma0)
        out[generic] = (a.to_dict(), stats, rank_summary(stats))
    _numbers(out[True], out[False])


# --- CUDA: the same files as on CPU ---------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_demo_on_cuda_writes_the_cpu_files(tmp_path, monkeypatch):
    _, ref, _ = _demo(tmp_path / "cpu", monkeypatch, generic=False)
    _, got, ran = _demo(tmp_path / "cuda", monkeypatch, generic=False, device="cuda")
    assert "energies" in {op for _, op in ran}
    assert set(os.listdir(tmp_path / "cuda")) == set(os.listdir(tmp_path / "cpu"))
    # Training on another device rounds differently: compare the structure and the rank summary loosely.
    assert got.keys() == ref.keys() and got["files"] == ref["files"]
    assert len(got["layers"]["coi"]) == TINY.depth
    assert all(math.isfinite(v) for v in got["layers"]["coi"] + got["layers"]["rank_estimate"])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_analyze_cuda_matches_cpu():
    model, task, _ = train_run(TINY, 0)
    a = diagnostics.analyze(model, task.x_train, task.y_train, TINY.lam, gamma0=TINY.gamma0).to_dict()
    b = diagnostics.analyze(model.cuda(), task.x_train.cuda(), task.y_train.cuda(), TINY.lam, gamma0=TINY.gamma0,
                            device="cuda").to_dict()
    _numbers(b, a, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("figure", ["fig1", "fig2"])
def test_reproduce_on_cuda_writes_the_cpu_files(tmp_path, figure):
    tiny = dict(n_train=48, n_test=32, width=8, adam_steps=20, sgd_steps=5)
    files = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / device)
        if figure == "fig1":
            run_fig1(out, quick=True, device=device, Lts=(2.0, 3.0), overrides=tiny, log=lambda *a: None)
        else:
            run_fig2(out, quick=True, device=device, depths=(4, 8), overrides=tiny, log=lambda *a: None)
        files[device] = set(os.listdir(out))
    assert files["cuda"] == files["cpu"] and "%s.json" % figure in files["cuda"]
