"""``./run.sh train <task> [--cpu] [--base-model M] [--gpus N --strategy S] [--resume]``: ``ludwig train`` a task YAML.

Every input is checked before Ludwig starts (:mod:`ludwig_mt.preflight`, the key check of
:mod:`ludwig_mt.config_keys`): each problem is one line naming the input and the fix, and nothing is written.
Ludwig then runs on a copy of the YAML rendered next to the results (the committed YAML is never edited) with the
overrides asked for (``--cpu`` / ``--base-model`` / ``--epochs`` / ``--batch-size``) and, when the YAML chooses none,
checkpoints four times an epoch (:func:`ludwig_mt.config.with_checkpoint_default`); a YAML that needs neither runs
as committed. Ludwig's own output goes to ``<output-directory>/train.log``; the terminal shows a progress bar (steps,
loss, ETA) fed by the ``write_training_progress`` instrumentation patch. Ctrl-C stops Ludwig after its current step
(its own clean-up, a checkpoint written) and prints the command that resumes. ``--gpus N`` runs the same command on
N processes through :mod:`ludwig_mt.launch` (data parallel; multi-node with ``--num-machines``/``--machine-rank``/
``--main-process-ip``); ``--resume`` continues the newest run in the output directory from its last checkpoint
(``ludwig train --model_resume_path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ludwig_mt.config import load_yaml, render_overrides, with_checkpoint_default, write_yaml
from ludwig_mt.config_keys import check_keys
from ludwig_mt.errors import WorkflowError
from ludwig_mt.launch import LaunchSpec, add_launch_arguments, command_and_env, plan_launch
from ludwig_mt.patches.env import env_flag
from ludwig_mt.patches.instrumentation import ENV_PROGRESS_FILE
from ludwig_mt.preflight import check_base_model, check_context, check_dataset, check_devices, cuda_device_count
from prep.registry import config_path

#: seconds between two looks at the progress file
POLL_SECONDS = 0.5


class TrainingInterrupted(WorkflowError):
    """Ctrl-C stopped the run; the message says where (the resume command is the caller's to print)."""


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


# ------------------------------------------------------------------------------------------ the failure line
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)|error)(?:: |$)")


def failure_line(log_text: str) -> str:
    """The line of a failed run's log that says what went wrong: the last exception line (``ValueError: ...``,
    the project's ``error: ...``; under the launcher a worker's, not torchrun's ``ChildFailedError`` summary), else
    the last line that is neither a tqdm bar nor a rule of ``=`` / ``-``."""
    lines = [line.strip() for chunk in log_text.splitlines() for line in chunk.split("\r")]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    exceptions = [line for line in exceptions if "ChildFailedError" not in line] or exceptions
    if exceptions:
        return exceptions[-1]
    plain = [line for line in lines if line and not re.fullmatch(r"[=\-_*~#\s]+", line)
             and not re.search(r"\d+%\|", line)]
    return plain[-1] if plain else "(the log is empty)"


# Failures whose cause was measured, and what fixed them there (matched on the failure line).
KNOWN_FIXES = (
    # SmolLM2-135M 4-bit on an H200, samsum (prompts to 640 tokens): the weights were NaN after the first step
    # with SDPA attention; eager attention trained (6 variants side by side: padding fix, Liger, bf16 autocast,
    # response-only logits each switched off still diverged). Cause not yet isolated (issue #13's closing note).
    ("NaN or Inf values", "NaN weights: measured with SDPA attention on a 4-bit model; train with eager attention "
                          "(LUDWIG_MT_SPEEDUPS_OFF=sdpa_attention) or a lower learning rate, and see"),
)


def known_fix(line: str) -> str | None:
    """What fixed a failure with this line before, or None."""
    return next((fix for needle, fix in KNOWN_FIXES if needle in line), None)


# ------------------------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """What the progress file said so far: the last step, the run's total, the last loss, the last checkpoint, and
    when the training loop started and its last step ended (epoch seconds)."""

    step: int = 0
    total: int = 0
    loss: float | None = None
    checkpoint: int | None = None
    first_step: int | None = None
    loop_start: float | None = None
    last_step_time: float | None = None

    def update(self, record: Mapping[str, Any]) -> None:
        if "loop_start" in record:
            self.loop_start = float(record["loop_start"])
        if "checkpoint" in record:
            self.checkpoint = int(record["checkpoint"])
        if "step" in record:
            self.step, self.total = int(record["step"]), int(record.get("total") or self.total)
            self.loss = record.get("loss")
            self.first_step = self.step if self.first_step is None else self.first_step
            self.last_step_time = record.get("time", self.last_step_time)

    @property
    def loop_seconds(self) -> float | None:
        """Seconds from the loop's start to its last step's end (evaluations between steps included, as in
        Ludwig's own progress bar); None without both records."""
        if self.loop_start is None or self.last_step_time is None or self.last_step_time <= self.loop_start:
            return None
        return self.last_step_time - self.loop_start


def read_progress(path: Path) -> Progress:
    """Everything a finished run's progress file recorded (an empty Progress when there is none)."""
    progress = Progress()
    for record in new_records(path, 0)[0]:
        progress.update(record)
    return progress


def new_records(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole JSON lines appended to ``path`` after byte ``offset``, and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, offset + end


class ProgressBar:
    """A tqdm bar over the run's steps on stderr, made when the first step is reported (a resumed run starts
    part-way); quiet when ``show`` is False."""

    def __init__(self, show: bool) -> None:
        self.show, self.bar = show, None

    def update(self, progress: Progress) -> None:
        if not self.show or not progress.total:
            return
        if self.bar is None:
            from tqdm import tqdm

            start = (progress.first_step or 1) - 1
            self.bar = tqdm(total=progress.total, initial=start, unit="step", desc="train", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.total = progress.total
        self.bar.update(progress.step - self.bar.n)
        if progress.loss is not None:
            self.bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def forwarding_sigint(proc: subprocess.Popen, interrupts: list[float]) -> Iterator[None]:
    """While the block runs, Ctrl-C is passed on to ``proc``'s process group (Ludwig and, under the launcher, its
    workers: started in their own session, so a terminal's Ctrl-C reaches them only through here, once per press)
    and recorded in ``interrupts`` instead of raising KeyboardInterrupt here. Ludwig's own handler finishes the
    step, writes a checkpoint and ends the run; a second press makes it quit at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        interrupts.append(time.time())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_with_progress(cmd: list[str], env: dict[str, str], log: TextIO, progress_file: Path, *,
                      show: bool) -> tuple[int, Progress, bool]:
    """Run ``cmd`` with its output in ``log``, following ``progress_file``; (exit code, progress, interrupted)."""
    progress, bar, offset, interrupts = Progress(), ProgressBar(show), 0, []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        with forwarding_sigint(proc, interrupts):
            while True:
                finished = proc.poll() is not None
                records, offset = new_records(progress_file, offset)
                for record in records:
                    progress.update(record)
                bar.update(progress)
                if finished:
                    break
                time.sleep(POLL_SECONDS)
    finally:
        bar.close()
        if proc.poll() is None:  # an error here: leave no Ludwig running behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, progress, bool(interrupts)


def progress_path(output_directory: Path, log_name: str = "train.log") -> Path:
    """The progress file a :func:`train` into ``output_directory`` writes beside its log."""
    return output_directory / f"{Path(log_name).stem}.progress.jsonl"


def train(config_path: Path, dataset: Path, output_directory: Path, *, extra_args: list[str] | None = None,
          log_name: str = "train.log", launch: LaunchSpec | None = None, config: Mapping[str, Any] | None = None,
          resume: bool = False, show_progress: bool = False, notes: Sequence[str] = ()) -> Path:
    """Run ``ludwig train`` as a subprocess with its output in a log file; return the trained model folder.

    ``launch`` runs it data-parallel through :mod:`ludwig_mt.launch`, which checks the strategy against ``config``
    (the YAML at ``config_path`` as the caller loaded it, handed down so it is read once; loaded here if not given);
    ``resume`` continues the newest run; ``notes`` (what the flags changed of the YAML's backend) head the log;
    ``show_progress`` draws the progress bar on stderr. Raises
    :class:`TrainingInterrupted` after a Ctrl-C, :class:`WorkflowError` with the log's error line on a failure.
    """
    if not dataset.exists():
        raise WorkflowError(f"{dataset}: dataset not found. Fix: run ./run.sh prep first or pass --dataset")
    output_directory.mkdir(parents=True, exist_ok=True)
    log = output_directory / log_name
    progress_file = progress_path(output_directory, log_name)
    ludwig_args = ["train", "--config", str(config_path), "--dataset", str(dataset),
                   "--output_directory", str(output_directory), "--skip_save_processed_input",
                   *(resume_args(output_directory) if resume else []), *(extra_args or [])]
    if launch is None:
        cmd, env = [ludwig_executable(), *ludwig_args], os.environ.copy()
    else:
        cmd, env = command_and_env(launch, ludwig_args, load_yaml(config_path) if config is None else config)
    env[ENV_PROGRESS_FILE] = str(progress_file)
    progress_file.unlink(missing_ok=True)
    if show_progress:
        print(f"ludwig train: full log in {log}", file=sys.stderr, flush=True)
    with open(log, "a" if resume else "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n" + "".join(f"note: {note}\n" for note in notes))
        fh.flush()
        code, progress, interrupted = run_with_progress(cmd, env, fh, progress_file, show=show_progress)
    if interrupted:
        at = f"at step {progress.step} of {progress.total}" if progress.total else "before the first step"
        saved = f"last checkpoint at step {progress.checkpoint}" if progress.checkpoint is not None else \
            "no checkpoint of this run"
        raise TrainingInterrupted(f"stopped {at}, {saved} (log: {log})")
    if code != 0:
        line = failure_line(log.read_text(encoding="utf-8", errors="replace"))
        raise WorkflowError(f"ludwig train failed (exit {code}): {line}. Fix: {known_fix(line) or 'see'} {log}")
    return model_dir(output_directory)


# -------------------------------------------------------------------------------------- inputs, checked first
def checked_config(args: argparse.Namespace, path: Path, dataset: Path) -> tuple[dict[str, Any], bool]:
    """The YAML to train, after every input check (nothing written yet), and whether it differs from the file at
    ``path`` (then a rendered copy is trained). One-line :class:`WorkflowError` for the first problem found."""
    config = load_yaml(path)
    if config.get("model_type") != "llm":
        raise WorkflowError(f"{path}: model_type is {config.get('model_type')!r}; this workflow trains LLM configs. "
                            "Fix: set model_type: llm")
    check_keys(config, str(path))
    base_model = str(args.base_model or config.get("base_model") or "")
    if not base_model:
        raise WorkflowError(f"{path}: no base_model. Fix: set base_model in the YAML or pass --base-model")
    context = check_base_model(base_model, "--base-model" if args.base_model else f"base_model in {path}",
                               offline=env_flag("HF_HUB_OFFLINE"))
    check_devices(config, gpus=args.gpus, cpu=args.cpu, cuda_devices=cuda_device_count(), source=str(path))
    batch = args.batch_size or (config.get("trainer") or {}).get("batch_size", 1)
    data = check_dataset(dataset, config, batch if isinstance(batch, int) else None)
    rendered = config
    if args.cpu or args.base_model or args.epochs or args.batch_size:
        rendered = render_overrides(config, base_model=args.base_model, cpu=args.cpu, epochs=args.epochs,
                                    batch_size=args.batch_size, dataset=dataset)  # lengths for --base-model
    if data.train_rows > 0:
        rendered = with_checkpoint_default(rendered, data.train_rows, (args.gpus or 1) * args.num_machines)
    check_context(rendered, context, base_model, str(path))
    return rendered, rendered != config


def resume_command(argv: list[str]) -> str:
    """The ``./run.sh train`` command line that continues this run: the same arguments plus ``--resume``."""
    return "./run.sh train " + shlex.join([*argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    try:
        return run(args, extra, argv)
    except TrainingInterrupted as err:
        out = args.output_directory or Path("results") / task_name(args.task)
        try:
            resume_args(out)
            how = f"Resume: {resume_command(argv)}"
        except WorkflowError:
            how = "Nothing to resume: run the same command again"
        print(f"interrupted: {err}. {how}", file=sys.stderr)
        return 130
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before ludwig train started: nothing written to resume", file=sys.stderr)
        return 130


def task_name(task: str) -> str:
    """``sql`` -> ``sql``; ``path/to/my_task.yaml`` -> ``my_task`` (its results folder and rendered YAML)."""
    return Path(task).stem if task.endswith((".yaml", ".yml")) else task


def run(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """Check every input, write the rendered YAML if any, train; the exit code."""
    yaml_given = args.task.endswith((".yaml", ".yml"))
    path = Path(args.task) if yaml_given else config_path(args.task)  # the task's record names its YAML
    task = task_name(args.task)
    dataset = args.dataset or Path("data/prepared") / task / "train.csv"
    out = args.output_directory or Path("results") / task
    if args.resume:
        resume_args(out)  # refused now, not after the checks
    config, rendered = checked_config(args, path, dataset)
    # the YAML's backend section decides processes and strategy, flags over it (and said); checked before any work
    launch, notes = plan_launch(args, config, cpu=args.cpu, source=str(path),
                                gpus_here=None if args.cpu else cuda_device_count())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if rendered:
        path = write_yaml(config, out / f"{task}.rendered.yaml",
                          header=f"# Rendered from {path} by ./run.sh train; do not edit.\n")
    model = train(path, dataset, out, extra_args=extra, launch=launch, config=config, resume=args.resume,
                  show_progress=True, notes=notes)
    print(f"trained: {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
