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


def write_mlx_wikisql(folder: Path) -> Path:
    """A small folder in MLX's WikiSQL text format (train/valid/test.jsonl), made up in its shape."""
    folder.mkdir()
    tables = [(f"1-{1000 + t}-1", "State/territory, Current slogan, # of reigns, Order") for t in range(12)]
    for name, part in (("train.jsonl", tables[:8]), ("valid.jsonl", tables[8:10]), ("test.jsonl", tables[10:])):
        lines = []
        for table, columns in part:
            for q, sql in (("Which slogan for Oz?", f"SELECT Current slogan FROM {table} WHERE State/territory = 'Oz'"),
                           ("How many reigns?", f"SELECT COUNT # of reigns FROM {table} WHERE Order = 2 AND "
                                                f"Current slogan = 'It's A AND B'")):
                lines.append(json.dumps({"text": f"table: {table}\ncolumns: {columns}\nQ: {q} {table}\nA: {sql}"}))
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_mlx_wikisql_rows_become_sqlite_over_create_table(tmp_path: Path) -> None:
    report = prepare(SQL, str(write_mlx_wikisql(tmp_path / "wikisql_mlx")), tmp_path / "out")
    train = pd.read_csv(tmp_path / "out/sql/train.csv", keep_default_na=False)
    test = pd.read_csv(tmp_path / "out/sql/test.csv", keep_default_na=False)
    assert report.rows_in == 24 and len(test) == 8  # valid + test are held out; WikiSQL splits by table
    assert not set(train["context"]) & set(test["context"])
    row = test[test["question"].str.startswith("How many")].iloc[0]
    assert row["context"] == ("CREATE TABLE table_1_1008_1 (state_territory VARCHAR, current_slogan VARCHAR, "
                              "of_reigns VARCHAR, col_order VARCHAR)")
    assert row["response"] == ("SELECT COUNT(of_reigns) FROM table_1_1008_1 WHERE col_order = 2 AND "
                               "current_slogan = 'It''s A AND B'")


def test_mlx_wikisql_gold_queries_execute_on_their_tables(tmp_path: Path) -> None:
    import sqlite3
    prepare(SQL, str(write_mlx_wikisql(tmp_path / "wikisql_mlx")), tmp_path / "out")
    for row in pd.read_csv(tmp_path / "out/sql/train.csv", keep_default_na=False).itertuples():
        conn = sqlite3.connect(":memory:")
        conn.execute(row.context)
        conn.execute(row.response).fetchall()
