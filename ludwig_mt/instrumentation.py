"""Evidence and drills for the tests and the GPU runs: off unless their environment variable is set.

* ``LUDWIG_MT_RANK_REPORT=DIR`` makes every rank write ``DIR/rank<r>.json`` (rows it trained on per epoch, its
  loss, tokens and end time per step, peak GPU memory) and ``DIR/rank<r>.safetensors`` (its trainable weights
  after the last step): the evidence that rows are sharded and weights stay in sync;
* ``LUDWIG_MT_CRASH_AFTER_CHECKPOINT=N`` kills the process right after its N-th checkpoint: a crash drill for the
  resume tests.
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

from ludwig_mt.ludwig_fixes import _once
from ludwig_mt.sharded_weights import whole_trainable_weights

logger = logging.getLogger(__name__)

ENV_CRASH_AFTER_CHECKPOINT = "LUDWIG_MT_CRASH_AFTER_CHECKPOINT"
ENV_RANK_REPORT = "LUDWIG_MT_RANK_REPORT"


@_once
def crash_drill_after_checkpoint() -> None:
    """``LUDWIG_MT_CRASH_AFTER_CHECKPOINT=N``: SIGKILL this process right after its N-th checkpoint is written."""
    from ludwig.trainers.trainer import Trainer

    original = Trainer.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(self, progress_tracker, save_path, checkpoint_manager):
        original(self, progress_tracker, save_path, checkpoint_manager)
        target = os.environ.get(ENV_CRASH_AFTER_CHECKPOINT, "")
        if target and progress_tracker.checkpoint_number >= int(target):
            logger.warning("ludwig_mt crash drill: killing rank after checkpoint %d", progress_tracker.checkpoint_number)
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.save_checkpoint = save_checkpoint


def _rank() -> int:
    from ludwig import distributed as ludwig_distributed

    strategy = ludwig_distributed._current_strategy
    return strategy.rank() if strategy is not None else 0


@_once
def write_rank_report() -> None:
    """``LUDWIG_MT_RANK_REPORT=DIR``: per rank, the rows, losses and final trainable weights (see module doc)."""
    import torch
    from ludwig.trainers.trainer import Trainer

    report: dict[str, Any] = {"rows": [], "losses": [], "tokens": [], "step_end_seconds": []}
    weights: dict[str, Any] = {}
    original_step, original_loop, original_train = Trainer.train_step, Trainer._train_loop, Trainer.train

    @functools.wraps(original_step)
    def train_step(self, inputs, targets, *args, **kwargs):
        result = original_step(self, inputs, targets, *args, **kwargs)
        report["losses"].append(float(result[0].detach().float().item()))  # .item() waits for the GPU
        report["step_end_seconds"].append(time.perf_counter())
        report["tokens"].append(int(torch.as_tensor(result[2]).sum().item()))
        return result

    @functools.wraps(original_loop)
    def _train_loop(self, batcher, progress_tracker, *args, **kwargs):
        report["rows"].append([int(i) for i in iter(batcher.sampler)])
        result = original_loop(self, batcher, progress_tracker, *args, **kwargs)
        weights.clear()
        with whole_trainable_weights(self.model):  # ZeRO-3/FSDP: whole tensors, not this rank's shard
            weights.update({n: p.detach().float().cpu().clone().contiguous()
                            for n, p in self.model.named_parameters() if p.requires_grad})
        return result

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

    Trainer.train_step, Trainer._train_loop, Trainer.train = train_step, _train_loop, train


def apply_all() -> None:
    """Apply the drills whose environment variable is set; safe to call many times."""
    if os.environ.get(ENV_CRASH_AFTER_CHECKPOINT):
        crash_drill_after_checkpoint()
    if os.environ.get(ENV_RANK_REPORT):
        write_rank_report()
