"""Perplexity on general text: the task-free view of what fine-tuning made a model forget.

A model that got better at SQL but whose perplexity on ordinary English rose has lost general skill. The
probe set is configurable (``--probe NAME|FILE`` in ``python -m eval``); the shipped probes are in ``eval/probes``
with their sources and licences (``eval/probes/README.md``): ``general`` (:data:`DEFAULT_PROBE`, 416 WikiText-2 test
paragraphs), ``tinystories`` (378 TinyStories validation stories: the own domain of TinyStories models) and
``quick`` (10 paragraphs, a smoke test only). The report recommends a probe from the base model's own domain.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.generate import LoadedModel
from ludwig_mt.errors import WorkflowError

PROBE_DIR = Path(__file__).with_name("probes")
#: Shipped probes by name: paragraphs separated by blank lines, one text each (see eval/probes/README.md).
PROBES = {"general": PROBE_DIR / "wikitext2_test.txt", "tinystories": PROBE_DIR / "tinystories_valid.txt",
          "quick": PROBE_DIR / "quick.txt"}
#: The default probe: general English that can carry a conclusion (416 texts).
DEFAULT_PROBE = PROBES["general"]


def token_rows(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text as the model sees it (the tokenizer's special tokens, e.g. BOS), cut to ``max_tokens``."""
    return [list(tokenizer(str(t), truncation=True, max_length=max_tokens)["input_ids"]) for t in texts]


@dataclass(frozen=True)
class TextNLL:
    """Summed next-token negative log-likelihood and predicted-token count of each text, in the probe's order.

    Kept per text (not only the total) so the report can bootstrap over texts: perplexity is
    exp(sum nll / sum tokens), and the same texts give a paired change between two models.
    """

    nll: tuple[float, ...]
    tokens: tuple[int, ...]

    @property
    def perplexity(self) -> float:
        return math.exp(math.fsum(self.nll) / sum(self.tokens))


def _batches(rows: Sequence[Sequence[int]], size: int) -> Iterator[list[int]]:
    """Indices of the rows with at least 2 tokens, longest first (similar lengths pad little), in batches."""
    ordered = sorted((i for i, r in enumerate(rows) if len(r) >= 2), key=lambda i: len(rows[i]), reverse=True)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def _batch_nll(model, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[float], list[int]]:
    """Summed next-token negative log-likelihood (float32) and the number of predicted tokens of each row.

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
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (rows, width-1)
    return [float(v) for v in nll.sum(dim=1)], [int(v) for v in (targets != -100).sum(dim=1)]


def text_nll(loaded: LoadedModel, texts: Sequence[str], *, max_tokens: int = 512, batch_size: int = 8,
             progress: bool = False) -> TextNLL:
    """Per-text summed NLL and token counts over ``texts``, each cut to ``max_tokens``; padding excluded. A text
    of fewer than 2 tokens predicts nothing: (0.0, 0)."""
    import torch
    from tqdm.auto import tqdm

    rows = token_rows(loaded.tokenizer, texts, max_tokens)
    if not any(len(r) >= 2 for r in rows):
        raise WorkflowError("perplexity: no text with at least 2 tokens. Fix: pass a probe of real paragraphs")
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll, tokens = [0.0] * len(rows), [0] * len(rows)
    with torch.inference_mode():
        for batch in tqdm(list(_batches(rows, max(1, batch_size))), desc=f"perplexity {loaded.name}",
                          unit="batch", file=sys.stderr, disable=not progress, leave=False):
            batch_nll, batch_tokens = _batch_nll(loaded.model, [rows[i] for i in batch], pad_id)
            for i, value, count in zip(batch, batch_nll, batch_tokens, strict=True):
                nll[i], tokens[i] = value, count
    return TextNLL(tuple(nll), tuple(tokens))


def perplexity(loaded: LoadedModel, texts: Sequence[str], *, max_tokens: int = 512, batch_size: int = 8,
               progress: bool = False) -> float:
    """exp(token-weighted mean next-token NLL) over ``texts``, each cut to ``max_tokens``; padding excluded."""
    return text_nll(loaded, texts, max_tokens=max_tokens, batch_size=batch_size, progress=progress).perplexity
