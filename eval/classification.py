"""Metrics of tasks whose answer is a label: banking77 intents and CommonsenseQA letters.

A generative model answers in free text, so each answer is first parsed into a label, leniently but
deterministically; an answer that does not parse (empty, rambling, an invented intent) counts as wrong, and its
share is reported, since "answers outside the label set" is itself a sign of forgetting the task's format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sklearn.metrics import accuracy_score, f1_score

from eval.text import clean_predictions
from ludwig_mt.errors import WorkflowError
from prep.common import normalise_key

# An unparseable answer becomes this label, which is in no label set: wrong for accuracy, a false negative of
# the true class for macro-F1.
INVALID = "<invalid>"
# Characters a model wraps an answer in (quotes, code ticks, a final full stop) that are not part of any label.
_WRAPPING = " \t.,;:'\"`*"


def label_key(text: str) -> str:
    """prep's case- and whitespace-insensitive key, without wrapping quotes/punctuation or a trailing '?'.

    The '?' matters because one banking77 intent is literally ``reverted_card_payment?``: the bare name and the
    name with its '?' both match it.
    """
    return normalise_key(text).strip(_WRAPPING).rstrip("?").strip(_WRAPPING)


def label_lookup(labels: Iterable[str]) -> dict[str, str]:
    """key -> canonical label; two labels with the same key would make answers ambiguous, so that is an error."""
    lookup: dict[str, str] = {}
    for label in labels:
        key = label_key(label)
        if key in lookup:
            raise ValueError(f"labels '{lookup[key]}' and '{label}' are indistinguishable after normalisation")
        lookup[key] = label
    return lookup


def parse_label(prediction: str, lookup: dict[str, str]) -> str | None:
    """The label named by the first non-empty line of the answer (the model may continue after it), or None."""
    first_line = next((line for line in prediction.splitlines() if line.strip()), "")
    return lookup.get(label_key(first_line))


def score_labels(predictions: Sequence[object], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, macro-F1 over ``labels`` (sklearn) and the share of answers that are no valid label; all in [0, 1].

    Macro-F1 averages over every label in ``labels``, including any absent from the test set (zero_division=0),
    so scores compare across models on the same test set.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} test rows")
    n = len(golds)
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "invalid": 0.0, "n": 0}
    lookup = label_lookup(labels)
    gold = []
    for row, answer in enumerate(golds, start=2):
        label = lookup.get(label_key(answer))
        if label is None:
            raise WorkflowError(f"test.csv row {row}: gold label '{answer}' is not one of the task's labels; "
                                "re-run `python -m prep` for this task")
        gold.append(label)
    parsed = [parse_label(p, lookup) for p in clean_predictions(predictions)]
    pred = [p if p is not None else INVALID for p in parsed]
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=list(labels), average="macro", zero_division=0)),
        "invalid": sum(p is None for p in parsed) / n,
        "n": n,
    }


_BARE_LETTER = re.compile(r"^\(?([A-Ea-e])\)?[.:)]?$")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9_])\(?([A-E])(?![A-Za-z0-9_])")


def parse_choice(prediction: str) -> str | None:
    """The answer letter A-E of a multiple-choice answer, or None.

    Rules, in order: the whole answer is one letter in any case, optionally as 'A.', 'A)', '(A)' or 'A:'; else
    the first standalone capital A-E ('The answer is (C) bank' -> C; a capital inside a word never counts).
    Deterministic: the same text always gives the same letter.
    """
    text = prediction.strip()
    bare = _BARE_LETTER.match(text)
    if bare:
        return bare.group(1).upper()
    first = _STANDALONE_LETTER.search(text)
    return first.group(1) if first else None


def score_choices(predictions: Sequence[object], golds: Sequence[str]) -> dict[str, float]:
    """accuracy and the share of unparseable answers (both in [0, 1]); an unparseable answer is wrong."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} test rows")
    n = len(golds)
    if n == 0:
        return {"accuracy": 0.0, "invalid": 0.0, "n": 0}
    parsed = [parse_choice(p) for p in clean_predictions(predictions)]
    correct = sum(p is not None and p == g.strip().upper() for p, g in zip(parsed, golds, strict=True))
    return {"accuracy": correct / n, "invalid": sum(p is None for p in parsed) / n, "n": n}
