"""eval.detox: the toxicity classifier (training, held-out accuracy, cache), SIM with the bundled MiniLM, J."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval.detox import load_encoder, load_or_train_classifier, score_detox, similarity, train_classifier
from eval.text import bleu, chrf
from ludwig_mt.ludwig_fixes import WorkflowError

SUBJECTS = ("you", "he", "she", "they", "my neighbour", "the manager", "this guy", "that politician")
ACTIONS = ("talks about the weather", "wrote the report", "runs the shop", "answered the phone", "cooks dinner")
INSULTS = ("stupid idiot", "damn moron", "fucking clown", "dumb loser", "pathetic jerk")

NEUTRAL_OUTPUTS = ["the teacher explained the lesson", "my neighbour wrote the report", "they cook dinner well"]
TOXIC_OUTPUTS = ["you stupid idiot", "what a fucking moron", "shut up you dumb loser"]


def detox_pairs() -> list[tuple[str, str]]:
    """(toxic, neutral) pairs in ParaDetox's shape: the rewrite keeps the content and drops the insult."""
    return [(f"{subject} {action}, what a {insult}", f"{subject} {action}")
            for subject, action, insult in itertools.product(SUBJECTS, ACTIONS, INSULTS)]


def write_prepared_detox(root: Path) -> Path:
    """``<root>/detox/{train,test}.csv`` as `python -m prep detox` writes them (the columns eval reads)."""
    pairs = detox_pairs()
    held_out = pairs[::10]
    train = [p for p in pairs if p not in held_out]
    folder = root / "detox"
    folder.mkdir(parents=True)
    pd.DataFrame({"source": [t for t, _ in train], "response": [n for _, n in train],
                  "split": ["1" if i % 9 == 0 else "0" for i in range(len(train))]}).to_csv(folder / "train.csv",
                                                                                           index=False)
    pd.DataFrame({"source": [t for t, _ in held_out], "response": [n for _, n in held_out],
                  "references": [json.dumps([n, n.capitalize() + "."]) for _, n in held_out]}).to_csv(
        folder / "test.csv", index=False)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared_detox(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def classifier(prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_or_train_classifier(prepared / "detox", tmp_path_factory.mktemp("work") / "toxicity.joblib")


def test_classifier_separates_toxic_from_neutral(classifier) -> None:
    assert classifier.heldout_accuracy >= 0.9
    assert not classifier.is_toxic(NEUTRAL_OUTPUTS).any()
    assert classifier.is_toxic(TOXIC_OUTPUTS).all()
    assert classifier.n_train > 0 and classifier.train_seconds < 30


def test_classifier_is_cached_and_retrained_when_the_data_changes(prepared: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache" / "toxicity.joblib"
    first = load_or_train_classifier(prepared / "detox", cache)
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files left

    def no_training(*_args, **_kwargs):
        raise AssertionError("retrained although the cache matches")

    monkeypatch.setattr("eval.detox.train_classifier", no_training)
    assert load_or_train_classifier(prepared / "detox", cache).fingerprint == first.fingerprint
    monkeypatch.undo()

    changed = tmp_path / "changed"
    write_prepared_detox(changed)
    with (changed / "detox" / "train.csv").open("a", encoding="utf-8") as fh:
        fh.write("you are a silly goose,you are a goose,0\n")
    retrained = load_or_train_classifier(changed / "detox", cache)
    assert retrained.fingerprint != first.fingerprint

    cache.write_bytes(b"not a pickle")
    assert load_or_train_classifier(changed / "detox", cache).fingerprint == retrained.fingerprint


def test_missing_prepared_data_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="pass prepared_dir"):
        load_or_train_classifier(tmp_path / "detox", tmp_path / "c.joblib")


def test_train_split_only(tmp_path: Path) -> None:
    """Rows of split 1 (validation) must not be trained on: with only validation rows there is nothing to fit."""
    folder = write_prepared_detox(tmp_path) / "detox"
    train = pd.read_csv(folder / "train.csv", dtype=str)
    train.assign(split="1").to_csv(folder / "train.csv", index=False)
    with pytest.raises(WorkflowError, match="split 0"):
        train_classifier(folder / "train.csv", folder / "test.csv")


@pytest.fixture(scope="module")
def encoder():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: a download attempt would fail here
    return load_encoder()  # the same (cached) instance score_task uses


def test_similarity_identical_is_one_and_unrelated_is_lower(encoder) -> None:
    sources = ["the weather is lovely today", "the weather is lovely today", "the weather is lovely today"]
    outputs = ["the weather is lovely today", "today the weather is very nice", "quarterly tax filings are due"]
    sim = similarity(encoder, sources, outputs)
    assert sim[0] == pytest.approx(1.0, abs=1e-4)
    assert sim[2] < sim[1] < sim[0]
    assert sim[2] < 0.5
    assert similarity(encoder, ["some text"], [""])[0] == 0.0


class FixedEncoder:
    """Texts -> given unit vectors, so SIM is known exactly for the J hand case."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = {text: np.array(v) / np.linalg.norm(v) for text, v in vectors.items()}

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def test_j_hand_case(classifier) -> None:
    sources = ["src one", "src two", "src three", "src four"]
    outputs = ["he runs the shop", "you stupid idiot", "she cooks dinner", ""]
    encoder = FixedEncoder({
        "src one": [1, 0], "he runs the shop": [1, 0],  # SIM 1, neutral
        "src two": [1, 0], "you stupid idiot": [1, 0],  # SIM 1, toxic -> contributes 0 to J
        "src three": [1, 0], "she cooks dinner": [0.6, 0.8],  # SIM 0.6, neutral
        "src four": [0, 1], "": [0, 1],  # empty output: STA = SIM = 0
    })
    refs = [[o or "x"] for o in outputs]
    scores = score_detox(sources, outputs, refs, classifier, encoder)
    assert scores.per_row["STA"] == [1.0, 0.0, 1.0, 0.0]
    assert scores.per_row["SIM"] == pytest.approx([1.0, 1.0, 0.6, 0.0])
    assert scores.per_row["J"] == pytest.approx([1.0, 0.0, 0.6, 0.0])
    assert scores.metrics["STA"] == pytest.approx(2 / 4)
    assert scores.metrics["SIM"] == pytest.approx((1 + 1 + 0.6 + 0) / 4)
    assert scores.metrics["J"] == pytest.approx((1 * 1 + 0 * 1 + 1 * 0.6 + 0) / 4)
    assert scores.settings == {"classifier_heldout_accuracy": classifier.heldout_accuracy,
                               "J_includes_fluency": False, "n": 4}
    assert set(scores.metrics) == {"STA", "SIM", "J", "chrF", "BLEU"}  # settings are not scores


def test_score_detox_with_the_real_encoder(classifier, encoder) -> None:
    sources = [t for t, _ in detox_pairs()[:6]]
    rewrites = [n for _, n in detox_pairs()[:6]]
    refs = [[r, r + "."] for r in rewrites]
    oracle = score_detox(sources, rewrites, refs, classifier, encoder).metrics
    copy = score_detox(sources, sources, refs, classifier, encoder).metrics
    assert oracle["STA"] == 1.0 and copy["STA"] == 0.0 and copy["J"] == 0.0
    assert copy["SIM"] == pytest.approx(1.0, abs=1e-4)
    assert 0.5 < oracle["SIM"] < copy["SIM"]
    assert oracle["chrF"] == pytest.approx(chrf(rewrites, refs)) == pytest.approx(100.0)
    assert copy["BLEU"] == pytest.approx(bleu(sources, refs))
    assert copy["BLEU"] < 100.0
    empty = score_detox(sources, [""] * 6, refs, classifier, encoder).metrics
    assert (empty["STA"], empty["SIM"], empty["J"], empty["chrF"], empty["BLEU"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    # Only punctuation (e.g. Ludwig's '!' padding) says nothing either: no style-transfer credit for it.
    bangs = score_detox(sources, ["!!!!"] * 6, refs, classifier, encoder).per_row
    assert bangs["STA"] == [0.0] * 6 and bangs["SIM"] == [0.0] * 6 and bangs["J"] == [0.0] * 6
