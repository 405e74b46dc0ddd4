"""SAMSum (samsum): summarise a messenger-style dialogue in a sentence or two.

Published as train/validation/test files with id, dialogue, summary (the hub's splits are the same). The official
test split is the held-out set; the official validation split is Ludwig's validation set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import (
    TEST,
    TRAIN,
    VALIDATION,
    SourceRow,
    normalise_key,
    read_file_or_folder,
    read_split_files,
    require_text,
)
from prep.task import RESPONSE, TaskSpec

TEMPLATE = "### Task: Summarize the dialogue in one or two sentences.\n### Dialogue:\n{dialogue}\n### Summary:\n"


def read_local(path: Path) -> list[SourceRow]:
    if path.is_dir():
        return read_split_files(path, {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"})
    return read_file_or_folder(path)


def to_fields(row: SourceRow) -> dict[str, str]:
    # The original corpus separates turns with \r\n; one newline style keeps prompts (and their tokens) stable.
    dialogue = require_text(row, "dialogue").replace("\r\n", "\n")
    return {"dialogue": dialogue, RESPONSE: require_text(row, "summary")}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["dialogue"])


TASK = TaskSpec(
    name="samsum",
    hub_name="samsum",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    official_splits={"train": TRAIN, "validation": VALIDATION, "test": TEST},
    source_folder="samsum",
    ludwig_config="samsum.yaml",
    scorer="text",
    primary_metric="rougeL",
)
