"""Trivial baselines: what an answer that needs no model scores on each task's held-out rows.

A score means little until it is compared with what a trivial answer gets: commonsense_qa at 0.19 is chance for
five options, and a model "gaining" ROUGE-L by answering shorter may still be below copying the input. Each task
gets one baseline, built from the TRAINING split only (``<prepared>/<task>/train.csv``, ``split`` 0) and scored on
the same test rows as every model, through the same ``score_task``:

* label tasks (primary metric ``accuracy``: banking77, commonsense_qa): the most frequent training answer
  (majority label / most frequent letter); chance (one over the number of distinct answers) is reported with it;
* SQL tasks (``execution_match`` / ``execution_accuracy``): a template query on the row's first table,
  ``SELECT * FROM <table>`` or ``SELECT COUNT(*) FROM <table>``;
* every other task (free text: samsum, detox, instruct, lamini_docs, custom tasks): the input copied unchanged,
  the first sentence of the input, or the most frequent training response.

Where a kind has several candidates, the one with the best primary metric on the first ``TRAIN_SAMPLE`` training
rows is chosen (never on the test rows), so the baseline is the strongest trivial answer the training data points
to. The inputs come from the kept columns or are parsed back from the prompt (``eval.inputs``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from eval.inputs import input_text, row_fields
from prep.common import LUDWIG_SPLIT_CODE, TRAIN
from prep.task import RESPONSE, SPLIT, TaskSpec

TRAIN_SAMPLE = 200  # training rows the candidates are compared on (prep sorts rows by a hash: a fair sample)
VERSION = 1  # bump when a candidate changes: cached baselines are then recomputed

Answer = Callable[[Mapping[str, str]], str]  # a row (its columns and template fields) -> the baseline's answer
_FIRST_TABLE = re.compile(r'CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?("[^"]+"|`[^`]+`|\[[^\]]+\]|[^\s(]+)',
                          re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Candidate:
    """One trivial answer strategy, described in words for the report."""

    name: str
    answer: Answer


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, every candidate's score on the training sample, and facts for the report."""

    candidate: Candidate
    train_scores: Mapping[str, float]  # candidate name -> primary metric on the training sample (empty: one)
    train_rows: int
    chance: float | None = None  # label tasks: 1 / distinct training answers


def read_train(path: Path) -> pd.DataFrame | None:
    """The training rows (``split`` 0; validation rows are left out) of a prepared train.csv, or None."""
    if not path.is_file():
        return None
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    if SPLIT in frame.columns:
        frame = frame[frame[SPLIT] == str(LUDWIG_SPLIT_CODE[TRAIN])]
    return frame.reset_index(drop=True) if len(frame) and RESPONSE in frame.columns else None


def kind_of(primary_metric: str) -> str:
    """Which family of baselines fits a task, from its primary metric (so custom tasks need no entry)."""
    if primary_metric == "accuracy":
        return "label"
    if primary_metric in ("execution_match", "execution_accuracy"):
        return "sql"
    return "text"


def most_frequent(values: Sequence[str]) -> str:
    """The most frequent value; ties go to the alphabetically first, so the choice is deterministic."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def first_table(context: str) -> str:
    """The first table a CREATE TABLE context defines (quotes kept, so the query runs), or '' when none."""
    match = _FIRST_TABLE.search(context)
    return match.group(1) if match else ""


def first_sentence(text: str) -> str:
    return next((s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()), "")


def candidates(kind: str, train: pd.DataFrame | None) -> list[Candidate]:
    """The trivial answers of one kind of task; those that need training answers are left out without them."""
    answers = list(train[RESPONSE]) if train is not None else []
    if kind == "label":
        label = most_frequent(answers) if answers else ""
        return [Candidate(f"majority answer '{label.strip()}'", lambda row: label)] if answers else []
    if kind == "sql":
        return [Candidate("SELECT * FROM <the row's first table>",
                          lambda row: f"SELECT * FROM {first_table(row.get('context', ''))}"),
                Candidate("SELECT COUNT(*) FROM <the row's first table>",
                          lambda row: f"SELECT COUNT(*) FROM {first_table(row.get('context', ''))}")]
    found = [Candidate("the input, unchanged", lambda row: row["_input"]),
             Candidate("the first sentence of the input", lambda row: first_sentence(row["_input"]))]
    if answers:
        response = most_frequent(answers)
        found.append(Candidate(f"the most frequent training response '{_short(response)}'", lambda row: response))
    return found


def rows_for_answers(frame: pd.DataFrame, spec: TaskSpec) -> list[dict[str, str]]:
    """Each row's columns plus its template fields and its whole input (``_input``), what candidates read."""
    rows = []
    for record in frame.to_dict("records"):
        fields = row_fields(record, spec)
        rows.append({**{k: str(v) for k, v in record.items()}, **fields, "_input": input_text(fields)})
    return rows


def answers(candidate: Candidate, frame: pd.DataFrame, spec: TaskSpec) -> list[str]:
    return [candidate.answer(row) for row in rows_for_answers(frame, spec)]


def choose(kind: str, train: pd.DataFrame | None, spec: TaskSpec,
           score: Callable[[pd.DataFrame, list[str]], float]) -> Choice | None:
    """The best candidate on the training sample by ``score`` (the task's primary metric); None when a label
    task has no training answers. The first candidate wins ties and is taken when there are no training rows."""
    found = candidates(kind, train)
    if not found:
        return None
    chance = 1.0 / len(set(train[RESPONSE])) if kind == "label" and train is not None else None
    if len(found) == 1 or train is None:
        return Choice(found[0], {}, 0 if train is None else len(train), chance)
    sample = train.head(TRAIN_SAMPLE).reset_index(drop=True)
    scores = {c.name: float(score(sample, answers(c, sample, spec))) for c in found}
    best = max(found, key=lambda c: scores[c.name])  # max keeps the first of equal scores
    return Choice(best, scores, len(sample), chance)


def _short(text: str, limit: int = 40) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "…"
