"""Metrics of tasks whose answer is a label: banking77 intents and CommonsenseQA letters.

A generative model answers in free text, so each answer is first parsed into a label, leniently but
deterministically; an answer that does not parse (empty, rambling, an invented intent) counts as wrong, and its
share is reported, since "answers outside the label set" is itself a sign of forgetting the task's format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sklearn.metrics import f1_score

from eval.task_scores import TaskScores, scores_from_rows
from eval.text import clean_predictions
from ludwig_mt.errors import WorkflowError
from prep.common import normalise_key

# An unparseable answer becomes this label, which is in no label set: wrong for accuracy, a false negative of
# the true class for macro-F1.
INVALID = "<invalid>"
# Characters around an answer that are part of no label: quotes, code ticks, brackets and final punctuation,
# including '!' (a model's "card_arrival!", and Ludwig's padding with token id 0, which is '!' for Qwen2.5 and
# Llama 3 tokenizers when the stop_responses_at_eos patch is off).
_PUNCTUATION = " \t.,;:!?'\"`*"
_WRAPPING = _PUNCTUATION + "()[]"


def first_line(prediction: str) -> str:
    """The first non-empty line: the answer; what a model adds after it is not."""
    return next((line for line in prediction.splitlines() if line.strip()), "")


def label_key(text: str) -> str:
    """prep's case- and whitespace-insensitive key, without wrapping quotes, brackets or punctuation; an underscore
    is a space (``card_arrival`` and prep's verbalised ``card arrival`` are the same label).

    Stripping '?' from both the answer and the label matters because one banking77 intent is literally
    ``reverted_card_payment?``: the bare name and the name with its '?' both match it.
    """
    return normalise_key(text.replace("_", " ")).strip(_WRAPPING)


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
    """The label that the first non-empty line of the answer is (the model may continue after it), or None."""
    return lookup.get(label_key(first_line(prediction)))


def score_labels(predictions: Sequence[object], golds: Sequence[str], labels: Sequence[str]) -> TaskScores:
    """accuracy and the share of answers that are no valid label (per row), and macro-F1 over ``labels``
    (sklearn, corpus-level); all in [0, 1]; settings: n.

    Macro-F1 averages over every label in ``labels``, including any absent from the test set (zero_division=0),
    so scores compare across models on the same test set.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} test rows")
    n = len(golds)
    if n == 0:
        return scores_from_rows({"accuracy": [], "invalid": []}, corpus={"macro_f1": 0.0}, settings={"n": 0})
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
    return scores_from_rows(
        {"accuracy": [p == g for p, g in zip(pred, gold, strict=True)], "invalid": [p is None for p in parsed]},
        corpus={"macro_f1": float(f1_score(gold, pred, labels=list(labels), average="macro", zero_division=0))},
        settings={"n": n})


# A lone letter, any case, in brackets or not: "C", "c", "(C)", "C)", "[C]" (after _PUNCTUATION is stripped,
# which also drops "C.", "C:" and padding such as "C!!").
_BARE_LETTER = re.compile(r"^[(\[]?([A-Ea-e])[)\]]?$")
# A letter as an explicit statement names it: "(C)" or "(c)"; a capital not inside a word; a lower-case letter
# only where the sentence ends after it ("the answer is b."), never "the answer is a bank".
_LETTER = r"(?:\(([A-Ea-e])\)|([A-E])(?![\w'-])|([a-e])(?=[ \t]*(?:$|[.,;:!?])))"
_EXPLICIT = (
    re.compile(rf"(?i:\banswer\b)[ \t]*(?i:is|:|=|-)?[ \t]*(?i:(?:option|choice)[ \t]+)?{_LETTER}", re.M),
    re.compile(rf"(?i:\b(?:option|choice)\b)[ \t]+{_LETTER}", re.M),
    re.compile(rf"{_LETTER}[ \t]+(?i:is[ \t]+(?:the[ \t]+)?(?:correct|right|best|answer)\b)", re.M),
)
# Two letters offered as alternatives: "B or C", "(A) or (B)", "A/B", "A and C", "B, C".
_ALTERNATIVES = re.compile(
    rf"{_LETTER}[ \t]*(?:,|/|(?i:\bor\b)|(?i:\band\b))[ \t]*(?:(?i:option|choice)[ \t]+)?{_LETTER}", re.M)
# A capital A-E standing alone in the answer line ("C. bank", "(B) the river bank", "B or C").
_MARKER = re.compile(r"(?<![\w'-])([A-E])(?![\w'-])")
# "A bank", "A river": the English article, so that line names no option for sure.
_ARTICLE = re.compile(r"(?<![\w'-])A[ \t]+[a-z]")
# The prompt's section marker: text from here on is the model writing a new prompt, not answering this one.
_SECTION = "###"


def _letters(pattern: re.Pattern[str], text: str) -> set[str]:
    """Every letter the pattern's matches name (upper-case)."""
    return {g.upper() for m in pattern.finditer(text) for g in m.groups() if g}


def parse_choice(prediction: str) -> str | None:
    """The answer letter A-E of a multiple-choice answer, or None (counted invalid, hence wrong).

    Only the text before a '###' (the prompt's section marker) counts. Rules, in order:

    1. The first non-empty line, without wrapping quotes, brackets or punctuation (also '!' padding), is one
       letter in any case: 'C', 'c', '(C)', 'C)', 'C.', 'C:', 'C!!' -> C.
    2. Two different letters offered as alternatives anywhere ('B or C', '(A) or (B)', 'A/B', 'A and C') make
       the answer invalid.
    3. Explicit statements: 'the answer is X', 'Answer: X', 'option X', 'X is correct'. If they name exactly one
       letter, it wins ('Not A, the answer is B' -> B); if they name several, the answer is invalid.
    4. Else the capitals A-E standing alone in the first non-empty line: exactly one -> it ('C. bank' -> C);
       none or several ('B or C', 'A and C', 'Both B and C fit') -> invalid. A line with 'A' followed by a
       lower-case word ('A bank') is invalid too: that 'A' may be the article.

    An answer naming two different options is never scored by its first letter. Deterministic: the same text
    always gives the same letter.
    """
    text = prediction.split(_SECTION, 1)[0]
    line = first_line(text)
    bare = _BARE_LETTER.match(line.strip(_PUNCTUATION))
    if bare:
        return bare.group(1).upper()
    if any(len({g.upper() for g in m.groups() if g}) > 1 for m in _ALTERNATIVES.finditer(text)):
        return None
    explicit = set().union(*(_letters(pattern, text) for pattern in _EXPLICIT))
    if explicit:
        return explicit.pop() if len(explicit) == 1 else None
    markers = _letters(_MARKER, line)
    if len(markers) != 1 or _ARTICLE.search(line):
        return None
    return markers.pop()


def score_choices(predictions: Sequence[object], golds: Sequence[str]) -> TaskScores:
    """accuracy and the share of unparseable answers (both in [0, 1], per row); an unparseable answer is wrong;
    settings: n."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} test rows")
    parsed = [parse_choice(p) for p in clean_predictions(predictions)]
    return scores_from_rows(
        {"accuracy": [p is not None and p == g.strip().upper() for p, g in zip(parsed, golds, strict=True)],
         "invalid": [p is None for p in parsed]},
        settings={"n": len(golds)})
