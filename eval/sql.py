"""SQL metrics: execution match on synthesised databases (sql), execution accuracy on real ones (Spider), whether a
prediction executes, and exact match after sqlglot normalisation.

Execution match (sql-create-context): gold and prediction run on ``N_DATABASES`` small databases of the row's
tables filled with rows built from the gold query's literals (eval.sql_databases); the prediction matches only if
its result equals the gold's on every one, the idea of the distilled test suites of Zhong, Yu and Klein (EMNLP
2020). Execution accuracy (Spider) runs both on the real database; a row without one falls back to the
synthesised databases.

Results are compared as Spider's official test-suite evaluator does: as multisets of rows, or in order when the
gold query orders its result (floats to 12 significant digits, so AVG(x) equals SUM(x) * 1.0 / COUNT(x)). Two
deliberate differences, both stricter: "ordered" means the outermost query has
ORDER BY (the official check is the text 'order by' anywhere, which also orders a result whose only ORDER BY sits
in a subquery and so is in no defined order), and columns must come in the gold's order (the official evaluator
also accepts a permutation of the result's columns).

The model's SQL is untrusted. It only ever runs on an in-memory database or a temporary read-only copy of a real
one, with writes, ATTACH and pragmas denied by an authorizer and a deadline enforced by a progress handler. A
query that fails, hangs or tries to write is a wrong answer, never a crash and never a modified database.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlglot import exp
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from eval.sql_databases import (
    DIALECT,
    N_DATABASES,
    ROWS_PER_TABLE,
    clean_sql,
    context_schema,
    double_quoted_strings,
    fill_database,
    fills_for,
    parse_one,
    query_literals,
    schema_columns,
)
from eval.task_scores import TaskScores, scores_from_rows

# SQLite VM instructions between progress-handler calls, and the wall-clock budget per query.
_PROGRESS_EVERY = 1_000
DEFAULT_TIMEOUT_S = 2.0
# A prediction's total time over all of a row's synthesised databases, in units of the per-query budget: a query
# that is slow on every fill costs at most this many budgets, not N_DATABASES of them.
ROW_BUDGETS = 2

_READ_ONLY_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)


# ---------------------------------------------------------------------------------------------- exact match
def normalise_sql(query: str, columns: frozenset[str] | None = None) -> str | None:
    """A canonical form of ``query`` (identifier case and quoting, whitespace, keyword case, aliases' AS, ``==``),
    or None if it does not parse. String literals keep their case, and so do double-quoted names that SQLite reads
    as strings: those not among ``columns`` (the schema's lower-case column names; None: every unqualified
    double-quoted name, see eval.sql_databases.double_quoted_strings)."""
    text = clean_sql(query)
    tree = parse_one(text)
    if tree is None:
        return None
    tree = normalize_identifiers(double_quoted_strings(tree, text, columns), dialect=DIALECT)
    return tree.sql(dialect=DIALECT, normalize=True, pretty=False, identify=True)


def exact_match(prediction: str, reference: str, context: str = "") -> bool:
    """Equal after normalisation with the context's columns; an unparseable prediction is never a match."""
    tables = context_schema(context) if context else None
    columns = schema_columns(tables) if tables else None
    pred = normalise_sql(prediction, columns)
    return pred is not None and pred == normalise_sql(reference, columns)


# ---------------------------------------------------------------------------------------------- sandbox
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
        cursor = conn.execute(clean_sql(query))
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


# ---------------------------------------------------------------------------------------------- comparing results
@lru_cache(maxsize=4096)
def order_matters(gold: str) -> bool:
    """Whether results are compared in order: the gold's outermost query has ORDER BY (the official test-suite
    rule, made precise); when sqlglot cannot parse the gold, the official text test ('order by' anywhere)."""
    text = clean_sql(gold)
    tree = parse_one(text)
    if tree is None:
        return "order by" in " ".join(text.lower().split())
    while isinstance(tree, (exp.Subquery, exp.Paren)) and not tree.args.get("order"):
        tree = tree.this
    return tree.args.get("order") is not None


def _canonical(rows: tuple[tuple[Any, ...], ...]) -> list[tuple[Any, ...]]:
    """Rows with each float rounded to 12 significant digits: AVG(x) and SUM(x) * 1.0 / COUNT(x) are the same
    answer but may differ in the last bits of a double."""
    return [tuple(float(f"{v:.12g}") if isinstance(v, float) else v for v in row) for row in rows]


def same_result(a: Execution, b: Execution, ordered: bool = False) -> bool:
    """Both ran and returned the same rows: the same list when ``ordered``, else the same multiset."""
    if not (a.ok and b.ok):
        return False
    rows_a, rows_b = _canonical(a.rows), _canonical(b.rows)
    return rows_a == rows_b if ordered else Counter(rows_a) == Counter(rows_b)


@dataclass(frozen=True)
class RowResult:
    """One row's verdict: the prediction executes, matches the gold, and whether the gold itself ran."""

    executes: bool
    matches: bool
    gold_ok: bool


_NO_DATABASE = RowResult(False, False, False)


def execution_match_synthesized(prediction: str, reference: str, context: str,
                                timeout_s: float = DEFAULT_TIMEOUT_S) -> RowResult:
    """Run both queries on each of the row's synthesised databases (eval.sql_databases, filled from the gold's
    and the prediction's literals); a match needs the same result on every one. ``executes``: the prediction
    runs without error on the first."""
    fills = fills_for(context, reference, query_literals(prediction, context))
    if not fills:
        return _NO_DATABASE
    ordered = order_matters(reference)
    budget_end = time.monotonic() + ROW_BUDGETS * timeout_s
    executes = False
    for index, fill in enumerate(fills):
        conn = fill_database(fill)
        try:
            remaining = min(timeout_s, budget_end - time.monotonic())
            pred = run_untrusted(conn, prediction, remaining) if remaining > 0 else Execution(False, error="time")
            gold = run_untrusted(conn, reference, timeout_s)
        finally:
            conn.close()
        if index == 0:
            executes = pred.ok
        if not gold.ok:
            return RowResult(executes, False, False)
        if not same_result(pred, gold, ordered):
            return RowResult(executes, False, True)
    return RowResult(executes, True, True)


def execution_match_on_database(prediction: str, reference: str, database: Path,
                                timeout_s: float = DEFAULT_TIMEOUT_S) -> RowResult:
    """Run both queries on a temporary read-only copy of a real SQLite file (the original is never opened)."""
    with tempfile.TemporaryDirectory(prefix="sql-eval-") as tmp:
        copy = Path(tmp) / "db.sqlite"
        shutil.copyfile(database, copy)
        conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            pred, gold = run_untrusted(conn, prediction, timeout_s), run_untrusted(conn, reference, timeout_s)
        finally:
            conn.close()
    return RowResult(pred.ok, same_result(pred, gold, order_matters(reference)), gold.ok)


# ---------------------------------------------------------------------------------------------- task scores
def _check_lengths(*columns: Sequence[Any]) -> None:
    if len({len(c) for c in columns}) != 1:
        raise ValueError("predictions, references, contexts (and databases) must have the same length")


def _row_scores(results: Sequence[RowResult], exact: Sequence[bool], primary: str) -> dict[str, list[bool]]:
    return {primary: [r.matches for r in results], "exact_match": list(exact),
            "executes": [r.executes for r in results]}


def score_sql(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
              timeout_s: float = DEFAULT_TIMEOUT_S) -> TaskScores:
    """execution_match (same result as the gold on every synthesised database), exact_match and executes, each in
    [0, 1] with its per-row values; settings: n, n_gold_fails (rows whose gold fails there: no prediction can
    match), and the databases' size."""
    _check_lengths(predictions, references, contexts)
    results = [execution_match_synthesized(p, r, c, timeout_s)
               for p, r, c in zip(predictions, references, contexts, strict=True)]
    exact = [exact_match(p, r, c) for p, r, c in zip(predictions, references, contexts, strict=True)]
    return scores_from_rows(_row_scores(results, exact, "execution_match"), settings={
        "n": len(predictions), "n_gold_fails": sum(not r.gold_ok for r in results),
        "databases_per_row": N_DATABASES, "rows_per_table": ROWS_PER_TABLE})


def spider_database(spider_dir: Path, db_id: str) -> Path | None:
    """``<spider_dir>/database/<db_id>/<db_id>.sqlite`` when it exists, else None (the row falls back to
    synthesised databases)."""
    path = spider_dir / "database" / db_id / f"{db_id}.sqlite"
    return path if db_id and path.is_file() else None


def score_spider(predictions: Sequence[str], references: Sequence[str], contexts: Sequence[str],
                 databases: Sequence[Path | None], timeout_s: float = DEFAULT_TIMEOUT_S) -> TaskScores:
    """Spider execution accuracy on the real databases, exact match and executes, each in [0, 1] per row.

    A row whose database is None is scored on synthesised databases of its context instead (as the sql task);
    settings: ``n_real_db`` counts the rows that ran on a real database, ``n_gold_fails`` the rows whose reference
    query itself fails (no prediction can match there, so it bounds the reachable accuracy), and n.
    """
    _check_lengths(predictions, references, contexts, databases)
    results = [execution_match_synthesized(p, r, c, timeout_s) if db is None
               else execution_match_on_database(p, r, db, timeout_s)
               for p, r, c, db in zip(predictions, references, contexts, databases, strict=True)]
    exact = [exact_match(p, r, c) for p, r, c in zip(predictions, references, contexts, strict=True)]
    return scores_from_rows(_row_scores(results, exact, "execution_accuracy"), settings={
        "n": len(predictions), "n_real_db": sum(db is not None for db in databases),
        "n_gold_fails": sum(not r.gold_ok for r in results)})
