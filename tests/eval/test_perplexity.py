"""eval.perplexity: lower on text the model learned than on random text; batching and padding change nothing."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
import torch

from eval.generate import GenerationSettings, LoadedModel, load_base_model
from eval.perplexity import DEFAULT_PROBE, PROBE_DIR, PROBES, perplexity, text_nll, token_rows
from eval.runner import read_probe
from ludwig_mt.errors import WorkflowError

OWN_TEXT = [
    "SELECT name FROM head WHERE age > 56 ORDER BY age DESC LIMIT 1",
    "How many heads of the departments are older than 56 ?",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Summarize the dialogue. Amanda: I baked cookies. Do you want some? Jerry: Sure!",
]


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> LoadedModel:
    return load_base_model(str(tiny_model), GenerationSettings(max_input_tokens=256, max_new_tokens=8),
                           device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_model: Path) -> LoadedModel:
    """The tiny model after a few dozen full-batch steps on OWN_TEXT (seconds on CPU)."""
    loaded = load_base_model(str(tiny_model), GenerationSettings(max_input_tokens=256, max_new_tokens=8),
                             device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    batch = tok(OWN_TEXT, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    return loaded


def random_texts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [t for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens]
    return [tokenizer.convert_tokens_to_string([rng.choice(vocab) for _ in range(tokens)]) for _ in range(n)]


def test_perplexity_is_lower_on_learned_text_than_on_random_text(trained: LoadedModel) -> None:
    own = perplexity(trained, OWN_TEXT)
    rand = perplexity(trained, random_texts(trained.tokenizer, 4, 20))
    assert own < 5 < 10 * own < rand


def test_batching_and_padding_do_not_change_perplexity(base: LoadedModel) -> None:
    texts = [*OWN_TEXT, "x y", *random_texts(base.tokenizer, 3, 30, seed=1)]  # very different lengths
    one = perplexity(base, texts, batch_size=1)
    four = perplexity(base, texts, batch_size=4)
    assert abs(one - four) / one < 1e-4


def test_perplexity_is_the_exp_of_the_token_weighted_mean_nll(base: LoadedModel) -> None:
    rows = token_rows(base.tokenizer, OWN_TEXT[:2], 512)
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            loss = base.model(input_ids=ids, labels=ids).loss.item()  # mean over len(row) - 1 targets
            total, count = total + loss * (len(row) - 1), count + len(row) - 1
    assert perplexity(base, OWN_TEXT[:2]) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_text_nll_is_per_text_in_order_and_independent_of_batching(base: LoadedModel) -> None:
    texts = [OWN_TEXT[0], "x", *OWN_TEXT[1:3]]  # "x" is too short to predict anything
    one, three = text_nll(base, texts, batch_size=1), text_nll(base, texts, batch_size=3)
    assert one.tokens[1] == 0 and one.nll[1] == 0.0
    assert list(one.tokens) == [len(r) - 1 if len(r) >= 2 else 0 for r in token_rows(base.tokenizer, texts, 512)]
    assert one.nll == pytest.approx(three.nll, rel=1e-4) and one.tokens == three.tokens
    alone = text_nll(base, [OWN_TEXT[1]])
    assert alone.nll[0] == pytest.approx(one.nll[2], rel=1e-4)
    assert one.perplexity == pytest.approx(perplexity(base, texts), rel=1e-6)


def test_max_tokens_cuts_each_text(base: LoadedModel) -> None:
    long = [" ".join(OWN_TEXT * 3)]
    assert perplexity(base, long, max_tokens=8) == pytest.approx(perplexity(base, [OWN_TEXT[0]], max_tokens=8))


def test_no_usable_text_is_a_clear_error(base: LoadedModel) -> None:
    with pytest.raises(WorkflowError, match="no text with at least 2 tokens"):
        perplexity(base, ["", ""])


def test_shipped_probes_are_large_enough_and_their_sources_and_licences_are_named() -> None:
    general, stories, quick = (read_probe(PROBES[name]) for name in ("general", "tinystories", "quick"))
    assert DEFAULT_PROBE == PROBES["general"]
    assert len(general.texts) >= 200 and len(stories.texts) >= 200 and len(quick.texts) == 10
    assert all(len(t.split()) >= 25 for t in general.texts + stories.texts)
    assert len(set(general.texts)) == len(general.texts)
    readme = (PROBE_DIR / "README.md").read_text(encoding="utf-8")
    for path, licence in ((PROBES["general"], "CC BY-SA 3.0"), (PROBES["tinystories"], "CDLA-Sharing-1.0")):
        assert f"`{path.name}`" in readme and licence in readme
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme  # the file is the one described
