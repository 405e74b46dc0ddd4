"""Shared plumbing for every dataset module: reading published files, clear errors, splits.

Every dataset in ``prep/`` is one module that only knows its own schema; everything that must behave the same
for all of them (how a bad row is reported, how a split is drawn) lives here once; files are written atomically
through :mod:`ludwig_mt.io`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

Record = dict[str, Any]

TRAIN, VALIDATION, TEST = "train", "validation", "test"
# Ludwig's ``split: {type: fixed}`` reads 0/1/2 from the split column.
LUDWIG_SPLIT_CODE = {TRAIN: 0, VALIDATION: 1, TEST: 2}


class PrepError(ValueError):
    """A problem in the user's input, rendered as one line: where it is, what is wrong, how to fix it."""

    def __init__(self, where: str, problem: str, fix: str) -> None:
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class EmptyField(PrepError):
    """A required field is empty. Real public files have a few such rows (samsum, lamini_docs): by default they
    are dropped and counted in the report; ``--strict`` makes them stop the run at the first one."""

    def __init__(self, where: str, key: str) -> None:
        self.key = key
        super().__init__(where, f"empty field '{key}'", "fill in or delete that row")


class DropRow(Exception):
    """Raised by a dataset's ``to_fields`` for a row that is valid input but unusable; counted in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceRow:
    """One raw record with the place it came from, so any error can name the file and row."""

    data: Mapping[str, Any]
    where: str  # e.g. "data/train.jsonl: row 17"
    split: str | None = None  # the official split it came from, when the source has one


def where(path: str | os.PathLike[str], row: int) -> str:
    return f"{path}: row {row}"


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PrepError(str(path), "file not found", "pass an existing file, folder or hub dataset name as --source")
    except IsADirectoryError:
        raise PrepError(str(path), "is a folder, expected a file", "pass the data file itself")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PrepError(
            f"{path}: line {line}", f"not valid UTF-8 (byte {err.start})", "re-encode the file as UTF-8"
        ) from None
    if not text.strip():  # before any parser, which would report it as a syntax error or as zero rows
        raise PrepError(str(path), "empty file", "pass the file that holds the data (re-download or re-export it)")
    return text


def read_json_records(path: Path) -> list[SourceRow]:
    """A JSON list of objects, or a datasets-server page (``{"rows": [{"row": {...}}]}``)."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PrepError(f"{path}: line {err.lineno}", f"invalid JSON ({err.msg})", "fix or re-download the file")
    if isinstance(data, dict) and isinstance(data.get("rows"), list):  # Hugging Face datasets-server "rows" page
        data = [r.get("row", r) if isinstance(r, dict) else r for r in data["rows"]]
    if not isinstance(data, list):
        raise PrepError(str(path), "expected a JSON list of records", "pass the published JSON list file")
    rows = []
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec, dict):
            raise PrepError(where(path, i), f"expected a JSON object, got {type(rec).__name__}", "fix that row")
        rows.append(SourceRow(rec, where(path, i)))
    return rows


def read_jsonl_records(path: Path) -> list[SourceRow]:
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepError(where(path, i), f"invalid JSON ({err.msg})", "fix or remove that line")
        if not isinstance(rec, dict):
            raise PrepError(where(path, i), f"expected a JSON object, got {type(rec).__name__}", "fix that line")
        rows.append(SourceRow(rec, where(path, i)))
    return rows


def read_delimited_records(path: Path, delimiter: str) -> list[SourceRow]:
    """CSV/TSV with a header row; rows are numbered as a spreadsheet would (header = row 1)."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        for i, rec in enumerate(reader, start=2):
            if None in rec:  # more cells than header columns
                raise PrepError(where(path, i), f"{len(rec) - 1 + len(rec[None])} cells, header has {len(rec) - 1}",
                                "quote cells that contain the delimiter")
            rows.append(SourceRow(rec, where(path, i)))
    except csv.Error as err:
        raise PrepError(where(path, reader.line_num), f"unparseable {'TSV' if delimiter == chr(9) else 'CSV'} ({err})",
                        "fix the quoting of that row")
    return rows


def read_parquet_records(path: Path) -> list[SourceRow]:
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise PrepError(str(path), f"unreadable Parquet ({err})", "pass a valid Parquet file")
    return [SourceRow(rec, where(path, i)) for i, rec in enumerate(frame.to_dict("records"), start=1)]


READERS = {
    ".json": read_json_records,
    ".jsonl": read_jsonl_records,
    ".csv": lambda p: read_delimited_records(p, ","),
    ".tsv": lambda p: read_delimited_records(p, "\t"),
    ".parquet": read_parquet_records,
}


def read_records(path: str | os.PathLike[str]) -> list[SourceRow]:
    """Read a local data file by its extension; the one entry point for every dataset module."""
    p = Path(path)
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise PrepError(str(p), f"unknown file type '{p.suffix}'", f"use one of {', '.join(sorted(READERS))}")
    if not p.exists():
        raise PrepError(str(p), "file not found", "pass an existing file, folder or hub dataset name as --source")
    rows = reader(p)
    if not rows:  # a header-only CSV, ``[]``: a file that holds no data is a wrong file, never an empty task
        what = "header row only, no data rows" if p.suffix.lower() in (".csv", ".tsv") else "no records"
        raise PrepError(str(p), what, "pass the file that holds the data rows")
    return rows


def load_hub_rows(hub_name: str, split: str | None = None) -> list[SourceRow]:
    """Load a dataset from the Hugging Face Hub with ``datasets``; rows carry their official split."""
    import datasets  # imported lazily: it is slow to import and unused for local files

    try:
        loaded = datasets.load_dataset(hub_name, split=split)
    except Exception as err:
        raise PrepError(hub_name, f"could not load from the Hugging Face Hub ({type(err).__name__}: {err})",
                        "check the name and your network, or pass a local file with --source") from None
    splits = {split: loaded} if split else dict(loaded)
    rows = []
    for name, ds in splits.items():
        # Class labels come as integers; give every dataset module the label *names*, as the published files have.
        labels = {col: feat.int2str for col, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)}
        for i, rec in enumerate(ds, start=1):
            rec = {k: (labels[k](v) if k in labels and isinstance(v, int) and v >= 0 else v) for k, v in rec.items()}
            rows.append(SourceRow(rec, f"{hub_name}[{name}]: row {i}", split=name))
    return rows


def looks_like_local_path(source: str) -> bool:
    """A hub name is ``owner/name``; anything that exists on disk or has a file suffix is local."""
    p = Path(source)
    return p.exists() or p.suffix.lower() in READERS or source.startswith((".", "/", "~"))


def require_text(row: SourceRow, key: str, *, allow_empty: bool = False) -> str:
    """The text of a required field, or a one-line error naming the row and the missing/empty field."""
    if key not in row.data:
        present = ", ".join(sorted(map(str, row.data))) or "none"
        raise PrepError(row.where, f"missing field '{key}' (fields present: {present})",
                        "pass a file in the dataset's published format")
    value = row.data[key]
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    if not isinstance(value, str):
        value = str(value)
    if not allow_empty and not value.strip():
        raise EmptyField(row.where, key)
    return value.strip()


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by the key alone: the same row lands in the same split on every machine."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(key: str, *, test_fraction: float, validation_fraction: float, salt: str) -> str:
    """Assign a split by hashing the group key, so rows sharing a key can never straddle train and test."""
    u = stable_fraction(key, salt)
    if u < test_fraction:
        return TEST
    if u < test_fraction + validation_fraction:
        return VALIDATION
    return TRAIN


def normalise_key(*parts: str) -> str:
    """Case- and whitespace-insensitive key used for de-duplication and grouping."""
    return "\x1f".join(" ".join(p.lower().split()) for p in parts)


def split_quotas(sizes: Mapping[str, int], max_rows: int) -> dict[str, int]:
    """How many of ``max_rows`` rows to take from each split of ``sizes`` rows: in proportion to the sizes
    (largest remainders get the rounding), at least one from every non-empty split while ``max_rows`` allows.

    Taking the first ``max_rows`` rows of a source with official splits would read the train split only and
    leave the official test split empty; a proportional share keeps every split, at its own ratio. Pure.
    """
    total = sum(sizes.values())
    if total <= max_rows:
        return dict(sizes)
    exact = {name: max_rows * n / total for name, n in sizes.items()}
    quota = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (-(exact[name] - quota[name]), name))
    for name in by_remainder[: max_rows - sum(quota.values())]:
        quota[name] += 1
    for name in [n for n in sizes if sizes[n] and not quota[n]]:  # a split left out: one row from the largest
        donor = max(quota, key=lambda n: (quota[n], n))
        if quota[donor] > 1:
            quota[donor] -= 1
            quota[name] = 1
    return quota


@dataclass(frozen=True)
class RowsRead:
    """Per source split (``""``: rows without one): rows read and rows available, for the report."""

    read: dict[str, int]
    available: dict[str, int]

    def describe(self) -> str:
        parts = [f"{self.read[s]} of {self.available[s]}" + (f" {s}" if s else "") for s in self.available]
        return ", ".join(parts) + " rows"


def limit_rows(rows: list[SourceRow], max_rows: int | None) -> tuple[list[SourceRow], RowsRead]:
    """The first rows of each source split, ``max_rows`` in all, shared out by :func:`split_quotas`; the source
    order is kept within each split. ``None`` keeps every row."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row.split or ""] = sizes.get(row.split or "", 0) + 1
    quota = dict(sizes) if max_rows is None else split_quotas(sizes, max_rows)
    taken = dict.fromkeys(sizes, 0)
    kept = []
    for row in rows:
        name = row.split or ""
        if taken[name] < quota[name]:
            taken[name] += 1
            kept.append(row)
    return kept, RowsRead(taken, sizes)


def read_split_files(folder: Path, files: Mapping[str, str]) -> list[SourceRow]:
    """Rows of a folder holding one published file per official split, each row tagged with its split."""
    found = {split: folder / name for split, name in files.items() if (folder / name).exists()}
    if not found:
        raise PrepError(str(folder), "none of the published files found",
                        f"put {', '.join(files.values())} there, or pass one file")
    return [SourceRow(r.data, r.where, split=split) for split, path in found.items() for r in read_records(path)]


def read_file_or_folder(path: Path, folder_files: tuple[str, ...] = ()) -> list[SourceRow]:
    """A data file, or a folder holding the dataset's published files (the first of ``folder_files`` found,
    else every readable data file in it, sorted by name so the order is the same on every machine)."""
    if not path.is_dir():
        return read_records(path)
    for name in folder_files:
        if (path / name).exists():
            return read_records(path / name)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in READERS)
    if not files:
        raise PrepError(str(path), "folder has no data files", f"put the published files ({', '.join(folder_files) or 'json/jsonl/csv/tsv/parquet'}) there")
    return [row for f in files for row in read_records(f)]


@dataclass
class PrepReport:
    """Counts in and out, and every dropped row's reason: written as report.json next to the CSVs."""

    task: str
    source: str
    rows_in: int = 0
    rows_out: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    max_rows: int | None = None  # --max-rows, when given
    read: RowsRead | None = None  # with --max-rows: what was read of each source split

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def dropped_text(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items())) or "none"

    def as_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "source": self.source, "rows_in": self.rows_in, "rows_out": self.rows_out,
               "dropped": dict(sorted(self.dropped.items())), "seconds": round(self.seconds, 3),
               "files": self.files}
        if self.max_rows is not None and self.read is not None:
            out["max_rows"] = {"limit": self.max_rows, "read": self.read.read, "available": self.read.available,
                               "rule": "the first rows of each source split, in proportion to the splits' sizes"}
        return out
