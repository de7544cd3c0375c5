"""Bad input over the surfaces added after the first hardening: LeakyEnsemble, recipes, diagnostics on
ensembles and NaN, related (DeepLinear, the Schatten-2/L minimizer, the run configs), replot, and the
related experiments' command line.

The battery asserts the exception type and that the message names the argument; the other tests assert
that a refused call changed nothing, that the cases which used to return numbers now raise, and that
good input still gives the right result (against float64 references).
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import leakycuda as lc
from leakycuda import LeakyEnsemble, LeakyResNet, cli, diagnostics, experiments, recipes
from leakycuda.experiments import dln_rank, dln_saddle, fcnn_bottleneck, linear_nets
from leakycuda.data import bottleneck_task

F64 = torch.float64
NAN = math.nan


def ens(Lt=(1.0, 2.0), **kw):
    torch.manual_seed(0)
    return LeakyEnsemble(3, 2, 4, [2, 3], list(Lt), **{"dtype": F64, **kw})


def net(Lt=1.0, **kw):
    torch.manual_seed(0)
    return LeakyResNet(3, 3, 4, 2, Lt, **{"dtype": F64, **kw})


def task(d=3, dtype=F64):
    t = bottleneck_task(d=d, inner=(2,), n_train=12, n_test=4, seed=0, dtype=dtype)
    return t


def x(n=5, d=3, **kw):
    return torch.randn(n, d, dtype=kw.pop("dtype", F64), **kw)


def nan_net():
    m = net()
    with torch.no_grad():
        m.weight[0, 0, 0] = NAN
    return m


def _json(tmp_path, text):
    p = tmp_path / "r.json"
    p.write_text(text)
    return str(p)


# --- the battery: (call, exception type, words the message must hold) --------------------------------------------

ENSEMBLE = [
    ("ens-reg-negative", lambda: ens().regularization(-1.0), ValueError, ["lam", "-1.0", ">= 0"]),
    ("ens-reg-nan", lambda: ens().regularization(NAN), ValueError, ["lam", "nan"]),
    ("ens-reg-string", lambda: ens().regularization("1e-3"), TypeError, ["lam", "'1e-3'"]),
    ("ens-reg-bool", lambda: ens().regularization(True), TypeError, ["lam", "True"]),
    ("ens-reg-list-negative", lambda: ens().regularization([0.1, -0.1]), ValueError, ["each value of lam", "-0.1"]),
    ("ens-reg-list-string", lambda: ens().regularization([0.1, "x"]), TypeError, ["each value of lam", "'x'"]),
    ("ens-reg-tensor-negative", lambda: ens().regularization(torch.tensor([0.1, -1.0])), ValueError,
     ["each value of lam"]),
    ("ens-reg-0d-tensor-nan", lambda: ens().regularization(torch.tensor(NAN)), ValueError, ["lam", "nan"]),
    ("ens-reg-wrong-count", lambda: ens().regularization([0.1, 0.2, 0.3]), ValueError, ["lam", "B = 2", "3"]),
    ("ens-forward-float32", lambda: ens()(x(dtype=torch.float32)), TypeError, ["x", "torch.float64", "float32"]),
    ("ens-forward-int", lambda: ens()(torch.ones(5, 3, dtype=torch.long)), TypeError, ["x", "torch.int64"]),
    ("ens-forward-meta", lambda: ens()(x(device="meta")), ValueError, ["x", "device", "meta"]),
    ("ens-forward-list", lambda: ens()([[0.0] * 3]), TypeError, ["x", "list"]),
    ("ens-forward-wrong-width", lambda: ens()(x(d=4)), ValueError, ["x", "[N, in_features] = [N, 3]", "[5, 4]"]),
    ("ens-forward-wrong-B", lambda: ens()(torch.randn(3, 5, 3, dtype=F64)), ValueError, ["x", "[2, N, 3]"]),
    ("ens-representations-float32", lambda: ens().representations(x(dtype=torch.float32)), TypeError, ["x"]),
    ("ens-adapt-meta", lambda: ens(steps="adaptive").adapt_steps(x(device="meta")), ValueError, ["x", "meta"]),
    ("ens-member-float", lambda: ens().member(1.0), TypeError, ["b", "integer", "1.0", "float"]),
    ("ens-member-string", lambda: ens().member("0"), TypeError, ["b", "'0'"]),
    ("ens-member-out-of-range", lambda: ens().member(2), IndexError, ["b", "[-2, 2)", "2"]),
    ("ens-adapt-members-float", lambda: ens(steps="adaptive").adapt_steps(x(), members=[0.0]), TypeError,
     ["each value of members", "0.0"]),
    ("ens-load-resnet-state", lambda: ens().load_state_dict(net().state_dict()), ValueError,
     ["state_dict", "a LeakyEnsemble", "the state dict of a LeakyResNet", "from_models"]),
    ("resnet-load-ensemble-state", lambda: net().load_state_dict(ens().state_dict()), ValueError,
     ["state_dict", "a LeakyResNet", "the state dict of a LeakyEnsemble", "member(b)"]),
    ("ens-load-other-shape", lambda: ens().load_state_dict(LeakyEnsemble(3, 2, 5, [2, 3], [1.0, 2.0],
                                                                         dtype=F64).state_dict()),
     RuntimeError, ["size mismatch for weight", "[2, 3, 5, 6]", "nothing was loaded"]),
    ("ens-load-missing-key", lambda: ens().load_state_dict({k: v for k, v in ens().state_dict().items()
                                                            if k != "rho"}), RuntimeError, ["missing key(s) 'rho'"]),
    ("ens-load-bad-saved-steps", lambda: ens().load_state_dict(
        dict(ens().state_dict(), _extra_state=dict(ens().get_extra_state(), steps=["equidistant", "bogus"])),
        strict=False), ValueError, ["member 1", "steps", "'bogus'"]),
    ("resnet-load-non-dict-extra-state", lambda: net().load_state_dict(dict(net().state_dict(), _extra_state=3)),
     ValueError, ["state_dict", "LeakyResNet", "3"]),
]

RECIPES = [
    ("refine-target-negative", lambda: recipes.refine(net(), task(), 1e-2, iterations=2, target=-1.0), ValueError,
     ["target", "-1.0", ">= 0"]),
    ("refine-target-nan", lambda: recipes.refine(net(), task(), 1e-2, iterations=2, target=NAN), ValueError,
     ["target", "nan"]),
    ("refine-target-string", lambda: recipes.refine(net(), task(), 1e-2, target="0.1"), TypeError, ["target"]),
    ("refine-nan-weights", lambda: recipes.refine(nan_net(), task(), 1e-2, iterations=2), ValueError,
     ["model.weight", "finite", "NaN"]),
    ("refine-ensemble", lambda: recipes.refine(ens(), task(), 1e-2, iterations=2), TypeError,
     ["model", "LeakyEnsemble", "member(b)"]),
    ("refine-lam-negative", lambda: recipes.refine(net(), task(), -1.0), ValueError, ["lam", "-1.0"]),
    ("refine-lam-string", lambda: recipes.refine(net(), task(), "1e-2"), TypeError, ["lam"]),
    ("refine-task-wrong-width", lambda: recipes.refine(net(), task(d=4), 1e-2), ValueError, ["task.x_train"]),
    ("refine-iterations-float", lambda: recipes.refine(net(), task(), 1e-2, iterations=2.5), TypeError,
     ["iterations", "2.5"]),
    ("refine-check-every-0", lambda: recipes.refine(net(), task(), 1e-2, check_every=0), ValueError,
     ["check_every", "0"]),
    ("refine-precondition-nan", lambda: recipes.refine(net(), task(), 1e-2, precondition=NAN), ValueError,
     ["precondition", "nan"]),
    ("refine-params", lambda: recipes.refine(net(), task(), 1e-2, params="bias"), ValueError, ["params", "'bias'"]),
    ("refine-dtype-int", lambda: recipes.refine(net(), task(), 1e-2, dtype=torch.int64), TypeError, ["dtype"]),
    ("refine-callback", lambda: recipes.refine(net(), task(), 1e-2, callback=3), TypeError, ["callback", "int"]),
    ("shift-ensemble", lambda: recipes.shift_effective_depth(ens(), x(), 2.0), TypeError,
     ["model", "LeakyEnsemble", "member(b)"]),
    ("shift-nan-weights", lambda: recipes.shift_effective_depth(nan_net(), x(), 2.0), ValueError,
     ["model.weight", "NaN"]),
    ("shift-Lt-string", lambda: recipes.shift_effective_depth(net(), x(), "2"), TypeError, ["Lt", "'2'"]),
    ("shift-Lt-nan", lambda: recipes.shift_effective_depth(net(), x(), NAN), ValueError, ["Lt", "nan"]),
    ("shift-gamma0-negative", lambda: recipes.shift_effective_depth(net(), x(), 2.0, gamma0=-1.0), ValueError,
     ["gamma0", "-1.0"]),
    ("shift-x-float32", lambda: recipes.shift_effective_depth(net(), x(dtype=torch.float32), 2.0), TypeError, ["x"]),
]

DIAGNOSTICS = [
    ("analyze-ensemble", lambda: diagnostics.analyze(ens(), x(), torch.zeros(5, 2, dtype=F64), 1e-2), TypeError,
     ["model", "LeakyEnsemble of B = 2", "member(b)"]),
    ("convergence-ensemble", lambda: diagnostics.convergence(ens(), x(), torch.zeros(5, 2, dtype=F64), 1e-2),
     TypeError, ["model", "LeakyEnsemble"]),
    ("analyze-inconsistent-model", lambda: diagnostics.analyze(_bad_rho_model(), x(), torch.zeros(5, 3, dtype=F64),
                                                               1e-2), ValueError, ["model", "rho [L]", "weight [2, 4, 5], rho [3]"]),
    ("centred-nan", lambda: diagnostics.centred_spectra(torch.full((3, 4), NAN)), ValueError,
     ["X", "finite", "12 NaN"]),
    ("centred-inf", lambda: diagnostics.centred_spectra(torch.tensor([[1.0, math.inf], [0.0, 1.0]])), ValueError,
     ["X", "index [0, 1]"]),
    ("centred-list", lambda: diagnostics.centred_spectra([[1.0]]), TypeError, ["X", "list"]),
    ("weight-mean-split-nan-W", lambda: diagnostics.weight_mean_split(torch.full((2, 3, 4), NAN),
                                                                      torch.randn(3, 5, 3)), ValueError, ["W", "NaN"]),
    ("weight-mean-split-nan-xs", lambda: diagnostics.weight_mean_split(torch.randn(2, 3, 4),
                                                                       torch.full((3, 5, 3), NAN)),
     ValueError, ["xs", "NaN"]),
]


def _bad_rho_model():
    m = net()
    m.rho = torch.ones(3, dtype=F64)
    return m


DL = linear_nets.DeepLinear
B4 = torch.eye(4, dtype=F64)
RELATED = [
    ("dl-depth-0", lambda: DL(4, 0), ValueError, ["depth", ">= 1", "0"]),
    ("dl-depth-float", lambda: DL(4, 2.5), TypeError, ["depth", "2.5"]),
    ("dl-depth-negative", lambda: DL(4, -1), ValueError, ["depth", "-1"]),
    ("dl-width-0", lambda: DL(0, 2), ValueError, ["width", "0"]),
    ("dl-width-float", lambda: DL(4.0, 2), TypeError, ["width", "4.0"]),
    ("dl-in-features-too-wide", lambda: DL(4, 2, in_features=5), ValueError, ["in_features", "[1, 4]", "5"]),
    ("dl-out-features-float", lambda: DL(4, 2, out_features=2.5), TypeError, ["out_features", "2.5"]),
    ("dl-scale-nan", lambda: DL(4, 2, scale=NAN), ValueError, ["scale", "nan"]),
    ("dl-scale-complex", lambda: DL(4, 2, scale=1j), TypeError, ["scale", "complex"]),
    ("dl-scale-negative", lambda: DL(4, 2, scale=-1.0), ValueError, ["scale", "-1.0"]),
    ("dl-init", lambda: DL(4, 2, init="xavier"), ValueError, ["init", "'xavier'"]),
    ("dl-dtype-int", lambda: DL(4, 2, dtype=torch.int64), TypeError, ["dtype", "int64"]),
    ("dl-generator", lambda: DL(4, 2, generator=0), TypeError, ["generator"]),
    ("dl-reg-negative", lambda: DL(4, 2).regularization(-1.0), ValueError, ["lam", "-1.0"]),
    ("dl-reg-nan", lambda: DL(4, 2).regularization(NAN), ValueError, ["lam", "nan"]),
    ("dl-reg-complex", lambda: DL(4, 2).regularization(1j), TypeError, ["lam", "complex"]),
    ("dl-forward-wrong-width", lambda: DL(4, 2)(torch.randn(3, 5, dtype=F64)), ValueError, ["x", "[N, 4]", "[3, 5]"]),
    ("dl-forward-float32", lambda: DL(4, 2)(torch.randn(3, 4)), TypeError, ["x", "float64", "float32"]),
    ("schatten-L-0", lambda: linear_nets.schatten_minimizer(B4, 0.1, 0), ValueError, ["L", ">= 1", "0"]),
    ("schatten-L-float", lambda: linear_nets.schatten_minimizer(B4, 0.1, 2.5), TypeError, ["L", "2.5"]),
    ("schatten-L-negative", lambda: linear_nets.schatten_minimizer(B4, 0.1, -2), ValueError, ["L", "-2"]),
    ("schatten-L-complex", lambda: linear_nets.schatten_minimizer(B4, 0.1, 1j), TypeError, ["L", "complex"]),
    ("schatten-lam-negative", lambda: linear_nets.schatten_minimizer(B4, -0.1, 3), ValueError, ["lam", "-0.1"]),
    ("schatten-lam-nan", lambda: linear_nets.schatten_minimizer(B4, NAN, 3), ValueError, ["lam", "nan"]),
    ("schatten-lam-complex", lambda: linear_nets.schatten_minimizer(B4, 1j, 3), TypeError, ["lam", "complex"]),
    ("schatten-B-list", lambda: linear_nets.schatten_minimizer([[1.0]], 0.1, 2), TypeError, ["B", "list"]),
    ("schatten-B-nan", lambda: linear_nets.schatten_minimizer(B4 * NAN, 0.1, 2), ValueError, ["B", "finite"]),
    ("schatten-B-complex", lambda: linear_nets.schatten_minimizer(B4.to(torch.complex128), 0.1, 2), TypeError,
     ["B", "complex128"]),
    ("schatten-B-1d", lambda: linear_nets.schatten_minimizer(torch.ones(3, dtype=F64), 0.1, 2), ValueError, ["B", "[3]"]),
    ("schatten-branch", lambda: linear_nets.schatten_minimizer(B4, 0.1, 2, branch="local"), ValueError, ["branch"]),
    ("thresholds-L-0", lambda: linear_nets.schatten_thresholds(0.1, 0), ValueError, ["L", "0"]),
    ("thresholds-L-float", lambda: linear_nets.schatten_thresholds(0.1, 2.5), TypeError, ["L", "2.5"]),
    ("thresholds-lam-negative", lambda: linear_nets.schatten_thresholds(-0.1, 3), ValueError, ["lam", "-0.1"]),
    ("thresholds-lam-nan", lambda: linear_nets.schatten_thresholds(NAN, 3), ValueError, ["lam", "nan"]),
]


def _run(fn, cfg):
    return lambda tmp: fn(os.path.join(tmp, "out"), config=cfg, log=lambda *a: None, progress=False)


R, S, F = dln_rank.DLNRankConfig, dln_saddle.DLNSaddleConfig, fcnn_bottleneck.FCNNBottleneckConfig
CONFIGS = [
    ("rank-depth-0", _run(dln_rank.run_dln_rank, R(depths=(0, 2))), ValueError, ["each value of config.depths", "0"]),
    ("rank-depth-float", _run(dln_rank.run_dln_rank, R(depths=(2.5,))), TypeError, ["config.depths", "2.5"]),
    ("rank-depths-repeated", _run(dln_rank.run_dln_rank, R(depths=(2, 2))), ValueError, ["config.depths", "distinct"]),
    ("rank-lam-negative", _run(dln_rank.run_dln_rank, R(lam=-1.0)), ValueError, ["config.lam", "-1.0"]),
    ("rank-lam-nan", _run(dln_rank.run_dln_rank, R(lam=NAN)), ValueError, ["config.lam", "nan"]),
    ("rank-spectrum-empty", _run(dln_rank.run_dln_rank, R(spectrum=())), ValueError, ["config.spectrum"]),
    ("rank-spectrum-too-long", _run(dln_rank.run_dln_rank, R(d=2, n=4, spectrum=(1.0, 0.5, 0.2))), ValueError,
     ["config.spectrum", "d = 2"]),
    ("rank-n-below-d", _run(dln_rank.run_dln_rank, R(n=8)), ValueError, ["config.n", ">= 16", "8"]),
    ("rank-init", _run(dln_rank.run_dln_rank, R(init="he")), ValueError, ["config.init", "'he'"]),
    ("rank-init-scale-nan", _run(dln_rank.run_dln_rank, R(init_scale=NAN)), ValueError, ["config.init_scale"]),
    ("rank-lr0-0", _run(dln_rank.run_dln_rank, R(lr0=0.0)), ValueError, ["config.lr0", "> 0"]),
    ("rank-steps-float", _run(dln_rank.run_dln_rank, R(steps=10.0)), TypeError, ["config.steps", "10.0"]),
    ("rank-wrong-config-type", _run(dln_rank.run_dln_rank, F()), TypeError,
     ["config", "DLNRankConfig", "FCNNBottleneckConfig"]),
    ("saddle-depth-0", _run(dln_saddle.run_dln_saddle, S(depths=(0,))), ValueError, ["config.depths", "0"]),
    ("saddle-depth-float", _run(dln_saddle.run_dln_saddle, S(depths=(2.5,))), TypeError, ["config.depths", "2.5"]),
    ("saddle-horizon-missing-depth", _run(dln_saddle.run_dln_saddle, S(depths=(2, 5))), ValueError,
     ["config.horizon_small", "[2, 5]"]),
    ("saddle-horizon-negative", _run(dln_saddle.run_dln_saddle, S(depths=(2,), horizon_large={2: -1.0})), ValueError,
     ["config.horizon_large[2]", "-1.0"]),
    ("saddle-lr0-negative", _run(dln_saddle.run_dln_saddle, S(lr0=-1.0)), ValueError, ["config.lr0", "-1.0"]),
    ("saddle-spectrum-zero", _run(dln_saddle.run_dln_saddle, S(spectrum=(1.0, 0.0))), ValueError,
     ["each value of config.spectrum", "0.0"]),
    ("saddle-width-below-d", _run(dln_saddle.run_dln_saddle, S(width=8)), ValueError, ["config.width", "8"]),
    ("saddle-records-0", _run(dln_saddle.run_dln_saddle, S(records=0)), ValueError, ["config.records", "0"]),
    ("fcnn-depth-0", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(depths=(0,))), ValueError, ["config.depths", "0"]),
    ("fcnn-depth-float", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(depths=(2.5,))), TypeError, ["config.depths", "2.5"]),
    ("fcnn-lam-negative", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(lam=-1.0)), ValueError, ["config.lam", "-1.0"]),
    ("fcnn-lr-nan", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(lr=NAN)), ValueError, ["config.lr", "nan"]),
    ("fcnn-width-0", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(width=0)), ValueError, ["config.width", "0"]),
    ("fcnn-inner-too-wide", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(inner=(40,))), ValueError, ["config.inner", "d = 30"]),
    ("fcnn-top-0", _run(fcnn_bottleneck.run_fcnn_bottleneck, F(top=0)), ValueError, ["config.top", "0"]),
]

# One replot serves every experiment (the registry's); the message lists every kind of result file.
REPLOTS = []
for _name, _fn, _file in (("paper", experiments.replot, "fig1.json"), ("related", experiments.replot, "dln_rank.json")):
    REPLOTS += [
        ("%s-replot-truncated" % _name, _fn, lambda tmp: _json(tmp, '{"runs": [1, 2'), ValueError,
         ["json_path", "r.json", "not valid JSON", _file]),
        ("%s-replot-not-json" % _name, _fn, lambda tmp: _json(tmp, "hello"), ValueError, ["json_path", "r.json"]),
        ("%s-replot-empty" % _name, _fn, lambda tmp: _json(tmp, ""), ValueError, ["json_path", "not valid JSON"]),
        ("%s-replot-missing" % _name, _fn, lambda tmp: str(tmp / "nope.json"), FileNotFoundError,
         ["json_path", "nope.json", "does not exist"]),
        ("%s-replot-folder" % _name, _fn, lambda tmp: str(tmp), ValueError, ["json_path", "folder"]),
        ("%s-replot-a-list" % _name, _fn, lambda tmp: _json(tmp, "[1, 2]"), ValueError,
         ["json_path", "r.json", "none of them"]),
        ("%s-replot-bytes-path" % _name, _fn, lambda tmp: b"r.json", TypeError, ["json_path"]),
    ]
REPLOTS += [
    ("experiments-replot-no-fields", experiments.replot, lambda tmp: _json(tmp, '{"figure": "fig2"}'), ValueError,
     ["json_path", "r.json", "no field 'config'"]),
    ("experiments-replot-wrong-schema", experiments.replot,
     lambda tmp: _json(tmp, '{"figure": "fig1", "config": {}, "Lts": [1.0], "runs": [{}]}'), ValueError,
     ["json_path", "r.json", "do not match", "KeyError"]),
    ("experiments-replot-demo-without-history", experiments.replot,
     lambda tmp: _json(tmp, '{"layers": {}, "config": {}, "task": {}}'), FileNotFoundError,
     ["json_path", "history.json", "does not exist"]),
    ("related-replot-wrong-experiment", experiments.replot, lambda tmp: _json(tmp, '{"experiment": "fig1"}'),
     ValueError, ["json_path", "r.json", "'fig1'"]),
    ("related-replot-no-fields", experiments.replot, lambda tmp: _json(tmp, '{"experiment": "dln-saddle"}'), ValueError,
     ["json_path", "no field 'config', 'seeds', 'runs'"]),
    ("related-replot-wrong-schema", experiments.replot,
     lambda tmp: _json(tmp, '{"experiment": "dln-rank", "config": {}, "seeds": [0], "runs": [], "thresholds": {}}'),
     ValueError, ["json_path", "r.json", "do not match", "spectrum"]),
]


def _assert_refused(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    assert type(e.value) is exc, "%s instead of %s: %s" % (type(e.value).__name__, exc.__name__, e.value)
    msg = str(e.value)
    for w in words:
        assert w in msg, "%r not in the message: %s" % (w, msg)


@pytest.mark.parametrize("call,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in
                                            ENSEMBLE + RECIPES + DIAGNOSTICS + RELATED])
def test_bad_argument_is_refused_naming_it(call, exc, words):
    _assert_refused(call, exc, words)


@pytest.mark.parametrize("run,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in CONFIGS])
def test_bad_related_config_is_refused_before_any_work(tmp_path, run, exc, words):
    _assert_refused(lambda: run(str(tmp_path)), exc, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fn,path,exc,words", [pytest.param(f, p, e, w, id=i) for i, f, p, e, w in REPLOTS])
def test_bad_replot_file_is_refused_naming_it(tmp_path, fn, path, exc, words):
    p = path(tmp_path)
    before = sorted(os.listdir(tmp_path))
    _assert_refused(lambda: fn(p, str(tmp_path / "pngs")), exc, words)
    assert sorted(os.listdir(tmp_path)) == before  # nothing drawn, no folder made


def test_replot_refuses_an_out_that_is_a_file(tmp_path):
    fn = experiments.replot
    p = _json(tmp_path, '{"experiment": "dln-rank", "figure": "fig1"}')
    _assert_refused(lambda: fn(p, p), ValueError, ["out", "r.json", "an existing file"])


@pytest.mark.parametrize("experiment", sorted(n for n, e in experiments.experiments().items() if e.kind == "preset"))
def test_pad_depths_is_refused_for_the_related_experiments(tmp_path, capsys, experiment):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", experiment, "--quick", "--pad-depths", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--pad-depths" in err and experiment in err and "fig2" in err
    assert not out.exists()


# --- a refused call changes nothing ------------------------------------------------------------------------------


def _snapshot(module):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in module.state_dict().items()}


def _assert_same(module, snap):
    now = module.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        if isinstance(v, torch.Tensor):
            assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
        else:
            assert now[k] == v, k


def _wrong_weight_shape(state):
    state = dict(state)
    state["weight"] = state["weight"][..., :2]
    return state


@pytest.mark.parametrize("make", [ens, net], ids=["ensemble", "resnet"])
@pytest.mark.parametrize("strict", [True, False])
def test_a_failed_load_copies_nothing(make, strict):
    """A state dict with other settings (adopted by strict=False) and one tensor of the wrong shape: before,
    strict=False copied the other tensors and adopted the settings, then raised."""
    model = make()
    other = make(Lt=[1.5, 0.5]) if make is ens else make(Lt=1.5)
    with torch.no_grad():
        for t in other.parameters():
            t.add_(1.0)
    snap, Lts = _snapshot(model), model.get_extra_state()
    with pytest.raises((RuntimeError, ValueError)):
        model.load_state_dict(_wrong_weight_shape(other.state_dict()), strict=strict)
    _assert_same(model, snap)
    assert model.get_extra_state() == Lts


@pytest.mark.parametrize("make", [ens, net], ids=["ensemble", "resnet"])
def test_a_strict_load_with_a_missing_key_copies_nothing(make):
    model, other = make(), make()
    with torch.no_grad():
        for t in other.parameters():
            t.add_(1.0)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="missing key"):
        model.load_state_dict({k: v for k, v in other.state_dict().items() if k != "proj_out"})
    _assert_same(model, snap)
    # strict=False loads what is there, as nn.Module does
    model.load_state_dict({k: v for k, v in other.state_dict().items() if k != "proj_out"}, strict=False)
    assert torch.equal(model.weight, other.weight) and torch.equal(model.proj_out, snap["proj_out"])


def test_a_failed_load_inside_a_parent_module_leaves_the_ensemble_alone():
    parent, other = torch.nn.Sequential(ens()), torch.nn.Sequential(LeakyEnsemble(3, 2, 5, [2, 3], [1.0, 2.0],
                                                                                  dtype=F64))
    snap = _snapshot(parent[0])
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        parent.load_state_dict(other.state_dict(), strict=False)
    _assert_same(parent[0], snap)


def test_refine_refuses_nan_weights_and_leaves_the_model_as_it_was():
    model = LeakyResNet(3, 3, 4, 2, 1.0)  # float32: refine would cast it to float64
    with torch.no_grad():
        model.weight[1, 2, 3] = NAN
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.weight must be finite.*index \[1, 2, 3\]"):
        recipes.refine(model, task(dtype=torch.float32), 1e-2, iterations=3)
    assert model.weight.dtype == torch.float32
    torch.testing.assert_close(model.weight, snap["weight"], equal_nan=True, rtol=0, atol=0)


def test_refine_failing_midway_restores_the_model_exactly():
    """A failure after L-BFGS has moved the weights (here, the callback raising at the second check) leaves
    the model's dtype and every value as before the call."""
    torch.manual_seed(1)
    model = LeakyResNet(3, 3, 4, 2, 1.0)
    snap = _snapshot(model)
    calls = []

    def callback(record):
        calls.append(record)
        if len(calls) == 2:
            assert not torch.equal(model.weight.detach().float(), snap["weight"])  # the weights did move
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recipes.refine(model, task(dtype=torch.float32), 1e-2, iterations=20, check_every=5, target=0.0,
                       callback=callback)
    assert len(calls) == 2
    _assert_same(model, snap)


# --- cases that used to return numbers now raise; good input still works -------------------------------------------


def test_ensemble_regularization_of_good_lam_matches_its_members():
    e = ens()
    ref = [m.regularization(0.1) for m in e.members()]
    for lam in (0.1, np.float64(0.1), torch.tensor(0.1, dtype=F64), [0.1, 0.1], (0.1, 0.1),
                torch.tensor([0.1, 0.1], dtype=F64)):
        torch.testing.assert_close(e.regularization(lam), torch.stack(ref), rtol=1e-12, atol=0)
    per = e.regularization([0.0, 0.3])
    assert per[0].item() == 0.0
    torch.testing.assert_close(per[1], e.member(1).regularization(0.3), rtol=1e-12, atol=0)


def test_ensemble_forward_and_member_with_good_input():
    e = ens()
    xb = x()
    y = e(xb)
    for b in (0, 1, np.int64(1), -1, torch.tensor(1).item()):
        torch.testing.assert_close(y[int(b)], e.member(b)(xb), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e(torch.stack([xb, xb]))[1], y[1], rtol=1e-12, atol=1e-12)


def test_ensemble_and_resnet_load_their_own_state_dicts():
    for make in (ens, net):
        a, b = make(), make()
        with torch.no_grad():
            for t in b.parameters():
                t.mul_(2.0)
        a.load_state_dict(b.state_dict())
        _assert_same(a, _snapshot(b))
        parent_a, parent_b = torch.nn.Sequential(make()), torch.nn.Sequential(b)
        parent_a.load_state_dict(parent_b.state_dict())
        _assert_same(parent_a[0], _snapshot(b))


def test_refine_target_zero_runs_every_iteration():
    r = recipes.refine(net(), task(), 1e-2, iterations=4, check_every=2, target=0.0)
    assert r.iterations == 4 and not r.reached and r.history[-1]["iteration"] == 4


def test_shift_effective_depth_on_a_member_of_an_ensemble():
    m = ens().member(0)
    change = recipes.shift_effective_depth(m, x(), 1.5)
    assert m.Lt == 1.5 and 0 <= change < 1


def test_analyze_a_member_of_an_ensemble_and_centred_spectra_of_finite_input():
    e = ens()
    a = diagnostics.analyze(e.member(1), x(), torch.zeros(5, 2, dtype=F64), 1e-2)
    assert a.depth == 3
    X = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(diagnostics.centred_spectra(X).sv, torch.linalg.svdvals(X - X.mean(0)))


def test_deep_linear_good_arguments():
    m = linear_nets.DeepLinear(np.int64(4), 3, in_features=2, out_features=3, scale=np.float64(0.5),
                           generator=torch.Generator().manual_seed(0))
    assert (m.width, m.depth, m.in_features, m.out_features) == (4, 3, 2, 3)
    A = m.end_to_end()
    M = m.layers.detach()
    torch.testing.assert_close(A, (M[2] @ M[1] @ M[0])[:3, :2], rtol=1e-12, atol=1e-12)
    assert m.regularization(0.0).item() == 0.0
    torch.testing.assert_close(m.regularization(0.2), 0.1 * M.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("L", [1, 2, 3, 6])
def test_schatten_minimizer_without_penalty_is_B(L):
    """lam = 0 is no penalty: the minimizer is B itself (before, L >= 3 gave the zero matrix)."""
    g = torch.Generator().manual_seed(L)
    B = torch.randn(5, 4, generator=g, dtype=F64)
    for branch in ("global", "largest"):
        torch.testing.assert_close(linear_nets.schatten_minimizer(B, 0.0, L, branch=branch), B, rtol=1e-12, atol=1e-12)
    assert linear_nets.schatten_thresholds(0.0, L) == (0.0, 0.0)


def test_schatten_minimizer_good_input_is_unchanged():
    """A brute-force check of the scalar problem on a grid, at lam = 0.3 and L = 3 (float64)."""
    B = torch.diag(torch.tensor([2.0, 0.9, 0.3], dtype=F64))
    A = linear_nets.schatten_minimizer(B, 0.3, 3)
    s = torch.linspace(0, 2.5, 250001, dtype=F64)
    for i, b in enumerate((2.0, 0.9, 0.3)):
        f = (s - b).square() + 0.3 * 3 / 2 * s ** (2 / 3)
        assert A[i, i].item() == pytest.approx(s[f.argmin()].item(), abs=2e-5)


@pytest.mark.parametrize("presets", [dln_rank.DLN_RANK, dln_saddle.DLN_SADDLE, fcnn_bottleneck.FCNN_BOTTLENECK])
def test_related_presets_pass_their_checks(presets):
    for cfg in presets.values():
        assert cfg.check() is cfg


def test_a_good_related_config_still_runs(tmp_path):
    cfg = dln_rank.DLNRankConfig(d=3, n=6, spectrum=[1.0, 0.2], noise=0.0, lam=0.0, depths=[1, 3], steps=3)
    res = dln_rank.run_dln_rank(str(tmp_path), config=cfg, log=lambda *a: None, progress=False)
    assert [r["L"] for r in res["runs"]] == [1, 3]
    again = experiments.replot(res["files"]["json"], str(tmp_path / "again"))
    assert sorted(again) == ["png"] and os.path.getsize(again["png"]) > 0
    assert json.loads(open(res["files"]["json"]).read())["config"]["lam"] == 0.0
