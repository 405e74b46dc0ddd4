"""Evidence and drills for the tests, the benchmarks and the GPU runs: off unless asked for.

* ``LUDWIG_MT_RANK_REPORT=DIR`` makes every rank write ``DIR/rank<r>.json`` (rows it trained on per epoch, its
  loss, tokens and end time per step, peak GPU memory) and ``DIR/rank<r>.safetensors`` (its trainable weights
  after the last step): the evidence that rows are sharded and weights stay in sync;
* ``LUDWIG_MT_PROGRESS_FILE=FILE`` makes rank 0 append one JSON line when the training loop starts
  (``loop_start``: epoch seconds), per training step (``step``, ``total``, ``loss``, ``epoch``, ``time``) and per
  checkpoint (``checkpoint``: its step) to FILE: ``./run.sh train`` tails it for the progress bar on the terminal
  while Ludwig's own output goes to the log file, and the study times the loop with it (parsing tqdm bars out of a
  log breaks with every change of format and counts whole seconds; a record written where the numbers are does
  not);
* ``LUDWIG_MT_CRASH_AFTER_CHECKPOINT=N`` kills the process right after its N-th checkpoint: a crash drill for the
  resume tests;
* ``record_step_losses`` (applied by name, by ``bench/train_speed.py``'s Ludwig worker) keeps every training step's
  loss in :data:`STEP_LOSSES`, in the process, for the benchmark's loss check.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from ludwig_mt.patches.core import rebind
from ludwig_mt.sharded_weights import whole_trainable_weights

logger = logging.getLogger(__name__)

ENV_CRASH_AFTER_CHECKPOINT = "LUDWIG_MT_CRASH_AFTER_CHECKPOINT"
ENV_RANK_REPORT = "LUDWIG_MT_RANK_REPORT"
ENV_PROGRESS_FILE = "LUDWIG_MT_PROGRESS_FILE"
#: the training losses of this process, one per ``Trainer.train_step`` (``record_step_losses``)
STEP_LOSSES: list[float] = []


def crash_drill_after_checkpoint() -> None:
    """``LUDWIG_MT_CRASH_AFTER_CHECKPOINT=N``: SIGKILL this process right after its N-th checkpoint is written."""

    def crashing(original):
        @functools.wraps(original)
        def save_checkpoint(self, progress_tracker, save_path, checkpoint_manager):
            original(self, progress_tracker, save_path, checkpoint_manager)
            target = os.environ.get(ENV_CRASH_AFTER_CHECKPOINT, "")
            if target and progress_tracker.checkpoint_number >= int(target):
                logger.warning("ludwig_mt crash drill: killing rank after checkpoint %d",
                               progress_tracker.checkpoint_number)
                os.kill(os.getpid(), signal.SIGKILL)

        return save_checkpoint

    rebind("ludwig.trainers.trainer:Trainer.save_checkpoint", crashing)


def append_record(path: str, record: dict[str, Any]) -> None:
    """One JSON line, flushed: a reader tailing the file sees whole records as they happen."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_training_progress() -> None:
    """``LUDWIG_MT_PROGRESS_FILE=FILE``: rank 0 appends a record per training step and per checkpoint (module doc).

    ``_train_loop`` keeps the progress tracker on the trainer, so ``train_step`` can tell the step it completes
    (Ludwig increments ``steps`` after the call) and the run's total (the tracker's: Ludwig's Ctrl-C handler sets
    the trainer's own ``total_steps`` to 1).
    """
    def keeping_tracker(original_loop):
        @functools.wraps(original_loop)
        def _train_loop(self, batcher, progress_tracker, *args, **kwargs):
            if getattr(self, "_ludwig_mt_progress_tracker", None) is None and self.is_coordinator():
                append_record(os.environ[ENV_PROGRESS_FILE], {"loop_start": time.time()})  # once: a loop per epoch
            self._ludwig_mt_progress_tracker = progress_tracker
            return original_loop(self, batcher, progress_tracker, *args, **kwargs)

        return _train_loop

    def recording_step(original_step):
        @functools.wraps(original_step)
        def train_step(self, *args, **kwargs):
            result = original_step(self, *args, **kwargs)
            tracker = getattr(self, "_ludwig_mt_progress_tracker", None)
            if tracker is not None and self.is_coordinator():
                append_record(os.environ[ENV_PROGRESS_FILE], {
                    "step": int(tracker.steps) + 1, "total": int(tracker.total_steps or self.total_steps),
                    "loss": float(result[0].detach().float().item()), "epoch": int(tracker.epoch),
                    "time": time.time()})  # after .item(): the step's GPU work is done
            return result

        return train_step

    def recording_checkpoint(original_save):
        @functools.wraps(original_save)
        def save_checkpoint(self, progress_tracker, save_path, checkpoint_manager):
            original_save(self, progress_tracker, save_path, checkpoint_manager)
            if self.is_coordinator():
                append_record(os.environ[ENV_PROGRESS_FILE], {"checkpoint": int(progress_tracker.steps)})

        return save_checkpoint

    rebind("ludwig.trainers.trainer:Trainer._train_loop", keeping_tracker)
    rebind("ludwig.trainers.trainer:Trainer.train_step", recording_step)
    rebind("ludwig.trainers.trainer:Trainer.save_checkpoint", recording_checkpoint)


def _rank() -> int:
    from ludwig import distributed as ludwig_distributed

    strategy = ludwig_distributed._current_strategy
    return strategy.rank() if strategy is not None else 0


def write_rank_report() -> None:
    """``LUDWIG_MT_RANK_REPORT=DIR``: per rank, the rows, losses and final trainable weights (see module doc)."""
    import torch

    report: dict[str, Any] = {"rows": [], "losses": [], "tokens": [], "step_end_seconds": []}
    weights: dict[str, Any] = {}

    def recording_step(original_step):
        @functools.wraps(original_step)
        def train_step(self, inputs, targets, *args, **kwargs):
            result = original_step(self, inputs, targets, *args, **kwargs)
            report["losses"].append(float(result[0].detach().float().item()))  # .item() waits for the GPU
            report["step_end_seconds"].append(time.perf_counter())
            report["tokens"].append(int(torch.as_tensor(result[2]).sum().item()))
            return result

        return train_step

    def recording_rows_and_weights(original_loop):
        @functools.wraps(original_loop)
        def _train_loop(self, batcher, progress_tracker, *args, **kwargs):
            report["rows"].append([int(i) for i in iter(batcher.sampler)])
            result = original_loop(self, batcher, progress_tracker, *args, **kwargs)
            weights.clear()
            with whole_trainable_weights(self.model):  # ZeRO-3/FSDP: whole tensors, not this rank's shard
                weights.update({n: p.detach().float().cpu().clone().contiguous()
                                for n, p in self.model.named_parameters() if p.requires_grad})
            return result

        return _train_loop

    def writing_report(original_train):
        @functools.wraps(original_train)
        def train(self, *args, **kwargs):
            try:
                return original_train(self, *args, **kwargs)
            finally:
                from safetensors.torch import save_file

                out = Path(os.environ[ENV_RANK_REPORT])
                out.mkdir(parents=True, exist_ok=True)
                rank = _rank()
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
                (out / f"rank{rank}.json").write_text(json.dumps(
                    {"rank": rank, "world_size": self.distributed.size(), "steps": len(report["losses"]),
                     "peak_gpu_gib": peak, **report}))
                if weights:
                    save_file(weights, str(out / f"rank{rank}.safetensors"))

        return train

    rebind("ludwig.trainers.trainer:Trainer.train_step", recording_step)
    rebind("ludwig.trainers.trainer:Trainer._train_loop", recording_rows_and_weights)
    rebind("ludwig.trainers.trainer:Trainer.train", writing_report)


def record_step_losses() -> None:
    """Keep each training step's loss (times the gradient-accumulation steps: the batch's mean loss) in
    :data:`STEP_LOSSES` (``float`` waits for the step's GPU work, as the benchmark's step timer does too)."""

    def recording(original):
        @functools.wraps(original)
        def train_step(self, inputs, targets, should_step=True, profiler=None):
            out = original(self, inputs, targets, should_step=should_step, profiler=profiler)
            STEP_LOSSES.append(float(out[0].detach()) * self.gradient_accumulation_steps)
            return out

        return train_step

    rebind("ludwig.trainers.trainer:Trainer.train_step", recording)
