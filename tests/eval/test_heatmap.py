"""eval.heatmap: colours only significant changes, hatches the rest, ends with the trivial baseline row."""

from __future__ import annotations

import numpy as np
import pytest

from eval.heatmap import heatmap_columns, perplexity_colour, task_colour_scale, write_heatmap
from eval.retention import BASE, CellInput, ProbeInput, build_retention

ROWS = np.array([0.0, 1.0] * 50)


@pytest.fixture
def retention():
    better = ROWS.copy()
    better[::2] = 1.0  # every row right: +0.5
    inputs = {BASE: {"sql": CellInput(ROWS, (0.5,)), "detox": CellInput(ROWS, (0.5,))},
              "sql": {"sql": CellInput(better, (1.0,)), "detox": CellInput(ROWS, (0.5,))}}
    tokens = np.full(20, 10.0)
    probes = {BASE: {"story": ProbeInput(tokens * 2.0, tokens)}, "sql": {"story": ProbeInput(tokens * 2.1, tokens)}}
    return build_retention(inputs, ("sql", "detox"), {"sql": ("sql",)}, {"sql": "em", "detox": "em"},
                           baseline={"sql": np.zeros(100), "detox": np.zeros(100)}, probes=probes)


def test_columns_colour_significant_changes_and_hatch_the_rest(retention) -> None:
    columns = heatmap_columns(retention, {"sql": ["sql"]})
    sql, detox, story = columns
    assert sql["colours"] == [None, 1.0, None] and sql["hatched"] == [False, False, False]
    assert detox["hatched"] == [False, True, False] and detox["colours"][1] == 0.0
    assert sql["own"] == [False, True, False]
    assert sql["texts"][1].startswith("1.000 [1.000, 1.000]\n+0.500 [") and sql["texts"][2] == "0.000 [0.000, 0.000]"
    assert story["kind"] == "perplexity" and story["colours"][1] < 0 and not story["hatched"][1]
    assert task_colour_scale(retention) == 0.5


def test_perplexity_colour_is_log_scaled() -> None:
    assert perplexity_colour(3.0) == -1.0 and perplexity_colour(-0.75) == 1.0 and perplexity_colour(0.0) == 0.0
    assert perplexity_colour(None) is None


def test_write_heatmap_writes_a_png(retention, tmp_path) -> None:
    path = tmp_path / "retention.png"
    write_heatmap(retention, {"sql": ["sql"]}, "t", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_significant_change_that_stays_under_the_trivial_baseline_is_pale() -> None:
    """Green like learning, +0.5 on a task where a trivial answer scores 1.0 would read as learning: drawn pale."""
    better = ROWS.copy()
    better[::2] = 1.0
    inputs = {BASE: {"sql": CellInput(ROWS, (0.5,))}, "sql": {"sql": CellInput(better, (1.0,))}}
    under = build_retention(inputs, ("sql",), {"sql": ("sql",)}, {"sql": "em"}, baseline={"sql": np.ones(100)})
    above = build_retention(inputs, ("sql",), {"sql": ("sql",)}, {"sql": "em"}, baseline={"sql": np.zeros(100)})
    assert heatmap_columns(under, {"sql": ["sql"]})[0]["pale"] == [False, True, False]
    assert heatmap_columns(above, {"sql": ["sql"]})[0]["pale"] == [False, False, False]
