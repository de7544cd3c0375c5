"""Tests of the `leakycuda` command line in tiny settings: demo, reproduce fig1|fig2 --quick, the related
experiments' dispatch, info (shards, torchrun and merge: test_distribute.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from leakycuda import cli

TINY = ["--steps", "12", "--sgd-steps", "3", "--width", "8", "--n-train", "40", "--n-test", "20", "--no-progress"]


def flat(value, path=()):
    """A JSON value as a list of (path, number) leaves in order: dicts by key, lists by index."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in flat(v, path + (k,))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in flat(v, path + (i,))]
    return [(path, value)]


def assert_same_numbers(got, ref, rel):
    """got has ref's structure (the same keys and lengths everywhere) and its numbers within rel of ref's."""
    got, ref = flat(got), flat(ref)
    assert [p for p, _ in got] == [p for p, _ in ref]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=rel)


def test_demo_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--depth", "6", "--Lt", "2"] + TINY) == 0
    text = capsys.readouterr().out
    assert "bottleneck rank estimate" in text and str(out) in text
    for name in ("spectra.png", "energies.png", "history.png", "demo.json", "history.json", "history.csv"):
        assert (out / name).stat().st_size > 0, name
    d = json.loads((out / "demo.json").read_text())
    assert len(d["layers"]["coi"]) == 6 and len(d["layers"]["sv_w"]) == 6
    assert d["config"]["adam_steps"] == 12 and d["task"]["rank"] == 3
    assert set(d["summary"]) >= {"rank", "rank_median", "coi_min"}


def test_reproduce_fig1_quick(tmp_path, capsys):
    out = tmp_path / "f1"
    assert cli.main(["reproduce", "fig1", "--quick", "--out", str(out), "--Lts", "1,3", "--seeds", "2"] + TINY) == 0
    d = json.loads((out / "fig1.json").read_text())
    assert d["quick"] and d["Lts"] == [1.0, 3.0] and d["seeds"] == [0, 1] and len(d["runs"]) == 4
    assert {"rank_median", "rank_min", "rank_max", "coi_min"} <= set(d["runs"][0]["summary"])
    for name in ("fig1a.png", "fig1b_Lt3.png", "fig1c_Lt3.png"):
        assert (out / name).stat().st_size > 0
    assert "results in" in capsys.readouterr().out
    # The tables of docs/results.md come from leakycuda.experiments.tables: one row per Lt, its per-seed values from the JSON.
    table = _tables(out / "fig1.json")
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and "%.2f / %.2f" % tuple(r["summary"]["coi_min"] for r in d["runs"] if r["Lt"] == 1.0) \
        in rows[0]


def _tables(path):
    r = subprocess.run([sys.executable, "-m", "leakycuda.experiments.tables", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_reproduce_fig2_quick(tmp_path):
    out = tmp_path / "f2"
    assert cli.main(["reproduce", "fig2", "--quick", "--out", str(out), "--depths", "4,6"] + TINY) == 0
    d = json.loads((out / "fig2.json").read_text())
    assert d["schemes"] == ["equidistant", "irregular", "adaptive"] and d["depths"] == [4, 6]
    assert len(d["runs"]) == 6 and set(d["test_mse"]) == set(d["schemes"])
    adaptive = [r for r in d["runs"] if r["scheme"] == "adaptive"][0]
    assert sum(adaptive["layers"]["rho"]) == pytest.approx(1.0)
    for name in ("fig2a.png", "fig2b.png"):
        assert (out / name).stat().st_size > 0
    table = _tables(out / "fig2.json")
    eq = [r["final"]["test_mse"] for r in d["runs"] if r["scheme"] == "equidistant" and r["L"] == 4][0]
    assert "| equidistant | %.3g [%.3g, %.3g] |" % (eq, eq, eq) in table


def test_reproduce_fig2_pad_depths(tmp_path, capsys):
    """--pad-depths trains fig2's depths as one padded ensemble: the same runs as one ensemble per depth; it is
    refused, in one line before any work, for fig1 and with --sequential."""
    for name, extra in (("per-depth", []), ("padded", ["--pad-depths"])):
        assert cli.main(["reproduce", "fig2", "--quick", "--out", str(tmp_path / name), "--depths", "3,5"]
                        + extra + TINY) == 0
    got, ref = (json.loads((tmp_path / n / "fig2.json").read_text()) for n in ("padded", "per-depth"))
    assert [(r["scheme"], r["L"]) for r in got["runs"]] == [(r["scheme"], r["L"]) for r in ref["runs"]]
    assert_same_numbers(got["test_mse"], ref["test_mse"], rel=1e-4)
    for bad in (["fig1", "--pad-depths"], ["fig2", "--pad-depths", "--sequential"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["reproduce"] + bad + ["--quick", "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and "--pad-depths" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["dln-rank", "dln-saddle", "fcnn-bottleneck"])
def test_reproduce_related_dispatches_its_checked_settings(name, tmp_path, monkeypatch):
    import dataclasses

    from leakycuda.experiments import registry

    calls = []
    spec = registry.get(name)
    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, run=lambda out, **kw: calls.append((out, kw))))
    out = tmp_path / name
    assert cli.main(["reproduce", name, "--quick", "--out", str(out), "--seeds", "2", "--no-progress"]) == 0
    (got_out, kw), = calls
    assert os.path.abspath(got_out) == os.path.abspath(str(out))
    assert kw["quick"] and kw["seeds"] == [0, 1] and kw["dtype"] is None and str(kw["device"]) == "cpu"
    assert cli.main(["reproduce", name, "--dtype", "float32", "--out", str(out)]) == 0
    assert calls[-1][1]["dtype"] is torch.float32 and not calls[-1][1]["quick"]


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "built against" in text and "leakycuda::leaky_stack" in text
    d = cli.info_dict()
    assert "CPU" in d["kernels"]["leakycuda::leaky_stack"]
    assert isinstance(d["cuda_kernels_compiled"], bool)


def test_seeds_and_errors(capsys):
    assert cli._seeds("3") == 3 and cli._seeds("4,7") == [4, 7] and cli._seeds("5,") == [5]
    for argv in (["demo", "--no-such-flag"], ["reproduce", "fig3"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and argv[-1] in err


def test_bad_flag_in_a_real_process_is_one_line_and_exit_2():
    """The installed entry point's behaviour: a negative number with an exponent is read, then refused."""
    r = subprocess.run([sys.executable, "-m", "leakycuda.cli", "demo", "--lr", "-1e-3"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "leakycuda demo: error: argument --lr: must be a finite number > 0 (the Adam learning rate), got -0.001 "
        "(see leakycuda demo --help)"]


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "leakycuda.cli", "info", "--json"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "kernels" in json.loads(r.stdout)
