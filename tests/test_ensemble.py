"""Tests of LeakyEnsemble and its fit: members equal single LeakyResNets (init, forward, gradients, training), padding,
divergence of one member, checkpoints, data parallelism, and the CUDA-graph training step (logic on CPU, CUDA runs)."""
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import CUDA, free_port

import leakycuda as lc
from leakycuda import _graph
from leakycuda.data import bottleneck_task
from leakycuda.diagnostics import analyze
from leakycuda.ensemble import LeakyEnsemble
from leakycuda.train import DivergenceError, fit, load_checkpoint

F64 = torch.float64
# Three members that differ in everything a member may differ in.
MEMBERS = dict(depth=[3, 5, 4], effective_depth=[1.0, 2.0, 0.5], steps=["equidistant", "irregular", "adaptive"],
               a=[0.0, 0.5, 0.0], init=["random", "identity", "random"], seeds=[0, 1, 2])
FIT = dict(adam_steps=24, adam_lr=1e-2, sgd_steps=8, sgd_lr=1e-3, adapt_every=5, log_every=4)


def _ensemble(device="cpu", dtype=F64, **over):
    kw = dict(MEMBERS, **over)
    return LeakyEnsemble(6, 6, 8, device=device, dtype=dtype, **kw)


def _single(b, device="cpu", dtype=F64, **over):
    """Member b built alone, the way a sequential sweep builds it."""
    kw = dict(MEMBERS, **over)
    torch.manual_seed(kw["seeds"][b])
    return lc.LeakyResNet(6, 6, 8, kw["depth"][b], kw["effective_depth"][b], steps=kw["steps"][b], a=kw["a"][b],
                          init=kw["init"][b], device=device, dtype=dtype)


def _tasks(n=3, dtype=F64, n_train=40):
    return [bottleneck_task(d=6, inner=(2,), n_train=n_train, n_test=20, seed=s, hidden=16, dtype=dtype)
            for s in range(n)]


def _assert_state_equal(a, b, exact=True, **tol):
    for name, t in a.state_dict().items():
        if isinstance(t, torch.Tensor):
            if exact:
                assert torch.equal(t, b.state_dict()[name]), name
            else:
                torch.testing.assert_close(t, b.state_dict()[name], msg=name, **tol)


# -- the module -------------------------------------------------------------------------------------

def test_members_equal_single_models():
    ens = _ensemble()
    assert ens.models == 3 and ens.depth == 5 and ens.depths == (3, 5, 4)
    assert ens.effective_depths == (1.0, 2.0, 0.5) and ens.steps == tuple(MEMBERS["steps"])
    x = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(3, 7, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    out = ens(x)
    assert out.shape == (3, 7, 6)
    loss = ((out - y).square().sum(dim=(1, 2)) + ens.regularization(0.1)).sum()
    loss.backward()
    for b in range(3):
        single = _single(b)
        _assert_state_equal(single, ens.member(b))  # the same init, bitwise
        out_b = single(x)
        torch.testing.assert_close(out[b], out_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ens.regularization(0.1)[b], single.regularization(0.1), rtol=1e-13, atol=0)
        ((out_b - y[b]).square().sum() + single.regularization(0.1)).backward()
        Lb = ens.depths[b]
        torch.testing.assert_close(ens.weight.grad[b, :Lb], single.weight.grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(ens.proj_in.grad[b], single.proj_in.grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(ens.proj_out.grad[b], single.proj_out.grad, rtol=1e-11, atol=1e-12)
        # Padded layers: rho = 0, zero weights, zero gradients.
        assert torch.all(ens.rho[b, Lb:] == 0) and torch.all(ens.weight[b, Lb:] == 0)
        assert torch.all(ens.weight.grad[b, Lb:] == 0)


def test_representations_and_per_member_inputs():
    ens = _ensemble()
    x = torch.randn(3, 5, 6, dtype=F64)
    xs = ens.representations(x)
    assert xs.shape == (3, 6, 5, 8)
    for b in range(3):
        Lb = ens.depths[b]
        torch.testing.assert_close(xs[b, :Lb + 1], ens.member(b).representations(x[b]), rtol=1e-12, atol=1e-12)
        for l in range(Lb + 1, 6):  # padded layers are the identity
            assert torch.equal(xs[b, l], xs[b, Lb])
    torch.testing.assert_close(ens(x)[1], ens.member(1)(x[1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [2, "sqrt"])
def test_checkpointed_stack_gives_the_same_gradients(checkpoint):
    x = torch.randn(3, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads = []
    for ck in (None, checkpoint):
        ens = _ensemble(checkpoint=ck)
        ens(x).square().sum().backward()
        grads.append([p.grad for p in ens.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unseeded_members_draw_from_the_global_generator_in_order():
    torch.manual_seed(7)
    ens = LeakyEnsemble(3, 2, 4, 3, 1.0, models=2, dtype=F64)
    torch.manual_seed(7)
    singles = [lc.LeakyResNet(3, 2, 4, 3, 1.0, dtype=F64) for _ in range(2)]
    for b in range(2):
        _assert_state_equal(singles[b], ens.member(b))
    # Seeded members leave the global generator alone.
    state = torch.random.get_rng_state()
    LeakyEnsemble(3, 2, 4, 3, 1.0, seeds=[1, 2], dtype=F64)
    assert torch.equal(state, torch.random.get_rng_state())
    ens.reset_parameters(seeds=[5, 6])
    torch.manual_seed(6)
    _assert_state_equal(lc.LeakyResNet(3, 2, 4, 3, 1.0, dtype=F64), ens.member(1))


def test_from_models_and_member_round_trip():
    singles = [_single(b) for b in range(3)]
    ens = LeakyEnsemble.from_models(singles)
    assert ens.depths == (3, 5, 4) and ens.steps == tuple(MEMBERS["steps"]) and ens.init == tuple(MEMBERS["init"])
    for b in range(3):
        _assert_state_equal(singles[b], ens.member(b))
    _assert_state_equal(ens, _ensemble())
    # member() is a copy: changing it leaves the ensemble alone.
    m = ens.member(0)
    with torch.no_grad():
        m.weight.add_(1.0)
    assert torch.equal(ens.member(0).weight, singles[0].weight)
    x, y = _tasks(1)[0].x_train, _tasks(1)[0].y_train
    report = analyze(ens.member(2), x, y, 1e-2)
    assert report.depth == 4 and report.rank_estimate.shape == (4,)


def test_adapt_steps_per_member_keeps_padding():
    schemes = ["adaptive", "irregular", "adaptive"]
    ens = _ensemble(steps=schemes)
    x = _tasks(1)[0].x_train
    before = ens.rho.clone()
    ens.adapt_steps(x)
    for b in (0, 2):
        ref = _single(b, steps=schemes)
        ref.adapt_steps(x)
        torch.testing.assert_close(ens.rho[b, :ens.depths[b]], ref.rho, rtol=1e-12, atol=1e-14)
        assert torch.all(ens.rho[b, ens.depths[b]:] == 0)
    assert torch.equal(ens.rho[1], before[1])
    ens.adapt_steps(x, members=[0])
    with pytest.raises(RuntimeError, match="adaptive"):
        _ensemble(steps="equidistant", a=0.0).adapt_steps(x)


def test_state_dict_round_trip(tmp_path):
    ens = _ensemble()
    ens.effective_depths = [1.5, 2.5, 0.0]
    path = tmp_path / "ens.pt"
    torch.save(ens.state_dict(), path)
    saved = torch.load(path, weights_only=True)
    other = _ensemble(seeds=[9, 9, 9], effective_depth=[1.5, 2.5, 0.0])
    other.load_state_dict(saved)
    _assert_state_equal(ens, other)
    # As for a LeakyResNet: strict loading refuses other settings (before copying anything), strict=False adopts them.
    other = _ensemble(seeds=[9, 9, 9])
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match="effective_depths"):
        other.load_state_dict(saved)
    assert torch.equal(other.weight, before)
    with pytest.warns(UserWarning, match="adopting the saved effective_depths"):
        other.load_state_dict(saved, strict=False)
    assert other.effective_depths == (1.5, 2.5, 0.0)
    _assert_state_equal(ens, other)
    with pytest.raises(ValueError, match="depths"):
        _ensemble(depth=[3, 5, 5]).load_state_dict(ens.state_dict())
    with pytest.raises(ValueError, match="activation"):
        _ensemble(activation="linear").load_state_dict(ens.state_dict(), strict=False)


def test_linear_activation_members_equal_single_models():
    ens = _ensemble(activation="linear")
    x = torch.randn(4, 6, dtype=F64)
    for b in range(3):
        single = lc.LeakyResNet(6, 6, 8, MEMBERS["depth"][b], MEMBERS["effective_depth"][b], steps=MEMBERS["steps"][b],
                                a=MEMBERS["a"][b], init=MEMBERS["init"][b], activation="linear", dtype=F64)
        with torch.no_grad():
            for name in ("weight", "proj_in", "proj_out", "rho"):
                getattr(single, name).copy_(getattr(ens.member(b), name))
        assert ens.member(b).activation == "linear"
        torch.testing.assert_close(ens(x)[b], single(x), rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="B = 3"):
        LeakyEnsemble(6, 6, 8, [3, 4, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match="models"):
        LeakyEnsemble(6, 6, 8, 3, 1.0)
    with pytest.raises(ValueError, match="models=2"):
        LeakyEnsemble(6, 6, 8, [3, 4, 5], 1.0, models=2)
    with pytest.raises(ValueError, match="member 1: .*effective_depth"):
        LeakyEnsemble(6, 6, 8, 3, [1.0, -1.0])
    with pytest.raises(TypeError, match="seeds"):
        LeakyEnsemble(6, 6, 8, 3, 1.0, models=2, seeds=3)
    ens = _ensemble()
    with pytest.raises(ValueError, match=r"\[B, N, in_features\] = \[3, N, 6\]"):
        ens(torch.randn(2, 4, 6, dtype=F64))
    with pytest.raises(IndexError, match="member index"):
        ens.member(3)
    with pytest.raises(ValueError, match="lam"):
        ens.regularization([0.1, 0.2])
    with pytest.raises(ValueError, match="width"):
        LeakyEnsemble.from_models([lc.LeakyResNet(6, 6, 8, 3, 1.0), lc.LeakyResNet(6, 6, 9, 3, 1.0)])
    with pytest.raises(TypeError, match="LeakyResNet"):
        LeakyEnsemble.from_models([])


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
])
def test_optimizer_on_the_ensemble_equals_one_optimizer_per_member(make):
    """Adam and SGD are elementwise: one optimizer over the stacked parameters moves each member as its own would."""
    ens = _ensemble()
    singles = [ens.member(b) for b in range(3)]
    opt = make(list(ens.parameters()))
    opts = [make(list(m.parameters())) for m in singles]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, dtype=F64, generator=gen) for n, p in ens.named_parameters()}
        for n, p in ens.named_parameters():
            p.grad = grads[n].clone()
        for b, m in enumerate(singles):
            for n, p in m.named_parameters():
                p.grad = grads[n][b, :p.shape[0]].clone() if n == "weight" else grads[n][b].clone()
        opt.step()
        for o in opts:
            o.step()
    for b, m in enumerate(singles):
        Lb = ens.depths[b]
        assert torch.equal(ens.weight[b, :Lb], m.weight)
        assert torch.equal(ens.proj_in[b], m.proj_in) and torch.equal(ens.proj_out[b], m.proj_out)


# -- training ---------------------------------------------------------------------------------------

def test_fit_equals_sequential_runs(tmp_path):
    """float64: an ensemble run gives the B sequential runs' weights and histories within float rounding."""
    tasks = _tasks()
    ens = _ensemble()
    r = fit(ens, tasks, 1e-2, history_path=tmp_path / "h.json", **FIT)
    assert r.steps == 32 and r.diverged == [None] * 3
    assert [h["step"] for h in r.history] == list(range(0, 33, 4))
    for b in range(3):
        single = _single(b)
        rs = fit(single, tasks[b], 1e-2, **FIT)
        _assert_state_equal(single, ens.member(b), exact=False, rtol=1e-9, atol=1e-11)
        hist = r.member_history(b)
        assert [set(h) for h in hist] == [set(h) for h in rs.history]
        for got, want in zip(hist, rs.history):
            assert (got["step"], got["phase"]) == (want["step"], want["phase"])
            for k in ("loss", "train_mse", "reg", "test_mse"):
                assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (b, got["step"], k)
            assert got["rho"] == pytest.approx(want["rho"], rel=1e-9, abs=1e-12)
        assert r.member(b).steps == 32 and r.member(b).final == hist[-1]
    assert "adaptive" in MEMBERS["steps"] and r.history[-1]["rho"][2] != pytest.approx([0.25] * 4)
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("step,phase,member,loss") and lines[0].endswith("rho_5") and len(lines) == 1 + 9 * 3


def test_fit_with_shared_task_and_per_member_lam():
    task = _tasks(1)[0]
    ens = _ensemble(effective_depth=[1.0, 1.0, 1.0])
    lams = [1e-2, 1e-1, 0.0]
    r = fit(ens, task, lams, adam_steps=6, sgd_steps=0, log_every=3, adam_lr=1e-2)
    for b in range(3):
        single = _single(b, effective_depth=[1.0, 1.0, 1.0])
        rs = fit(single, task, lams[b], adam_steps=6, sgd_steps=0, log_every=3, adam_lr=1e-2)
        _assert_state_equal(single, ens.member(b), exact=False, rtol=1e-9, atol=1e-11)
        assert r.member_history(b)[-1]["reg"] == pytest.approx(rs.history[-1]["reg"], rel=1e-9, abs=0)


class _Blowup:
    """A callback that multiplies member b's output projection by a large factor after step n: it diverges."""

    def __init__(self, b, n):
        self.b, self.n, self.seen = b, n, {}

    def __call__(self, step, model, rec):
        if step == self.n:
            with torch.no_grad():
                model.proj_out[self.b].mul_(1e4)
        self.seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_a_diverged_member_is_frozen_and_the_others_are_bitwise_unaffected():
    tasks = _tasks()
    kw = dict(FIT, log_every=2)
    ref = _ensemble()
    fit(ref, tasks, 1e-2, **kw)
    ens = _ensemble()
    blow = _Blowup(1, 6)
    with pytest.warns(UserWarning, match=r"member\(s\) \[1\] diverged by step 8"):
        r = fit(ens, tasks, 1e-2, callback=blow, **kw)
    assert r.diverged == [None, 8, None] and r.steps == 32
    for b in (0, 2):
        for name in ("weight", "proj_in", "proj_out", "rho"):
            assert torch.equal(getattr(ens, name)[b], getattr(ref, name)[b]), (b, name)
    # Member 1 stopped where it was at the step its divergence was seen (Adam's moments zeroed too).
    for name in ("weight", "proj_in", "proj_out", "rho"):
        assert torch.equal(getattr(ens, name)[1], blow.seen[8][name][1]), name
    hist = r.member_history(1)
    assert hist[-1]["step"] == 8 and len(hist) == 5
    assert r.history[-1]["diverged"] == [False, True, False] and r.history[3]["diverged"] == [False, False, False]


def test_every_member_diverging_raises():
    def poison(step, model, rec):
        if step == 2:
            with torch.no_grad():
                model.proj_out.fill_(float("nan"))

    ens = _ensemble(depth=3, effective_depth=1.0, steps="equidistant", a=0.0, init="random", seeds=[0, 1])
    with pytest.warns(UserWarning, match=r"member\(s\) \[0, 1\] diverged by step 3"), \
            pytest.raises(DivergenceError, match="every member"):
        fit(ens, _tasks(2), 1e-2, adam_steps=20, sgd_steps=0, log_every=1, callback=poison)


def _interrupt_at(n):
    def cb(step, model, rec):
        if step == n:
            raise KeyboardInterrupt
    return cb


def test_checkpoint_and_resume_are_exact(tmp_path):
    tasks = _tasks()
    kw = dict(FIT, log_every=1, checkpoint_every=10)
    ref = _ensemble()
    full = fit(ref, tasks, 1e-2, **kw)
    ckpt = str(tmp_path / "run.pt")
    ens = _ensemble()
    with pytest.raises(KeyboardInterrupt):
        fit(ens, tasks, 1e-2, checkpoint_path=ckpt, callback=_interrupt_at(25), **kw)
    saved = load_checkpoint(ckpt, expect_format="leakycuda.fit_ensemble/1")
    assert saved["step"] == 20 and saved["phase"] == "adam" and saved["diverged"] == [None] * 3
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(ckpt)
    fresh = _ensemble(seeds=[5, 6, 7])
    resumed = fit(fresh, tasks, 1e-2, checkpoint_path=ckpt, resume=True, **kw)
    assert resumed.resumed_from == 20 and resumed.steps == 32
    _assert_state_equal(ref, fresh)
    assert resumed.history == full.history


def test_divergence_survives_resume(tmp_path):
    tasks = _tasks()
    kw = dict(FIT, log_every=2, checkpoint_every=10)
    ckpt = str(tmp_path / "run.pt")
    ens = _ensemble()
    with pytest.warns(UserWarning, match="diverged"), pytest.raises(KeyboardInterrupt):
        fit(ens, tasks, 1e-2, checkpoint_path=ckpt, callback=lambda s, m, r: (_Blowup(0, 4)(s, m, r),
                                                                                _interrupt_at(12)(s, m, r)), **kw)
    saved = load_checkpoint(ckpt, expect_format="leakycuda.fit_ensemble/1")
    assert saved["step"] == 10 and saved["diverged"] == [6, None, None]
    fresh = _ensemble()
    r = fit(fresh, tasks, 1e-2, checkpoint_path=ckpt, resume=True, **kw)
    assert r.diverged == [6, None, None]
    for name in ("weight", "proj_in", "proj_out"):
        assert torch.equal(getattr(fresh, name)[0], saved["model"][name][0]), name


# -- batched sweeps (reproduce fig1 / fig2) --------------------------------------------------------

SMALL = dict(n_train=24, n_test=8, width=6, adam_steps=12, sgd_steps=4, adapt_every=4)


def _numbers(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, "%s/%s" % (prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, "%s/%d" % (prefix, i))
    elif isinstance(obj, float):
        yield prefix, obj


def test_batched_sweep_reports_each_group_when_it_has_trained(monkeypatch):
    """A long batched sweep shows its results as it goes: a group's runs reach done() before the next group
    trains (fig2 at two depths is two groups)."""
    from leakycuda.experiments import fig1, fig2, sweep

    events, real = [], sweep._train_group

    def group(runs, index, *args):
        events.append(("train", tuple(index)))
        return real(runs, index, *args)

    monkeypatch.setattr(sweep, "_train_group", group)
    plan = [(dataclasses.replace(fig2.FIG2["quick"]["config"], depth=L, adam_steps=2, sgd_steps=0,
                                             n_train=8, n_test=0, width=4), 0, "run", None) for L in (2, 3)]
    sweep.train_runs(plan, lambda i, *rest: events.append(("done", i)), dtype=F64, progress=False)
    assert events == [("train", (0,)), ("done", 0), ("train", (1,)), ("done", 1)]


@pytest.mark.parametrize("figure", ["fig1", "fig1-recipe", "fig2"])
def test_reproduce_batched_equals_sequential(tmp_path, figure):
    """The batched sweeps give the sequential JSON (and the same files); fig1-recipe adds the stationarity recipe:
    continuation in Lt (a chain of warm starts per seed) and L-BFGS refinement of every run."""
    from leakycuda.experiments import fig1, fig2, sweep

    run = fig2.run_fig2 if figure == "fig2" else fig1.run_fig1
    kw = dict(quick=True, dtype=F64, seeds=2, overrides=SMALL, progress=False, log=lambda *a: None)
    if figure == "fig1":
        kw.update(Lts=[2.0, 9.0])  # Lt 9: the identity init
    elif figure == "fig1-recipe":
        kw.update(Lts=[1.0, 2.0, 3.0, 4.0], overrides=dict(SMALL, continue_above=3.0, continue_steps=6,
                                                            refine_steps=3))
    else:
        kw.update(depths=[3, 4])
    modes = {"sequential": dict(sequential=True), "batched": {}}
    if figure == "fig2":
        modes["padded"] = dict(pad_depths=True)
    data = {}
    for mode, extra in modes.items():
        run(str(tmp_path / mode), **kw, **extra)
        with open(tmp_path / mode / ("%s.json" % figure[:4])) as f:
            data[mode] = json.load(f)
        assert sorted(os.listdir(tmp_path / mode)) == sorted(os.listdir(tmp_path / "sequential"))
    ref = data.pop("sequential")
    for mode, got in data.items():
        assert [{k: r[k] for k in ("Lt", "scheme", "L", "seed", "init") if k in r} for r in got["runs"]] == \
            [{k: r[k] for k in ("Lt", "scheme", "L", "seed", "init") if k in r} for r in ref["runs"]]
        for rg, rr in zip(got["runs"], ref["runs"]):
            assert set(rg) == set(rr)
            assert (rg["warm_start"], rg["refine"] is None) == (rr["warm_start"], rr["refine"] is None)
            fields = ("final", "summary", "layers", "max_rho_Lt", "convergence")
            want = dict(_numbers({k: rr[k] for k in fields}))
            for key, value in _numbers({k: rg[k] for k in fields}):
                assert value == pytest.approx(want[key], rel=1e-7, abs=1e-9), (mode, key)
            if rr["refine"] is not None:
                assert [h["loss"] for h in rg["refine"]["history"]] == \
                    pytest.approx([h["loss"] for h in rr["refine"]["history"]], rel=1e-7)
    if figure == "fig1-recipe":
        assert [r["init"] for r in ref["runs"]] == ["random"] * 4 + ["warm start"] * 4


def test_a_diverged_run_stops_the_batched_sweep_as_it_stops_the_sequential_one(tmp_path):
    from leakycuda.experiments import fig1, fig2, sweep

    kw = dict(quick=True, dtype=F64, seeds=1, Lts=[1.0, 2.0], overrides=dict(SMALL, adam_lr=1e3), progress=False,
              log=lambda *a: None)
    errors = []
    for sequential in (True, False):
        with pytest.raises(DivergenceError) as e:
            fig1.run_fig1(str(tmp_path / str(sequential)), sequential=sequential, **kw)
        errors.append(str(e.value))
    assert errors[0].startswith("fig1 Lt=1 seed=0: training diverged") and errors[0] == errors[1]
    with pytest.raises(TypeError, match="sequential"):
        fig1.run_fig1(str(tmp_path / "x"), sequential="yes", **kw)


# -- data parallelism -------------------------------------------------------------------------------

def _ddp_worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=2)
    try:
        tasks = _tasks(n_train=37)  # shards of 19 and 18 points
        ens = _ensemble()
        if rank == 1:  # DDP broadcasts rank 0's parameters when it wraps the model
            with torch.no_grad():
                for p in ens.parameters():
                    p.add_(1.0)
        r = fit(ens, tasks, 1e-2, **FIT)
        torch.save({"state": ens.state_dict(), "history": r.history}, out)
        # Both ranks done before either tears gloo down: a rank that destroys its group while the other still
        # talks to it can abort the other ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_ensemble_matches_one_process(tmp_path):
    outs = [str(tmp_path / ("rank%d.pt" % r)) for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(2):  # a second try on a fresh port, should another process take the first one
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), outs[r]], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
        logs = [p.communicate(timeout=180)[0].decode() for p in procs]
        if all(p.returncode == 0 for p in procs) or not any("address already in use" in g.lower() for g in logs):
            break
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    ens = _ensemble()
    single = fit(ens, _tasks(n_train=37), 1e-2, **FIT)
    ranks = [torch.load(o, weights_only=True) for o in outs]
    for name, ref in ens.state_dict().items():
        if isinstance(ref, torch.Tensor):
            for r, got in enumerate(ranks):
                torch.testing.assert_close(got["state"][name], ref, rtol=1e-9, atol=1e-11,
                                           msg="%s, rank %d" % (name, r))
    for h0, hs in zip(ranks[0]["history"], single.history):
        assert h0["train_mse"] == pytest.approx(hs["train_mse"], rel=1e-9)


# -- CUDA-graph training step -----------------------------------------------------------------------

def test_cuda_graph_is_chosen_only_on_cuda_in_one_process():
    assert _graph.use_cuda_graph(None, "cpu") is False
    assert _graph.use_cuda_graph(None, "cuda:0") is True
    assert _graph.use_cuda_graph(None, "cuda", world_size=2) is False
    assert _graph.use_cuda_graph(False, "cuda") is False
    assert _graph.use_cuda_graph(True, "cuda") is True
    with pytest.raises(ValueError, match="CUDA device"):
        _graph.use_cuda_graph(True, "cpu")
    with pytest.raises(ValueError, match="data-parallel"):
        _graph.use_cuda_graph(True, "cuda", world_size=2)
    with pytest.raises(TypeError, match="cuda_graph"):
        _graph.use_cuda_graph("yes", "cuda")
    model, task = _single(0), _tasks(1)[0]
    with pytest.raises(ValueError, match="cuda_graph=True"):
        fit(model, task, 1e-2, adam_steps=1, sgd_steps=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        fit(_ensemble(), _tasks(), 1e-2, adam_steps=1, sgd_steps=0, cuda_graph=True)


def test_fit_on_cpu_runs_the_eager_step(monkeypatch):
    made = []

    class Recording(_graph.TrainStep):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(_graph, "TrainStep", Recording)
    fit(_single(0), _tasks(1)[0], 1e-2, adam_steps=2, sgd_steps=1, log_every=1)
    fit(_ensemble(), _tasks(), 1e-2, adam_steps=2, sgd_steps=1, log_every=1)
    assert len(made) == 2 and not any(m.graphed or m.captures for m in made)


class _FakeGraph:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def replay(self):
        # A replayed backward writes fresh gradients (the capture started from None grads), it does not accumulate.
        self.log.append("replay")
        self.fn()


class _FakeBackend:
    """Stands in for CUDA: eager runs fn, capture records it without running it, replay runs the recording."""

    def __init__(self, params):
        self.log, self.params = [], params

    def eager(self, fn):
        self.log.append("eager")
        fn()

    def capture(self, fn):
        self.log.append("capture")
        params = self.params

        def replayed():
            for p in params:
                p.grad = None
            fn()
        return _FakeGraph(replayed, self.log)


def test_train_step_state_machine_warms_up_captures_and_recaptures():
    """The capture logic of TrainStep, on the CPU: warm-up steps are real steps, the capture step runs once (by its
    replay), re-capture on another optimizer, another key or a replaced parameter, and results equal eager steps."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)

    def run(graphed):
        torch.manual_seed(1)
        net = lc.LeakyResNet(3, 2, 4, 3, 1.0, dtype=F64)
        params = list(net.parameters())
        backend = _FakeBackend(params) if graphed else None

        def body(opt):
            ((net(x) - y).square().sum() + net.regularization(1e-2)).backward()
            opt.step()

        step = _graph.TrainStep(body, graphed=graphed, watch=lambda: list(net.parameters()) + list(net.buffers()),
                                backend=backend)
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(5):
            step(opt, key=("adam",))
        opt = torch.optim.SGD(params, lr=1e-2)  # the Adam -> SGD switch
        for _ in range(4):
            step(opt, key=("sgd",))
        step(opt, key=("sgd", 2.0))  # e.g. a new Lt
        net.proj_out = torch.nn.Parameter(net.proj_out.detach().clone())  # new storage
        params[2] = net.proj_out
        opt.param_groups[0]["params"][2] = net.proj_out
        for _ in range(3):
            step(opt, key=("sgd", 2.0))
        return net, step, backend

    eager, _, _ = run(False)
    graphed, step, backend = run(True)
    assert step.captures == 3  # Adam, SGD, the replaced parameter (the new key never got past its warm-up)
    assert backend.log == (["eager"] * 2 + ["capture", "replay", "replay", "replay"]
                           + ["eager"] * 2 + ["capture", "replay", "replay"]
                           + ["eager"] + ["eager"] * 2 + ["capture", "replay"])
    _assert_state_equal(eager, graphed)


cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("steps", ["equidistant", "adaptive"])
def test_cuda_graph_fit_equals_eager_fit_single_model(steps, monkeypatch):
    made = []

    class Recording(_graph.TrainStep):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(_graph, "TrainStep", Recording)
    task = _tasks(1)[0]
    kw = dict(FIT, adapt_every=3, log_every=1)
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = lc.LeakyResNet(6, 6, 8, 5, 2.0, steps=steps, device="cuda", dtype=F64)
        results[flag] = (model, fit(model, task, 1e-2, cuda_graph=flag, **kw))
    assert not made[0].graphed and made[1].graphed and made[1].captures == 2  # Adam, then SGD
    _assert_state_equal(results[False][0], results[True][0], exact=False, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[False][1].history, results[True][1].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
        assert a["rho"] == pytest.approx(b["rho"], rel=1e-10)


@pytest.mark.cuda
@cuda
def test_cuda_graph_fit_equals_eager_fit_ensemble_with_divergence():
    tasks = _tasks()
    kw = dict(FIT, log_every=2)
    runs = {}
    for flag in (False, True):
        ens = _ensemble(device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            runs[flag] = (ens, fit(ens, tasks, 1e-2, cuda_graph=flag, callback=_Blowup(1, 6), **kw))
    assert runs[True][1].diverged == runs[False][1].diverged == [None, 8, None]
    _assert_state_equal(runs[False][0], runs[True][0], exact=False, rtol=1e-10, atol=1e-12)
    for b in (0, 2):
        single = _single(b, device="cuda")
        fit(single, tasks[b], 1e-2, cuda_graph=True, **kw)
        _assert_state_equal(single, runs[True][0].member(b), exact=False, rtol=1e-9, atol=1e-11)


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
