"""`leakycuda selftest` on the CPU (its lines, summary and exit code, and that it fails when a result is wrong or a
child crashes), the tolerance rule it shares with the tests, and bench/gpu_check.sh rehearsed on the CPU."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import leakycuda
from leakycuda import _tolerance, selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+) +(\S.*)  \((\d+\.\d\d) s\)$")
SUMMARY = re.compile(r"^selftest (\S+): (\d+) passed, (\d+) failed, (\d+) skipped in ([\d.]+) s(; failed: (.*))?$")


def _env(**extra):
    """This process's environment with the leakycuda it imported first on PYTHONPATH (children run elsewhere)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(leakycuda.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop(selftest.PERTURB_ENV, None)
    env.update(extra)
    return env


def _selftest(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "leakycuda.cli", "selftest", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=_env(**env))


def _parse(stdout):
    """(header, {name: (status, detail)}, summary match) of a selftest's output; every line must have its form."""
    lines = stdout.strip().splitlines()
    header, body, last = lines[0], [ln for ln in lines[1:-1] if not ln.startswith(selftest.PERTURB_ENV)], lines[-1]
    checks = {}
    for line in body:
        m = LINE.match(line)
        assert m, "not a check line: %r" % line
        assert m.group(2) not in checks, "check %s reported twice" % m.group(2)
        checks[m.group(2)] = (m.group(1), m.group(3))
    summary = SUMMARY.match(last)
    assert summary, "not a summary line: %r" % last
    return header, checks, summary


def _cuda_only(name):
    return any(part in selftest.CUDA_ONLY_PRECISIONS for part in name.split("/")) or "graph" in name


def _expected_names(device, quick=False):
    return [name for name, _, _ in selftest.plan(device, quick)] + ["bad_input/" + c[0] for c in selftest.BAD_INPUTS]


@pytest.mark.parametrize("quick", [False, True])
def test_selftest_passes_on_cpu_with_one_line_per_check(tmp_path, quick):
    out = tmp_path / "selftest.json"
    r = _selftest(tmp_path, "--device", "cpu", "--json", str(out), *(["--quick"] if quick else []))
    assert r.returncode == 0, r.stdout + r.stderr
    header, checks, summary = _parse(r.stdout)
    assert header.startswith("leakycuda %s selftest on cpu" % ("quick" if quick else "full"))
    assert list(checks) == _expected_names("cpu", quick)
    statuses = [s for s, _ in checks.values()]
    assert "FAIL" not in statuses
    assert summary.group(1) == "cpu" and summary.group(7) is None
    assert [int(summary.group(i)) for i in (2, 3, 4)] == [statuses.count("PASS"), 0, statuses.count("SKIP")]
    # what the CPU cannot run is skipped with its reason, and only that
    skipped = {name for name, (s, _) in checks.items() if s == "SKIP"}
    assert skipped == {name for name, _, skip in selftest.plan("cpu", quick) if skip}
    assert skipped and all(_cuda_only(n) for n in skipped)
    assert all("CUDA only" in checks[n][1] for n in skipped)
    # every op is covered
    for prefix in ("stack/fp64/", "stack/fp32/", "stack/checkpoint/", "stack/return_all/", "stack/models/",
                   "layer/", "coi/stable/", "coi/exact/", "k_norm2/", "energies/", "ensemble/train_step/",
                   "bad_input/rho_negative", "bad_input/rho_nan", "bad_input/W_without_bias"):
        assert any(n.startswith(prefix) and checks[n][0] == "PASS" for n in checks), prefix
    assert all("err" in detail and "<= bound" in detail for name, (s, detail) in checks.items()
               if s == "PASS" and not name.startswith("bad_input/"))
    assert all(checks[n][1].startswith("ValueError: ") for n in checks if n.startswith("bad_input/"))
    d = json.loads(out.read_text())
    assert (d["device"], d["quick"], d["failed"]) == ("cpu", quick, 0)
    assert [x["name"] for x in d["results"]] == list(checks)
    assert d["machine"]["torch"] == torch.__version__


def test_a_wrong_result_and_a_crash_fail_the_selftest_and_are_named(tmp_path):
    """LEAKYCUDA_SELFTEST_PERTURB: one wrong element in a stack gradient check, an energies check and a float32
    check, and a bad-input child that dies of SIGSEGV; exactly those fail, the rest still pass, exit code 1."""
    broken = ["stack/fp64/relu", "stack/models/fp32", "energies/fp32/relu", "bad_input/rho_nan"]  # plan order
    r = _selftest(tmp_path, "--quick", **{selftest.PERTURB_ENV: ",".join(broken)})
    assert r.returncode == 1, r.stdout + r.stderr
    _, checks, summary = _parse(r.stdout)
    failed = [n for n, (s, _) in checks.items() if s == "FAIL"]
    assert failed == broken
    assert summary.group(3) == str(len(broken)) and summary.group(7) == ", ".join(broken)
    assert re.search(r"out: err \S+ > bound", checks["stack/fp64/relu"][1])
    assert "killed by SIGSEGV" in checks["bad_input/rho_nan"][1]
    assert "Fatal Python error: Segmentation fault" in checks["bad_input/rho_nan"][1]
    # the child that replaced the crashed one ran the cases after it
    assert checks["bad_input/W_without_bias"][0] == "PASS" and checks["bad_input/W_without_bias_models"][0] == "PASS"


def test_a_hung_child_is_killed_and_the_next_cases_still_run():
    cases = [("ok1", "ops.leaky_stack(x0, W, -r, 1.0, False, 1)", r"rho"),
             ("hangs", "import time; time.sleep(60)", "never"),
             ("ok2", "ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)", r"bias")]
    outcomes = selftest.BadInputs("cpu", cases, timeout=3).outcomes()
    assert outcomes["hangs"][0] == "hung (no answer in 3 s)"
    for name in ("ok1", "ok2"):
        assert selftest.judge_bad_input(outcomes[name]).startswith("ValueError: ")
    with pytest.raises(selftest.Failed, match="hung"):
        selftest.judge_bad_input(outcomes["hangs"])


def test_a_child_error_outside_the_statement_fails_that_case_and_the_next_child_goes_on():
    """A device the child cannot use fails where it makes its tensors: each case then ends its child with an
    error, reported with the exit code and the child's error."""
    outcomes = selftest.BadInputs("no-such-device", [("a", "pass", "x"), ("b", "pass", "x")], timeout=60).outcomes()
    assert set(outcomes) == {"a", "b"}
    for name in ("a", "b"):
        with pytest.raises(selftest.Failed, match=r"exited with code 1; stderr: .*no-such-device"):
            selftest.judge_bad_input(outcomes[name])


def test_a_child_that_dies_before_its_first_case_fails_every_case(monkeypatch):
    monkeypatch.setattr(selftest, "_CHILD", "import sys; sys.exit('cannot import leakycuda here')")
    outcomes = selftest.BadInputs("cpu", [("a", "pass", "x"), ("b", "pass", "x")], timeout=60).outcomes()
    for name in ("a", "b"):
        with pytest.raises(selftest.Failed, match=r"before any case ran, the child exited with code 1; stderr: "
                                                  r"cannot import leakycuda here"):
            selftest.judge_bad_input(outcomes[name])


def test_a_raised_error_of_the_wrong_kind_fails():
    with pytest.raises(selftest.Failed, match="no error was raised"):
        selftest.judge_bad_input(("ok", {"raised": None, "seconds": 0.0}))
    with pytest.raises(selftest.Failed, match="raised RuntimeError"):
        selftest.judge_bad_input(("ok", {"raised": "RuntimeError", "msg": "boom", "matches": True, "seconds": 0.0}))
    with pytest.raises(selftest.Failed, match="expected a ValueError naming the argument"):
        selftest.judge_bad_input(("ok", {"raised": "ValueError", "msg": "other", "matches": False, "seconds": 0.0}))


def test_the_plan_skips_exactly_the_cuda_only_checks():
    cuda = selftest.plan("cuda")
    assert all(skip is None for _, _, skip in cuda)
    cpu = {name: skip for name, _, skip in selftest.plan("cpu")}
    assert [name for name, _, _ in cuda] == list(cpu)
    for name, skip in cpu.items():
        assert (skip is not None) == _cuda_only(name), name


def test_selftest_arguments_are_checked_before_any_work(tmp_path):
    for args, pattern in ((["--device", "meta"], "must be 'cpu' or 'cuda"),
                          (["--device", "tpu"], "argument --device"),
                          (["--json", str(tmp_path)], "argument --json")):
        r = _selftest(tmp_path, *args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout)
        assert len(r.stderr.strip().splitlines()) == 1 and re.search(pattern, r.stderr), r.stderr
    if not torch.cuda.is_available():
        r = _selftest(tmp_path, "--device", "cuda")
        assert r.returncode == 2 and "argument --device" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_info_points_to_the_selftest():
    r = subprocess.run([sys.executable, "-m", "leakycuda.cli", "info"], capture_output=True, text=True, timeout=120,
                       env=_env())
    assert r.returncode == 0 and "leakycuda selftest" in r.stdout.splitlines()[-1]


def test_selftest_does_not_import_the_experiments():
    code = ("import sys, leakycuda.selftest\n"
            "print(sorted(m for m in sys.modules if m in ('leakycuda.experiments', 'leakycuda.related', "
            "'leakycuda.plots', 'matplotlib')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# --- the tolerance rule (leakycuda._tolerance, shared with tests/test_stack*.py) --------------------------------


def test_tolerance_rule():
    want = torch.linspace(-2, 3, 50, dtype=torch.float64)
    ok, err, bound = _tolerance.compare(want + 1e-13, want)
    assert ok and err <= bound
    ok, err, bound = _tolerance.compare(want + 1e-8, want)
    assert not ok and err > bound
    # lower precision: 4x the same-precision reference's error, plus a floor
    assert _tolerance.compare(want + 3.9e-3, want, 1e-3)[0]
    assert not _tolerance.compare(want + 4.1e-3 + 1e-5, want, 1e-3)[0]
    bad = want.clone()
    bad[7] = float("nan")
    assert not _tolerance.compare(bad, want)[0] and not _tolerance.compare(bad, want, 1.0)[0]
    assert not _tolerance.compare(want[:-1], want)[0]
    assert _tolerance.compare(want[:0], want[:0]) == (True, 0.0, 0.0)
    _tolerance.assert_close_to_reference(want.float(), want, _tolerance.max_abs_error(want.float(), want))
    with pytest.raises(AssertionError, match="dW: error"):
        _tolerance.assert_close_to_reference(want + 1e-3, want, 1e-6, name="dW")
    with pytest.raises(AssertionError):
        _tolerance.assert_close_to_reference(want + 1e-8, want)


# --- bench/gpu_check.sh -------------------------------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def test_gpu_check_script_parses_and_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _gpu_check(tmp_path, *stages, **env):
    out = tmp_path / "out"
    env = dict(dict(DEVICE="cpu", OUT=str(out), TMPDIR=str(tmp_path), COMMIT="0123abc"), **env)
    r = subprocess.run(["bash", SCRIPT, *stages], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=_env(**env))
    return r, out


def _stages(out):
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        table = tar.extractfile("./stages.tsv").read().decode()
        names = tar.getnames()
        jsons = {n: json.load(tar.extractfile(n)) for n in names if n.endswith(".json")}
    rows = [line.split("\t") for line in table.strip().splitlines()[1:]]
    return {r[0]: r[1] for r in rows}, names, jsons


def test_gpu_check_rehearsal_runs_every_stage_on_the_cpu(tmp_path):
    """DEVICE=cpu: every stage runs (no build, tiny sizes), $OUT holds the three files, every JSON parses and
    records the commit; the work folder is removed."""
    r, out = _gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.json", "summary.txt"]
    stages, names, jsons = _stages(out)
    assert stages == {s: "ok" for s in ("env", "build", "selftest", "pytest", "demo", "bench-stack",
                                        "bench-energies", "bench-ensemble")}
    for name in ("selftest", "bench_stack_cuda", "bench_energies", "bench_ensemble"):
        assert "./json/%s.json" % name in jsons, names
    assert "./json/pytest_cuda.xml" in names and "./demo/demo.json" in jsons
    assert jsons["./json/selftest.json"]["failed"] == 0
    assert jsons["./json/selftest.json"]["machine"]["git_commit"] == "0123abc"
    assert jsons["./json/bench_stack_cuda.json"]["environment"]["git_commit"] == "0123abc"
    assert jsons["./json/bench_energies.json"]["machine"]["git_commit"] == "0123abc"
    rows = jsons["./json/bench_stack_cuda.json"]["results"]
    assert [x["name"] for x in rows] == ["L20_tf32", "L20_fp32_exact", "paper_tf32", "paper_fp32_exact",
                                         "models16_L20_tf32"]
    assert all("error" not in x and x["fused_ms"] > 0 for x in rows[:4]) and rows[4]["batched_ms"] > 0
    assert all("error" not in x for x in jsons["./json/bench_energies.json"]["rows"])
    assert all("error" not in x for x in jsons["./json/bench_ensemble.json"]["results"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["commit"] == "0123abc" and summary["selftest"]["failed"] == 0
    assert summary["demo_wall_s"] > 0 and len(summary["bench_stack"]) == 5
    text = (out / "summary.txt").read_text()
    assert r.stdout.rstrip().endswith(text.rstrip()), "the summary is what the output ends with"
    for needle in ("selftest --device cpu: ", "pytest -m cuda: ", "stack forward+backward", "energies + COI",
                   "ensemble rows", "demo --device cpu: ok"):
        assert needle in text, needle
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu_check.")], "the work folder is left behind"


def test_gpu_check_limits_a_stage_and_carries_on(tmp_path):
    """A stage past its limit is stopped and recorded as timeout; the next stage still runs; a stage that would
    start with too little of the budget left is skipped; the exit code says not every stage was ok."""
    r, out = _gpu_check(tmp_path, "env", "selftest", "build", STAGE_LIMITS="selftest=1")
    assert r.returncode == 1
    stages, _, _ = _stages(out)
    assert stages == {"env": "ok", "selftest": "timeout", "build": "ok"}
    r, out = _gpu_check(tmp_path, "env", "selftest", BUDGET_S="30")  # 30 s - 20 s kept for packing < 15 s
    stages, _, _ = _stages(out)
    assert stages == {"env": "skipped", "selftest": "skipped"} and r.returncode == 1
    assert "out of time" in (out / "summary.txt").read_text()


def test_gpu_check_refuses_bad_arguments_before_any_work(tmp_path):
    for stages, env, message in ((["no-such-stage"], {}, "unknown stage 'no-such-stage'"),
                                 ([], {"DEVICE": "tpu"}, "DEVICE must be"),
                                 ([], {"BUDGET_S": "9m"}, "BUDGET_S must be"),
                                 ([], {"STAGE_LIMITS": "selftest"}, "STAGE_LIMITS")):
        r, out = _gpu_check(tmp_path, *stages, **env)
        assert r.returncode == 2 and message in r.stderr, (stages, env, r.stderr)
        assert not out.exists() or not os.listdir(out)
    r = subprocess.run(["bash", SCRIPT, "fingerprint"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.fullmatch(r"[0-9a-f]{16}\n", r.stdout)
