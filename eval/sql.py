"""SQL metrics: exact match after sqlglot normalisation, and execution match in a read-only, time-limited sandbox.

The model's SQL is untrusted. It only ever runs on an in-memory SQLite database built from the row's CREATE TABLE
context (or on a temporary copy of a real database), with writes, ATTACH and pragmas denied by an authorizer and
a step budget enforced by a progress handler. A query that fails, hangs or tries to write is a wrong answer,
never a crash and never a modified database.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

DIALECT = "sqlite"
# SQLite VM instructions between progress-handler calls, and the wall-clock budget per query.
_PROGRESS_EVERY = 1_000
DEFAULT_TIMEOUT_S = 2.0

_READ_ONLY_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)


def normalise_sql(query: str) -> str | None:
    """A canonical form of ``query`` (case, quoting, whitespace, aliases' AS), or None if it does not parse."""
    text = query.strip().rstrip(";").strip()
    if not text:
        return None
    try:
        expressions = sqlglot.parse(text, read=DIALECT)
    except SqlglotError:
        return None
    if len(expressions) != 1 or expressions[0] is None:
        return None
    expression = normalize_identifiers(expressions[0], dialect=DIALECT)
    return expression.sql(dialect=DIALECT, normalize=True, pretty=False, identify=False)


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after normalisation; an unparseable prediction is never a match."""
    pred = normalise_sql(prediction)
    return pred is not None and pred == normalise_sql(reference)


def _authorizer(action: int, *_args: Any) -> int:
    """Allow reads only: no writes, no ATTACH/DETACH, no PRAGMA, no schema changes."""
    return sqlite3.SQLITE_OK if action in _READ_ONLY_ACTIONS or action == _RECURSIVE else sqlite3.SQLITE_DENY


@dataclass(frozen=True)
class Execution:
    ok: bool
    rows: tuple[tuple[Any, ...], ...] = ()
    error: str = ""


def run_untrusted(conn: sqlite3.Connection, query: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                  max_rows: int = 10_000) -> Execution:
    """Run one SELECT under the read-only authorizer and a deadline; never raises."""
    deadline = time.monotonic() + timeout_s
    conn.set_authorizer(_authorizer)
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_EVERY)
    try:
        cursor = conn.execute(query.strip().rstrip(";"))
        rows = cursor.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            return Execution(False, error=f"more than {max_rows} rows")
        return Execution(True, tuple(tuple(r) for r in rows))
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as err:  # Warning: "one statement at a time"
        return Execution(False, error=f"{type(err).__name__}: {err}")
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)


def context_database(context: str) -> sqlite3.Connection | None:
    """An in-memory database with the row's CREATE TABLE statements (trusted: they come from the dataset)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
    except sqlite3.Error:
        conn.close()
        return None
    return conn


def same_result(a: Execution, b: Execution) -> bool:
    """Both ran and returned the same multiset of rows (order-insensitive, as Spider's execution accuracy)."""
    return a.ok and b.ok and Counter(a.rows) == Counter(b.rows)


def compare_on(conn: sqlite3.Connection, prediction: str, reference: str,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """(prediction executes without error, same result as the reference) on an open connection; closes it."""
    try:
        pred = run_untrusted(conn, prediction, timeout_s)
        gold = run_untrusted(conn, reference, timeout_s)
        return pred.ok, same_result(pred, gold)
    finally:
        conn.close()


def execution_match_on_context(prediction: str, reference: str, context: str,
                               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """:func:`compare_on` the context's (empty) tables."""
    conn = context_database(context)
    return (False, False) if conn is None else compare_on(conn, prediction, reference, timeout_s)


def execution_match_on_database(prediction: str, reference: str, database: Path,
                                timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """Like :func:`execution_match_on_context` but on a temporary read-only copy of a real SQLite file."""
    with tempfile.TemporaryDirectory(prefix="sql-eval-") as tmp:
        copy = Path(tmp) / "db.sqlite"
        shutil.copyfile(database, copy)
        return compare_on(sqlite3.connect(f"file:{copy}?mode=ro", uri=True), prediction, reference, timeout_s)


def score_sql(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, float]:
    """Exact match, executes-without-error rate and execution match over a held-out set (all in [0, 1])."""
    if not (len(predictions) == len(references) == len(contexts)):
        raise ValueError("predictions, references and contexts must have the same length")
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "executes": 0.0, "execution_match": 0.0, "n": 0}
    exact = executes = matches = 0
    for pred, ref, ctx in zip(predictions, references, contexts, strict=True):
        exact += exact_match(pred, ref)
        ran, same = execution_match_on_context(pred, ref, ctx, timeout_s)
        executes += ran
        matches += same
    return {"exact_match": exact / n, "executes": executes / n, "execution_match": matches / n, "n": n}
