"""Padding-free training attention (the ``varlen_attention`` speed-up): a step's rows as one sequence, attended to
row by row.

Why: the packs of ``pack_training_rows`` are rectangular (``packs x width``), so a step pays for padding (the
last pack's empty tail: +5.2 % positions on samsum's rows, ``bench/NOTES-speed.md`` run 26) and for the boolean
block mask that keeps the rows of a pack apart (``packs x 1 x width x width``, kept by every layer for its backward).
And with a mask, transformers' SDPA cannot use grouped-query attention in the kernel: it copies the key and value
heads up to the query heads (``repeat_kv``), and the copies are what the backward keeps (SmolLM2: 3 query heads per
key head, 0.74 GiB of a bf16 LoRA step's 10.9). unsloth and TRL train such steps padding-free; so does this.

How, inside Ludwig's declarative path: the loaded model's attention is :data:`NAME`, registered with transformers'
public ``AttentionInterface`` (and its masks with ``AttentionMaskInterface``, as SDPA's). Called as usual (evaluation,
generation, left-padded batches) it *is* transformers' SDPA function. Called with ``cu_seq_lens_q`` (what
:func:`ludwig_mt.patches.speedups.target_only_loss` passes for a padding-free batch, the keyword transformers' own
flash-attention path uses) it attends within each row: on a CUDA GPU with PyTorch's flash-attention kernel for
variable lengths (``aten._flash_attention_forward`` with cumulative row offsets; the key/value heads are shared by
their query heads inside the kernel, nothing is copied), elsewhere row by row with SDPA (the reference the CPU tests
compare with). The batch then carries an empty 4-D mask (:func:`no_mask`): transformers builds no mask for it, and
any attention function other than this one fails on it instead of attending across rows.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: the attention implementation name the loaded models get (``model.config._attn_implementation``)
NAME = "ludwig_mt_varlen"


@functools.cache
def register() -> None:
    """Register :data:`NAME` with transformers (once per process): attention :func:`attention_forward`, masks as
    SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def no_mask(device: torch.device | str) -> torch.Tensor:
    """The ``attention_mask`` of a padding-free batch: 4-D, so transformers takes it as already prepared and builds
    none (a packed sequence's mask would be ``tokens x tokens``), and empty, so SDPA or eager attention given it by
    mistake fail at once rather than attend across rows."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def row_offsets(lengths: list[int]) -> torch.Tensor:
    """Cumulative row offsets ``[0, l0, l0 + l1, ...]`` (int32, as the flash kernel takes them)."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def supported(model) -> bool:
    """``model`` (a ``*ForCausalLM`` or its base) attends with :data:`NAME` and without a sliding window (the
    kernel call below attends to the whole row)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != NAME:
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or getattr(config, "use_sliding_window", True) is False


def _flash_takes(dtype: torch.dtype, head_size: int, device: torch.device) -> bool:
    """PyTorch's flash kernel: CUDA (Ampere or newer), bf16 or fp16, head size a multiple of 8 up to 256."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_size % 8 == 0
            and head_size <= 256 and torch.cuda.get_device_capability(device)[0] >= 8)


def flash_usable(query: torch.Tensor) -> bool:
    """PyTorch's flash kernel takes this query (:func:`_flash_takes`)."""
    return _flash_takes(query.dtype, query.shape[-1], query.device)


def flash_usable_for(model, device: torch.device) -> bool:
    """Steps of ``model`` (a ``*ForCausalLM`` or its base) on ``device`` would reach the flash kernel: its queries
    take the embeddings' dtype (bf16 when loaded so, quantized or not) and the config's head size. Where they would
    not, padding-free steps fall back to row-by-row SDPA, a launch per row and layer: no default should pick that."""
    config = model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return _flash_takes(model.get_input_embeddings().weight.dtype, int(head_size), torch.device(device))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: :func:`varlen_attention` when the call carries
    ``cu_seq_lens_q``, transformers' SDPA function otherwise."""
    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return varlen_attention(query, key, value, offsets, int(kwargs["max_length_q"]), dropout, scaling), None


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                     longest: int, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention within each row of a padding-free sequence: ``query`` ``[1, heads, tokens, head size]``,
    ``key``/``value`` ``[1, key heads, tokens, head size]`` (key heads dividing heads), rows at ``offsets``; returns
    ``[1, tokens, heads, head size]`` (the layout transformers' attention functions return)."""
    if flash_usable(query):
        # [tokens, heads, head size]: views of the projections' output (transformers transposed it to heads-first)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        offsets = offsets.to(device=query.device, dtype=torch.int32)
        out = torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, longest, longest, dropout, True,
                                                      False, scale=scaling)[0]
        return out.unsqueeze(0)
    return rowwise_attention(query, key, value, offsets, dropout, scaling)


def rowwise_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                      dropout: float, scaling: float | None) -> torch.Tensor:
    """:func:`varlen_attention` row by row with SDPA (causal, grouped-query): the reference, and the path where
    the flash kernel does not apply (the CPU)."""
    bounds = offsets.tolist()
    rows = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1]) for start, end in zip(bounds, bounds[1:])]
    return torch.cat(rows, dim=2).transpose(1, 2)


def use_varlen_attention(model) -> bool:
    """After-load hook of the ``varlen_attention`` speed-up: a model loaded with transformers' SDPA attends with
    :data:`NAME` instead (the same function outside padding-free batches). Returns whether it changed."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    logger.info("ludwig_mt speed-ups: %s attends with %s (padding-free training batches)", type(model).__name__, NAME)
    return True
