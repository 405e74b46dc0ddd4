"""prep for sql-create-context: published formats, template, leak-free deterministic split, report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prep.__main__ import main as prep_main
from prep.common import PrepError
from prep.registry import get_task
from prep.sql_create_context import TEMPLATE
from prep.task import prepare
from workflow.samples import sql_rows

SQL = get_task("sql")


def write_v4_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_v4_json_and_jsonl_give_identical_csvs(tmp_path: Path) -> None:
    rows = sql_rows(80)
    json_src = write_v4_json(tmp_path / "sql_create_context_v4.json", rows)
    jsonl_src = tmp_path / "rows.jsonl"
    jsonl_src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prepare(SQL, str(json_src), tmp_path / "a")
    prepare(SQL, str(jsonl_src), tmp_path / "b")
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "a/sql" / name).read_bytes() == (tmp_path / "b/sql" / name).read_bytes()


def test_folder_with_published_file_is_accepted(tmp_path: Path) -> None:
    write_v4_json(tmp_path / "sql_create_context_v4.json", sql_rows(20))
    report = prepare(SQL, str(tmp_path), tmp_path / "out")
    assert report.rows_in == 20


def test_rerun_is_byte_identical_and_split_has_no_leakage(tmp_path: Path) -> None:
    src = write_v4_json(tmp_path / "v4.json", sql_rows(300))
    prepare(SQL, str(src), tmp_path / "one")
    prepare(SQL, str(src), tmp_path / "two")
    for name in ("train.csv", "test.csv", "report.json"):
        one, two = (tmp_path / "one/sql" / name).read_text(), (tmp_path / "two/sql" / name).read_text()
        if name == "report.json":  # seconds and paths differ by design
            one, two = (json.loads(x)["rows_out"] for x in (one, two))
        assert one == two
    train = pd.read_csv(tmp_path / "one/sql/train.csv", keep_default_na=False)
    test = pd.read_csv(tmp_path / "one/sql/test.csv", keep_default_na=False)
    assert len(test) > 0 and set(train["split"]) <= {0, 1}
    keys = lambda df: set(zip(df["question"].str.lower(), df["context"].str.lower()))  # noqa: E731
    assert not keys(train) & keys(test)


def test_prompt_uses_the_template_and_keeps_eval_columns(tmp_path: Path) -> None:
    row = {"question": "How many singers are there?", "context": "CREATE TABLE singer (name VARCHAR)",
           "answer": "SELECT COUNT(*) FROM singer"}
    prepare(SQL, str(write_v4_json(tmp_path / "v4.json", [row, *sql_rows(40)])), tmp_path / "out")
    frames = [pd.read_csv(tmp_path / "out/sql" / n, keep_default_na=False) for n in ("train.csv", "test.csv")]
    both = pd.concat(frames)
    out = both[both["question"] == row["question"]].iloc[0]
    assert out["prompt"] == TEMPLATE.format(question=row["question"], context=row["context"])
    assert (out["response"], out["question"], out["context"], out["task"]) == (
        row["answer"], row["question"], row["context"], "sql")


def test_duplicates_are_dropped_and_reported(tmp_path: Path) -> None:
    rows = sql_rows(10)
    report = prepare(SQL, str(write_v4_json(tmp_path / "v4.json", rows + rows[:3])), tmp_path / "out")
    assert report.rows_in == 13 and report.dropped == {"duplicate of an earlier row": 3}
    assert sum(report.rows_out.values()) == 10
    saved = json.loads((tmp_path / "out/sql/report.json").read_text())
    assert saved["dropped"] == {"duplicate of an earlier row": 3}


def test_missing_column_stops_with_file_and_row_and_writes_nothing(tmp_path: Path) -> None:
    rows = sql_rows(5)
    del rows[3]["answer"]
    with pytest.raises(PrepError, match=r"v4.json: row 4: missing field 'answer'"):
        prepare(SQL, str(write_v4_json(tmp_path / "v4.json", rows)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = prep_main(["sql", "--source", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.json: file not found" in err


def test_cli_max_rows_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_v4_json(tmp_path / "v4.json", sql_rows(50))
    assert prep_main(["sql", "--source", str(src), "--out", str(tmp_path / "out"), "--max-rows", "20"]) == 0
    assert json.loads((tmp_path / "out/sql/report.json").read_text())["rows_in"] == 20
    assert "prep summary" in capsys.readouterr().out
