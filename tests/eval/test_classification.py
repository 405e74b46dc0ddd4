"""eval.classification: banking77 intent scoring (vs sklearn) and CommonsenseQA letter parsing."""

from __future__ import annotations

import pytest
from sklearn.metrics import accuracy_score, f1_score

from eval.classification import (
    INVALID,
    label_lookup,
    parse_choice,
    parse_label,
    score_choices,
    score_labels,
)
from ludwig_mt.errors import WorkflowError
from prep.banking77 import INTENTS


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("C", "C"),
        ("c", "C"),
        ("  B.  ", "B"),
        ("(D)", "D"),
        ("E)", "E"),
        ("a:", "A"),
        ("C. bank", "C"),
        ("(B) the river bank", "B"),
        ("The answer is D", "D"),
        ("I think the answer is (E).", "E"),
        ("Answer: B\nBecause A is wrong", "B"),
        ("Both B and C fit", "B"),
        ("", None),
        ("   ", None),
        ("I don't know", None),
        ("Fish", None),  # a capital inside a word is no answer
        ("F", None),
        ("the answer is b", None),  # lower-case letters count only when the whole answer is that letter
        ("ABCDE", None),
    ],
)
def test_parse_choice_table(answer: str, letter: str | None) -> None:
    assert parse_choice(answer) == letter


def test_score_choices_hand_case() -> None:
    scores = score_choices(["A", "b.", "The answer is C", "", "nonsense"], ["A", "B", "D", "E", "A"])
    assert scores == {"accuracy": pytest.approx(2 / 5), "invalid": pytest.approx(2 / 5), "n": 5}
    assert score_choices([None, 3], ["A", "B"])["accuracy"] == 0.0  # not strings: wrong, no crash
    assert score_choices([], []) == {"accuracy": 0.0, "invalid": 0.0, "n": 0}


def test_banking77_intents_are_distinct_after_normalisation() -> None:
    assert len(label_lookup(INTENTS)) == 77


@pytest.mark.parametrize(
    ("answer", "intent"),
    [
        ("card_arrival", "card_arrival"),
        ("  Card_Arrival.\nThe customer asks about...", "card_arrival"),
        ("`card_arrival`", "card_arrival"),
        ("refund_not_showing_up", "Refund_not_showing_up"),
        ("reverted_card_payment?", "reverted_card_payment?"),
        ("reverted_card_payment", "reverted_card_payment?"),
        ("card arrival", None),
        ("The intent is card_arrival", None),
        ("", None),
    ],
)
def test_parse_label(answer: str, intent: str | None) -> None:
    assert parse_label(answer, label_lookup(INTENTS)) == intent


def test_banking77_scores_equal_sklearn() -> None:
    gold = ["card_arrival", "card_arrival", "age_limit", "Refund_not_showing_up", "top_up_limits", "age_limit"]
    answers = ["card_arrival", "age_limit", "AGE_LIMIT", "refund_not_showing_up", "topup limits?", ""]
    canonical = ["card_arrival", "age_limit", "age_limit", "Refund_not_showing_up", INVALID, INVALID]
    scores = score_labels(answers, gold, INTENTS)
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, canonical)) == pytest.approx(3 / 6)
    expected_f1 = f1_score(gold, canonical, labels=list(INTENTS), average="macro", zero_division=0)
    assert scores["macro_f1"] == pytest.approx(expected_f1)
    assert scores["invalid"] == pytest.approx(2 / 6)
    assert scores["n"] == 6


def test_banking77_macro_f1_hand_case() -> None:
    # Two labels present; per-label F1: card_arrival 2/3 (P 1, R 1/2), age_limit 2/3 (P 1/2, R 1); the other 75
    # labels score 0, so macro-F1 over all 77 intents = (2/3 + 2/3) / 77.
    scores = score_labels(["card_arrival", "age_limit", "age_limit"], ["card_arrival", "card_arrival", "age_limit"],
                          INTENTS)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 77)


def test_invalid_gold_label_is_a_clear_error() -> None:
    with pytest.raises(WorkflowError, match="row 3: gold label 'not_an_intent'"):
        score_labels(["card_arrival", "card_arrival"], ["card_arrival", "not_an_intent"], INTENTS)


def test_empty_predictions_are_wrong() -> None:
    scores = score_labels(["", None], ["card_arrival", "age_limit"], INTENTS)
    assert scores == {"accuracy": 0.0, "macro_f1": 0.0, "invalid": 1.0, "n": 2}
