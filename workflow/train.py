"""``./run.sh train <task> [--cpu] [--base-model M] [--gpus N --strategy S] [--resume]``: ``ludwig train`` a task YAML.

Without overrides this is exactly ``ludwig train --config ludwig_configs/<task>.yaml --dataset ...``. With
``--cpu`` / ``--base-model`` / ``--epochs`` a rendered copy of the YAML is written next to the results and used
instead (the committed YAML is never edited). Ludwig's own output goes to ``<output-directory>/train.log``.
``--gpus N`` runs the same command on N processes through :mod:`ludwig_mt.launch` (data parallel; multi-node with
``--num-machines``/``--machine-rank``/``--main-process-ip``); ``--resume`` continues the newest run in the output
directory from its last checkpoint (``ludwig train --model_resume_path``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from ludwig_mt.errors import WorkflowError
from ludwig_mt.launch import LaunchSpec, add_launch_arguments, command_and_env, plan_launch
from prep.registry import config_path


def ludwig_executable() -> str:
    """The ``ludwig`` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("ludwig")
    return str(candidate) if candidate.exists() else shutil.which("ludwig") or "ludwig"


def model_dir(output_directory: Path) -> Path:
    """``<output_directory>/experiment_run*/model`` of the newest run (Ludwig adds _1, _2 ... on reruns)."""
    runs = sorted(output_directory.glob("*/model"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise WorkflowError(f"{output_directory}: no trained model found. Fix: check {output_directory}/train.log")
    return runs[-1]


def resume_args(output_directory: Path) -> list[str]:
    """``--model_resume_path`` for the newest run that has a checkpoint; a clear error when there is none."""
    runs = sorted(output_directory.glob("*/model/training_checkpoints/latest.ckpt"),
                  key=lambda p: (p.stat().st_mtime, len(str(p)), str(p)))  # ties: experiment_run_N, highest N
    if not runs:
        raise WorkflowError(f"{output_directory}: no run with a checkpoint to resume. Fix: train without --resume")
    return ["--model_resume_path", str(runs[-1].parents[2])]


def train(config_path: Path, dataset: Path, output_directory: Path, *, extra_args: list[str] | None = None,
          log_name: str = "train.log", launch: LaunchSpec | None = None, config: Mapping[str, Any] | None = None,
          resume: bool = False, notes: Sequence[str] = ()) -> Path:
    """Run ``ludwig train`` as a subprocess with its output in a log file; return the trained model folder.

    ``launch`` runs it data-parallel through :mod:`ludwig_mt.launch`, which checks the strategy against ``config``
    (the YAML at ``config_path`` as the caller loaded it, handed down so it is read once; loaded here if not given);
    ``resume`` continues the newest run; ``notes`` (what the flags changed of the YAML's backend) head the log.
    """
    if not dataset.exists():
        raise WorkflowError(f"{dataset}: dataset not found. Fix: run ./run.sh prep first or pass --dataset")
    output_directory.mkdir(parents=True, exist_ok=True)
    log = output_directory / log_name
    ludwig_args = ["train", "--config", str(config_path), "--dataset", str(dataset),
                   "--output_directory", str(output_directory), "--skip_save_processed_input",
                   *(resume_args(output_directory) if resume else []), *(extra_args or [])]
    if launch is None:
        cmd, env = [ludwig_executable(), *ludwig_args], os.environ.copy()
    else:
        cmd, env = command_and_env(launch, ludwig_args, load_yaml(config_path) if config is None else config)
    with open(log, "a" if resume else "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n" + "".join(f"note: {note}\n" for note in notes))
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise WorkflowError(f"ludwig train failed (exit {proc.returncode}): {' '.join(tail)}. Fix: see {log}")
    return model_dir(output_directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh train", description=__doc__.splitlines()[0])
    parser.add_argument("task", help="task name (ludwig_configs/<task>.yaml) or a YAML path")
    parser.add_argument("--dataset", type=Path, help="default: data/prepared/<task>/train.csv")
    parser.add_argument("--output-directory", type=Path, help="default: results/<task>")
    parser.add_argument("--cpu", action="store_true", help="render a copy without quantization / CUDA-only settings")
    parser.add_argument("--base-model", help="local model folder or hub name instead of the YAML's")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--resume", action="store_true", help="continue the newest run here from its checkpoint")
    add_launch_arguments(parser, default_gpus=None)
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    yaml_given = args.task.endswith((".yaml", ".yml"))
    try:
        path = Path(args.task) if yaml_given else config_path(args.task)  # the task's record names its YAML
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    task = path.stem if yaml_given else args.task
    dataset = args.dataset or Path("data/prepared") / task / "train.csv"
    out = args.output_directory or Path("results") / task
    try:
        rendered = args.cpu or args.base_model or args.epochs or args.batch_size
        config = load_yaml(path)  # read once, handed down to the launcher
        source = str(path)
        if rendered:
            config = render_overrides(config, base_model=args.base_model, cpu=args.cpu, epochs=args.epochs,
                                      batch_size=args.batch_size, dataset=dataset)  # lengths for --base-model
            path = write_yaml(config, out / f"{task}.rendered.yaml",
                              header=f"# Rendered from {path} by ./run.sh train; do not edit.\n")
        launch, notes = plan_launch(args, config, cpu=args.cpu, source=source)  # the YAML's backend, flags over it
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        model = train(path, dataset, out, extra_args=extra, launch=launch, config=config, resume=args.resume,
                      notes=notes)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"trained: {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
