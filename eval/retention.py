"""The retention matrix: what each adapter gained on its own tasks and what it lost on the others.

Rows are models (the base first, then each adapter), columns are tasks; each cell is the task's primary metric
(``eval.scoring.PRIMARY_METRIC``, higher is better) and its change from the base model on the same task. Pure
functions over plain numbers, so the arithmetic is tested on hand-made scores without any model.

Summary numbers (every mean weighs each adapter equally, then each of its tasks equally):

* **own-task gain**: mean change from the base on the tasks the adapter was trained on (its "own" tasks);
* **other-task change**: mean change on every other task in the matrix, a backward-transfer style forgetting
  figure (negative = the adapter made the model worse at tasks it was not trained for);
* **perplexity change**: each model's perplexity on a general-text probe relative to the base (positive =
  general language modelling got worse), the task-free view of forgetting.

Metrics keep their own scales (an exact-match rate and a chrF score are not rescaled), so a mean over tasks mixes
scales; the per-task cells are the primary evidence and the means a one-line digest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any

BASE = "base"


@dataclass(frozen=True)
class Cell:
    """One (model, task) score and its change from the base; None where a number does not exist."""

    score: float | None
    delta: float | None


@dataclass(frozen=True)
class RowSummary:
    """One adapter's digest: mean change on its own tasks and on every other task of the matrix."""

    model: str
    own_tasks: tuple[str, ...]
    own_gain: float | None
    other_change: float | None


@dataclass(frozen=True)
class Retention:
    """The matrix and its digests; ``as_dict`` is what report.json stores."""

    tasks: tuple[str, ...]
    models: tuple[str, ...]  # the base first
    metric: Mapping[str, str]  # task -> primary metric name
    cells: Mapping[str, Mapping[str, Cell]]  # model -> task -> cell
    rows: tuple[RowSummary, ...]  # one per adapter, in ``models`` order
    mean_own_gain: float | None
    mean_other_change: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "models": list(self.models),
            "metric": dict(self.metric),
            "cells": {m: {t: asdict(c) for t, c in row.items()} for m, row in self.cells.items()},
            "rows": [asdict(r) | {"own_tasks": list(r.own_tasks)} for r in self.rows],
            "mean_own_gain": self.mean_own_gain,
            "mean_other_change": self.mean_other_change,
        }


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the numbers that exist; None when there are none (never a misleading 0)."""
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def build_cells(scores: Mapping[str, Mapping[str, float | None]], tasks: Sequence[str],
                models: Sequence[str]) -> dict[str, dict[str, Cell]]:
    """Score and change from the base per (model, task); the base row's delta is None (it is the reference)."""
    base = scores.get(BASE, {})
    cells: dict[str, dict[str, Cell]] = {}
    for model in models:
        row: dict[str, Cell] = {}
        for task in tasks:
            score = scores.get(model, {}).get(task)
            reference = base.get(task)
            delta = None if model == BASE or score is None or reference is None else score - reference
            row[task] = Cell(score, delta)
        cells[model] = row
    return cells


def summarise_row(model: str, cells: Mapping[str, Cell], own_tasks: Sequence[str]) -> RowSummary:
    own = [t for t in cells if t in own_tasks]
    other = [t for t in cells if t not in own_tasks]
    return RowSummary(model=model, own_tasks=tuple(own),
                      own_gain=_mean([cells[t].delta for t in own]),
                      other_change=_mean([cells[t].delta for t in other]))


def build_retention(scores: Mapping[str, Mapping[str, float | None]], tasks: Sequence[str],
                    own_tasks: Mapping[str, Sequence[str]], metric: Mapping[str, str]) -> Retention:
    """The matrix from ``scores[model][task]`` (primary metric values) and each adapter's own tasks.

    ``own_tasks`` names every adapter (the base is added first, whatever the mapping's order).
    """
    models = (BASE, *[m for m in own_tasks if m != BASE])
    cells = build_cells(scores, tasks, models)
    rows = tuple(summarise_row(m, cells[m], own_tasks[m]) for m in models if m != BASE)
    return Retention(
        tasks=tuple(tasks), models=models, metric={t: metric[t] for t in tasks}, cells=cells, rows=rows,
        mean_own_gain=_mean([r.own_gain for r in rows]),
        mean_other_change=_mean([r.other_change for r in rows]),
    )


def perplexity_change(perplexity: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """``model -> probe -> perplexity / base perplexity - 1`` (0.10 = 10 % worse than the base; base: None)."""
    base = perplexity.get(BASE, {})
    return {model: {probe: (None if model == BASE or probe not in base or not base[probe]
                            else value / base[probe] - 1.0)
                    for probe, value in by_probe.items()}
            for model, by_probe in perplexity.items()}
