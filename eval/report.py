"""The eval report in ``reports/<name>/``: report.md (tables to paste into a pull request), report.json (every
number) and retention.png (the matrix as a heatmap). All three are written to a temporary name and renamed.

The tables are built once as rows of strings (:func:`matrix_table`, :func:`summary_table`, ...) and rendered both
as Markdown here and as the terminal summary of ``python -m eval``, so the two never disagree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.retention import BASE
from eval.runner import EvalResult
from ludwig_mt.io import atomic_path, atomic_write_json, atomic_write_text

Table = tuple[list[str], list[list[str]]]  # header, rows

REPORT_MD, REPORT_JSON, RETENTION_PNG, LOG_FILE = "report.md", "report.json", "retention.png", "eval.log"


# ---------------------------------------------------------------------------------------------- number formats
def fmt(value: float | None) -> str:
    """Scores on a 0-1 scale get 3 decimals, larger scales (chrF, perplexity) 2; missing is an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def fmt_delta(value: float | None) -> str:
    return "—" if value is None else ("+" if value >= 0 else "-") + fmt(abs(value))


def fmt_percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:+.1f} %"


# ---------------------------------------------------------------------------------------------- tables
def matrix_table(result: EvalResult, *, bold_own: bool = True) -> Table:
    """Rows = models, columns = tasks; each cell "score (delta)", an adapter's own tasks in bold."""
    r = result.retention
    header = ["model", *[f"{t} ({r.metric[t]})" for t in r.tasks]]
    rows = []
    for model in r.models:
        cells = []
        for task in r.tasks:
            cell = r.cells[model][task]
            text = fmt(cell.score) if model == BASE else f"{fmt(cell.score)} ({fmt_delta(cell.delta)})"
            own = task in result.own_tasks.get(model, [])
            cells.append(f"**{text}**" if own and bold_own else text)
        rows.append([model, *cells])
    return header, rows


def summary_table(result: EvalResult) -> Table:
    """Per adapter: own tasks, mean gain on them, mean change on the others, perplexity change per probe."""
    change = result.perplexity_change()
    probes = list(result.probes)
    header = ["model", "own tasks", "own-task gain", "other-task change",
              *[f"perplexity change ({p})" for p in probes]]
    rows = [[row.model, ", ".join(result.own_tasks.get(row.model, [])) or "—", fmt_delta(row.own_gain),
             fmt_delta(row.other_change), *[fmt_percent(change.get(row.model, {}).get(p)) for p in probes]]
            for row in result.retention.rows]
    return header, rows


def perplexity_table(result: EvalResult) -> Table:
    probes = list(result.probes)
    change = result.perplexity_change()
    header = ["model", *[f"{p} ({result.probes[p]} texts)" for p in probes]]
    rows = []
    for model, by_probe in result.perplexity.items():
        cells = [fmt(by_probe.get(p)) if model == BASE
                 else f"{fmt(by_probe.get(p))} ({fmt_percent(change[model].get(p))})" for p in probes]
        rows.append([model, *cells])
    return header, rows


def task_metrics_table(result: EvalResult, task: str) -> Table:
    """Every metric of one task, one row per model, with the change from the base for each."""
    pairs = [p for p in result.pairs if p.task == task]
    metrics = sorted({m for p in pairs for m in p.scores})
    base = result.pair(BASE, task)
    header = ["model", *metrics]
    rows = []
    for p in pairs:
        cells = []
        for m in metrics:
            value = p.scores.get(m)
            ref = base.scores.get(m) if base else None
            delta = None if p.model == BASE or value is None or ref is None else value - ref
            cells.append(fmt(value) if delta is None else f"{fmt(value)} ({fmt_delta(delta)})")
        rows.append([p.model, *cells])
    return header, rows


def lm_eval_table(result: EvalResult) -> Table:
    columns = sorted({(task, metric) for by_task in result.lm_eval.values() for task, metrics in by_task.items()
                      for metric in metrics})
    header = ["model", *[f"{task} {metric}" for task, metric in columns]]
    rows = [[model, *[fmt(by_task.get(task, {}).get(metric)) for task, metric in columns]]
            for model, by_task in result.lm_eval.items()]
    return header, rows


def settings_table(result: EvalResult) -> Table:
    header = ["task", "max input tokens", "max new tokens", "batch size", "settings from", "test rows", "evaluated"]
    rows = [[task, str(s.get("max_input_tokens")), str(s.get("max_new_tokens")), str(s.get("batch_size")),
             f"`{s['source']}`", str(result.rows[task]["test_rows"]), str(result.rows[task]["evaluated"])]
            for task, s in result.settings.items()]
    return header, rows


def timings_table(result: EvalResult) -> Table:
    header = ["step", "seconds", "note"]
    rows = [[name, f"{sec:.1f}", ""] for name, sec in result.timings.items() if name != "total"]
    rows += [[f"{p.model} × {p.task}", f"{p.seconds_generate + p.seconds_score:.1f}",
              ("cached; " if p.cached else "") + f"generate {p.seconds_generate:.1f} s, score {p.seconds_score:.1f} s"]
             for p in result.pairs]
    rows.append(["total (this run)", f"{result.timings.get('total', 0.0):.1f}", ""])
    return header, rows


def markdown(table: Table) -> str:
    header, rows = table

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


# ---------------------------------------------------------------------------------------------- report.md / json
def render_markdown(result: EvalResult, generated_at: str) -> str:
    req, ret = result.request, result.retention
    models = (["model", "weights", "own tasks"],
              [[BASE, f"`{req.base_model}`", "—"]] +
              [[m.name, f"`{m.path}`", ", ".join(result.own_tasks.get(m.name, [])) or "—"] for m in req.models])
    parts = [
        f"# Eval report: {req.name}",
        f"Tasks: {', '.join(req.tasks)}. Generated {generated_at}.",
        markdown(models),
        "## Retention matrix",
        "Each task's primary metric (higher is better); an adapter's cells show the score and its change from "
        "the base model in parentheses; **bold** = a task the adapter was trained on.",
        markdown(matrix_table(result)),
        "![retention matrix](retention.png)",
        "## Summary",
        f"- Mean gain on the adapters' own tasks: **{fmt_delta(ret.mean_own_gain)}**\n"
        f"- Mean change on the other tasks (backward-transfer style forgetting, negative = forgot): "
        f"**{fmt_delta(ret.mean_other_change)}**\n"
        "- Means weigh each adapter equally, then each of its tasks; metrics keep their own scales.",
        markdown(summary_table(result)),
    ]
    if result.probes:
        names = ", ".join(f"`{p.name}` ({len(p.texts)} texts from `{p.source or 'memory'}`)"
                          for p in req.probes)
        parts += ["## General-text perplexity",
                  f"Perplexity of each model on the probe sets {names} (lower is better; change relative to the "
                  "base in parentheses): how much general language modelling each fine-tune cost.",
                  markdown(perplexity_table(result))]
    if result.lm_eval:
        parts += ["## lm-eval-harness", markdown(lm_eval_table(result))]
    parts.append("## All metrics per task")
    for task in req.tasks:
        parts += [f"### {task}", markdown(task_metrics_table(result, task))]
    parts += [
        "## Settings and rows",
        f"Device: `{req.device or 'auto'}`; max rows per task: {req.max_rows or 'all'}; cache: `{req.cache}`. "
        "Every model generates on a task with that task's settings (greedy decoding).",
        markdown(settings_table(result)),
        "## Timings",
        markdown(timings_table(result)),
    ]
    return "\n\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report_data(result: EvalResult, generated_at: str) -> dict[str, Any]:
    req = asdict(result.request)
    req["probes"] = [{"name": p.name, "texts": len(p.texts), "source": p.source} for p in result.request.probes]
    return _jsonable({
        "name": result.request.name,
        "generated_at": generated_at,
        "request": req,
        "own_tasks": result.own_tasks,
        "retention": result.retention.as_dict(),
        "scores": {f"{p.model}/{p.task}": p.scores for p in result.pairs},
        "pairs": [asdict(p) for p in result.pairs],
        "perplexity": result.perplexity,
        "perplexity_change": result.perplexity_change(),
        "probes": result.probes,
        "lm_eval": result.lm_eval,
        "settings": result.settings,
        "rows": result.rows,
        "timings": result.timings,
    })


# ---------------------------------------------------------------------------------------------- retention.png
# Smallest colour ranges: a change this large is drawn at full colour at most, so noise never looks dramatic.
MIN_SCORE_RANGE = 0.10  # primary metrics are rates/scores in [0, 1] (eval.scoring)
# Perplexity changes are ratios spanning orders of magnitude: coloured on a log2 scale, full colour at 4x (or 1/4x).
PERPLEXITY_FULL_LOG2 = 2.0


def _colour_values(changes: Sequence[float | None], scale: float) -> list[float | None]:
    """Changes scaled to [-1, 1] by ``scale`` (one scale shared by all task columns)."""
    return [None if c is None else max(-1.0, min(1.0, c / scale)) for c in changes]


def task_colour_scale(result: EvalResult) -> float:
    """The score change drawn at full colour: the largest in the matrix, at least MIN_SCORE_RANGE."""
    deltas = [abs(c.delta) for row in result.retention.cells.values() for c in row.values() if c.delta is not None]
    return max([MIN_SCORE_RANGE, *deltas])


def perplexity_colour(relative_change: float | None) -> float | None:
    """-log2(perplexity ratio) / 2, in [-1, 1]: 4x the base perplexity is full red, a quarter full green."""
    if relative_change is None or relative_change <= -1:
        return None
    return max(-1.0, min(1.0, -math.log2(1 + relative_change) / PERPLEXITY_FULL_LOG2))


def heatmap_columns(result: EvalResult) -> list[dict[str, Any]]:
    """One column per task, then one per perplexity probe: kind, label, texts per row, colour values, own flags."""
    ret, models = result.retention, result.retention.models
    change = result.perplexity_change()
    task_scale = task_colour_scale(result)
    columns = []
    for task in ret.tasks:
        cells = [ret.cells[m][task] for m in models]
        columns.append({
            "kind": "task",
            "label": f"{task}\n{ret.metric[task]}",
            "texts": [fmt(c.score) if m == BASE else f"{fmt(c.score)}\n{fmt_delta(c.delta)}"
                      for m, c in zip(models, cells)],
            "colours": _colour_values([c.delta for c in cells], task_scale),
            "own": [task in result.own_tasks.get(m, []) for m in models],
        })
    for probe in result.probes:
        values = [result.perplexity.get(m, {}).get(probe) for m in models]
        rel = [change.get(m, {}).get(probe) for m in models]
        columns.append({
            "kind": "perplexity",
            "label": f"{probe}\nperplexity (lower = better)",
            "texts": [fmt(v) if m == BASE else f"{fmt(v)}\n{fmt_percent(r)}" for m, v, r in zip(models, values, rel)],
            "colours": [perplexity_colour(r) for r in rel],
            "own": [False] * len(models),
        })
    return columns


def write_heatmap(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    models = list(result.retention.models)
    columns = heatmap_columns(result)
    n_rows, n_cols = len(models), len(columns)
    fig, ax = plt.subplots(figsize=(1.9 * n_cols + 2.2, 0.8 * n_rows + 2.0), dpi=150)
    cmap = plt.get_cmap("RdYlGn")
    for col, column in enumerate(columns):
        for row, (text, value, own) in enumerate(zip(column["texts"], column["colours"], column["own"])):
            colour = "#e6e6e6" if value is None else cmap(0.5 + 0.42 * value)
            ax.add_patch(Rectangle((col, row), 1, 1, facecolor=colour, edgecolor="white", linewidth=2))
            if own:
                ax.add_patch(Rectangle((col + 0.04, row + 0.06), 0.92, 0.88, fill=False, edgecolor="#222222",
                                       linewidth=2.2))
            strong = value is not None and abs(value) > 0.75  # dark green/red: white text stays readable
            ax.text(col + 0.5, row + 0.5, text, ha="center", va="center", fontsize=10,
                    fontweight="bold" if own else "normal", color="white" if strong else "#111111")
    first_probe = next((i for i, c in enumerate(columns) if c["kind"] == "perplexity"), None)
    if first_probe:
        ax.axvline(first_probe, color="#555555", linewidth=1.5)  # tasks | general-text perplexity
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_xticks([i + 0.5 for i in range(n_cols)], [c["label"] for c in columns], fontsize=10)
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(n_rows)], models, fontsize=11)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Retention: {result.request.name}", fontsize=13, fontweight="bold", pad=12, loc="left")
    note = (f"cell: score and change from base · colour: change from base, green better, red worse (full colour at "
            f"±{task_colour_scale(result):.2f} for tasks, at 4× or ¼× for perplexity) · boxed: the adapter's own task")
    width_chars = int(fig.get_figwidth() * 15)  # about 15 characters of 8-pt text per inch
    fig.text(0.01, 0.01, textwrap.fill(note, width_chars), fontsize=8, color="#444444", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.03 * (len(note) // width_chars), 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- all three
@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """Everything logged meanwhile (ours, transformers', warnings) goes to the report's eval.log, not the terminal;
    transformers' own "Loading weights" bars are switched off too (ours, per task, stay)."""
    from transformers.utils import logging as hf_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
        if bars_were_on:
            hf_logging.enable_progress_bar()


def write_report(result: EvalResult, generated_at: str | None = None) -> dict[str, Path]:
    """Write report.md, report.json and retention.png into the report folder; return their paths."""
    stamp = generated_at or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    folder = result.request.report_dir
    paths = {"report.md": folder / REPORT_MD, "report.json": folder / REPORT_JSON,
             "retention.png": folder / RETENTION_PNG}
    write_heatmap(result, paths["retention.png"])
    atomic_write_json(paths["report.json"], report_data(result, stamp))
    atomic_write_text(paths["report.md"], render_markdown(result, stamp))
    return paths
