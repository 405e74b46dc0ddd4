"""A multi-task mixture: prepared tasks combined with per-task caps, the usual answer to catastrophic forgetting.

Replaying a share of every earlier task while fine-tuning on a new one keeps the other skills alive; the caps
set the proportions. Rows are chosen by a stable hash, so the same caps always give the same mixture, and each
task keeps its own leak-free split (train rows come only from the tasks' train.csv, test rows from test.csv).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ludwig_mt.io import atomic_write_csv, atomic_write_json
from prep.common import PrepError, PrepReport, stable_fraction
from prep.task import PROMPT, RESPONSE, SPLIT, TASK

MIX_TASK = "multitask"
MIX_CONFIG = "multitask.yaml"  # the YAML in ludwig_configs/ that trains the mixture


def parse_caps(items: list[str]) -> dict[str, int | None]:
    """``["sql:2000", "detox"]`` -> ``{"sql": 2000, "detox": None}`` (None: every row)."""
    caps: dict[str, int | None] = {}
    for item in items:
        name, _, cap = item.partition(":")
        if cap and not cap.isdigit():
            raise PrepError(item, "cap is not a whole number", "write task:rows, e.g. sql:2000")
        caps[name] = int(cap) if cap else None
    return caps


def read_prepared(path: Path) -> pd.DataFrame:
    """A task's prepared train.csv or test.csv, refused with one line when missing, unreadable or without rows:
    a task with no held-out rows would silently drop out of every score of the mixture, one with no training
    rows out of its training."""
    task, what = path.parent.name, "test" if path.stem == "test" else "training"
    if not path.exists():
        raise PrepError(str(path), "file not found", f"run ./run.sh prep {task} first")
    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise PrepError(str(path), f"unreadable ({str(err).splitlines()[0]})", f"re-run ./run.sh prep {task}") from None
    if frame.empty:
        raise PrepError(str(path), f"no {what} rows", f"re-run ./run.sh prep {task} with more rows, or leave "
                        f"{task} out of the mix")
    return frame


def take(frame: pd.DataFrame, cap: int | None, salt: str) -> pd.DataFrame:
    """The first ``cap`` rows in a stable hash order (all rows when cap is None), in that order."""
    order = (frame[PROMPT] + "\x1f" + frame[RESPONSE]).map(lambda key: stable_fraction(key, salt))
    ranked = frame.assign(_order=order).sort_values("_order", kind="stable")
    return (ranked if cap is None else ranked.head(cap)).drop(columns="_order")


def build_mixture(prepared: Path, caps: Mapping[str, int | None], out: Path,
                  test_cap: int | None = None) -> PrepReport:
    """Write ``<out>/multitask/{train,test}.csv`` and ``report.json`` from ``<prepared>/<task>/`` folders."""
    started = time.perf_counter()
    report = PrepReport(task=MIX_TASK, source=", ".join(f"{t}:{c if c else 'all'}" for t, c in caps.items()))
    train_parts, test_parts = [], []
    for task, cap in caps.items():
        train = read_prepared(prepared / task / "train.csv")
        test = read_prepared(prepared / task / "test.csv")
        report.rows_in += len(train) + len(test)
        train_parts.append(take(train, cap, salt=f"mix:{task}"))
        test_parts.append(take(test, test_cap, salt=f"mix-test:{task}"))
    train = pd.concat(train_parts, ignore_index=True)
    test = pd.concat(test_parts, ignore_index=True)
    leading = [PROMPT, RESPONSE, TASK]
    train = train[leading + [c for c in train.columns if c not in (*leading, SPLIT)] + [SPLIT]]
    test = test[leading + [c for c in test.columns if c not in leading]]
    folder = out / MIX_TASK
    atomic_write_csv(folder / "train.csv", train)
    atomic_write_csv(folder / "test.csv", test)
    counts = train.groupby([TASK, SPLIT]).size()
    report.rows_out = {"train": int((train[SPLIT] == 0).sum()), "validation": int((train[SPLIT] == 1).sum()),
                       "test": len(test)}
    report.files = {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}
    report.seconds = time.perf_counter() - started
    atomic_write_json(folder / "report.json", report.as_dict() | {
        "per_task": {task: {"train": int(counts.get((task, 0), 0)), "validation": int(counts.get((task, 1), 0)),
                            "test": int((test[TASK] == task).sum())} for task in caps}})
    return report
