"""Tests of the layer-step schemes in leakycuda.steps against the docs/DESIGN.md §1 formulas written out here."""
import math
import warnings

import pytest
import torch

from leakycuda import steps
from leakycuda.steps import adaptive_statistics, adaptive_step_sizes, step_sizes, steps_from_statistics


def _irregular_formula(L, a):
    """rho_l ∝ 1 + a*(1/4 - |l/L - 1/2|), l = 1..L, normalised; plain Python floats."""
    w = [1.0 + a * (0.25 - abs(l / L - 0.5)) for l in range(1, L + 1)]
    s = math.fsum(w)
    return [v / s for v in w]


def _adaptive_formula(xs, rho):
    """c_l = ||X_l - X_{l-1}|| / (rho_l ||X_l||), rho_l <- c_l^{-1} / sum_i c_i^{-1}; one layer at a time in float64."""
    xs = xs.double()
    inv_c = []
    for l in range(1, xs.shape[0]):
        num = torch.linalg.norm(xs[l] - xs[l - 1]).item()
        den = torch.linalg.norm(xs[l]).item()
        c = num / (float(rho[l - 1]) * den)
        inv_c.append(1.0 / c)
    s = math.fsum(inv_c)
    return torch.tensor([v / s for v in inv_c], dtype=torch.float64)


# -- fixed schemes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 7, 300])
def test_equidistant(L):
    rho = step_sizes(L)
    assert rho.shape == (L,) and rho.dtype == torch.get_default_dtype()
    torch.testing.assert_close(rho, torch.full((L,), 1.0 / L))
    rho64 = step_sizes(L, "equidistant", dtype=torch.float64, device="cpu")
    assert rho64.dtype == torch.float64 and rho64.device.type == "cpu"
    assert abs(rho64.sum().item() - 1.0) < 1e-12


def test_irregular_small_L_by_hand():
    # L = 4, a = 0.5: l/L = 1/4, 1/2, 3/4, 1 -> weights 1, 1.125, 1, 0.875 (sum 4).
    rho = step_sizes(4, "irregular", 0.5, dtype=torch.float64)
    torch.testing.assert_close(rho, torch.tensor([0.25, 0.28125, 0.25, 0.21875], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # L = 2, a = 0.8: weights 1 + 0.8*0.25 = 1.2 and 1 + 0.8*(0.25 - 0.5) = 0.8.
    torch.testing.assert_close(step_sizes(2, "irregular", a=0.8, dtype=torch.float64),
                               torch.tensor([0.6, 0.4], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("L", [1, 2, 3, 10, 101, 500])
@pytest.mark.parametrize("a", [0.0, 0.3, 0.99])
def test_irregular_formula(L, a):
    rho = step_sizes(L, "irregular", a, dtype=torch.float64)
    expected = torch.tensor(_irregular_formula(L, a), dtype=torch.float64)
    torch.testing.assert_close(rho, expected, rtol=1e-14, atol=0)
    assert abs(rho.sum().item() - 1.0) < 1e-12
    assert bool((rho > 0).all())
    rho32 = step_sizes(L, "irregular", a, dtype=torch.float32)
    assert rho32.dtype == torch.float32
    torch.testing.assert_close(rho32, expected.float())


@pytest.mark.parametrize("L", [8, 9, 50])
def test_irregular_small_at_ends_large_in_middle(L):
    rho = step_sizes(L, "irregular", 0.5, dtype=torch.float64)
    peak = int(rho.argmax())
    assert 0 < peak < L - 1
    assert abs((peak + 1) / L - 0.5) <= 0.5 / L + 1e-12  # the peak sits at l/L closest to 1/2
    assert bool((rho[1:peak + 1] >= rho[:peak]).all()), "non-decreasing up to the middle"
    assert bool((rho[peak + 1:] <= rho[peak:-1]).all()), "non-increasing after the middle"
    assert rho[0] < rho[peak] and rho[-1] < rho[peak]


def test_irregular_a0_is_equidistant():
    torch.testing.assert_close(step_sizes(13, "irregular", 0.0), step_sizes(13))


@pytest.mark.parametrize("L, err, match", [
    (0, ValueError, "L must be an integer >= 1 .*got 0"),
    (-3, ValueError, "L must be an integer >= 1 .*got -3"),
    (2.5, TypeError, "L must be an integer >= 1 .*2.5"),
    (True, TypeError, "L must be an integer >= 1"),
    ("4", TypeError, "L must be an integer >= 1"),
])
def test_bad_L(L, err, match):
    with pytest.raises(err, match=match):
        step_sizes(L)


def test_bad_scheme_and_a():
    with pytest.raises(ValueError, match="scheme must be one of 'equidistant', 'irregular', got 'linear'"):
        step_sizes(4, "linear")
    with pytest.raises(ValueError, match="adaptive_step_sizes"):
        step_sizes(4, "adaptive")
    for a in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"a must be in \[0, 1\)"):
            step_sizes(4, "irregular", a)
    with pytest.raises(TypeError, match=r"a must be a real number in \[0, 1\)"):
        step_sizes(4, "irregular", "0.5")
    with pytest.raises(ValueError, match="irregular-scheme parameter but scheme = 'equidistant'"):
        step_sizes(4, "equidistant", 0.5)


# -- adaptive update -------------------------------------------------------------------------------

def _random_xs(L, N, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L + 1, N, w, generator=g, dtype=dtype)


@pytest.mark.parametrize("L", [2, 5, 64])
def test_adaptive_matches_formula(L):
    xs = _random_xs(L, 11, 6)
    rho = torch.rand(L, generator=torch.Generator().manual_seed(1)) + 0.1
    rho = rho / rho.sum()
    new = adaptive_step_sizes(xs, rho)
    assert new.dtype == rho.dtype and new.shape == (L,)
    torch.testing.assert_close(new.double(), _adaptive_formula(xs, rho.double()), rtol=1e-6, atol=0)
    new64 = adaptive_step_sizes(xs.double(), rho.double())
    torch.testing.assert_close(new64, _adaptive_formula(xs, rho.double()), rtol=1e-12, atol=0)
    assert abs(new64.sum().item() - 1.0) < 1e-12


def test_adaptive_statistics_are_sums_of_squares():
    L = 4
    xs = _random_xs(L, 5, 3, dtype=torch.float64)
    stats = adaptive_statistics(xs)
    assert stats.shape == (2, L) and stats.dtype == torch.float64
    for l in range(1, L + 1):
        assert stats[0, l - 1].item() == pytest.approx(((xs[l] - xs[l - 1]) ** 2).sum().item(), rel=1e-13)
        assert stats[1, l - 1].item() == pytest.approx((xs[l] ** 2).sum().item(), rel=1e-13)


def test_adaptive_statistics_chunked(monkeypatch):
    xs = _random_xs(9, 4, 3, dtype=torch.float64)
    whole = adaptive_statistics(xs)
    monkeypatch.setattr(steps, "_CHUNK_NUMEL", 13)  # about one layer per chunk
    torch.testing.assert_close(adaptive_statistics(xs), whole, rtol=1e-14, atol=0)


def test_adaptive_reduce_over_shards_equals_full_batch():
    """Two 'ranks' with half the batch each, all-reducing the statistics, get the full-batch steps."""
    L = 6
    xs = _random_xs(L, 10, 4, dtype=torch.float64)
    rho = torch.full((L,), 1.0 / L, dtype=torch.float64)
    full = _adaptive_formula(xs, rho)
    shards = [xs[:, :4], xs[:, 4:]]
    shard_stats = [adaptive_statistics(s) for s in shards]
    for rank, shard in enumerate(shards):
        other = shard_stats[1 - rank]
        calls = []

        def all_reduce(t):  # like torch.distributed.all_reduce: in place, returns None
            calls.append(t.shape)
            t.add_(other)

        got = adaptive_step_sizes(shard, rho, reduce=all_reduce)
        assert calls == [torch.Size([2, L])]
        torch.testing.assert_close(got, full, rtol=1e-12, atol=0)
        # Without the reduction a shard gives different steps (so the test can tell).
        assert not torch.allclose(adaptive_step_sizes(shard, rho), full, rtol=1e-6, atol=0)
    # A reduce that returns the reduced tensor works too.
    got = adaptive_step_sizes(shards[0], rho, reduce=lambda t: t + shard_stats[1])
    torch.testing.assert_close(got, full, rtol=1e-12, atol=0)
    # steps_from_statistics on the summed statistics is the same thing.
    torch.testing.assert_close(steps_from_statistics(shard_stats[0] + shard_stats[1], rho), full,
                               rtol=1e-12, atol=0)


def test_adaptive_L1():
    xs = _random_xs(1, 3, 2)
    assert adaptive_step_sizes(xs, torch.tensor([0.3])).tolist() == [1.0]
    assert adaptive_step_sizes(torch.zeros(2, 3, 2), torch.tensor([1.0])).tolist() == [1.0]


def test_adaptive_all_zero_keeps_rho():
    rho = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="degenerate"):
        new = adaptive_step_sizes(torch.zeros(4, 5, 3, dtype=torch.float64), rho)
    torch.testing.assert_close(new, rho)
    with pytest.warns(RuntimeWarning, match="degenerate"):  # unnormalised rho is renormalised
        new = adaptive_step_sizes(torch.zeros(4, 5, 3, dtype=torch.float64), 2 * rho)
    torch.testing.assert_close(new, rho)


def _expected_with_neutral(xs, rho, degenerate):
    """Formula steps where the degenerate layers get the geometric mean of the other layers' c_l."""
    xs = xs.double()
    cs = {}
    for l in range(1, xs.shape[0]):
        if l - 1 not in degenerate:
            cs[l - 1] = torch.linalg.norm(xs[l] - xs[l - 1]).item() / (rho[l - 1] * torch.linalg.norm(xs[l]).item())
    neutral = math.exp(math.fsum(math.log(c) for c in cs.values()) / len(cs))
    inv = [1.0 / cs.get(l, neutral) for l in range(xs.shape[0] - 1)]
    s = math.fsum(inv)
    return torch.tensor([v / s for v in inv], dtype=torch.float64)


def test_adaptive_zero_layer_and_still_layer():
    L = 5
    xs = _random_xs(L, 7, 3, dtype=torch.float64)
    xs[2] = 0.0           # layer 2 (index 1) maps to a zero representation: c = inf
    xs[4] = xs[3].clone()  # layer 4 (index 3) does not move: c = 0
    rho = torch.full((L,), 1.0 / L, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = adaptive_step_sizes(xs, rho)
    assert bool(torch.isfinite(new).all()) and bool((new > 0).all())
    # Layer index 2 goes from the zero X_2 to X_3: a regular layer.
    torch.testing.assert_close(new, _expected_with_neutral(xs, rho.tolist(), {1, 3}), rtol=1e-12, atol=0)


def test_adaptive_nonfinite_layer():
    L = 4
    xs = _random_xs(L, 6, 3, dtype=torch.float64)
    xs[3, 0, 0] = float("nan")  # layers 3 and 4 (indices 2, 3) see the NaN
    rho = torch.full((L,), 0.25, dtype=torch.float64)
    new = adaptive_step_sizes(xs, rho)
    assert bool(torch.isfinite(new).all())
    torch.testing.assert_close(new, _expected_with_neutral(xs, rho.tolist(), {2, 3}), rtol=1e-12, atol=0)


def test_adaptive_is_scale_invariant_and_follows_rho():
    L = 4
    xs = _random_xs(L, 6, 3, dtype=torch.float64)
    rho = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    a = adaptive_step_sizes(xs, rho)
    torch.testing.assert_close(adaptive_step_sizes(1e-30 * xs, rho), a, rtol=1e-10, atol=0)
    torch.testing.assert_close(adaptive_step_sizes(xs, 3 * rho), a, rtol=1e-12, atol=0)  # c_l scales by 1/3 alike


def test_adaptive_bad_arguments():
    xs = _random_xs(3, 4, 2)
    with pytest.raises(ValueError, match=r"xs must be \[L\+1, N, w\] = \[4, N, w\] to match rho"):
        adaptive_step_sizes(xs[:3], torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match=r"xs must be \[L\+1, N, w\]"):
        adaptive_step_sizes(xs[0], torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="rho must hold finite positive steps"):
        adaptive_step_sizes(xs, torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"rho must be a 1-d tensor \[L\]"):
        adaptive_step_sizes(xs, torch.full((3, 1), 1 / 3))
    with pytest.raises(ValueError, match=r"stats must be \[2, L\] = \[2, 3\]"):
        steps_from_statistics(torch.ones(3), torch.full((3,), 1 / 3))
