"""Process-per-GPU data-parallel fine-tuning for Ludwig 0.17.10 through accelerate (GitHub issue #5).

Ludwig 0.17.10 removed its DeepSpeed/DDP/FSDP backends but kept ``AccelerateStrategy`` (never instantiated: the
local backend always starts a ``LocalStrategy``) and a trainer and batcher written against the strategy
interface. :func:`apply_all` (called by ``ludwig_mt.ludwig_fixes.apply_all``) wakes that path up, only in a
process started by a distributed launcher (``WORLD_SIZE`` > 1, or ``LUDWIG_MT_STRATEGY`` set by
:mod:`ludwig_mt.launch`); in every other process it changes nothing except the resume fix below.

What each patch fixes (all small, idempotent, applied from the outside):

* the local backend starts :class:`WorkflowAccelerateStrategy` instead of ``LocalStrategy``, answers
  ``is_coordinator()`` with the real rank (so only rank 0 writes the output directory) and hands the strategy
  to the trainer (without it the trainer builds its own ``LocalStrategy`` and every rank trains on all rows);
* ZeRO-3 and FSDP (PyTorch FSDP2, ``--strategy fsdp``) shard the weights themselves; Ludwig's rank-0-only reads
  and writes of them (checkpoints, best-checkpoint reload, final adapter) are gathered on every rank
  (:func:`whole_trainable_weights`, :func:`loading_whole_weights`, :class:`ShardedCheckpoint`);
* 4-bit models are loaded on the process's own GPU (``device_map={"": local_rank}``) instead of ``"auto"``,
  which would spread every rank's copy over all GPUs;
* resuming a run continues its learning-rate schedule (Ludwig rebuilds the scheduler at step 0 after restoring it)
  and, killed in the middle of an epoch, skips the batches it already trained on (Ludwig restarts the epoch at
  its first batch). Without both a resumed run does not end where an uninterrupted one ends. Active always;
* ``LUDWIG_MT_RANK_REPORT=DIR`` makes every rank write ``DIR/rank<r>.json`` (rows it trained on per epoch, its
  loss, tokens and end time per step, peak GPU memory) and ``DIR/rank<r>.safetensors`` (its trainable weights
  after the last step): the evidence that rows are sharded and weights stay in sync, for the tests and for a GPU
  run. Off unless set;
* ``LUDWIG_MT_CRASH_AFTER_CHECKPOINT=N`` kills the process right after its N-th checkpoint: a crash drill for the
  resume tests, off unless set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from ludwig_mt import model_loading
from ludwig_mt.ludwig_fixes import WorkflowError, _once

logger = logging.getLogger(__name__)

ENV_STRATEGY = "LUDWIG_MT_STRATEGY"
ENV_CRASH_AFTER_CHECKPOINT = "LUDWIG_MT_CRASH_AFTER_CHECKPOINT"
ENV_RANK_REPORT = "LUDWIG_MT_RANK_REPORT"
DISTRIBUTED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ludwig_configs" / "distributed"

# strategy name -> DeepSpeed file in ludwig_configs/distributed/ (None: no file; ddp is accelerate's plain DDP, fsdp
# PyTorch's FSDP2 ``fully_shard`` through accelerate, set up in code: see :func:`fsdp_plugin`)
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


def check_strategy_compatible(strategy: str, config: dict[str, Any]) -> None:
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


def _strategy_class():
    """Build the subclass lazily: importing Ludwig's accelerate module pulls in torch and accelerate."""
    from ludwig.distributed.accelerate import AccelerateStrategy

    class WorkflowAccelerateStrategy(AccelerateStrategy):
        """``AccelerateStrategy`` plus what Ludwig's trainer needs from it under DeepSpeed and DDP."""

        def __init__(self, strategy: str) -> None:
            import torch
            from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

            check_strategy_compatible(strategy, {})
            self.strategy = strategy
            self._should_step = True
            kwargs: dict[str, Any] = {}
            if strategy == "ddp":
                # static_graph: PyTorch's documented DDP setting for reentrant gradient checkpointing (Ludwig sets
                # use_reentrant=True), which re-runs parts of forward inside backward.
                kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(static_graph=True)]
            elif self.uses_deepspeed:
                from accelerate import DeepSpeedPlugin

                # batch sizes are set in prepare(), once the trainer config is known
                kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=plugin_file(strategy))
            elif strategy == "fsdp" and torch.cuda.is_available():
                kwargs["fsdp_plugin"] = fsdp_plugin()
            if not torch.cuda.is_available():  # CPU (tests, smoke runs): without these accelerate sees a world of 1
                if self.uses_deepspeed:
                    kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(backend="gloo"))
                else:
                    kwargs["cpu"] = True
            self.accelerator = Accelerator(**kwargs)
            if strategy == "fsdp" and not torch.cuda.is_available():
                # accelerate 1.15 ignores an FSDP plugin on CPU (MULTI_CPU: plain DDP). PyTorch's FSDP2 runs on CPU
                # with gloo, and accelerate's prepare() applies it once its state says FSDP: the CPU tests' path.
                from accelerate.utils import DistributedType

                if not torch.distributed.is_initialized():  # one process: accelerate starts no process group
                    torch.distributed.init_process_group(backend="gloo")
                self.accelerator.state.fsdp_plugin = fsdp_plugin()
                self.accelerator.state.distributed_type = DistributedType.FSDP
            self._prepared_model = None
            self._prepared_optimizer = None
            logger.info("ludwig_mt: %s strategy, rank %d of %d, device %s", strategy, self.rank(), self.size(),
                        self.accelerator.device)

        @property
        def uses_deepspeed(self) -> bool:
            return self.strategy in ("zero2", "zero3")

        def prepare(self, model, trainer_config, base_learning_rate):
            if self.uses_deepspeed:
                plugin = self.accelerator.state.deepspeed_plugin
                plugin.deepspeed_config.update(deepspeed_config(self.strategy, trainer_config, self.size()))
            if self.strategy == "fsdp":
                self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = decoder_layer_classes(model)
            dist_model, optimizer = super().prepare(model, trainer_config, base_learning_rate)
            if self.strategy == "fsdp":
                unshard_root_for_generate(dist_model)
            # FineTuneTrainer.evaluation reads ``self.dist_model.tokenizer``; the DDP/DeepSpeed wrapper hides it.
            object.__setattr__(dist_model, "tokenizer", getattr(model, "tokenizer", None))
            return dist_model, optimizer

        @contextlib.contextmanager
        def prepare_model_update(self, model, should_step: bool):
            self._should_step = should_step
            if self.uses_deepspeed:
                # ZeRO-2 partitions gradients, and its engine refuses ``no_sync`` (what Ludwig's strategy uses to
                # skip synchronisation between accumulation steps); backward() below marks the step boundaries.
                yield
                return
            with super().prepare_model_update(model, should_step):
                yield

        def backward(self, loss, model) -> None:
            if self.uses_deepspeed:
                # Ludwig already divided the loss by its accumulation steps and decides when to step: tell
                # DeepSpeed not to scale again and to step (reduce + update) only on Ludwig's step boundaries.
                self.accelerator.gradient_state._set_sync_gradients(self._should_step)
                self.accelerator.backward(loss, scale_wrt_gas=False)
            else:
                self.accelerator.backward(loss)

        def create_checkpoint_handle(self, dist_model, model, optimizer=None, scheduler=None):
            if self.strategy in ("zero2", *SHARDED_WEIGHT_STRATEGIES):
                return _sharded_checkpoint_class()(self, model, optimizer, scheduler)
            return super().create_checkpoint_handle(dist_model, model, optimizer, scheduler)

        def allow_clip_gradients(self) -> bool:
            # DeepSpeed clips inside engine.step (its "gradient_clipping" key); its gradients are partitioned.
            return not self.uses_deepspeed

        def local_size(self) -> int:
            return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

        def shutdown(self) -> None:
            self.accelerator.end_training()

    return WorkflowAccelerateStrategy


def zero_partition_path(checkpoint_path: str, rank: int, world_size: int, kind: str = "zero") -> str:
    """Where rank ``rank`` of ``world_size`` keeps its optimizer partition (``kind``: zero or fsdp) next to a Ludwig
    checkpoint."""
    return f"{checkpoint_path}.{kind}-rank{rank}-of{world_size}.pt"


def fsdp_plugin():
    """accelerate's plugin for PyTorch FSDP2 (``fully_shard``): each decoder layer its own unit (classes set in
    ``prepare`` from the Hugging Face model's ``_no_split_modules``), weights resharded after each forward."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, cpu_ram_efficient_loading=False,
                                          state_dict_type="FULL_STATE_DICT")


def decoder_layer_classes(model: Any) -> list[str]:
    """The Hugging Face model's ``_no_split_modules`` (its decoder-layer classes): FSDP's wrapping units. Ludwig's
    ``LLM`` wrapper and peft's have none, so the first module inside that declares them is asked."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    raise WorkflowError("--strategy fsdp: the model declares no _no_split_modules (its decoder-layer classes), so "
                        "FSDP has no units to wrap. Fix: use --strategy zero3")


def unshard_root_for_generate(model: Any) -> None:
    """FSDP2 gathers the root module's own weights (embeddings, final norm, head) in the root's forward only;
    Ludwig's evaluation calls ``generate``, which never runs it. Gather them around ``generate``, and make Hugging
    Face's ``generate`` keep every rank stepping until all are done (``synced_gpus``), as under ZeRO-3."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    for module in model.modules():
        if hasattr(type(module), "generate") and hasattr(module, "_no_split_modules"):
            module._is_fsdp_managed_module = True  # transformers' flag for FSDP2: synced_gpus=True in generate
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        model.unshard()
        try:
            return original(*args, **kwargs)
        finally:
            model.reshard()

    object.__setattr__(model, "generate", generate)


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """This rank's optimizer state for its own file; FSDP2's DTensor states become their local shards."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    if isinstance(state.get("state"), dict):
        state["state"] = {index: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in values.items()}
                          for index, values in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """The inverse of :func:`local_optimizer_state`: local shards become DTensors shaped like their parameters."""
    import torch
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state.get("state", {}).items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.shape == param.to_local().shape and value.dim() > 0:
                    values[key] = DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                                     stride=param.stride())
    optimizer.load_state_dict(state)


def _sharded_checkpoint_class():
    from ludwig.utils.checkpoint_utils import MultiNodeCheckpoint

    class ShardedCheckpoint(MultiNodeCheckpoint):
        """Ludwig's checkpoint, plus each rank's optimizer partition in its own file (ZeRO-2/3, FSDP).

        Every rank holds only its slice of the optimizer state, so Ludwig's rank-0 file cannot restore it (and its
        restricted unpickler refuses DeepSpeed's state). Weights, schedule and step stay in Ludwig's file: under
        ZeRO-3 and FSDP the trainable weights are gathered whole on every rank for rank 0 to write, and loaded
        whole and sharded again on every rank.
        """

        def _partition(self, save_path: str) -> str:
            kind = "zero" if self.distributed.uses_deepspeed else self.distributed.strategy
            return zero_partition_path(save_path, self.distributed.rank(), self.distributed.size(), kind)

        def save(self, save_path: str, global_step: int) -> None:
            import torch

            optimizer, self.optimizer = self.optimizer, None
            try:
                with whole_trainable_weights(self.model):  # a collective: every rank takes part
                    super().save(save_path, global_step)
            finally:
                self.optimizer = optimizer
            if optimizer is not None:
                from prep.common import atomic_path

                state = optimizer.state_dict() if self.distributed.uses_deepspeed else local_optimizer_state(optimizer)
                with atomic_path(Path(self._partition(save_path))) as tmp:
                    torch.save(state, tmp)
            self.distributed.barrier()

        def load(self, save_path: str, device=None) -> bool:
            import torch

            optimizer, self.optimizer = self.optimizer, None
            try:
                with loading_whole_weights(self.model):  # every rank reads the file; rank 0's values are sharded
                    loaded = super().load(save_path, device)
            finally:
                self.optimizer = optimizer
            if loaded and optimizer is not None:
                partition = self._partition(save_path)
                if not os.path.exists(partition):
                    # ValueError, not RuntimeError: Ludwig would swallow the latter and silently start afresh
                    raise ValueError(f"{partition}: no optimizer partition for this rank. Fix: resume with the "
                                     f"number of processes the run was started with (found: "
                                     f"{sorted(os.listdir(os.path.dirname(partition)))})")
                # written by this project, one file per rank; DeepSpeed's state holds objects (loss scaler)
                state = torch.load(partition, map_location=device, weights_only=False)
                if self.distributed.uses_deepspeed:
                    per_rank = [None] * self.distributed.size()
                    per_rank[self.distributed.rank()] = state
                    optimizer.load_state_dict(per_rank)
                else:
                    load_local_optimizer_state(optimizer, state)
            return loaded

    return ShardedCheckpoint


def current_strategy():
    from ludwig.distributed import get_current_dist_strategy

    return get_current_dist_strategy()


@_once
def start_accelerate_strategy_under_launcher() -> None:
    """Local backend: accelerate strategy, real coordinator answer, and the strategy handed to the trainer."""
    from ludwig import distributed as ludwig_distributed
    from ludwig.backend.base import LocalBackend, LocalTrainingMixin

    original_create_trainer = LocalBackend.create_trainer

    def initialize() -> None:
        name = strategy_name()
        if name is None:
            ludwig_distributed.init_dist_strategy("local")
            return
        current = ludwig_distributed._current_strategy
        if getattr(current, "strategy", None) == name:
            return  # Ludwig initializes the backend more than once; accelerate allows one Accelerator per plugin
        ludwig_distributed._current_strategy = _strategy_class()(name)

    def is_coordinator() -> bool:
        if strategy_name() is None or ludwig_distributed._current_strategy is None:
            return True
        return ludwig_distributed._current_strategy.is_coordinator()

    @functools.wraps(original_create_trainer)
    def create_trainer(self, config, model, **kwargs):
        if strategy_name() is not None and kwargs.get("distributed") is None:
            kwargs["distributed"] = current_strategy()
        return original_create_trainer(self, config, model, **kwargs)

    LocalTrainingMixin.initialize = staticmethod(initialize)
    LocalTrainingMixin.is_coordinator = staticmethod(is_coordinator)
    LocalBackend.create_trainer = create_trainer


@_once
def refuse_incompatible_strategy() -> None:
    """Stop ZeRO-3/FSDP + 4-bit at ``LudwigModel.train`` (before preprocessing) with one line."""
    from ludwig.api import LudwigModel

    original = LudwigModel.train

    @functools.wraps(original)
    def train(self, *args, **kwargs):
        name = strategy_name()
        if name is not None:
            check_strategy_compatible(name, self.config_obj.to_dict())
        return original(self, *args, **kwargs)

    LudwigModel.train = train


def rank_device_map(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Under a launcher on CUDA, Ludwig's ``device_map="auto"`` (which would spread every rank's copy of a 4-bit
    model over all GPUs) becomes this rank's own GPU; otherwise ``kwargs`` unchanged. Returns a new dict."""
    import torch

    if kwargs.get("device_map") == "auto" and strategy_name() is not None and torch.cuda.is_available():
        return {**kwargs, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
    return dict(kwargs)


@_once
def place_quantized_model_on_local_rank() -> None:
    model_loading.add_load_rule(rank_device_map)


def batches_per_epoch(rows: int, batch_size: int, ignore_last: bool) -> int:
    """How many batches Ludwig's ``RandomAccessBatcher`` really yields in one epoch of ``rows`` rows.

    Its ``steps_per_epoch`` is ``ceil(rows / batch_size)``, but with ``ignore_last`` (always on for training) a last
    batch of one row is dropped ("Last batch in epoch only has 1 sample and will be dropped"), so an epoch of
    ``k * batch_size + 1`` rows has one batch fewer than Ludwig plans for.
    """
    if rows <= 0 or batch_size <= 0:
        return 0
    planned = -(-rows // batch_size)
    dropped = ignore_last and batch_size > 1 and rows % batch_size == 1
    return planned - int(dropped)


def batches_done_in_epoch(steps: int, epoch: int, per_epoch: int) -> int:
    """How many batches of epoch ``epoch`` a run at global step ``steps`` has already trained on.

    ``steps`` counts every optimizer step since the start; each finished epoch holds ``per_epoch`` of them (the
    batches the batcher really yields, see :func:`batches_per_epoch`). A count outside ``[0, per_epoch)`` means the
    checkpoint does not describe this data (other rows or batch size): nothing is skipped then, never a whole epoch.
    """
    done = steps - epoch * per_epoch
    return done if 0 <= done < per_epoch else 0


def fast_forward_scheduler(scheduler: Any, steps: int) -> int:
    """Step a freshly built LR scheduler up to ``steps``; return how many steps that took.

    Ludwig restores the scheduler's state on resume, then builds a new one before the loop (warm-up and decay would
    start again from step 0). Stepping the new one forward gives the learning rate of an uninterrupted run.
    """
    import warnings

    train_scheduler = scheduler._train_scheduler
    missing = max(0, steps - int(train_scheduler.last_epoch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(missing):
            train_scheduler.step()
    return missing


@_once
def resume_mid_epoch_where_it_stopped() -> None:
    """On resume, and only then: the learning rate of step N, not of step 0, and skip the batches the checkpoint
    already holds.

    A run counts as resumed when Ludwig's progress tracker comes back from a checkpoint (a fresh tracker starts at
    step 0). The skip happens once, in the first epoch loop after resuming; later epochs, and every epoch of a
    fresh run, are Ludwig's own. (Acting on every epoch loop made a fresh run of ``k * batch + 1`` rows skip a whole
    epoch forever: Ludwig's ``steps_per_epoch`` counts the dropped one-row batch.)
    """
    from ludwig.trainers.trainer import Trainer

    original_tracker, original_loop = Trainer._create_or_resume_progress_tracker, Trainer._train_loop

    @functools.wraps(original_tracker)
    def _create_or_resume_progress_tracker(self, *args, **kwargs):
        progress_tracker = original_tracker(self, *args, **kwargs)
        self._ludwig_mt_resumed_at = progress_tracker.steps if progress_tracker.steps > 0 else None
        return progress_tracker

    @functools.wraps(original_loop)
    def _train_loop(self, batcher, progress_tracker, *args, **kwargs):
        resumed_at, self._ludwig_mt_resumed_at = getattr(self, "_ludwig_mt_resumed_at", None), None
        if resumed_at is not None:
            if fast_forward_scheduler(self.scheduler, progress_tracker.steps):
                logger.info("ludwig_mt: resumed at step %d, learning-rate schedule moved on to it",
                            progress_tracker.steps)
            per_epoch = batches_per_epoch(batcher.total_size, batcher.batch_size, batcher.ignore_last)
            done = batches_done_in_epoch(progress_tracker.steps, progress_tracker.epoch, per_epoch)
            if done and getattr(batcher, "step", None) == 0:
                logger.info("ludwig_mt: resuming mid-epoch, skipping %d batch(es) already trained on", done)
                for _ in range(done):
                    batcher.next_batch()
        return original_loop(self, batcher, progress_tracker, *args, **kwargs)

    Trainer._create_or_resume_progress_tracker = _create_or_resume_progress_tracker
    Trainer._train_loop = _train_loop


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


def trainable_parameters(model: Any) -> list[Any]:
    """The parameters the optimizer updates (the LoRA weights): what checkpoints and the saved adapter hold."""
    return [p for p in model.parameters() if p.requires_grad]


def is_sharded(parameter: Any) -> bool:
    """True for a parameter whose data is now only this rank's shard: ZeRO-3 (an empty tensor on ``.data``) or
    FSDP2 (a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    if isinstance(parameter, DTensor):
        return True
    if not hasattr(parameter, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(parameter, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


def has_sharded_weights(model: Any) -> bool:
    """True when ``model``'s trainable weights are sharded by ZeRO-3 or FSDP2 (gathered or not right now)."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in trainable_parameters(model))


def trainable_slots(model: Any) -> list[tuple[Any, str, Any]]:
    """``(module, name, parameter)`` for every trainable parameter, each once: where a whole tensor can stand in."""
    seen: set[int] = set()
    slots = []
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                slots.append((module, name, parameter))
    return slots


@contextlib.contextmanager
def standing_in(slots: list[tuple[Any, str, Any]]):
    """Inside the block each ``(module, name, tensor)``'s tensor is the module's trainable parameter ``name``."""
    import torch

    originals = [module._parameters[name] for module, name, _ in slots]
    try:
        for module, name, tensor in slots:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=True)
        yield
    finally:
        for (module, name, _), original in zip(slots, originals):
            module._parameters[name] = original


def reshard_all(model: Any) -> None:
    """Every FSDP2 unit of ``model`` back to its shards, on every rank alike (a local operation).

    FSDP2 leaves the root unit's weights gathered after a forward without backward (evaluation), and
    ``state_dict()`` reshards them (FSDP's pre-hook). Ludwig calls ``state_dict()`` on rank 0 alone, so rank 0 would
    gather them again in the next forward and rank 1 would not: mismatched collectives. Called on all ranks before
    every gathered read or load.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def whole_trainable_weights(model: Any) -> contextlib.AbstractContextManager:
    """Whole trainable tensors inside the block, for reading (changes are discarded); a no-op when not sharded.

    A collective: under ZeRO-3 and FSDP every rank must enter it. ZeRO-3 gathers in place
    (``GatheredParameters``); FSDP2's ``DTensor``s get stand-ins with ``full_tensor()`` (FSDP's own state-dict
    pre-hook leaves them alone: its parameters are already sharded between steps).
    """
    import torch
    from torch.distributed.tensor import DTensor

    trainable = trainable_parameters(model)
    zero3 = [p for p in trainable if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    slots = [(m, n, p) for m, n, p in trainable_slots(model) if isinstance(p, DTensor)]
    if not slots:
        return contextlib.nullcontext()
    reshard_all(model)
    with torch.no_grad():
        return standing_in([(m, n, p.full_tensor()) for m, n, p in slots])


@contextlib.contextmanager
def loading_whole_weights(model: Any):
    """Inside the block ``model.load_state_dict`` takes whole tensors and rank 0's values end up on every rank's
    shards. A collective: every rank calls it and loads the same keys. ZeRO-3 gathers and re-partitions from rank 0
    (``GatheredParameters(modifier_rank=0)``); FSDP2 turns each whole tensor into a ``DTensor`` with rank 0's data
    (``distribute_tensor``) and loads that into the sharded parameter in place."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    zero3 = [p for p in trainable_parameters(model) if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):
            yield
        return
    names = dict(model.named_parameters())
    if not any(isinstance(p, DTensor) for p in names.values()):
        yield
        return
    reshard_all(model)
    previous = model.__dict__.get("load_state_dict")

    def load_state_dict(state_dict, strict: bool = True, **kw):
        converted = {}
        for key, value in state_dict.items():
            target = names.get(key)
            if isinstance(target, DTensor) and not isinstance(value, DTensor):
                value = distribute_tensor(value.to(device=target.device, dtype=target.dtype).contiguous(),
                                          target.device_mesh, target.placements, src_data_rank=0)
            converted[key] = value
        return type(model).load_state_dict(model, converted, strict=strict, **kw)

    model.load_state_dict = load_state_dict
    try:
        yield
    finally:
        del model.load_state_dict
        if previous is not None:
            model.load_state_dict = previous


def load_weights_on_all_ranks(model: Any, state_dict: dict[str, Any]) -> None:
    """Load (trainable) weights into a ZeRO-3 or FSDP model; every rank calls it with the same ``state_dict``."""
    with loading_whole_weights(model):
        _, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise RuntimeError(f"Unexpected keys found in state dict: {unexpected}")


def whole_weights(model: Any) -> contextlib.AbstractContextManager:
    """Inside the block ``model``'s sharded trainable parameters show the whole tensors gathered after training.

    Ludwig saves the final model on rank 0 alone (``LLM.save`` -> peft ``save_pretrained``, which reads the module's
    own state_dict), where no collective gather is possible; :func:`gather_weights_after_sharded_training` stored
    them for this on every rank beforehand. Outside the block the shards are back in place.
    """
    return standing_in(getattr(model, "_ludwig_mt_whole_weights", None) or [])


@_once
def gather_weights_after_sharded_training() -> None:
    """ZeRO-3/FSDP: the best-checkpoint reload at the end of training on all ranks, and whole weights for the save.

    Ludwig reloads the best checkpoint on rank 0 alone (``self.model.load_state_dict``), which cannot fill sharded
    parameters. During ``Trainer.train`` a load into sharded parameters is therefore kept aside, then done by every
    rank together (rank 0's dict broadcast). Loads through :func:`loading_whole_weights` (the resume path,
    :class:`ShardedCheckpoint`) go through unchanged. Afterwards every rank gathers the trainable weights once more
    so rank 0's ``LLM.save`` can write them (:func:`whole_weights`).
    """
    from ludwig.models.llm import LLM
    from ludwig.trainers.trainer import Trainer

    original_train, original_save = Trainer.train, LLM.save

    @functools.wraps(original_train)
    def train(self, *args, **kwargs):
        model = self.model
        if not has_sharded_weights(model):
            return original_train(self, *args, **kwargs)
        kept_aside: list[dict[str, Any]] = []
        load_now = model.load_state_dict

        def load_state_dict(state_dict, strict: bool = True, **kw):
            names = dict(model.named_parameters())
            if any(is_sharded(names[k]) for k in state_dict if k in names):
                import torch

                kept_aside[:] = [state_dict]
                return torch.nn.modules.module._IncompatibleKeys([], [])
            return load_now(state_dict, strict=strict, **kw)

        model.load_state_dict = load_state_dict  # instance attribute: this model, this call only
        try:
            result = original_train(self, *args, **kwargs)
        finally:
            del model.load_state_dict
        best = self.distributed.broadcast_object(kept_aside[0] if kept_aside else None)
        if best is not None:
            load_weights_on_all_ranks(model, best)
            logger.info("ludwig_mt: best checkpoint loaded on every rank (sharded weights)")
        with whole_trainable_weights(model):
            whole = [(m, n, p.detach().clone()) for m, n, p in trainable_slots(model)]
        object.__setattr__(model, "_ludwig_mt_whole_weights", whole)
        return result

    @functools.wraps(original_save)
    def save(self, save_path):
        with whole_weights(self):
            return original_save(self, save_path)

    Trainer.train, LLM.save = train, save


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
    """Apply the distributed patches; safe to call many times. Each patch is inert in a plain process."""
    resume_mid_epoch_where_it_stopped()
    if os.environ.get(ENV_CRASH_AFTER_CHECKPOINT):
        crash_drill_after_checkpoint()
    if os.environ.get(ENV_RANK_REPORT):
        write_rank_report()
    if not is_distributed_launch():
        return
    start_accelerate_strategy_under_launcher()
    refuse_incompatible_strategy()
    place_quantized_model_on_local_rank()
    if strategy_name() in SHARDED_WEIGHT_STRATEGIES:
        gather_weights_after_sharded_training()
