"""Spider 1.0 dev (evaluation only): a question over a real SQLite database -> SQL, in the sql task's form.

Published as dev.json (db_id, question, query) plus tables.json (every database's schema). Each question becomes
the sql task's prompt: the CREATE TABLE statements of its database, rebuilt from tables.json, and the question.
Everything goes to test.csv with ``db_id``, so eval can execute predictions on the real database
(``<spider>/database/<db_id>/<db_id>.sqlite``): the sql adapter is then scored on data it never saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prep.common import PrepError, SourceRow, normalise_key, read_records, require_text
from prep.sql_create_context import TEMPLATE
from prep.task import RESPONSE, TaskSpec

_SQL_TYPES = {"number": "INTEGER", "text": "VARCHAR", "time": "VARCHAR", "boolean": "INTEGER", "others": "VARCHAR"}


def _quote(name: str) -> str:
    return f'"{name}"' if not name.replace("_", "").isalnum() else name


def create_tables(schema: Mapping[str, Any]) -> str:
    """sql-create-context style context: ``CREATE TABLE t (col TYPE, ...)`` for each table, joined by '; '."""
    tables: list[list[str]] = [[] for _ in schema["table_names_original"]]
    for (table_idx, column), col_type in zip(schema["column_names_original"], schema["column_types"], strict=True):
        if table_idx >= 0:
            tables[table_idx].append(f"{_quote(column)} {_SQL_TYPES.get(col_type, 'VARCHAR')}")
    return "; ".join(f"CREATE TABLE {_quote(name)} ({', '.join(cols)})"
                     for name, cols in zip(schema["table_names_original"], tables, strict=True))


def read_local(path: Path) -> list[SourceRow]:
    """A Spider folder (dev.json + tables.json), or dev.json with tables.json beside it; schema attached per row."""
    folder = path if path.is_dir() else path.parent
    questions = path / "dev.json" if path.is_dir() else path
    tables_file = folder / "tables.json"
    if not tables_file.exists():
        raise PrepError(str(tables_file), "file not found", "Spider needs tables.json next to dev.json")
    schemas = {s["db_id"]: s for s in json.loads(tables_file.read_text(encoding="utf-8"))}
    rows = []
    for row in read_records(questions):
        schema = schemas.get(str(row.data.get("db_id")))
        rows.append(SourceRow({**row.data, "_schema": schema, "_database_dir": str(folder / "database")}, row.where))
    return rows


def to_fields(row: SourceRow) -> dict[str, str]:
    db_id = require_text(row, "db_id")
    schema = row.data.get("_schema")
    if schema is None:
        raise PrepError(row.where, f"db_id '{db_id}' is not in tables.json", "pass the matching tables.json")
    database = Path(str(row.data.get("_database_dir", ""))) / db_id / f"{db_id}.sqlite"
    return {"question": require_text(row, "question"), "context": create_tables(schema), "db_id": db_id,
            "has_database": "yes" if database.exists() else "no", RESPONSE: require_text(row, "query")}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["question"], fields["db_id"])


TASK = TaskSpec(
    name="spider",
    hub_name="xlangai/spider",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    keep_columns=("question", "context", "db_id", "has_database"),
    test_fraction=1.0,
    validation_fraction=0.0,
    hub_split="validation",
    source_folder="spider",
    ludwig_config=None,  # evaluation only
    scorer="spider",
    primary_metric="execution_accuracy",
)
