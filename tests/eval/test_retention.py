"""The retention matrix on hand-made scores: deltas from the base, own-task gain, other-task change."""

from __future__ import annotations

import pytest

from eval.retention import BASE, Cell, build_retention, perplexity_change

SCORES = {
    BASE: {"sql": 0.10, "detox": 20.0, "instruct": 0.30},
    "sql": {"sql": 0.60, "detox": 18.0, "instruct": 0.25},
    "detox": {"sql": 0.05, "detox": 40.0, "instruct": 0.30},
    "multitask": {"sql": 0.50, "detox": 35.0, "instruct": 0.35},
}
OWN = {"sql": ("sql",), "detox": ("detox",), "multitask": ("sql", "detox", "instruct")}
METRIC = {"sql": "execution_match", "detox": "chrf", "instruct": "rougeL"}


@pytest.fixture
def retention():
    return build_retention(SCORES, ("sql", "detox", "instruct"), OWN, METRIC)


def test_cells_hold_score_and_change_from_the_base(retention) -> None:
    assert retention.models == (BASE, "sql", "detox", "multitask")
    assert retention.cells[BASE]["sql"] == Cell(0.10, None)
    assert retention.cells["sql"]["sql"].delta == pytest.approx(0.50)
    assert retention.cells["sql"]["detox"].delta == pytest.approx(-2.0)
    assert retention.cells["detox"]["sql"].delta == pytest.approx(-0.05)


def test_row_summaries_split_own_and_other_tasks(retention) -> None:
    rows = {r.model: r for r in retention.rows}
    assert rows["sql"].own_gain == pytest.approx(0.50)
    assert rows["sql"].other_change == pytest.approx((-2.0 + -0.05) / 2)
    assert rows["detox"].own_gain == pytest.approx(20.0)
    assert rows["detox"].other_change == pytest.approx((-0.05 + 0.0) / 2)
    assert rows["multitask"].own_gain == pytest.approx((0.40 + 15.0 + 0.05) / 3)
    assert rows["multitask"].other_change is None  # it owns every task: nothing left to forget


def test_means_weigh_each_adapter_equally(retention) -> None:
    rows = {r.model: r for r in retention.rows}
    assert retention.mean_own_gain == pytest.approx(
        (rows["sql"].own_gain + rows["detox"].own_gain + rows["multitask"].own_gain) / 3)
    assert retention.mean_other_change == pytest.approx((rows["sql"].other_change + rows["detox"].other_change) / 2)


def test_missing_scores_give_no_delta_rather_than_zero() -> None:
    scores = {BASE: {"sql": 0.1}, "sql": {"sql": 0.4}}  # detox never scored
    ret = build_retention(scores, ("sql", "detox"), {"sql": ("sql",)}, {"sql": "em", "detox": "chrf"})
    assert ret.cells["sql"]["detox"] == Cell(None, None)
    assert ret.rows[0].other_change is None and ret.mean_other_change is None


def test_as_dict_is_plain_data(retention) -> None:
    data = retention.as_dict()
    assert data["cells"]["sql"]["detox"] == {"score": 18.0, "delta": pytest.approx(-2.0)}
    assert data["rows"][2]["own_tasks"] == ["sql", "detox", "instruct"]


def test_perplexity_change_is_relative_to_the_base() -> None:
    change = perplexity_change({BASE: {"story": 10.0}, "sql": {"story": 12.5}, "detox": {"story": 9.0}})
    assert change[BASE]["story"] is None
    assert change["sql"]["story"] == pytest.approx(0.25)
    assert change["detox"]["story"] == pytest.approx(-0.10)
