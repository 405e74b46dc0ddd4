"""Generate on one machine, score on another: the folder a generate-only run leaves, and the request that scores it.

The GPU image has torch/transformers/peft but not the scoring libraries (sqlglot, rouge-score, ...); the CPU
machine has those but not the adapters (20 MB each, too big to bring back). ``eval --generate-only`` therefore
writes ``<out>/<name>/generations/{pairs,perplexity}/<key>.json`` (the cache entries, predictions without scores)
and ``identities.json``: which model (name, seed, folder, identity), task (test.csv sha256, rows), settings and
cache key each generation belongs to, plus the run manifest. ``eval --score-only DIR`` copies those entries into
its cache and scores them through the normal runner and report, after checking that each task's local test.csv
is the one generated on (same sha256): a prediction is never scored against other rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from eval.runner import (
    BASE,
    Backend,
    EvalRequest,
    ModelSpec,
    Probe,
    all_runs,
    default_backend,
    generate_all,
    merge_record,
    model_runs,
    probe_key,
    run_manifest,
)
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_json

IDENTITIES, GENERATIONS = "identities.json", "generations"
FORMAT = 1


def generate_only(request: EvalRequest, backend: Backend | None = None,
                  notify: Callable[[str], None] = lambda message: None, progress: bool = True,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Generate every pair and probe of ``request`` (nothing scored) and save them with their identities in the
    report folder; returns the path of identities.json. ``extra`` is recorded as given (e.g. the study's
    training throughput or chat-template choice). identities.json is rewritten after each model seed with the
    models finished so far (``"complete": false`` until the end): a run stopped by a time limit can still be
    scored for those."""
    request = replace(request, generate_only=True)
    path = request.report_dir / IDENTITIES
    save = lambda generated, complete: _save(request, generated, extra, complete)  # noqa: E731
    save(generate_all(request, backend or default_backend(), notify, progress,
                      after_run=lambda partial: save(partial, False)), True)
    return path


def _save(request: EvalRequest, generated: Any, extra: Mapping[str, Any] | None, complete: bool) -> None:
    """identities.json and the generations of every model whose seeds have all run (the base first)."""
    labels = {run.label: run for run in all_runs(request)}
    done = [m for m in request.models if all(r.label in generated.identities for r in model_runs(m))]
    names = {BASE, *(m.name for m in done)}
    if BASE not in generated.identities:
        return
    pairs = [p for p in generated.pairs if p.model in names]
    folder = request.report_dir / GENERATIONS
    for pair in pairs:
        _copy(Path(pair.cache_file), folder / "pairs" / f"{pair.key}.json")
    for label, run in labels.items():
        for probe in request.probes if run.model in names else ():
            key = probe_key(generated.identities[label], probe)
            _copy(request.cache / "perplexity" / f"{key}.json", folder / "perplexity" / f"{key}.json")
    record = {
        "format": FORMAT, "name": request.name, "base_model": request.base_model, "device": request.device,
        "max_rows": request.max_rows, "max_new_tokens": request.max_new_tokens,
        "chat_template": request.chat_template, "merge_lora": request.merge_lora,
        "tasks": {task: {"test_sha256": test_hash, "test_rows": total, "evaluated": len(test),
                         "settings": generated.settings_info[task]}
                  for task, (test, test_hash, total) in generated.tests.items()},
        "models": [{"name": m.name, "own_tasks": list(m.own_tasks), "paths": [str(p) for p in m.seed_paths],
                    "merge": merge_record(m.path)} for m in done],  # the folders stay behind: say what they were
        "complete": complete, "models_not_generated": [m.name for m in request.models if m not in done],
        "identities": {label: i for label, i in generated.identities.items() if labels[label].model in names},
        "keys": {f"{labels_of(p, labels)}|{p.task}": p.key for p in pairs},
        "pairs": [{"model": p.model, "seed": p.seed, "task": p.task, "key": p.key, "rows": p.rows,
                   "seconds_generate": p.seconds_generate} for p in pairs],
        "probes": [{"name": p.name, "source": p.source, "texts": list(p.texts)} for p in request.probes],
        "manifest": run_manifest(replace(request, models=tuple(done)), [p.versions for p in pairs]),
        "timings": generated.timings, "extra": dict(extra or {}),
    }
    atomic_write_json(request.report_dir / IDENTITIES, record)


def labels_of(pair: Any, labels: Mapping[str, Any]) -> str:
    """The run label (``NAME`` or ``NAME#2``) of a pair."""
    return next(label for label, run in labels.items() if run.model == pair.model and run.seed == pair.seed)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def read_identities(folder: Path) -> dict[str, Any]:
    """identities.json of a generate-only run, or a one-line error naming the folder."""
    path = folder / IDENTITIES
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WorkflowError(f"--score-only {folder}: no readable {IDENTITIES} ({type(err).__name__}). Fix: pass "
                            "the report folder an `eval --generate-only` run wrote") from None
    if record.get("format") != FORMAT:
        raise WorkflowError(f"{path}: format {record.get('format')!r}, expected {FORMAT}. Fix: generate again")
    return record


def check_tests(record: Mapping[str, Any], prepared: Path, folder: Path) -> None:
    """Every task's local test.csv is the one its generations were made from (sha256), else a one-line error."""
    for task, info in record["tasks"].items():
        path = prepared / task / "test.csv"
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        if digest != info["test_sha256"]:
            found = "not found" if digest is None else f"sha256 {digest[:12]}"
            raise WorkflowError(f"{path}: {found}, but {folder} was generated on sha256 {info['test_sha256'][:12]}. "
                                "Fix: pass --prepared with the prepared data the generations were made from")


def scoring_request(folder: Path, *, prepared: Path, out: Path, name: str | None = None,
                    cache_dir: Path | None = None, spider_dir: Path | None = None) -> EvalRequest:
    """The request that scores a generate-only folder: its models, tasks, rows and probes as recorded, its
    entries copied into the cache (``<out>/.cache`` unless ``cache_dir``), its tests checked."""
    record = read_identities(folder)
    check_tests(record, prepared, folder)
    request = EvalRequest(
        name=name or record["name"], base_model=record["base_model"],
        models=tuple(ModelSpec(m["name"], Path(m["paths"][0]), tuple(m["own_tasks"]),
                               tuple(Path(p) for p in m["paths"][1:])) for m in record["models"]),
        tasks=tuple(record["tasks"]), prepared=prepared, out=out, cache_dir=cache_dir,
        max_rows=record["max_rows"], max_new_tokens=record["max_new_tokens"], device=record["device"],
        probes=tuple(Probe(p["name"], tuple(p["texts"]), p["source"]) for p in record["probes"]),
        spider_dir=spider_dir, chat_template=record["chat_template"], merge_lora=record["merge_lora"],
        saved=record | {"folder": str(folder)})
    for kind in ("pairs", "perplexity"):
        for entry in sorted((folder / GENERATIONS / kind).glob("*.json")):
            target = request.cache / kind / entry.name
            if not target.exists():
                _copy(entry, target)
    return request
