"""``./run.sh study``: for one base model and a list of tasks, prep each task, train each single-task adapter and the
multi-task mix from the task YAMLs (base model overridden), optionally merge the single-task adapters and repeat
some tasks with more seeds, then ONE eval over everything into one report.

  ./run.sh study --base-model models/smollm2-135m --tasks sql,detox,banking77,samsum,instruct \\
      --data-root ../shared/data --out runs/study --mix [--merge linear,ties,dare_ties] \\
      [--seeds 2 --seed-tasks banking77] [--max-rows 2000 --test-rows 250] [--epochs 1] [--cpu]

Layout under ``--out``: ``prepared/<task>/{train,test}.csv`` (capped copies of the full prep under
``prepared-full/``), ``results/<model>/`` (Ludwig runs, each with ``train.log`` and its rendered YAML),
``merged/<method>/``, ``reports/<name>/`` (report.md/json, retention.png, eval.log) and ``study.json`` (what ran:
rows, each training's throughput, paths). ``--prepared DIR`` skips prep (a folder made earlier, e.g. on another
machine); ``--generate-only`` stops after generation (``eval --score-only`` scores it elsewhere).

Sources: ``--data-root`` holds one folder per dataset (each task's record names it); sql reads ``wikisql_mlx/``
(1,000 real WikiSQL training rows) when it is there, else ``sql_create_context/``; ``--source TASK=PATH`` wins.

Throughput: Ludwig's ``training_progress.json`` (``total_tokens_used``, ``steps``) over the training loop's time
(from its start to its last step's end, as ``train.progress.jsonl`` records them), and the wall time of the whole
``ludwig train`` process (model loading, evaluation and saving included), in study.json, the report's manifest and
report.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_csv, atomic_write_json
from prep.common import PrepError
from workflow.steps import timed_steps

MIX = "multitask"
MERGE_METHODS = ("linear", "ties", "dare_ties", "dare_linear", "cat", "svd", "magnitude_prune")
SQL_WIKISQL_FOLDER = "wikisql_mlx"  # MLX's WikiSQL text files: 1,000 real training rows (prep/sql_create_context.py)
REPORT_NAME = "study"
LUDWIG_DEFAULT_SEED = 42  # ludwig train's --random_seed default: seed 1 of every model


@dataclass(frozen=True)
class StudyPlan:
    """Everything one study run does, checked before anything runs."""

    base_model: str
    tasks: tuple[str, ...]
    out: Path
    data_root: Path | None = None
    prepared: Path | None = None  # given: use it, skip prep
    sources: Mapping[str, str] = field(default_factory=dict)
    mix: bool = False
    merges: tuple[str, ...] = ()
    seeds: int = 1
    seed_tasks: tuple[str, ...] = ()
    max_rows: int | None = None  # training rows per task (train.csv, validation included)
    test_rows: int | None = None  # test rows per task
    epochs: int | None = None
    batch_size: int | None = None
    cpu: bool = False
    generate_only: bool = False
    chat_template: str = "off"
    probe: str | None = "general"  # None: no perplexity
    max_new_tokens: int | None = None
    name: str = REPORT_NAME
    parallel: int = 1  # trainings run at once (a small model leaves most of a GPU idle)
    eval_batch_size: int | None = None
    eval_workers: int = 1  # generation processes sharing the device (eval.workers)
    merge_lora: bool | None = None  # eval's adapter path (None: merged on CUDA only)
    agreement: Path | None = None  # workflow.agreement's JSON: eval vs ludwig predict, recorded in the report
    stop_after: str | None = None  # "train": stop once trained and merged (study.json written)

    @property
    def prepared_dir(self) -> Path:
        return self.prepared or self.out / "prepared"

    def models(self) -> list[tuple[str, str, int]]:
        """(model name, the task or YAML it trains, seed index) for every training, in order."""
        runs = [(task, task, 1) for task in self.tasks]
        runs += [(f"{task}-seed{k}", task, k) for task in self.seed_tasks for k in range(2, self.seeds + 1)]
        return runs + ([(MIX, MIX, 1)] if self.mix else [])


@dataclass
class Training:
    """One ``ludwig train`` of the study and what it measured."""

    name: str
    task: str
    seed: int
    model_dir: str
    log: str
    config: str
    train_rows: int
    wall_seconds: float
    steps: int | None = None
    tokens: int | None = None
    loop_seconds: float | None = None
    concurrent: int = 1  # trainings that shared the machine meanwhile (--parallel): throughput is per process

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.loop_seconds if self.tokens and self.loop_seconds else None

    @property
    def steps_per_second(self) -> float | None:
        return self.steps / self.loop_seconds if self.steps and self.loop_seconds else None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second,
                "steps_per_second": self.steps_per_second}


# ---------------------------------------------------------------------------------------------- checks
def check_plan(plan: StudyPlan) -> None:
    """One-line errors for every input a user can get wrong, before any work starts."""
    from prep.registry import TASKS

    if not plan.tasks:
        raise WorkflowError("--tasks: no task given. Fix: e.g. --tasks sql,detox")
    for task in plan.tasks:
        if task not in TASKS or TASKS[task].ludwig_config is None:
            trainable = sorted(t for t, s in TASKS.items() if s.ludwig_config)
            raise WorkflowError(f"--tasks {task}: not a trainable task. Fix: use some of: {', '.join(trainable)}")
    for task in plan.seed_tasks:
        if task not in plan.tasks:
            raise WorkflowError(f"--seed-tasks {task}: not in --tasks. Fix: repeat only tasks the study trains")
    if plan.seed_tasks and plan.seeds < 2:
        raise WorkflowError("--seed-tasks without --seeds 2 or more. Fix: pass --seeds N (N >= 2)")
    for method in plan.merges:
        if method not in MERGE_METHODS:
            raise WorkflowError(f"--merge {method}: unknown method. Fix: use some of: {', '.join(MERGE_METHODS)}")
    if plan.merges and len(plan.tasks) < 2:
        raise WorkflowError("--merge needs two or more --tasks. Fix: add tasks or drop --merge")
    if plan.agreement is not None and not plan.agreement.is_file():
        raise WorkflowError(f"--agreement {plan.agreement}: file not found. Fix: pass workflow.agreement's --out file")
    for number, flag in ((plan.max_rows, "--max-rows"), (plan.test_rows, "--test-rows"), (plan.epochs, "--epochs"),
                         (plan.batch_size, "--batch-size"), (plan.max_new_tokens, "--max-new-tokens"),
                         (plan.parallel, "--parallel"), (plan.eval_batch_size, "--eval-batch-size"),
                         (plan.eval_workers, "--eval-workers")):
        if number is not None and number < 1:
            raise WorkflowError(f"{flag} {number}: must be at least 1. Fix: pass a positive number")
    if plan.chat_template not in ("on", "off"):
        raise WorkflowError(f"--chat-template {plan.chat_template}: expected on or off. Fix: pass on or off")
    if plan.prepared is None and plan.data_root is None:
        raise WorkflowError("no data: pass --data-root (one folder per dataset) or --prepared (a prepared folder)")
    if plan.prepared is not None:
        for task in plan.tasks:
            for split in ("train", "test"):
                if not (plan.prepared / task / f"{split}.csv").is_file():
                    raise WorkflowError(f"--prepared {plan.prepared}: no {task}/{split}.csv. Fix: prepare it with "
                                        f"--data-root (./run.sh study ... --stop-after prep)")
    if plan.mix and plan.prepared is not None and not (plan.prepared / MIX / "train.csv").is_file():
        raise WorkflowError(f"--prepared {plan.prepared}: no {MIX}/train.csv for --mix. Fix: prepare with --mix")
    if plan.probe is not None and not Path(plan.probe).exists():
        from eval.perplexity import PROBES

        if plan.probe not in PROBES:
            raise WorkflowError(f"--probe {plan.probe}: unknown. Fix: use one of: {', '.join(PROBES)} or a file")


def source_for(task: str, plan: StudyPlan) -> str:
    """Where a task's published files are: ``--source`` first, else its record's folder under ``--data-root``
    (sql: MLX's WikiSQL folder when present, for real training rows)."""
    from prep.registry import get_task

    if task in plan.sources:
        return plan.sources[task]
    assert plan.data_root is not None
    if task == "sql" and (plan.data_root / SQL_WIKISQL_FOLDER).is_dir():
        return str(plan.data_root / SQL_WIKISQL_FOLDER)
    folder = get_task(task).source_folder
    if folder is None or not (plan.data_root / folder).exists():
        raise WorkflowError(f"--data-root {plan.data_root}: no {folder} folder for {task}. Fix: pass --source "
                            f"{task}=PATH or a data root that holds it")
    return str(plan.data_root / folder)


# ---------------------------------------------------------------------------------------------- prep
def cap_rows(frame: pd.DataFrame, rows: int | None) -> pd.DataFrame:
    """The first ``rows`` rows: prep sorts by a hash of the split key, so the head is a fair sample."""
    return frame if rows is None else frame.head(rows)


def prep_tasks(plan: StudyPlan, notify: Callable[[str], None]) -> dict[str, dict[str, int]]:
    """Every task prepared in full (``prepared-full/``), then capped copies (``prepared/``), then the mix of the
    capped tasks; returns the rows of each."""
    from prep.mix import build_mixture
    from prep.registry import get_task
    from prep.task import prepare

    rows: dict[str, dict[str, int]] = {}
    for task in plan.tasks:
        source = source_for(task, plan)
        report = prepare(get_task(task), source, plan.out / "prepared-full")
        for split in ("train", "test"):
            frame = pd.read_csv(Path(report.files[split]), keep_default_na=False, dtype=str)
            capped = cap_rows(frame, plan.max_rows if split == "train" else plan.test_rows)
            atomic_write_csv(plan.prepared_dir / task / f"{split}.csv", capped)
            rows.setdefault(task, {})[split] = len(capped)
        notify(f"prep {task}: {source} -> {rows[task]['train']} train, {rows[task]['test']} test rows "
               f"(of {report.rows_out['train'] + report.rows_out['validation']} / {report.rows_out['test']})")
    if plan.mix:
        report = build_mixture(plan.prepared_dir, {task: None for task in plan.tasks}, plan.prepared_dir)
        rows[MIX] = {"train": report.rows_out["train"] + report.rows_out["validation"],
                     "test": report.rows_out["test"]}
        notify(f"prep {MIX}: {rows[MIX]['train']} train rows from {', '.join(plan.tasks)}")
    return rows


# ---------------------------------------------------------------------------------------------- train
def training_progress(model_dir: Path, progress_file: Path) -> tuple[int | None, int | None, float | None]:
    """(optimizer steps, tokens, seconds of the training loop): Ludwig's training_progress.json (``steps``,
    ``total_tokens_used``) and the loop's start and last step's end in the run's progress file; Nones when
    absent."""
    from workflow.train import read_progress

    try:
        progress = json.loads((model_dir / "training_progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        progress = {}
    seconds = read_progress(progress_file).loop_seconds
    return int(progress.get("steps") or 0) or None, int(progress.get("total_tokens_used") or 0) or None, seconds


def finished_model(out: Path) -> Path | None:
    """The model folder of a finished earlier training in ``out`` (weights and config saved), else None."""
    done = [m for m in out.glob("*/model") if (m / "model_hyperparameters.json").is_file()
            and (m / "model_weights").is_dir() and (m / "training_progress.json").is_file()]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def train_one(plan: StudyPlan, name: str, task: str, seed: int) -> Training:
    """One model: its YAML rendered for the base (lengths measured on its dataset), trained with its seed; a
    finished earlier training in its folder is reused (a study resumes where it stopped)."""
    from prep.registry import config_path
    from workflow.train import progress_path, train

    dataset = plan.prepared_dir / task / "train.csv"
    out = plan.out / "results" / name
    rows = len(pd.read_csv(dataset, usecols=["prompt"]))
    record = out / "training.json"
    if finished_model(out) is not None and record.is_file():
        return Training(**json.loads(record.read_text(encoding="utf-8")))
    config = render_overrides(load_yaml(config_path(task)), base_model=plan.base_model, cpu=plan.cpu,
                              epochs=plan.epochs, batch_size=plan.batch_size, dataset=dataset,
                              notify=lambda line: None)
    rendered = write_yaml(config, out / f"{task}.rendered.yaml",
                          header=f"# {config_path(task).name} rendered by ./run.sh study for {plan.base_model}.\n")
    started = time.perf_counter()
    model = train(rendered, dataset, out, extra_args=["--random_seed", str(LUDWIG_DEFAULT_SEED + seed - 1)])
    wall = time.perf_counter() - started
    steps, tokens, loop = training_progress(model, progress_path(out))
    done = Training(name, task, seed, str(model), str(out / "train.log"), str(rendered), rows, wall, steps, tokens,
                    loop, plan.parallel)
    atomic_write_json(record, done.__dict__)
    return done


# ---------------------------------------------------------------------------------------------- merge
def merge_function() -> Callable[..., Path]:
    """``workflow.merge.merge_adapters``, imported when --merge asks for it, or a one-line error."""
    try:
        module = importlib.import_module("workflow.merge")
    except ImportError as err:
        raise WorkflowError(f"--merge: workflow.merge is not available ({err}). Fix: run without --merge, or on a "
                            "checkout that has the merge command") from None
    merge = getattr(module, "merge_adapters", None)
    if merge is None:
        raise WorkflowError("--merge: workflow.merge has no merge_adapters. Fix: run without --merge")
    return merge


def merge_all(plan: StudyPlan, trained: Mapping[str, Training],
              failed: Callable[[str, str], None] | None = None) -> dict[str, Path]:
    """Each --merge method over the single-task adapters (seed 1 of each task), into ``merged/<method>/``.

    ``failed(method, error)``: a method that fails is left out and reported there, so one merge cannot cost a
    whole study (a GPU session); without it the first failure stops the study."""
    merge = merge_function()
    singles = {task: Path(trained[task].model_dir) for task in plan.tasks if task in trained}
    merged: dict[str, Path] = {}
    if len(singles) < len(plan.tasks):  # a merge of fewer adapters would be another model than the one asked for
        missing = ", ".join(t for t in plan.tasks if t not in singles)
        for method in plan.merges:
            if failed is None:
                raise WorkflowError(f"--merge {method}: no trained adapter for {missing}. Fix: train it first")
            failed(method, f"not merged: the {missing} adapter did not train")
        return merged
    for method in plan.merges:
        out = plan.out / "merged" / method
        if (out / "model_hyperparameters.json").is_file():  # merged by an earlier run of this study
            merged[f"merge-{method}"] = out
            continue
        try:
            merged[f"merge-{method}"] = Path(merge(singles, method, out=out))
        except Exception as err:  # noqa: BLE001  (any failure of the other branch's code: reported, not fatal)
            if failed is None:
                raise
            failed(method, f"{type(err).__name__}: {err}")
    return merged


# ---------------------------------------------------------------------------------------------- eval
def eval_request(plan: StudyPlan, trained: Mapping[str, Training], merged: Mapping[str, Path]) -> Any:
    """One eval over the base, every adapter (seeds as one model), the mix and the merges, on every task."""
    from eval.runner import EvalRequest, ModelSpec, read_probe

    probes = ()
    if plan.probe is not None:
        from eval.perplexity import PROBES

        probes = (read_probe(PROBES.get(plan.probe, Path(plan.probe))),)
    models = []
    for task in plan.tasks:
        runs = sorted((t for t in trained.values() if t.task == task), key=lambda t: t.seed)
        if not runs:  # its training failed: reported in study.json, left out here
            continue
        # the first seed that trained stands for the task (seed 1 unless it failed), the others are its seeds
        first, *others = runs
        models.append(ModelSpec(task, Path(first.model_dir), (task,), tuple(Path(t.model_dir) for t in others)))
    if MIX in trained:
        models.append(ModelSpec(MIX, Path(trained[MIX].model_dir), plan.tasks))
    models += [ModelSpec(name, path, plan.tasks) for name, path in merged.items()]
    return EvalRequest(name=plan.name, base_model=plan.base_model, models=tuple(models), tasks=plan.tasks,
                       prepared=plan.prepared_dir, out=plan.out / "reports", probes=probes,
                       device="cpu" if plan.cpu else None, max_new_tokens=plan.max_new_tokens,
                       batch_size=plan.eval_batch_size, chat_template=plan.chat_template == "on",
                       merge_lora=plan.merge_lora)


def study_record(plan: StudyPlan, rows: Mapping[str, Any], trainings: Sequence[Training],
                 merged: Mapping[str, Path], timings: Mapping[str, float],
                 merge_errors: Mapping[str, str] | None = None,
                 training_errors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the study did, for study.json and the report's manifest."""
    return {"base_model": plan.base_model, "tasks": list(plan.tasks), "rows": dict(rows),
            "epochs": plan.epochs, "cpu": plan.cpu, "chat_template": plan.chat_template, "parallel": plan.parallel,
            "merge_lora": plan.merge_lora,
            "agreement": json.loads(plan.agreement.read_text(encoding="utf-8")) if plan.agreement else None,
            "trainings": [t.as_dict() for t in trainings], "merges": {k: str(v) for k, v in merged.items()},
            "merge_errors": dict(merge_errors or {}), "training_errors": dict(training_errors or {}),
            "seconds": dict(timings)}


# ---------------------------------------------------------------------------------------------- the run
def run_study(plan: StudyPlan, console: Console | None = None) -> dict[str, Any]:
    """Prep, train, merge, eval; each step timed and shown; returns study.json's content plus ``result``."""
    from eval.report import LOG_FILE, logging_to, write_report
    from eval.runner import run_eval

    console = console or Console(stderr=True)
    check_plan(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    step = timed_steps(console, timings)

    note = lambda line: console.print(f"[dim]{line}[/dim]", highlight=False)  # noqa: E731
    if plan.prepared is None:
        rows = step("prep", lambda: prep_tasks(plan, note))
    else:
        rows = {t: {"train": len(pd.read_csv(plan.prepared / t / "train.csv", usecols=["prompt"]))}
                for t in (*plan.tasks, *([MIX] if plan.mix else []))}
    runs = plan.models()
    label = f"train {len(runs)} models ({plan.parallel} at a time; logs: {plan.out / 'results'}/<model>/train.log)"
    training_errors: dict[str, str] = {}

    def training_failed(name: str, error: str) -> None:
        training_errors[name] = error
        console.print(f"[red]{name} failed, left out:[/red] {error}", highlight=False)

    trained = step(label, lambda: train_all(plan, runs, note, training_failed))
    merge_errors: dict[str, str] = {}

    def merge_failed(method: str, error: str) -> None:
        merge_errors[method] = error
        console.print(f"[red]merge {method} failed, left out:[/red] {error}", highlight=False)

    merged = step("merge " + ", ".join(plan.merges), lambda: merge_all(plan, trained, merge_failed)) \
        if plan.merges else {}
    if plan.stop_after == "train":
        record = study_record(plan, rows, list(trained.values()), merged, timings, merge_errors,
                              training_errors) | {"eval_log": None}
        atomic_write_json(plan.out / "study.json", record)
        return record | {"stopped": "after training"}
    request = eval_request(plan, trained, merged)
    record = study_record(plan, rows, list(trained.values()), merged, timings, merge_errors, training_errors)
    eval_log = request.report_dir / LOG_FILE
    if plan.eval_workers > 1:
        from eval.workers import prefill

        with logging_to(eval_log):
            step(f"generate in {plan.eval_workers} processes", lambda: prefill(request, plan.eval_workers, note))
    if plan.generate_only:
        from eval.saved import generate_only

        with logging_to(eval_log):
            saved = step("generate (no scoring)", lambda: generate_only(request, progress=False, extra=record))
        record["identities"] = str(saved)
    else:
        with logging_to(eval_log):
            result = step("eval", lambda: run_eval(request, progress=False))
            result.manifest["study"] = record
            paths = write_report(result)
        record["report"] = str(paths["report.md"])
    record["seconds"] = dict(timings)
    record["eval_log"] = str(eval_log)
    atomic_write_json(plan.out / "study.json", record)
    return record | ({} if plan.generate_only else {"result": result})


def train_all(plan: StudyPlan, runs: Sequence[tuple[str, str, int]], note: Callable[[str], None],
              failed: Callable[[str, str], None] | None = None) -> dict[str, Training]:
    """Every training, ``plan.parallel`` at a time (each a ``ludwig train`` process), in the order given.

    ``failed(name, error line)``: a training that fails (``ludwig train`` exits non-zero, e.g. NaN weights) is
    left out and reported there while the others go on, so one diverged adapter cannot cost a whole study (a GPU
    session: on the H200 samsum's NaN did); without it the first failure stops the study."""
    from concurrent.futures import ThreadPoolExecutor

    def one(run: tuple[str, str, int]) -> Training | None:
        try:
            done = train_one(plan, *run)
        except WorkflowError as err:
            if failed is None:
                raise
            failed(run[0], str(err))
            return None
        note(f"{done.name}: {done.train_rows} rows, {done.steps or '?'} steps, {_rate(done.tokens_per_second)} "
             f"tokens/s, {_rate(done.steps_per_second, 2)} steps/s in the loop; {done.wall_seconds:.1f} s in all; "
             f"log {done.log}")
        return done

    first = sorted(runs, key=lambda run: run[1] != MIX)  # the mix, the longest, starts first
    with ThreadPoolExecutor(max_workers=max(1, plan.parallel)) as pool:
        done = {t.name: t for t in pool.map(one, first) if t is not None}
    if not done:
        raise WorkflowError("every training failed (see each model's train.log under "
                            f"{plan.out / 'results'}). Fix: the first error line above")
    return {name: done[name] for name, _, _ in runs if name in done}


def _rate(value: float | None, digits: int = 0) -> str:
    return "?" if value is None else f"{value:,.{digits}f}"


def summary(record: Mapping[str, Any]) -> Table:
    """The one screen: rows, every training's throughput and log, the timings, where the report is."""
    table = Table(title=f"study: {Path(record['base_model']).name}, {', '.join(record['tasks'])}", show_header=True)
    for column in ("model", "rows", "steps", "tokens/s", "steps/s", "wall s", "log"):
        table.add_column(column, justify="left" if column in ("model", "log") else "right")
    for t in record["trainings"]:
        table.add_row(t["name"], str(t["train_rows"]), str(t["steps"] or "?"), _rate(t["tokens_per_second"]),
                      _rate(t["steps_per_second"], 2), f"{t['wall_seconds']:.1f}", t["log"])
    return table


def print_summary(record: Mapping[str, Any], console: Console) -> None:
    console.print(summary(record))
    if "result" in record:
        from eval.__main__ import rich_table
        from eval.report import matrix_table

        console.print(rich_table(matrix_table(record["result"], bold_own=False), "retention matrix"))
    total = sum(record["seconds"].values())
    console.print(f"steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items()) +
                  f"; total {total:.0f} s", highlight=False)
    if record.get("stopped"):
        console.print(f"stopped {record['stopped']}: {record['base_model']} adapters under the study folder "
                      "(study.json); run the same command without --stop-after to evaluate", highlight=False)
        return
    where = record.get("report") or f"{record['identities']} (score with ./run.sh eval --score-only " \
                                    f"{Path(record['identities']).parent} --prepared <prepared>)"
    console.print(f"report: {where}\neval log: {record['eval_log']}", highlight=False, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    from eval.__main__ import split_list

    parser = argparse.ArgumentParser(prog="./run.sh study", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base-model", required=True, help="local model folder (e.g. from ./run.sh model)")
    parser.add_argument("--tasks", type=split_list, required=True, help="comma-separated trainable tasks")
    parser.add_argument("--out", type=Path, required=True, help="study folder")
    parser.add_argument("--data-root", type=Path, help="folder with one sub-folder per dataset (../shared/data)")
    parser.add_argument("--prepared", type=Path, help="an already prepared folder (skip prep)")
    parser.add_argument("--source", action="append", default=[], metavar="TASK=PATH", help="a task's source")
    parser.add_argument("--mix", action="store_true", help="train the multi-task mix of the tasks too")
    parser.add_argument("--merge", type=split_list, default=(), help="merge methods, e.g. linear,ties,dare_ties")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each --seed-tasks adapter (default 1)")
    parser.add_argument("--seed-tasks", type=split_list, default=(), help="tasks trained with --seeds seeds")
    parser.add_argument("--max-rows", type=int, help="training rows per task (first rows of train.csv)")
    parser.add_argument("--test-rows", type=int, help="test rows per task")
    parser.add_argument("--epochs", type=int, help="epochs (default: each YAML's)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: each YAML's)")
    parser.add_argument("--cpu", action="store_true", help="train and evaluate on CPU (no quantization)")
    parser.add_argument("--generate-only", action="store_true", help="stop after generation (score elsewhere)")
    parser.add_argument("--stop-after", choices=("prep", "train"),
                        help="stop after this step (prep: a folder to carry elsewhere; train: trained and merged, "
                             "a later run reuses them)")
    parser.add_argument("--parallel", type=int, default=1, help="trainings at once (default 1)")
    parser.add_argument("--eval-batch-size", type=int, help="generation batch size (default: eval's)")
    parser.add_argument("--eval-workers", type=int, default=1,
                        help="generation processes sharing the device, one model each at a time (default 1)")
    parser.add_argument("--merge-lora", choices=("on", "off", "auto"), default="auto",
                        help="eval's adapter path: merged bf16 (on), apart as ludwig predict (off), auto: merged on "
                             "CUDA only; pick the one workflow.agreement finds agreeing with ludwig predict")
    parser.add_argument("--agreement", type=Path, help="workflow.agreement's JSON, recorded in the report")
    parser.add_argument("--chat-template", choices=("on", "off"), default="off",
                        help="score with the base model's chat template around each prompt (default off)")
    parser.add_argument("--probe", default="general", help="perplexity probe name or file (default: general)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity probe")
    parser.add_argument("--max-new-tokens", type=int, help="cap every task's max new tokens (quick runs)")
    parser.add_argument("--name", default=REPORT_NAME, help="report name (default: %(default)s)")
    return parser


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    from eval.runner import parse_assignment

    sources = dict(parse_assignment(item, "--source") for item in args.source)
    return StudyPlan(
        base_model=args.base_model, tasks=args.tasks, out=args.out, data_root=args.data_root, prepared=args.prepared,
        sources=sources, mix=args.mix, merges=args.merge, seeds=args.seeds, seed_tasks=args.seed_tasks,
        max_rows=args.max_rows, test_rows=args.test_rows, epochs=args.epochs, batch_size=args.batch_size,
        cpu=args.cpu, generate_only=args.generate_only, chat_template=args.chat_template,
        probe=None if args.no_perplexity else args.probe, max_new_tokens=args.max_new_tokens, name=args.name,
        parallel=args.parallel, eval_batch_size=args.eval_batch_size, eval_workers=args.eval_workers,
        agreement=args.agreement,
        merge_lora={"on": True, "off": False}.get(args.merge_lora), stop_after=args.stop_after)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        plan = plan_from_args(args)
        if args.stop_after == "prep":
            check_plan(replace(plan, prepared=None))
            rows = prep_tasks(plan, lambda line: console.print(line, highlight=False))
            console.print(f"prepared: {plan.prepared_dir} ({json.dumps(rows)})", highlight=False, soft_wrap=True)
            return 0
        from workflow.demo import quiet_library_chatter

        quiet_library_chatter()
        record = run_study(plan)
    except (WorkflowError, PrepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(record, console)
    for name, error in record.get("training_errors", {}).items():
        console.print(f"[red]not trained, not in the report:[/red] {name}: {error}", highlight=False)
    return 1 if record.get("training_errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
