"""A battery of bad and degenerate inputs over the public API and the command line.

Each case runs in a persistent worker subprocess (tests/_battery_worker.py), restarted when a case
kills it, so a crash or a hang fails that case and not the run. An API case asserts the exception
type and that the message names the argument (words that must appear), or, for degenerate but
valid input, runs code that asserts the result. A command-line case asserts exit code 2, a one-line
message naming the flag, that nothing was written and that no training started. Cases whose fix
belongs to another part of the project are marked xfail(strict=True) with the owner, so that they
show up when the fix lands.
"""
import json
import os
import select
import subprocess
import sys
import tempfile
import time

import pytest

import leakycuda

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_battery_worker.py")
MARK = "@@battery@@ "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(leakycuda.__file__)))


class Worker:
    """A worker subprocess that answers one request per line; restarted after it dies or hangs."""

    def __init__(self):
        self.proc, self.log = None, None

    def start(self):
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT, env=env, bufsize=1)
        ready = self._read(120)
        assert ready.get("ready"), "the battery worker did not start: %s" % ready

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            self.proc = None

    def _read(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.stop()
                return {"died": "no answer within %d s (a hang?)" % timeout}
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                self.log.seek(0)
                tail = self.log.read()[-3000:]
                self.stop()
                return {"died": "the worker died (exit code %s) running this case:\n%s" % (code, tail)}
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def run(self, request, timeout=90):
        if self.proc is None:
            self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


def _param(kind, case_id, owner, **spec):
    marks = [pytest.mark.xfail(strict=True, reason="owned by %s" % owner)] if owner else []
    return pytest.param(dict(kind=kind, **spec), id=case_id, marks=marks)


def bad(case_id, code, exc, *words, owner=None):
    """The code raises ``exc`` (a class name; a subclass also matches) whose message contains every word."""
    return _param("bad", case_id, owner, code=code, exc=exc, words=words)


def ok(case_id, code, owner=None, timeout=90):
    """Degenerate but valid input: the code runs and asserts its result itself."""
    return _param("ok", case_id, owner, code=code, timeout=timeout)


def cli(case_id, argv, *words, owner=None):
    """The command line refuses argv: exit code 2, one line on stderr with every word, nothing run or written."""
    return _param("cli", case_id, owner, argv=argv.split(), words=words)


def _cuda():
    import torch

    return torch.cuda.is_available()


NAN_INTO_X0 = "x = x0.clone(); x[0, 0] = float('nan')\n"
FAKE = ("from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "mode = FakeTensorMode()\n"
        "args = [mode.from_tensor(t.contiguous()) for t in (%s)]\n"
        "with mode:\n"
        "    torch.ops.leakycuda.leaky_stack(*args, 1.0, False, 1)\n")

OPS = [  # the fused ops: their checks and messages belong to the `stack` helper (csrc/, functional.py)
    bad("stack-W-without-bias-column", "lc.leaky_stack(x0, W[..., :4], rho, 1.0)", "ValueError", "W", "w+1"),
    bad("stack-rho-wrong-length", "lc.leaky_stack(x0, W, rho[:2], 1.0)", "ValueError", "rho"),
    bad("stack-x0-int", "lc.leaky_stack(x0.long(), W, rho, 1.0)", "TypeError", "x0"),
    bad("stack-W-int", "lc.leaky_stack(x0, W.long(), rho, 1.0)", "TypeError", "W"),
    bad("stack-rho-negative", "lc.leaky_stack(x0, W, -rho, 1.0)", "ValueError", "rho"),
    bad("stack-rho-nan", "lc.leaky_stack(x0, W, rho * float('nan'), 1.0)", "ValueError", "rho"),
    bad("stack-Lt-nan", "lc.leaky_stack(x0, W, rho, float('nan'))", "ValueError", "Lt"),
    bad("stack-Lt-string", "lc.leaky_stack(x0, W, rho, '1')", "TypeError", "Lt"),
    bad("stack-rho-string", "lc.leaky_stack(x0, W, 'abc', 1.0)", "TypeError", "rho", "'abc'"),
    bad("stack-rho-list-with-a-word", "lc.leaky_stack(x0, W, [0.3, 0.3, 'x'], 1.0)", "TypeError", "rho", "'x'"),
    bad("stack-rho-ragged-list", "lc.leaky_stack(x0, W, [[0.3], [0.3, 0.3]], 1.0)", "ValueError", "rho", "regular"),
    ok("stack-rho-list-of-numbers", "want = lc.leaky_stack(x0, W, rho, 1.0)\n"
       "for r in (rho.tolist(), tuple(rho.tolist()), list(rho), rho.numpy()):\n"
       "    assert torch.equal(lc.leaky_stack(x0, W, r, 1.0), want)"),
    bad("layer-rho-string", "lc.leaky_layer(x0, W[0], 'abc', 1.0)", "TypeError", "rho_l", "'abc'"),
    bad("stack-x0-list", "lc.leaky_stack([[1.0]], W, rho, 1.0)", "TypeError", "x0"),
    bad("stack-checkpoint-0", "lc.leaky_stack(x0, W, rho, 1.0, checkpoint=0)", "ValueError", "checkpoint"),
    bad("stack-checkpoint-word", "lc.leaky_stack(x0, W, rho, 1.0, checkpoint='log')", "ValueError", "checkpoint"),
    bad("stack-width-mismatch", "lc.leaky_stack(x0[:, :3], W, rho, 1.0)", "ValueError", "W"),
    bad("stack-dtype-mismatch", "lc.leaky_stack(x0.float(), W, rho, 1.0)", "TypeError", "W"),
    bad("stack-half-on-cpu", "lc.leaky_stack(x0.half(), W.half(), rho.half(), 1.0)", "TypeError", "x0"),
    bad("layer-W-square", "lc.leaky_layer(x0, W[0, :, :4], rho[0], 1.0)", "ValueError", "W_l", "[w, w+1]"),
    bad("layer-x-int-named-x", "lc.leaky_layer(x0.long(), W[0], rho[0], 1.0)", "TypeError", "x must"),
    bad("fake-W-without-bias-column", FAKE % "x0, W[..., :4], rho", "ValueError", "W"),
    bad("fake-rho-wrong-length", FAKE % "x0, W, rho[:2]", "ValueError", "rho"),
    bad("fake-int-inputs", FAKE % "x0.long(), W, rho", "TypeError", "x0"),
    ok("nan-in-x0-propagates-as-reference", NAN_INTO_X0 +
       "a, b = lc.leaky_stack(x, W, rho, 1.0), lc.reference.leaky_stack(x, W, rho, 1.0)\n"
       "assert torch.equal(a.isnan(), b.isnan()), (int(a.isnan().sum()), int(b.isnan().sum()))"),
    ok("nan-in-W-propagates-as-reference",
       "V = W.clone(); V[1, 0, 0] = float('nan')\n"
       "a, b = lc.leaky_stack(x0, V, rho, 1.0), lc.reference.leaky_stack(x0, V, rho, 1.0)\n"
       "assert torch.equal(a.isnan(), b.isnan()), (int(a.isnan().sum()), int(b.isnan().sum()))"),
    ok("inf-in-x0-propagates-as-reference", "x = x0.clone(); x[1, 2] = float('inf')\n"
       "a, b = lc.leaky_stack(x, W, rho, 1.0), lc.reference.leaky_stack(x, W, rho, 1.0)\n"
       "assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())"),
    ok("stack-empty-batch", "y = lc.leaky_stack(x0[:0], W, rho, 1.0); assert y.shape == (0, 4)"),
    ok("stack-zero-steps-is-identity", "assert torch.equal(lc.leaky_stack(x0, W, torch.zeros_like(rho), 1.0), x0)"),
    ok("stack-noncontiguous-input",
       "x = torch.randn(4, 5, dtype=F64).t()\n"
       "torch.testing.assert_close(lc.leaky_stack(x, W, rho, 2.0), lc.reference.leaky_stack(x, W, rho, 2.0))"),
    ok("stack-does-not-modify-inputs",
       "a, b, c = x0.clone(), W.clone(), rho.clone(); lc.leaky_stack(x0, W, rho, 1.0, checkpoint=2)\n"
       "assert torch.equal(a, x0) and torch.equal(b, W) and torch.equal(c, rho)"),
]

ENERGIES = [  # energies.py and its ops belong to the `energies` helper
    bad("stable-rank-int", "lc.stable_rank(torch.arange(12).reshape(3, 4))", "TypeError", "X"),
    bad("stable-rank-1d", "lc.stable_rank(torch.randn(4))", "ValueError", "X"),
    bad("k-norm-gamma-0", "lc.k_norm2(x0, x0, gamma=0)", "ValueError", "gamma"),
    ok("k-norm-gamma-0-hint-is-not-to-pass-0",
       "try:\n    lc.k_norm2(x0, x0, gamma=0)\nexcept ValueError as e:\n    assert '(or 0)' not in str(e), str(e)"),
    ok("exact-coi-of-nan", "x = x0.clone(); x[0, 0] = float('nan'); r = lc.cost_of_identity(x)\n"
       "assert r.value.isnan() and r.residual.isnan() and int(r.rank) == -1, r"),
    bad("coi-int", "lc.cost_of_identity(x0.long(), gamma0=1e-2)", "TypeError", "X"),
    bad("coi-gamma-negative", "lc.cost_of_identity(x0, gamma=-1.0)", "ValueError", "gamma"),
    bad("coi-gamma-and-gamma0", "lc.cost_of_identity(x0, gamma=1.0, gamma0=1.0)", "ValueError", "gamma0"),
    bad("coi-gamma0-zero", "lc.cost_of_identity(x0, gamma0=0.0)", "ValueError", "gamma0"),
    bad("coi-X-list", "lc.cost_of_identity([[1.0]])", "TypeError", "X"),
    bad("energies-rho-wrong-length", "lc.energies(xs, rho[:2], 1.0)", "ValueError", "rho"),
    bad("energies-xs-2d", "lc.energies(x0, rho, 1.0)", "ValueError", "xs"),
    bad("energies-Lt-string", "lc.energies(xs, rho, '1')", "TypeError", "Lt"),
    bad("k-norm-M-wrong-rows", "lc.k_norm2(x0[:3], x0, gamma=1.0)", "ValueError", "M"),
    bad("k-norm-no-ridge", "lc.k_norm2(x0, x0)", "ValueError", "gamma"),
    ok("coi-empty-batch-is-0", "assert float(lc.cost_of_identity(x0[:0], gamma0=1e-2)) == 0.0"),
    ok("coi-zero-X-is-0", "assert float(lc.cost_of_identity(torch.zeros(5, 3, dtype=F64), gamma0=1e-2)) == 0.0"),
]

STEPS = [
    bad("steps-L-0", "lc.step_sizes(0)", "ValueError", "L", ">= 1"),
    bad("steps-L-float", "lc.step_sizes(2.5)", "TypeError", "L"),
    bad("steps-L-string", "lc.step_sizes('4')", "TypeError", "L"),
    bad("steps-L-bool", "lc.step_sizes(True)", "TypeError", "L"),
    bad("steps-dtype-int", "lc.step_sizes(4, dtype=torch.int64)", "TypeError", "dtype", "float"),
    bad("steps-dtype-string", "lc.step_sizes(4, dtype='float32')", "TypeError", "dtype"),
    bad("steps-device-gpu", "lc.step_sizes(4, device='gpu')", "ValueError", "device", "'gpu'"),
    bad("steps-scheme", "lc.step_sizes(4, 'linear')", "ValueError", "scheme", "'linear'"),
    bad("steps-scheme-adaptive-hint", "lc.step_sizes(4, 'adaptive')", "ValueError", "scheme", "adaptive_step_sizes"),
    bad("steps-a-1", "lc.step_sizes(4, 'irregular', a=1.0)", "ValueError", "a", "[0, 1)"),
    bad("steps-a-nan", "lc.step_sizes(4, 'irregular', a=float('nan'))", "ValueError", "a"),
    bad("steps-a-string", "lc.step_sizes(4, 'irregular', a='0.5')", "TypeError", "a"),
    bad("steps-a-with-equidistant", "lc.step_sizes(4, a=0.5)", "ValueError", "a", "irregular"),
    bad("adaptive-xs-2d", "lc.adaptive_step_sizes(x0, rho)", "ValueError", "xs"),
    bad("adaptive-xs-int", "lc.adaptive_step_sizes(xs.long(), rho)", "TypeError", "xs"),
    bad("adaptive-rho-int", "lc.adaptive_step_sizes(xs, torch.ones(3, dtype=torch.int64))", "TypeError", "rho"),
    bad("adaptive-rho-wrong-length", "lc.adaptive_step_sizes(xs, rho[:2])", "ValueError", "xs", "rho"),
    bad("adaptive-rho-negative", "lc.adaptive_step_sizes(xs, -rho)", "ValueError", "rho"),
    bad("adaptive-rho-list", "lc.adaptive_step_sizes(xs, [0.5, 0.5, 0.5])", "TypeError", "rho"),
    bad("adaptive-eps", "lc.adaptive_step_sizes(xs, rho, eps=-1.0)", "ValueError", "eps"),
    bad("adaptive-reduce-not-callable", "lc.adaptive_step_sizes(xs, rho, reduce=3)", "TypeError", "reduce"),
    ok("adaptive-one-layer", "assert lc.adaptive_step_sizes(xs[:2], rho[:1]).tolist() == [1.0]"),
    ok("adaptive-all-zero-keeps-rho",
       "import warnings\nwith warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
       "    r = lc.adaptive_step_sizes(torch.zeros(4, 6, 3, dtype=F64), rho)\n"
       "assert torch.allclose(r, rho) and any('degenerate' in str(x.message) for x in w)"),
    ok("steps-sum-to-one-float64", "r = lc.step_sizes(7, 'irregular', 0.9, dtype=F64); "
       "assert abs(float(r.sum()) - 1) < 1e-12 and bool((r > 0).all())"),
]

DATA = [
    bad("task-d-0", "task_ = data.bottleneck_task(d=0)", "ValueError", "d", ">= 1"),
    bad("task-d-float", "data.bottleneck_task(d=3.0)", "TypeError", "d"),
    bad("task-inner-empty", "data.bottleneck_task(inner=())", "ValueError", "inner"),
    bad("task-inner-0", "data.bottleneck_task(inner=(0,))", "ValueError", "inner"),
    bad("task-inner-string", "data.bottleneck_task(inner='3')", "TypeError", "inner"),
    bad("task-inner-wider-than-d", "data.bottleneck_task(d=5, inner=(8,), n_train=10, n_test=0)", "ValueError",
        "inner", "d = 5"),
    bad("task-n-train-1", "data.bottleneck_task(n_train=1)", "ValueError", "n_train"),
    bad("task-n-test-negative", "data.bottleneck_task(n_test=-1)", "ValueError", "n_test"),
    bad("task-seed-negative", "data.bottleneck_task(seed=-1)", "ValueError", "seed"),
    bad("task-seed-float", "data.bottleneck_task(seed=1.5)", "TypeError", "seed"),
    bad("task-teacher", "data.bottleneck_task(teacher='cnn')", "ValueError", "teacher", "'cnn'"),
    bad("task-dtype-int", "data.bottleneck_task(d=3, inner=(2,), n_train=4, n_test=0, dtype=torch.int64)",
        "TypeError", "dtype", "int64"),
    bad("task-dtype-string", "data.bottleneck_task(dtype='float32')", "TypeError", "dtype"),
    bad("task-device-gpu", "data.bottleneck_task(device='gpu')", "ValueError", "device", "'gpu'"),
    bad("task-hidden-0", "data.bottleneck_task(hidden=0)", "ValueError", "hidden"),
    bad("task-teacher-wrong-width", "task().teacher(torch.zeros(4, 5, dtype=F64))", "ValueError", "x", "d = 3"),
    bad("task-to-int", "task().to(dtype=torch.int64)", "TypeError", "dtype"),
    ok("task-teacher-matches-data", "t = task(); torch.testing.assert_close(t.teacher(t.x_train), t.y_train)"),
    ok("task-no-test-points", "t = task(n_test=0); assert t.x_test.shape == (0, 3) and t.rank == 2"),
    ok("task-rank-is-narrowest", "t = data.bottleneck_task(d=5, inner=(6, 3), n_train=6, n_test=2, hidden=4); "
       "assert t.rank == 3"),
    ok("task-float64-is-float64", "t = task(); assert t.x_train.dtype == F64 and bool(torch.isfinite(t.y_train).all())"),
]

MODULE = [
    bad("net-in-features-0", "LeakyResNet(0, 2, 4, 3, 1.0)", "ValueError", "in_features"),
    bad("net-width-float", "LeakyResNet(3, 2, 4.5, 3, 1.0)", "TypeError", "width"),
    bad("net-depth-0", "LeakyResNet(3, 2, 4, 0, 1.0)", "ValueError", "depth"),
    bad("net-Lt-nan", "LeakyResNet(3, 2, 4, 3, float('nan'))", "ValueError", "effective_depth"),
    bad("net-Lt-negative", "LeakyResNet(3, 2, 4, 3, -1.0)", "ValueError", "effective_depth"),
    bad("net-Lt-string", "LeakyResNet(3, 2, 4, 3, '1')", "TypeError", "effective_depth"),
    bad("net-steps", "LeakyResNet(3, 2, 4, 3, 1.0, steps='log')", "ValueError", "steps"),
    bad("net-init", "LeakyResNet(3, 2, 4, 3, 1.0, init='orthogonal')", "ValueError", "init"),
    bad("net-a-without-irregular", "LeakyResNet(3, 2, 4, 3, 1.0, a=0.5)", "ValueError", "irregular"),
    bad("net-checkpoint-0", "LeakyResNet(3, 2, 4, 3, 1.0, checkpoint=0)", "ValueError", "checkpoint"),
    bad("net-learn-projections", "LeakyResNet(3, 2, 4, 3, 1.0, learn_projections='yes')", "TypeError",
        "learn_projections"),
    bad("net-dtype-int", "LeakyResNet(3, 2, 4, 3, 1.0, dtype=torch.int64)", "TypeError", "dtype"),
    bad("net-float16-on-cpu-at-construction", "LeakyResNet(3, 2, 4, 3, 1.0, dtype=torch.float16)", "TypeError",
        "dtype", "float16", "cpu"),
    bad("net-bfloat16-on-cpu", "LeakyResNet(3, 2, 4, 3, 1.0, dtype=torch.bfloat16)", "TypeError", "dtype"),
    bad("net-half-after-construction-on-cpu", "m = model().half(); m(torch.zeros(2, 3, dtype=torch.float16))",
        "TypeError", "model's dtype", "float16", "cpu"),
    bad("net-device-gpu", "LeakyResNet(3, 2, 4, 3, 1.0, device='gpu')", "ValueError", "device"),
    bad("net-x-wrong-width", "model()(torch.zeros(4, 5, dtype=F64))", "ValueError", "x", "in_features"),
    bad("net-x-float32-into-float64", "model()(torch.zeros(4, 3))", "TypeError", "x", "dtype", "float32"),
    bad("net-x-float64-into-float32", "model(dtype=torch.float32)(torch.zeros(4, 3, dtype=F64))", "TypeError",
        "x", "float64"),
    bad("net-x-int", "model()(torch.zeros(4, 3, dtype=torch.int64))", "TypeError", "x"),
    bad("net-x-list", "model()([[0.0, 0.0, 0.0]])", "TypeError", "x"),
    bad("net-representations-bad-x", "model().representations(torch.zeros(4, 2, dtype=F64))", "ValueError", "x"),
    bad("net-regularization-lam-negative", "model().regularization(-1.0)", "ValueError", "lam"),
    bad("net-regularization-lam-nan", "model().regularization(float('nan'))", "ValueError", "lam"),
    bad("net-regularization-lam-string", "model().regularization('1e-3')", "TypeError", "lam"),
    bad("net-set-Lt-nan", "m = model(); m.Lt = float('nan')", "ValueError", "effective_depth"),
    bad("net-adapt-not-adaptive", "model().adapt_steps(torch.zeros(4, 3, dtype=F64))", "RuntimeError", "adaptive"),
    bad("net-load-other-Lt", "model(Lt=0.5).load_state_dict(model(Lt=2.0).state_dict())", "ValueError",
        "state_dict", "effective_depth=2.0", "strict=False"),
    bad("net-load-other-steps", "model().load_state_dict(model(steps='adaptive').state_dict())", "ValueError",
        "state_dict", "steps='adaptive'"),
    bad("net-load-other-depth", "model(L=3).load_state_dict(model(L=4).state_dict())", "RuntimeError",
        "size mismatch", "weight"),
    ok("net-load-refused-leaves-model-as-is",
       "m = model(Lt=0.5); before = m.weight.detach().clone()\n"
       "assert raises(lambda: m.load_state_dict(model(Lt=2.0).state_dict()), ValueError)\n"
       "assert m.Lt == 0.5 and torch.equal(before, m.weight)"),
    ok("net-load-strict-false-adopts",
       "import warnings\nm = model(Lt=0.5)\nwith warnings.catch_warnings(record=True) as w:\n"
       "    warnings.simplefilter('always')\n    m.load_state_dict(model(Lt=2.0).state_dict(), strict=False)\n"
       "assert m.Lt == 2.0 and any('adopting' in str(x.message) for x in w)"),
    ok("net-empty-batch", "assert model()(torch.zeros(0, 3, dtype=F64)).shape == (0, 3)"),
    ok("net-one-sample-1d", "assert model()(torch.zeros(3, dtype=F64)).shape == (3,)"),
]

def fit_bad(case_id, task_expr, extra, exc, *words):
    """fit(model(), <task_expr>, 1e-2, adam_steps=2, sgd_steps=1, log_every=1) with ``extra`` ("k=v, ...") on top."""
    kw = dict(adam_steps="2", sgd_steps="1", log_every="1")
    kw.update(part.strip().split("=", 1) for part in extra.split(", ") if part.strip())
    args = ", ".join("%s=%s" % kv for kv in kw.items())
    return bad(case_id, "train.fit(model(), %s, 1e-2, %s)" % (task_expr, args), exc, *words)


TRAIN = [
    bad("fit-model-linear", "train.fit(torch.nn.Linear(3, 3), task(), 1e-2)", "TypeError", "model", "Linear"),
    bad("fit-model-frozen", "m = model(); [p.requires_grad_(False) for p in m.parameters()]; train.fit(m, task(), 1e-2)",
        "ValueError", "model", "trainable"),
    bad("fit-model-nan-weights", "m = model(); m.weight.data[0, 0, 0] = float('nan'); train.fit(m, task(), 1e-2)",
        "ValueError", "model.weight", "NaN"),
    fit_bad("fit-task-without-x-train", "object()", "", "TypeError", "task", "x_train"),
    fit_bad("fit-x-train-list", "fake_task([[0.0] * 3], task().y_train)", "", "TypeError", "task", "x_train"),
    fit_bad("fit-x-train-1d", "fake_task(task().x_train[0], task().y_train)", "", "ValueError", "task.x_train"),
    fit_bad("fit-x-train-wrong-width", "fake_task(task().x_train[:, :2], task().y_train)", "", "ValueError",
            "task.x_train", "in_features = 3"),
    fit_bad("fit-y-train-wrong-width", "fake_task(task().x_train, task().y_train[:, :1])", "", "ValueError",
            "task.y_train", "out_features = 3", "[8, 1]"),
    fit_bad("fit-y-train-wrong-rows", "fake_task(task().x_train, task().y_train[:5])", "", "ValueError",
            "task.y_train", "N = 8"),
    fit_bad("fit-empty-training-set", "fake_task(task().x_train[:0], task().y_train[:0])", "", "ValueError",
            "task.x_train", "at least one"),
    fit_bad("fit-nan-data", "fake_task(task().x_train * float('nan'), task().y_train)", "", "ValueError",
            "task.x_train", "NaN"),
    fit_bad("fit-inf-targets", "fake_task(task().x_train, task().y_train + float('inf'))", "", "ValueError",
            "task.y_train", "inf"),
    fit_bad("fit-x-test-without-y-test", "fake_task(task().x_train, task().y_train, x_test=task().x_test, y_test=None)",
            "", "ValueError", "x_test", "y_test"),
    fit_bad("fit-x-test-wrong-width", "fake_task(task().x_train, task().y_train, x_test=task().x_test[:, :2], "
            "y_test=task().y_test)", "", "ValueError", "task.x_test"),
    fit_bad("fit-complex-data", "fake_task(task().x_train.to(torch.complex128), task().y_train)", "", "TypeError",
            "task.x_train"),
    bad("fit-lam-nan", "train.fit(model(), task(), float('nan'))", "ValueError", "lam", "nan"),
    bad("fit-lam-negative", "train.fit(model(), task(), -1.0)", "ValueError", "lam"),
    bad("fit-lam-string", "train.fit(model(), task(), '1e-2')", "TypeError", "lam"),
    fit_bad("fit-adam-steps-negative", "task()", "adam_steps=-1", "ValueError", "adam_steps"),
    fit_bad("fit-adam-steps-float", "task()", "adam_steps=2.5", "TypeError", "adam_steps"),
    fit_bad("fit-sgd-steps-bool", "task()", "sgd_steps=True", "TypeError", "sgd_steps"),
    fit_bad("fit-adam-lr-negative", "task()", "adam_lr=-1e-3", "ValueError", "adam_lr"),
    fit_bad("fit-adam-lr-inf", "task()", "adam_lr=float('inf')", "ValueError", "adam_lr"),
    ok("fit-negative-sgd-lr-refused-before-any-step",
       "m = model(); w = m.weight.detach().clone()\n"
       "assert raises(lambda: train.fit(m, task(), 1e-2, adam_steps=3, sgd_steps=2, sgd_lr=-1.0), ValueError)\n"
       "assert torch.equal(w, m.weight)"),
    fit_bad("fit-sgd-momentum-negative", "task()", "sgd_momentum=-0.1", "ValueError", "sgd_momentum"),
    fit_bad("fit-adapt-every-0", "task()", "adapt_every=0", "ValueError", "adapt_every"),
    bad("fit-log-every-0", "train.fit(model(), task(), 1e-2, adam_steps=1, log_every=0)", "ValueError", "log_every"),
    fit_bad("fit-checkpoint-every-negative", "task()", "checkpoint_every=-1", "ValueError", "checkpoint_every"),
    fit_bad("fit-progress-string", "task()", "progress='yes'", "TypeError", "progress"),
    fit_bad("fit-callback-not-callable", "task()", "callback=3", "TypeError", "callback"),
    fit_bad("fit-desc-number", "task()", "desc=3", "TypeError", "desc"),
    fit_bad("fit-diverge-factor-below-1", "task()", "diverge_factor=0.5", "ValueError", "diverge_factor"),
    fit_bad("fit-history-path-under-a-file", "task()", "history_path='/etc/passwd/h.json'", "ValueError",
            "history_path", "/etc/passwd"),
    fit_bad("fit-history-path-is-a-folder", "task()", "history_path=tmp", "ValueError", "history_path", "folder"),
    fit_bad("fit-checkpoint-path-unwritable", "task()", "checkpoint_path='/proc/leakycuda/run.pt'", "ValueError",
            "checkpoint_path"),
    fit_bad("fit-resume-without-path", "task()", "resume=True", "ValueError", "resume", "checkpoint_path"),
    fit_bad("fit-resume-number", "task()", "resume=3", "TypeError", "resume"),
    bad("fit-diverges", "train.fit(model(), task(), 1e-2, adam_steps=40, adam_lr=50.0, sgd_steps=0, log_every=1)",
        "DivergenceError", "diverged", "adam_lr"),
    ok("fit-divergence-keeps-history",
       "import os, json\np = os.path.join(tmp, 'h.json')\n"
       "try:\n    train.fit(model(), task(), 1e-2, adam_steps=40, adam_lr=50.0, sgd_steps=0, log_every=1, "
       "history_path=p)\n    raise AssertionError('no divergence')\n"
       "except train.DivergenceError as e:\n    h = json.load(open(p))\n"
       "    assert len(h) >= 2 and h == e.result.history and e.step == h[-1]['step'] and isinstance(e, FloatingPointError)"),
    ok("fit-explosion-off-keeps-nonfinite-test",
       "r = train.fit(model(), task(), 1e-2, adam_steps=3, sgd_steps=0, diverge_factor=None); assert r.steps == 3"),
    ok("fit-zero-steps", "r = train.fit(model(), task(), 1e-2, adam_steps=0, sgd_steps=0); "
       "assert r.steps == 0 and len(r.history) == 1"),
    ok("fit-one-sample", "t = task(); r = train.fit(model(), fake_task(t.x_train[:1], t.y_train[:1]), 1e-2, "
       "adam_steps=2, sgd_steps=0); assert r.steps == 2 and math.isnan(r.final['test_mse'])"),
    ok("fit-lam-0", "r = train.fit(model(), task(), 0.0, adam_steps=2, sgd_steps=0); assert r.final['reg'] == 0.0"),
    ok("fit-does-not-modify-task",
       "t = task(); x = t.x_train.clone(); train.fit(model(), t, 1e-2, adam_steps=2, sgd_steps=0)\n"
       "assert torch.equal(x, t.x_train)"),
    bad("mse-broadcast-refused", "train.mse(torch.zeros(4, 3), torch.zeros(4, 1))", "ValueError", "target", "[4, 3]"),
    bad("checkpoint-corrupt", "import os\np = os.path.join(tmp, 'c.pt'); open(p, 'wb').write(b'not a checkpoint')\n"
        "train.load_checkpoint(p)", "ValueError", "c.pt", "corrupt"),
    bad("checkpoint-truncated",
        "import os\np = os.path.join(tmp, 'c.pt'); train.fit(model(), task(), 1e-2, adam_steps=1, sgd_steps=0, "
        "checkpoint_path=p)\nb = open(p, 'rb').read(); open(p, 'wb').write(b[: len(b) // 2])\n"
        "train.load_checkpoint(p)", "ValueError", "c.pt"),
    bad("checkpoint-other-format", "import os\np = os.path.join(tmp, 'c.pt'); torch.save({'a': 1}, p)\n"
        "train.load_checkpoint(p)", "ValueError", "format"),
    bad("checkpoint-missing", "train.load_checkpoint('/nonexistent/run.pt')", "FileNotFoundError", "run.pt"),
    bad("resume-corrupt-checkpoint",
        "import os\np = os.path.join(tmp, 'c.pt'); open(p, 'wb').write(b'\\x80garbage')\n"
        "train.fit(model(), task(), 1e-2, adam_steps=1, sgd_steps=0, checkpoint_path=p, resume=True)",
        "ValueError", "c.pt"),
    bad("resume-checkpoint-of-another-model",
        "import os\np = os.path.join(tmp, 'c.pt')\ntrain.fit(model(L=4), task(), 1e-2, adam_steps=1, sgd_steps=0, "
        "checkpoint_path=p)\ntrain.fit(model(L=3), task(), 1e-2, adam_steps=2, sgd_steps=0, checkpoint_path=p, "
        "resume=True)", "ValueError", "resume", "another"),
]

DIAGNOSTICS = [
    bad("analyze-lam-0", "t = task(); diagnostics.analyze(model(), t.x_train, t.y_train, 0.0)", "ValueError", "lam"),
    bad("analyze-lam-nan", "t = task(); diagnostics.analyze(model(), t.x_train, t.y_train, float('nan'))",
        "ValueError", "lam"),
    bad("analyze-x-wrong-width", "t = task(); diagnostics.analyze(model(), t.x_train[:, :2], t.y_train, 1e-2)",
        "ValueError", "x", "d_in"),
    bad("analyze-y-wrong-rows", "t = task(); diagnostics.analyze(model(), t.x_train, t.y_train[:3], 1e-2)",
        "ValueError", "y"),
    bad("analyze-x-nan", "t = task(); diagnostics.analyze(model(), t.x_train * float('nan'), t.y_train, 1e-2)",
        "ValueError", "x", "NaN"),
    bad("analyze-diverged-model",
        "t = task(); m = model(); m.weight.data.fill_(float('inf')); diagnostics.analyze(m, t.x_train, t.y_train, 1e-2)",
        "ValueError", "model.weight"),
    bad("analyze-not-a-model", "t = task(); diagnostics.analyze(object(), t.x_train, t.y_train, 1e-2)", "TypeError",
        "model"),
    bad("analyze-gamma0-negative", "t = task(); diagnostics.analyze(model(), t.x_train, t.y_train, 1e-2, gamma0=-1.0)",
        "ValueError", "gamma0"),
    bad("analyze-x-list", "t = task(); diagnostics.analyze(model(), [[0.0] * 3], t.y_train, 1e-2)", "TypeError", "x"),
    bad("analyze-dtype-int", "t = task(); diagnostics.analyze(model(), t.x_train, t.y_train, 1e-2, dtype=torch.int64)",
        "TypeError", "dtype"),
]

EXPERIMENTS = [
    bad("runconfig-lam-negative", "sweep.RunConfig(lam=-5.0).check()", "ValueError", "lam"),
    bad("runconfig-gamma0-negative", "sweep.RunConfig(gamma0=-1.0).check()", "ValueError", "gamma0"),
    bad("runconfig-Lt-0", "sweep.RunConfig(Lt=0.0).check()", "ValueError", "Lt"),
    bad("runconfig-Lt-unstable", "sweep.RunConfig(Lt=1e6).check()", "ValueError", "Lt", "<= 40",
        "stable range", "5e+04"),
    bad("run-fig1-Lt-unstable", "fig1.run_fig1(tmp, Lts=[2.0, 50.0])", "ValueError", "Lts", "<= 40"),
    bad("run-fig2-depth-unstable", "fig2.run_fig2(tmp, depths=[1, 4])", "ValueError", "depths", "L >= 2"),
    bad("runconfig-width-string", "sweep.RunConfig(width='64').check()", "TypeError", "width"),
    bad("runconfig-inner-wider-than-d", "sweep.RunConfig(inner=(40,)).check()", "ValueError", "inner"),
    bad("replot-not-a-result", "import json, os\np = os.path.join(tmp, 'x.json'); json.dump({'a': 1}, open(p, 'w'))\n"
        "experiments.replot(p)", "ValueError", "json_path", "x.json"),
    bad("run-demo-unwritable-out", "demo.run_demo('/proc/leakycuda_out')", "ValueError", "out"),
    bad("run-demo-seed-negative", "demo.run_demo(tmp, seed=-1)", "ValueError", "seed"),
    bad("run-fig1-no-Lts", "fig1.run_fig1(tmp, Lts=[])", "ValueError", "Lts"),
    bad("run-fig1-Lt-0", "fig1.run_fig1(tmp, Lts=[0.0, 1.0])", "ValueError", "Lts"),
    bad("run-fig1-seeds-duplicate", "fig1.run_fig1(tmp, seeds=[1, 1])", "ValueError", "seeds"),
    bad("run-fig1-device", "fig1.run_fig1(tmp, device='gpu')", "ValueError", "device"),
    bad("run-fig2-scheme", "fig2.run_fig2(tmp, schemes=['log'])", "ValueError", "schemes", "'log'"),
    bad("run-fig2-depth-0", "fig2.run_fig2(tmp, depths=[0, 4])", "ValueError", "depths"),
    bad("run-fig2-dtype", "fig2.run_fig2(tmp, dtype=torch.int32)", "TypeError", "dtype"),
]

CLI = [
    cli("fig2-continue-above", "reproduce fig2 --continue-above 3", "--continue-above", "fig1"),
    cli("fig1-refine-steps-negative", "reproduce fig1 --refine-steps -1", "--refine-steps", ">= 0", "-1"),
    cli("fig1-refine-target-zero", "reproduce fig1 --refine-target 0", "--refine-target", "> 0"),
    cli("related-training-flag", "reproduce dln-rank --steps 5", "--steps", "fig1|fig2"),
    cli("related-sweep-flag", "reproduce fcnn-bottleneck --Lts 1,2", "--Lts", "fig1|fig2"),
    cli("related-seeds-repeated", "reproduce dln-saddle --seeds 0,0", "--seeds", "distinct"),
    cli("related-device-gpu", "reproduce dln-rank --device gpu", "--device", "gpu"),
    cli("reproduce-unknown-experiment", "reproduce fig3", "fig3", "dln-rank"),
    cli("demo-lam-negative", "demo --lam -5", "--lam", "> 0", "-5"),
    cli("demo-gamma0-negative", "demo --gamma0 -1", "--gamma0", "-1"),
    cli("demo-out-unwritable", "demo --out /proc/leakycuda_out", "--out", "/proc"),
    cli("demo-out-under-a-file", "demo --out /etc/passwd/out", "--out", "/etc/passwd"),
    cli("demo-out-empty", "demo --out=", "--out"),
    cli("demo-lr-negative-exponent", "demo --lr -1e-3", "--lr", "-0.001"),
    cli("demo-lr-negative-equals", "demo --lr=-1e-3", "--lr", "-0.001"),
    cli("demo-lr-word", "demo --lr abc", "--lr", "'abc'"),
    cli("demo-lr-zero", "demo --lr 0", "--lr", "> 0"),
    cli("demo-lr-inf", "demo --lr inf", "--lr", "inf"),
    cli("demo-sgd-lr-negative", "demo --sgd-lr -.5", "--sgd-lr", "-0.5"),
    cli("demo-steps-negative", "demo --steps -1", "--steps", ">= 0"),
    cli("demo-steps-float", "demo --steps 1e3", "--steps", "'1e3'"),
    cli("demo-sgd-steps-negative", "demo --sgd-steps -2", "--sgd-steps"),
    cli("demo-width-0", "demo --width 0", "--width", ">= 1"),
    cli("demo-n-train-1", "demo --n-train 1", "--n-train", ">= 2"),
    cli("demo-n-test-negative", "demo --n-test -1", "--n-test"),
    cli("demo-depth-0", "demo --depth 0", "--depth"),
    cli("demo-Lt-0", "demo --Lt 0", "--Lt", "> 0"),
    cli("demo-Lt-negative", "demo --Lt -3", "--Lt"),
    cli("demo-Lt-nan", "demo --Lt nan", "--Lt", "nan"),
    cli("demo-Lt-unstable", "demo --Lt 1e6", "--Lt", "<= 40", "stable range", "5e+04"),
    cli("demo-depth-too-shallow-for-Lt", "demo --depth 2", "--Lt", "<= 4", "depth 2"),
    cli("demo-seed-negative", "demo --seed -1", "--seed", ">= 0"),
    cli("demo-init", "demo --init orthogonal", "--init", "'orthogonal'"),
    cli("demo-dtype-float16", "demo --dtype float16", "--dtype", "float16"),
    cli("demo-device-gpu", "demo --device gpu", "--device", "'gpu'"),
    cli("demo-device-cuda-missing" if not _cuda() else "demo-device-cuda-index-out-of-range",
        "demo --device cuda" if not _cuda() else "demo --device cuda:99", "--device"),
    cli("demo-device-meta", "demo --device meta", "--device", "'meta'"),
    cli("demo-device-cpu-1", "demo --device cpu:1", "--device", "'cpu:1'"),
    cli("demo-flag-of-reproduce", "demo --Lts abc", "--Lts", "reproduce"),
    cli("demo-flag-of-bench", "demo --builtin", "--builtin", "bench"),
    cli("demo-unknown-flag", "demo --no-such-flag", "--no-such-flag"),
    cli("demo-stray-positional", "demo extra", "extra"),
    cli("fig1-Lts-word", "reproduce fig1 --Lts 1,abc", "--Lts", "'abc'"),
    cli("fig1-Lts-empty", "reproduce fig1 --Lts ,", "--Lts", "non-empty"),
    cli("fig1-Lts-0", "reproduce fig1 --Lts 0,2", "--Lts", "> 0"),
    cli("fig1-Lts-negative", "reproduce fig1 --Lts -1,2", "--Lts", "-1"),
    cli("fig1-Lts-duplicate", "reproduce fig1 --Lts 2,2", "--Lts", "distinct"),
    cli("fig1-Lts-inf", "reproduce fig1 --Lts 2,inf", "--Lts", "inf"),
    cli("fig1-Lts-unstable", "reproduce fig1 --Lts 2,50", "--Lts", "<= 40", "stable range"),
    cli("fig1-depths-is-fig2", "reproduce fig1 --depths 4", "--depths", "fig2"),
    cli("fig1-schemes-is-fig2", "reproduce fig1 --schemes equidistant", "--schemes", "fig2"),
    cli("fig2-Lts-is-fig1", "reproduce fig2 --Lts 3", "--Lts", "fig1"),
    cli("fig2-depths-0", "reproduce fig2 --depths 0,4", "--depths", ">= 1"),
    cli("fig2-depths-unstable", "reproduce fig2 --depths 1,4", "--depths", "stable range", "L >= 2"),
    cli("fig2-depths-word", "reproduce fig2 --depths 4,x", "--depths", "'x'"),
    cli("fig2-depths-empty", "reproduce fig2 --depths ,", "--depths"),
    cli("fig2-schemes-unknown", "reproduce fig2 --schemes log", "--schemes", "'log'"),
    cli("fig2-schemes-duplicate", "reproduce fig2 --schemes adaptive,adaptive", "--schemes"),
    cli("reproduce-seeds-0", "reproduce fig1 --seeds 0", "--seeds", ">= 1"),
    cli("reproduce-seeds-empty", "reproduce fig1 --seeds ,", "--seeds"),
    cli("reproduce-seeds-duplicate", "reproduce fig1 --seeds 1,1", "--seeds"),
    cli("reproduce-seeds-negative-in-list", "reproduce fig1 --seeds 0,-2", "--seeds", ">= 0"),
    cli("reproduce-seeds-word", "reproduce fig1 --seeds two", "--seeds", "'two'"),
    cli("reproduce-lam-negative", "reproduce fig1 --quick --lam -5", "--lam"),
    cli("reproduce-gamma0-negative", "reproduce fig2 --quick --gamma0 -1", "--gamma0"),
    cli("reproduce-out-unwritable", "reproduce fig1 --quick --out /proc/leakycuda_out", "--out"),
    cli("reproduce-width-0", "reproduce fig2 --quick --width 0", "--width"),
    cli("reproduce-device-gpu", "reproduce fig1 --device gpu", "--device"),
    cli("reproduce-figure", "reproduce fig3", "fig3"),
    cli("reproduce-no-figure", "reproduce", "experiment"),
    cli("bench-repeat-0", "bench --builtin --repeat 0", "--repeats", ">= 1"),
    cli("bench-repeats-negative", "bench --repeats -3", "--repeats"),
    cli("bench-unknown-flag", "bench --no-such-flag", "--no-such-flag"),
    cli("bench-unknown-flag-builtin", "bench --builtin --fast", "--fast"),
    cli("bench-quick-with-builtin", "bench --builtin --quick", "--quick", "--builtin"),
    cli("bench-variants-unknown", "bench --variants fused,jax", "--variants", "'jax'"),
    cli("bench-half-on-cpu", "bench --dtype float16", "--dtype", "CUDA"),
    cli("bench-device-gpu", "bench --device gpu", "--device"),
    cli("bench-out-unwritable", "bench --out /proc/leakycuda/b.json", "--out"),
    cli("bench-flag-of-demo", "bench --seed 3", "--seed", "demo"),
    cli("info-unknown-flag", "info --verbose", "--verbose"),
    cli("no-command", "", "required"),
    cli("unknown-command", "train", "'train'"),
]


def _check(ans, case):
    assert "died" not in ans, ans["died"]
    if case["kind"] == "ok":
        assert "exc" not in ans, "%s: %s\n%s" % (ans["exc"][0], ans["msg"], ans.get("tb", ""))
    elif case["kind"] == "bad":
        assert "exc" in ans, "no exception: %r accepted (stdout %r)" % (case["code"], ans["stdout"][-500:])
        assert case["exc"] in ans["exc"], "expected %s, got %s: %s\n%s" % (case["exc"], ans["exc"][0], ans["msg"],
                                                                          ans.get("tb", ""))
        for word in case["words"]:
            assert word in ans["msg"], "the message does not name %r: %s" % (word, ans["msg"])
    else:
        assert "exc" not in ans, "%s: %s\n%s" % (ans["exc"][0], ans["msg"], ans.get("tb", ""))
        err = ans["stderr"].strip()
        assert ans["rc"] == 2, "exit code %r, stderr %r" % (ans["rc"], err)
        assert len(err.splitlines()) == 1 and err.startswith("leakycuda"), "not one line: %r" % err
        assert "Traceback" not in err and "error:" in err
        for word in case["words"]:
            assert word in err, "the message does not name %r: %s" % (word, err)
        assert ans["created"] == [], "files were written: %s" % ans["created"]
        assert ans["stdout"] == "", "the command printed %r before failing" % ans["stdout"][:300]


ALL = OPS + ENERGIES + STEPS + DATA + MODULE + TRAIN + DIAGNOSTICS + EXPERIMENTS + CLI


@pytest.mark.parametrize("case", ALL)
def test_case(worker, case):
    if case["kind"] == "cli":
        ans = worker.run({"kind": "cli", "argv": case["argv"]})
    else:
        ans = worker.run({"kind": "api", "code": case["code"]}, timeout=case.get("timeout", 90))
    _check(ans, case)


def test_diverged_run_exits_1_with_one_line_and_keeps_its_history(worker):
    argv = "demo --lr 10 --steps 50 --sgd-steps 0 --width 8 --n-train 40 --n-test 10 --depth 4 --out run".split()
    ans = worker.run({"kind": "cli", "argv": argv, "train": True}, timeout=120)
    assert "died" not in ans and "exc" not in ans, ans
    err = ans["stderr"].strip()
    assert ans["rc"] == 1 and len(err.splitlines()) == 1 and "diverged" in err and "--lr" in err, err
    assert ans["created"] == ["run"]


def test_degenerate_demo_runs(worker):
    """No training steps and no test points are valid: the demo runs and writes its files."""
    argv = "demo --steps 0 --sgd-steps 0 --width 4 --n-train 10 --n-test 0 --depth 3 --Lt 1 --out run".split()
    ans = worker.run({"kind": "cli", "argv": argv, "train": True}, timeout=120)
    assert "died" not in ans and "exc" not in ans, ans
    assert ans["rc"] == 0, ans["stderr"]
    assert "history.csv" in ans["stdout"] and "bottleneck rank estimate" in ans["stdout"]


def test_worker_survives_a_crash(worker):
    """A case that kills the interpreter fails alone; the next case gets a fresh worker."""
    ans = worker.run({"kind": "api", "code": "import os; os._exit(3)"})
    assert "died" in ans and "exit code 3" in ans["died"]
    assert "exc" not in worker.run({"kind": "api", "code": "assert lc.step_sizes(2).sum() == 1"})


def test_source_checkout_without_extension_says_so(tmp_path):
    """A source checkout without a compiled extension, imported ahead of any install, explains itself."""
    import shutil

    pkg = tmp_path / "leakycuda"
    pkg.mkdir()
    for name in os.listdir(os.path.join(ROOT, "leakycuda")):
        if name.endswith(".py") and name != "_build_info.py":
            shutil.copy(os.path.join(ROOT, "leakycuda", name), pkg / name)
    (tmp_path / "setup.py").write_text("# stand-in for the checkout's setup.py\n")
    # -S and an explicit site-packages: no .pth file (an editable install's finder) may supply the extension. The
    # folders are this interpreter's own, with site applied (under -S, site.getsitepackages() would give the base
    # installation's rather than a virtual environment's, and torch would be missing).
    import site

    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    code = "import sys; sys.path[:0] = [%r]; sys.path += %r\nimport leakycuda" % (str(tmp_path), dirs)
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=""))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "source checkout" in last and str(pkg) in last, last
    assert "pip install --no-build-isolation -e ." in last, last
