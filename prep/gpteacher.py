"""GPTeacher General-Instruct (teknium/GPTeacher-General-Instruct): follow an instruction, with optional input.

Published as a JSON list of {instruction, input, response} (the other GPTeacher files, e.g. Codegen and Roleplay,
share the schema and load the same way). Rows are de-duplicated on the normalised instruction + input, which is
also the split key, so a repeated instruction can never be trained on and tested on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import RESPONSE, TaskSpec

TEMPLATE = "### Instruction:\n{instruction}\n{input_block}### Response:\n"


def read_local(path: Path) -> list[SourceRow]:
    return read_file_or_folder(path, ("gpt4-instruct-dedupe-only-dataset.json",))


def to_fields(row: SourceRow) -> dict[str, str]:
    extra = require_text(row, "input", allow_empty=True)
    return {
        "instruction": require_text(row, "instruction"),
        "input": extra,
        "input_block": f"### Input:\n{extra}\n" if extra else "",
        RESPONSE: require_text(row, "response"),
    }


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["instruction"], fields["input"])


TASK = TaskSpec(
    name="instruct",
    hub_name="teknium/GPTeacher-General-Instruct",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    hub_split="train",
    dedupe_on_group=True,
    source_folder="gpteacher",
    ludwig_config="instruct.yaml",
    scorer="text",
    primary_metric="rougeL",
)
