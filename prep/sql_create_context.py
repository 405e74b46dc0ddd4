"""sql-create-context (b-mc2/sql-create-context): natural-language question + CREATE TABLE statements -> SQL.

Published as ``sql_create_context_v4.json`` (a JSON list of {question, context, answer}); JSONL with the same
fields and Hugging Face datasets-server pages are read too. The hub dataset has a single ``train`` split, so the
held-out test set is drawn by hashing question + context: the same question over the same tables never appears
on both sides.

WikiSQL in the text format of Apple's MLX LoRA example (``train/valid/test.jsonl``, each row one ``text`` field:
``table: <id>\ncolumns: <c1, c2, ...>\nQ: <question>\nA: <SQL>``) is read too, and rewritten into this task's
form the way sql-create-context itself rewrote WikiSQL: ``CREATE TABLE table_<id> (<snake_case> VARCHAR, ...)`` and
a SQLite query over those names. Its official splits are kept (valid and test are both held out: WikiSQL splits
by table, so no table is on both sides).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from prep.common import TEST, TRAIN, DropRow, PrepError, SourceRow, normalise_key, read_file_or_folder, \
    read_records, read_split_files, require_text
from prep.task import RESPONSE, TaskSpec

TEMPLATE = (
    "### Task: Write a SQLite query that answers the question using only these tables.\n"
    "### Tables:\n{context}\n"
    "### Question:\n{question}\n"
    "### SQL:\n"
)


#: MLX's WikiSQL files, by the split name its rows carry (distinct from a hub split's name)
MLX_FILES = {"wikisql_train": "train.jsonl", "wikisql_valid": "valid.jsonl", "wikisql_test": "test.jsonl"}
_MLX_TEXT = re.compile(r"\Atable: (?P<table>[^\n]+)\ncolumns: (?P<columns>[^\n]*)\nQ: (?P<question>[^\n]+)\n"
                       r"A: (?P<sql>[^\n]+)\Z")
_WIKISQL = re.compile(r"\ASELECT (?:(?P<agg>MAX|MIN|COUNT|SUM|AVG) )?(?P<column>.+?) FROM (?P<table>\S+)"
                      r"(?: WHERE (?P<where>.+))?\Z")


def is_mlx_folder(path: Path) -> bool:
    """A folder holding MLX's WikiSQL files: train.jsonl whose first row is a single ``text`` field."""
    first = path / MLX_FILES["wikisql_train"]
    if not (path.is_dir() and first.exists()):
        return False
    return set(read_records(first)[0].data) == {"text"}


def read_local(path: Path) -> list[SourceRow]:
    if is_mlx_folder(path):
        return read_split_files(path, MLX_FILES)
    return read_file_or_folder(path, ("sql_create_context_v4.json",))


@cache
def _is_plain_identifier(name: str) -> bool:
    """SQLite takes ``name`` unquoted as a column name (not a keyword such as ``order``)."""
    try:
        sqlite3.connect(":memory:").execute(f"CREATE TABLE t ({name} VARCHAR)")
    except sqlite3.Error:
        return False
    return True


def snake_identifier(name: str, taken: Sequence[str] = ()) -> str:
    """sql-create-context's naming of a WikiSQL header: lower case, runs of other characters as ``_``; a name that
    SQLite would not take bare (a leading digit, a keyword) or one already taken gets a suffix/prefix, so every
    column keeps its own plain name."""
    ident = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "col"
    if ident[0].isdigit() or not _is_plain_identifier(ident):
        ident = f"col_{ident}"
    base, n = ident, 2
    while ident in taken:
        ident, n = f"{base}_{n}", n + 1
    return ident


def sql_literal(value: str) -> str:
    """A WikiSQL condition value as a SQLite literal: numbers stay bare, text is single-quoted."""
    text = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value
    if re.fullmatch(r"-?\d+(\.\d+)?", text) and text == value:
        return text
    return "'" + text.replace("'", "''") + "'"


def wikisql_query(sql: str, table: str, columns: Mapping[str, str]) -> str:
    """MLX's unquoted WikiSQL query (``SELECT COUNT Fleet Series (Quantity) FROM 1-10007452-3 WHERE Fuel
    Propulsion = 'CNG'``) over ``columns`` (header -> identifier) as SQLite; DropRow when a column is unknown
    (a header holding ", " splits wrongly and is not found)."""
    match = _WIKISQL.match(sql)
    if match is None or match["table"] != table or match["column"] not in columns:
        raise DropRow("WikiSQL query not of the form: SELECT agg(column) FROM table WHERE conditions")
    alternatives = "|".join(re.escape(c) for c in sorted(columns, key=len, reverse=True))
    selected = columns[match["column"]]
    query = f"SELECT {match['agg']}({selected})" if match["agg"] else f"SELECT {selected}"
    query += f" FROM {snake_identifier('table_' + table)}"
    if match["where"]:
        conditions = []
        for part in re.split(rf" AND (?=(?:{alternatives}) [=<>] )", match["where"]):
            cond = re.match(rf"\A({alternatives}) ([=<>]) (.*)\Z", part)
            if cond is None:
                raise DropRow("WikiSQL condition on an unknown column")
            conditions.append(f"{columns[cond[1]]} {cond[2]} {sql_literal(cond[3])}")
        query += " WHERE " + " AND ".join(conditions)
    return query


def mlx_fields(row: SourceRow) -> dict[str, str]:
    """One MLX WikiSQL ``text`` row in the task's fields (question, CREATE TABLE context, SQLite answer)."""
    match = _MLX_TEXT.match(require_text(row, "text").strip())
    if match is None:
        raise PrepError(row.where, "not MLX WikiSQL text (table:, columns:, Q:, A: lines)",
                        "pass MLX's lora/data files unchanged")
    columns: dict[str, str] = {}
    for header in match["columns"].split(", "):
        columns.setdefault(header, snake_identifier(header, list(columns.values())))
    table = snake_identifier("table_" + match["table"])
    context = f"CREATE TABLE {table} ({', '.join(f'{c} VARCHAR' for c in columns.values())})"
    return {"question": match["question"].strip(), "context": context,
            RESPONSE: wikisql_query(match["sql"].strip(), match["table"], columns)}


def to_fields(row: SourceRow) -> dict[str, str]:
    if row.split in MLX_FILES:
        return mlx_fields(row)
    return {
        "question": require_text(row, "question"),
        "context": require_text(row, "context"),
        RESPONSE: require_text(row, "answer"),
    }


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["question"], fields["context"])


TASK = TaskSpec(
    name="sql",
    hub_name="b-mc2/sql-create-context",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    keep_columns=("question", "context"),
    hub_split="train",
    official_splits={"wikisql_train": TRAIN, "wikisql_valid": TEST, "wikisql_test": TEST},
    source_folder="sql_create_context",
    ludwig_config="sql.yaml",
    scorer="sql",
    primary_metric="execution_match",
)
