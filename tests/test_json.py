"""Strict JSON (leakycuda._json): every file leakycuda writes parses without NaN / Infinity tokens, reads back
as what was written, and the result files committed before this convention still load and redraw."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from leakycuda import _json, cli, experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF, NAN = math.inf, math.nan


def _committed():
    """The result files in the repository (git's list; in a copy without .git, every one on disk)."""
    folders = ("docs/results", "bench/results")
    r = subprocess.run(["git", "-C", ROOT, "ls-files", "--", *folders], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return sorted(os.path.join(ROOT, p) for p in r.stdout.split() if p.endswith(".json"))
    return sorted(p for f in folders for p in glob.glob(os.path.join(ROOT, f, "**", "*.json"), recursive=True))


COMMITTED = _committed()


def strict_loads(text):
    """json.loads that refuses the NaN / Infinity / -Infinity tokens (as jq and JavaScript do)."""
    def refuse(token):
        raise ValueError("not strict JSON: %s" % token)

    return json.loads(text, parse_constant=refuse)


def same(a, b):
    """Equal values, NaN equal to NaN (repr is exact for floats and tells NaN, inf and -inf apart)."""
    return repr(a) == repr(b)


def test_writer_is_strict_and_the_reader_restores_what_the_convention_says():
    data = {"config": {"continue_above": INF, "Lt": 3.0, "inner": (6, 3)},
            "final": {"loss": 1.5, "test_mse": NAN, "train_mse": np.float64("nan")},
            "layers": {"coi": [1.0, NAN, 2.0], "sv_x": [[3.0, INF], (NAN, 1.0)], "rho": [NAN, NAN, 0.5]},
            "convergence": {"stationarity": [0.1, INF], "stationarity_max": INF, "scale_slope": NAN},
            "test_mse": {"adaptive": [[NAN], [2.0]], "irregular": [[NAN], [NAN]]},
            "history": [{"step": 0, "loss": INF, "rho": [0.5, 0.5]}, {"step": 1, "loss": [1.0, NAN]}],
            "refine": None, "summary": {"rank": None}, "machine": {"cuda": None}, "diverged": [False, True],
            "mixed": [1, "a", None], "nulls": [None, None]}
    text = _json.dumps(data, indent=1)
    parsed = strict_loads(text)
    assert "NaN" not in text and "Infinity" not in text
    assert parsed["config"]["continue_above"] is None and parsed["final"]["train_mse"] is None
    assert parsed["layers"]["sv_x"] == [[3.0, None], [None, 1.0]]
    back = _json.loads(text)
    want = dict(data, config={"continue_above": INF, "Lt": 3.0, "inner": [6, 3]},
                final={"loss": 1.5, "test_mse": NAN, "train_mse": NAN},
                layers={"coi": [1.0, NAN, 2.0], "sv_x": [[3.0, NAN], [NAN, 1.0]], "rho": [NAN, NAN, 0.5]},
                convergence={"stationarity": [0.1, INF], "stationarity_max": INF, "scale_slope": NAN},
                history=[{"step": 0, "loss": NAN, "rho": [0.5, 0.5]}, {"step": 1, "loss": [1.0, NAN]}])
    # null is NaN in a number field, +inf where that is the field's only non-finite value; a list of numbers
    # loses the sign of an infinity (sv_x), an optional field keeps None, a list of other things keeps its nulls.
    assert same(back, want), back


def test_writer_refuses_what_it_cannot_make_strict():
    """A non-finite dict key has no null form: an error, never a NaN token (allow_nan=False)."""
    with pytest.raises(ValueError):
        _json.dumps({float("nan"): 1.0})


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: os.path.relpath(p, ROOT))
def test_committed_file_reads_the_same_and_rewrites_strictly(path):
    with open(path) as f:
        text = f.read()
    legacy = json.loads(text)  # the older files may hold NaN / Infinity tokens, which Python reads as floats
    data = _json.load(path)
    assert same(data, legacy)
    again = _json.dumps(data, indent=1)
    strict_loads(again)
    assert same(_json.loads(again), legacy)


def test_the_committed_files_are_found():
    names = {os.path.relpath(p, ROOT) for p in COMMITTED}
    assert {"docs/results/fig1/fig1.json", "docs/results/fig2/fig2.json", "docs/results/demo/history.json"} <= names


@pytest.mark.slow
def test_committed_results_redraw(tmp_path):
    """The committed fig1, fig2, demo and related-experiment JSON files redraw with replot; the tables of docs/results.md
    print from fig1.json and fig2.json (fig2.json holds continue_above: Infinity, from before strict JSON)."""
    results = os.path.join(ROOT, "docs", "results")
    assert "Infinity" in open(os.path.join(results, "fig2", "fig2.json")).read()
    for name, json_name in (("fig1", "fig1.json"), ("fig2", "fig2.json"), ("demo", "demo.json")):
        files = experiments.replot(os.path.join(results, name, json_name), str(tmp_path / name))
        assert files and all(os.path.getsize(p) > 0 and p.startswith(str(tmp_path)) for p in files.values())
    for name in [n for n, e in experiments.experiments().items() if e.kind == "preset"]:
        files = experiments.replot(os.path.join(results, name, name.replace("-", "_") + ".json"), str(tmp_path / name))
        assert files and all(os.path.getsize(p) > 0 for p in files.values())
    for name in ("fig1", "fig2"):
        r = subprocess.run([sys.executable, "-m", "leakycuda.experiments.tables", os.path.join(results, name,
                            name + ".json")], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith(("Seeds", "Test MSE")), r.stderr


def test_a_run_writes_strict_json_that_reads_back_and_redraws(tmp_path, capsys):
    """No test points: every test MSE is NaN; the default continue_above is inf. Both are null in the files."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--depth", "3", "--Lt", "1", "--steps", "4", "--sgd-steps", "2",
                     "--width", "4", "--n-train", "10", "--n-test", "0", "--no-progress"]) == 0
    demo = strict_loads((out / "demo.json").read_text())
    history = strict_loads((out / "history.json").read_text())
    assert demo["final"]["test_mse"] is None and demo["config"]["continue_above"] is None
    assert all(h["test_mse"] is None for h in history) and all(isinstance(h["loss"], float) for h in history)
    assert isinstance(demo["convergence"]["stationarity_max"], float)
    back = _json.load(out / "demo.json")
    assert math.isnan(back["final"]["test_mse"]) and back["config"]["continue_above"] == INF
    assert all(math.isnan(h["test_mse"]) for h in _json.load(out / "history.json"))
    files = experiments.replot(str(out / "demo.json"), str(tmp_path / "again"))
    assert sorted(files) == ["energies", "history_plot", "spectra"]
    capsys.readouterr()
    assert cli.main(["info", "--json"]) == 0 and strict_loads(capsys.readouterr().out)["torch"]
