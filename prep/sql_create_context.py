"""sql-create-context (b-mc2/sql-create-context): natural-language question + CREATE TABLE statements -> SQL.

Published as ``sql_create_context_v4.json`` (a JSON list of {question, context, answer}); JSONL with the same
fields and Hugging Face datasets-server pages are read too. The hub dataset has a single ``train`` split, so the
held-out test set is drawn by hashing question + context: the same question over the same tables never appears
on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import RESPONSE, TaskSpec

TEMPLATE = (
    "### Task: Write a SQLite query that answers the question using only these tables.\n"
    "### Tables:\n{context}\n"
    "### Question:\n{question}\n"
    "### SQL:\n"
)


def read_local(path: Path) -> list[SourceRow]:
    return read_file_or_folder(path, ("sql_create_context_v4.json",))


def to_fields(row: SourceRow) -> dict[str, str]:
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
    source_folder="sql_create_context",
    ludwig_config="sql.yaml",
    scorer="sql",
    primary_metric="execution_match",
)
