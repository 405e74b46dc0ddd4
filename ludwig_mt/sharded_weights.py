"""Whole tensors from weights that ZeRO-3 or FSDP2 shard across ranks: torch and DeepSpeed only, no Ludwig.

Ludwig reads and writes the trainable (LoRA) weights on rank 0 alone (checkpoints, the best-checkpoint reload, the
saved adapter); under ZeRO-3 and FSDP each rank holds only its shard of them. The helpers here gather them on every
rank together (a collective) and load whole tensors back into the shards; :mod:`ludwig_mt.patches.distributed` applies them
wherever Ludwig touches the weights, and the rank report (:mod:`ludwig_mt.patches.instrumentation`) reads them.
"""

from __future__ import annotations

import contextlib
from typing import Any


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
