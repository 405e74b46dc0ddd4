"""Contamination: held-out rows (and probe texts) that a model, or a dataset, already contains.

A model scored on what it was trained on measures memory, not skill. Checked, and reported with counts:

* **test rows vs training rows.** For each model (its training CSV, found through Ludwig's ``description.json``)
  and for every prepared ``<task>/train.csv`` of the run: a test row overlaps when a training row of the SAME task
  has the same split key (the task's own ``group_key``: what prep keeps on one side of the split), or a training
  row of ANOTHER task asks the same question (the ``question`` field where both have one, else the whole input).
  This is how sql-create-context (built from WikiSQL and Spider) is checked against the Spider dev questions.
* **probe texts vs training rows.** A probe paragraph overlaps when it shares a run of ``NGRAM`` words with any
  training prompt or response (the 13-gram rule of Brown et al., 2020, "Language Models are Few-Shot Learners").

All text is normalised first: lower case, every run of non-alphanumeric characters one space. Overlapping rows are
flagged (counts and row numbers in the report), not dropped: every model keeps the same rows for paired changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from eval.inputs import input_text, row_fields
from prep.task import PROMPT, RESPONSE, TASK, TaskSpec

NGRAM = 13
_NON_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Overlap:
    """Which rows of one target (a task's test rows or a probe's texts) one training source contains."""

    source: str  # "model sql" or "prepared sql/train.csv"
    target: str  # a task name, or "probe <name>"
    rows: tuple[int, ...]  # 0-based indices of the overlapping test rows / probe texts
    total: int  # rows / texts checked
    rule: str  # "split key or question" or f"{NGRAM}-word overlap"
    models: tuple[str, ...] = ()  # the models trained on this source (none for a prepared train.csv alone)


@dataclass(frozen=True)
class Contamination:
    """Every overlap found, the training files checked (source label -> path), and the sources not checked."""

    overlaps: list[Overlap]
    sources: dict[str, str]
    unchecked: list[str]  # e.g. a model whose training data description.json does not lead to

    def flagged(self, target: str) -> list[Overlap]:
        """The overlaps with ``target`` (a task name or ``probe <name>``) that contain at least one row."""
        return [o for o in self.overlaps if o.target == target and o.rows]

    def seen(self, model: str, target: str) -> int:
        """How many rows of ``target`` are in the training data of ``model`` (any of its seeds)."""
        return len({row for o in self.flagged(target) if model in o.models for row in o.rows})


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def training_data(model_dir: Path) -> Path | None:
    """The training CSV a Ludwig model was trained on (``dataset`` in ``description.json`` next to the model
    folder), or None when it cannot be found.

    Ludwig records the path as given on its command line, often relative to the folder it ran in; that folder is
    tried too, recovered from the recorded ``--output_directory`` (``<ran in>/<output_directory>/<run>/model``).
    """
    try:
        description = json.loads((model_dir.parent / "description.json").read_text(encoding="utf-8"))
        dataset = Path(description["dataset"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    candidates = [dataset]
    if not dataset.is_absolute():
        ran_in = _ran_in(model_dir, str(description.get("command", "")))
        candidates += [ran_in / dataset] if ran_in else []
    return next((c for c in candidates if c.is_file()), None)


def _ran_in(model_dir: Path, command: str) -> Path | None:
    """The folder Ludwig ran in, from ``--output_directory X`` in its recorded command, or None."""
    words = command.split()
    if "--output_directory" not in words[:-1]:
        return None
    output = Path(words[words.index("--output_directory") + 1])
    if output.is_absolute():
        return None
    run_folder = model_dir.resolve().parent.parent  # <ran in>/<output_directory>
    return run_folder.parents[len(output.parts) - 1] if len(output.parts) <= len(run_folder.parents) else None


@dataclass(frozen=True)
class RowKeys:
    """The two keys of a row that overlaps are checked on."""

    split: str  # the task's own split key, normalised
    question: str  # the question field when there is one, else the whole input, normalised


def row_keys(row: Mapping[str, str], spec: TaskSpec) -> RowKeys:
    fields = row_fields(row, spec)
    try:
        split = spec.group_key({**fields, RESPONSE: str(row.get(RESPONSE, ""))})
    except KeyError:  # a prompt that does not fit the template: the whole input is the key
        split = input_text(fields)
    return RowKeys(normalise(split), normalise(fields.get("question") or input_text(fields)))


def frame_keys(frame: pd.DataFrame, tasks: Mapping[str, TaskSpec],
               default_task: str | None = None) -> dict[str, list[RowKeys]]:
    """task -> the keys of its rows in ``frame``; rows of tasks that are not registered are skipped."""
    keys: dict[str, list[RowKeys]] = {}
    for record in frame.to_dict("records"):
        task = str(record.get(TASK) or default_task or "")
        if task in tasks:
            keys.setdefault(task, []).append(row_keys({k: str(v) for k, v in record.items()}, tasks[task]))
    return keys


def test_overlap(train: Mapping[str, Sequence[RowKeys]], task: str, test: Sequence[RowKeys]) -> tuple[int, ...]:
    """Indices of the test rows of ``task`` that a training row contains (see the module docstring)."""
    same = {k.split for k in train.get(task, ())}
    other = {k.question for t, rows in train.items() if t != task for k in rows}
    return tuple(i for i, k in enumerate(test) if (k.split and k.split in same) or (k.question and k.question in other))


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def probe_overlap(train_texts: Iterable[str], probe: Sequence[str], n: int = NGRAM) -> tuple[int, ...]:
    """Indices of the probe texts that share an ``n``-word run with any training text.

    Only the probe's n-grams are held in memory; each training text is scanned once, and only at positions whose
    word starts some probe n-gram.
    """
    owner: dict[tuple[str, ...], set[int]] = {}
    for i, text in enumerate(probe):
        for gram in ngrams(text, n):
            owner.setdefault(gram, set()).add(i)
    starts = {gram[0] for gram in owner}
    hits: set[int] = set()
    for text in train_texts:
        words = normalise(text).split()
        for i in range(len(words) - n + 1):
            if words[i] in starts:
                hits |= owner.get(tuple(words[i:i + n]), set())
    return tuple(sorted(hits))


def check_source(source: str, frame: pd.DataFrame, tasks: Mapping[str, TaskSpec],
                 tests: Mapping[str, pd.DataFrame], probes: Mapping[str, Sequence[str]],
                 default_task: str | None = None, models: tuple[str, ...] = ()) -> list[Overlap]:
    """Every overlap of one training source (trained on by ``models``) with every test set and every probe."""
    train = frame_keys(frame, tasks, default_task)
    found = []
    for task, test in tests.items():
        if task in tasks:
            keys = [row_keys({k: str(v) for k, v in r.items()}, tasks[task]) for r in test.to_dict("records")]
            found.append(Overlap(source, task, test_overlap(train, task, keys), len(test), "split key or question",
                                 models))
    texts = [f"{p}\n{r}" for p, r in zip(frame.get(PROMPT, []), frame.get(RESPONSE, []), strict=False)]
    for name, probe in probes.items():
        found.append(Overlap(source, f"probe {name}", probe_overlap(texts, probe), len(probe), f"{NGRAM}-word overlap",
                             models))
    return found
