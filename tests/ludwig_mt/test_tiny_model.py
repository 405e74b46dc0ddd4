"""The tiny offline model is a real transformers causal LM with a usable tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def test_tiny_model_loads_and_generates(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "</s>"
    ids = tokenizer("SELECT name FROM singer", return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == "SELECT name FROM singer"  # byte-level BPE round-trips
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # stays tiny: seconds on CPU


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ludwig_mt.tiny_model import build_tiny_llama

    a = load_file(build_tiny_llama(tmp_path / "a") / "model.safetensors")
    b = load_file(build_tiny_llama(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
