"""What every scorer returns: aggregate metrics, the per-row values behind them, and the settings of the scoring.

The split exists so a report can (a) put a confidence interval on every mean-over-rows metric by resampling its
per-row values (the same rows for every model, so changes from the base can be bootstrapped in pairs) and (b)
list things that describe the scoring (``n``, how many Spider rows had a real database, whether J includes
fluency, the toxicity classifier's held-out accuracy) apart from scores, never as a "(+0.000)" change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskScores:
    """Scores of one (model, task) pair.

    ``metrics``: every aggregate value (higher is better), rates in [0, 1], chrF/BLEU 0-100.
    ``per_row``: metric -> one value per test row, for every metric that is a mean over rows (always the task's
    primary metric); ``fmean(per_row[m]) == metrics[m]``. Corpus-level metrics (chrF, BLEU, macro-F1) have none.
    ``settings``: facts about the scoring, not scores: ``n`` and the like.
    """

    metrics: dict[str, float]
    per_row: dict[str, list[float]]
    settings: dict[str, object] = field(default_factory=dict)


def mean(values: Sequence[float]) -> float:
    """Exact (``math.fsum``) mean; 0.0 for no rows, so an empty test set scores 0 instead of raising."""
    return math.fsum(values) / len(values) if values else 0.0


def scores_from_rows(per_row: Mapping[str, Sequence[float]], corpus: Mapping[str, float] | None = None,
                     settings: Mapping[str, object] | None = None) -> TaskScores:
    """TaskScores whose mean-over-rows metrics are, by construction, the means of their per-row values.

    ``per_row`` (in the order the metrics should be listed) holds booleans or floats, one per row and the same
    number for every metric; ``corpus`` adds metrics that are not means over rows (chrF, BLEU, macro-F1).
    """
    rows = {name: [float(v) for v in values] for name, values in per_row.items()}
    lengths = {len(values) for values in rows.values()}
    if len(lengths) > 1:
        raise ValueError(f"per-row metrics of different lengths: { {k: len(v) for k, v in rows.items()} }")
    metrics = {name: mean(values) for name, values in rows.items()}
    metrics.update({name: float(value) for name, value in (corpus or {}).items()})
    return TaskScores(metrics, rows, dict(settings or {}))
