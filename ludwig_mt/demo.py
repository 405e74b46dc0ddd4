"""The offline demo behind ``./run.sh``: prep -> ``ludwig train`` -> ``ludwig predict`` -> eval, on a tiny model.

Everything is built locally (a random-weight tiny Llama, synthetic rows in sql-create-context's published schema),
so it runs on a fresh machine with no GPU and no Hub in a couple of minutes. The steps are the real ones a GPU
user runs on ``ludwig_configs/sql.yaml``; only the base model, quantization and epochs are overridden.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ludwig_mt.config import load_yaml, render_overrides, task_config_path, write_yaml
from ludwig_mt.ludwig_fixes import WorkflowError
from ludwig_mt.samples import write_detox_sample, write_sql_sample
from ludwig_mt.tiny_model import build_tiny_llama
from ludwig_mt.train import ludwig_executable, train
from prep.registry import get_task
from prep.task import prepare


def predict(model: Path, dataset: Path, out_dir: Path, log: Path) -> Path:
    """The plain ``ludwig predict`` command (fixed by ludwig_mt.ludwig_fixes); returns the predictions file."""
    cmd = [ludwig_executable(), "predict", "--model_path", str(model), "--dataset", str(dataset),
           "--output_directory", str(out_dir)]
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise WorkflowError(f"ludwig predict failed (exit {code}). Fix: see {log}")
    return out_dir / "predictions.parquet"


def run_demo(workdir: Path, *, rows: int = 200, epochs: int = 2, base_model: str | None = None,
             console: Console | None = None) -> dict[str, Any]:
    """Run every step, timing each; return a summary dict (also printed as one screen by ``main``)."""
    console = console or Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    paths: dict[str, str] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        with console.status(f"[bold]{name}[/bold] ..."):
            result = fn()
        timings[name] = time.perf_counter() - started
        console.print(f"[green]done[/green] {name} ({timings[name]:.1f} s)")
        return result

    model_dir = Path(base_model) if base_model else workdir / "tiny-model"
    if not base_model:
        step("build tiny model", lambda: build_tiny_llama(model_dir))
    sample = step("write sample rows", lambda: write_sql_sample(workdir / "raw" / "sql_create_context_v4.json", rows))
    report = step("prep sql", lambda: prepare(get_task("sql"), str(sample), workdir / "prepared"))
    train_csv, test_csv = Path(report.files["train"]), Path(report.files["test"])
    config = render_overrides(load_yaml(task_config_path("sql")), base_model=str(model_dir), cpu=True,
                              epochs=epochs, batch_size=8, max_new_tokens=24)
    config_path = write_yaml(config, workdir / "sql.cpu.yaml",
                             header="# ludwig_configs/sql.yaml rendered for the CPU demo (ludwig_mt.demo).\n")
    results = workdir / "results" / "sql"
    model = step("ludwig train", lambda: train(config_path, train_csv, results))
    predictions = step("ludwig predict", lambda: predict(model, test_csv, workdir / "predictions" / "sql",
                                                           logs / "predict.log"))
    paths.update({"prepared data": str(train_csv.parent), "rendered config": str(config_path),
                  "trained model": str(model), "predictions": str(predictions),
                  "train log": str(results / "train.log")})
    scores = step("score sql", lambda: score(predictions, test_csv, workdir))
    paths.update(scores.pop("paths", {}))
    detox = workdir / "raw" / "paradetox" / "paradetox.tsv"
    step("prep detox", lambda: prepare(get_task("detox"), str(write_detox_sample(detox, rows // 2)),
                                       workdir / "prepared"))
    evaluation = step("eval: base vs sql adapter on sql, detox", lambda: retention_report(model_dir, model, workdir))
    paths["eval report"] = str(evaluation.request.report_dir / "report.md")
    return {"rows": report.as_dict(), "timings": timings, "paths": paths, "scores": scores, "eval": evaluation}


def retention_report(base_model: Path, sql_model: Path, workdir: Path) -> Any:
    """``python -m eval`` in-process: the base and the sql adapter on sql and detox, report under reports/."""
    from eval.perplexity import DEFAULT_PROBE
    from eval.report import LOG_FILE, logging_to, write_report
    from eval.runner import EvalRequest, ModelSpec, read_probe, run_eval

    request = EvalRequest(name="demo", base_model=str(base_model), models=(ModelSpec("sql", sql_model, ("sql",)),),
                          tasks=("sql", "detox"), prepared=workdir / "prepared", out=workdir / "reports",
                          probes=(read_probe(DEFAULT_PROBE),), device="cpu",
                          max_new_tokens=24)  # the demo's sql budget for both tasks: keeps the demo near 2 minutes
    with logging_to(request.report_dir / LOG_FILE):
        result = run_eval(request, progress=False)
        write_report(result)
    return result


def score(predictions: Path, test_csv: Path, workdir: Path) -> dict[str, Any]:
    """SQL exact match and execution match of ``ludwig predict``'s output against the held-out references."""
    import pandas as pd

    from eval.sql import score_sql

    preds = pd.read_parquet(predictions)["response_response"].map(_as_text).tolist()
    refs = pd.read_csv(test_csv, keep_default_na=False)
    scores = score_sql(preds, refs["response"].tolist(), refs["context"].tolist())
    return {**scores.metrics, **scores.settings}


def _as_text(value: Any) -> str:
    """Ludwig stores decoded text as a string or a list of tokens depending on the path taken."""
    return value if isinstance(value, str) else " ".join(map(str, value))


def summary(result: dict[str, Any]) -> Table:
    """The one screen: rows, timings, scores, the retention matrix (score and change from base) and the paths."""
    table = Table(title="ludwig-multitask offline demo (sql, tiny model, CPU)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = result["rows"]["rows_out"]
    table.add_row("rows", f"in {result['rows']['rows_in']} -> train {rows['train']}, validation "
                          f"{rows['validation']}, test {rows['test']}")
    for name, seconds in result["timings"].items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    table.add_row("time: total", f"{sum(result['timings'].values()):.1f} s")
    for name, value in result["scores"].items():
        table.add_row(f"score: {name}", f"{value:.3f}" if isinstance(value, float) else str(value))
    if "eval" in result:
        from eval.report import matrix_table

        header, rows = matrix_table(result["eval"], bold_own=False)
        table.add_row("retention matrix", "  |  ".join(header[1:]))
        for row in rows:
            table.add_row(f"  {row[0]}", "  |  ".join(row[1:]))
    for name, path in result["paths"].items():
        table.add_row(name, path)
    return table


def quiet_library_chatter() -> None:
    """Keep the terminal to the demo's own progress and summary (its steps log to files under the workdir):
    torch prints import-time deprecation warnings for torchao's enums, transformers a bar per saved model."""
    import logging

    import torch  # noqa: F401  (its logging setup must exist before the level is set)
    from transformers.utils import logging as hf_logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--base-model", help="a local model folder instead of the generated tiny model")
    args = parser.parse_args(argv)
    quiet_library_chatter()
    try:
        result = run_demo(args.workdir, rows=args.rows, epochs=args.epochs, base_model=args.base_model)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console = Console()
    console.print(summary(result))
    if "eval" in result:
        console.print(f"eval report: {result['paths']['eval report']} (+ report.json, retention.png)", soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
