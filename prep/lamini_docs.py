"""lamini_docs (lamini/lamini_docs): questions about the Lamini library -> answers from its documentation.

Published as lamini_docs.jsonl with question, answer; the hub version has train/test splits, which are kept.
A local file has no split, so the held-out set is drawn by hashing the normalised question.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import TEST, TRAIN, SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import RESPONSE, TaskSpec

TEMPLATE = "### Task: Answer the question about the Lamini library.\n### Question:\n{question}\n### Answer:\n"


def read_local(path: Path) -> list[SourceRow]:
    return read_file_or_folder(path, ("lamini_docs.jsonl",))


def to_fields(row: SourceRow) -> dict[str, str]:
    return {"question": require_text(row, "question"), RESPONSE: require_text(row, "answer")}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["question"])


TASK = TaskSpec(
    name="lamini_docs",
    hub_name="lamini/lamini_docs",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    test_fraction=0.1,
    official_splits={"train": TRAIN, "test": TEST},
    source_folder="lamini_docs",
    ludwig_config="lamini_docs.yaml",
    scorer="text",
    primary_metric="rougeL",
)
