"""Paired bootstrap intervals and the detectable effect: planted differences, coverage, the power formula."""

import math
import time

import numpy as np
import pytest

from focusdpo.eval.stats import (
    bootstrap_intervals,
    detectable_effect,
    method_value,
    resample_counts,
    run_values,
    unit_se,
    units_needed,
    z_factor,
)


def _paired(rng, true_diff, n_seeds=3, n_units=400, unit_sd=0.3, noise_sd=0.05, seed_sd=0.0):
    """Base ``[1, U]`` and method ``[S, U]`` sharing the per-unit difficulty (the pairing) plus own noise."""
    unit = rng.normal(0.5, unit_sd, n_units)
    base = unit + rng.normal(0, noise_sd, n_units)
    method = unit + true_diff + rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, noise_sd, (n_seeds, n_units))
    return base[None], method


def test_run_values_and_method_value_skip_nan():
    """Row 0: mean(1, 3) = 2; row 1: mean(2, 4, 6) = 4; method value (2 + 4) / 2 = 3."""
    x = np.array([[1.0, np.nan, 3.0], [2.0, 4.0, 6.0]])
    assert run_values(x)[0] == pytest.approx([2.0, 4.0])
    assert method_value(x) == pytest.approx(3.0)
    # unit weights (2, 1, 0): row 0 -> 1 (only unit 0 valid among drawn), row 1 -> (2*2 + 4) / 3
    assert run_values(x, np.array([[2, 1, 0]]))[0] == pytest.approx([1.0, 8 / 3])


def test_resample_counts_are_draws_with_replacement():
    counts = resample_counts(50, 1000, np.random.default_rng(0))
    assert counts.shape == (1000, 50) and (counts.sum(1) == 50).all()
    assert counts.mean() == pytest.approx(1.0) and counts.max() > 1  # some units drawn twice, some not at all


def test_planted_difference_is_covered_and_zero_excluded():
    base, method = _paired(np.random.default_rng(1), true_diff=0.05)
    out = bootstrap_intervals({"base": base, "m": method}, pairs=[("m", "base")])
    d = out[("m", "base")]
    assert d.lo < 0.05 < d.hi and d.excludes_zero
    assert d.mean == pytest.approx(method_value(method) - method_value(base))
    # unpaired, the same data cannot see 0.05: each method's own interval is far wider than the difference's
    assert (out["m"].hi - out["m"].lo) > 4 * (d.hi - d.lo)


def test_identical_methods_give_an_interval_at_zero():
    base, method = _paired(np.random.default_rng(2), true_diff=0.0)
    out = bootstrap_intervals({"a": method, "b": method.copy(), "base": base}, pairs=[("a", "b"), ("a", "base")])
    same = out[("a", "b")]
    assert (same.lo, same.mean, same.hi) == (0.0, 0.0, 0.0) and not same.excludes_zero
    assert out[("a", "base")].lo < 0 < out[("a", "base")].hi


def test_intervals_are_reproducible_and_fast():
    rng = np.random.default_rng(3)
    scores = {f"m{i}": rng.random((3, 512)) for i in range(10)}
    scores["base"] = rng.random((1, 512))
    pairs = [(f"m{i}", "base") for i in range(10)] + [(f"m{i}", "m0") for i in range(1, 10)]
    t0 = time.perf_counter()
    a = bootstrap_intervals(scores, pairs, replicates=2000, seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert a == bootstrap_intervals(scores, pairs, replicates=2000, seed=0)
    assert a[("m1", "base")] != bootstrap_intervals(scores, pairs, replicates=2000, seed=1)[("m1", "base")]


def test_training_seed_spread_widens_the_interval():
    """The same unit noise with a large spread between training seeds: the interval must grow."""
    calm = _paired(np.random.default_rng(4), 0.05, seed_sd=0.0)
    spread = _paired(np.random.default_rng(4), 0.05, seed_sd=0.05)
    w = [bootstrap_intervals({"b": b, "m": m}, [("m", "b")])[("m", "b")] for b, m in (calm, spread)]
    assert (w[1].hi - w[1].lo) > 2 * (w[0].hi - w[0].lo)


def test_coverage_is_close_to_95_percent():
    """200 simulated evaluations with a known difference 0.02: the 95 % interval covers it ~95 % of the time."""
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(200):
        base, method = _paired(rng, 0.02, n_units=200, noise_sd=0.1)
        d = bootstrap_intervals({"b": base, "m": method}, [("m", "b")], replicates=500,
                                seed=int(rng.integers(1 << 31)))[("m", "b")]
        hits += d.lo <= 0.02 <= d.hi
    assert 0.90 <= hits / 200 <= 0.99


def test_detectable_effect_matches_the_formula_and_its_power():
    assert z_factor() == pytest.approx(1.95996 + 0.84162, abs=1e-4)
    assert detectable_effect(0.01) == pytest.approx(0.02802, abs=1e-4)
    # planted per-unit SD 0.2 over 400 units (one seed): SE 0.01, mde 0.028
    rng = np.random.default_rng(6)
    se, n = unit_se(rng.normal(0.0, 0.2, 400))
    assert n == 400 and se == pytest.approx(0.2 / math.sqrt(400), rel=0.1)
    assert units_needed(0.2, detectable_effect(0.01)) == 400
    # a true difference equal to the mde is detected ~80 % of the time (two-sided, level 0.05)
    mde, found = detectable_effect(0.2 / math.sqrt(400)), 0
    for _ in range(300):
        d = rng.normal(mde, 0.2, 400)
        se_i, _ = unit_se(d)
        found += abs(d.mean()) > 1.95996 * se_i
    assert 0.72 <= found / 300 <= 0.88


def test_unit_se_averages_seeds_and_skips_missing_units():
    d = np.array([[0.1, np.nan, 0.3, 0.5], [0.3, np.nan, 0.1, 0.5]])  # unit means 0.2, -, 0.2, 0.5
    se, n = unit_se(d)
    assert n == 3 and se == pytest.approx(np.std([0.2, 0.2, 0.5], ddof=1) / math.sqrt(3))
    assert unit_se(np.array([np.nan, 1.0]))[0] != unit_se(np.array([np.nan, 1.0]))[0]  # NaN: too few units


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="same units"):
        bootstrap_intervals({"a": np.zeros((3, 10)), "b": np.zeros((3, 11))})
    with pytest.raises(ValueError, match="S=1 or S=3"):
        bootstrap_intervals({"a": np.zeros((3, 10)), "b": np.zeros((2, 10))})
