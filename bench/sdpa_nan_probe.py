"""Does SDPA itself give NaN gradients on SmolLM2's attention shapes with left padding? (issue #13's NaN)

Random-weight Llama with SmolLM2-135M's attention (9 heads, 3 KV heads, head_dim 64), 4 layers, bf16, a batch of
64 left-padded rows of samsum-like lengths (100-720 tokens) with the padding masked; one forward/backward per
attention implementation; prints whether the loss or any gradient is NaN. No Ludwig, no model files.
Device call: "python3 bench/sdpa_nan_probe.py" (about a minute). Here: "python bench/sdpa_nan_probe.py --device cpu
--rows 4" checks the plumbing. Ran on the H200 (bench/results/sdpa_nan_probe-h200.txt, torch 2.11, transformers
5.17): no NaN loss or gradient with SDPA or eager at any of the three length ranges, losses equal to 4 digits, so
left padding through SDPA's kernels does not by itself explain the study's NaN (it began at step 2, after the first
update, on the real 4-bit weights); the cause is still open.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def batch(rows: int, low: int, high: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (rows,), generator=gen)
    width = int(lengths.max())
    ids = torch.full((rows, width), 2, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n:] = 1
        labels[i, width - min(n, 79):] = ids[i, width - min(n, 79):]
    return ids, mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=2)
    for low, high in ((100, 720), (30, 496), (400, 470)):
        ids, mask, labels = (t.to(args.device) for t in batch(args.rows, low, high, config.vocab_size, 0))
        for impl in ("sdpa", "eager"):
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(config, attn_implementation=impl, dtype=torch.bfloat16).to(args.device)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            print(f"lengths {low}-{high} {impl:5s} loss {out.loss.item():.4f} nan-grad params {len(bad)} "
                  f"{bad[:2]}", flush=True)
            del model, out
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
