"""ludwig_mt/patches/offload.py: checkpointed layers keep their inputs off the device (here: a host copy standing in
for pinned memory, as the CPU has no GPU) and give the same loss and gradients as plain checkpointing. The
overlap with compute on the GPU's side stream is measured by bench/peers.py, not here."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from ludwig_mt.patches import offload


def checkpointed_lora_model(tiny_model: Path):
    """The tiny Llama with peft LoRA (dropout 0.1: the recompute must replay the same draw), gradient
    checkpointing enabled the way Ludwig's trainer does it (reentrant), the registry's patches applied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ludwig_mt.patches import registry

    registry.apply_all()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    return model


def step(model, ids, *, offloaded: bool, monkeypatch):
    """One forward and backward; returns the loss, the gradients, and how many layer inputs were still alive
    between the forward and the backward."""
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "" if offloaded else "offload_checkpoints")  # on by default
    inputs: list[weakref.ReferenceType] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(weakref.ref(args[0])))
             for layer in model.base_model.model.model.layers]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    alive = [i for i, ref in enumerate(inputs) if ref() is not None]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, alive


def test_offloaded_checkpoints_free_layer_inputs_and_give_the_same_gradients(tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(offload, "OFFLOAD_DEVICES", ("cpu",))
    model = checkpointed_lora_model(tiny_model)
    layers = model.base_model.model.model.layers
    assert all(getattr(layer._gradient_checkpointing_func, "_ludwig_mt_offloading", False) for layer in layers)
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(4))
    packed: list[int] = []
    pack = offload.OFFLOADER.pack
    monkeypatch.setattr(offload.OFFLOADER, "pack", lambda t: packed.append(1) or pack(t))

    loss, grads, alive = step(model, ids, offloaded=False, monkeypatch=monkeypatch)
    assert packed == [] and alive == list(range(len(layers)))  # plain checkpointing keeps every layer's input
    off_loss, off_grads, off_alive = step(model, ids, offloaded=True, monkeypatch=monkeypatch)
    assert len(packed) == len(layers)  # one saved input per layer went through the hooks
    # none kept where it was computed, but the embeddings' output: a leaf that requires grad (peft's
    # enable_input_require_grads), which autograd holds to accumulate its gradient into
    assert off_alive == [0]
    assert torch.equal(off_loss, loss)
    assert grads.keys() == off_grads.keys() and len(grads) == 3 * 2 * len(layers)
    for name, grad in grads.items():
        assert torch.equal(off_grads[name], grad), name


def test_offloading_wraps_once_and_leaves_host_tensors_alone() -> None:
    calls: list[tuple] = []

    def checkpoint(fn, *args, **kwargs):
        calls.append(args)
        return fn(*args)

    wrapped = offload.offloading(checkpoint, lambda: True)
    assert offload.offloading(wrapped, lambda: True) is wrapped
    x = torch.ones(2, requires_grad=True)
    assert torch.equal(wrapped(lambda t: t * 2, x), x * 2) and len(calls) == 1  # CPU tensors: plain checkpoint
    assert offload.OFFLOADER.pack(x) is x and offload.OFFLOADER.unpack(x) is x
