"""eval.scoring: score_task dispatches every registered task to its metrics; missing resources are clear errors."""

from __future__ import annotations

import io
import json
import sqlite3
import statistics
from pathlib import Path

import pandas as pd
import pytest

from eval.scoring import (
    PRIMARY_METRIC,
    SCORERS,
    EvalResources,
    TaskScores,
    primary_metric,
    score_task,
    training_labels,
)
from ludwig_mt.errors import WorkflowError
from prep.registry import TASKS
from tests.eval.test_detox import write_prepared_detox

SINGER_CTX = "CREATE TABLE singer (name VARCHAR, age INTEGER)"


def as_test_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """Round-trip through CSV exactly as the runner reads test.csv."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)), keep_default_na=False, dtype=str)


def build_spider(root: Path) -> Path:
    """A Spider-shaped folder with one real database: database/concert/concert.sqlite."""
    db = root / "database" / "concert" / "concert.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.executescript(SINGER_CTX + "; INSERT INTO singer VALUES ('Ann', 41), ('Bob', 25), ('Cy', 33);")
    conn.close()
    return root


def example_test(task: str, prepared: Path) -> pd.DataFrame:
    """A small test.csv for ``task`` with the columns prep writes for it."""
    if task == "detox":
        return as_test_csv(pd.read_csv(prepared / "detox" / "test.csv", dtype=str))
    if task == "sql":
        return as_test_csv(pd.DataFrame({"response": ["SELECT name FROM singer", "SELECT count(*) FROM singer"],
                                         "context": [SINGER_CTX] * 2, "question": ["names?", "how many?"]}))
    if task == "spider":
        return as_test_csv(pd.DataFrame({"response": ["SELECT name FROM singer WHERE age > 30"] * 2,
                                         "context": [SINGER_CTX] * 2, "question": ["old singers?"] * 2,
                                         "db_id": ["concert", "not_downloaded"], "has_database": ["yes", "no"]}))
    if task == "banking77":
        return as_test_csv(pd.DataFrame({"response": ["card_arrival", "Refund_not_showing_up", "age_limit"],
                                         "text": ["where is my card", "no refund yet", "how old must I be"]}))
    if task == "commonsense_qa":
        return as_test_csv(pd.DataFrame({"response": ["A", "C", "E"]}))
    if task in TASKS and TASKS[task].scorer == "labels":  # the shipped claims spec (metric: accuracy)
        return as_test_csv(pd.DataFrame({"response": ["Claim", "Not a Claim", "Claim"]}))
    return as_test_csv(pd.DataFrame({"prompt": ["p1", "p2"],
                                     "response": ["The meeting moved to Friday.", "Claim"]}))


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> EvalResources:
    root = tmp_path_factory.mktemp("eval")
    prepared = write_prepared_detox(root / "prepared")
    for task in (name for name, spec in TASKS.items() if spec.scorer == "labels"):
        write_label_train(prepared / task, ["Claim", "Not a Claim", "Claim"], [0, 0, 1])
    return EvalResources(work_dir=root / "work", prepared_dir=prepared, spider_dir=build_spider(root / "spider"))


def write_label_train(folder: Path, responses: list[str], splits: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt": [f"p{i}" for i in range(len(responses))], "response": responses,
                  "split": splits}).to_csv(folder / "train.csv", index=False)
    return folder / "train.csv"


def test_every_registered_task_has_a_primary_metric() -> None:
    assert set(PRIMARY_METRIC) == set(TASKS)
    assert PRIMARY_METRIC["sql"] == "execution_match" and PRIMARY_METRIC["spider"] == "execution_accuracy"
    assert PRIMARY_METRIC["detox"] == "J" and PRIMARY_METRIC["banking77"] == "accuracy"
    assert primary_metric("a_task_nobody_registered") == "rougeL"
    assert {spec.scorer for spec in TASKS.values()} <= set(SCORERS)  # every record names a scorer that exists


def test_a_record_with_an_unknown_scorer_kind_is_one_clear_error(resources: EvalResources,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from prep import registry

    monkeypatch.setitem(registry.TASKS, "instruct", replace(registry.TASKS["instruct"], scorer="bleurt"))
    test = example_test("instruct", resources.prepared_dir)
    with pytest.raises(WorkflowError, match="instruct: scorer 'bleurt' is unknown. Fix: .*text") as err:
        score_task("instruct", test, list(test["response"]), resources)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_score_task_for_every_registered_task(task: str, resources: EvalResources) -> None:
    test = example_test(task, resources.prepared_dir)
    metric = PRIMARY_METRIC[task]
    oracle = score_task(task, test, list(test["response"]), resources)
    empty = score_task(task, test, [""] * len(test), resources)
    for scores in (oracle, empty):
        assert isinstance(scores, TaskScores)
        assert scores.settings["n"] == len(test) and "n" not in scores.metrics
        assert metric in scores.per_row  # the primary metric always has per-row values
        for name, values in scores.per_row.items():  # the contract: metric == mean of its per-row values
            assert len(values) == len(test) and scores.metrics[name] == statistics.fmean(values)
    assert empty.metrics[metric] == 0.0
    if task == "detox":  # J = STA x SIM, and a rewrite is never identical in meaning-embedding to its source
        assert oracle.metrics["STA"] == 1.0 and 0.5 < oracle.metrics[metric] < 1.0
    else:
        assert oracle.metrics[metric] == pytest.approx(1.0)


def test_custom_and_unknown_tasks_get_the_free_text_default(resources: EvalResources) -> None:
    test = example_test("my_new_task", resources.prepared_dir)
    scores = score_task("my_new_task", test, ["the meeting moved to friday.", "Not a claim"], resources)
    assert set(scores.metrics) == {"rougeL", "chrF", "exact_match"} and set(scores.per_row) == {"rougeL", "exact_match"}
    assert scores.per_row["exact_match"] == [1.0, 0.0]


def test_spider_runs_on_the_real_database_and_falls_back_to_context(resources: EvalResources) -> None:
    test = example_test("spider", resources.prepared_dir)
    wrong_filter = ["SELECT name FROM singer WHERE age > 99"] * 2  # no rows: once equalled the gold on empty tables
    scores = score_task("spider", test, wrong_filter, resources)
    assert scores.settings["n_real_db"] == 1 and "n_real_db" not in scores.metrics
    assert scores.per_row["execution_accuracy"] == [0.0, 0.0]  # wrong on the real DB and on synthesised ones
    right = score_task("spider", test, ["SELECT name FROM singer WHERE 30 < age"] * 2, resources)
    assert right.per_row["execution_accuracy"] == [1.0, 1.0]


def test_sql_and_spider_never_count_empty_or_junk_as_executing(resources: EvalResources) -> None:
    for task in ("sql", "spider"):
        test = example_test(task, resources.prepared_dir)
        for junk in ("", "-- just a comment", "I cannot answer that"):
            scores = score_task(task, test, [junk] * len(test), resources)
            assert scores.metrics["executes"] == 0.0 and scores.metrics["exact_match"] == 0.0


def test_wrong_number_of_predictions_is_one_clear_error(resources: EvalResources) -> None:
    test = example_test("instruct", resources.prepared_dir)
    with pytest.raises(WorkflowError, match="1 predictions for 2 test rows"):
        score_task("instruct", test, ["only one"], resources)


def test_missing_resources_say_what_to_pass(tmp_path: Path, resources: EvalResources) -> None:
    bare = EvalResources(work_dir=tmp_path)
    detox = example_test("detox", resources.prepared_dir)
    with pytest.raises(WorkflowError, match="pass prepared_dir"):
        score_task("detox", detox, ["x"] * len(detox), bare)
    with pytest.raises(WorkflowError, match="pass spider_dir"):
        score_task("spider", example_test("spider", resources.prepared_dir), ["SELECT 1"] * 2, bare)
    with pytest.raises(WorkflowError, match="pass spider_dir"):
        score_task("spider", example_test("spider", resources.prepared_dir), ["SELECT 1"] * 2,
                   EvalResources(work_dir=tmp_path, spider_dir=tmp_path / "nowhere"))
    with pytest.raises(WorkflowError, match="no 'context' column"):
        score_task("sql", pd.DataFrame({"response": ["SELECT 1"]}), ["SELECT 1"], bare)


def test_detox_references_column_is_multi_reference(resources: EvalResources) -> None:
    test = example_test("detox", resources.prepared_dir)
    second_refs = [json.loads(r)[1] for r in test["references"]]  # predictions equal to the 2nd reference only
    scores = score_task("detox", test, second_refs, resources)
    assert scores.metrics["BLEU"] == pytest.approx(100.0) and scores.metrics["chrF"] == pytest.approx(100.0)
    assert scores.settings["J_includes_fluency"] is False and "J_includes_fluency" not in scores.metrics
    assert 0.5 <= scores.settings["classifier_heldout_accuracy"] <= 1.0


def test_training_labels_are_the_train_splits_responses_once_each_plus_unseen_test_labels(tmp_path: Path) -> None:
    train = write_label_train(tmp_path / "t", ["yes", "no", "Yes ", "yes", "maybe"], [0, 0, 0, 0, 1])
    # "Yes " is "yes" after normalisation (one label, its most frequent spelling); "maybe" is validation only
    assert training_labels(train, ["no", "never"]) == (["yes", "no", "never"], 1)
    with pytest.raises(WorkflowError, match=r"train.csv: not found; its training responses are the task's labels"):
        training_labels(tmp_path / "none" / "train.csv", [])


def test_a_spec_task_with_metric_accuracy_is_scored_by_exact_match_over_its_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from prep import registry

    monkeypatch.setitem(registry.TASKS, "stance", replace(registry.TASKS["claims"], name="stance"))
    write_label_train(tmp_path / "stance", ["agree", "disagree", "agree"], [0, 0, 0])
    test = as_test_csv(pd.DataFrame({"response": ["agree", "disagree", "agree", "disagree"]}))
    resources = EvalResources(work_dir=tmp_path / "work", prepared_dir=tmp_path)
    scores = score_task("stance", test, ["agree", "Disagree.\nbecause", "disagree", "I think so"], resources)
    assert PRIMARY_METRIC["stance"] == "accuracy"
    assert scores.per_row["accuracy"] == [1.0, 1.0, 0.0, 0.0] and scores.per_row["invalid"] == [0, 0, 0, 1]
    assert scores.settings == {"n": 4, "labels": 2, "test_labels_unseen_in_training": 0}
