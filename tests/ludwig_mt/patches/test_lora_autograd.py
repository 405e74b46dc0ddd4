"""ludwig_mt/patches/lora_autograd.py: the one-node LoRA layer gives peft's loss and gradients (4-bit included) and
keeps fewer activations for the backward. The fp32 / bf16 comparisons through the speed-up's switch are in
test_speedups.py (``lean_lora_forward``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ludwig_mt.patches import lora_autograd, speedups
from tests.ludwig_mt.patches.test_speedups import counting_calls, lora_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_lora_model(tiny_model: Path):
    """The tiny Llama in bf16 with every attention/MLP linear layer replaced by bitsandbytes' NF4 ``Linear4bit``
    (quantized on the CPU, double quantization as the YAMLs), then peft LoRA (dropout 0.1, B non-zero, fp32
    adapters): QLoRA as the GPU runs it, on the CPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ludwig_mt.patches import registry

    registry.apply_all()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    for layer in base.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True)
                setattr(parent, name, quantized.to("cpu"))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                            target_modules=TARGETS))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    model.train()
    for module in model.modules():  # bf16_autocast's step: adapters take their bf16 inputs as they are
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return model


def autocast_step(model, ids, *, lean: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "" if lean else "lean_lora_forward")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("nested", [True, False])
def test_frozen_4bit_weight_is_bitsandbytes_dequantization_bit_for_bit_and_its_scales_cache_renews(
        nested: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=nested)
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    assert state.nested == nested
    reference = bnb_functional.dequantize_4bit(layer.weight, state).to(torch.bfloat16)
    assert torch.equal(lora_autograd.frozen_weight(layer, torch.bfloat16), reference)
    assert lora_autograd.frozen_weight(layer, torch.float32).dtype == torch.float32
    if not nested:
        assert lora_autograd.dense_absmax(state) is state.absmax
        return
    first = lora_autograd.dense_absmax(state)
    assert lora_autograd.dense_absmax(state) is first  # expanded once, not per call
    state.absmax.copy_(torch.roll(state.absmax, 1))  # re-quantized in place: the version counter moves
    renewed = bnb_functional.dequantize_4bit(layer.weight, state).to(torch.bfloat16)
    assert not torch.equal(renewed, reference)
    assert torch.equal(lora_autograd.frozen_weight(layer, torch.bfloat16), renewed)


def test_qlora_layers_take_one_node_and_give_peft_loss_and_gradients(tiny_model: Path, monkeypatch) -> None:
    model = quantized_lora_model(tiny_model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_autograd.is_4bit(layer.get_base_layer()) and lora_autograd.supported_base(layer.get_base_layer())
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(3))
    ref_loss, ref_grads = autocast_step(model, ids, lean=False, monkeypatch=monkeypatch)
    nodes = counting_calls(monkeypatch, lora_autograd.LoRALinear, "apply")
    loss, grads = autocast_step(model, ids, lean=True, monkeypatch=monkeypatch)
    assert len(nodes) == len(TARGETS) * model.config.num_hidden_layers
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    assert all(g.dtype == torch.float32 for g in grads.values()) and len(grads) == len(ref_grads)
    for name, grad in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def one_layer(in_features: int = 32, out_features: int = 24, dropout: float = 0.2):
    """A peft LoRA ``Linear`` (fp32) with B non-zero, in training mode; the registry's patches applied, so its
    forward is ``lean_lora_forward``'s whichever test runs first in the process."""
    from peft import LoraConfig, get_peft_model

    from ludwig_mt.patches import registry

    registry.apply_all()
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(in_features, out_features, bias=False))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"]))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layer.train()
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_node_matches_peft_exactly_in_fp32_and_only_input_grads_when_asked(dropout: float) -> None:
    layer = one_layer(dropout=dropout)
    x = torch.randn(3, 5, 32, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(11)
    ref = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](layer.lora_dropout["default"](x))) * 2
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, a, b))
    torch.manual_seed(11)
    out = lora_autograd.lora_linear(x, a, b, lora_autograd.Adapter(layer.base_layer, 2.0, dropout), torch.float32)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b))
    assert torch.allclose(out, ref, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    frozen_x = x.detach()  # no gradient for the input: the backward skips that GEMM and still gives A and B theirs
    out = lora_autograd.lora_linear(frozen_x, a, b, lora_autograd.Adapter(layer.base_layer, 2.0, dropout),
                                    torch.float32)
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (a, b)))


def test_without_autograd_the_layers_compute_the_same_forward_and_build_no_node(monkeypatch) -> None:
    """Gradient checkpointing's first pass runs under ``no_grad``: the same outputs (same dropout draws) without
    an autograd Function's bookkeeping."""
    layer = one_layer(dropout=0.3)
    x = torch.randn(3, 5, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    adapter = lora_autograd.Adapter(layer.base_layer, 2.0, 0.3)
    torch.manual_seed(5)
    with_node = lora_autograd.lora_linear(x, a, b, adapter, torch.float32)
    mlp_weights = tuple(torch.randn(shape, requires_grad=True) for shape in ((4, 32), (24, 4)) * 2 + ((4, 24), (32, 4)))
    gate, up = torch.nn.Linear(32, 24, bias=False), torch.nn.Linear(32, 24, bias=False)
    down = torch.nn.Linear(24, 32, bias=False)
    adapters = tuple(lora_autograd.Adapter(m.requires_grad_(False), 2.0, 0.3) for m in (gate, up, down))
    torch.manual_seed(6)
    mlp_with_node = lora_autograd.lora_mlp(x, mlp_weights, adapters, torch.float32)
    nodes = counting_calls(monkeypatch, lora_autograd.LoRALinear, "apply")
    mlp_nodes = counting_calls(monkeypatch, lora_autograd.LoRAMLP, "apply")
    torch.manual_seed(5)
    with torch.no_grad():
        without = lora_autograd.lora_linear(x, a, b, adapter, torch.float32)
        torch.manual_seed(6)
        mlp_without = lora_autograd.lora_mlp(x, mlp_weights, adapters, torch.float32)
    assert nodes == [] and mlp_nodes == []
    assert torch.equal(without, with_node) and torch.equal(mlp_without, mlp_with_node)


def test_the_cuda_dequantization_is_bitsandbytes_own_kernel_entry() -> None:
    """On CUDA :func:`frozen_weight` calls bitsandbytes 0.50's kernel entry directly: it must still take these
    arguments (the GPU benchmark checks the numbers; this machine has no CUDA)."""
    import inspect

    entry = lora_autograd._cuda_dequantize_4bit()
    assert entry is not None and entry.__module__ == "bitsandbytes.backends.cuda.ops"
    assert list(inspect.signature(entry).parameters) == ["A", "absmax", "blocksize", "quant_type", "dtype", "out"]


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``fn`` runs (what a step without
    gradient checkpointing holds per layer)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_sibling_adapters_share_one_saved_input_instead_of_a_dropped_copy_each(monkeypatch) -> None:
    """q/k/v read one input: peft keeps a dropped copy of it per adapter, the one-node layer keeps it once
    (plus each adapter's boolean mask)."""
    layers = [one_layer(in_features=256, out_features=64, dropout=0.1) for _ in range(3)]
    x = torch.randn(64, 256, requires_grad=True)

    def siblings(lean: bool):
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "" if lean else "lean_lora_forward")
        return lambda: [layer(x) for layer in layers]

    peft_bytes, lean_bytes = saved_bytes(siblings(False)), saved_bytes(siblings(True))
    activation = x.numel() * x.element_size()
    assert peft_bytes >= 3 * activation  # three dropped fp32 copies (and the masks)
    assert lean_bytes < peft_bytes - 1.5 * activation
    assert speedups.lean_lora_adapter(layers[0], x, (), {}) == "default"


def rows_sized_results(fn, shape: torch.Size) -> list[str]:
    """The aten ops ``fn`` runs that return a new tensor of ``shape`` (not one of their inputs' storages, as in-place
    and ``out=`` ops do)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.shape == shape and out.untyped_storage().data_ptr() not in inputs:
                made.append(func.overloadpacket.__name__)
            return out

    with Watch():
        fn()
    return made


@pytest.mark.parametrize("disposable", [True, False])
def test_adapter_backward_makes_one_rows_sized_tensor_when_the_rows_are_disposable(disposable: bool) -> None:
    """The MLP's down projection backward reads ``silu(gate) * up`` (``tokens x intermediate``, recomputed for it):
    its dropped copy is made in place and the input gradient masked in place, so the gradient is the one new
    tensor of that size (``native_dropout_backward`` made two more: at the 1B shape, 0.5 GiB of the step's peak)."""
    torch.manual_seed(0)
    rows, grad_out = torch.randn(96, 48), torch.randn(96, 16)
    a, b = torch.randn(4, 48), torch.randn(16, 4)
    _, mask = torch.native_dropout(rows, 0.25, True)
    hidden = torch.mm(rows * mask / 0.75, a.t())
    adapter = lora_autograd.Adapter(torch.nn.Linear(48, 16, bias=False).requires_grad_(False), 2.0, 0.25)
    want = lora_autograd.adapted_backward(grad_out, rows.clone(), mask, a, b, hidden, adapter, torch.float32,
                                          (True, True, True), (torch.float32, torch.float32))
    given = rows.clone()
    got: list = []
    made = rows_sized_results(lambda: got.extend(lora_autograd.adapted_backward(
        grad_out, given, mask, a, b, hidden, adapter, torch.float32, (True, True, True),
        (torch.float32, torch.float32), rows_disposable=disposable)), rows.shape)
    assert made == (["mm"] if disposable else ["native_dropout_backward", "mm"])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5)
    # the maths in float64; fp32 rounding of 96-term sums is relative to the gradient's scale (entries up to ~160,
    # so a fixed atol of 1e-5 failed on AVX-512 BLAS by 4.6e-5 where the entry nearly cancelled)
    reference_a = 2.0 * torch.mm(torch.mm(grad_out.double(), b.double()).t(), (rows * mask).double() / 0.75)
    assert torch.allclose(got[1].double(), reference_a, rtol=1e-5, atol=1e-6 * float(reference_a.abs().max()))
    assert torch.equal(given, rows * mask) == disposable  # overwritten only when the caller allowed it


ZERO_WHERE_DROPPED_CHECK = """
import torch
from ludwig_mt.patches import lora_autograd
for dtype in (torch.bfloat16, torch.float32):
    for n in (1, 4095, 4097, 3 * 4096 + 5):
        values, mask = torch.randn(n, dtype=dtype), torch.rand(n) > 0.3
        given = values.clone()
        assert lora_autograd.zero_where_dropped(given, mask) is given
        assert torch.equal(given, values * mask), (dtype, n)
print("checked")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (the GPU extra)")
def test_the_in_place_mask_kernel_zeroes_exactly_the_dropped_entries() -> None:
    """The Triton kernel the GPU uses to mask in place, run by Triton's interpreter on the CPU (a fresh process:
    the interpreter is chosen when the kernel is built), at sizes around its block."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", ZERO_WHERE_DROPPED_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-2000:]


def test_adapter_weight_is_cast_once_per_update_and_never_stale() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 8))
    first = lora_autograd.adapter_weight(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and lora_autograd.adapter_weight(weight, torch.bfloat16) is first
    assert lora_autograd.adapter_weight(weight, torch.float32) is weight  # same dtype: no copy
    with torch.no_grad():
        weight.add_(1.0)  # what an optimizer step does: in place
    updated = lora_autograd.adapter_weight(weight, torch.bfloat16)
    assert updated is not first and torch.equal(updated, weight.detach().bfloat16())
    weight.data = torch.zeros(4, 8)  # replaced storage (a loaded checkpoint)
    assert torch.equal(lora_autograd.adapter_weight(weight, torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("optimizer", ["Adam", "Adam8bit", "PagedAdam"])
def test_layers_learn_under_bitsandbytes_optimizers_that_update_without_bumping_the_version(optimizer: str,
                                                                                          monkeypatch) -> None:
    """The YAMLs' ``paged_adam`` (bitsandbytes) writes the LoRA weights in place without bumping their version
    counter: the layer's bf16 copy must still follow every step, so the forward after a step is peft's on the
    updated weights (on the CPU, paged means plain memory)."""
    import bitsandbytes as bnb

    layer = one_layer(dropout=0.0)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = getattr(bnb.optim, optimizer)(params, lr=0.05)
    x = torch.randn(6, 32)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lean = layer(x)
        versions = [p._version for p in params]
        lean.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert [p._version for p in params] == versions  # the premise: bitsandbytes leaves the counters as they were
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = layer(x)
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "lean_lora_forward")
        peft_forward = layer(x)
    torch.testing.assert_close(lean, peft_forward, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------ fused_lora_mlp
def test_fused_mlp_gives_peft_loss_and_gradients_exactly_in_fp32(tiny_model: Path, monkeypatch) -> None:
    model = lora_model(tiny_model)
    model.train()
    assert speedups.apply_fused_lora_mlp(model) == model.config.num_hidden_layers
    assert speedups.apply_fused_lora_mlp(model) == 0  # once
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(6))
    mlp_nodes = counting_calls(monkeypatch, lora_autograd.LoRAMLP, "apply")

    def loss_and_grads(off: str):
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", off)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout draws, in the same order (gate, up, down)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads("fused_lora_mlp,lean_lora_forward")  # peft's modules throughout
    assert mlp_nodes == []
    loss, grads = loss_and_grads("")
    assert len(mlp_nodes) == model.config.num_hidden_layers
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_fused_mlp_under_qlora_and_autocast_stays_close_to_peft(tiny_model: Path, monkeypatch) -> None:
    model = quantized_lora_model(tiny_model)
    speedups.apply_fused_lora_mlp(model)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(8))
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "fused_lora_mlp,lean_lora_forward")
    ref_loss, ref_grads = autocast_step(model, ids, lean=False, monkeypatch=monkeypatch)
    mlp_nodes = counting_calls(monkeypatch, lora_autograd.LoRAMLP, "apply")
    loss, grads = autocast_step(model, ids, lean=True, monkeypatch=monkeypatch)
    assert len(mlp_nodes) == model.config.num_hidden_layers
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    for name, grad in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_fused_mlp_keeps_less_for_the_backward_and_leaves_eval_to_the_modules(tiny_model: Path,
                                                                             monkeypatch) -> None:
    model = lora_model(tiny_model)
    model.train()
    speedups.apply_fused_lora_mlp(model)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(64, mlp.gate_proj.in_features, requires_grad=True)

    def run(off: str):
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", off)
        return lambda: mlp(x)

    three_nodes, one_node = saved_bytes(run("fused_lora_mlp")), saved_bytes(run(""))
    product = 64 * mlp.down_proj.in_features * x.element_size()  # silu(gate) * up, not kept
    assert one_node <= three_nodes - product
    nodes = counting_calls(monkeypatch, lora_autograd.LoRAMLP, "apply")
    model.eval()
    with torch.no_grad():
        mlp(x)
    assert nodes == []  # evaluation and prediction: peft's (and Liger's) modules, bit for bit


def test_fused_mlp_falls_back_when_a_projection_has_no_adapter(tiny_model: Path, monkeypatch) -> None:
    """Ludwig's default LoRA adapts q_proj and v_proj only: the MLP keeps its own forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    speedups.apply_fused_lora_mlp(model)
    model.train()
    nodes = counting_calls(monkeypatch, lora_autograd.LoRAMLP, "apply")
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(9))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss) and nodes == []


def test_a_deep_copy_of_a_patched_model_runs_its_own_mlps(tiny_model: Path) -> None:
    import copy

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    speedups.apply_fused_lora_mlp(model)
    twin = copy.deepcopy(model)
    for param in twin.parameters():
        param.data = param.data.to(torch.bfloat16)
    x = torch.randn(2, 3, model.config.hidden_size, dtype=torch.bfloat16)
    assert twin.model.layers[0].mlp(x).dtype == torch.bfloat16  # not the original's fp32 weights
