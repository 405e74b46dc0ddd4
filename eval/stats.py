"""Confidence intervals, paired tests and false-discovery control for the retention report.

Method (named in every report):

* **One set of bootstrap resamples per row set.** For each task (and each perplexity probe) :func:`draw` fixes
  ``RESAMPLES`` (2000) resamples of its held-out rows, as a count matrix (how often each row is drawn in each
  resample), seeded from ``SEED`` and the task's name, so intervals are reproducible and adding a task changes no
  other task's intervals. Every model, the trivial baseline and every summary figure is computed on those same
  resamples: a change from the base is therefore a *paired* bootstrap (the same rows for both models), and a
  summary over several models and tasks resamples the rows of each task jointly for all models.
* **Percentile intervals** (``numpy.percentile`` of the resampled statistic, 2.5th and 97.5th).
* **Scores** are means over rows (the plain bootstrap of one model); **perplexity** is a ratio of sums
  (``exp(sum NLL / sum tokens)`` over the resampled texts).
* **p-values** of a change: two-sided, from the bootstrap distribution, ``2 x min(share <= 0, share >= 0)`` with
  the usual +1 correction; a change counts as significant when its interval excludes 0 *and* its
  Benjamini-Hochberg adjusted p-value (``scipy.stats.false_discovery_control``) over every change tested in the
  report is below ``ALPHA``.

Why not ``scipy.stats.bootstrap``: it resamples one statistic at a time, while the summaries need the same
resampled rows for every model; the count-matrix form gives that in one matrix product per task (and its plain
intervals agree with scipy's percentile method, see the tests).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control

RESAMPLES = 2000
SEED = 20240612
LEVEL = 0.95
ALPHA = 0.05
MIN_ROWS = 2  # fewer rows than this: no interval (a resample of one row is that row, a false certainty)


@dataclass(frozen=True)
class Estimate:
    """A statistic, its percentile interval (None when there are too few rows) and, for changes, its p-value."""

    value: float
    low: float | None
    high: float | None
    n: int
    p_value: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def includes_zero(self) -> bool:
        """True when the interval contains 0, or there is no interval (nothing can be claimed then)."""
        return not self.has_interval or self.low <= 0.0 <= self.high  # type: ignore[operator]

    def above_zero(self) -> bool:
        """The whole interval is above 0 (the statistic is significantly positive at this level)."""
        return self.has_interval and self.low > 0.0  # type: ignore[operator]


@dataclass(frozen=True)
class Resamples:
    """Bootstrap resamples of one row set, shared by every model scored on those rows (see the module docstring)."""

    counts: np.ndarray  # (resamples, rows) float32: how often each row is drawn in each resample (sums to rows)

    @property
    def rows(self) -> int:
        return int(self.counts.shape[1])

    def means(self, values: np.ndarray) -> np.ndarray:
        """The mean of ``values`` (one per row) in every resample: shape (resamples,)."""
        return self.sums(values) / self.rows

    def sums(self, values: np.ndarray) -> np.ndarray:
        """float32 product (half the memory of float64 for large test sets), returned as float64."""
        return (self.counts @ np.asarray(values, dtype=np.float32)).astype(np.float64)


def draw(rows: int, name: str, *, resamples: int = RESAMPLES, seed: int = SEED) -> Resamples:
    """``resamples`` bootstrap resamples of ``rows`` rows, seeded by ``seed`` and ``name`` (a task or probe)."""
    stream = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    rng = np.random.default_rng([seed, stream])
    counts = rng.multinomial(rows, np.full(rows, 1.0 / rows), size=resamples) if rows else np.zeros((resamples, 0))
    return Resamples(counts.astype(np.float32))


def percentile_interval(distribution: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(distribution, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(distribution: np.ndarray) -> float:
    """Two-sided p-value of "the statistic is 0": twice the smaller tail of the resampled values beyond 0."""
    size = len(distribution)
    below, above = int(np.sum(distribution <= 0)), int(np.sum(distribution >= 0))
    return min(1.0, 2 * (min(below, above) + 1) / (size + 1))


def estimate(value: float, distribution: np.ndarray | None, n: int, *, test: bool = False) -> Estimate:
    """An Estimate from a point value and its resampled distribution (None or too few rows: no interval)."""
    if distribution is None or n < MIN_ROWS:
        return Estimate(value, None, None, n, None)
    low, high = percentile_interval(distribution)
    return Estimate(value, low, high, n, bootstrap_p_value(distribution) if test else None)


def mean_estimate(values: Sequence[float] | np.ndarray, resamples: Resamples) -> Estimate:
    """Plain bootstrap of a mean over rows (a score)."""
    array = _rows(values, resamples)
    return estimate(float(np.mean(array)) if len(array) else math.nan, resamples.means(array), len(array))


def change_estimate(values: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray,
                    resamples: Resamples) -> Estimate:
    """Paired bootstrap of ``mean(values) - mean(reference)`` over the same rows, with its p-value."""
    diff = _rows(values, resamples) - _rows(reference, resamples)
    return estimate(float(np.mean(diff)) if len(diff) else math.nan, resamples.means(diff), len(diff), test=True)


def perplexity_distribution(nll: np.ndarray, tokens: np.ndarray, resamples: Resamples) -> np.ndarray:
    """exp(sum NLL / sum tokens) in every resample of the texts (a ratio of sums, not a mean of ratios)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp(resamples.sums(nll) / resamples.sums(tokens))


def perplexity_value(nll: np.ndarray, tokens: np.ndarray) -> float:
    return math.exp(float(np.sum(nll)) / float(np.sum(tokens)))


def perplexity_estimate(nll: Sequence[float], tokens: Sequence[float], resamples: Resamples) -> Estimate:
    """Perplexity over the probe's texts with a bootstrap interval over texts."""
    nll_a, tok_a = _rows(nll, resamples), _rows(tokens, resamples)
    return estimate(perplexity_value(nll_a, tok_a), perplexity_distribution(nll_a, tok_a, resamples),
                    int(np.sum(tok_a > 0)))


def perplexity_change_estimate(nll: Sequence[float], tokens: Sequence[float], base_nll: Sequence[float],
                               base_tokens: Sequence[float], resamples: Resamples) -> Estimate:
    """Paired bootstrap of ``perplexity / base perplexity - 1`` over the same texts (0.10 = 10 % worse)."""
    a = _rows(nll, resamples), _rows(tokens, resamples)
    b = _rows(base_nll, resamples), _rows(base_tokens, resamples)
    ratio = perplexity_distribution(*a, resamples) / perplexity_distribution(*b, resamples) - 1.0
    return estimate(perplexity_value(*a) / perplexity_value(*b) - 1.0, ratio, int(np.sum(a[1] > 0)), test=True)


def adjust_p_values(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order; empty in, empty out."""
    if not p_values:
        return []
    return [float(q) for q in false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


def is_significant(change: Estimate, q_value: float | None, alpha: float = ALPHA) -> bool:
    """A change is claimed only when its interval excludes 0 and it survives false-discovery control."""
    return not change.includes_zero() and q_value is not None and q_value < alpha


def _rows(values: Sequence[float] | np.ndarray, resamples: Resamples) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.shape != (resamples.rows,):
        raise ValueError(f"{array.shape[0] if array.ndim else 0} values for resamples of {resamples.rows} rows")
    return array
