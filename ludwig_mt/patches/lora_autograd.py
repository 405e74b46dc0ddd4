"""One autograd node per LoRA-adapted linear layer, and per LoRA-adapted MLP, in training (``lean_lora_forward``,
``fused_lora_mlp``).

Why: the QLoRA step of a 1B model is bound by the CPU that queues its kernels, not by the GPU
(``bench/NOTES-speed.md``, "Against the peers"). peft runs each adapted layer as five modules and autograd
nodes (the frozen base layer with bitsandbytes' ``MatMul4Bit`` wrapper, dropout, ``lora_A``, ``lora_B``, the
scale-and-add), each with its own Python, dtype casts and saved tensors; 224 such layers per step of the 1B
shape. :class:`LoRALinear` computes the same ``base(x) + scaling * B(A(dropout(x)))`` as one node with a
hand-written backward (unsloth's ``LoRA_W`` does the same for dropout 0):

* the frozen weight (4-bit NF4 dequantized by bitsandbytes, as its own ``MatMul4Bit`` does, or bf16 as loaded)
  is re-derived in the backward instead of saved, as bitsandbytes does;
* the adapter's input is saved once as ``x`` plus the boolean dropout mask, not as a dropped copy per adapter:
  ``q``/``k``/``v`` (and ``gate``/``up``) share one saved ``x``, so without gradient checkpointing a step keeps
  fewer activations;
* the dropout is ``torch.native_dropout``, the kernel ``nn.Dropout`` runs: the same draw from the same seed.

The maths is peft's: the tests compare losses and gradients with peft's forward in fp32 (to rounding) and under
bf16 autocast, 4-bit included (``tests/ludwig_mt/patches/test_lora_autograd.py``, ``test_speedups.py``).
:class:`LoRAMLP` does the same for a whole Llama-style MLP (the ``fused_lora_mlp`` speed-up).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


def is_4bit(base: torch.nn.Module) -> bool:
    """``base`` is bitsandbytes' ``Linear4bit`` with its quantization state (an NF4/FP4 weight)."""
    return getattr(getattr(base, "weight", None), "quant_state", None) is not None


def supported_base(base: torch.nn.Module) -> bool:
    """The frozen layer :class:`LoRALinear` can stand in for: a plain ``nn.Linear`` or bitsandbytes'
    ``Linear4bit`` with an ``out x in`` weight that needs no gradient and no bias (GPT-2's ``Conv1D``, 8-bit and
    other quantized layers keep peft's forward)."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or getattr(base, "bias", None) is not None:
        return False
    if type(base) is torch.nn.Linear:
        return True
    return type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes") and is_4bit(base)


def frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``base``'s weight as a dense ``out x in`` matrix in ``dtype``: 4-bit weights dequantized in the forward and
    again in the backward, as bitsandbytes' ``MatMul4Bit`` does, so no dense copy outlives the call. The kernel is
    bitsandbytes' own ``dequantize_4bit`` op, called with :func:`dense_absmax` instead of through
    ``bitsandbytes.functional.dequantize_4bit``, whose Python re-validates the state and re-expands the
    double-quantized block scales (one more kernel and a host-side wrapper) at every call: 336 calls per step of
    the 1B shape, a step bound by the CPU that queues them (``bench/NOTES-speed.md``)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.to(dtype)
    if weight.is_cuda and _cuda_dequantize_4bit() is not None:
        dense = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
        _cuda_dequantize_4bit()(weight, dense_absmax(state), state.blocksize, state.quant_type, state.dtype, out=dense)
    else:
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(weight, dense_absmax(state), state.blocksize,
                                                               state.quant_type, state.shape, state.dtype)
    return dense.to(dtype)


@functools.cache
def _cuda_dequantize_4bit() -> Any:
    """bitsandbytes 0.50's CUDA kernel behind its ``dequantize_4bit`` op (``backends.cuda.ops``), called without
    the op dispatcher's round trip into Python (67 us of CPU per call under the profiler, 336 calls per step);
    None when this bitsandbytes has no such function (then the op)."""
    try:
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl
    except ImportError:
        return None
    return _dequantize_4bit_impl


def dense_absmax(state: Any) -> torch.Tensor:
    """The fp32 block scales of a bitsandbytes ``QuantState``: as stored, or, when double-quantized (``nested``,
    the QLoRA default), expanded exactly as ``dequantize_4bit`` expands them, once per state instead of once per
    call. The copy (4 bytes per 64 weights: 61 MB for a 1B model) is keyed by the stored scales' storage and
    version counter, so moving or re-quantizing the weight renews it."""
    if not state.nested:
        return state.absmax
    key = (state.absmax.data_ptr(), state.absmax._version, id(state.state2))
    cached = getattr(state, "_ludwig_mt_absmax", None)
    if cached is None or cached[0] != key:
        import bitsandbytes.functional as bnb_functional

        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        cached = (key, absmax.float())
        state._ludwig_mt_absmax = cached
    return cached[1]


#: optimizer steps taken in this process (any ``torch.optim.Optimizer``: :func:`_count_optimizer_steps`)
_OPTIMIZER_STEPS = [0]


@functools.cache
def _count_optimizer_steps() -> None:
    """Count every optimizer step of the process (torch's global step hook runs for every ``Optimizer`` subclass,
    bitsandbytes' included): the cast cache below must renew after each, and the version counter alone does not
    say so: bitsandbytes' update kernels (``torch.ops.bitsandbytes.optimizer_update_32bit`` / ``_8bit_blockwise``)
    write the weights in place without bumping it, nor does DeepSpeed's ``param.data.copy_``."""

    from torch.optim.optimizer import register_optimizer_step_post_hook

    def count(optimizer, args, kwargs) -> None:
        _OPTIMIZER_STEPS[0] += 1

    register_optimizer_step_post_hook(count)


def adapter_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (an fp32 LoRA matrix) in ``dtype``, cast once per update instead of once per call: the forward,
    gradient checkpointing's recompute of it and the backward share the copy. The copy is keyed by the number of
    optimizer steps taken (bitsandbytes' optimizers update in place without bumping the version counter: with the
    counter alone the YAMLs' ``paged_adam`` trained nothing after its first step, the bf16 copy of the initial
    weights being reused), the weight's version counter (other in-place writes) and its storage (``.data = ...``),
    so it is never stale."""
    if weight.dtype == dtype:
        return weight
    _count_optimizer_steps()
    key = (_OPTIMIZER_STEPS[0], weight._version, weight.data_ptr(), dtype)
    cached = getattr(weight, "_ludwig_mt_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._ludwig_mt_cast = cached
    return cached[1]


@dataclass(frozen=True)
class Adapter:
    """One adapted layer's frozen part and settings (what is not a tensor autograd tracks)."""

    base: torch.nn.Module
    scaling: float
    p: float  # LoRA dropout probability in this step (0 outside training)


def adapted_forward(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter: Adapter,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``rows @ W.T + scaling * dropout(rows) @ a.T @ b.T`` (2-D, in ``dtype``), with what the backward needs:
    the rank-r ``hidden = dropout(rows) @ a.T`` and the dropout mask (None without dropout)."""
    dropped, mask = torch.native_dropout(rows, adapter.p, True) if adapter.p > 0 else (rows, None)
    hidden = torch.mm(dropped, a.t())
    out = torch.mm(rows, frozen_weight(adapter.base, dtype).t()).addmm_(hidden, b.t(), alpha=adapter.scaling)
    return out, hidden, mask


def adapted_backward(grad_out: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None, a: torch.Tensor,
                     b: torch.Tensor, hidden: torch.Tensor, adapter: Adapter, dtype: torch.dtype,
                     needs: tuple[bool, bool, bool], adapter_dtypes: tuple[torch.dtype, torch.dtype],
                     add_to: torch.Tensor | None = None,
                     rows_disposable: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`adapted_forward` for (rows, a, b), each only where ``needs`` says; the rows' gradient
    in ``dtype`` (plus ``add_to``, another branch's gradient of the same rows), a's and b's in ``adapter_dtypes``
    (the LoRA weights' own dtypes).

    Memory: the dropout's ``1 / (1 - p)`` and the LoRA scaling go onto the rank-r ``grad_hidden`` once, so the
    ``rows``-sized tensors only need the mask: the dropped rows for ``a``'s gradient are one product (made in
    place when the caller no longer needs ``rows``: ``rows_disposable``) and the rows' gradient is masked in place.
    For the MLP's down projection (rows: ``tokens x intermediate``) that is two such tensors fewer at the peak of
    the step than with ``native_dropout_backward``, which allocates its result."""
    needs_rows, needs_a, needs_b = needs
    grad_rows = grad_a = grad_b = None
    if needs_b:
        grad_b = torch.mm(grad_out.t(), hidden).to(adapter_dtypes[1]).mul_(adapter.scaling)
    if needs_rows or needs_a:
        scale = adapter.scaling if mask is None else adapter.scaling / (1.0 - adapter.p)
        grad_hidden = torch.mm(grad_out, b).mul_(scale)
        if needs_a:
            kept = rows if mask is None else masked(rows, mask, in_place=rows_disposable)
            grad_a = torch.mm(grad_hidden.t(), kept).to(adapter_dtypes[0])
            del kept
        if needs_rows:
            grad_rows = torch.mm(grad_hidden, a)
            if mask is not None:
                masked(grad_rows, mask, in_place=True)
            if add_to is not None:
                grad_rows.add_(add_to)
            grad_rows.addmm_(grad_out, frozen_weight(adapter.base, dtype))
    return grad_rows, grad_a, grad_b


def masked(values: torch.Tensor, mask: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``values`` where the boolean dropout ``mask`` kept them, 0 elsewhere; into ``values`` itself when
    ``in_place``. Neither PyTorch route is both fast and in place on the GPU: a bf16-by-bool ``mul_`` takes the
    casting path (3x slower: 170 us against 57 per 16,320 x 2,048 on the H200) and ``native_dropout_backward``'s
    ``out=`` variant computes a new tensor and copies it back (the memory it should save, plus a copy). So in
    place on CUDA is one Triton kernel that writes the zeros (:func:`zero_where_dropped`)."""
    if not in_place:
        return torch.ops.aten.native_dropout_backward(values, mask, 1.0)
    fits = values.is_contiguous() and mask.is_contiguous() and values.numel() < 2**31  # the kernel's int32 offsets
    if values.is_cuda and fits and zero_where_dropped_kernel() is not None:
        return zero_where_dropped(values, mask)
    return values.mul_(mask)


def zero_where_dropped(values: torch.Tensor, mask: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Zero ``values`` (contiguous) in place where ``mask`` (contiguous bool, same shape) is False: it reads the
    mask and writes only the dropped entries."""
    n = values.numel()
    zero_where_dropped_kernel()[((n + block - 1) // block,)](values, mask, n, BLOCK=block)
    return values


@functools.cache
def zero_where_dropped_kernel() -> Any:
    """The Triton kernel of :func:`zero_where_dropped`, or None without Triton (built on first use, so the
    interpreter, ``TRITON_INTERPRET=1``, can run it on the CPU in the tests)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def zero_dropped(values_ptr, mask_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        kept = tl.load(mask_ptr + offsets, mask=inside, other=1).to(tl.int1)
        zeros = tl.zeros((BLOCK,), dtype=values_ptr.dtype.element_ty)
        tl.store(values_ptr + offsets, zeros, mask=inside & (kept == 0))

    return zero_dropped


class LoRALinear(torch.autograd.Function):
    """``base(x) + scaling * dropout(x) @ A.T @ B.T`` in ``dtype``, with ``A`` and ``B`` kept in their own dtype
    (fp32 under ``bf16_autocast``) and their gradients returned in it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter: Adapter,
                dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = adapter_weight(lora_a, dtype), adapter_weight(lora_b, dtype)
        out, hidden, mask = adapted_forward(rows, a, b, adapter, dtype)
        ctx.save_for_backward(rows, mask, a, b, hidden)
        ctx.adapter, ctx.dtype, ctx.x_meta = adapter, dtype, (x.shape, x.dtype)
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        rows, mask, a, b, hidden = ctx.saved_tensors
        needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
        grad_out = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_rows, grad_a, grad_b = adapted_backward(grad_out, rows, mask, a, b, hidden, ctx.adapter, ctx.dtype,
                                                     (needs_x, needs_a, needs_b), ctx.adapter_dtypes)
        shape, x_dtype = ctx.x_meta
        grad_x = None if grad_rows is None else grad_rows.view(shape).to(x_dtype)
        return grad_x, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter: Adapter,
                dtype: torch.dtype) -> torch.Tensor:
    """:class:`LoRALinear` applied (the one call site of ``lean_lora_forward``); without autograd (gradient
    checkpointing's first pass runs every layer under ``no_grad``) its forward alone, with no node to build."""
    if torch.is_grad_enabled():
        return LoRALinear.apply(x, lora_a, lora_b, adapter, dtype)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = adapted_forward(rows, adapter_weight(lora_a, dtype), adapter_weight(lora_b, dtype), adapter, dtype)[0]
    return out.view(*x.shape[:-1], out.shape[-1])


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the SwiGLU of Llama-style MLPs: Liger's one Triton kernel on CUDA when installed (as
    ``liger_kernels`` uses it), torch's ops (sigmoid in fp32, as transformers' ``SiLU`` on bf16) elsewhere."""
    if gate.is_cuda and _liger_swiglu() is not None:
        return _liger_swiglu()[0](gate, up)[2]
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor,
                      grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`silu_mul` for (gate, up). Liger's kernel writes them into ``gate`` and ``up`` (its own
    function does the same with its saved inputs), so the caller must not need those afterwards."""
    if gate.is_cuda and _liger_swiglu() is not None:
        return _liger_swiglu()[1](gate, up, grad)
    g, u, dc = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    return (dc * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (dc * silu).to(up.dtype)


@functools.cache
def _liger_swiglu() -> tuple[Any, Any] | None:
    """Liger's ``swiglu_forward`` / ``swiglu_backward`` (liger-kernel 0.8), or None when it is not installed."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


class LoRAMLP(torch.autograd.Function):
    """A Llama-style MLP whose three linear layers carry LoRA adapters, as one autograd node:
    ``down(silu(gate(x)) * up(x))`` with each ``layer(v) = base(v) + scaling * dropout(v) @ A.T @ B.T`` (unsloth's
    ``LoRA_MLP``, with dropout). Against three :class:`LoRALinear` nodes and Liger's SwiGLU it also keeps less for
    the backward: not ``silu(gate) * up`` (``tokens x intermediate``: the largest activation of the layer), which the
    backward recomputes from the saved gate and up outputs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, up_a: torch.Tensor,
                up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor,
                adapters: tuple[Adapter, Adapter, Adapter], dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        weights = [adapter_weight(w, dtype) for w in (gate_a, gate_b, up_a, up_b, down_a, down_b)]
        out, (gate, gate_hidden, gate_mask), (up, up_hidden, up_mask), (down_hidden, down_mask) = \
            mlp_forward(rows, weights, adapters, dtype)
        ctx.save_for_backward(rows, gate, up, gate_mask, up_mask, down_mask, gate_hidden, up_hidden, down_hidden,
                              *weights)
        ctx.adapters, ctx.dtype, ctx.x_meta = adapters, dtype, (x.shape, x.dtype)
        ctx.adapter_dtypes = [(a.dtype, b.dtype) for a, b in ((gate_a, gate_b), (up_a, up_b), (down_a, down_b))]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        rows, gate, up, gate_mask, up_mask, down_mask, gate_hidden, up_hidden, down_hidden, *weights = \
            ctx.saved_tensors
        needs = ctx.needs_input_grad
        gate_adapter, up_adapter, down_adapter = ctx.adapters
        grad_out = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        product = silu_mul(gate, up)  # recomputed: cheaper than keeping it
        grad_product, down_a, down_b = adapted_backward(grad_out, product, down_mask, weights[4], weights[5],
                                                        down_hidden, down_adapter, ctx.dtype,
                                                        (True, needs[5], needs[6]), ctx.adapter_dtypes[2],
                                                        rows_disposable=True)
        del product
        grad_gate, grad_up = silu_mul_backward(gate, up, grad_product)
        grad_rows, gate_a, gate_b = adapted_backward(grad_gate, rows, gate_mask, weights[0], weights[1],
                                                     gate_hidden, gate_adapter, ctx.dtype,
                                                     (needs[0], needs[1], needs[2]), ctx.adapter_dtypes[0])
        grad_rows, up_a, up_b = adapted_backward(grad_up, rows, up_mask, weights[2], weights[3], up_hidden,
                                                 up_adapter, ctx.dtype, (needs[0], needs[3], needs[4]),
                                                 ctx.adapter_dtypes[1], add_to=grad_rows)
        shape, x_dtype = ctx.x_meta
        grad_x = None if grad_rows is None else grad_rows.view(shape).to(x_dtype)
        return grad_x, gate_a, gate_b, up_a, up_b, down_a, down_b, None, None


def mlp_forward(rows: torch.Tensor, weights: list[torch.Tensor], adapters: tuple[Adapter, Adapter, Adapter],
                dtype: torch.dtype) -> tuple[torch.Tensor, tuple, tuple, tuple]:
    """The MLP's output on 2-D ``rows`` and what its backward needs: gate's and up's (output, hidden, mask), down's
    (hidden, mask); ``weights`` are the six LoRA matrices already in ``dtype``."""
    gate, gate_hidden, gate_mask = adapted_forward(rows, weights[0], weights[1], adapters[0], dtype)
    up, up_hidden, up_mask = adapted_forward(rows, weights[2], weights[3], adapters[1], dtype)
    out, down_hidden, down_mask = adapted_forward(silu_mul(gate, up), weights[4], weights[5], adapters[2], dtype)
    return out, (gate, gate_hidden, gate_mask), (up, up_hidden, up_mask), (down_hidden, down_mask)


def lora_mlp(x: torch.Tensor, lora_weights: tuple[torch.Tensor, ...], adapters: tuple[Adapter, Adapter, Adapter],
             dtype: torch.dtype) -> torch.Tensor:
    """:class:`LoRAMLP` applied; ``lora_weights`` is (gate A, gate B, up A, up B, down A, down B). Without autograd
    its forward alone, as :func:`lora_linear`."""
    if torch.is_grad_enabled():
        return LoRAMLP.apply(x, *lora_weights, adapters, dtype)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = mlp_forward(rows, [adapter_weight(w, dtype) for w in lora_weights], adapters, dtype)[0]
    return out.view(*x.shape[:-1], out.shape[-1])
