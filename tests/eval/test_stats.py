"""eval.stats: bootstrap intervals agree with scipy's, paired changes see what unpaired ones cannot, BH as scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eval.stats import (
    Estimate,
    adjust_p_values,
    bootstrap_p_value,
    change_estimate,
    draw,
    is_significant,
    mean_estimate,
    perplexity_change_estimate,
    perplexity_estimate,
)


def test_draw_is_reproducible_per_name_and_independent_between_names() -> None:
    a, again, other = draw(50, "sql"), draw(50, "sql"), draw(50, "detox")
    assert np.array_equal(a.counts, again.counts)
    assert not np.array_equal(a.counts, other.counts)
    assert a.counts.shape == (2000, 50) and set(a.counts.sum(axis=1)) == {50.0}


def test_plain_interval_matches_scipy_percentile_bootstrap() -> None:
    rng = np.random.default_rng(1)
    values = rng.binomial(1, 0.3, size=400).astype(float)
    ours = mean_estimate(values, draw(400, "acc"))
    theirs = scipy_stats.bootstrap((values,), np.mean, method="percentile", n_resamples=2000, rng=7)
    assert ours.value == pytest.approx(values.mean())
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.01)
    # the textbook standard error of a proportion: the interval is about +-1.96 of it
    se = math.sqrt(values.mean() * (1 - values.mean()) / 400)
    assert ours.high - ours.low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_change_finds_a_small_consistent_gain_an_unpaired_view_would_miss() -> None:
    rng = np.random.default_rng(2)
    base = rng.binomial(1, 0.5, size=400).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:12]] = 1.0  # 12 rows fixed, none broken: +0.03
    change = change_estimate(better, base, draw(400, "t"))
    assert change.value == pytest.approx(0.03)
    assert change.above_zero() and change.p_value < 0.01
    alone = mean_estimate(better, draw(400, "t"))
    assert alone.low < base.mean()  # the scores' own intervals overlap the base score


def test_identical_outputs_are_no_change_with_p_one() -> None:
    values = np.array([1.0, 0.0, 1.0, 1.0])
    change = change_estimate(values, values, draw(4, "same"))
    assert (change.value, change.low, change.high, change.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert change.includes_zero() and not is_significant(change, 0.0)


def test_noise_is_not_a_change() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.binomial(1, 0.4, size=200).astype(float), rng.binomial(1, 0.4, size=200).astype(float)
    change = change_estimate(a, b, draw(200, "noise"))
    assert change.includes_zero() and change.p_value > 0.05


def test_too_few_rows_give_no_interval() -> None:
    single = mean_estimate([1.0], draw(1, "one"))
    assert single == Estimate(1.0, None, None, 1, None)
    assert single.includes_zero() and not single.above_zero()


def test_bootstrap_p_value_is_two_sided_and_never_zero() -> None:
    assert bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(-np.ones(999)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.linspace(-1, 1, 1001)) == 1.0


def test_perplexity_is_a_ratio_of_sums_with_a_paired_change() -> None:
    tokens = np.array([10.0, 30.0, 20.0, 40.0])
    nll = tokens * 2.0  # 2 nats per token everywhere
    ppl = perplexity_estimate(nll, tokens, draw(4, "probe"))
    assert ppl.value == pytest.approx(math.exp(2.0)) and ppl.low == pytest.approx(math.exp(2.0))
    worse = perplexity_change_estimate(nll + tokens * 0.1, tokens, nll, tokens, draw(4, "probe"))
    assert worse.value == pytest.approx(math.exp(0.1) - 1) and worse.above_zero()
    mixed = np.array([25.0, 55.0, 45.0, 75.0])  # two texts better, two worse: ratio of sums weighs by tokens
    assert perplexity_estimate(mixed, tokens, draw(4, "probe")).value == pytest.approx(math.exp(200 / 100))


def test_benjamini_hochberg_matches_the_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 -> p * m / rank = 0.04, 0.06, 0.0533, 0.5 -> cumulative min from the top
    assert adjust_p_values(p) == pytest.approx([0.04, 0.0533333, 0.0533333, 0.5])
    assert adjust_p_values([]) == []


def test_significance_needs_the_interval_and_the_adjusted_p_value() -> None:
    clear = Estimate(0.1, 0.05, 0.15, 400, 0.001)
    assert is_significant(clear, 0.01) and not is_significant(clear, 0.2)
    assert not is_significant(Estimate(0.1, -0.01, 0.2, 400, 0.06), 0.01)


def test_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 values for resamples of 4 rows"):
        mean_estimate([1.0, 2.0, 3.0], draw(4, "x"))
