"""CommonsenseQA (tau/commonsense_qa): a question with five lettered choices -> the right letter.

Published as JSONL in a nested form ({answerKey, question: {stem, choices: [{label, text}]}}); the hub has a flat
form ({question, choices: {label: [...], text: [...]}, answerKey}). The official test split has no answers, so
the official dev split (the hub's "validation") is the held-out test set here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import (
    TEST,
    TRAIN,
    PrepError,
    SourceRow,
    normalise_key,
    read_file_or_folder,
    read_split_files,
    require_text,
)
from prep.task import RESPONSE, TaskSpec

TEMPLATE = (
    "### Task: Answer the question by choosing one option. Reply with its letter only.\n"
    "### Question:\n{question}\n### Options:\n{options}\n### Answer:\n"
)
LETTERS = ("A", "B", "C", "D", "E")


def read_local(path: Path) -> list[SourceRow]:
    if path.is_dir():  # the official file names; the test file has no answers and is not read
        return read_split_files(path, {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"})
    return read_file_or_folder(path)


def _choices(row: SourceRow) -> tuple[str, list[tuple[str, str]]]:
    """(question, [(label, text)]) from either published form."""
    question = row.data.get("question")
    if isinstance(question, dict):  # official nested form
        stem = require_text(SourceRow(question, row.where), "stem")
        raw = question.get("choices")
        if not isinstance(raw, list):
            raise PrepError(row.where, "field 'question.choices' is not a list", "pass the published JSONL")
        return stem, [(str(c.get("label", "")), str(c.get("text", ""))) for c in raw if isinstance(c, dict)]
    stem = require_text(row, "question")
    raw = row.data.get("choices")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("label"), (list, tuple)):
        raise PrepError(row.where, "missing field 'choices' with label/text lists", "pass the published format")
    return stem, list(zip(map(str, raw["label"]), map(str, raw.get("text", [])), strict=False))


def to_fields(row: SourceRow) -> dict[str, str]:
    question, choices = _choices(row)
    labels = [label for label, _ in choices]
    if labels != list(LETTERS):
        raise PrepError(row.where, f"choices labelled {labels}, expected A-E", "pass the published format")
    answer = require_text(row, "answerKey")
    if answer not in LETTERS:
        raise PrepError(row.where, f"unknown answer label '{answer}'", "use one of A, B, C, D, E")
    options = "\n".join(f"{label}. {text}" for label, text in choices)
    return {"question": question, "options": options, RESPONSE: answer}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["question"], fields["options"])


TASK = TaskSpec(
    name="commonsense_qa",
    hub_name="tau/commonsense_qa",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    official_splits={"train": TRAIN, "validation": TEST},
    source_folder="commonsense_qa",
    ludwig_config="commonsense_qa.yaml",
    scorer="choices",
    primary_metric="accuracy",
)
