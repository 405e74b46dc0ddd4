"""prep.common: readers, one-line errors, deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prep.common import (
    TEST,
    TRAIN,
    VALIDATION,
    PrepError,
    SourceRow,
    hash_split,
    limit_rows,
    read_records,
    require_text,
    split_quotas,
)


def test_hash_split_is_deterministic_and_close_to_requested_fractions() -> None:
    keys = [f"question {i}" for i in range(4000)]
    first = [hash_split(k, test_fraction=0.1, validation_fraction=0.05, salt="t") for k in keys]
    assert first == [hash_split(k, test_fraction=0.1, validation_fraction=0.05, salt="t") for k in keys]
    share = {s: first.count(s) / len(keys) for s in (TRAIN, VALIDATION, TEST)}
    assert abs(share[TEST] - 0.10) < 0.02 and abs(share[VALIDATION] - 0.05) < 0.015


def test_hash_split_depends_on_salt() -> None:
    keys = [str(i) for i in range(200)]
    a = [hash_split(k, test_fraction=0.5, validation_fraction=0.0, salt="a") for k in keys]
    b = [hash_split(k, test_fraction=0.5, validation_fraction=0.0, salt="b") for k in keys]
    assert a != b


def test_json_list_and_datasets_server_page_read_the_same(tmp_path: Path) -> None:
    rows = [{"question": "q", "context": "c", "answer": "a"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "page.json").write_text(json.dumps({"rows": [{"row_idx": 0, "row": rows[0]}]}))
    assert [r.data for r in read_records(tmp_path / "list.json")] == rows
    assert [r.data for r in read_records(tmp_path / "page.json")] == rows


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", b'{"a": 1}\n{"a": \n', r"bad.jsonl: row 2: invalid JSON"),
        ("bad.json", b'[{"a": 1},', r"bad.json: line 1: invalid JSON"),
        ("latin1.jsonl", '{"a": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl: line 1: not valid UTF-8"),
        ("ragged.csv", b'a,b\n1,2\n1,2,3\n', r"ragged.csv: row 3: 3 cells, header has 2"),
        ("scalar.json", b'[1, 2]', r"scalar.json: row 1: expected a JSON object"),
        ("data.xml", b'<a/>', r"data.xml: unknown file type"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_row(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PrepError, match=expected) as info:
        read_records(path)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="file not found"):
        read_records(tmp_path / "nope.json")


def test_require_text_names_missing_and_empty_fields() -> None:
    row = SourceRow({"question": "  ", "context": "x"}, "f.json: row 7")
    with pytest.raises(PrepError, match=r"f.json: row 7: missing field 'answer' \(fields present: context, question\)"):
        require_text(row, "answer")
    with pytest.raises(PrepError, match=r"f.json: row 7: empty field 'question'"):
        require_text(row, "question")
    assert require_text(row, "context") == "x"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", b"", r"empty.csv: empty file. Fix: pass the file that holds the data"),
        ("blank.jsonl", b"\n  \n", r"blank.jsonl: empty file"),
        ("header.csv", b"text,label\n", r"header.csv: header row only, no data rows. Fix: pass the file that holds"),
        ("header.tsv", b"toxic\tneutral1\n", r"header.tsv: header row only, no data rows"),
        ("none.json", b"[]", r"none.json: no records"),
    ],
)
def test_files_without_data_rows_are_refused(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PrepError, match=expected) as info:
        read_records(path)
    assert "\n" not in str(info.value)


def test_split_quotas_share_max_rows_in_proportion_and_keep_every_split() -> None:
    assert split_quotas({"train": 10003, "test": 3080}, 1000) == {"train": 765, "test": 235}
    assert split_quotas({"train": 900, "validation": 50, "test": 50}, 20) == {"train": 18, "validation": 1, "test": 1}
    assert split_quotas({"train": 1000, "test": 2}, 10) == {"train": 9, "test": 1}  # a tiny split keeps one row
    assert split_quotas({"train": 5, "test": 2}, 10) == {"train": 5, "test": 2}  # fewer rows than asked: all
    assert sum(split_quotas({"a": 7, "b": 11, "c": 13}, 17).values()) == 17


def test_limit_rows_takes_the_first_rows_of_each_split_in_source_order() -> None:
    rows = [SourceRow({"i": i}, f"f: row {i}", split="train" if i < 8 else "test") for i in range(10)]
    kept, read = limit_rows(rows, 5)
    assert [r.data["i"] for r in kept] == [0, 1, 2, 3, 8]
    assert (read.read, read.available) == ({"train": 4, "test": 1}, {"train": 8, "test": 2})
    assert read.describe() == "4 of 8 train, 1 of 2 test rows"
    untagged = [SourceRow({"i": i}, f"f: row {i}") for i in range(10)]
    assert [r.data["i"] for r in limit_rows(untagged, 3)[0]] == [0, 1, 2]
    assert limit_rows(untagged, None)[0] == untagged
