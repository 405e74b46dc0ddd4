"""Speed-ups for LLM fine-tuning inside the declarative workflow (issue #6: fast training on GPU).

Each speed-up is one small patch body of Ludwig 0.17.10, applied from the outside by the registry
(:mod:`ludwig_mt.patches`, where each is a row named like the speed-up), only through
:func:`ludwig_mt.patches.core.rebind`; on by default, and measured by ``bench/train_speed.py`` (predictions and
outcomes: ``bench/NOTES-speed.md``). Switches:

* ``LUDWIG_MT_SPEEDUPS=0`` turns every speed-up off (raw Ludwig speed, for the benchmark's "raw" column);
* ``LUDWIG_MT_SPEEDUPS_OFF=name,name`` turns single ones off (the names are :data:`SPEEDUPS`, the registry's);

The switches are read when a model is loaded / prepared, not when the patch is installed, so one process can
compare on and off (the tests do). (``LUDWIG_MT_PATCHES_OFF=name`` instead leaves a patch out when patches are
applied; every patch here works without the others.)

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
``target_only_logits``
    Ludwig's LLM forward computes the logits of every position (``tokens x vocabulary``), then per token an fp32
    copy, a softmax (``probabilities``) and an argmax, and the loss over all of it, although the loss only counts
    the response tokens (the prompt's targets are -100). On every training step we run the model's backbone,
    apply the LM head only to the positions that predict a response token, and take the same mean next-token
    cross-entropy in fp32: the same loss value and gradients with a fraction of the LM-head matmul and none of the
    full-vocabulary fp32 tensors (the head is 20-40% of a 1B model's FLOPs at a 128k-256k vocabulary). On the
    steps that update training metrics (``sampled_train_metrics``), Ludwig's full outputs for the metrics come
    from an extra no-grad forward of the batch's first :data:`TRAIN_METRICS_ROWS` rows (fewer when their logits
    would pass :data:`TRAIN_METRICS_LOGITS`), so no step materialises full-batch logits. Packing (``pack_training_rows``) happens on these steps.

``bf16_autocast``
    peft keeps the LoRA weights in float32 and casts every adapted layer's input to float32 before the adapter
    (``x.to(lora_A.weight.dtype)``), so next to each bf16 (or 4-bit) matmul of the frozen base run a full-size
    fp32 copy of the activations, an fp32 dropout and two fp32 GEMMs: on the H100 profile of a packed QLoRA step
    those were about half of the CUDA time. On CUDA we run each training step's forward under
    ``torch.autocast(bfloat16)`` (what ``transformers.Trainer`` does with ``bf16=True``) and switch peft's input
    cast off for the step (``cast_input_dtype_enabled``, the flag its ``disable_input_dtype_casting`` sets), so the adapter math runs in bf16 while
    the LoRA weights, their gradients and the optimizer state stay fp32, and the loss is still taken in fp32
    (autocast runs cross-entropy in fp32). No gradient scaler is needed for bf16. Reentrant gradient
    checkpointing re-enters the same autocast state when it recomputes. Off when Ludwig's own
    ``trainer.use_mixed_precision`` (fp16 AMP) is set, under a DeepSpeed engine (which turns an outer autocast off
    inside its forward), and on CPU (:data:`AUTOCAST_DEVICES`).
``liger_kernels``
    When ``liger-kernel`` is installed (the optional extra ``gpu``: ``pip install -e .[gpu]``) and the model runs on
    CUDA: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE patched into the loaded model instance (fewer, fused
    memory-bound kernels; same maths), and on lean steps Liger's fused linear cross-entropy, which computes the
    LM head and the loss chunk by chunk without materialising the ``tokens x vocabulary`` logits. Off without
    liger-kernel or CUDA (nothing changes on CPU).

``lean_lora_forward``
    peft runs each adapted layer (``Linear``, bitsandbytes' ``Linear4bit``) as five modules and autograd nodes (the
    base layer, dropout, ``lora_A``, ``lora_B``, scale-and-add after a defensive copy of the 4-bit output), and keeps
    a dropped copy of the input per adapter for the backward: Python that the CPU-bound step pays for (224 adapted
    layers per QLoRA step of the 1B shape; ``bench/NOTES-speed.md``, "Against the peers") and activations. In
    training, for a layer :func:`one_node_adapter` accepts (one plain LoRA adapter, nothing hooked, a plain or NF4
    base layer without bias, one compute dtype), the layer runs as one autograd node
    (:class:`ludwig_mt.patches.lora_autograd.LoRALinear`): the same sum, the same dropout draw in the same order,
    the input saved once with boolean masks, the fp32 LoRA weights cast to bf16 once per optimizer update.
    Everything else (evaluation, prediction, merged or multi-adapter layers) keeps peft's forward.
``fused_lora_mlp``
    A Llama-style MLP (``down(silu(gate(x)) * up(x))``) whose three projections :func:`one_node_adapter` accepts
    runs as one autograd node (:class:`ludwig_mt.patches.lora_autograd.LoRAMLP`, with Liger's SwiGLU kernels on
    CUDA) that recomputes ``silu(gate) * up`` in the backward instead of keeping it. Patched into the loaded model's
    MLP instances after Liger's (whose forward, or transformers', it falls back to), decided at every call.
``one_sync_optimizer_step``
    bitsandbytes 0.50's optimizers (the YAMLs' ``paged_adam``, every 8-bit one) call ``torch.cuda.synchronize()``
    after each parameter's update: 224 waits per QLoRA step of the 1B shape, during which the GPU runs one small
    kernel at a time and idles (22 ms of a 300 ms step, H200 profile; also bitsandbytes' open PR #2050). The same
    updates in the same order on the same stream, with one synchronisation at the end of the step (so everything
    after ``step()`` still sees updated weights and, paged, resident state). Kept as bitsandbytes wrote it when the
    work runs on a side stream (its kernels go to the default stream).
``offload_checkpoints``
    With gradient checkpointing, each layer's saved input moves to pinned host memory on a side stream and comes
    back, prefetched, in the backward (:mod:`ludwig_mt.patches.offload`; unsloth's checkpointing does the same):
    0.77 GiB less per QLoRA step of the 1B shape at 64 rows (16 layers x 16,320 tokens x 2,048 x bf16), at 0.8-1.4 %
    of its speed in four H200 runs (one early run lost 28 %, before the copies had their own stream). It holds
    that much pinned host memory (an 8B model at the same rows: about 4 GiB); ``LUDWIG_MT_SPEEDUPS_OFF=
    offload_checkpoints`` keeps the inputs on the GPU.

``pack_training_rows``
    Ludwig merges each batch's rows into one left-padded tensor as wide as its longest row: on real data, where a
    64-row batch of samsum dialogues spans 80 to 700 tokens, most of each step's tokens can be padding that the
    GPU computes and the benchmark's peers (TRL, unsloth: ``padding_free`` packing) do not. On lean steps we pack
    whole rows (prompt + response + EOS) first-fit-decreasing into packs as wide as the batch's longest row rounded
    up to a power of two (:func:`pack_plan`), restart ``position_ids`` at 0 for each row (the tail padding continues
    the pack's last row: a pack of one row stays one sequence with plain causal attention, +8-12 % on equal rows, run
    21) and pass no attention
    mask, so transformers builds the block-diagonal causal mask itself (its packed-sequence support): rows never
    attend to each other, and the loss is the same mean over the same response tokens (test: the packed loss equals
    each row's own loss). Why that width (H200, samsum's dialogues, SmolLM2's shape, QLoRA, run 17): SDPA with a
    mask runs cuDNN's attention, which builds a graph for every new shape, about 200 ms of CPU per step when every
    batch brings a new width (packs as wide as the longest row: 17.4k tokens/s; powers of two: 22.3k; a fixed
    2,048: 24.8k). But a mask over a wide pack computes attention over all of it: on equal rows of 255 tokens
    (the 1B shape) packs of 2,048 cost 23-25 % against Ludwig's own batch, which a power of two (256) keeps; and
    where rounding up would pad much more (rows just over a power of two), the longest row's width is kept. samsum's
    dialogues (47-680 tokens, mean 206) fill about 5 rows a pack of 1,024 (96 % real tokens; every batch of run 17). Without left
    padding no query row is fully masked either: unpacked, SmolLM2 on samsum stopped at NaN on the GPU (twice),
    packed it trained (``bench/NOTES-speed.md``). Models without ``position_ids`` (ALiBi models such as Bloom) stay
    unpacked (logged once). Ludwig 0.17.10's own
    ``trainer.packing`` key exists only on its zero-shot trainer (the finetune trainer drops it unread); where a
    trainer does declare it, its value decides. Ludwig's own packed forward would crash on this stack (3-D mask;
    the correctness fix in :mod:`ludwig_mt.patches.fixes` runs every step off the lean path unpacked).
``varlen_attention``
    On a CUDA GPU whose flash kernel takes the model's steps, a step's rows need no packs at all: they go as one
    padding-free sequence attended row by row by PyTorch's variable-length flash kernel (:func:`padding_free_step`,
    :mod:`ludwig_mt.patches.varlen_attention`): no padding, no block mask, no copies of grouped key/value heads.
    Same loss as the packs over 50 steps of real rows (0.0 % per 1,000-row window), bf16 LoRA 8.78 GiB instead of
    10.94 and 5 % faster, QLoRA 27 % faster (run 28). ``LUDWIG_MT_PACK_LENGTH=pow2`` keeps the packs.
``realign_without_copies``
    Ludwig's training metrics and evaluation loss align an LLM's targets and predictions after deep-copying the
    float32 logits and probabilities over the vocabulary: the same padded tensors without the copies
    (:func:`realigned_without_copies`; 0.27 GiB of the first QLoRA step's peak on SmolLM2, run 29).
``response_only_eval_logits``
    The evaluations inside ``ludwig train`` put every position of every row through the LM head over the whole
    vocabulary and keep float32 logits and probabilities of all of them (3.25 GiB for 8 SmolLM2 rows, 3.9x a
    training step, run 18). The metrics that read them skip the prompt's positions, so they are computed over the
    scored window only; the predictions keep every position (:mod:`ludwig_mt.patches.lean_evaluation`; every metric
    equal to Ludwig's, tests).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches.model_loading import add_load_rule
from ludwig_mt.patches import lean_evaluation, varlen_attention
from ludwig_mt.patches.core import rebind
from ludwig_mt.patches.fixes import base_causal_lm, left_pad_rows, merged_rows, pad_token_id
from ludwig_mt.patches.env import env_names

logger = logging.getLogger(__name__)

SPEEDUPS = ("bf16_weights", "sdpa_attention", "lean_kbit_prep", "sampled_train_metrics", "target_only_logits",
            "bf16_autocast", "liger_kernels", "lean_lora_forward", "fused_lora_mlp", "one_sync_optimizer_step",
            "offload_checkpoints", "pack_training_rows", "realign_without_copies", "response_only_eval_logits",
            "varlen_attention")

#: with ``sampled_train_metrics``, training-set metrics are updated on one optimizer step in this many
TRAIN_METRICS_EVERY = 8
#: with ``target_only_logits``, at most this many rows of that step feed the training metrics (full outputs) ...
TRAIN_METRICS_ROWS = 4
#: ... and no more than fit this many ``position x vocabulary`` logits (128 MiB per fp32 copy; Ludwig's metrics
#: hold several): on the 1B shape with a 128k vocabulary, 4 rows of 255 tokens made the metric steps the run's
#: peak (5.32 GiB against 4.53 GiB on the other steps, H200, ``bench/NOTES-speed.md``); there it is 1 row
TRAIN_METRICS_LOGITS = 2**25
#: device types on which ``bf16_autocast`` applies (CPU bf16 matmuls are slow; the CPU test adds "cpu")
AUTOCAST_DEVICES: tuple[str, ...] = ("cuda",)


def enabled(name: str) -> bool:
    """Whether speed-up ``name`` is on now (read at use time, so tests and benchmarks can flip it per run; the
    LoRA layers ask at every call, hence the parsing is cached per value of the two variables)."""
    environ = os.environ
    return _enabled(name, environ.get("LUDWIG_MT_SPEEDUPS", "1"), environ.get("LUDWIG_MT_SPEEDUPS_OFF", ""))


@functools.lru_cache(maxsize=256)
def _enabled(name: str, all_on: str, off: str) -> bool:
    if name not in SPEEDUPS:
        raise KeyError(f"unknown speed-up {name!r}; known: {', '.join(SPEEDUPS)}")
    if all_on.strip().lower() in ("0", "false", "off", "no"):
        return False
    return name not in env_names("LUDWIG_MT_SPEEDUPS_OFF", {"LUDWIG_MT_SPEEDUPS_OFF": off})


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def bf16_load_kwargs(kwargs: dict[str, Any], *, cuda_bf16: bool) -> dict[str, Any]:
    """``bf16_weights``: the ``from_pretrained`` keyword arguments with bfloat16 weights instead of float32, on a
    CUDA GPU with bf16 and without quantization. Pure (returns a new dict)."""
    import torch

    out = dict(kwargs)
    if enabled("bf16_weights") and cuda_bf16 and "quantization_config" not in out:
        if out.get("dtype", out.get("torch_dtype")) in (None, torch.float32):
            out.pop("torch_dtype", None)
            out["dtype"] = torch.bfloat16
    return out


def sdpa_load_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``sdpa_attention``: the keyword arguments without Ludwig's forced eager attention. Pure (a new dict)."""
    out = dict(kwargs)
    if enabled("sdpa_attention") and out.get("attn_implementation") == "eager":
        # transformers' own default: SDPA for architectures that support it (Llama, Qwen2...), eager otherwise
        # (Bloom). Asking for "sdpa" explicitly would fail on the latter.
        del out["attn_implementation"]
    return out


def adjust_load_kwargs(kwargs: dict[str, Any], *, cuda_bf16: bool) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments Ludwig built, changed by the enabled load-time speed-ups, in the
    order the loader applies them. Pure (returns a new dict) so the rules are unit-testable without a model."""
    return sdpa_load_kwargs(bf16_load_kwargs(kwargs, cuda_bf16=cuda_bf16))


def bf16_load_rule(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`bf16_load_kwargs` for this machine: the load rule of ``bf16_weights``."""
    return bf16_load_kwargs(kwargs, cuda_bf16=_cuda_bf16())


def liger_usable() -> bool:
    """``liger_kernels`` is on, liger-kernel is installed and CUDA is visible (its kernels are Triton, GPU only)."""
    import importlib.util

    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    return enabled("liger_kernels") and torch.cuda.is_available() and installed


def apply_liger_kernels(model) -> bool:
    """Patch Liger's RMSNorm / SwiGLU / RoPE kernels into a loaded ``*ForCausalLM`` instance (its model type
    permitting); the loss stays ours (see :func:`target_only_loss`). Returns whether anything was applied."""
    if not liger_usable():
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    logger.info("ludwig_mt speed-ups: Liger kernels (RMSNorm, SwiGLU, RoPE) applied to %s", type(model).__name__)
    return True


def patch_bf16_weights() -> None:
    """Ludwig's LLM loads get ``bf16_weights`` (through the one stand-in loader)."""
    add_load_rule(bf16_load_rule)


def patch_sdpa_attention() -> None:
    """Ludwig's LLM loads get ``sdpa_attention`` (through the one stand-in loader)."""
    add_load_rule(sdpa_load_kwargs)


def patch_liger_kernels() -> None:
    """Ludwig's loaded LLMs get ``liger_kernels`` (an after-load hook of the one stand-in loader)."""
    add_load_rule(after_load=apply_liger_kernels)


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


def use_varlen_attention(model) -> bool:
    """The after-load hook of ``varlen_attention`` (:func:`varlen_attention.use_varlen_attention`), when on and
    padding-free batches may come: :data:`ENV_PACK_LENGTH` asks for them, or is unset on a machine with a CUDA GPU
    (where they are the default, :func:`padding_free_step`). Outside such batches the attention is SDPA's."""
    import torch

    setting = os.environ.get(ENV_PACK_LENGTH, "").strip()
    wanted = setting == VARLEN or (setting == "" and torch.cuda.is_available())
    return enabled("varlen_attention") and wanted and varlen_attention.use_varlen_attention(model)


def patch_varlen_attention() -> None:
    """Ludwig's loaded LLMs attend with :data:`varlen_attention.NAME` (an after-load hook of the one stand-in
    loader): SDPA, and padding-free training batches on a CUDA GPU or when :data:`ENV_PACK_LENGTH` asks for them
    (:func:`use_varlen_attention`)."""
    add_load_rule(after_load=use_varlen_attention)


def patch_lean_kbit_prep() -> None:
    """Make ``LLM.prepare_for_quantized_training`` use :func:`lean_prepare_for_kbit_training` (``lean_kbit_prep``)."""

    def lean(original):
        @functools.wraps(original)
        def prepare_for_quantized_training(self):
            if not enabled("lean_kbit_prep"):
                return original(self)
            self.model = lean_prepare_for_kbit_training(self.model)

        return prepare_for_quantized_training

    rebind("ludwig.models.llm:LLM.prepare_for_quantized_training", lean)


def training_metrics_due(trainer) -> bool:
    """Whether the trainer's next optimizer step updates training-set metrics (``sampled_train_metrics``)."""
    count = getattr(trainer, "_ludwig_mt_metric_steps", 0)
    return not enabled("sampled_train_metrics") or count % TRAIN_METRICS_EVERY == 0


def metric_sample_rows(width: int, vocabulary: int | None) -> int:
    """How many rows of ``width`` tokens the training metrics' extra forward takes: :data:`TRAIN_METRICS_ROWS`,
    fewer when their logits would pass :data:`TRAIN_METRICS_LOGITS`, never fewer than one."""
    if not vocabulary:
        return TRAIN_METRICS_ROWS
    return max(1, min(TRAIN_METRICS_ROWS, TRAIN_METRICS_LOGITS // max(1, width * vocabulary)))


def vocabulary_size(llm) -> int | None:
    """The output vocabulary of a Ludwig ``LLM``'s model (its config's ``vocab_size``), None when unknown."""
    config = getattr(getattr(llm, "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else None


def metric_sample_outputs(trainer) -> tuple[dict, dict]:
    """Ludwig's full outputs for the first rows (:func:`metric_sample_rows`) of the trainer's last lean batch, from a
    no-grad forward: the training metrics' input without full-batch ``tokens x vocabulary`` fp32 tensors (they
    would set the run's peak memory).

    The forward runs in training mode (dropout, as Ludwig's metrics see it) on a fork of the random generators:
    drawing from the training ones would move every later dropout mask, and since the steps it runs on are counted
    per process, a resumed run would draw at other steps than an uninterrupted one and end elsewhere."""
    import torch

    inputs, targets = trainer._ludwig_mt_last_batch
    width = sum(v.shape[-1] for v in inputs.values()) + sum(v.shape[-1] for v in targets.values())
    n = metric_sample_rows(width, vocabulary_size(trainer.model))
    rows = {k: v[:n] for k, v in inputs.items()}
    wanted = {k: v[:n] for k, v in targets.items()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), training_autocast(trainer), torch.random.fork_rng(devices=devices):
        outputs = trainer.dist_model((rows, dict(wanted)))
    return outputs, wanted


def patch_sampled_train_metrics() -> None:
    """Make ``Trainer._update_training_metrics`` run on one step in TRAIN_METRICS_EVERY (``sampled_train_metrics``)."""

    def sampled(original):
        @functools.wraps(original)
        def _update_training_metrics(self, model_outputs, targets):
            due = training_metrics_due(self)
            self._ludwig_mt_metric_steps = getattr(self, "_ludwig_mt_metric_steps", 0) + 1
            if due:
                original(self, model_outputs, targets)

        return _update_training_metrics

    rebind("ludwig.trainers.trainer:Trainer._update_training_metrics", sampled)


#: Ludwig's alignment of an LLM's targets and predictions for its text metrics, as ``LLM`` imported it
REALIGN = "ludwig.models.llm:get_realigned_target_and_prediction_tensors_for_inference"


def realigned_without_copies(targets: dict[str, Any], predictions: dict[str, Any], of_name: str, tokenizer,
                             pad_value: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ludwig's ``get_realigned_target_and_prediction_tensors_for_inference`` without its deep copies: the same
    padded tensors, in new dicts that share every tensor left as it was.

    Why: to leave its inputs untouched Ludwig deep-copies the targets and the whole predictions (float32 logits and
    probabilities over the vocabulary) before padding, although padding makes new tensors anyway. On the H200 the
    copies were 0.27 GiB of the 0.57 GiB that a QLoRA run of SmolLM2 added over its start at its first step (the
    training metrics' step), which set the run's peak (run 29); evaluation pays them too.
    """
    import torch
    import torch.nn.functional as F
    from ludwig.constants import LOGITS, PREDICTIONS, PROBABILITIES

    target_length = targets.get(of_name).size()[1]
    prediction_length = predictions[of_name].get(PREDICTIONS).size()[1]
    if target_length == prediction_length:
        return targets, predictions
    if not pad_value:  # as Ludwig: a pad value of 0 means the tokenizer's
        pad_value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = abs(target_length - prediction_length)
    targets, predictions = dict(targets), {**predictions, of_name: dict(predictions[of_name])}
    if target_length > prediction_length:
        ours = predictions[of_name]
        ours[PREDICTIONS] = F.pad(ours[PREDICTIONS], (0, extra), value=pad_value).to(torch.int64)
        ours[PROBABILITIES] = F.pad(ours[PROBABILITIES], (0, 0, 0, extra)).to(torch.float32)
        ours[LOGITS] = F.pad(ours[LOGITS], (0, 0, 0, extra)).to(torch.float32)
    else:
        targets[of_name] = F.pad(targets[of_name], (0, extra), value=pad_value).to(torch.int64)
    return targets, predictions


def patch_realign_without_copies() -> None:
    """``LLM``'s metric and evaluation-loss alignment through :func:`realigned_without_copies`
    (``realign_without_copies``)."""

    def lean(original):
        @functools.wraps(original)
        def realign(targets, predictions, of_name, tokenizer, pad_value=None):
            if not enabled("realign_without_copies"):
                return original(targets, predictions, of_name, tokenizer, pad_value)
            return realigned_without_copies(targets, predictions, of_name, tokenizer, pad_value)

        return realign

    rebind(REALIGN, lean)


# ------------------------------------------------------------------------------------------ target_only_logits

#: key of the precomputed loss in the outputs of a lean training forward (read by the patched ``train_loss``)
LEAN_LOSS = "ludwig_mt_target_only_loss"
IGNORE = lean_evaluation.IGNORE  # ludwig.constants.IGNORE_INDEX_TOKEN_ID, torch's cross-entropy default


def padded_labels(rows: list[tuple[Any, int]], width: int):
    """Labels for the rows left-padded to ``width`` (Ludwig's layout): the response tokens, -100 elsewhere."""
    import torch

    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=rows[0][0].device)
    for i, (ids, n_prompt) in enumerate(rows):
        start = width - ids.shape[0]
        labels[i, start + n_prompt:] = ids[n_prompt:]
    return labels


def first_fit_decreasing(lengths: list[int], pack_length: int) -> list[list[int]]:
    """The rows (indices into ``lengths``) of each pack when whole rows go, longest first, into the first pack with
    room for them (at most ``pack_length`` tokens; a longer row gets a pack alone)."""
    packs: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((p for p, size in enumerate(used) if size + lengths[i] <= pack_length), None)
        if slot is None:
            packs.append([]), used.append(0)
            slot = len(packs) - 1
        packs[slot].append(i)
        used[slot] += lengths[i]
    return packs


def pack_rows(rows: list[tuple[Any, int]], pack_length: int, pad_id: int, pad_to: int = 0,
              packs: list[list[int]] | None = None) -> dict[str, Any]:
    """First-fit-decreasing packing of whole rows into packs of at most ``pack_length`` tokens (or ``packs``, the
    rows of each pack as :func:`pack_plan` already decided them: the step then packs once).

    Returns ``input_ids``, ``position_ids`` (restarting at 0 for every row; the tail padding continues its pack's
    last row, which no real token attends to under causal attention, so a pack of one row and padding is one
    sequence to transformers, which then runs plain causal attention instead of building a mask for a second
    segment: 12 % of the 1B shape's speed on equal rows, run 20) and ``labels`` (-100 on prompts and padding), all
    of shape ``[packs, longest pack]``, at least ``pad_to`` wide (fewer distinct shapes for the GPU's kernels). The
    packing is decided on Python ints, the tensors filled by whole-batch ops (this runs on the CPU every step).
    """
    import torch

    lengths = [ids.shape[0] for ids, _ in rows]
    packs = first_fit_decreasing(lengths, pack_length) if packs is None else packs
    used = [sum(lengths[i] for i in members) for members in packs]
    order = [i for members in packs for i in members]  # the rows as they lie in the packs, pack after pack
    device = rows[0][0].device
    seqs = torch.cat([rows[i][0] for i in order]).to(torch.long)
    n = torch.tensor([lengths[i] for i in order], dtype=torch.long, device=device)
    n_prompt = torch.tensor([rows[i][1] for i in order], dtype=torch.long, device=device)
    total = seqs.shape[0]
    row_pos = torch.arange(total, device=device) - torch.repeat_interleave(n.cumsum(0) - n, n, output_size=total)
    is_label = row_pos >= torch.repeat_interleave(n_prompt, n, output_size=total)
    cols = torch.arange(max(*used, pad_to), device=device)
    last_start = torch.tensor([u - lengths[members[-1]] for u, members in zip(used, packs)], dtype=torch.long,
                              device=device)
    filled = cols < torch.tensor(used, dtype=torch.long, device=device)[:, None]
    pos = cols - last_start[:, None]  # the tail padding's positions: its pack's last row, continued
    pos[filled] = row_pos
    ids = torch.full(pos.shape, pad_id, dtype=torch.long, device=device)
    ids[filled] = seqs
    labels = torch.full(pos.shape, IGNORE, dtype=torch.long, device=device)
    labels[filled] = torch.where(is_label, seqs, IGNORE)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def padding_free_batch(rows: list[tuple[Any, int]], pad_id: int) -> dict[str, Any]:
    """The step's rows as one sequence (:func:`pack_rows` with one pack as long as all of them: no padding) and
    where each row starts (``cu_seq_lens``) and the longest row (``max_length``), for :mod:`varlen_attention`."""
    lengths = [ids.shape[0] for ids, _ in rows]
    batch = pack_rows(rows, sum(lengths), pad_id, 0, [list(range(len(rows)))])
    return {**batch, "cu_seq_lens": varlen_attention.row_offsets(lengths), "max_length": max(lengths)}


def padding_free_kwargs(base, batch: dict[str, Any]) -> dict[str, Any]:
    """The model keyword arguments of a :func:`padding_free_batch`: the row offsets under the names transformers'
    attention functions take them by, and :func:`varlen_attention.no_mask`. Refused (one line) unless the model
    attends with :data:`varlen_attention.NAME`: any other attention would attend across the rows."""
    if not varlen_attention.supported(base):
        raise WorkflowError(f"a padding-free training batch needs the {varlen_attention.NAME} attention; "
                            f"{type(base).__name__} attends with "
                            f"{getattr(base.config, '_attn_implementation', None)!r}. Fix: set {ENV_PACK_LENGTH}=pow2 "
                            "or turn the varlen_attention speed-up on")
    offsets, longest = batch["cu_seq_lens"], batch["max_length"]
    return {"attention_mask": varlen_attention.no_mask(batch["input_ids"].device), "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def target_only_loss(causal_lm, batch: dict[str, Any]):
    """Mean next-token cross-entropy over the response tokens, with the LM head applied only where it counts.

    ``causal_lm`` is the (peft-wrapped) ``*ForCausalLM``; ``batch`` holds ``input_ids``, ``labels`` and either
    ``attention_mask`` or ``position_ids``. Equal to the full-logits loss (the same positions, fp32 softmax).
    """
    import torch
    import torch.nn.functional as F

    base = base_causal_lm(causal_lm)
    model_kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "cu_seq_lens" in batch:
        model_kwargs.update(padding_free_kwargs(base, batch))
    hidden = base.base_model(**model_kwargs, use_cache=False)[0]
    if "target_index" not in batch:
        batch = {**batch, **target_positions(batch["labels"])}
    head = base.get_output_embeddings()
    # index_select with indices computed beforehand: a boolean mask here would make the CPU wait for the GPU
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
    targets = batch["target_ids"]
    if type(head) is torch.nn.Linear and head.bias is None and hidden.is_cuda and liger_usable():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss()(head.weight, selected.to(head.weight.dtype), targets)
    return F.cross_entropy(head(selected).float(), targets)


def target_positions(labels) -> dict[str, Any]:
    """The flat positions of ``hidden[:, :-1]`` that predict a label (``target_index``) and those labels
    (``target_ids``): computed with the labels on the CPU, they cost the GPU step no synchronisation."""
    import torch

    shifted = labels[:, 1:].reshape(-1)
    index = torch.nonzero(shifted != IGNORE).squeeze(1)
    return {"target_index": index, "target_ids": shifted.index_select(0, index)}


def lean_forward_supported(llm) -> bool:
    """The lean path covers a text output trained with Ludwig's plain next-token cross-entropy on a causal LM
    whose logits are ``lm_head(hidden)`` (no logit scaling or soft-capping)."""
    from ludwig.constants import TEXT
    from ludwig.modules.loss_modules import NextTokenSoftmaxCrossEntropyLoss

    if llm.output_feature_type != TEXT or len(llm.output_features) != 1:
        return False
    (feature,) = llm.output_features.values()
    if type(feature.train_loss_function) is not NextTokenSoftmaxCrossEntropyLoss:
        return False
    config = getattr(llm.model, "config", None)
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def packing_supported(causal_lm) -> bool:
    """Packing needs per-row ``position_ids`` (rotary models); ALiBi models (Bloom) take none."""
    import inspect

    base = base_causal_lm(causal_lm)
    return "position_ids" in inspect.signature(base.base_model.forward).parameters


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


#: tokens per pack of ``pack_training_rows``: unset (or ``pow2``), the batch's longest row rounded up to a power of
#: two unless that pads much more (:data:`POW2_MAX_GROWTH`); ``longest``, the longest row itself; a number, packs
#: that long (the benchmark's comparisons); ``varlen``, no packs: the step's rows as one padding-free sequence
#: (:func:`padding_free_batch`; where the model attends with ``varlen_attention``'s function, else pow2). Unset on a
#: CUDA GPU whose flash kernel takes the model's steps, ``varlen`` is the default (:func:`padding_free_step`);
#: ``pow2`` asks for the packs there
ENV_PACK_LENGTH = "LUDWIG_MT_PACK_LENGTH"
#: the power-of-two width is kept while its packs hold at most this many times the positions (tokens + padding)
#: of packs as wide as the longest row: rows just over a power of two (all of 520-600 tokens: one row per pack of
#: 1,024) would otherwise nearly double the step's work
POW2_MAX_GROWTH = 1.25
#: the :data:`ENV_PACK_LENGTH` value of padding-free batches
VARLEN = "varlen"


def pack_plan(lengths: list[int], setting: str) -> tuple[int, list[list[int]]]:
    """The pack length (and width) for rows of ``lengths`` under :data:`ENV_PACK_LENGTH`'s ``setting``, and the rows
    of each pack (:func:`first_fit_decreasing`, handed on to :func:`pack_rows`). By default the longest row rounded
    up to a power of two, so that a run meets few distinct shapes (cuDNN's attention builds a graph for every new
    one: about 200 ms of CPU per step when each step brings one, run 17), unless those packs hold more than
    :data:`POW2_MAX_GROWTH` times the positions (tokens and padding) of packs as wide as the longest row; so also
    under ``varlen`` where a step cannot go padding-free (:func:`padding_free_step`). A bad value is one line naming
    the variable."""
    longest, value = max(lengths), setting.strip()
    if value in ("", "pow2", VARLEN):
        pow2 = 1 << (longest - 1).bit_length()
        packs = first_fit_decreasing(lengths, pow2)
        # no packing at the longest row's width holds fewer positions than the tokens themselves: below that bound
        # the power of two fits without packing a second time (the usual case: run 17's rows were 96 % tokens)
        if pow2 == longest or len(packs) * pow2 <= POW2_MAX_GROWTH * sum(lengths):
            return pow2, packs
        narrow = first_fit_decreasing(lengths, longest)
        return (pow2, packs) if len(packs) * pow2 <= POW2_MAX_GROWTH * len(narrow) * longest else (longest, narrow)
    if value == "longest":
        return longest, first_fit_decreasing(lengths, longest)
    if value.isdigit() and int(value) > 0:
        return int(value), first_fit_decreasing(lengths, int(value))
    raise WorkflowError(f"{ENV_PACK_LENGTH}={setting!r}: not a pack length. Fix: leave it unset (padding-free on a "
                        f"CUDA GPU, else the longest row rounded up to a power of two), pow2, longest, {VARLEN}, or "
                        "a positive number of tokens")


def packing_wanted(llm) -> bool:
    """A trainer that declares ``packing`` (Ludwig's zero-shot one; tests) decides; else ``pack_training_rows``
    (its patch marks the model for the call, :func:`patch_pack_training_rows`)."""
    declared = getattr(llm.config_obj.trainer, "packing", None)
    return bool(declared) if declared is not None else bool(getattr(llm, "_ludwig_mt_pack", False))


def padding_free_step(base, setting: str, device) -> bool:
    """Whether a packed step of ``base`` (the ``*ForCausalLM``) on ``device`` goes padding-free
    (:func:`padding_free_batch`) under :data:`ENV_PACK_LENGTH`'s ``setting``: asked for (``varlen``) and possible, or
    unset where the flash kernel takes the model's steps. Why the default there: on the H200 padding-free steps gave
    the packs' loss to 0.0 % over 50 steps of real rows and were faster and smaller (run 28: bf16 LoRA 8.78 GiB
    instead of 10.94); elsewhere they would attend row by row."""
    value = setting.strip()
    if value == VARLEN:
        if varlen_attention.supported(base):
            return True
        _warn_once(f"ludwig_mt: {ENV_PACK_LENGTH}={VARLEN} needs the varlen_attention speed-up's attention: "
                   "packs of a power of two instead")
        return False
    return value == "" and varlen_attention.supported(base) and varlen_attention.flash_usable_for(base, device)


def lean_training_batch(llm, input_ids, target_ids) -> dict[str, Any]:
    """The model inputs and labels of a lean step: packed if ``trainer.packing`` is on and the model allows it,
    else Ludwig's left-padded merge as ``pad_merged_rows_with_the_pad_token`` fixes it (padding masked) with labels
    on the response tokens."""
    # The per-row slicing below is cheap on the CPU and costs a device sync per row on the GPU: build the batch
    # on the CPU and move it once.
    device = input_ids.device
    batch = _lean_training_batch_on_cpu(llm, input_ids.cpu(), target_ids.cpu(), device)
    batch.update(target_positions(batch["labels"]))
    if device.type != "cuda":
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    # from pinned memory the copies queue behind the GPU's work; from pageable memory each would wait for it
    return {k: v.pin_memory().to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _lean_training_batch_on_cpu(llm, input_ids, target_ids, device) -> dict[str, Any]:
    max_length = llm.global_max_sequence_length
    rows = merged_rows(input_ids, target_ids, llm.tokenizer, max_length)
    n_tokens = sum(ids.shape[0] for ids, _ in rows)  # real tokens, what Ludwig's token accounting counts
    if packing_wanted(llm):
        if packing_supported(llm.model):
            setting = os.environ.get(ENV_PACK_LENGTH, "")
            if padding_free_step(base_causal_lm(llm.model), setting, device):
                return {**padding_free_batch(rows, pad_token_id(llm.tokenizer)), "n_tokens": n_tokens}
            length, packs = pack_plan([ids.shape[0] for ids, _ in rows], setting)
            # the pack length is also the packs' width: one shape per pack count (see pack_plan)
            return {**pack_rows(rows, length, pad_token_id(llm.tokenizer), length, packs), "n_tokens": n_tokens}
        _warn_once(f"ludwig_mt: trainer.packing ignored, {type(llm.model).__name__} takes no position_ids")
    merged, mask = left_pad_rows([ids for ids, _ in rows], pad_token_id(llm.tokenizer))
    return {"input_ids": merged, "attention_mask": mask, "labels": padded_labels(rows, merged.shape[1]),
            "n_tokens": n_tokens}


def patch_target_only_logits() -> None:
    """Lean training forward for ``LLM`` (``target_only_logits``), and Ludwig's packing made correct on it.

    ``Trainer._forward_pass`` marks the model lean (and keeps the batch for the training-metric sample); ``LLM.forward``
    then returns the loss itself, ``LLM.train_loss`` passes it on, and ``Trainer._update_training_metrics`` measures a
    few rows of a lean step again (a lean step has no logits for Ludwig's metrics).
    """
    from ludwig.constants import USED_TOKENS
    from ludwig.models.llm import LLM
    from ludwig.utils.torch_utils import reg_loss

    def marking(original_pass):
        @functools.wraps(original_pass)
        def _forward_pass(self, inputs, targets, should_step):
            lean = enabled("target_only_logits") and isinstance(self.model, LLM) and lean_forward_supported(self.model)
            self.model._ludwig_mt_lean = lean
            self._ludwig_mt_last_batch = (inputs, targets) if lean else None
            try:
                return original_pass(self, inputs, targets, should_step)
            finally:
                self.model._ludwig_mt_lean = False

        return _forward_pass

    def lean_forward(original_forward):
        @functools.wraps(original_forward)
        def forward(self, inputs, mask=None):
            if not (self.training and getattr(self, "_ludwig_mt_lean", False) and isinstance(inputs, tuple)):
                return original_forward(self, inputs, mask)
            input_ids, target_ids = self._unpack_inputs(inputs)
            batch = lean_training_batch(self, input_ids, target_ids)
            return {LEAN_LOSS: target_only_loss(self.model, batch), USED_TOKENS: batch["n_tokens"]}

        return forward

    def passing_lean_loss(original_loss):
        @functools.wraps(original_loss)
        def train_loss(self, targets, predictions, regularization_type=None, regularization_lambda=None):
            if LEAN_LOSS not in predictions:
                return original_loss(self, targets, predictions, regularization_type, regularization_lambda)
            (name, feature), = self.output_features.items()
            of_loss = predictions[LEAN_LOSS]
            loss = feature.loss.weight * of_loss
            additional = self.losses()
            if additional:
                loss = loss + sum(additional)
            if regularization_type is not None and regularization_lambda != 0:
                loss = loss + reg_loss(self, regularization_type, l1=regularization_lambda, l2=regularization_lambda)
            return loss, {name: of_loss}

        return train_loss

    def sampling_lean_steps(original_update):
        @functools.wraps(original_update)
        def _update_training_metrics(self, model_outputs, targets):
            if LEAN_LOSS in model_outputs:  # a lean step has no logits: measure a few of its rows again
                model_outputs, targets = metric_sample_outputs(self)
            return original_update(self, model_outputs, targets)

        return _update_training_metrics

    rebind("ludwig.trainers.trainer:Trainer._forward_pass", marking)
    rebind("ludwig.models.llm:LLM.forward", lean_forward)
    rebind("ludwig.models.llm:LLM.train_loss", passing_lean_loss)
    rebind("ludwig.trainers.trainer:Trainer._update_training_metrics", sampling_lean_steps)


def patch_pack_training_rows() -> None:
    """Mark the model, for each training forward, as packing its lean batch when the speed-up is on (read at use
    time: ``LUDWIG_MT_SPEEDUPS_OFF=pack_training_rows`` trains Ludwig's left-padded batches)."""

    def packing(original_forward):
        @functools.wraps(original_forward)
        def forward(self, inputs, mask=None):
            self._ludwig_mt_pack = self.training and enabled("pack_training_rows")
            try:
                return original_forward(self, inputs, mask)
            finally:
                self._ludwig_mt_pack = False

        return forward

    rebind("ludwig.models.llm:LLM.forward", packing)


# ----------------------------------------------------------------------------------------------- bf16_autocast


def autocast_device(trainer) -> str | None:
    """The device type whose bf16 autocast the trainer's next step should run under, or None.

    Only where it changes something: the trainable (LoRA) weights are float32, the model sits on a device in
    :data:`AUTOCAST_DEVICES` that computes in bf16, and Ludwig's own fp16 AMP is off. Not under a DeepSpeed engine
    (``--strategy zero2/zero3``): its forward switches an outer autocast off ("enabled outside DeepSpeed but
    disabled within the DeepSpeed engine"), and the adapters would then get bf16 inputs for fp32 weights (on the
    H100 every ZeRO-2 QLoRA run failed at its first step).
    """
    import torch

    if not enabled("bf16_autocast") or getattr(trainer, "use_amp", False):
        return None
    if type(getattr(trainer, "dist_model", None)).__module__.startswith("deepspeed"):
        return None
    trainable = next((p for p in trainer.model.parameters() if p.requires_grad), None)
    if trainable is None or trainable.dtype != torch.float32:
        return None
    device = trainable.device.type
    if device not in AUTOCAST_DEVICES or (device == "cuda" and not torch.cuda.is_bf16_supported()):
        return None
    return device


def training_autocast(trainer):
    """``torch.autocast(bf16)`` while the trainer is inside a ``bf16_autocast`` step, a no-op otherwise."""
    import torch

    device = getattr(trainer, "_ludwig_mt_autocast", None)
    return torch.autocast(device, dtype=torch.bfloat16) if device else contextlib.nullcontext()


def adapter_layers(llm) -> list:
    """The model's peft tuner layers (cached per wrapped model: the step toggles a flag on each)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cached = getattr(llm, "_ludwig_mt_adapter_layers", None)
    if cached is None or cached[0] is not llm.model:
        cached = (llm.model, [m for m in llm.model.modules() if isinstance(m, BaseTunerLayer)])
        llm._ludwig_mt_adapter_layers = cached
    return cached[1]


@contextlib.contextmanager
def bf16_adapter_step(trainer, device: str):
    """One ``bf16_autocast`` step: inside, :func:`training_autocast` is bf16 autocast on ``device`` and the adapters
    take their (bf16) inputs as they are. The input cast stays off through the backward too: reentrant gradient
    checkpointing recomputes the forward there."""
    layers = adapter_layers(trainer.model)
    trainer._ludwig_mt_autocast = device
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        trainer._ludwig_mt_autocast = None
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def patch_bf16_autocast() -> None:
    """Run ``Trainer.train_step`` with the adapters' input cast off and its forward pass (``Trainer._forward_pass``)
    under bf16 autocast (``bf16_autocast``); the backward and optimizer step stay outside autocast, as torch's AMP
    recipe says."""

    def adapter_step(original):
        @functools.wraps(original)
        def train_step(self, inputs, targets, should_step=True, profiler=None):
            device = autocast_device(self)
            if device is None:
                return original(self, inputs, targets, should_step=should_step, profiler=profiler)
            with bf16_adapter_step(self, device):
                return original(self, inputs, targets, should_step=should_step, profiler=profiler)

        return train_step

    def autocast_forward(original_pass):
        @functools.wraps(original_pass)
        def _forward_pass(self, inputs, targets, should_step):
            with training_autocast(self):
                return original_pass(self, inputs, targets, should_step)

        return _forward_pass

    rebind("ludwig.trainers.trainer:Trainer.train_step", adapter_step)
    rebind("ludwig.trainers.trainer:Trainer._forward_pass", autocast_forward)


# ------------------------------------------------------------------------------------------- lean_lora_forward
LORA_LAYER_FORWARDS = ("peft.tuners.lora.layer:Linear.forward", "peft.tuners.lora.bnb:Linear4bit.forward")


def one_node_adapter(layer, x, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """The adapter name when peft's LoRA ``layer`` can run as one autograd node on ``x`` (no switch consulted):
    in training, one plain LoRA adapter (no DoRA or other variant, no bias on A or B, nothing hooked on A, B or the
    base layer, which the node does not call as modules), not merged, called with ``x`` alone, a base layer that
    :func:`~ludwig_mt.patches.lora_autograd.supported_base` allows, and one dtype for the maths (autocast's, or
    ``x``, the base weight and the adapter sharing one). Anything else keeps peft's forward."""
    import torch

    if getattr(layer, "lora_A", None) is None:  # not a LoRA layer (Ludwig's default adapts q_proj and v_proj only)
        return None
    if args or kwargs or not layer.training or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    name = active[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    from ludwig_mt.patches.lora_autograd import supported_base

    base = base_layer(layer)
    if any(m._forward_hooks or m._forward_pre_hooks for m in (lora_a, lora_b, base)):
        return None  # the node calls none of them as a module
    if getattr(layer, "fan_in_fan_out", False):
        return None
    if not supported_base(base) or not isinstance(layer.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity)):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return name
    one_dtype = x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
    return name if one_dtype else None


def base_layer(layer):
    """peft's ``layer.get_base_layer()`` without its ``hasattr`` loop, which raises and catches an AttributeError
    on every call (6 us, twice per adapted layer and pass) for the usual single wrap."""
    base = layer._modules.get("base_layer")
    if base is None or "base_layer" in base._modules or "base_layer" in base.__dict__:
        return layer.get_base_layer()
    return base


def lean_lora_adapter(layer, x, args: tuple, kwargs: dict) -> str | None:
    """The adapter name when ``layer``'s forward takes the lean path (``lean_lora_forward`` on, and
    :func:`one_node_adapter`), else None."""
    return one_node_adapter(layer, x, args, kwargs) if enabled("lean_lora_forward") else None


def compute_dtype(x):
    """The dtype peft's modules would compute in on ``x``: autocast's when it is on, else ``x``'s."""
    import torch

    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def one_node_parts(layer, name: str):
    """(LoRA A weight, LoRA B weight, :class:`~ludwig_mt.patches.lora_autograd.Adapter`) of ``layer``'s adapter."""
    import torch

    from ludwig_mt.patches.lora_autograd import Adapter

    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return (layer.lora_A[name].weight, layer.lora_B[name].weight, Adapter(base_layer(layer), layer.scaling[name], p))


def lean_lora_forward(layer, x, name: str):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` as one autograd node (:class:`LoRALinear`)."""
    from ludwig_mt.patches.lora_autograd import lora_linear

    lora_a, lora_b, adapter = one_node_parts(layer, name)
    return lora_linear(x, lora_a, lora_b, adapter, compute_dtype(x))


def patch_lean_lora_forward() -> None:
    """peft's LoRA ``Linear`` / ``Linear4bit`` forward takes the lean path where :func:`lean_lora_adapter` allows."""

    def lean(original):
        @functools.wraps(original)
        def forward(self, x, *args, **kwargs):
            name = lean_lora_adapter(self, x, args, kwargs)
            if name is None:
                return original(self, x, *args, **kwargs)
            return lean_lora_forward(self, x, name)

        return forward

    for target in LORA_LAYER_FORWARDS:
        rebind(target, lean)


# ------------------------------------------------------------------------------------ one_sync_optimizer_step
BNB_OPTIMIZER_STEP = "bitsandbytes.optim.optimizer:Optimizer8bit.step"


def on_default_stream(optimizer) -> bool:
    """The work is queued on the default stream, where bitsandbytes launches its update kernels (always true on
    CPU), so they run after the gradients without a synchronisation of their own."""
    import torch

    first = next((p for group in optimizer.param_groups for p in group["params"]), None)
    if first is None or first.device.type != "cuda":
        return True
    return torch.cuda.current_stream(first.device) == torch.cuda.default_stream(first.device)


def one_sync_step(optimizer, closure=None):
    """bitsandbytes 0.50's ``Optimizer8bit.step`` with its per-parameter ``sync_gpu`` left out and one at the end
    (its own code otherwise: state initialised on first use, paged state prefetched, one update kernel per
    parameter, in order)."""
    import torch
    from bitsandbytes.optim import optimizer as bnb_optimizer

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        if not optimizer.initialized:
            optimizer.check_overrides()
            optimizer.to_gpu()
            optimizer.initialized = True
        last = None
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(optimizer.state[p]) == 0:
                    optimizer.init_state(group, p, gindex, pindex)
                optimizer.prefetch_state(p)
                optimizer.update_step(group, p, gindex, pindex)
                last = p
        if last is not None:
            bnb_optimizer.sync_gpu(last)
    return loss


def patch_one_sync_optimizer_step() -> None:
    """bitsandbytes' optimizers step with one synchronisation where :func:`on_default_stream` allows."""

    def one_sync(original):
        @functools.wraps(original)
        def step(self, closure=None):
            if enabled("one_sync_optimizer_step") and on_default_stream(self):
                return one_sync_step(self, closure)
            return original(self, closure)

        return step

    rebind(BNB_OPTIMIZER_STEP, one_sync)


# ----------------------------------------------------------------------------------------- offload_checkpoints
CHECKPOINTING_ENABLE = "transformers.modeling_utils:PreTrainedModel.gradient_checkpointing_enable"


def patch_offload_checkpoints() -> None:
    """After a model turns gradient checkpointing on (Ludwig's trainer calls ``gradient_checkpointing_enable``),
    its checkpointed layers keep their saved inputs in host memory (:mod:`ludwig_mt.patches.offload`), decided at
    each call: on while ``offload_checkpoints`` is on and the inputs live on a CUDA device."""

    def offloaded(original):
        @functools.wraps(original)
        def gradient_checkpointing_enable(self, *args, **kwargs):
            from ludwig_mt.patches.offload import offload_checkpointed_inputs

            result = original(self, *args, **kwargs)
            offload_checkpointed_inputs(self, functools.partial(enabled, "offload_checkpoints"))
            return result

        return gradient_checkpointing_enable

    rebind(CHECKPOINTING_ENABLE, offloaded)


# ---------------------------------------------------------------------------------------------- fused_lora_mlp
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def swiglu_mlp(mlp) -> bool:
    """``mlp`` is a Llama-style gated MLP: ``down(silu(gate(x)) * up(x))`` (Llama, Mistral, Qwen2/3, SmolLM2)."""
    import torch

    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(hasattr(mlp, name) for name in MLP_PROJECTIONS)


def fused_lora_mlp_forward(mlp, x, *args, **kwargs):
    """A patched MLP's forward (bound to the instance by :func:`apply_fused_lora_mlp`): one
    :class:`~ludwig_mt.patches.lora_autograd.LoRAMLP` node when ``fused_lora_mlp`` is on and all three projections
    can run as one node (:func:`one_node_adapter`), the forward it had before (Liger's or transformers')
    otherwise."""
    names = [one_node_adapter(getattr(mlp, p), x) for p in MLP_PROJECTIONS] if not (args or kwargs) else [None]
    if None in names or not enabled("fused_lora_mlp"):
        return mlp._ludwig_mt_previous_forward(x, *args, **kwargs)
    from ludwig_mt.patches.lora_autograd import lora_mlp

    parts = [one_node_parts(getattr(mlp, p), n) for p, n in zip(MLP_PROJECTIONS, names)]
    weights = tuple(w for a, b, _ in parts for w in (a, b))
    return lora_mlp(x, weights, tuple(adapter for _, _, adapter in parts), compute_dtype(x))


def apply_fused_lora_mlp(model) -> int:
    """Give every Llama-style MLP of a loaded model :func:`fused_lora_mlp_forward` (instance-level, after Liger's
    kernels, whose SwiGLU forward becomes the fallback); returns how many. Both are bound methods on the instance,
    so a ``copy.deepcopy`` of the model calls its own modules. The choice is made at each call, so the LoRA layers
    peft adds later are seen."""
    import types

    patched = 0
    for module in model.modules():
        if swiglu_mlp(module) and getattr(module, "_ludwig_mt_previous_forward", None) is None:
            module._ludwig_mt_previous_forward = module.forward
            module.forward = types.MethodType(fused_lora_mlp_forward, module)
            patched += 1
    return patched


def patch_fused_lora_mlp() -> None:
    """Ludwig's loaded LLMs get ``fused_lora_mlp`` (an after-load hook of the one stand-in loader)."""
    add_load_rule(after_load=apply_fused_lora_mlp)


# ---------------------------------------------------------------------------------- response_only_eval_logits


def marking_evaluation(original):
    """``FineTuneTrainer.evaluation`` that marks its model for :mod:`~ludwig_mt.patches.lean_evaluation`'s path while
    it runs (the speed-up on and the model one :func:`lean_forward_supported` covers)."""

    @functools.wraps(original)
    def evaluation(self, *args, **kwargs):
        model = self.model
        model._ludwig_mt_lean_eval = enabled("response_only_eval_logits") and lean_forward_supported(model)
        try:
            return original(self, *args, **kwargs)
        finally:
            model._ludwig_mt_lean_eval = False

    return evaluation


def patch_response_only_eval_logits() -> None:
    """The evaluation inside ``ludwig train`` marks the model; the forward and the metric update act on the mark
    (:mod:`ludwig_mt.patches.lean_evaluation`: logits of the scored window only, the same metrics)."""
    rebind(lean_evaluation.EVALUATION, marking_evaluation)
    rebind(lean_evaluation.FORWARD, lean_evaluation.lean_forward)
    rebind(lean_evaluation.UPDATE_METRICS, lean_evaluation.windowed_update)
