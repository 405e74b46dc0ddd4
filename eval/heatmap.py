"""retention.png: the matrix as a heatmap, the trivial baseline as its last row.

Colour is the change from the base (green better, red worse); a change that is not significant (``eval.stats``)
is drawn grey and hatched, so noise never looks like a finding. Each cell's text is the same as the report's:
score and interval, change and interval, n and flags.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from eval.formatting import BELOW_BASELINE, NOT_SIGNIFICANT, fmt_change, fmt_estimate
from eval.retention import BASELINE, Retention
from ludwig_mt.io import atomic_path

# Smallest colour ranges: a change this large is drawn at full colour at most, so noise never looks dramatic.
MIN_SCORE_RANGE = 0.10  # primary metrics are rates/scores in [0, 1] (eval.scoring)
# Perplexity changes are ratios spanning orders of magnitude: coloured on a log2 scale, full colour at 4x (or 1/4x).
PERPLEXITY_FULL_LOG2 = 2.0
NOT_SIGNIFICANT_COLOUR = "#d9d9d9"
MISSING_COLOUR = "#eeeeee"
PALE_ALPHA = 0.35  # a significant change that leaves the model at or under the trivial baseline


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def task_colour_scale(retention: Retention) -> float:
    """The score change drawn at full colour: the largest in the matrix, at least MIN_SCORE_RANGE."""
    deltas = [abs(c.delta.value) for row in retention.cells.values() for c in row.values() if c.delta is not None]
    return max([MIN_SCORE_RANGE, *deltas])


def perplexity_colour(relative_change: float | None) -> float | None:
    """-log2(perplexity ratio) / 2, in [-1, 1]: 4x the base perplexity is full red, a quarter full green."""
    if relative_change is None or relative_change <= -1:
        return None
    return _clip(-math.log2(1 + relative_change) / PERPLEXITY_FULL_LOG2)


def _text(score: str, change: str, tail: str) -> str:
    return "\n".join(part for part in (score, change, tail) if part)


def heatmap_columns(retention: Retention, own_tasks: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One column per task, then one per probe: label, and per row (models, then the baseline) its text, colour
    value in [-1, 1] (None: no colour), hatched (not significant), pale (a significant change that still leaves the
    model at or under the task's trivial baseline: coloured like learning, it would read as learning) and own
    (boxed) flags."""
    models = list(retention.models)
    scale = task_colour_scale(retention)
    columns = []
    for task in retention.tasks:
        texts, colours, hatched, pale, own = [], [], [], [], []
        for model in models:
            cell = retention.cells[model][task]
            flags = " ".join(f for f in (f"n={cell.score.n}" if cell.score and cell.score.n else "",
                                         BELOW_BASELINE if cell.beats_baseline is False else "") if f)
            texts.append(_text(fmt_estimate(cell.score), "" if cell.delta is None
                               else fmt_change(cell.delta, cell.significant), flags))
            colours.append(None if cell.delta is None else _clip(cell.delta.value / scale))
            hatched.append(cell.delta is not None and not cell.significant)
            pale.append(cell.delta is not None and bool(cell.significant) and cell.beats_baseline is False)
            own.append(task in own_tasks.get(model, []))
        floor = retention.baseline.get(task)
        texts.append(fmt_estimate(floor) if floor is not None else "—")
        colours.append(None)
        hatched.append(False)
        pale.append(False)
        own.append(False)
        columns.append({"kind": "task", "label": f"{task}\n{retention.metric[task]}", "texts": texts,
                        "colours": colours, "hatched": hatched, "pale": pale, "own": own})
    for probe in retention.probes:
        texts, colours, hatched = [], [], []
        for model in models:
            cell = retention.perplexity.get(model, {}).get(probe)
            delta = cell.delta if cell is not None else None
            texts.append("—" if cell is None else _text(fmt_estimate(cell.score), "" if delta is None else
                                                         fmt_change(delta, cell.significant, percent=True), ""))
            colours.append(perplexity_colour(None if delta is None else delta.value))
            hatched.append(delta is not None and not cell.significant)  # type: ignore[union-attr]
        columns.append({"kind": "perplexity", "label": f"{probe}\nperplexity (lower = better)",
                        "texts": [*texts, ""], "colours": [*colours, None], "hatched": [*hatched, False],
                        "pale": [False] * (len(models) + 1), "own": [False] * (len(models) + 1)})
    return columns


def write_heatmap(retention: Retention, own_tasks: dict[str, list[str]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [*retention.models, BASELINE]
    columns = heatmap_columns(retention, own_tasks)
    n_rows, n_cols = len(rows), len(columns)
    fig, ax = plt.subplots(figsize=(2.4 * n_cols + 2.4, 1.0 * n_rows + 2.2), dpi=150)
    cmap = plt.get_cmap("RdYlGn")
    for col, column in enumerate(columns):
        cells = zip(column["texts"], column["colours"], column["hatched"], column["pale"], column["own"],
                    strict=True)
        for row, (text, value, hatched, pale, own) in enumerate(cells):
            colour = (MISSING_COLOUR if value is None else NOT_SIGNIFICANT_COLOUR if hatched
                      else cmap(0.5 + 0.42 * value, alpha=PALE_ALPHA if pale else 1.0))
            ax.add_patch(Rectangle((col, row), 1, 1, facecolor=colour, edgecolor="white", linewidth=2,
                                   hatch="///" if hatched else None))
            if own:
                ax.add_patch(Rectangle((col + 0.04, row + 0.06), 0.92, 0.88, fill=False, edgecolor="#222222",
                                       linewidth=2.2))
            strong = value is not None and not hatched and not pale and abs(value) > 0.75  # white text readable
            ax.text(col + 0.5, row + 0.5, text, ha="center", va="center", fontsize=7.5,
                    fontweight="bold" if own else "normal", color="white" if strong else "#111111",
                    bbox={"facecolor": "white", "alpha": 0.6, "edgecolor": "none", "pad": 1} if hatched else None)
    first_probe = next((i for i, c in enumerate(columns) if c["kind"] == "perplexity"), None)
    if first_probe:
        ax.axvline(first_probe, color="#555555", linewidth=1.5)  # tasks | general-text perplexity
    ax.axhline(len(retention.models), color="#555555", linewidth=1.5)  # models | trivial baseline
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_xticks([i + 0.5 for i in range(n_cols)], [c["label"] for c in columns], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(n_rows)], rows, fontsize=10)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Retention: {title}", fontsize=13, fontweight="bold", pad=12, loc="left")
    note = (f"cell: score [95 % CI], change from base [paired 95 % CI], n · colour: change from base, green better, "
            f"red worse (full colour at ±{task_colour_scale(retention):.2f} for tasks, at 4× or ¼× for perplexity) · "
            f"grey hatched / {NOT_SIGNIFICANT}: no significant change (CI includes 0 or not significant after "
            f"Benjamini-Hochberg over {retention.tests} changes) · {BELOW_BASELINE}: not above the trivial baseline "
            "(pale when the change is significant: it moved, but not past a trivial answer) · boxed: the adapter's "
            "own task")
    width_chars = int(fig.get_figwidth() * 15)  # about 15 characters of 8-pt text per inch
    fig.text(0.01, 0.01, textwrap.fill(note, width_chars), fontsize=8, color="#444444", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.03 * (len(note) // width_chars), 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)

