"""eval.task_scores: metrics are exactly the means of their per-row values; corpus metrics and settings apart."""

from __future__ import annotations

import statistics

import pytest

from eval.task_scores import TaskScores, mean, scores_from_rows


def test_metrics_are_the_fmean_of_their_rows() -> None:
    rows = [0.1] * 10 + [True, False]
    scores = scores_from_rows({"accuracy": rows, "invalid": [False] * 12}, corpus={"chrF": 42.0},
                              settings={"n": 12})
    assert isinstance(scores, TaskScores)
    assert scores.metrics["accuracy"] == statistics.fmean([float(v) for v in rows])
    assert scores.per_row["accuracy"][-2:] == [1.0, 0.0] and scores.metrics["invalid"] == 0.0
    assert scores.metrics["chrF"] == 42.0 and "chrF" not in scores.per_row
    assert scores.settings == {"n": 12} and "n" not in scores.metrics


def test_no_rows_score_zero_and_uneven_rows_are_an_error() -> None:
    assert mean([]) == 0.0
    assert scores_from_rows({"accuracy": []}).metrics == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="different lengths"):
        scores_from_rows({"a": [1.0], "b": [1.0, 0.0]})
