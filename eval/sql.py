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
                  max_rows: int = 100_000) -> Execution:
    """Run one SELECT under the read-only authorizer and a deadline; never raises."""
    deadline = time.monotonic() + timeout_s
    conn.set_authorizer(_authorizer)
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_EVERY)
    try:
        cursor = conn.execute(query.strip().rstrip(";"))
        if cursor.description is None:  # empty or comment-only text "runs" and returns nothing: not an answer
            return Execution(False, error="not a query that returns rows")
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


def _run_both(conn: sqlite3.Connection, prediction: str, reference: str,
              timeout_s: float) -> tuple[Execution, Execution]:
    """(prediction, reference) executions on an open connection; closes it."""
    try:
        return run_untrusted(conn, prediction, timeout_s), run_untrusted(conn, reference, timeout_s)
    finally:
        conn.close()


_NO_DATABASE = Execution(False, error="the context's CREATE TABLE statements do not build a database")


def execute_both(prediction: str, reference: str, context: str, database: Path | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Execution, Execution]:
    """Run prediction and reference on a temporary read-only copy of ``database`` when given, else on an
    in-memory database with the context's (empty) tables."""
    if database is None:
        conn = context_database(context)
        return (_NO_DATABASE, _NO_DATABASE) if conn is None else _run_both(conn, prediction, reference, timeout_s)
    with tempfile.TemporaryDirectory(prefix="sql-eval-") as tmp:
        copy = Path(tmp) / "db.sqlite"
        shutil.copyfile(database, copy)
        return _run_both(sqlite3.connect(f"file:{copy}?mode=ro", uri=True), prediction, reference, timeout_s)


def _verdict(pair: tuple[Execution, Execution]) -> tuple[bool, bool]:
    """(prediction executes without error, same result as the reference)."""
    pred, gold = pair
    return pred.ok, same_result(pred, gold)


def execution_match_on_context(prediction: str, reference: str, context: str,
                               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """(executes, same result as the reference) on the context's (empty) tables."""
    return _verdict(execute_both(prediction, reference, context, None, timeout_s))


def execution_match_on_database(prediction: str, reference: str, database: Path,
                                timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """Like :func:`execution_match_on_context` but on a temporary read-only copy of a real SQLite file."""
    return _verdict(execute_both(prediction, reference, "", database, timeout_s))


def _rate(count: int, n: int) -> float:
    return count / n if n else 0.0


def _tally(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
           databases: Sequence[Path | None], timeout_s: float) -> Counter[str]:
    """Counts of exact matches, predictions that execute, execution matches and references that fail to run;
    a row runs on its real database when it has one, else on its context's empty tables."""
    if not (len(predictions) == len(references) == len(contexts) == len(databases)):
        raise ValueError("predictions, references, contexts and databases must have the same length")
    counts: Counter[str] = Counter()
    for pred, ref, ctx, database in zip(predictions, references, contexts, databases, strict=True):
        pred_run, gold_run = execute_both(pred, ref, ctx, database, timeout_s)
        counts["exact"] += exact_match(pred, ref)
        counts["executes"] += pred_run.ok
        counts["matches"] += same_result(pred_run, gold_run)
        counts["gold_fails"] += not gold_run.ok
    return counts


def score_sql(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, float]:
    """Exact match, executes-without-error rate and execution match over a held-out set (all in [0, 1])."""
    n = len(predictions)
    counts = _tally(predictions, references, contexts, [None] * n, timeout_s)
    return {"exact_match": _rate(counts["exact"], n), "executes": _rate(counts["executes"], n),
            "execution_match": _rate(counts["matches"], n), "n": n}


def spider_database(spider_dir: Path, db_id: str) -> Path | None:
    """``<spider_dir>/database/<db_id>/<db_id>.sqlite`` when it exists, else None (the row falls back to context)."""
    path = spider_dir / "database" / db_id / f"{db_id}.sqlite"
    return path if db_id and path.is_file() else None


def score_spider(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
                 databases: Sequence[Path | None], timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, float]:
    """Spider execution accuracy on the real databases; exact match and executes-without-error rate too.

    A row whose database is None runs on its context's empty tables instead (a much weaker check: most queries
    return no rows there); ``n_real_db`` counts the rows that ran on a real database. ``n_gold_fails`` counts
    rows whose reference query itself fails (e.g. a table missing from a database copy): no prediction can
    match there, so it bounds the reachable accuracy. Rates are in [0, 1]; the ``n*`` keys are counts.
    """
    n = len(predictions)
    counts = _tally(predictions, references, contexts, databases, timeout_s)
    return {"execution_accuracy": _rate(counts["matches"], n), "exact_match": _rate(counts["exact"], n),
            "executes": _rate(counts["executes"], n), "n_real_db": sum(db is not None for db in databases),
            "n_gold_fails": counts["gold_fails"], "n": n}
