"""Evidence for issue #5: DeepSpeed ZeRO-2 through the project's launcher trains sql.yaml at a real model size.

One call, on one GPU:

1. builds a random-weight model from the public Llama-3.2-1B config (hidden 2048, 16 layers, 32 heads, 8 kv heads,
   intermediate 8192, vocab 128256, tied embeddings; ``bench/train_speed.py``'s builder) and synthetic
   sql-create-context rows (``workflow.samples`` + ``prep``);
2. trains ``ludwig_configs/sql.yaml`` (4-bit NF4 QLoRA, LoRA r16 on all linear layers, 64 rows packed into
   2048-token sequences, gradient checkpointing, paged Adam, as committed; only ``base_model``, ``train_steps`` and ``max_new_tokens`` are overridden) twice for
   the same fixed number of steps:
   ``ludwig``  single-process Ludwig, no accelerate (``python -m ludwig_mt.launch worker train ...``);
   ``zero2``   ``torch.distributed.run`` with one process, Ludwig under accelerate + DeepSpeed ZeRO-2
               (``sql.yaml``'s ``backend:`` settings), i.e. ``python -m ludwig_mt.launch --gpus 1 --strategy zero2``
               (``./run.sh train sql`` on one GPU runs the plain process instead);
3. runs ``ludwig predict`` on a few held-out rows with the ZeRO-2 model (proves the output directory loads);
4. prints a table and writes ``zero2_single_gpu.json`` under ``--out`` (the model and runs go to ``--work``).

Tokens/s come from ``LUDWIG_MT_RANK_REPORT`` (non-pad tokens per step and step end times, measured in the training
process after a GPU sync), over the steps after ``--warmup``; model load, preprocessing and evaluation are excluded.

Run (GPU; packages from .gpu-site, see ../shared/gpu/README.md; about 4 minutes on an H100):
    export PYTHONPATH=$PWD/.gpu-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; python3 bench/zero2_single_gpu.py --out $OUT
If the ZeRO-2 row fails with the YAML's paged optimizer, rerun both modes with ``--optimizer adamw``.
Run (CPU smoke test: tiny model, no quantization, gloo; about 1 minute):
    .venv/bin/python bench/zero2_single_gpu.py --smoke --out /tmp/zero2-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ludwig_mt.config import load_yaml, render_overrides, write_yaml  # noqa: E402
from ludwig_mt.launch import launcher_command, launcher_env  # noqa: E402
from ludwig_mt.strategies import declared_backend  # noqa: E402
from ludwig_mt.patches.instrumentation import ENV_RANK_REPORT  # noqa: E402
from ludwig_mt.strategies import ENV_STRATEGY  # noqa: E402
from prep.registry import get_task  # noqa: E402

SHAPE, SMOKE_SHAPE = "llama3.2-1b", "tiny-llama"


def prepare_rows(work: Path, rows: int, validation_rows: int, test_rows: int) -> tuple[Path, Path]:
    """Synthetic sql-create-context rows through the real prep; a small validation and test set keep eval short."""
    import pandas as pd

    from prep.task import prepare
    from workflow.samples import write_sql_sample

    report = prepare(get_task("sql"), str(write_sql_sample(work / "sql_create_context_v4.json", rows)),
                     work / "prepared")
    train = pd.read_csv(report.files["train"], keep_default_na=False)
    train = pd.concat([train[train.split == 0], train[train.split == 1].head(validation_rows)])
    train.to_csv(work / "train.csv", index=False)
    pd.read_csv(report.files["test"], keep_default_na=False).head(test_rows).to_csv(work / "test.csv", index=False)
    return work / "train.csv", work / "test.csv"


def bench_config(model_dir: Path, steps: int, smoke: bool, optimizer: str | None = None) -> dict[str, Any]:
    """sql.yaml as committed, on the local model, for ``steps`` steps (smoke: the CPU rendering, batch 4)."""
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(model_dir), cpu=smoke,
                              max_new_tokens=8, batch_size=4 if smoke else None,
                              max_sequence_length=48 if smoke else None)
    config["trainer"].update(train_steps=steps, epochs=100)
    if optimizer:
        config["trainer"]["optimizer"] = {"type": optimizer}
    return config


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: int) -> tuple[int, float]:
    """Run ``cmd`` from the repository root with its output in ``log``; return (exit code, seconds)."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def base_env(smoke: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", ENV_STRATEGY)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if smoke:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def train_mode(mode: str, config: Path, dataset: Path, work: Path, smoke: bool, timeout: int) -> dict[str, Any]:
    """Train once as ``ludwig`` (single process) or ``zero2`` (launcher, one process); return its measurements."""
    ludwig_args = ["train", "--config", str(config), "--dataset", str(dataset), "--output_directory",
                   str(work / f"results-{mode}"), "--skip_save_processed_input"]
    declared = declared_backend(load_yaml(config))  # the YAML's DeepSpeed settings, as ./run.sh train hands them down
    env = launcher_env("zero2", cpu=smoke, base=base_env(smoke), declared=declared)  # same threads/devices for both
    if mode == "ludwig":
        cmd = [sys.executable, "-m", "ludwig_mt.launch", "worker", *ludwig_args]
        env.pop(ENV_STRATEGY)
    else:
        cmd = launcher_command(1, ludwig_args, python=sys.executable)
    for stale in (work / f"results-{mode}", work / f"report-{mode}"):
        shutil.rmtree(stale, ignore_errors=True)  # a rerun must not read the previous run's files
    env[ENV_RANK_REPORT] = str(work / f"report-{mode}")
    code, seconds = run_logged(cmd, env, work / f"train-{mode}.log", timeout)
    result: dict[str, Any] = {"mode": mode, "exit_code": code, "wall_seconds": round(seconds, 1),
                              "log": str(work / f"train-{mode}.log"), "command": " ".join(cmd)}
    report_file = work / f"report-{mode}" / "rank0.json"
    if code != 0 or not report_file.exists():
        log = (work / f"train-{mode}.log").read_text(errors="replace").strip().splitlines()
        result["error_tail"] = log[-15:]
        return result
    report = json.loads(report_file.read_text())
    result.update(throughput(report), losses=report["losses"])
    models = sorted((work / f"results-{mode}").glob("*/model"))
    result["model"] = str(models[-1]) if models else None
    return result


def throughput(report: dict[str, Any], warmup: int | None = None) -> dict[str, Any]:
    """Tokens/s and median step time over the steps after warm-up (a quarter of the steps, at least 1)."""
    ends, tokens, losses = report["step_end_seconds"], report["tokens"], report["losses"]
    skip = warmup if warmup is not None else max(1, len(ends) // 4)
    timed = list(zip(ends[skip - 1:-1], ends[skip:], tokens[skip:]))
    seconds = sum(end - start for start, end, _ in timed)
    return {
        "world_size": report["world_size"], "steps": report["steps"], "timed_steps": len(timed),
        "tokens_per_second": round(sum(t for _, _, t in timed) / seconds, 1) if seconds > 0 else None,
        "median_step_seconds": round(statistics.median(end - start for start, end, _ in timed), 4) if timed else None,
        "peak_gpu_gib": round(report["peak_gpu_gib"], 2) if report.get("peak_gpu_gib") else None,
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
    }


def predict_check(model: str, test: Path, work: Path, smoke: bool, timeout: int) -> dict[str, Any]:
    """``ludwig predict`` (fixes applied) on the held-out rows; the model folder must load unchanged."""
    import pandas as pd

    out = work / "predict-zero2"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ludwig_mt.launch", "worker", "predict", "--model_path", model, "--dataset",
           str(test), "--output_directory", str(out)]
    code, seconds = run_logged(cmd, base_env(smoke), work / "predict-zero2.log", timeout)
    files = sorted(out.rglob("predictions.parquet"))
    rows = len(pd.read_parquet(files[-1])) if code == 0 and files else 0
    sample = str(pd.read_parquet(files[-1])["response_response"].iloc[0])[:60] if rows else None
    return {"exit_code": code, "seconds": round(seconds, 1), "rows": rows,
            "expected_rows": len(pd.read_csv(test)), "first_response": sample}


def table(results: list[dict[str, Any]], predicted: dict[str, Any]) -> str:
    head = f"{'mode':<8} {'exit':>4} {'world':>5} {'steps':>5} {'tok/s':>9} {'s/step':>7} {'peak GiB':>8} " \
           f"{'loss first->last':>17} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        loss = f"{r.get('first_loss', '-')}->{r.get('last_loss', '-')}"
        lines.append(f"{r['mode']:<8} {r['exit_code']:>4} {r.get('world_size', '-')!s:>5} {r.get('steps', '-')!s:>5} "
                     f"{r.get('tokens_per_second', '-')!s:>9} {r.get('median_step_seconds', '-')!s:>7} "
                     f"{r.get('peak_gpu_gib', '-')!s:>8} {loss:>17} {r['wall_seconds']:>7}")
    speeds = {r["mode"]: r.get("tokens_per_second") for r in results}
    if speeds.get("ludwig") and speeds.get("zero2"):
        lines.append(f"zero2 / ludwig tokens/s: {speeds['zero2'] / speeds['ludwig']:.3f}")
    if all("losses" in r for r in results):
        gap = max(abs(a - b) for a, b in zip(results[0]["losses"], results[1]["losses"]))
        lines.append(f"per-step training loss, max |ludwig - zero2| over {len(results[0]['losses'])} steps: {gap:.2e}")
    lines.append(f"ludwig predict on the zero2 model: exit {predicted.get('exit_code')}, "
                 f"{predicted.get('rows')}/{predicted.get('expected_rows')} rows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, no quantization, gloo")
    parser.add_argument("--steps", type=int, help="training steps per mode (default 40; smoke 8)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zero2_single_gpu",
                        help="model, data and runs (GBs on GPU: keep it out of --out)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per subprocess")
    parser.add_argument("--optimizer", help="override the YAML's optimizer in both modes (e.g. adamw)")
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.smoke else 40)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from train_speed import build_model_dir  # bench/train_speed.py: random weights from the public config

    model_dir = build_model_dir(SMOKE_SHAPE if args.smoke else SHAPE, work)
    rendered = bench_config(model_dir, steps, args.smoke, args.optimizer)
    batch = int(rendered["trainer"]["batch_size"])  # the YAML's rows (smoke: 4)
    train_csv, test_csv = prepare_rows(work, rows=max(120, steps * batch + 80), validation_rows=8, test_rows=4)
    config = write_yaml(rendered, work / "sql.bench.yaml",
                        header="# Rendered by bench/zero2_single_gpu.py from ludwig_configs/sql.yaml; do not edit.\n")
    results = [train_mode(mode, config, train_csv, work, args.smoke, args.timeout) for mode in ("ludwig", "zero2")]
    zero2 = results[1]
    predicted = predict_check(zero2["model"], test_csv, work, args.smoke, args.timeout) if zero2.get("model") else {}
    summary = {"shape": SMOKE_SHAPE if args.smoke else SHAPE, "smoke": args.smoke, "steps": steps,
               "optimizer": args.optimizer or "as in sql.yaml",
               "config": str(config), "results": results, "predict": predicted,
               "seconds_total": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero2_single_gpu.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(table(results, predicted))
    print(f"total {summary['seconds_total']} s; JSON: {args.out / 'zero2_single_gpu.json'}")
    ok = all(r["exit_code"] == 0 for r in results) and predicted.get("rows") == predicted.get("expected_rows") > 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
