"""Which data-parallel strategy a run uses, and what it may be combined with: plain rules, no Ludwig, no torch.

The launcher (:mod:`ludwig_mt.launch`) checks a task config against them before any process starts, and the
workers' patches (:mod:`ludwig_mt.patches.distributed`) read the strategy from the environment the launcher sets. The
DeepSpeed files in ``ludwig_configs/distributed/`` are rendered here with the trainer's batch sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ludwig_mt.errors import WorkflowError

ENV_STRATEGY = "LUDWIG_MT_STRATEGY"
DISTRIBUTED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ludwig_configs" / "distributed"

# strategy name -> DeepSpeed file in ludwig_configs/distributed/ (None: no file; ddp is accelerate's plain DDP, fsdp
# PyTorch's FSDP2 ``fully_shard`` through accelerate, set up in code: see ``ludwig_mt.patches.distributed.fsdp_plugin``)
STRATEGY_FILES: dict[str, str | None] = {"ddp": None, "zero2": "zero2.json", "zero3": "zero3.json", "fsdp": None}
STRATEGIES = tuple(STRATEGY_FILES)
# strategies that shard the weights themselves: Ludwig's rank-0-only reads and writes of weights need gathering
SHARDED_WEIGHT_STRATEGIES = ("zero3", "fsdp")


def strategy_name() -> str | None:
    """The strategy the launcher asked for, or ``ddp`` for a bare ``torchrun``/``accelerate launch`` of N > 1."""
    name = os.environ.get(ENV_STRATEGY, "").strip().lower()
    if name:
        if name not in STRATEGIES:
            raise WorkflowError(f"{ENV_STRATEGY}={name}: unknown strategy. Fix: use one of {', '.join(STRATEGIES)}")
        return name
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def is_distributed_launch() -> bool:
    """True in a worker started by a distributed launcher (or by ``ludwig_mt.launch`` with one process)."""
    return strategy_name() is not None


def check_strategy_compatible(strategy: str, config: Mapping[str, Any]) -> None:
    """Refuse known-bad strategies and combinations before any work, with one line that says what to use instead."""
    quant = config.get("quantization")
    bits = (quant.get("bits", 4) if isinstance(quant, dict) else 4) if quant else None
    fix = "Fix: use --strategy zero2 (the default for QLoRA: shards optimizer state and gradients) or ddp"
    if strategy == "zero3" and bits:
        raise WorkflowError(f"DeepSpeed ZeRO-3 cannot shard {bits}-bit bitsandbytes weights (Ludwig issue #3783). {fix}")
    if strategy == "fsdp" and bits:
        raise WorkflowError(
            f"FSDP with {bits}-bit weights needs bnb_4bit_quant_storage equal to the compute dtype, and Ludwig "
            f"0.17.10's quantization schema has no such key (it always stores uint8). {fix}")
    postprocessor = (config.get("adapter") or {}).get("postprocessor") or {}
    if strategy in SHARDED_WEIGHT_STRATEGIES and postprocessor.get("merge_adapter_into_base_model"):
        raise WorkflowError(f"--strategy {strategy} shards the base model's weights, so Ludwig cannot merge the adapter "
                            "into them after training (adapter.postprocessor.merge_adapter_into_base_model). Fix: drop "
                            "that setting and merge after training, or use --strategy zero2 or ddp")


def deepspeed_config(strategy: str, trainer: Any, world_size: int) -> dict[str, Any]:
    """The strategy's JSON from ``ludwig_configs/distributed/`` with Ludwig's batch sizes filled in.

    accelerate refuses ``"auto"`` batch sizes when ``prepare`` gets no dataloader (Ludwig has its own batcher),
    so the trainer's ``batch_size`` and ``gradient_accumulation_steps`` are written in here: one source of truth.
    """
    config = plugin_file(strategy)
    accumulation = 1 if trainer.gradient_accumulation_steps == "auto" else trainer.gradient_accumulation_steps
    micro = trainer.batch_size
    if not isinstance(micro, int) or not isinstance(accumulation, int):
        raise WorkflowError(f"--strategy {strategy} needs numbers for trainer.batch_size and "
                            f"trainer.gradient_accumulation_steps, got {micro!r} and {accumulation!r}. Fix: set them "
                            "in the YAML (DeepSpeed fixes its batch size when it starts; Ludwig tunes 'auto' later)")
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * world_size
    clipping = getattr(getattr(trainer, "gradient_clipping", None), "clipglobalnorm", None)
    if clipping:
        config["gradient_clipping"] = float(clipping)
    return config


def without_comments(value: Any) -> Any:
    """``value`` with every ``_``-prefixed key removed, at any depth: DeepSpeed's sections refuse unknown keys."""
    if isinstance(value, dict):
        return {k: without_comments(v) for k, v in value.items() if not k.startswith("_")}
    return value


def plugin_file(strategy: str) -> dict[str, Any]:
    """The strategy's file in ``ludwig_configs/distributed/`` without its ``_comment`` keys."""
    path = DISTRIBUTED_CONFIG_DIR / str(STRATEGY_FILES[strategy])
    return without_comments(json.loads(path.read_text(encoding="utf-8")))


def default_strategy(config: Mapping[str, Any] | None) -> str:
    """ZeRO-2 for quantized (QLoRA) configs, plain DDP otherwise (nothing to shard in a small LoRA)."""
    return "zero2" if config and config.get("quantization") else "ddp"
