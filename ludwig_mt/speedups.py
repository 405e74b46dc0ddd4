"""Speed-ups for LLM fine-tuning inside the declarative workflow (issue #6: fast training on GPU).

Each speed-up is one small, idempotent patch of Ludwig 0.17.10 applied from the outside by :func:`apply_all`
(called by ``ludwig_mt.ludwig_fixes.apply_all``), on by default, and measured by ``bench/train_speed.py``
(predictions and outcomes: ``bench/NOTES-speed.md``). Switches:

* ``LUDWIG_MT_SPEEDUPS=0`` turns every speed-up off (raw Ludwig speed, for the benchmark's "raw" column);
* ``LUDWIG_MT_SPEEDUPS_OFF=name,name`` turns single ones off (the names are the keys of :data:`SPEEDUPS`).

The switches are read when a model is loaded / prepared, not when the patch is installed, so one process can
compare on and off (the tests do).

What Ludwig does without them, and why each change is safe:

``bf16_weights``
    Without quantization Ludwig loads the base model in float32 (``utils/llm_utils.py``), doubling weight memory
    and running every frozen matmul in fp32. On a CUDA GPU with bf16 support we load in bfloat16, which is what
    the checkpoints are published in; LoRA weights stay fp32 (peft upcasts adapters), so the optimizer state
    is unchanged. CPU runs keep float32 (bf16 matmuls are slow on most CPUs and change the tiny-model tests).
``sdpa_attention``
    With bitsandbytes Ludwig forces ``attn_implementation="eager"`` (materialises the L x L score matrix in the
    weights' dtype). We drop that argument so transformers picks its default, PyTorch's
    ``scaled_dot_product_attention`` (the same softmax attention with fused flash / memory-efficient kernels) for
    every architecture that supports it, eager for the rest (Bloom). Applied on CPU too (the CPU test compares
    losses with eager).
``lean_kbit_prep``
    For 4-bit models Ludwig calls peft's ``prepare_model_for_kbit_training``, which casts every non-4-bit
    parameter to float32: the 128k-262k-row embedding and the (tied) LM head included, so the largest single
    matmul of a small model (hidden x vocab, every token) runs in fp32 and its weights take 2x the memory. We
    keep the frozen bf16 weights as loaded and only do the rest of the recipe: freeze the base, and make the
    embedding outputs require grad when gradient checkpointing needs it. LayerNorm/RMSNorm already compute
    in fp32 internally in transformers' Llama/Bloom/Qwen implementations.
``sampled_train_metrics``
    After every optimizer step Ludwig updates its training-set metrics from the batch (its docstring: "noisy but
    fast approximation"): for an LLM that recomputes the loss and token metrics over the full
    ``tokens x vocabulary`` logits (128k-262k columns), in float32. We update them on one step in
    :data:`TRAIN_METRICS_EVERY`: still a sample of the same batches, so the reported training metrics keep their
    meaning; the training loss itself is untouched.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

# Not circular: ludwig_fixes imports this module only inside its apply_all(), never at import time.
from ludwig_mt.ludwig_fixes import _once

logger = logging.getLogger(__name__)

SPEEDUPS = ("bf16_weights", "sdpa_attention", "lean_kbit_prep", "sampled_train_metrics")

#: with ``sampled_train_metrics``, training-set metrics are updated on one optimizer step in this many
TRAIN_METRICS_EVERY = 8

def enabled(name: str) -> bool:
    """Whether speed-up ``name`` is on now (read at use time, so tests and benchmarks can flip it per run)."""
    if name not in SPEEDUPS:
        raise KeyError(f"unknown speed-up {name!r}; known: {', '.join(SPEEDUPS)}")
    if os.environ.get("LUDWIG_MT_SPEEDUPS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    off = {s.strip() for s in os.environ.get("LUDWIG_MT_SPEEDUPS_OFF", "").split(",") if s.strip()}
    return name not in off


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def adjust_load_kwargs(kwargs: dict[str, Any], *, cuda_bf16: bool) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments Ludwig built, changed by the enabled load-time speed-ups.

    Pure (returns a new dict) so the rule is unit-testable without loading a model.
    """
    import torch

    out = dict(kwargs)
    if enabled("bf16_weights") and cuda_bf16 and "quantization_config" not in out:
        if out.get("dtype", out.get("torch_dtype")) in (None, torch.float32):
            out.pop("torch_dtype", None)
            out["dtype"] = torch.bfloat16
    if enabled("sdpa_attention") and out.get("attn_implementation") == "eager":
        # transformers' own default: SDPA for architectures that support it (Llama, Qwen2...), eager otherwise
        # (Bloom). Asking for "sdpa" explicitly would fail on the latter.
        del out["attn_implementation"]
    return out


class _AutoModelShim:
    """Stands in for ``AutoModelForCausalLM`` inside ``ludwig.utils.llm_utils`` only.

    ``from_pretrained`` applies :func:`adjust_load_kwargs`; every other attribute is the real class's.
    """

    def __init__(self, real: type) -> None:
        self._real = real

    def from_pretrained(self, *args: Any, **kwargs: Any):
        new = adjust_load_kwargs(kwargs, cuda_bf16=_cuda_bf16())
        if new != kwargs:
            changed = {k: new.get(k) for k in set(new) | set(kwargs) if new.get(k) != kwargs.get(k)}
            logger.info("ludwig_mt speed-ups: from_pretrained %s", changed)
        return self._real.from_pretrained(*args, **new)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@_once
def patch_model_loading() -> None:
    """Route Ludwig's LLM loads through :class:`_AutoModelShim` (``bf16_weights``, ``sdpa_attention``)."""
    from ludwig.utils import llm_utils

    if not isinstance(llm_utils.AutoModelForCausalLM, _AutoModelShim):
        llm_utils.AutoModelForCausalLM = _AutoModelShim(llm_utils.AutoModelForCausalLM)


def lean_prepare_for_kbit_training(model):
    """peft's k-bit recipe without the fp32 upcast: freeze the base model, keep the loaded dtypes.

    ``enable_input_require_grads`` is what lets reentrant gradient checkpointing reach the LoRA weights; Ludwig
    calls it itself when ``enable_gradient_checkpointing`` is set, calling it here as well is harmless.
    """
    for param in model.parameters():
        param.requires_grad = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


@_once
def patch_kbit_preparation() -> None:
    """Make ``LLM.prepare_for_quantized_training`` use :func:`lean_prepare_for_kbit_training` (``lean_kbit_prep``)."""
    from ludwig.models.llm import LLM

    original = LLM.prepare_for_quantized_training

    @functools.wraps(original)
    def prepare_for_quantized_training(self):
        if not enabled("lean_kbit_prep"):
            return original(self)
        self.model = lean_prepare_for_kbit_training(self.model)

    LLM.prepare_for_quantized_training = prepare_for_quantized_training


@_once
def patch_training_metrics() -> None:
    """Make ``Trainer._update_training_metrics`` run on one step in TRAIN_METRICS_EVERY (``sampled_train_metrics``)."""
    from ludwig.trainers.trainer import Trainer

    original = Trainer._update_training_metrics

    @functools.wraps(original)
    def _update_training_metrics(self, model_outputs, targets):
        count = getattr(self, "_ludwig_mt_metric_steps", 0)
        self._ludwig_mt_metric_steps = count + 1
        if not enabled("sampled_train_metrics") or count % TRAIN_METRICS_EVERY == 0:
            original(self, model_outputs, targets)

    Trainer._update_training_metrics = _update_training_metrics


def apply_all() -> None:
    """Install every speed-up patch; safe to call many times. The env switches are honoured at use time."""
    patch_model_loading()
    patch_kbit_preparation()
    patch_training_metrics()
