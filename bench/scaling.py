"""Issue #7: data-parallel scaling of ``sql.yaml`` QLoRA with DeepSpeed ZeRO-2 at 1, 2, 4, 8 GPUs, in one call.

For each model shape (random weights from the public configs: Llama 3.2 1B and Llama 3.1 8B) and each GPU count N
(powers of two up to the GPUs the machine has), the project's launcher (``ludwig_mt.launch``, ZeRO-2 through
accelerate, one process per GPU) trains the committed ``ludwig_configs/sql.yaml`` for the same number of optimizer
steps at the SAME global batch: micro-batch ``b`` per GPU and gradient accumulation ``G / (b * N)``. Reported:

* tokens/s over all ranks (non-pad tokens from every rank's ``LUDWIG_MT_RANK_REPORT``, after warm-up steps);
* scaling efficiency = tokens/s at N / (N x tokens/s at 1); the goal is >= 90 % at every N;
* peak GPU memory per rank;
* the loss of each optimizer step (the mean over ranks of the micro-batch losses of that step) against the
  1-GPU run: shuffling, dropout and world-size learning-rate scaling are off, so both see the same rows per step
  and the gap is numerical only; the stated tolerance is a relative 1 % (:data:`LOSS_RTOL`).

Run (GPU; packages from .gpu-site, see ../shared/gpu/README.md):
    export PYTHONPATH=$PWD/.gpu-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; python3 bench/scaling.py --out $OUT
Run (CPU smoke: tiny model, no quantization, gloo, N = 1 and 2; about 2 minutes):
    .venv/bin/python bench/scaling.py --smoke --out /tmp/scaling-smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ludwig_mt.config import write_yaml  # noqa: E402
from ludwig_mt.launch import launcher_command, launcher_env  # noqa: E402
from ludwig_mt.patches.instrumentation import ENV_RANK_REPORT  # noqa: E402
from zero2_single_gpu import base_env, bench_config, prepare_rows, run_logged  # noqa: E402

SHAPES = ("llama3.2-1b", "llama3.1-8b")
SMOKE_SHAPE = "tiny-llama"
LOSS_RTOL = 0.01
WARMUP_STEPS = 2


def gpu_counts(available: int) -> list[int]:
    """1, 2, 4, 8 ... up to ``available`` (at least the 1-GPU point)."""
    counts, n = [], 1
    while n <= max(1, available):
        counts.append(n)
        n *= 2
    return counts


def accumulation_for(global_batch: int, micro_batch: int, gpus: int) -> int:
    """Gradient accumulation that keeps ``micro_batch * gpus * accumulation == global_batch``."""
    if global_batch % (micro_batch * gpus):
        raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batch} x {gpus} GPUs")
    return global_batch // (micro_batch * gpus)


def step_losses(rank_reports: list[dict[str, Any]], accumulation: int) -> list[float]:
    """Loss per optimizer step: Ludwig reports micro-batch loss / accumulation, so a step's loss is the sum over
    its micro-batches, averaged over ranks (each rank saw a different share of the same global batch)."""
    per_rank = [[sum(r["losses"][i:i + accumulation]) for i in range(0, len(r["losses"]) - accumulation + 1,
                                                                       accumulation)] for r in rank_reports]
    steps = min(len(losses) for losses in per_rank)
    return [sum(losses[s] for losses in per_rank) / len(per_rank) for s in range(steps)]


def tokens_per_second(rank_reports: list[dict[str, Any]], skip_micro_steps: int) -> float | None:
    """Non-pad tokens of all ranks in the micro-steps after the first ``skip_micro_steps`` (>= 1), over rank 0's
    wall time for those micro-steps (every rank waits for the others at each gradient synchronisation)."""
    ends = next(r for r in rank_reports if r["rank"] == 0)["step_end_seconds"]
    if not 1 <= skip_micro_steps < len(ends):
        return None
    tokens = sum(sum(r["tokens"][skip_micro_steps:len(ends)]) for r in rank_reports)
    seconds = ends[-1] - ends[skip_micro_steps - 1]
    return tokens / seconds if seconds > 0 else None


def efficiency(points: list[dict[str, Any]]) -> None:
    """Add ``scaling_efficiency`` and ``max_loss_rel_gap`` to each point, against the 1-GPU point (in place)."""
    one = next((p for p in points if p["gpus"] == 1 and p.get("tokens_per_second")), None)
    for p in points:
        if one and p.get("tokens_per_second"):
            p["scaling_efficiency"] = round(p["tokens_per_second"] / (p["gpus"] * one["tokens_per_second"]), 3)
        if one and p.get("step_losses"):
            pairs = list(zip(p["step_losses"], one["step_losses"]))
            p["max_loss_rel_gap"] = round(max(abs(a - b) / abs(b) for a, b in pairs), 5) if pairs else None
            p["loss_within_tolerance"] = p["max_loss_rel_gap"] is not None and p["max_loss_rel_gap"] <= LOSS_RTOL


def run_point(shape: str, model_dir: Path, gpus: int, args: argparse.Namespace, train_csv: Path,
              work: Path) -> dict[str, Any]:
    """Train ``sql.yaml`` on ``gpus`` processes at the global batch; return the measurements of that point."""
    micro = args.micro_batch
    accumulation = accumulation_for(args.global_batch, micro, gpus)
    config = bench_config(model_dir, args.steps * accumulation, args.smoke)
    config["adapter"]["dropout"] = 0.0
    config["trainer"].update(batch_size=micro, eval_batch_size=micro, gradient_accumulation_steps=accumulation,
                             should_shuffle=False, learning_rate_scaling="constant", skip_all_evaluation=True)
    tag = f"{shape}-n{gpus}"
    yaml = write_yaml(config, work / f"{tag}.yaml", header="# Rendered by bench/scaling.py from ludwig_configs/sql.yaml.\n")
    runs, reports = work / f"results-{tag}", work / f"report-{tag}"
    for stale in (runs, reports):
        shutil.rmtree(stale, ignore_errors=True)
    ludwig_args = ["train", "--config", str(yaml), "--dataset", str(train_csv), "--output_directory", str(runs)]
    env = launcher_env("zero2", cpu=args.smoke, base=base_env(args.smoke))
    env[ENV_RANK_REPORT] = str(reports)
    code, seconds = run_logged(launcher_command(gpus, ludwig_args, python=sys.executable), env,
                               work / f"train-{tag}.log", args.timeout)
    point: dict[str, Any] = {"shape": shape, "gpus": gpus, "micro_batch": micro, "accumulation": accumulation,
                             "global_batch": args.global_batch, "exit_code": code, "wall_seconds": round(seconds, 1),
                             "log": str(work / f"train-{tag}.log")}
    rank_reports = [json.loads(f.read_text()) for f in sorted(reports.glob("rank*.json"))]
    if code != 0 or len(rank_reports) != gpus:
        point["error_tail"] = (work / f"train-{tag}.log").read_text(errors="replace").splitlines()[-15:]
        return point
    tps = tokens_per_second(rank_reports, WARMUP_STEPS * accumulation)
    point.update(tokens_per_second=round(tps, 1) if tps else None,
                 peak_gpu_gib_per_rank=[round(r["peak_gpu_gib"], 2) if r.get("peak_gpu_gib") else None
                                        for r in sorted(rank_reports, key=lambda r: r["rank"])],
                 step_losses=[round(x, 5) for x in step_losses(rank_reports, accumulation)])
    return point


def table(points: list[dict[str, Any]]) -> str:
    head = f"{'shape':<12} {'GPUs':>4} {'b x acc':>7} {'exit':>4} {'tok/s':>9} {'eff.':>6} {'peak GiB/rank':>14} " \
           f"{'loss gap':>9}"
    lines = [head, "-" * len(head)]
    for p in points:
        peak = max((x for x in p.get("peak_gpu_gib_per_rank", []) if x is not None), default="-")
        lines.append(f"{p['shape']:<12} {p['gpus']:>4} {str(p['micro_batch']) + 'x' + str(p['accumulation']):>7} "
                     f"{p['exit_code']:>4} {p.get('tokens_per_second', '-')!s:>9} "
                     f"{p.get('scaling_efficiency', '-')!s:>6} {peak!s:>14} {p.get('max_loss_rel_gap', '-')!s:>9}")
    lines.append(f"efficiency = tok/s at N / (N x tok/s at 1), goal >= 0.90; loss gap = max relative per-step "
                 f"difference to 1 GPU, tolerance {LOSS_RTOL}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for scaling.json")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, no quantization, gloo, N = 1, 2")
    parser.add_argument("--shapes", default=None, help=f"comma-separated (default {','.join(SHAPES)})")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1, 2, 4 ... available)")
    parser.add_argument("--global-batch", type=int, default=None, help="rows per optimizer step (default 64; smoke 8)")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per GPU per micro-step (default 8; smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per point (default 8; smoke 3)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "scaling")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per point")
    args = parser.parse_args(argv)
    args.global_batch = args.global_batch or (8 if args.smoke else 64)
    args.micro_batch = args.micro_batch or (4 if args.smoke else 8)
    args.steps = args.steps or (3 if args.smoke else 8)
    shapes = [SMOKE_SHAPE] if args.smoke else (args.shapes or ",".join(SHAPES)).split(",")
    if args.gpus:
        counts = [int(n) for n in args.gpus.split(",")]
    else:
        import torch

        counts = [1, 2] if args.smoke else gpu_counts(torch.cuda.device_count())
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from train_speed import build_model_dir  # bench/train_speed.py: random weights from the public configs

    rows = args.global_batch * (args.steps + 2) + 40
    train_csv, _ = prepare_rows(args.work, rows=rows, validation_rows=8, test_rows=4)
    points: list[dict[str, Any]] = []
    for shape in shapes:
        model_dir = build_model_dir(shape, args.work)
        for gpus in counts:
            points.append(run_point(shape, model_dir, gpus, args, train_csv, args.work))
            print(f"done {shape} x{gpus}: exit {points[-1]['exit_code']}", flush=True)
        efficiency([p for p in points if p["shape"] == shape])
        if not args.smoke:
            shutil.rmtree(model_dir, ignore_errors=True)  # an 8B model takes 16 GB of the machine's disk
    summary = {"smoke": args.smoke, "gpu_counts": counts, "shapes": shapes, "global_batch": args.global_batch,
               "steps": args.steps, "loss_rtol": LOSS_RTOL, "points": points,
               "seconds_total": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(table(points))
    print(f"total {summary['seconds_total']} s; JSON: {args.out / 'scaling.json'}")
    return 0 if all(p["exit_code"] == 0 for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
