"""Perplexity on general text: the task-free view of what fine-tuning made a model forget.

A model that got better at SQL but whose perplexity on ordinary English rose has lost general skill. The
probe set is configurable (``--probe FILE`` in ``python -m eval``); :data:`DEFAULT_PROBE` is a small text
written for this project (general English paragraphs, no dataset copied), so it works offline. Use a larger
held-out general corpus (e.g. TinyStories-style text) for real runs; the report names the probe it used.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from eval.generate import LoadedModel
from ludwig_mt.errors import WorkflowError

#: The built-in probe: paragraphs separated by blank lines, one document each.
DEFAULT_PROBE = Path(__file__).with_name("probe_general.txt")


def token_rows(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text as the model sees it (the tokenizer's special tokens, e.g. BOS), cut to ``max_tokens``."""
    return [list(tokenizer(str(t), truncation=True, max_length=max_tokens)["input_ids"]) for t in texts]


def _batches(rows: Sequence[Sequence[int]], size: int) -> Iterator[list[Sequence[int]]]:
    ordered = sorted((r for r in rows if len(r) >= 2), key=len, reverse=True)  # similar lengths pad little
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def _batch_nll(model, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float32) and the number of predicted tokens of one batch.

    Right padding with an attention mask: a causal model's real positions never attend to later pads, and
    padded targets are excluded, so the result does not depend on how texts are batched.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return float(nll), int((targets != -100).sum())


def perplexity(loaded: LoadedModel, texts: Sequence[str], *, max_tokens: int = 512, batch_size: int = 8,
               progress: bool = False) -> float:
    """exp(token-weighted mean next-token NLL) over ``texts``, each cut to ``max_tokens``; padding excluded."""
    import torch
    from tqdm.auto import tqdm

    rows = token_rows(loaded.tokenizer, texts, max_tokens)
    if not any(len(r) >= 2 for r in rows):
        raise WorkflowError("perplexity: no text with at least 2 tokens. Fix: pass a probe of real paragraphs")
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(list(_batches(rows, max(1, batch_size))), desc=f"perplexity {loaded.name}",
                          unit="batch", file=sys.stderr, disable=not progress, leave=False):
            nll, n = _batch_nll(loaded.model, batch, pad_id)
            total, count = total + nll, count + n
    return math.exp(total / count)
