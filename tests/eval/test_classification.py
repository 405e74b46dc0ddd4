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
        ("[B]", "B"),
        ("a:", "A"),
        ("C. bank", "C"),
        ("(B) the river bank", "B"),
        ("The answer is D", "D"),
        ("I think the answer is (E).", "E"),
        ("Answer: B\nBecause A is wrong", "B"),
        ("Option E", "E"),
        ("E is correct", "E"),
        ("C\n### Question: next one\n### Answer:\nD", "C"),  # the model went on to write a new prompt
        ("", None),
        ("   ", None),
        ("I don't know", None),
        ("Fish", None),  # a capital inside a word is no answer
        ("E-mail", None),
        ("F", None),
        ("ABCDE", None),
        ("I think so\n### Answer:\nD", None),  # after '###' is a new prompt, not this answer
        ("the answer is a bank", None),  # lower-case 'a' before a word is the article
        ("A bank", None),  # 'A' + lower-case word may be the article: no letter for sure
        # Changed on purpose (issue #12): an explicit statement with a lone lower-case letter names it.
        ("the answer is b", "B"),
        ("answer: (c)", "C"),
        # Two different options named: never the first letter (issue #12). 'Both B and C fit' was scored B.
        ("Both B and C fit", None),
        ("B or C", None),
        ("A and C", None),
        ("(A) or (B)", None),
        ("A/B", None),
        ("The answer is (A) or (B)", None),
        ("C, not A", None),
        ("The answer is B. The answer is C.", None),
        # ... unless an explicit statement names exactly one.
        ("Not A, the answer is B", "B"),
        ("The answer is B, not C", "B"),
        # A right letter followed by '!' (a model's, or Ludwig's id-0 padding) or other punctuation is right.
        ("C!", "C"),
        ("c!!!!!!", "C"),
        ("(D)!!", "D"),
        ("D.!", "D"),
        ("A", "A"),
        ("A. bank!!", "A"),
    ],
)
def test_parse_choice_table(answer: str, letter: str | None) -> None:
    assert parse_choice(answer) == letter


def test_score_choices_hand_case() -> None:
    scores = score_choices(["A", "b.", "The answer is C", "", "nonsense"], ["A", "B", "D", "E", "A"])
    assert scores.per_row == {"accuracy": [1.0, 1.0, 0.0, 0.0, 0.0], "invalid": [0.0, 0.0, 0.0, 1.0, 1.0]}
    assert scores.metrics == {"accuracy": pytest.approx(2 / 5), "invalid": pytest.approx(2 / 5)}
    assert scores.settings == {"n": 5}
    assert score_choices([None, 3], ["A", "B"]).metrics["accuracy"] == 0.0  # not strings: wrong, no crash
    empty = score_choices([], [])
    assert empty.metrics == {"accuracy": 0.0, "invalid": 0.0} and empty.settings == {"n": 0}


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
        # A right label followed by '!' (Ludwig pads with id 0, '!' for Qwen2.5/Llama 3) or punctuation is right.
        ("card_arrival!", "card_arrival"),
        ("card_arrival!!!!!!!!", "card_arrival"),
        ("reverted_card_payment?!", "reverted_card_payment?"),
        ("(card_arrival)", "card_arrival"),
        ("card arrival", "card_arrival"),  # prep's verbalised spelling (was invalid before verbalisation)
        ("Card  Arrival", "card_arrival"),
        ("reverted card payment?", "reverted_card_payment?"),
        ("card_arrival card_arrival", None),
        ("card_arrival or age_limit", None),
        ("The intent is card_arrival", None),
        ("!!!!", None),
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
    assert scores.metrics["accuracy"] == pytest.approx(accuracy_score(gold, canonical)) == pytest.approx(3 / 6)
    expected_f1 = f1_score(gold, canonical, labels=list(INTENTS), average="macro", zero_division=0)
    assert scores.metrics["macro_f1"] == pytest.approx(expected_f1)
    assert scores.metrics["invalid"] == pytest.approx(2 / 6)
    assert scores.settings == {"n": 6}
    assert scores.per_row == {"accuracy": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], "invalid": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]}


def test_banking77_macro_f1_hand_case() -> None:
    # Two labels present; per-label F1: card_arrival 2/3 (P 1, R 1/2), age_limit 2/3 (P 1/2, R 1); the other 75
    # labels score 0, so macro-F1 over all 77 intents = (2/3 + 2/3) / 77.
    scores = score_labels(["card_arrival", "age_limit", "age_limit"], ["card_arrival", "card_arrival", "age_limit"],
                          INTENTS)
    assert scores.metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 77)


def test_invalid_gold_label_is_a_clear_error() -> None:
    with pytest.raises(WorkflowError, match="row 3: gold label 'not_an_intent'"):
        score_labels(["card_arrival", "card_arrival"], ["card_arrival", "not_an_intent"], INTENTS)


def test_empty_predictions_are_wrong() -> None:
    scores = score_labels(["", None], ["card_arrival", "age_limit"], INTENTS)
    assert scores.metrics == {"accuracy": 0.0, "invalid": 1.0, "macro_f1": 0.0} and scores.settings == {"n": 2}
