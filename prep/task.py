"""What a task is, and the one pipeline that turns any task's source into train/test CSVs.

A dataset module in ``prep/`` defines a single :class:`TaskSpec`, the task's one record, read by every layer: how to
read its published files and where they sit under a data root, how one raw row becomes template fields, its prompt
template, which key groups rows for a leak-free split, the Ludwig YAML that trains it, and how eval scores it (scorer
kind and primary metric). Adding a task touches that record, its module's reader, one line in ``prep/registry.py``
and its YAML. Everything else (reading, de-duplication, splitting, atomic writing, the report) is shared and lives
in :func:`prepare`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ludwig_mt.config import config_file
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_csv, atomic_write_json
from prep.common import (
    LUDWIG_SPLIT_CODE,
    EmptyField,
    TEST,
    TRAIN,
    VALIDATION,
    DropRow,
    PrepError,
    PrepReport,
    SourceRow,
    hash_split,
    limit_rows,
    load_hub_rows,
    looks_like_local_path,
    normalise_key,
)

PROMPT, RESPONSE, TASK, SPLIT, REFERENCES = "prompt", "response", "task", "split", "references"
# Rows longer than this (prompt + response, in characters) are dropped: they would be truncated in training and
# make every batch that contains them slow. Well above every seed dataset's real rows.
MAX_ROW_CHARS = 20_000
#: how eval scores a task whose record does not say (and a task it does not know): free text, ROUGE-L
DEFAULT_SCORER, DEFAULT_METRIC = "text", "rougeL"


@dataclass(frozen=True)
class TaskSpec:
    """Everything that makes one dataset a fine-tuning task; see the module docstring."""

    name: str  # the task name used on the command line, in the CSVs' task column and as a model name (owns it)
    hub_name: str  # Hugging Face dataset id, loaded with ``datasets`` when --source is not a local path
    template: str  # the prompt template, ``str.format`` fields from ``to_fields``; defined once, used by prep+eval
    read_local: Callable[[Path], list[SourceRow]]  # a file or folder in the published format -> raw rows
    # raw row -> template fields + "response" (a list when one raw row holds several examples); may raise DropRow
    to_fields: Callable[[SourceRow], dict[str, str] | list[dict[str, str]]]
    group_key: Callable[[Mapping[str, str]], str]  # rows with the same key always share a split (no leakage)
    keep_columns: tuple[str, ...] = ()  # template fields also kept as CSV columns (eval needs some, e.g. context)
    test_fraction: float = 0.05
    validation_fraction: float = 0.05
    hub_split: str | None = None  # load only this hub split (None: all, keeping official train/test splits)
    official_splits: Mapping[str, str] = field(default_factory=dict)  # source split name -> train/validation/test
    dedupe_on_group: bool = False  # drop later rows whose group key was seen (e.g. the same instruction twice)
    # test.csv: one row per group with a JSON ``references`` column holding every response of the group
    # (ParaDetox: all neutral rewrites of one toxic sentence, for multi-reference BLEU/chrF)
    one_test_row_per_group: bool = False
    source_folder: str | None = None  # its published files' folder under one data root (`prep all`); None: not there
    ludwig_config: str | None = None  # the YAML in ludwig_configs/ that trains it; None: evaluation only (spider)
    scorer: str = DEFAULT_SCORER  # how eval scores it: a scorer kind, a key of eval.scoring.SCORERS
    primary_metric: str = DEFAULT_METRIC  # the one metric of the retention matrix (higher is better)

    def render_prompt(self, fields: Mapping[str, str]) -> str:
        return self.template.format(**fields)

    def config_path(self) -> Path:
        """The Ludwig YAML that trains this task; a one-line error when it has none or the file is missing."""
        if self.ludwig_config is None:
            raise WorkflowError(f"{self.name}: evaluation-only task or mixture ingredient, no Ludwig config trains "
                                "it on its own. Fix: train a task that has one (python -m prep lists them), or "
                                "mix it in with ./run.sh prep mix")
        return config_file(self.ludwig_config)

    def owned_by(self, model_name: str) -> bool:
        """A model named after the task owns it (``--model sql=DIR`` is the sql adapter): the one place that rule
        lives."""
        return model_name == self.name


def load_rows(spec: TaskSpec, source: str) -> list[SourceRow]:
    """Local file/folder in the published format, or a hub dataset name through ``datasets``."""
    if looks_like_local_path(source):
        return spec.read_local(Path(source).expanduser())
    return load_hub_rows(source, spec.hub_split)


def assign_split(spec: TaskSpec, row: SourceRow, key: str) -> str:
    """The official split when the source has one for this row, else a hash of the group key."""
    official = spec.official_splits.get(row.split or "")
    if official is not None:
        if official == TRAIN:  # carve validation out of the official train split, still by group
            return VALIDATION if hash_split(key, test_fraction=0.0, validation_fraction=spec.validation_fraction,
                                            salt=spec.name) == VALIDATION else TRAIN
        return official
    return hash_split(key, test_fraction=spec.test_fraction, validation_fraction=spec.validation_fraction,
                      salt=spec.name)


def row_examples(spec: TaskSpec, row: SourceRow, report: PrepReport, strict: bool) -> list[dict[str, str]]:
    """The examples of one raw row; a dropped row is counted in the report and gives none."""
    try:
        fields = spec.to_fields(row)
    except DropRow as drop:
        report.drop(drop.reason)
        return []
    except EmptyField as err:
        if strict:
            raise
        report.drop(f"empty field '{err.key}'")
        return []
    return fields if isinstance(fields, list) else [fields]


def build_frames(spec: TaskSpec, rows: list[SourceRow], report: PrepReport,
                 progress: Callable[[Any], Any] = lambda it: it, strict: bool = False) -> dict[str, pd.DataFrame]:
    """Raw rows -> de-duplicated, split frames with prompt/response/task/split plus the kept columns."""
    seen: set[str] = set()
    by_split: dict[str, list[dict[str, Any]]] = {TRAIN: [], VALIDATION: [], TEST: []}
    examples = ((row, fields) for row in progress(rows) for fields in row_examples(spec, row, report, strict))
    report.rows_in += len(rows)
    for row, fields in examples:
        prompt = spec.render_prompt(fields)
        response = fields[RESPONSE]
        if len(prompt) + len(response) > MAX_ROW_CHARS:
            report.drop(f"longer than {MAX_ROW_CHARS} characters")
            continue
        key = spec.group_key(fields)
        dedup_key = key if spec.dedupe_on_group else normalise_key(prompt, response)
        if dedup_key in seen:
            report.drop("duplicate of an earlier row")
            continue
        seen.add(dedup_key)
        split = assign_split(spec, row, key)
        record = {PROMPT: prompt, RESPONSE: response, TASK: spec.name}
        record.update({col: fields[col] for col in spec.keep_columns})
        record["group_key"] = key
        by_split[split].append(record)
    columns = [PROMPT, RESPONSE, TASK, *spec.keep_columns, "group_key"]
    frames = {name: pd.DataFrame(recs, columns=columns) for name, recs in by_split.items()}
    if spec.one_test_row_per_group:
        frames[TEST] = collapse_groups(frames[TEST])
    return frames


def collapse_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group key (the first), with every response of the group as a JSON list in ``references``."""
    refs = frame.groupby("group_key", sort=False)[RESPONSE].agg(lambda s: json.dumps(list(s), ensure_ascii=False))
    first = frame.drop_duplicates("group_key").copy()
    first.insert(first.columns.get_loc(RESPONSE) + 1, REFERENCES, first["group_key"].map(refs))
    return first


def drop_cross_split_groups(frames: dict[str, pd.DataFrame], report: PrepReport) -> None:
    """Official splits can share a group key (e.g. the same question twice): keep such rows out of train."""
    held_out = set(frames[TEST]["group_key"])
    for name in (TRAIN, VALIDATION):
        leaked = frames[name]["group_key"].isin(held_out)
        for _ in range(int(leaked.sum())):
            report.drop("shares its group key with a test row")
        frames[name] = frames[name][~leaked]


def held_out_by(spec: TaskSpec) -> str:
    """How the task's test rows are chosen, in words (for the refusal that finds none)."""
    official = [name for name, split in spec.official_splits.items() if split == TEST]
    hashed = f"about {spec.test_fraction:.0%} of the rows, by a hash of the split key"
    return f"the official '{official[0]}' split, else {hashed}" if official else hashed


def check_usable(spec: TaskSpec, source: str, frames: Mapping[str, pd.DataFrame], report: PrepReport) -> None:
    """Refuse, before anything is written, a source that gives no rows, no test rows or (for a task that is
    trained) no training rows: each would only fail later, in ``ludwig train`` or in eval, far from its cause.

    One line naming the source, what it gave and the fix; the previous outputs stay as they were.
    """
    counts = {name: len(frames[name]) for name in (TRAIN, VALIDATION, TEST)}
    source_rows = f"{report.rows_in} source row{'' if report.rows_in == 1 else 's'}"
    gave = f"{source_rows} gave {counts[TRAIN]} train, {counts[VALIDATION]} validation and {counts[TEST]} test rows"
    if not report.rows_in:
        raise PrepError(source, f"no rows for {spec.name}", "pass a source that holds the data rows")
    if not any(counts.values()):
        raise PrepError(source, f"no usable rows for {spec.name}: all {source_rows} were dropped "
                        f"({report.dropped_text()})",
                        "correct the rows for the reasons given, or run with --strict to stop at the first one")
    more = "pass more rows (a larger --max-rows, or the whole source)" if report.max_rows else "pass more rows"
    if not counts[TEST]:
        tune = "; or raise test_fraction in the task spec" if spec.source_folder is None else ""
        raise PrepError(source, f"no test rows for {spec.name}: {gave} (held out: {held_out_by(spec)})",
                        f"{more}{tune}")
    if not counts[TRAIN] and spec.ludwig_config is not None:
        raise PrepError(source, f"no training rows for {spec.name}: {gave}",
                        f"{more}, including its training split")


def prepare(spec: TaskSpec, source: str, out_dir: str | Path, *, max_rows: int | None = None,
            progress: Callable[[Any], Any] = lambda it: it, strict: bool = False) -> PrepReport:
    """Read ``source``, write ``<out_dir>/<task>/{train,test}.csv`` and ``report.json``; return the report.

    ``train.csv`` carries Ludwig's ``split`` column (0 train, 1 validation); ``test.csv`` is the held-out set.
    Output is sorted deterministically, so a rerun on the same input is byte-identical. ``max_rows`` reads the
    first rows of each source split in proportion (:func:`prep.common.limit_rows`), so an official test split is
    never left out. A source that gives no usable, test or training rows is refused before anything is written.
    """
    started = time.perf_counter()
    report = PrepReport(task=spec.name, source=str(source), max_rows=max_rows)
    rows, report.read = limit_rows(load_rows(spec, source), max_rows)
    frames = build_frames(spec, rows, report, progress, strict)
    drop_cross_split_groups(frames, report)
    check_usable(spec, str(source), frames, report)
    task_dir = Path(out_dir) / spec.name
    train = pd.concat([frames[TRAIN].assign(**{SPLIT: LUDWIG_SPLIT_CODE[TRAIN]}),
                       frames[VALIDATION].assign(**{SPLIT: LUDWIG_SPLIT_CODE[VALIDATION]})], ignore_index=True)
    train = train.sort_values(["group_key", PROMPT, RESPONSE], kind="stable").drop(columns="group_key")
    test = frames[TEST].sort_values(["group_key", PROMPT, RESPONSE], kind="stable").drop(columns="group_key")
    atomic_write_csv(task_dir / "train.csv", train)
    atomic_write_csv(task_dir / "test.csv", test)
    report.rows_out = {TRAIN: len(frames[TRAIN]), VALIDATION: len(frames[VALIDATION]), TEST: len(test)}
    report.files = {"train": str(task_dir / "train.csv"), "test": str(task_dir / "test.csv")}
    report.seconds = time.perf_counter() - started
    atomic_write_json(task_dir / "report.json", report.as_dict())
    return report
