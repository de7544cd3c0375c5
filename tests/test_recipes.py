"""Tests of the per-run measurements the experiments record (layer_stats, rank_summary, convergence in the JSON)."""
import json

import pytest
import torch

import leakycuda as lc
from leakycuda import diagnostics, experiments


def _model(Lt=2.0, L=6, w=5, N=12, seed=0):
    torch.manual_seed(seed)
    model = lc.LeakyResNet(3, 2, w, L, Lt, dtype=torch.float64)
    with torch.no_grad():
        model.weight[:, :, -1].normal_(0.0, 0.3)
    return model, torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)


def test_layer_stats_spectra_and_summary():
    model, x, y = _model()
    st = experiments.layer_stats(model, x, 1e-2)
    xs = model.representations(x).detach()
    c = diagnostics.centred_spectra(xs)
    sp = diagnostics.weight_mean_split(model.weight.detach(), xs)
    torch.testing.assert_close(torch.tensor(st["sv_x_centred"], dtype=torch.float64), c.sv)
    torch.testing.assert_close(torch.tensor(st["mean_share"], dtype=torch.float64), c.mean_share)
    torch.testing.assert_close(torch.tensor(st["sv_w_centred"], dtype=torch.float64), sp.sv)
    torch.testing.assert_close(torch.tensor(st["weight_mean"], dtype=torch.float64), sp.weight_mean)
    top = experiments.layer_stats(model, x, 1e-2, top=2)
    assert all(len(r) == 2 for r in top["sv_x_centred"] + top["sv_w_centred"])
    s = experiments.rank_summary(st)
    mid = c.sv[3]
    assert s["mid_layer"] == 3 and s["sv_x_centred_mid"] == pytest.approx(mid[:6].tolist())
    assert s["centred_count_mid"] == int((mid > 0.1 * mid[0]).sum())
    assert s["mean_share_mid"] == pytest.approx(c.mean_share[3].item())
    # rank_summary still works on stats without the centred spectra (older JSON)
    old = {k: v for k, v in st.items() if k not in ("sv_x_centred", "mean_share")}
    assert "centred_count_mid" not in experiments.rank_summary(old)


def test_run_json_records_convergence(tmp_path):
    over = dict(n_train=30, n_test=10, width=6, depth=4, adam_steps=5, sgd_steps=2)
    experiments.run_fig1(str(tmp_path), quick=True, Lts=(2.0,), overrides=over, log=lambda *a: None)
    run = json.loads((tmp_path / "fig1.json").read_text())["runs"][0]
    assert {"stationarity_max", "stationarity_total", "grad_norm", "scale_slope"} <= set(run["convergence"])
    assert len(run["convergence"]["stationarity"]) == 4 and run["summary"]["centred_count_mid"] >= 1
    assert len(run["layers"]["sv_x_centred"]) == 5
