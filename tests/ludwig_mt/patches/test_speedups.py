"""Correctness guards for ludwig_mt/patches/speedups.py: each speed-up that applies on CPU leaves the loss unchanged.

Speed itself is measured by bench/train_speed.py (GPU), never here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches import core, speedups

TOLERANCE = 1e-5  # fp32 on CPU: the lean loss sums the same terms in another order


@pytest.fixture(scope="module")
def llm(tiny_model: Path):
    """A Ludwig ``LLM`` (tiny Llama + LoRA without dropout, so two forwards are comparable) in training mode."""
    import ludwig.api  # noqa: F401  (the import hook applies the registry's patches)
    from ludwig.models.llm import LLM
    from ludwig.schema.model_types.base import ModelConfig

    from ludwig_mt.patches import registry

    registry.apply_all()
    config = {"model_type": "llm", "base_model": str(tiny_model),
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "adapter": {"type": "lora", "dropout": 0.0},
              "trainer": {"type": "finetune", "packing": False},
              "preprocessing": {"global_max_sequence_length": 64}}
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_dict(config))
    model.prepare_for_training()
    model.train()
    return model


def ludwig_batch(tokenizer, prompt_lengths, response_lengths, seed=1):
    """Left-padded prompt/response id tensors shaped like Ludwig's training batches."""
    gen = torch.Generator().manual_seed(seed)

    def left_padded(lengths, width):
        rows = [torch.randint(3, 500, (n,), generator=gen) for n in lengths]
        return torch.stack([torch.cat([torch.full((width - len(r),), tokenizer.pad_token_id), r]) for r in rows])

    return ({"prompt": left_padded(prompt_lengths, max(prompt_lengths) + 3)},
            {"response": left_padded(response_lengths, max(response_lengths) + 2)})


def loss_and_grads(llm, batch, *, lean: bool, packing: bool):
    inputs, targets = batch
    llm.zero_grad(set_to_none=True)
    llm.config_obj.trainer.packing = packing
    llm._ludwig_mt_lean = lean
    try:
        outputs = llm((inputs, {k: v.clone() for k, v in targets.items()}))
        loss, _ = llm.train_loss({k: v.clone() for k, v in targets.items()}, outputs)
    finally:
        llm._ludwig_mt_lean, llm.config_obj.trainer.packing = False, False
    loss.backward()
    grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
    return float(loss), grads, outputs


def test_target_only_logits_gives_ludwigs_loss_and_gradients(llm) -> None:
    batch = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    full, full_grads, full_out = loss_and_grads(llm, batch, lean=False, packing=False)
    lean, lean_grads, lean_out = loss_and_grads(llm, batch, lean=True, packing=False)
    assert "logits" in full_out and speedups.LEAN_LOSS in lean_out and "logits" not in lean_out
    assert abs(full - lean) < TOLERANCE, (full, lean)
    assert full_grads.keys() == lean_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert lean_out["used_tokens"] == sum(p + r + 1 for p, r in zip([12, 20, 7, 15], [5, 9, 3, 11]))


def adapter_input_dtypes(llm) -> tuple[list[torch.dtype], list]:
    """Record the dtype every ``lora_A`` receives (the adapter math's dtype); returns the list and the hooks."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
             for name, m in llm.model.named_modules() if name.endswith("lora_A.default")]
    assert hooks
    return seen, hooks


@pytest.fixture(scope="module")
def llm_bf16_base(llm):
    """The fixture's LLM with its frozen base weights in bf16 and fp32 LoRA weights: what ``bf16_weights`` (or a
    4-bit base computing in bf16) and peft give on the GPU."""
    import copy

    model = copy.deepcopy(llm)
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model


def test_bf16_autocast_runs_the_adapter_math_in_bf16_and_keeps_fp32_weights(llm_bf16_base, monkeypatch) -> None:
    """What a ``bf16_autocast`` step does (on CPU here; GPU-only by default): the adapters get the bf16
    activations as they are (peft would make an fp32 copy for each adapter, autocast or not, unless its input
    cast is off), the LoRA weights and their gradients stay fp32, and loss and gradients stay close to the step
    with fp32 adapter math (bf16 has 8 mantissa bits)."""
    from types import SimpleNamespace

    llm = llm_bf16_base
    batch = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    seen, hooks = adapter_input_dtypes(llm)
    try:
        ref, ref_grads, _ = loss_and_grads(llm, batch, lean=True, packing=False)
        assert set(seen) == {torch.float32}, seen  # peft's default: fp32 copies of the bf16 activations
        seen.clear()
        monkeypatch.setattr(speedups, "AUTOCAST_DEVICES", ("cuda", "cpu"))
        trainer = SimpleNamespace(model=llm, use_amp=False)
        assert speedups.autocast_device(trainer) == "cpu"
        try:
            with speedups.bf16_adapter_step(trainer, "cpu"):  # what the patched Trainer.train_step does
                with speedups.training_autocast(trainer):  # what the patched _forward_pass does
                    inputs, targets = batch
                    llm._ludwig_mt_lean = True
                    outputs = llm((inputs, {k: v.clone() for k, v in targets.items()}))
                    loss, _ = llm.train_loss({k: v.clone() for k, v in targets.items()}, outputs)
                llm.zero_grad(set_to_none=True)
                loss.backward()
        finally:
            llm._ludwig_mt_lean = False
        assert all(layer.cast_input_dtype_enabled for layer in speedups.adapter_layers(llm))  # restored
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert loss.dtype == torch.float32
    assert abs(float(loss) - ref) / ref < 1e-2, (float(loss), ref)
    grads = {n: p.grad for n, p in llm.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads
    params = dict(llm.named_parameters())
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and params[name].dtype == torch.float32, name
        if not ref_grads[name].any():  # lora_A's gradient is 0 while lora_B is (its initial value)
            assert not grad.any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_autocast_applies_only_to_fp32_adapters_on_allowed_devices_without_ludwig_amp(llm, monkeypatch) -> None:
    from types import SimpleNamespace

    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS", raising=False)
    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS_OFF", raising=False)
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=False)) is None  # CPU: off by default
    monkeypatch.setattr(speedups, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=False)) == "cpu"
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=True)) is None  # Ludwig's fp16 AMP wins
    engine = type("DeepSpeedEngine", (), {"__module__": "deepspeed.runtime.engine"})()
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=False, dist_model=engine)) is None
    ddp = type("DistributedDataParallel", (), {"__module__": "torch.nn.parallel.distributed"})()
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=False, dist_model=ddp)) == "cpu"
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "bf16_autocast")
    assert speedups.autocast_device(SimpleNamespace(model=llm, use_amp=False)) is None
    with speedups.training_autocast(SimpleNamespace()):  # outside a bf16_autocast step: no autocast
        assert not torch.is_autocast_enabled("cpu")
    with speedups.training_autocast(SimpleNamespace(_ludwig_mt_autocast="cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def per_row_loss(llm, batch) -> float:
    """Ground truth: every row through the model on its own (no padding, no neighbours), token-weighted mean."""
    inputs, targets = batch
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_prompt in speedups.merged_rows(inputs["prompt"], targets["response"], llm.tokenizer, 64):
            labels = ids.clone()
            labels[:n_prompt] = speedups.IGNORE
            n = int((labels[1:] != speedups.IGNORE).sum())
            total += n * float(speedups.target_only_loss(llm.model, {"input_ids": ids[None], "labels": labels[None]}))
            count += n
    return total / count


def test_packed_loss_is_each_rows_own_loss(llm) -> None:
    """Packed rows see only themselves: the loss is that of every row run alone."""
    batch = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    packed, _, _ = loss_and_grads(llm, batch, lean=True, packing=True)
    assert abs(packed - per_row_loss(llm, batch)) < TOLERANCE


def test_packed_loss_equals_ludwigs_when_rows_need_no_padding(llm) -> None:
    batch = ludwig_batch(llm.tokenizer, [10, 10, 10, 10], [6, 6, 6, 6])
    full, full_grads, _ = loss_and_grads(llm, batch, lean=False, packing=False)
    packed, packed_grads, _ = loss_and_grads(llm, batch, lean=True, packing=True)
    assert abs(full - packed) < TOLERANCE, (full, packed)
    for name, grad in full_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unpacked_rows_of_unequal_lengths_give_each_rows_own_loss(llm) -> None:
    """Left padding is masked (fix ``pad_merged_rows_with_the_pad_token``): Ludwig's padded forward and the lean
    one give every row's own loss. Raw Ludwig pads with id 0, which is not the tiny model's pad token, and attends
    to it."""
    from ludwig.utils.llm_utils import generate_merged_ids

    from ludwig_mt.patches import core

    inputs, targets = ludwig_batch(llm.tokenizer, [12, 4], [5, 3])
    pad = llm.tokenizer.pad_token_id
    assert pad != 0
    merged, mask = generate_merged_ids(inputs["prompt"], targets["response"], llm.tokenizer, 64)
    assert merged[1, :10].tolist() == [pad] * 10 and mask[1, :10].tolist() == [0] * 10 and mask[1, 10:].all()
    raw_merged, raw_mask = core.original("ludwig.utils.llm_utils:generate_merged_ids")(
        inputs["prompt"], targets["response"], llm.tokenizer, 64)
    assert raw_merged[1, :10].tolist() == [0] * 10 and raw_mask[1, :10].tolist() == [1] * 10
    own = per_row_loss(llm, (inputs, targets))
    for lean in (False, True):
        loss, _, _ = loss_and_grads(llm, (inputs, targets), lean=lean, packing=False)
        assert abs(loss - own) < TOLERANCE, (lean, loss, own)


def test_packing_puts_several_rows_in_one_row_of_the_model(llm) -> None:
    inputs, targets = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    llm.config_obj.trainer.packing = True
    try:
        packed = speedups.lean_training_batch(llm, inputs["prompt"], targets["response"])
    finally:
        llm.config_obj.trainer.packing = False
    assert packed["input_ids"].shape == (3, 32)  # rows of 30, 27, 18, 11 tokens: packs of 32 (30 up to a power of 2)
    assert int((packed["labels"] != speedups.IGNORE).sum()) == 5 + 9 + 3 + 11 + 4  # responses + EOS


@pytest.fixture
def trainer_without_packing_key(llm):
    """The trainer config as Ludwig's finetune trainer builds it: no ``packing`` attribute at all."""
    trainer = llm.config_obj.trainer
    saved = getattr(trainer, "packing", None)
    if hasattr(trainer, "packing"):
        delattr(trainer, "packing")
    assert not hasattr(trainer, "packing")
    yield llm
    trainer.packing = saved if saved is not None else False


@pytest.mark.parametrize("off", ["", "pack_training_rows"])
def test_rows_are_packed_by_default_when_the_trainer_declares_no_packing(trainer_without_packing_key, monkeypatch,
                                                                          off) -> None:
    """``pack_training_rows``: a finetune trainer (no ``packing`` key) trains packed rows, the same loss as each
    row alone; switched off, Ludwig's left-padded batch (4 rows as wide as the longest)."""
    llm = trainer_without_packing_key
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", off)
    seen = []
    original = speedups.lean_training_batch
    monkeypatch.setattr(speedups, "lean_training_batch",
                        lambda *args: seen.append(original(*args)) or seen[-1])
    batch = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    llm._ludwig_mt_lean = True
    try:
        outputs = llm((batch[0], {k: v.clone() for k, v in batch[1].items()}))
        loss, _ = llm.train_loss({k: v.clone() for k, v in batch[1].items()}, outputs)
    finally:
        llm._ludwig_mt_lean = False
    (built,) = seen
    assert built["input_ids"].shape == ((4, 30) if off else (3, 32))  # rows of 30, 27, 18, 11 tokens: 18 + 11
    assert ("position_ids" in built) == (not off)
    assert abs(float(loss) - per_row_loss(llm, batch)) < TOLERANCE


def test_pack_rows_restarts_positions_and_never_splits_a_row() -> None:
    rows = [(torch.arange(10, 16), 4), (torch.arange(20, 23), 1), (torch.arange(30, 35), 2)]  # 6, 3, 5 tokens
    packed = speedups.pack_rows(rows, pack_length=9, pad_id=0)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 20, 21, 22], [30, 31, 32, 33, 34, 0, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert packed["labels"].tolist() == [[-100, -100, -100, -100, 14, 15, -100, 21, 22],
                                         [-100, -100, 32, 33, 34, -100, -100, -100, -100]]


def test_the_pack_width_is_the_longest_row_rounded_up_to_a_power_of_two_unless_set() -> None:
    from ludwig_mt.errors import WorkflowError

    assert speedups.pack_plan([3, 9, 5, 7], "")[0] == 16 == speedups.pack_plan([3, 9, 5, 7], "pow2")[0]  # 32 vs 27
    assert speedups.pack_plan([3, 9, 5, 7], speedups.VARLEN) == speedups.pack_plan([3, 9, 5, 7], "")  # no varlen step
    assert speedups.pack_plan([3, 9, 5], "longest")[0] == 9 and speedups.pack_plan([256, 255], "")[0] == 256
    assert speedups.pack_plan([3, 9], "2048")[0] == 2048
    with pytest.raises(WorkflowError, match="LUDWIG_MT_PACK_LENGTH='long': not a pack length"):
        speedups.pack_plan([3], "long")
    # rows just over a power of two would get a pack of 1,024 each: the longest row's width instead
    assert speedups.pack_plan([600, 580, 560, 540, 520], "")[0] == 600
    width, packs = speedups.pack_plan([600, 580, 560, 540, 520], "")
    assert (width, len(packs)) == (600, 5) and 5 * 1024 > 1.25 * 5 * 600  # packs of 1,024 would hold 1.7x the positions
    assert speedups.first_fit_decreasing([300, 700, 500, 200], 1024) == [[1, 0], [2, 3]]  # longest first
    rows = [(torch.arange(10, 16), 4), (torch.arange(20, 23), 1)]
    assert speedups.pack_rows(rows, pack_length=16, pad_id=0, pad_to=16)["input_ids"].shape == (1, 16)
    assert speedups.pack_rows(rows, pack_length=16, pad_id=0)["input_ids"].shape == (1, 9)


def test_a_step_packs_its_rows_once_where_the_power_of_two_is_clearly_tight(monkeypatch) -> None:
    """The width's guard and the packing share one first-fit-decreasing run: packs that hold at most 1.25x the
    tokens cannot hold 1.25x the positions of any narrower packing, so the usual step packs once, not three times."""
    calls = []
    real = speedups.first_fit_decreasing
    monkeypatch.setattr(speedups, "first_fit_decreasing", lambda lengths, n: calls.append(n) or real(lengths, n))
    rows = [(torch.arange(n), 2) for n in (120, 100, 60, 30, 20)]  # 330 tokens in 3 packs of 128: 384 positions
    width, packs = speedups.pack_plan([ids.shape[0] for ids, _ in rows], "")
    packed = speedups.pack_rows(rows, width, pad_id=0, pad_to=width, packs=packs)
    assert calls == [128] and packed["input_ids"].shape == (3, 128)
    assert torch.equal(packed["input_ids"], speedups.pack_rows(rows, width, pad_id=0, pad_to=width)["input_ids"])


def test_rows_of_equal_length_pack_into_ludwigs_own_shape_with_plain_causal_attention() -> None:
    """Packs no wider than the longest row rounded up to a power of two: equal rows stay one per pack, and the tail
    padding continues the row, so transformers sees no packed sequences and runs plain causal attention (packs of
    2,048 tokens cost 23-25 % on the H200 for rows of 255: a mask over every pack; a padding column of its own
    segment, 12 %: run 20)."""
    from transformers.masking_utils import find_packed_sequence_indices

    for n in (8, 7):  # rows of 7: one padding column per pack, which continues the row (run 20: 255-token rows)
        rows = [(torch.arange(100, 100 + n) + i, 3) for i in range(5)]
        length = speedups.pack_plan([ids.shape[0] for ids, _ in rows], "")[0]
        packed = speedups.pack_rows(rows, pack_length=length, pad_id=0, pad_to=length)
        assert packed["input_ids"].shape == (5, 8)
        assert find_packed_sequence_indices(packed["position_ids"]) is None


def test_raw_ludwig_packing_crashes_on_this_stack(llm) -> None:
    """Why packing goes through the lean path: Ludwig 0.17.10's own packed forward hands transformers a 3-D mask."""
    raw_forward = core.original("ludwig.models.llm:LLM.forward")
    inputs, targets = ludwig_batch(llm.tokenizer, [12, 20], [5, 9])
    llm.config_obj.trainer.packing = True
    try:
        with pytest.raises(RuntimeError, match="number of sizes provided"):
            raw_forward(llm, (inputs, targets))
    finally:
        llm.config_obj.trainer.packing = False


def test_sdpa_and_eager_attention_give_the_same_loss(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl)
        losses[impl] = float(model(input_ids=ids, labels=ids).loss)
    assert abs(losses["eager"] - losses["sdpa"]) < TOLERANCE, losses


def test_load_kwargs_bf16_only_on_cuda_unquantized_and_eager_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS", raising=False)
    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS_OFF", raising=False)
    ludwig_kwargs = {"torch_dtype": torch.float32, "attn_implementation": "eager"}
    assert speedups.adjust_load_kwargs(ludwig_kwargs, cuda_bf16=True) == {"dtype": torch.bfloat16}
    assert speedups.adjust_load_kwargs(ludwig_kwargs, cuda_bf16=False) == {"torch_dtype": torch.float32}
    quantized = {"quantization_config": object(), "attn_implementation": "eager"}
    assert "dtype" not in speedups.adjust_load_kwargs(quantized, cuda_bf16=True)
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "sdpa_attention")
    assert speedups.adjust_load_kwargs(ludwig_kwargs, cuda_bf16=False) == ludwig_kwargs
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS", "0")
    assert speedups.adjust_load_kwargs(ludwig_kwargs, cuda_bf16=True) == ludwig_kwargs


def test_training_metrics_are_due_on_one_step_in_n(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS", raising=False)
    monkeypatch.delenv("LUDWIG_MT_SPEEDUPS_OFF", raising=False)

    class Trainer:
        pass

    trainer, due = Trainer(), []
    for _ in range(2 * speedups.TRAIN_METRICS_EVERY):
        due.append(speedups.training_metrics_due(trainer))
        trainer._ludwig_mt_metric_steps = getattr(trainer, "_ludwig_mt_metric_steps", 0) + 1
    assert due == ([True] + [False] * (speedups.TRAIN_METRICS_EVERY - 1)) * 2
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "sampled_train_metrics")
    assert speedups.training_metrics_due(trainer)


def test_metric_sample_shrinks_so_metric_steps_do_not_set_the_peak(llm) -> None:
    """4 rows of the 1B shape's 255 tokens x 128k vocabulary made the metric steps the run's peak on the H200
    (5.32 against 4.53 GiB): the sample keeps its logits under the budget, one row at least."""
    assert speedups.metric_sample_rows(255, 128_256) == 1
    assert speedups.metric_sample_rows(255, 49_152) == 2  # SmolLM2's vocabulary
    assert speedups.metric_sample_rows(64, 512) == speedups.TRAIN_METRICS_ROWS  # tiny models: the full sample
    assert speedups.metric_sample_rows(100_000, 250_880) == 1
    assert speedups.metric_sample_rows(255, None) == speedups.TRAIN_METRICS_ROWS
    assert speedups.vocabulary_size(llm) == llm.model.config.vocab_size > 0


def test_unknown_speedup_name_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown speed-up"):
        speedups.enabled("flash_everything")


TRAIN_AND_RECORD_LOSSES = textwrap.dedent(
    """
    import logging, sys
    import pandas as pd
    from ludwig.api import LudwigModel
    from ludwig.trainers.trainer import Trainer
    model_dir, work, packing = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    autocast_steps = []
    if sys.argv[4:] == ["autocast"]:  # bf16_autocast, on CPU too; record each training forward's state
        import torch
        from ludwig.models.llm import LLM
        from ludwig_mt.patches import speedups
        speedups.AUTOCAST_DEVICES = ("cuda", "cpu")
        forward = LLM.forward
        def recording_forward(self, inputs, mask=None):
            if self.training and torch.is_grad_enabled():
                casting = any(layer.cast_input_dtype_enabled for layer in speedups.adapter_layers(self))
                autocast_steps.append(f"{torch.is_autocast_enabled('cpu')}/{casting}")
            return forward(self, inputs, mask)
        LLM.forward = recording_forward
    words = "select name from head where age order by count group table the of".split()
    rows = [{"prompt": " ".join(words[(i + j) % len(words)] for j in range(5 + i % 7)),
             "response": " ".join(words[(3 * i + j) % len(words)] for j in range(2 + i % 4)),
             "split": 0 if i < 40 else 1} for i in range(44)]
    pd.DataFrame(rows).to_csv(f"{work}/data.csv", index=False)
    losses = []
    original = Trainer.train_step
    def train_step(self, inputs, targets, should_step=True, profiler=None):
        out = original(self, inputs, targets, should_step=should_step, profiler=profiler)
        losses.append(float(out[0].detach()))
        return out
    Trainer.train_step = train_step
    config = {"model_type": "llm", "base_model": model_dir,
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "adapter": {"type": "lora", "dropout": 0.0},
              "trainer": {"type": "finetune", "batch_size": 4, "epochs": 1, "learning_rate": 0.01,
                          "packing": packing},
              "preprocessing": {"global_max_sequence_length": 32, "split": {"type": "fixed", "column": "split"}}}
    results = LudwigModel(config, logging_level=logging.WARNING).train(
        dataset=f"{work}/data.csv", output_directory=f"{work}/results", skip_save_model=True,
        skip_save_progress=True, skip_save_log=True, skip_save_processed_input=True)
    print("LOSSES", *losses)
    print("AUTOCAST", *autocast_steps)
    print("TRAIN_TOKEN_ACCURACY", *results.train_stats.training["response"]["token_accuracy"])
    """
)


def train_and_record(tiny_model: Path, work: Path, speed: str, *extra: str) -> dict[str, list[str]]:
    """Run :data:`TRAIN_AND_RECORD_LOSSES` in a fresh process; its ``NAME value...`` lines by name."""
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_RECORD_LOSSES, str(tiny_model), str(work), "0", *extra],
                          env={**os.environ, "LUDWIG_MT_SPEEDUPS": speed}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("LOSSES", "TRAIN_TOKEN_ACCURACY", "AUTOCAST")}


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    """Ten real ``LudwigModel.train`` steps each: raw Ludwig, every speed-up on, and every speed-up on plus
    ``bf16_autocast`` forced on for the CPU."""
    work = tmp_path_factory.mktemp("train-speedups")
    return {"raw": train_and_record(tiny_model, work / "raw", "0"),
            "tuned": train_and_record(tiny_model, work / "tuned", "1"),
            "autocast": train_and_record(tiny_model, work / "autocast", "1", "autocast")}


@pytest.mark.slow
def test_ludwig_train_losses_match_with_and_without_speedups(trained) -> None:
    """End to end through Ludwig's trainer (10 optimizer steps, lr 0.01 so the steps move the weights): the
    per-step training losses with every speed-up on equal those of raw Ludwig's path. (Packing is compared with
    each row's own loss above: on rows of unequal length Ludwig's padded loss is not the reference.)"""
    losses = {name: [float(x) for x in trained[name]["LOSSES"]] for name in ("raw", "tuned")}
    for name in ("raw", "tuned"):
        # training-set metrics still get measured (tuned: on a no-grad sample of the lean steps' rows)
        accuracy = trained[name]["TRAIN_TOKEN_ACCURACY"]
        assert accuracy and all(0.0 <= float(a) <= 1.0 for a in accuracy), (name, accuracy)
    assert len(losses["raw"]) == len(losses["tuned"]) == 10, losses
    for raw, tuned in zip(losses["raw"], losses["tuned"]):
        assert abs(raw - tuned) < 1e-4, losses


@pytest.mark.slow
def test_bf16_autocast_step_through_ludwigs_trainer_stays_close_to_fp32(trained) -> None:
    """Through Ludwig's real trainer: every training forward ran under bf16 autocast with peft's input cast off
    (the no-grad metric-sample forwards are not recorded), and the 10 per-step losses stay within 2% of the same
    run in fp32 (the CPU base model is fp32 here, so autocast puts every matmul in bf16: a harsher change than on
    the GPU, where the base is bf16 already and only the adapter math moves to bf16)."""
    steps = trained["autocast"]["AUTOCAST"]
    assert len(steps) == 10 and set(steps) == {"True/False"}, steps
    assert trained["tuned"]["AUTOCAST"] == []
    fp32 = [float(x) for x in trained["tuned"]["LOSSES"]]
    bf16 = [float(x) for x in trained["autocast"]["LOSSES"]]
    assert len(bf16) == 10 and bf16 != fp32
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 2e-2, (fp32, bf16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour; GPU evidence: bench/train_speed.py")
def test_liger_kernels_change_nothing_without_cuda(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not speedups.liger_usable()
    assert speedups.apply_liger_kernels(model) is False
    assert "forward" not in vars(model.model.norm) and "forward" not in vars(model.model.layers[0].mlp)


# ------------------------------------------------------------------------------------------- lean_lora_forward
def lora_model(tiny_model: Path, dtype: torch.dtype = torch.float32):
    """The tiny Llama with peft LoRA (dropout 0.1, every linear layer of attention and MLP), B non-zero so the
    adapter term counts; the registry's patches applied (``lean_lora_forward`` among them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ludwig_mt.patches import registry

    registry.apply_all()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    return model


def lora_loss_and_grads(model, ids, *, lean: bool, monkeypatch, autocast: bool = False):
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "" if lean else "lean_lora_forward")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}


def counting_calls(monkeypatch, owner, name: str) -> list[int]:
    """A list that grows by one at every call of ``owner.name`` (still called) while the test runs."""
    calls: list[int] = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: calls.append(1) or original(*a))
    return calls


def counting_lean_calls(monkeypatch) -> list[int]:
    return counting_calls(monkeypatch, speedups, "lean_lora_forward")


def test_lean_lora_forward_gives_peft_loss_and_gradients_with_dropout(tiny_model: Path, monkeypatch) -> None:
    model = lora_model(tiny_model)
    model.train()
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    calls = counting_lean_calls(monkeypatch)
    ref_loss, ref_grads = lora_loss_and_grads(model, ids, lean=False, monkeypatch=monkeypatch)
    assert calls == []  # switched off: peft's own forward
    loss, grads = lora_loss_and_grads(model, ids, lean=True, monkeypatch=monkeypatch)
    assert len(calls) == 7 * model.config.num_hidden_layers  # every adapted layer took the lean path
    assert torch.allclose(loss, ref_loss, rtol=TOLERANCE)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), name
    torch.manual_seed(8)  # and the dropout really acts: another draw gives another loss
    assert not torch.equal(model(input_ids=ids, labels=ids).loss.detach(), loss)


def test_lean_lora_forward_under_bf16_autocast_stays_close_to_peft(tiny_model: Path, monkeypatch) -> None:
    """What the GPU runs: a bf16 base, fp32 adapters, bf16 autocast, peft's input cast off (``bf16_autocast``)."""
    model = lora_model(tiny_model, torch.bfloat16)
    model.train()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    calls = counting_lean_calls(monkeypatch)
    ref_loss, ref_grads = lora_loss_and_grads(model, ids, lean=False, monkeypatch=monkeypatch, autocast=True)
    loss, grads = lora_loss_and_grads(model, ids, lean=True, monkeypatch=monkeypatch, autocast=True)
    assert calls and torch.allclose(loss, ref_loss, rtol=1e-2)
    assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    for name, grad in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_lean_lora_forward_leaves_evaluation_and_mixed_dtypes_to_peft(tiny_model: Path, monkeypatch) -> None:
    model = lora_model(tiny_model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    calls = counting_lean_calls(monkeypatch)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == []  # predictions and eval scores stay on peft's forward, bit for bit
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)  # bf16 input, fp32 weights, no autocast
    assert speedups.lean_lora_adapter(layer, x, (), {}) is None
    assert speedups.lean_lora_adapter(layer, x.float(), (), {}) == "default"
    assert speedups.lean_lora_adapter(layer, x.float(), (), {"adapter_names": ["default"]}) is None
    assert speedups.base_layer(layer) is layer.get_base_layer() is layer.base_layer
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "lean_lora_forward")  # the cached switch follows the environment
    assert speedups.lean_lora_adapter(layer, x.float(), (), {}) is None
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "")
    assert speedups.lean_lora_adapter(layer, x.float(), (), {}) == "default"


@pytest.mark.parametrize("optimizer", ["PagedAdam", "Adam8bit"])
def test_bitsandbytes_optimizers_step_with_one_sync_and_the_same_updates(optimizer: str, monkeypatch) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.optim import optimizer as bnb_optimizer

    from ludwig_mt.patches import registry

    registry.apply_all()
    syncs: list[int] = []
    real_sync = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda p: (syncs.append(1), real_sync(p)))

    def train(one_sync: bool) -> tuple[list[torch.Tensor], int]:
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", "" if one_sync else "one_sync_optimizer_step")
        syncs.clear()
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(4)]  # 4096: 8-bit state is blockwise
        opt = getattr(bnb.optim, optimizer)(params, lr=1e-2)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn_like(param)
            opt.step()
        return [param.detach().clone() for param in params], len(syncs)

    reference, reference_syncs = train(one_sync=False)
    updated, n_syncs = train(one_sync=True)
    assert reference_syncs >= 3 * 4  # bitsandbytes as released: after every parameter of every step
    assert n_syncs == 3  # one per step
    assert all(torch.equal(a, b) for a, b in zip(updated, reference))


def test_a_padding_free_step_is_one_sequence_with_the_packed_loss_and_gradients(llm, monkeypatch) -> None:
    """``LUDWIG_MT_PACK_LENGTH=varlen``: the step's rows as one unpadded sequence with their offsets, attended to
    row by row (``varlen_attention``): the loss and gradients of the power-of-two packs."""
    from ludwig_mt.patches import varlen_attention

    monkeypatch.setenv(speedups.ENV_PACK_LENGTH, "varlen")
    speedups.use_varlen_attention(speedups.base_causal_lm(llm.model))  # the loader's after-load hook, opted in
    assert llm.model.config._attn_implementation == varlen_attention.NAME
    batch = ludwig_batch(llm.tokenizer, [12, 20, 7, 15], [5, 9, 3, 11])
    monkeypatch.delenv(speedups.ENV_PACK_LENGTH, raising=False)
    packed, packed_grads, _ = loss_and_grads(llm, batch, lean=True, packing=True)
    monkeypatch.setenv(speedups.ENV_PACK_LENGTH, "varlen")
    llm.config_obj.trainer.packing = True
    try:
        free = speedups.lean_training_batch(llm, batch[0]["prompt"], batch[1]["response"])
    finally:
        llm.config_obj.trainer.packing = False
    assert free["input_ids"].shape == (1, 30 + 27 + 18 + 11)  # rows of 12+5+1+... tokens: no padding at all
    assert free["cu_seq_lens"].tolist() == [0, 18, 48, 59, 86] and free["max_length"] == 30
    loss, grads, _ = loss_and_grads(llm, batch, lean=True, packing=True)
    assert abs(loss - packed) < TOLERANCE, (loss, packed)
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, packed_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_padding_free_batch_is_refused_by_a_model_with_other_attention(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    rows = [(torch.arange(3, 9), 2), (torch.arange(3, 7), 1)]
    batch = speedups.padding_free_batch(rows, pad_id=0)
    with pytest.raises(WorkflowError, match="padding-free training batch needs the ludwig_mt_varlen attention.*Fix"):
        speedups.target_only_loss(model, batch)


def test_padding_free_steps_are_the_default_only_where_the_flash_kernel_takes_them(tiny_model, monkeypatch) -> None:
    """Unset, ``LUDWIG_MT_PACK_LENGTH`` means padding-free steps on a CUDA GPU whose flash kernel takes the model's
    (bf16) steps, and the power-of-two packs anywhere else: a default must never fall back to attending row by row.
    ``pow2`` asks for the packs on the GPU too; ``varlen`` asks for padding-free steps anywhere."""
    from transformers import AutoModelForCausalLM

    from ludwig_mt.patches import varlen_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H200's
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.bfloat16)
    assert not speedups.padding_free_step(model, "", cuda)  # SDPA would attend across the rows
    assert varlen_attention.use_varlen_attention(model)
    assert speedups.padding_free_step(model, "", cuda)
    assert not speedups.padding_free_step(model, "", cpu)
    assert not speedups.padding_free_step(model, "pow2", cuda) and not speedups.padding_free_step(model, "512", cuda)
    assert speedups.padding_free_step(model, "varlen", cpu)  # asked for: row by row there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # no flash kernel (Turing)
    assert not speedups.padding_free_step(model, "", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not speedups.padding_free_step(model.float(), "", cuda)  # fp32 steps: no flash kernel


def test_the_varlen_attention_is_loaded_by_default_on_a_cuda_machine_only(tiny_model, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from ludwig_mt.patches import varlen_attention

    def loaded(setting: str, cuda: bool) -> str:
        monkeypatch.setenv(speedups.ENV_PACK_LENGTH, setting)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
        speedups.use_varlen_attention(model)
        return model.config._attn_implementation

    assert loaded("", cuda=True) == varlen_attention.NAME
    assert loaded("", cuda=False) == "sdpa"
    assert loaded("pow2", cuda=True) == "sdpa"
    assert loaded("varlen", cuda=False) == varlen_attention.NAME


@pytest.mark.parametrize("target_len, prediction_len", [(7, 5), (5, 7), (6, 6)])
def test_metric_alignment_gives_ludwigs_tensors_without_copying_the_logits(target_len: int, prediction_len: int) -> None:
    """``realign_without_copies``: the targets and predictions Ludwig's alignment returns, equal tensor for tensor,
    the inputs untouched, and whatever needs no padding shared rather than deep-copied (Ludwig copied the float32
    logits and probabilities over the vocabulary every time)."""
    import types

    from ludwig.constants import LOGITS, PREDICTIONS, PROBABILITIES
    from ludwig.models import llm as ludwig_llm

    from ludwig_mt.patches import registry

    registry.apply_all()
    original = core.original(speedups.REALIGN)
    assert ludwig_llm.get_realigned_target_and_prediction_tensors_for_inference is not original  # patched
    tokenizer = types.SimpleNamespace(pad_token_id=None, eos_token_id=2)
    torch.manual_seed(0)
    logits = torch.randn(3, prediction_len, 11)
    targets = {"response": torch.randint(3, 11, (3, target_len))}
    predictions = {"response": {PREDICTIONS: logits.argmax(-1), PROBABILITIES: logits.softmax(-1), LOGITS: logits}}
    before = {k: v.clone() for k, v in predictions["response"].items()}
    ours_t, ours_p = speedups.realigned_without_copies(targets, predictions, "response", tokenizer)
    ludwig_t, ludwig_p = original(targets, predictions, "response", tokenizer)
    torch.testing.assert_close(ours_t["response"], ludwig_t["response"], rtol=0, atol=0)
    for key in (PREDICTIONS, PROBABILITIES, LOGITS):
        torch.testing.assert_close(ours_p["response"][key], ludwig_p["response"][key], rtol=0, atol=0)
        assert torch.equal(predictions["response"][key], before[key])  # inputs untouched
    assert ours_p["response"][PREDICTIONS].shape[1] == ours_t["response"].shape[1] == max(target_len, prediction_len)
    if target_len < prediction_len:  # the targets were padded: the predictions, logits and all, are the inputs'
        assert ours_p["response"][LOGITS] is logits and ludwig_p["response"][LOGITS] is not logits
    if target_len > prediction_len:  # the predictions were padded: the targets are the inputs'
        assert ours_t["response"] is targets["response"] and ludwig_t["response"] is not targets["response"]
    if target_len != prediction_len:
        assert ours_p is not predictions and ours_t is not targets  # new dicts: Ludwig's callers may set keys
