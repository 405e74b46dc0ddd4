"""eval.contamination: same split key within a task, same question across tasks, 13-word runs in probes."""

from __future__ import annotations

import json

import pandas as pd

from eval.contamination import check_source, normalise, probe_overlap, training_data
from prep.registry import TASKS, get_task


def sql_rows(questions: list[str], context: str = "CREATE TABLE head (age INTEGER)") -> pd.DataFrame:
    spec = get_task("sql")
    return pd.DataFrame({"prompt": [spec.render_prompt({"context": context, "question": q}) for q in questions],
                         "response": "SELECT 1", "task": "sql", "question": questions, "context": context})


def test_normalise_ignores_case_spacing_and_punctuation() -> None:
    assert normalise("How many heads are older than 56 ?") == normalise("how many  heads are older than 56?")


def test_same_task_uses_the_split_key_and_other_tasks_the_question() -> None:
    train = sql_rows(["How old is the head?", "Who leads?"])
    tests = {"sql": sql_rows(["how old is the head ?", "How old is the head?"], context="CREATE TABLE x (a INT)"),
             "spider": sql_rows(["Who leads ?", "Nobody asked this"]).assign(task="spider")}
    found = {o.target: o for o in check_source("model sql", train, TASKS, tests, {}, models=("sql",))}
    assert found["sql"].rows == ()  # same question over other tables: not the same split key
    assert found["spider"].rows == (0,) and found["spider"].total == 2 and found["spider"].models == ("sql",)


def test_probe_texts_sharing_thirteen_words_with_training_text_are_flagged() -> None:
    sentence = "the quick brown fox jumps over the lazy dog while the farmer watches from the old barn"
    probe = [f"A story. {sentence.upper()}!", "Entirely different words appear in this other paragraph here."]
    assert probe_overlap([f"prefix {sentence} suffix"], probe) == (0,)
    assert probe_overlap([" ".join(sentence.split()[:12])], probe) == ()  # 12 words are not enough


def test_training_data_follows_description_json(tmp_path) -> None:
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    assert training_data(model) is None
    data = tmp_path / "train.csv"
    data.write_text("prompt,response\n")
    (model.parent / "description.json").write_text(json.dumps({"dataset": str(data)}))
    assert training_data(model) == data


def test_a_relative_dataset_is_found_from_the_folder_ludwig_ran_in(tmp_path) -> None:
    model = tmp_path / "results" / "sql" / "experiment_run" / "model"  # ran in tmp_path, --output_directory results/sql
    model.mkdir(parents=True)
    (tmp_path / "train_small.csv").write_text("prompt,response\n")
    (model.parent / "description.json").write_text(json.dumps({
        "dataset": "train_small.csv",
        "command": "ludwig train --dataset train_small.csv --output_directory results/sql --random_seed 42"}))
    assert training_data(model) == tmp_path.resolve() / "train_small.csv"
