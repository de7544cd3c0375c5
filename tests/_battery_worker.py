"""Worker process of tests/test_battery.py: runs one battery case per request line on stdin and answers
with one JSON line (prefixed by MARK) on stdout; a crash or a hang here fails only the case it ran.

Request: {"kind": "api", "code": "..."} runs the code in a fresh namespace (see ``namespace``);
{"kind": "cli", "argv": [...], "train": false} runs ``leakycuda.cli.main(argv)`` in an empty
temporary folder, with training and benchmarking replaced by a function that raises (so a case
proves that nothing ran), unless "train" is true.
Answer: "exc" (the exception's class names, most derived first) and "msg", or nothing when the
code returned; "rc", "created" (what appeared in the folder) for the command line; the captured
"stdout", "stderr" and "warnings".
"""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings

MARK = "@@battery@@ "


class TrainingStarted(AssertionError):
    """Raised where training or a benchmark would have started in a command-line case."""


def namespace():
    """What a case's code sees: torch, leakycuda and small fresh float64 inputs."""
    import math
    import types

    import torch

    import leakycuda as lc
    from leakycuda import data, diagnostics, experiments, steps, train
    from leakycuda.experiments import demo, fig1, fig2, sweep
    from leakycuda.module import LeakyResNet

    F64 = torch.float64
    g = torch.Generator().manual_seed(0)

    def model(**kw):
        torch.manual_seed(0)
        kw.setdefault("dtype", F64)
        return LeakyResNet(kw.pop("d", 3), kw.pop("d_out", 3), kw.pop("w", 4), kw.pop("L", 3), kw.pop("Lt", 1.0), **kw)

    def task(**kw):
        kw.setdefault("dtype", F64)
        return data.bottleneck_task(d=3, inner=(2,), n_train=kw.pop("n_train", 8), n_test=kw.pop("n_test", 4),
                                    hidden=4, **kw)

    def fake_task(x, y, **more):
        return types.SimpleNamespace(x_train=x, y_train=y, **more)

    def raises(f, *types_):
        try:
            f()
        except types_:
            return True
        return False

    return dict(torch=torch, lc=lc, math=math, types=types, data=data, diagnostics=diagnostics,
                experiments=experiments, sweep=sweep, demo=demo, fig1=fig1, fig2=fig2, steps=steps, train=train,
                LeakyResNet=LeakyResNet, F64=F64,
                model=model, task=task, fake_task=fake_task, raises=raises, tmp=tempfile.mkdtemp(prefix="battery-"),
                x0=torch.randn(5, 4, generator=g, dtype=F64), W=torch.randn(3, 4, 5, generator=g, dtype=F64) * 0.3,
                rho=torch.full((3,), 1 / 3, dtype=F64), xs=torch.randn(4, 6, 3, generator=g, dtype=F64))


def run_api(code):
    ns = namespace()
    try:
        exec(compile(code, "<case>", "exec"), ns)
    finally:
        shutil.rmtree(ns["tmp"], ignore_errors=True)
    return {}


def run_cli(argv, train):
    from leakycuda import cli, experiments
    from leakycuda import train as train_module

    def started(*args, **kwargs):
        raise TrainingStarted("training or benchmarking started for a command that should have been refused")

    modules = [sys.modules[n] for n in sorted(sys.modules) if n.startswith("leakycuda.experiments.")
               and hasattr(sys.modules[n], "fit")] if experiments.experiments() else []
    patched = [(m, "fit") for m in modules] + [(train_module, "fit"), (cli, "_builtin_bench"), (cli.subprocess, "call")]
    saved = [getattr(m, n) for m, n in patched]
    folder, here = tempfile.mkdtemp(prefix="battery-cli-"), os.getcwd()
    os.chdir(folder)
    try:
        if not train:
            for m, n in patched:
                setattr(m, n, started)
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        return {"rc": rc, "created": sorted(os.listdir(folder))}
    finally:
        for (m, n), f in zip(patched, saved):
            setattr(m, n, f)
        os.chdir(here)
        shutil.rmtree(folder, ignore_errors=True)


def main():
    answers = os.fdopen(os.dup(1), "w")  # answers go here; stray output of the code goes to the captured streams
    import leakycuda  # noqa: F401  (import once, before the first case)

    answers.write(MARK + json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        ans = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    if req["kind"] == "api":
                        ans.update(run_api(req["code"]))
                    else:
                        ans.update(run_cli(req["argv"], req.get("train", False)))
            except Exception as e:  # noqa: BLE001  (every exception is the answer)
                ans.update(exc=[c.__name__ for c in type(e).__mro__], msg=str(e),
                           tb=traceback.format_exc()[-3000:])
        ans.update(stdout=out.getvalue()[-5000:], stderr=err.getvalue()[-5000:],
                   warnings=[str(w.message) for w in caught])
        answers.write(MARK + json.dumps(ans) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
