"""The retention matrix on hand-made rows: changes with paired intervals, baselines, joint summaries, BH, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.retention import (
    BASE,
    CellInput,
    ProbeInput,
    build_retention,
    disagreement,
    seed_spread,
)
from eval.stats import Estimate

N = 200
RNG = np.random.default_rng(0)
BASE_SQL = (RNG.random(N) < 0.10).astype(float)
BASE_DETOX = RNG.random(N) * 0.4
BASE_INSTRUCT = (RNG.random(N) < 0.30).astype(float)


def cell(rows: np.ndarray, **metrics: float) -> CellInput:
    return CellInput(rows, (float(rows.mean()),), metrics)


def improved(rows: np.ndarray, share: float) -> np.ndarray:
    """Rows with the first ``share`` of the zero rows set to 1 (a consistent gain)."""
    out = rows.copy()
    zeros = np.flatnonzero(rows == 0)
    out[zeros[:int(len(zeros) * share)]] = 1.0
    return out


INPUTS = {
    BASE: {"sql": cell(BASE_SQL), "detox": cell(BASE_DETOX), "instruct": cell(BASE_INSTRUCT)},
    "sql": {"sql": cell(improved(BASE_SQL, 0.5)), "detox": cell(BASE_DETOX * 0.5),
            "instruct": cell(BASE_INSTRUCT)},
    "detox": {"sql": cell(BASE_SQL), "detox": cell(BASE_DETOX + 0.3), "instruct": cell(BASE_INSTRUCT)},
    "multitask": {"sql": cell(improved(BASE_SQL, 0.4)), "detox": cell(BASE_DETOX + 0.2),
                  "instruct": cell(improved(BASE_INSTRUCT, 0.1))},
}
OWN = {"sql": ("sql",), "detox": ("detox",), "multitask": ("sql", "detox", "instruct")}
METRIC = {"sql": "execution_match", "detox": "J", "instruct": "rougeL"}
TASKS = ("sql", "detox", "instruct")


@pytest.fixture(scope="module")
def retention():
    floor = {"sql": np.zeros(N), "detox": np.full(N, 0.1), "instruct": BASE_INSTRUCT.copy()}
    return build_retention(INPUTS, TASKS, OWN, METRIC, baseline=floor)


def test_cells_hold_scores_and_paired_changes_with_intervals(retention) -> None:
    assert retention.models == (BASE, "sql", "detox", "multitask")
    base_sql = retention.cells[BASE]["sql"]
    assert base_sql.score.value == pytest.approx(BASE_SQL.mean()) and base_sql.delta is None
    assert base_sql.score.low < base_sql.score.value < base_sql.score.high and base_sql.score.n == N
    gain = retention.cells["sql"]["sql"].delta
    assert gain.value == pytest.approx(improved(BASE_SQL, 0.5).mean() - BASE_SQL.mean())
    assert gain.low > 0 and retention.cells["sql"]["sql"].significant
    same = retention.cells["detox"]["sql"]
    assert (same.delta.value, same.delta.low, same.delta.high) == (0.0, 0.0, 0.0) and same.significant is False
    assert retention.cells["sql"]["detox"].delta.high < 0  # halved J: a significant loss


def test_every_change_is_one_test_and_bh_adjusts_them(retention) -> None:
    assert retention.tests == 3 * 3  # three adapters x three tasks, no probes
    q = [c.q_value for m in ("sql", "detox", "multitask") for c in retention.cells[m].values()]
    p = [c.delta.p_value for m in ("sql", "detox", "multitask") for c in retention.cells[m].values()]
    assert all(qi >= pi for qi, pi in zip(q, p, strict=True))
    assert retention.cells[BASE]["sql"].q_value is None


def test_row_summaries_split_own_and_other_tasks_with_joint_intervals(retention) -> None:
    rows = {r.model: r for r in retention.rows}
    cells = retention.cells
    assert rows["sql"].own_gain.value == pytest.approx(cells["sql"]["sql"].delta.value)
    assert rows["sql"].other_change.value == pytest.approx(
        (cells["sql"]["detox"].delta.value + cells["sql"]["instruct"].delta.value) / 2)
    assert rows["sql"].other_change.high < 0
    assert rows["multitask"].own_gain.value == pytest.approx(
        np.mean([cells["multitask"][t].delta.value for t in TASKS]))
    assert rows["multitask"].other_change is None  # it owns every task: nothing left to forget
    assert rows["detox"].other_change.value == 0.0 and rows["detox"].other_change.includes_zero()


def test_means_weigh_each_adapter_equally_and_carry_an_interval(retention) -> None:
    rows = {r.model: r for r in retention.rows}
    assert retention.mean_own_gain.value == pytest.approx(np.mean([r.own_gain.value for r in rows.values()]))
    assert retention.mean_other_change.value == pytest.approx(
        (rows["sql"].other_change.value + rows["detox"].other_change.value) / 2)
    assert retention.mean_own_gain.low > 0 and retention.mean_other_change.has_interval


def test_baseline_row_flags_cells_and_names_tasks_at_the_floor(retention) -> None:
    assert retention.baseline["sql"].value == 0.0 and retention.baseline["detox"].value == pytest.approx(0.1)
    assert retention.cells[BASE]["sql"].beats_baseline is True
    # instruct's baseline scores exactly like the base: the base cannot lose what it never had above trivial
    assert retention.cells[BASE]["instruct"].beats_baseline is False
    assert "instruct" in retention.floor_tasks and "sql" not in retention.floor_tasks
    assert retention.cells["sql"]["detox"].beats_baseline is False  # halved J: about the constant 0.1
    assert retention.cells["detox"]["detox"].beats_baseline is True


def test_missing_rows_give_no_interval_and_missing_scores_no_delta() -> None:
    inputs = {BASE: {"sql": CellInput(None, (0.1,))}, "sql": {"sql": CellInput(None, (0.4,))}}
    ret = build_retention(inputs, ("sql", "detox"), {"sql": ("sql",)}, {"sql": "em", "detox": "chrf"})
    assert ret.cells["sql"]["sql"].delta.value == pytest.approx(0.3) and not ret.cells["sql"]["sql"].delta.has_interval
    assert ret.cells["sql"]["sql"].significant is False
    assert ret.cells["sql"]["detox"].score is None and ret.cells["sql"]["detox"].delta is None
    assert ret.rows[0].other_change is None and ret.mean_other_change is None
    assert ret.rows[0].own_gain.value == pytest.approx(0.3) and not ret.rows[0].own_gain.has_interval


def test_metrics_that_disagree_in_sign_are_named() -> None:
    assert disagreement({"rougeL": 0.30, "chrF": 11.3}, {"rougeL": 0.23, "chrF": 16.8}) == "rougeL ↑ chrF ↓"
    assert disagreement({"rougeL": 0.30, "chrF": 17.0}, {"rougeL": 0.23, "chrF": 16.8}) is None
    assert disagreement({"rougeL": 0.30, "BLEU": 0.04}, {"rougeL": 0.23, "BLEU": 0.08}) is None  # 0.04 of 100
    # fewer invalid answers is better: accuracy up and invalid down agree
    assert disagreement({"accuracy": 0.5, "invalid": 0.1}, {"accuracy": 0.4, "invalid": 0.3}) is None
    assert disagreement({"accuracy": 0.5, "invalid": 0.5}, {"accuracy": 0.4, "invalid": 0.3}) == \
        "accuracy ↑ invalid ↓"


def test_a_metric_with_rows_moves_only_when_its_paired_interval_excludes_zero() -> None:
    noisy = Estimate(0.01, -0.02, 0.04, 200, 0.5)
    clear = Estimate(-0.05, -0.08, -0.02, 200, 0.001)
    reference = {"rougeL": 0.23, "exact_match": 0.10}
    assert disagreement({"rougeL": 0.30, "exact_match": 0.11}, reference, {"exact_match": noisy}) is None
    assert disagreement({"rougeL": 0.30, "exact_match": 0.05}, reference, {"exact_match": clear}) == \
        "rougeL ↑ exact_match ↓"


def test_disagreement_reaches_the_cell() -> None:
    inputs = {BASE: {"samsum": cell(BASE_DETOX, rougeL=0.23, chrF=16.8)},
              "banking77": {"samsum": cell(BASE_DETOX + 0.07, rougeL=0.30, chrF=11.3)}}
    ret = build_retention(inputs, ("samsum",), {"banking77": ("banking77",)}, {"samsum": "rougeL"})
    assert ret.cells["banking77"]["samsum"].disagreement == "rougeL ↑ chrF ↓"


def test_seed_spread_and_the_repeat_claim() -> None:
    assert seed_spread([0.50, 0.515, 0.485]).repeats
    assert seed_spread([0.005, 0.0]).repeats  # two points on the 0-1 scale, not a share of a near-zero mean
    wide = seed_spread([0.40, 0.50])
    assert not wide.repeats and wide.spread == pytest.approx(0.10) and wide.max_deviation == pytest.approx(0.05)
    inputs = {BASE: {"sql": cell(BASE_SQL)},
              "sql": {"sql": CellInput(improved(BASE_SQL, 0.5), (0.52, 0.56))}}
    ret = build_retention(inputs, ("sql",), {"sql": ("sql",)}, {"sql": "em"})
    assert ret.seeds["sql"]["sql"].values == (0.52, 0.56) and ret.repeats("sql") is False
    assert ret.repeats(BASE) is None


def test_perplexity_cells_are_tested_with_the_tasks() -> None:
    tokens = np.full(50, 20.0)
    base_nll = np.random.default_rng(1).random(50) * 10 + 30
    probes = {BASE: {"general": ProbeInput(base_nll, tokens)},
              "sql": {"general": ProbeInput(base_nll * 1.2, tokens)}}
    ret = build_retention(INPUTS, TASKS, {"sql": ("sql",)}, METRIC, probes=probes)
    change = ret.perplexity["sql"]["general"]
    assert change.delta.value == pytest.approx(np.exp(base_nll.sum() * 1.2 / 1000) / np.exp(base_nll.sum() / 1000) - 1)
    assert change.significant and ret.tests == 3 + 1 and ret.probes == ("general",)
    assert ret.perplexity[BASE]["general"].score.n == 50


def test_as_dict_is_plain_json(retention) -> None:
    data = json.loads(json.dumps(retention.as_dict()))
    assert data["cells"]["sql"]["sql"]["delta"]["value"] == pytest.approx(retention.cells["sql"]["sql"].delta.value)
    assert data["cells"]["sql"]["sql"]["significant"] is True
    assert data["rows"][2]["own_tasks"] == ["sql", "detox", "instruct"]
    assert data["floor_tasks"] == ["instruct"] and data["tests"] == 9
