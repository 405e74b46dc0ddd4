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


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise PrepError(str(path), "file not found", f"run ./run.sh prep {path.parent.name} first")
    return pd.read_csv(path, keep_default_na=False)


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
        train = _read(prepared / task / "train.csv")
        test = _read(prepared / task / "test.csv")
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
