"""``varlen_attention``: padding-free rows attend only to themselves, as packed SDPA with a block mask does."""

from __future__ import annotations

import pytest
import torch

from ludwig_mt.patches import varlen_attention

LENGTHS = [5, 9, 3, 7]


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """``[1, 1, T, T]``: a token attends to the tokens of its own row up to itself (what transformers builds for
    a packed sequence)."""
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(row.shape[0])
    return ((row[:, None] == row[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]


def qkv(heads: int = 4, key_heads: int = 2, size: int = 8, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    return [torch.randn(1, h, total, size, generator=gen, requires_grad=requires_grad)
            for h in (heads, key_heads, key_heads)]


class GroupedAttention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_rows_attend_to_themselves_as_packed_sdpa_with_a_block_mask_and_copied_key_heads() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv(requires_grad=True)
    ref, _ = sdpa_attention_forward(GroupedAttention(), q, k, v, block_causal_mask(LENGTHS), scaling=0.3)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out, weights = varlen_attention.attention_forward(
        GroupedAttention(), q, k, v, varlen_attention.no_mask("cpu"), scaling=0.3,
        cu_seq_lens_q=varlen_attention.row_offsets(LENGTHS), max_length_q=max(LENGTHS))
    assert weights is None and out.shape == ref.shape == (1, sum(LENGTHS), 4, 8)
    torch.testing.assert_close(out, ref)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for grad, ref_grad in zip((q.grad, k.grad, v.grad), ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad)


def test_without_row_offsets_it_is_transformers_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    mask = block_causal_mask(LENGTHS)
    ours, _ = varlen_attention.attention_forward(GroupedAttention(), q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(ours, sdpa_attention_forward(GroupedAttention(), q, k, v, mask, scaling=0.3)[0])


def test_the_empty_mask_of_a_padding_free_batch_fails_any_other_attention() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    with pytest.raises(RuntimeError):
        sdpa_attention_forward(GroupedAttention(), q, k, v, varlen_attention.no_mask("cpu"))


def test_row_offsets_are_cumulative_int32() -> None:
    offsets = varlen_attention.row_offsets(LENGTHS)
    assert offsets.tolist() == [0, 5, 14, 17, 24] and offsets.dtype == torch.int32


def test_a_loaded_sdpa_model_attends_with_the_registered_function_outside_a_window(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    assert not varlen_attention.supported(model)
    assert varlen_attention.use_varlen_attention(model) and varlen_attention.supported(model)
    assert model.config._attn_implementation == varlen_attention.NAME
    assert not varlen_attention.use_varlen_attention(model)  # once
    model.config.sliding_window = 64
    assert not varlen_attention.supported(model)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    assert not varlen_attention.use_varlen_attention(eager) and eager.config._attn_implementation == "eager"


def test_left_padded_generation_with_the_registered_attention_is_sdpas(tiny_model) -> None:
    """On a CUDA machine every model Ludwig loads attends with :data:`NAME` (evaluation, ``ludwig predict``, the
    eval harness's generation): outside padding-free steps it must be SDPA, mask and cache included."""
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    assert varlen_attention.use_varlen_attention(ours)
    ids = torch.tensor([[0, 0, 5, 9, 14, 3], [7, 2, 11, 4, 8, 6]])  # the first row left-padded (pad id 0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False,
                  "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}
        a, b = ours.generate(**kwargs), sdpa.generate(**kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
