"""Text-generation metrics: ROUGE-L F1, chrF, BLEU and normalised exact match, single- or multi-reference.

Each metric is its reference implementation, called the standard way, so numbers compare with published ones:
ROUGE-L with ``rouge-score`` (Porter stemming; the best-matching reference per sentence, averaged over sentences)
and chrF / BLEU with ``sacrebleu``'s corpus-level scores (every reference of a sentence is used; sentences may have
different numbers of references). Scales: ROUGE-L and exact match in [0, 1]; chrF and BLEU in [0, 100], as
sacrebleu reports them.

A prediction that is empty, missing (None/NaN) or not a string is the empty string here: it scores zero on every
metric instead of crashing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

import pandas as pd
import sacrebleu

from eval.task_scores import TaskScores, mean, scores_from_rows
from ludwig_mt.errors import WorkflowError
from prep.common import normalise_key
from prep.task import REFERENCES, RESPONSE

if TYPE_CHECKING:  # rouge-score is imported when ROUGE is computed: the GPU image (generate-only) lacks it
    from rouge_score import rouge_scorer


# Sentence punctuation, quotes and Ludwig's '!' padding (token id 0 of Qwen2.5/Llama 3) around an answer.
_END_PUNCTUATION = " \t.,;:!?'\"`"


def clean_predictions(predictions: Sequence[object]) -> list[str]:
    """Model outputs as stripped strings; None, NaN and non-strings become '' (scored as wrong, never a crash)."""
    return [p.strip() if isinstance(p, str) else "" for p in predictions]


def references_of(test: pd.DataFrame, where: str = "test.csv") -> list[list[str]]:
    """Every reference of each row: the JSON list in ``references`` when the column exists, else ``[response]``."""
    if REFERENCES not in test.columns:
        if RESPONSE not in test.columns:
            raise WorkflowError(f"{where}: no '{RESPONSE}' column; pass a test.csv written by `python -m prep`")
        return [[str(r)] for r in test[RESPONSE]]
    refs: list[list[str]] = []
    for row, raw in enumerate(test[REFERENCES], start=2):  # row 1 is the header
        try:
            value = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            value = None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise WorkflowError(f"{where} row {row}: '{REFERENCES}' is not a non-empty JSON list of strings; "
                                "re-run `python -m prep` for this task")
        refs.append(value)
    return refs


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, None where a sentence has fewer references."""
    width = max((len(r) for r in references), default=0)
    return [[r[i] if i < len(r) else None for r in references] for i in range(width)]


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference rows")
    if any(not r for r in references):
        raise ValueError("every row needs at least one reference")


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2), 0-100, against all references of each sentence."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (13a tokenisation, 4-grams), 0-100, multi-reference."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


@cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_per_sentence(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F1 of each sentence against its best reference (rouge-score ``score_multi``), in [0, 1]."""
    _check_lengths(predictions, references)
    scorer = _rouge_l_scorer()
    return [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure if pred else 0.0
            for pred, refs in zip(predictions, references, strict=True)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean sentence ROUGE-L F1 (stemmed, best reference), in [0, 1]; 0 for an empty set."""
    return mean(rouge_l_per_sentence(predictions, references))


def answer_key(text: str) -> str:
    """The text for exact match: case- and whitespace-insensitive, without sentence punctuation, quotes or '!'
    padding at its ends ("Friday." and "friday!!" are the answer "Friday"); inner punctuation and symbols that
    belong to an answer ("C++", "$5") are kept."""
    return normalise_key(text).strip(_END_PUNCTUATION)


def exact_match_per_sentence(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[bool]:
    """Per sentence: says something and equals some reference after :func:`answer_key`."""
    _check_lengths(predictions, references)
    keys = [answer_key(p) for p in predictions]
    return [bool(key) and key in {answer_key(r) for r in refs} for key, refs in zip(keys, references, strict=True)]


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of predictions equal to some reference after :func:`answer_key`, in [0, 1]."""
    return mean(exact_match_per_sentence(predictions, references))


def score_text(predictions: Sequence[object], references: Sequence[Sequence[str]]) -> TaskScores:
    """The generation metrics of a free-text task: rougeL and exact_match in [0, 1] with their per-row values,
    corpus chrF 0-100; settings: n."""
    preds = clean_predictions(predictions)
    return scores_from_rows(
        {"rougeL": rouge_l_per_sentence(preds, references), "exact_match": exact_match_per_sentence(preds, references)},
        corpus={"chrF": chrf(preds, references)}, settings={"n": len(preds)})
