"""Every dataset module on files in its published format: counts, determinism, leak-free splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prep import registry
from prep.common import PrepError
from prep.registry import get_task
from prep.task import prepare
from tests.prep.published_fixtures import WRITERS

TASKS = sorted(WRITERS)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


@pytest.mark.parametrize("task", TASKS)
def test_prepares_published_files_deterministically_without_leakage(task: str, tmp_path: Path) -> None:
    source = WRITERS[task](tmp_path / "src")
    first = prepare(get_task(task), str(source), tmp_path / "a")
    prepare(get_task(task), str(source), tmp_path / "b")
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "a" / task / name).read_bytes() == (tmp_path / "b" / task / name).read_bytes()
    train, test = read(tmp_path / "a" / task / "train.csv"), read(tmp_path / "a" / task / "test.csv")
    assert len(test) > 0 and first.rows_out["test"] == len(test)
    assert not set(train["prompt"]) & set(test["prompt"])  # no held-out prompt is trained on
    assert (train["task"] == task).all() and (test["task"] == task).all()
    header = get_task(task).template.split("{")[0]  # "### Task: ..." for every task but the plain-text replay
    assert all(p.startswith(header) for p in pd.concat([train, test])["prompt"])


def test_official_splits_are_kept(tmp_path: Path) -> None:
    prepare(get_task("banking77"), str(WRITERS["banking77"](tmp_path / "b")), tmp_path / "out")
    assert len(read(tmp_path / "out/banking77/test.csv")) == 4  # exactly the official test.csv
    prepare(get_task("samsum"), str(WRITERS["samsum"](tmp_path / "s")), tmp_path / "out")
    samsum_train = read(tmp_path / "out/samsum/train.csv")
    assert (samsum_train["split"] == 1).sum() >= 3 and len(read(tmp_path / "out/samsum/test.csv")) == 4
    prepare(get_task("commonsense_qa"), str(WRITERS["commonsense_qa"](tmp_path / "c")), tmp_path / "out")
    assert read(tmp_path / "out/commonsense_qa/test.csv")["prompt"].str.contains("fix a thing").all()


def test_paradetox_keeps_all_rewrites_of_a_test_sentence_together(tmp_path: Path) -> None:
    prepare(get_task("detox"), str(WRITERS["detox"](tmp_path / "src", n=200)), tmp_path / "out")
    train, test = read(tmp_path / "out/detox/train.csv"), read(tmp_path / "out/detox/test.csv")
    assert not set(train["source"]) & set(test["source"])
    assert test["source"].is_unique
    refs = test["references"].map(json.loads)
    assert (refs.map(len) >= 1).all() and any(len(r) == 2 for r in refs)
    assert all(row.response in r for row, r in zip(test.itertuples(), refs, strict=True))


def test_gpteacher_drops_duplicate_instructions(tmp_path: Path) -> None:
    report = prepare(get_task("instruct"), str(WRITERS["instruct"](tmp_path / "src")), tmp_path / "out")
    assert report.dropped == {"duplicate of an earlier row": 1}


def test_spider_is_eval_only_and_keeps_the_database(tmp_path: Path) -> None:
    prepare(get_task("spider"), str(WRITERS["spider"](tmp_path / "src")), tmp_path / "out")
    assert len(read(tmp_path / "out/spider/train.csv")) == 0
    test = read(tmp_path / "out/spider/test.csv")
    assert len(test) == 6 and set(test["db_id"]) == {"concert"} and set(test["has_database"]) == {"yes"}
    assert test["context"].iloc[0] == "CREATE TABLE singer (Name VARCHAR, Age INTEGER)"


@pytest.mark.parametrize(
    ("task", "filename", "content", "expected"),
    [
        ("banking77", "train.csv", "text,category\nhello,not_an_intent\n", r"train.csv: row 2: unknown intent 'not_an_intent'"),
        ("banking77", "train.csv", "words,category\nhello,card_arrival\n", r"train.csv: row 2: missing field 'text'"),
        ("detox", "paradetox.tsv", 'toxic\tneutral1\n"unclosed\tx\n', r"paradetox.tsv: row \d+: unparseable TSV"),
        ("detox", "paradetox.tsv", "toxic\tother\nbad\tx\n", r"paradetox.tsv: row 2: missing field 'neutral1'"),
        ("commonsense_qa", "train_rand_split.jsonl", '{"answerKey": "Z", "question": {"stem": "q", "choices": '
         + json.dumps([{"label": l, "text": l} for l in "ABCDE"]) + "}}\n", r"row 1: unknown answer label 'Z'"),
        ("lamini_docs", "lamini_docs.jsonl", '{"question": "q"}\n', r"lamini_docs.jsonl: row 1: missing field 'answer'"),
        ("samsum", "train.jsonl", "\xff\xfe{}\n", r"train.jsonl: line 1: not valid UTF-8"),
    ],
)
def test_bad_input_stops_with_one_line(task: str, filename: str, content: str, expected: str, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / filename).write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
    with pytest.raises(PrepError, match=expected) as info:
        prepare(get_task(task), str(folder), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_empty_fields_are_dropped_and_counted_or_stop_when_strict(tmp_path: Path) -> None:
    src = tmp_path / "lamini_docs.jsonl"
    rows = ['{"question": " ", "answer": "a0"}', *(f'{{"question": "q{i}", "answer": "a{i}"}}' for i in range(1, 60))]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = prepare(get_task("lamini_docs"), str(src), tmp_path / "out")
    assert report.dropped == {"empty field 'question'": 1} and sum(report.rows_out.values()) == 59
    with pytest.raises(PrepError, match=r"lamini_docs.jsonl: row 1: empty field 'question'"):
        prepare(get_task("lamini_docs"), str(src), tmp_path / "strict", strict=True)


def test_every_builtin_task_has_a_source_folder_name() -> None:
    source_folders = {name: spec.source_folder for name, spec in registry.TASKS.items() if spec.source_folder}
    assert set(source_folders) == set(WRITERS)
    assert source_folders["instruct"] == "gpteacher" and source_folders["sql"] == "sql_create_context"
