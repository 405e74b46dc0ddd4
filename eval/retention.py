"""The retention matrix: what each adapter gained on its own tasks and what it lost on the others, with intervals.

Rows are models (the base first, then each adapter), columns are tasks; each cell is the task's primary metric
(``eval.scoring.PRIMARY_METRIC``, higher is better) with a 95 % bootstrap interval, and its change from the base
model on the same rows with a paired interval (``eval.stats``). A trivial baseline per task (``eval.baselines``)
is a further row: a cell that is not significantly above it is flagged, and a task whose base model is not
significantly above it is named as unable to show forgetting (the base has nothing there to lose).

Summary numbers (every mean weighs each adapter equally, then each of its tasks equally), each with an interval
from the same resamples of each task's rows for every model (rows resampled within each task, jointly):

* **own-task gain**: mean change from the base on the tasks the adapter was trained on (its "own" tasks);
* **other-task change**: mean change on every other task in the matrix, a backward-transfer style forgetting
  figure (negative = the adapter made the model worse at tasks it was not trained for);
* **perplexity change**: each model's perplexity on a general-text probe relative to the base (positive =
  general language modelling got worse), bootstrapped over the probe's texts, paired with the base.

Every change from the base (task cells and perplexity cells) is one test; the Benjamini-Hochberg procedure over
all of them decides which are reported as significant. An adapter trained with several seeds is scored on the mean
of its seeds' per-row values; the spread between the seeds is reported next to the bootstrap interval.

Metrics keep their own scales, so a mean over tasks mixes scales; the per-task cells are the primary evidence
and the means a one-line digest. Pure functions over arrays: tested on hand-made rows without any model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any

import numpy as np

from eval import stats
from eval.stats import Estimate, Resamples

BASE = "base"
BASELINE = "trivial baseline"
# Seeds of one adapter "repeat" when each seed's score is within this distance of the seeds' mean: 0.02 on the
# primary metrics' 0-1 scale, i.e. two percentage points (a share of the mean would be meaningless near 0).
REPEAT_TOLERANCE = 0.02
# Metrics where lower is better (the share of answers outside the label set); every other metric: higher is better.
LOWER_IS_BETTER = frozenset({"invalid"})
# A metric without per-row values (chrF, BLEU) moved when its change is at least this share of the larger value
# and at least this share of the metric's range (0-100 for HUNDRED_SCALE metrics, else 0-1).
DIRECTION_TOLERANCE = 0.02
HUNDRED_SCALE = frozenset({"chrF", "BLEU"})


@dataclass(frozen=True)
class CellInput:
    """One (model, task): primary-metric values per test row (mean over seeds; None when the metric has none),
    each seed's aggregate, and for the sign-disagreement check every score metric's aggregate and, where it has
    them, its per-row values (both means over seeds)."""

    rows: np.ndarray | None
    seed_values: tuple[float, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    metric_rows: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return fmean(self.seed_values) if self.seed_values else None


@dataclass(frozen=True)
class ProbeInput:
    """One (model, probe): each text's summed NLL and token count (NLL is the mean over seeds)."""

    nll: np.ndarray
    tokens: np.ndarray


@dataclass(frozen=True)
class Cell:
    """One (model, task) or (model, probe): score and change from the base, each with an interval; None where a
    number does not exist. ``significant``: the change survives the interval and false-discovery tests."""

    score: Estimate | None
    delta: Estimate | None = None
    q_value: float | None = None
    significant: bool | None = None
    vs_baseline: Estimate | None = None  # paired change from the trivial baseline
    beats_baseline: bool | None = None
    disagreement: str | None = None  # e.g. "rougeL ↑ chrF ↓": the task's metrics disagree in direction

    def as_dict(self) -> dict[str, Any]:
        return {k: (asdict(v) if isinstance(v, Estimate) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class RowSummary:
    """One adapter's digest: mean change on its own tasks and on every other task of the matrix."""

    model: str
    own_tasks: tuple[str, ...]
    own_gain: Estimate | None
    other_change: Estimate | None


@dataclass(frozen=True)
class SeedSpread:
    """The aggregate score of each seed of one adapter on one task, and whether they repeat within tolerance."""

    values: tuple[float, ...]
    mean: float
    spread: float  # max - min
    max_deviation: float  # max |seed - mean|, on the metric's scale
    repeats: bool  # max_deviation <= REPEAT_TOLERANCE


@dataclass(frozen=True)
class Retention:
    """The matrix, its baseline row, its digests and the tests behind them; ``as_dict`` is what report.json stores."""

    tasks: tuple[str, ...]
    models: tuple[str, ...]  # the base first
    metric: Mapping[str, str]  # task -> primary metric name
    cells: Mapping[str, Mapping[str, Cell]]  # model -> task -> cell
    baseline: Mapping[str, Estimate | None]  # task -> the trivial baseline's score
    floor_tasks: tuple[str, ...]  # the base is not significantly above the trivial baseline: no forgetting visible
    rows: tuple[RowSummary, ...]  # one per adapter, in ``models`` order
    mean_own_gain: Estimate | None
    mean_other_change: Estimate | None
    probes: tuple[str, ...] = ()
    perplexity: Mapping[str, Mapping[str, Cell]] = field(default_factory=dict)  # model -> probe -> cell
    seeds: Mapping[str, Mapping[str, SeedSpread]] = field(default_factory=dict)  # model -> task -> spread
    tests: int = 0  # changes tested (the Benjamini-Hochberg family)
    alpha: float = stats.ALPHA

    def repeats(self, model: str) -> bool | None:
        """"Repeats within ±2 %": every task's seeds within REPEAT_TOLERANCE (2 points) of their mean (None: one
        seed)."""
        spreads = self.seeds.get(model)
        return all(s.repeats for s in spreads.values()) if spreads else None

    def as_dict(self) -> dict[str, Any]:
        def est(e: Estimate | None) -> dict[str, Any] | None:
            return None if e is None else asdict(e)

        return {
            "tasks": list(self.tasks),
            "models": list(self.models),
            "metric": dict(self.metric),
            "cells": {m: {t: c.as_dict() for t, c in row.items()} for m, row in self.cells.items()},
            "baseline": {t: est(e) for t, e in self.baseline.items()},
            "floor_tasks": list(self.floor_tasks),
            "rows": [{"model": r.model, "own_tasks": list(r.own_tasks), "own_gain": est(r.own_gain),
                      "other_change": est(r.other_change)} for r in self.rows],
            "mean_own_gain": est(self.mean_own_gain),
            "mean_other_change": est(self.mean_other_change),
            "perplexity": {m: {p: c.as_dict() for p, c in row.items()} for m, row in self.perplexity.items()},
            "seeds": {m: {"tasks": {t: asdict(s) for t, s in row.items()}, "repeats": self.repeats(m)}
                      for m, row in self.seeds.items()},
            "repeat_tolerance": REPEAT_TOLERANCE,
            "tests": self.tests,
            "alpha": self.alpha,
        }


# ---------------------------------------------------------------------------------------------- single cells
def direction(metric: str, value: float, reference: float, change: Estimate | None = None) -> int:
    """+1 better, -1 worse, 0 no clear move. With a paired ``change`` (the metric has per-row values) it moved when
    its interval excludes 0; without one, when the change is at least DIRECTION_TOLERANCE of the larger value and of
    the metric's range (so BLEU 0.04 -> 0.08 on its 0-100 scale is no move)."""
    if change is not None:
        moved = not change.includes_zero()
    else:
        scale = 100.0 if metric in HUNDRED_SCALE else 1.0
        moved = abs(value - reference) > DIRECTION_TOLERANCE * max(abs(value), abs(reference), scale)
    if not moved or value == reference:
        return 0
    return 1 if (value > reference) != (metric in LOWER_IS_BETTER) else -1


def disagreement(metrics: Mapping[str, float], reference: Mapping[str, float],
                 changes: Mapping[str, Estimate] | None = None) -> str | None:
    """"rougeL ↑ chrF ↓" when some of a task's metrics got clearly better and others clearly worse than the base's
    (``changes``: paired changes of the metrics that have per-row values)."""
    changes = changes or {}
    moves = {m: direction(m, v, reference[m], changes.get(m)) for m, v in metrics.items() if m in reference}
    if not (1 in moves.values() and -1 in moves.values()):
        return None
    return " ".join(f"{m} {'↑' if d > 0 else '↓'}" for m, d in moves.items() if d)


def seed_spread(values: Sequence[float], tolerance: float = REPEAT_TOLERANCE) -> SeedSpread:
    mean = fmean(values)
    deviation = max(abs(v - mean) for v in values)
    return SeedSpread(tuple(values), mean, max(values) - min(values), deviation, deviation <= tolerance)


def _score(cell: CellInput | None, resamples: Resamples | None) -> Estimate | None:
    if cell is None or cell.value is None:
        return None
    if cell.rows is None or resamples is None:
        return Estimate(cell.value, None, None, 0)
    return stats.mean_estimate(cell.rows, resamples)


def _change(cell: CellInput | None, reference: np.ndarray | None, resamples: Resamples | None) -> Estimate | None:
    if cell is None or cell.rows is None or reference is None or resamples is None:
        return None
    return stats.change_estimate(cell.rows, reference, resamples)


# ---------------------------------------------------------------------------------------------- summaries
Part = tuple[float, "np.ndarray | None"]  # a change and its resampled distribution (None: no interval)


def combine(parts: Sequence[Part]) -> Part | None:
    """The mean of several changes; its distribution is the mean of theirs, which is a joint bootstrap because
    every model's changes on a task come from the same resamples of that task's rows."""
    if not parts:
        return None
    distributions = [d for _, d in parts]
    joint = None if any(d is None for d in distributions) else np.mean(distributions, axis=0)
    return fmean(v for v, _ in parts), joint


def part_estimate(part: Part | None, n: int) -> Estimate | None:
    if part is None:
        return None
    value, distribution = part
    return stats.estimate(value, distribution, n, test=True) if distribution is not None \
        else Estimate(value, None, None, n)


def summarise_row(model: str, parts: Mapping[str, Part], own_tasks: Sequence[str],
                  rows: Mapping[str, int]) -> tuple[RowSummary, Part | None, Part | None]:
    """Own-task gain and other-task change of one adapter from its per-task changes (``parts``), plus the two
    combined parts for the pooled means over adapters."""
    own = [t for t in parts if t in own_tasks]
    other = [t for t in parts if t not in own_tasks]
    own_part, other_part = combine([parts[t] for t in own]), combine([parts[t] for t in other])
    summary = RowSummary(model, tuple(t for t in rows if t in own_tasks),
                         part_estimate(own_part, sum(rows[t] for t in own)),
                         part_estimate(other_part, sum(rows[t] for t in other)))
    return summary, own_part, other_part


# ---------------------------------------------------------------------------------------------- the matrix
def build_retention(inputs: Mapping[str, Mapping[str, CellInput]], tasks: Sequence[str],
                    own_tasks: Mapping[str, Sequence[str]], metric: Mapping[str, str], *,
                    baseline: Mapping[str, np.ndarray | None] | None = None,
                    probes: Mapping[str, Mapping[str, ProbeInput]] | None = None) -> Retention:
    """The matrix from ``inputs[model][task]`` and each adapter's own tasks.

    ``own_tasks`` names every adapter (the base is added first, whatever the mapping's order); ``baseline`` holds
    the trivial baseline's primary-metric rows per task; ``probes[model][probe]`` each text's NLL and tokens.
    """
    models = (BASE, *[m for m in own_tasks if m != BASE])
    draft: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in models}
    parts: dict[str, dict[str, Part]] = {m: {} for m in models}  # model -> task -> change and its resamples
    n_rows: dict[str, int] = {}
    baseline_scores: dict[str, Estimate | None] = {}
    for task in tasks:
        entries, task_parts, n_rows[task], baseline_scores[task] = _task_column(
            task, inputs, models, (baseline or {}).get(task))
        for model in models:
            draft[model][task] = entries[model]
            if model in task_parts:
                parts[model][task] = task_parts[model]
    ppl_draft, probe_names = _perplexity_draft(probes or {}, models)
    q_values = _adjust(draft, ppl_draft)
    cells = {m: {t: _finish(e, q_values.get((m, t))) for t, e in row.items()} for m, row in draft.items()}
    ppl_cells = {m: {p: _finish(e, q_values.get((m, f"probe:{p}"))) for p, e in row.items()}
                 for m, row in ppl_draft.items()}
    summaries = [summarise_row(m, parts[m], own_tasks[m], n_rows) for m in models if m != BASE]
    floor_tasks = tuple(t for t in tasks if cells[BASE][t].vs_baseline is not None
                        and not cells[BASE][t].beats_baseline)
    own_parts = [own for _, own, _ in summaries if own is not None]
    other_parts = [other for _, _, other in summaries if other is not None]
    return Retention(
        tasks=tuple(tasks), models=models, metric={t: metric[t] for t in tasks}, cells=cells,
        baseline=baseline_scores, floor_tasks=floor_tasks, rows=tuple(r for r, _, _ in summaries),
        mean_own_gain=part_estimate(combine(own_parts), sum(n_rows.values())),
        mean_other_change=part_estimate(combine(other_parts), sum(n_rows.values())),
        probes=probe_names, perplexity=ppl_cells, seeds=_seed_spreads(inputs, models, tasks),
        tests=len(q_values),
    )


def _task_column(task: str, inputs: Mapping[str, Mapping[str, CellInput]], models: Sequence[str],
                 floor: np.ndarray | None) -> tuple[dict[str, dict[str, Any]], dict[str, Part], int, Estimate | None]:
    """One task's cells before false-discovery control, every model on the same resamples of the task's rows: the
    entries, each adapter's change with its resampled distribution, the row count and the baseline's score."""
    base = inputs.get(BASE, {}).get(task)
    n = len(base.rows) if base is not None and base.rows is not None else 0
    resamples = stats.draw(n, task) if n else None
    floor_rows = floor if floor is not None and resamples is not None and len(floor) == n else None
    floor_score = stats.mean_estimate(floor_rows, resamples) if floor_rows is not None else None  # type: ignore[arg-type]
    entries: dict[str, dict[str, Any]] = {}
    parts: dict[str, Part] = {}
    for model in models:
        cell = inputs.get(model, {}).get(task)
        versus = _change(cell, floor_rows, resamples)
        entry: dict[str, Any] = {"score": _score(cell, resamples), "vs_baseline": versus,
                                 "beats_baseline": None if versus is None else versus.above_zero()}
        if model != BASE and cell is not None and cell.value is not None and base is not None \
                and base.value is not None:
            delta = _change(cell, base.rows, resamples) or Estimate(cell.value - base.value, None, None, 0)
            paired = {m: stats.change_estimate(v, base.metric_rows[m], resamples)  # type: ignore[arg-type]
                      for m, v in cell.metric_rows.items() if m in base.metric_rows and resamples is not None}
            entry |= {"delta": delta, "disagreement": disagreement(cell.metrics, base.metrics, paired)}
            parts[model] = (delta.value, resamples.means(cell.rows - base.rows)  # type: ignore[union-attr,operator]
                            if delta.has_interval else None)
        entries[model] = entry
    return entries, parts, n, floor_score


def _perplexity_draft(probes: Mapping[str, Mapping[str, ProbeInput]],
                      models: Sequence[str]) -> tuple[dict[str, dict[str, dict[str, Any]]], tuple[str, ...]]:
    base = probes.get(BASE, {})
    names = tuple(dict.fromkeys(p for row in probes.values() for p in row))
    draft: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        reference = base.get(name)
        resamples = stats.draw(len(reference.nll), f"probe:{name}") if reference is not None else None
        for model in models:
            value = probes.get(model, {}).get(name)
            if value is None or resamples is None:
                continue
            entry: dict[str, Any] = {"score": stats.perplexity_estimate(value.nll, value.tokens, resamples)}
            if model != BASE and reference is not None:
                entry["delta"] = stats.perplexity_change_estimate(value.nll, value.tokens, reference.nll,
                                                                  reference.tokens, resamples)
            draft.setdefault(model, {})[name] = entry
    return draft, names


def _adjust(draft: Mapping[str, Mapping[str, Mapping[str, Any]]],
            ppl_draft: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[tuple[str, str], float]:
    """Benjamini-Hochberg q-value of every change with a p-value: task cells, then perplexity cells."""
    keys, p_values = [], []
    for prefix, table in (("", draft), ("probe:", ppl_draft)):
        for model, row in table.items():
            for column, entry in row.items():
                delta = entry.get("delta")
                if delta is not None and delta.p_value is not None:
                    keys.append((model, prefix + column))
                    p_values.append(delta.p_value)
    return dict(zip(keys, stats.adjust_p_values(p_values), strict=True))


def _finish(entry: Mapping[str, Any], q_value: float | None) -> Cell:
    delta = entry.get("delta")
    significant = None if delta is None else stats.is_significant(delta, q_value)
    return Cell(score=entry["score"], delta=delta, q_value=q_value, significant=significant,
                vs_baseline=entry.get("vs_baseline"), beats_baseline=entry.get("beats_baseline"),
                disagreement=entry.get("disagreement"))


def _seed_spreads(inputs: Mapping[str, Mapping[str, CellInput]], models: Sequence[str],
                  tasks: Sequence[str]) -> dict[str, dict[str, SeedSpread]]:
    spreads: dict[str, dict[str, SeedSpread]] = {}
    for model in models:
        for task in tasks:
            cell = inputs.get(model, {}).get(task)
            if cell is not None and len(cell.seed_values) > 1:
                spreads.setdefault(model, {})[task] = seed_spread(cell.seed_values)
    return spreads
