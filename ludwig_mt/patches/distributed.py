"""Process-per-GPU data-parallel fine-tuning for Ludwig 0.17.10 through accelerate (GitHub issue #5).

Ludwig 0.17.10 removed its DeepSpeed/DDP/FSDP backends but kept ``AccelerateStrategy`` (never instantiated: the
local backend always starts a ``LocalStrategy``) and a trainer and batcher written against the strategy
interface. The patch bodies here wake that path up; the registry (:mod:`ludwig_mt.patches`) applies them only in a
process started by a distributed launcher (``WORLD_SIZE`` > 1, or ``LUDWIG_MT_STRATEGY`` set by
:mod:`ludwig_mt.launch`); in every other process nothing here is applied. Which strategy, and what it may be
combined with: :mod:`ludwig_mt.strategies`.

What each patch fixes (all small, applied from the outside through :func:`ludwig_mt.patches.core.rebind`):

* the local backend starts :class:`WorkflowAccelerateStrategy` instead of ``LocalStrategy``, answers
  ``is_coordinator()`` with the real rank (so only rank 0 writes the output directory) and hands the strategy
  to the trainer (without it the trainer builds its own ``LocalStrategy`` and every rank trains on all rows);
* ZeRO-3 and FSDP (PyTorch FSDP2, ``--strategy fsdp``) shard the weights themselves; Ludwig's rank-0-only reads
  and writes of them (checkpoints, best-checkpoint reload, final adapter) are gathered on every rank
  (:mod:`ludwig_mt.sharded_weights`, :class:`ShardedCheckpoint`);
* 4-bit models are loaded on the process's own GPU (``device_map={"": local_rank}``) instead of ``"auto"``,
  which would spread every rank's copy over all GPUs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_path
from ludwig_mt.patches.model_loading import add_load_rule
from ludwig_mt.patches.core import rebind
from ludwig_mt.sharded_weights import (
    has_sharded_weights,
    is_sharded,
    load_weights_on_all_ranks,
    loading_whole_weights,
    standing_in,
    trainable_slots,
    whole_trainable_weights,
)
from ludwig_mt.strategies import (
    SHARDED_WEIGHT_STRATEGIES,
    check_strategy_compatible,
    deepspeed_config,
    worker_deepspeed_settings,
    strategy_name,
)

logger = logging.getLogger(__name__)


#: the name :class:`WorkflowAccelerateStrategy` is registered under in Ludwig's strategy registry
LUDWIG_STRATEGY_KEY = "ludwig_mt_accelerate"


@functools.cache
def _strategy_class():
    """Build the subclass lazily: importing Ludwig's accelerate module pulls in torch and accelerate."""
    from ludwig.distributed.accelerate import AccelerateStrategy

    class WorkflowAccelerateStrategy(AccelerateStrategy):
        """``AccelerateStrategy`` plus what Ludwig's trainer needs from it under DeepSpeed and DDP."""

        def __init__(self, strategy: str) -> None:
            import torch
            from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

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
                kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=worker_deepspeed_settings(strategy))
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
                plugin.deepspeed_config.update(deepspeed_config(plugin.deepspeed_config, trainer_config, self.size()))
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


def start_accelerate_strategy_under_launcher() -> None:
    """Local backend: accelerate strategy, real coordinator answer, and the strategy handed to the trainer.

    :class:`WorkflowAccelerateStrategy` is registered in Ludwig's own strategy registry
    (``ludwig.distributed.STRATEGIES``, its extension point) and started through ``init_dist_strategy``, as Ludwig
    starts its own.
    """
    from ludwig import distributed as ludwig_distributed

    ludwig_distributed.STRATEGIES.setdefault(LUDWIG_STRATEGY_KEY, _strategy_class)

    def initialize() -> None:
        name = strategy_name()
        if name is None:
            ludwig_distributed.init_dist_strategy("local")
            return
        current = ludwig_distributed._current_strategy
        if getattr(current, "strategy", None) == name:
            return  # Ludwig initializes the backend more than once; accelerate allows one Accelerator per plugin
        ludwig_distributed.init_dist_strategy({"type": LUDWIG_STRATEGY_KEY, "strategy": name})

    def is_coordinator() -> bool:
        if strategy_name() is None or ludwig_distributed._current_strategy is None:
            return True
        return ludwig_distributed._current_strategy.is_coordinator()

    def handing_strategy(original_create_trainer):
        @functools.wraps(original_create_trainer)
        def create_trainer(self, config, model, **kwargs):
            if strategy_name() is not None and kwargs.get("distributed") is None:
                kwargs["distributed"] = current_strategy()
            return original_create_trainer(self, config, model, **kwargs)

        return create_trainer

    rebind("ludwig.backend.base:LocalTrainingMixin.initialize", lambda _ludwigs: initialize)
    rebind("ludwig.backend.base:LocalTrainingMixin.is_coordinator", lambda _ludwigs: is_coordinator)
    rebind("ludwig.backend.base:LocalBackend.create_trainer", handing_strategy)


def accept_declared_backend_section() -> None:
    """A task YAML declares its processes and strategy under ``backend.trainer`` (issue #18), in the form of Ludwig's
    earlier schema. Ludwig 0.17.10's schema takes any dict under ``backend``, but ``LocalBackend(**kwargs)`` then
    fails on ``trainer``: the section is the launcher's (:func:`ludwig_mt.launch.plan_launch`), so Ludwig's backend is
    built from the rest. A plain ``ludwig train`` checks the section before any work (a 4-bit YAML declaring ZeRO-3
    or FSDP is refused in one line) and, when the YAML declares more processes than this one, says how to launch
    them."""
    import sys

    from ludwig_mt.strategies import declared_backend, launch_hint

    def without_declared_processes(original):
        @functools.wraps(original)
        def create_backend(type, **kwargs):
            kwargs.pop("trainer", None)
            return original(type, **kwargs)

        return create_backend

    def checking_declared_backend(original):
        @functools.wraps(original)
        def train(self, *args, **kwargs):
            config = self.config_obj.to_dict()
            declared = declared_backend(config)
            if declared.strategy and strategy_name() is None:  # a launcher's workers were checked before start
                check_strategy_compatible(declared.strategy, config)
                import torch

                hint = launch_hint(config, sys.argv[1:], torch.cuda.device_count() if torch.cuda.is_available() else 0)
                if hint:
                    logger.warning("%s", hint)
            return original(self, *args, **kwargs)

        return train

    rebind("ludwig.backend:create_backend", without_declared_processes)
    rebind("ludwig.api:LudwigModel.train", checking_declared_backend)


def refuse_incompatible_strategy() -> None:
    """Stop ZeRO-3/FSDP + 4-bit at ``LudwigModel.train`` (before preprocessing) with one line: the check for runs
    started by a bare ``torchrun``; ``ludwig_mt.launch`` checks the same before it starts any process."""

    def checking(original):
        @functools.wraps(original)
        def train(self, *args, **kwargs):
            name = strategy_name()
            if name is not None:
                check_strategy_compatible(name, self.config_obj.to_dict())
            return original(self, *args, **kwargs)

        return train

    rebind("ludwig.api:LudwigModel.train", checking)


def rank_device_map(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Under a launcher on CUDA, Ludwig's ``device_map="auto"`` (which would spread every rank's copy of a 4-bit
    model over all GPUs) becomes this rank's own GPU; otherwise ``kwargs`` unchanged. Returns a new dict."""
    import torch

    if kwargs.get("device_map") == "auto" and strategy_name() is not None and torch.cuda.is_available():
        return {**kwargs, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
    return dict(kwargs)


def place_quantized_model_on_local_rank() -> None:
    """Ludwig's LLM loads get :func:`rank_device_map` (through the one stand-in loader)."""
    add_load_rule(rank_device_map)


def whole_weights(model: Any) -> contextlib.AbstractContextManager:
    """Inside the block ``model``'s sharded trainable parameters show the whole tensors gathered after training.

    Ludwig saves the final model on rank 0 alone (``LLM.save`` -> peft ``save_pretrained``, which reads the module's
    own state_dict), where no collective gather is possible; :func:`gather_weights_after_sharded_training` stored
    them for this on every rank beforehand. Outside the block the shards are back in place.
    """
    return standing_in(getattr(model, "_ludwig_mt_whole_weights", None) or [])


def gather_weights_after_sharded_training() -> None:
    """ZeRO-3/FSDP: the best-checkpoint reload at the end of training on all ranks, and whole weights for the save.

    Ludwig reloads the best checkpoint on rank 0 alone (``self.model.load_state_dict``), which cannot fill sharded
    parameters. During ``Trainer.train`` a load into sharded parameters is therefore kept aside, then done by every
    rank together (rank 0's dict broadcast). Loads through :func:`loading_whole_weights` (the resume path,
    :class:`ShardedCheckpoint`) go through unchanged. Afterwards every rank gathers the trainable weights once more
    so rank 0's ``LLM.save`` can write them (:func:`whole_weights`).
    """

    def gathering(original_train):
        @functools.wraps(original_train)
        def train(self, *args, **kwargs):
            return train_gathering_sharded_weights(original_train, self, *args, **kwargs)

        return train

    def saving_whole(original_save):
        @functools.wraps(original_save)
        def save(self, save_path):
            with whole_weights(self):
                return original_save(self, save_path)

        return save

    rebind("ludwig.trainers.trainer:Trainer.train", gathering)
    rebind("ludwig.models.llm:LLM.save", saving_whole)


def train_gathering_sharded_weights(original_train: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
    """``Trainer.train`` (``original_train``) with the best-checkpoint reload done on every rank and the whole
    trainable weights kept for the save; see :func:`gather_weights_after_sharded_training`."""
    model = trainer.model
    if not has_sharded_weights(model):
        return original_train(trainer, *args, **kwargs)
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
        result = original_train(trainer, *args, **kwargs)
    finally:
        del model.load_state_dict
    best = trainer.distributed.broadcast_object(kept_aside[0] if kept_aside else None)
    if best is not None:
        load_weights_on_all_ranks(model, best)
        logger.info("ludwig_mt: best checkpoint loaded on every rank (sharded weights)")
    with whole_trainable_weights(model):
        whole = [(m, n, p.detach().clone()) for m, n, p in trainable_slots(model)]
    object.__setattr__(model, "_ludwig_mt_whole_weights", whole)
    return result

