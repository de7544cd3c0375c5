"""Sweeps spread over processes (leakycuda.experiments.distribute): the split, shards and their merge, torchrun
ranks, resuming, and the refusals -- each result against the one-process run of the same settings."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import free_port

from leakycuda import _json
from leakycuda.experiments import distribute, fig1, fig2
from leakycuda.experiments.distribute import Job, PartError, RunsFailed, assign, chains, parse_shard
from leakycuda.experiments.dln_rank import DLNRankConfig, run_dln_rank
from leakycuda.experiments.dln_saddle import DLNSaddleConfig, run_dln_saddle
from leakycuda.experiments.fcnn_bottleneck import FCNNBottleneckConfig, run_fcnn_bottleneck

F64 = torch.float64
QUIET = dict(progress=False, log=lambda *a: None)
# fig1 with a warm-start chain per seed (Lt 3 and 4 start from the previous Lt) and L-BFGS refinement.
FIG1 = dict(quick=True, dtype=F64, seeds=2, Lts=[1.0, 2.0, 3.0, 4.0],
            overrides=dict(n_train=24, n_test=8, width=6, adam_steps=12, sgd_steps=4, adapt_every=4,
                           continue_above=3.0, continue_steps=6, refine_steps=2), **QUIET)
FIG1_FLAGS = ["fig1", "--quick", "--dtype", "float64", "--seeds", "2", "--Lts", "1,2,3,4", "--n-train", "24",
              "--n-test", "8", "--width", "6", "--steps", "12", "--sgd-steps", "4", "--continue-above", "3",
              "--continue-steps", "6", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _numbers(obj, prefix=""):
    """(path, number) of every number in a run record, the wall times left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("seconds", "wall_s"):
                yield from _numbers(v, "%s/%s" % (prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, "%s/%d" % (prefix, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def _strip(obj):
    """A run record without its wall times and numbers (what must be equal exactly)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("seconds", "wall_s")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


def assert_same_result(got, want, rel=1e-9):
    """Two result JSONs of one experiment: the same fields, runs and files; every number equal up to float rounding
    (the runs may have trained in other ensembles); wall times, the machine and where the parts ran aside."""
    assert set(got) - {"parts"} == set(want) - {"parts"}
    for key in set(want) - {"runs", "machine", "seconds", "parts", "files"}:
        assert got[key] == want[key], key
    assert got["files"] == want["files"]
    assert len(got["runs"]) == len(want["runs"])
    for rg, rw in zip(got["runs"], want["runs"]):
        assert _strip(rg) == _strip(rw)
        expect = dict(_numbers(rw))
        for key, value in _numbers(rg):
            assert value == pytest.approx(expect[key], rel=rel, abs=1e-10), key


# -- the split -------------------------------------------------------------------------------------

def test_parse_shard_accepts_i_of_n_and_refuses_the_rest():
    assert parse_shard("2/3") == (2, 3) and parse_shard(" 1 / 1 ") == (1, 1) and parse_shard((3, 3)) == (3, 3)
    for bad in ("0/3", "4/3", "a/b", "1/0", "-1/3", "1/3/4", "", "2"):
        with pytest.raises(ValueError, match=r"--shard must be i/n with integers 1 <= i <= n.*got"):
            parse_shard(bad)
    with pytest.raises(TypeError, match="--shard"):
        parse_shard(2)
    with pytest.raises(TypeError, match="shard"):
        parse_shard((1.0, 2))


def test_assign_is_deterministic_balanced_and_keeps_chains_together():
    jobs = [Job("a", 5.0), Job("b", 1.0), Job("c", 2.0, after="b"), Job("d", 4.0), Job("e", 3.0), Job("f", 1.0,
                                                                                                      after="c")]
    assert chains(jobs) == [[0], [1, 2, 5], [3], [4]]
    split = assign(jobs, 2)
    assert split == assign(list(jobs), 2)  # deterministic
    assert sorted(i for w in split for i in w) == list(range(6))  # every job once
    assert split == [[0, 4], [1, 2, 3, 5]]  # LPT: a (5), d (4), then the chain b-c-f (4) and e (3)
    loads = [sum(jobs[i].cost for i in w) for w in split]
    assert loads == [8.0, 8.0]
    assert assign(jobs, 1) == [list(range(6))]
    assert assign(jobs, 8)[-1] == [] and sorted(i for w in assign(jobs, 8) for i in w) == list(range(6))
    with pytest.raises(ValueError, match="not an earlier job"):
        chains([Job("a", after="b"), Job("b")])
    with pytest.raises(ValueError, match="not unique"):
        chains([Job("a"), Job("a")])


def test_sweep_jobs_cost_layers_times_steps_and_follow_the_warm_starts():
    from leakycuda.experiments.sweep import sweep_jobs

    c = fig1.FIG1["quick"]["config"]
    plan = [(c, 0, "cold", None), (c, 0, "warm", 0)]
    jobs = sweep_jobs(plan)
    assert jobs[0] == Job("cold", float(c.depth * (c.adam_steps + c.sgd_steps)), None)
    assert jobs[1] == Job("warm", float(c.depth * (c.continue_steps + c.sgd_steps)), "cold")


# -- shards and their merge ------------------------------------------------------------------------

def _shards(run, tmp_path, n, **kw):
    for i in range(1, n + 1):
        assert run(str(tmp_path / "shards"), shard="%d/%d" % (i, n), **kw) is None
    return sorted(glob.glob(str(tmp_path / "shards" / "parts" / "*.json")))


@pytest.mark.parametrize("experiment", ["fig1", "fig2", "dln-rank", "dln-saddle", "fcnn-bottleneck"])
def test_three_shards_merged_equal_one_process(tmp_path, experiment):
    run, kw = {
        "fig1": (fig1.run_fig1, FIG1),
        "fig2": (fig2.run_fig2, dict(quick=True, dtype=F64, seeds=2, depths=[3, 4],
                                     overrides=dict(n_train=24, n_test=8, width=6, adam_steps=12, sgd_steps=4,
                                                    adapt_every=4), **QUIET)),
        "dln-rank": (run_dln_rank, dict(seeds=2, config=DLNRankConfig(steps=40, depths=(1, 2, 3)), **QUIET)),
        "dln-saddle": (run_dln_saddle, dict(config=DLNSaddleConfig(
            depths=(2, 3), horizon_small={2: 0.5, 3: 0.5}, horizon_large={2: 0.05, 3: 0.05}, steps_large=30,
            records=20), **QUIET)),
        "fcnn-bottleneck": (run_fcnn_bottleneck, dict(seeds=2, dtype=F64, config=FCNNBottleneckConfig(
            n_train=24, n_test=8, width=6, depths=(2, 3), adam_steps=20), **QUIET)),
    }[experiment]
    name = experiment.replace("-", "_")
    run(str(tmp_path / "one"), **kw)
    paths = _shards(run, tmp_path, 3, **kw)
    assert [os.path.basename(p) for p in paths] == ["%s.shard-%d-of-3.json" % (name, i) for i in (1, 2, 3)]
    assert not os.path.exists(tmp_path / "shards" / ("%s.json" % name))  # a shard writes its part only
    distribute.merge(str(tmp_path / "merged"), paths, log=lambda *a: None)
    want, got = (_json.load(str(tmp_path / d / ("%s.json" % name))) for d in ("one", "merged"))
    assert_same_result(got, want)
    assert [p["index"] for p in got["parts"]] == [1, 2, 3] and sum(p["jobs"] for p in got["parts"]) == len(want["runs"])
    pngs = lambda d: sorted(f for f in os.listdir(tmp_path / d) if f.endswith(".png"))  # noqa: E731
    assert pngs("merged") == pngs("one")
    if experiment == "fig1":  # every warm-start chain ran on one shard: Lt 2 -> 3 -> 4 of a seed together
        parts = [_json.load(p) for p in paths]
        for seed in (0, 1):
            holder = [i for i, p in enumerate(parts) if "fig1 Lt=2 seed=%d" % seed in p["jobs"]]
            assert len(holder) == 1
            assert {"fig1 Lt=3 seed=%d" % seed, "fig1 Lt=4 seed=%d" % seed} <= set(parts[holder[0]]["jobs"])


def test_a_rerun_shard_skips_the_runs_its_part_file_holds(tmp_path):
    logs = []
    kw = dict(FIG1, log=logs.append)
    fig1.run_fig1(str(tmp_path), shard="1/2", **kw)
    path = str(tmp_path / "parts" / "fig1.shard-1-of-2.json")
    first = _json.load(path)
    assert len(first["runs"]) == len(first["jobs"]) > 0
    logs.clear()
    fig1.run_fig1(str(tmp_path), shard="1/2", **kw)
    assert any("%d already in" % len(first["jobs"]) in line for line in logs), logs
    assert not any(line.startswith("fig1 Lt=") for line in logs)  # nothing trained
    assert _json.load(path)["runs"] == first["runs"]  # the same records (their wall times too): not retrained
    # A part cut off in the middle of a chain: that chain trains again from its start, the rest is kept.
    part = _json.load(path)
    chain = [k for k in part["jobs"] if k.endswith("seed=%s" % part["jobs"][-1][-1]) and "Lt=1 " not in k]
    del part["runs"][chain[-1]]
    _json.dump(part, path)
    logs.clear()
    fig1.run_fig1(str(tmp_path), shard="1/2", **kw)
    trained = ["fig1 Lt=%s seed=%s" % m.groups() for line in logs for m in [re.match(r"fig1 Lt=(\S+)\s+seed=(\d+)", line)]
               if m]
    assert sorted(trained) == sorted(chain), (trained, chain)
    again = _json.load(path)
    assert set(again["runs"]) == set(first["runs"])
    for key in set(first["runs"]) - set(chain):
        assert again["runs"][key] == first["runs"][key]
    # Other settings: the part is replaced, not mixed.
    logs.clear()
    fig1.run_fig1(str(tmp_path), shard="1/2", **dict(kw, seeds=[0]))
    assert any("of other settings" in line for line in logs)
    assert _json.load(path)["header"]["seeds"] == [0]


def test_merge_refuses_parts_that_do_not_make_one_run(tmp_path):
    kw = dict(seeds=2, config=DLNRankConfig(steps=10, depths=(1, 2)), **QUIET)
    a = _shards(run_dln_rank, tmp_path / "a", 2, **kw)
    b = _shards(run_dln_rank, tmp_path / "b", 2, **dict(kw, config=DLNRankConfig(steps=10, depths=(1, 2), lam=0.3)))
    c = _shards(run_dln_rank, tmp_path / "c", 3, **kw)
    out = str(tmp_path / "m")
    for paths, match in (([a[0], b[1]], "parts of different configs .*config"),
                         ([a[0]], r"missing shard 2 of 2 \(given: 1\)"),
                         ([a[0], a[0], a[1]], "shard 1 of 2 is given twice"),
                         ([a[0], c[1]], r"different numbers of shards \(2 vs 3\)"),
                         ([], "no part files")):
        with pytest.raises(PartError, match=match):
            distribute.merge(out, paths)
    part = _json.load(a[1])
    part["runs"].pop(part["jobs"][0])
    _json.dump(part, str(tmp_path / "cut.json"))
    with pytest.raises(PartError, match="did not finish: 1 of its 2 runs are missing"):
        distribute.merge(out, [a[0], str(tmp_path / "cut.json")])
    _json.dump({"figure": "fig1"}, str(tmp_path / "fig1.json"))
    with pytest.raises(PartError, match="is not a part file"):
        distribute.merge(out, [str(tmp_path / "fig1.json")])
    with pytest.raises(FileNotFoundError, match="PART must be"):
        distribute.merge(out, [str(tmp_path / "none.json")])
    assert not os.path.exists(out)  # nothing written


# -- the command line ------------------------------------------------------------------------------

def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "leakycuda", *args], capture_output=True, text=True, env=ENV,
                          timeout=600, **kw)


def test_cli_shards_then_merge_equal_one_process(tmp_path):
    r = _cli(["reproduce", *FIG1_FLAGS, "--out", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 3):
        r = _cli(["reproduce", *FIG1_FLAGS, "--out", str(tmp_path / "s"), "--shard", "%d/3" % i])
        assert r.returncode == 0, r.stderr
        assert "leakycuda merge" in r.stdout and "fig1.shard-*-of-3.json" in r.stdout
    r = _cli(["merge", str(tmp_path / "m"), *sorted(glob.glob(str(tmp_path / "s" / "parts" / "*.json")))])
    assert r.returncode == 0, r.stderr
    assert_same_result(_json.load(str(tmp_path / "m" / "fig1.json")), _json.load(str(tmp_path / "one" / "fig1.json")))


@pytest.mark.parametrize("args, match", [
    (["--shard", "0/3"], "argument --shard: must be i/n with integers 1 <= i <= n .*got 0/3"),
    (["--shard", "4/3"], "argument --shard: must be i/n .*got 4/3"),
    (["--shard", "a/b"], "argument --shard: must be i/n .*got 'a/b'"),
])
def test_cli_refuses_bad_shards_in_one_line_before_any_work(tmp_path, args, match):
    out = tmp_path / "out"
    r = _cli(["reproduce", *FIG1_FLAGS, "--out", str(out), *args])
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search("leakycuda reproduce: error: " + match, r.stderr), r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, env, match", [
    (["reproduce", "dln-rank", "--quick", "--sequential", "--shard", "1/2"], {},
     "argument --sequential: applies to 'reproduce fig1|fig2' only, not to dln-rank"),
    (["reproduce", "fcnn-bottleneck", "--sequential"], {}, "argument --sequential: applies to"),
    (["demo", "--shard", "1/2"], {}, "--shard is an option of 'leakycuda reproduce', not of 'demo'"),
    (["reproduce", "dln-rank", "--quick", "--shard", "1/2"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
     "argument --shard: not with torchrun"),
    (["demo"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "demo trains one run: launch it without torchrun"),
    (["merge", "OUT"], {}, "the following arguments are required: PART"),
])
def test_cli_refuses_shards_and_launches_where_they_do_not_apply(tmp_path, args, env, match):
    r = subprocess.run([sys.executable, "-m", "leakycuda", *args], capture_output=True, text=True,
                       env=dict(ENV, **env), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_cli_merge_refuses_in_one_line(tmp_path):
    kw = dict(seeds=2, config=DLNRankConfig(steps=10, depths=(1, 2)), **QUIET)
    a = _shards(run_dln_rank, tmp_path, 2, **kw)
    for paths, match in (([a[0]], "missing shard 2 of 2"), ([a[0], a[0], a[1]], "given twice"),
                         ([str(tmp_path / "x.json")], "PART must be a part file")):
        r = _cli(["merge", str(tmp_path / "m"), *paths])
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m").exists()


# -- torchrun --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_gloo_ranks_equal_one_process(tmp_path):
    one = _cli(["reproduce", *FIG1_FLAGS, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:%d" % free_port(), "-m", "leakycuda",
           "reproduce", *FIG1_FLAGS, "--out", str(tmp_path / "ranks")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[rank 0 of 2] fig1 Lt=" in r.stdout and "[rank 1 of 2] fig1 Lt=" in r.stdout
    got = _json.load(str(tmp_path / "ranks" / "fig1.json"))
    assert_same_result(got, _json.load(str(tmp_path / "one" / "fig1.json")))
    assert [(p["kind"], p["index"], p["count"]) for p in got["parts"]] == [("rank", 0, 2), ("rank", 1, 2)]
    assert sorted(os.listdir(tmp_path / "ranks" / "parts")) == ["fig1.rank-0-of-2.json", "fig1.rank-1-of-2.json"]


def _rank_worker(rank, port, out):
    """A 2-rank run_plan whose rank 1 fails on its second run (python tests/test_distribute.py RANK PORT OUT)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=2)
    jobs = [Job("run%d" % i, cost=1.0) for i in range(6)]

    def train(indices, emit):
        for k, i in enumerate(indices):
            if rank == 1 and k == 1:
                raise RuntimeError("out of memory on run%d" % i)
            emit(i, {"value": i * i})

    try:
        got = distribute.run_plan("toy", {"experiment": "toy"}, jobs, train, out=out, log=lambda *a: None)
        print("RESULT", json.dumps(got))
    except RunsFailed as e:
        print("FAILED", str(e))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_a_failing_rank_reports_its_runs_and_the_others_are_kept(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(tmp_path)], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    split = assign([Job("run%d" % i, cost=1.0) for i in range(6)], 2)
    failed = ["run%d" % i for i in split[1][1:]]
    line0 = next(line for line in logs[0].splitlines() if line.startswith("FAILED"))
    assert "rank 1 of 2 failed (RuntimeError: out of memory on %s)" % failed[0] in line0
    assert "holding the runs %s" % ", ".join(repr(k) for k in failed) in line0
    assert "rerun the same command" in line0
    assert "FAILED rank 1 of 2: RuntimeError" in logs[1]
    kept = _json.load(str(tmp_path / "parts" / "toy.rank-0-of-2.json"))
    assert kept["runs"] == {"run%d" % i: {"value": i * i} for i in split[0]}
    assert list(_json.load(str(tmp_path / "parts" / "toy.rank-1-of-2.json"))["runs"]) == ["run%d" % split[1][0]]


if __name__ == "__main__":
    _rank_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
