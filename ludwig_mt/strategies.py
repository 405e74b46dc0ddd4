"""Which data-parallel strategy a run uses, and what it may be combined with: plain rules, no Ludwig, no torch.

A task YAML declares its strategy in its ``backend:`` section (issue #18), in the form of Ludwig's own earlier
schema: ``backend: {type: local, trainer: {num_workers: auto, strategy: {type: deepspeed, zero_optimization:
{stage: 2, ...}}}}``; :func:`declared_backend` reads and checks it (one line per mistake). The launcher
(:mod:`ludwig_mt.launch`) checks a task config against the rules here before any process starts and hands the
YAML's DeepSpeed settings to the workers (:data:`ENV_DEEPSPEED`); the workers' patches
(:mod:`ludwig_mt.patches.distributed`) read the strategy and those settings from the environment the launcher sets,
and fill in the trainer's batch sizes.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ludwig_mt.errors import WorkflowError

ENV_STRATEGY = "LUDWIG_MT_STRATEGY"
#: the DeepSpeed settings (JSON) the launcher hands to its workers: the YAML's, with the stage the run uses
ENV_DEEPSPEED = "LUDWIG_MT_DEEPSPEED_CONFIG"

# ddp is accelerate's plain DDP, fsdp PyTorch's FSDP2 ``fully_shard`` through accelerate (set up in code: see
# ``ludwig_mt.patches.distributed.fsdp_plugin``), zero2/zero3 DeepSpeed with the YAML's settings
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
# strategies that shard the weights themselves: Ludwig's rank-0-only reads and writes of weights need gathering
SHARDED_WEIGHT_STRATEGIES = ("zero3", "fsdp")
ZERO_STAGES = {2: "zero2", 3: "zero3"}
#: DeepSpeed keys the trainer owns: written in at start-up from ``trainer:`` (one source of truth)
TRAINER_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                      "gradient_clipping")
#: what a DeepSpeed strategy gets when a flag asks for one that the YAML does not declare (or a bare torchrun)
DEFAULT_DEEPSPEED: dict[str, Any] = {"zero_allow_untested_optimizer": True, "bf16": {"enabled": False},
                                     "fp16": {"enabled": False}, "wall_clock_breakdown": False}
SECTION_KEYS = {"backend": ("type", "trainer"), "backend.trainer": ("num_workers", "use_gpu", "strategy")}


@dataclass(frozen=True)
class DeclaredBackend:
    """A YAML's ``backend:`` section, as the launcher uses it.

    ``strategy`` is None when the section declares none (then the flags or :func:`default_strategy` decide);
    ``num_workers`` is the processes per machine: a number, or ``"auto"`` for every visible GPU; ``deepspeed``
    holds DeepSpeed's own settings (``zero_optimization`` ...) for zero2/zero3, without the trainer-owned keys.
    """

    strategy: str | None = None
    num_workers: int | str = 1
    deepspeed: Mapping[str, Any] | None = None

    def describe(self) -> str:
        """``deepspeed zero2 on every visible GPU``: for log lines and notes."""
        where = "every visible GPU" if self.num_workers == "auto" else f"{self.num_workers} process(es)"
        return f"{self.strategy or 'no strategy'} on {where}"


def declared_backend(config: Mapping[str, Any] | None, source: str = "config") -> DeclaredBackend:
    """Read and check ``config``'s ``backend:`` section; a one-line :class:`WorkflowError` naming ``source`` and the
    key for every mistake. ``backend: local`` / ``{type: local}`` (no ``trainer:``) declares one plain process."""
    section = (config or {}).get("backend")
    if section is None or section == "local":
        return DeclaredBackend()

    def fail(key: str, problem: str, fix: str) -> WorkflowError:
        return WorkflowError(f"{source}: backend{key}: {problem}. Fix: {fix}")

    if not isinstance(section, Mapping):
        raise fail("", f"{section!r} is not a section", "write backend: {type: local, trainer: {...}} (README)")
    _refuse_unknown(section, "backend", fail)
    if section.get("type", "local") != "local":
        raise fail(".type", f"{section.get('type')!r} is not available in Ludwig 0.17.10 (its Ray backend is gone)",
                   "use type: local; processes and strategy go under backend.trainer")
    trainer = section.get("trainer")
    if trainer is None:
        return DeclaredBackend()
    if not isinstance(trainer, Mapping):
        raise fail(".trainer", f"{trainer!r} is not a section", "write trainer: {num_workers: auto, strategy: ...}")
    _refuse_unknown(trainer, "backend.trainer", fail)
    workers = trainer.get("num_workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise fail(".trainer.num_workers", f"{workers!r} is not a number of processes", "use auto or a number >= 1")
    strategy = trainer.get("strategy")
    if strategy is None:
        return DeclaredBackend(num_workers=workers)
    if isinstance(strategy, str):
        strategy = {"type": strategy}
    if not isinstance(strategy, Mapping) or strategy.get("type") not in ("deepspeed", "ddp", "fsdp"):
        raise fail(".trainer.strategy.type", f"{(strategy or {}).get('type') if isinstance(strategy, Mapping) else strategy!r}"
                   " is not a strategy", "use deepspeed (with zero_optimization.stage 2 or 3), ddp or fsdp")
    settings = {k: v for k, v in strategy.items() if k != "type"}
    if strategy["type"] != "deepspeed":
        if settings:
            raise fail(f".trainer.strategy.{next(iter(settings))}", f"{strategy['type']} takes no settings here",
                       "remove it (DeepSpeed's settings go with type: deepspeed)")
        return DeclaredBackend(strategy["type"], workers)
    stage = (settings.get("zero_optimization") or {}).get("stage") if isinstance(
        settings.get("zero_optimization"), Mapping) else None
    if stage not in ZERO_STAGES:
        raise fail(".trainer.strategy.zero_optimization.stage", f"{stage!r} is not supported",
                   "use 2 (QLoRA: shards optimizer state and gradients) or 3 (no quantization: shards weights too)")
    owned = [k for k in TRAINER_OWNED_KEYS if k in settings]
    if owned:
        raise fail(f".trainer.strategy.{owned[0]}", "is filled in from the trainer section at start-up",
                   "remove it and set trainer.batch_size / gradient_accumulation_steps / gradient_clipping")
    return DeclaredBackend(ZERO_STAGES[stage], workers, settings)


def _refuse_unknown(section: Mapping[str, Any], where: str, fail) -> None:
    unknown = sorted(set(section) - set(SECTION_KEYS[where]))
    if unknown:
        suffix = where[len("backend"):]
        raise fail(f"{suffix}.{unknown[0]}", "unknown key", f"use only {', '.join(SECTION_KEYS[where])} here")


def deepspeed_settings(strategy: str, declared: DeclaredBackend) -> dict[str, Any]:
    """DeepSpeed's settings for ``strategy`` (zero2/zero3): the YAML's, with the stage ``strategy`` asks for when a
    flag overrides the declared one; :data:`DEFAULT_DEEPSPEED` when the YAML declares no DeepSpeed settings."""
    settings = copy.deepcopy(dict(declared.deepspeed or DEFAULT_DEEPSPEED))
    stage = {name: stage for stage, name in ZERO_STAGES.items()}[strategy]
    settings["zero_optimization"] = {**settings.get("zero_optimization", {}), "stage": stage}
    return settings


def worker_deepspeed_settings(strategy: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """In a worker: the settings the launcher handed down (:data:`ENV_DEEPSPEED`), else the defaults for
    ``strategy`` (a bare ``torchrun``, which has no YAML section to read at start-up)."""
    raw = (os.environ if environ is None else environ).get(ENV_DEEPSPEED, "")
    if raw:
        return json.loads(raw)
    return deepspeed_settings(strategy, DeclaredBackend())


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
    fix = ("Fix: use --strategy zero2 or declare it in backend.trainer.strategy (deepspeed, zero_optimization.stage "
           "2: the default for QLoRA, shards optimizer state and gradients), or ddp")
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


def deepspeed_config(settings: Mapping[str, Any], trainer: Any, world_size: int) -> dict[str, Any]:
    """DeepSpeed's ``settings`` with Ludwig's batch sizes filled in.

    accelerate refuses ``"auto"`` batch sizes when ``prepare`` gets no dataloader (Ludwig has its own batcher),
    so the trainer's ``batch_size`` and ``gradient_accumulation_steps`` are written in here: one source of truth.
    """
    config = copy.deepcopy(dict(settings))
    accumulation = 1 if trainer.gradient_accumulation_steps == "auto" else trainer.gradient_accumulation_steps
    micro = trainer.batch_size
    if not isinstance(micro, int) or not isinstance(accumulation, int):
        raise WorkflowError(f"DeepSpeed needs numbers for trainer.batch_size and "
                            f"trainer.gradient_accumulation_steps, got {micro!r} and {accumulation!r}. Fix: set them "
                            "in the YAML (DeepSpeed fixes its batch size when it starts; Ludwig tunes 'auto' later)")
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * world_size
    clipping = getattr(getattr(trainer, "gradient_clipping", None), "clipglobalnorm", None)
    if clipping:
        config["gradient_clipping"] = float(clipping)
    return config


def default_strategy(config: Mapping[str, Any] | None) -> str:
    """ZeRO-2 for quantized (QLoRA) configs, plain DDP otherwise (nothing to shard in a small LoRA)."""
    return "zero2" if config and config.get("quantization") else "ddp"


def launch_hint(config: Mapping[str, Any] | None, argv: Sequence[str], gpus_here: int) -> str | None:
    """For a plain one-process ``ludwig train`` of a YAML that declares more processes: the one line that says
    how to launch them (None when one process is what the YAML declares here)."""
    declared = declared_backend(config)
    wanted = gpus_here if declared.num_workers == "auto" else int(declared.num_workers)
    if declared.strategy is None or wanted <= 1:
        return None
    return (f"ludwig_mt: this config's backend declares {declared.describe()} ({wanted} here) and this is one plain "
            f"process. To launch them: python -m ludwig_mt.launch -- {' '.join(argv)}")
