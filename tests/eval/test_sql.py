"""eval.sql: normalised exact match and sandboxed execution match."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from eval.sql import (
    execution_match_on_context,
    execution_match_on_database,
    exact_match,
    normalise_sql,
    score_sql,
)

CTX = "CREATE TABLE singer (name VARCHAR, country VARCHAR, age INTEGER)"


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("select Name from SINGER where Age>3;", "SELECT name FROM singer WHERE age > 3"),
        ("SELECT  count(*)\nFROM singer", "SELECT COUNT(*) FROM singer"),
        ("SELECT name FROM singer AS T1", "SELECT name FROM singer T1"),
    ],
)
def test_exact_match_ignores_case_whitespace_and_alias_keyword(pred: str, ref: str) -> None:
    assert exact_match(pred, ref)


@pytest.mark.parametrize("pred", ["", "   ", "SELECT FROM WHERE ((", "not sql at all", "SELECT 1; SELECT 2"])
def test_unparseable_or_empty_prediction_is_wrong(pred: str) -> None:
    assert not exact_match(pred, "SELECT 1")


def test_different_queries_do_not_match() -> None:
    assert not exact_match("SELECT name FROM singer WHERE age > 4", "SELECT name FROM singer WHERE age > 3")
    assert normalise_sql("SELECT a FROM t") != normalise_sql("SELECT b FROM t")


def test_execution_on_context_tables() -> None:
    assert execution_match_on_context("SELECT name FROM singer", "SELECT name FROM singer", CTX) == (True, True)
    assert execution_match_on_context("SELECT nope FROM singer", "SELECT name FROM singer", CTX) == (False, False)


@pytest.mark.parametrize(
    "attack",
    [
        "DROP TABLE singer",
        "INSERT INTO singer VALUES ('x', 'y', 1)",
        "ATTACH DATABASE 'evil.db' AS evil",
        "PRAGMA writable_schema = 1",
        "SELECT 1; DROP TABLE singer",
    ],
)
def test_writes_and_attach_are_denied(attack: str, tmp_path: Path) -> None:
    db = tmp_path / "real.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(CTX + "; INSERT INTO singer VALUES ('a', 'b', 30);")
    before = db.read_bytes()
    assert execution_match_on_database(attack, "SELECT name FROM singer", db) == (False, False)
    assert execution_match_on_context(attack, "SELECT name FROM singer", CTX) == (False, False)
    assert db.read_bytes() == before
    assert not (tmp_path / "evil.db").exists()


def test_a_query_that_never_ends_is_stopped_and_wrong() -> None:
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    assert execution_match_on_context(forever, "SELECT 1", CTX, timeout_s=0.3) == (False, False)


def test_execution_on_a_real_database_compares_result_multisets(tmp_path: Path) -> None:
    db = tmp_path / "real.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(CTX + "; INSERT INTO singer VALUES ('a', 'fr', 30), ('b', 'es', 40);")
    gold = "SELECT name FROM singer ORDER BY age"
    assert execution_match_on_database("SELECT name FROM singer ORDER BY age DESC", gold, db) == (True, True)
    assert execution_match_on_database("SELECT name FROM singer WHERE age > 35", gold, db) == (True, False)


def test_score_sql_counts() -> None:
    preds = ["SELECT name FROM singer", "SELECT name FROM singer WHERE age > 1", "garbage"]
    refs = ["SELECT name FROM singer"] * 3
    scores = score_sql(preds, refs, [CTX] * 3)
    assert scores == {"exact_match": 1 / 3, "executes": 2 / 3, "execution_match": 2 / 3, "n": 3}
