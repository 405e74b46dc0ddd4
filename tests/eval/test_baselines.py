"""eval.baselines: candidates from the training split only, chosen on training rows, answers from each row."""

from __future__ import annotations

import pandas as pd
import pytest

from eval.baselines import (
    answers,
    candidates,
    choose,
    first_sentence,
    first_table,
    kind_of,
    most_frequent,
    read_train,
)
from prep.registry import get_task


def test_kind_follows_the_primary_metric() -> None:
    assert kind_of("accuracy") == "label" and kind_of("execution_match") == "sql"
    assert kind_of("execution_accuracy") == "sql" and kind_of("rougeL") == "text" and kind_of("J") == "text"


def test_read_train_keeps_only_the_training_split(tmp_path) -> None:
    path = tmp_path / "train.csv"
    pd.DataFrame({"prompt": ["a", "b", "c"], "response": ["x", "y", "z"], "split": [0, 1, 0]}).to_csv(path)
    assert list(read_train(path)["response"]) == ["x", "z"]
    assert read_train(tmp_path / "missing.csv") is None


def test_majority_label_and_chance_come_from_train() -> None:
    train = pd.DataFrame({"response": ["B", "A", "B", "C"], "prompt": "q"})
    choice = choose("label", train, get_task("commonsense_qa"), lambda frame, preds: 0.0)
    assert choice.candidate.name == "majority answer 'B'" and choice.chance == pytest.approx(1 / 3)
    assert most_frequent(["b", "a", "a", "b"]) == "a"  # ties: alphabetical, deterministic
    assert choose("label", None, get_task("banking77"), lambda frame, preds: 0.0) is None


def test_sql_templates_use_the_rows_first_table() -> None:
    assert first_table("CREATE TABLE head (age INTEGER); CREATE TABLE dept (id INT)") == "head"
    assert first_table('CREATE TABLE "table 1" (a INT)') == '"table 1"'
    assert first_table("no tables") == ""
    test = pd.DataFrame({"prompt": ["p"], "response": ["SELECT 1"], "context": ["CREATE TABLE head (age INTEGER)"],
                         "question": ["q"]})
    found = candidates("sql", None)
    assert [answers(c, test, get_task("sql")) for c in found] == [["SELECT * FROM head"],
                                                                   ["SELECT COUNT(*) FROM head"]]


def test_text_candidates_copy_the_input_parsed_from_the_prompt() -> None:
    spec = get_task("samsum")
    dialogue = "Amanda: I baked cookies. Do you want some?\nJerry: Sure!"
    test = pd.DataFrame({"prompt": [spec.render_prompt({"dialogue": dialogue})], "response": ["summary"]})
    copy, first = candidates("text", None)
    assert answers(copy, test, spec) == [dialogue] and answers(first, test, spec) == ["Amanda: I baked cookies."]
    assert first_sentence("Hi! How are you?") == "Hi!"


def test_the_best_candidate_on_the_training_sample_wins() -> None:
    spec = get_task("sql")
    train = pd.DataFrame({"prompt": ["p"] * 4, "response": ["SELECT COUNT(*) FROM t"] * 4,
                          "context": ["CREATE TABLE t (a INT)"] * 4, "question": ["how many?"] * 4})

    def exact(frame: pd.DataFrame, predictions: list[str]) -> float:
        return sum(p == r for p, r in zip(predictions, frame["response"], strict=True)) / len(frame)

    choice = choose("sql", train, spec, exact)
    assert choice.candidate.name.startswith("SELECT COUNT(*)")
    assert choice.train_scores == {"SELECT * FROM <the row's first table>": 0.0,
                                   "SELECT COUNT(*) FROM <the row's first table>": 1.0}
    assert choice.train_rows == 4
