"""eval.text: ROUGE-L, chrF, BLEU and exact match, against hand-computed values and the reference libraries."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from eval.text import (
    bleu,
    chrf,
    clean_predictions,
    exact_match,
    references_of,
    rouge_l,
    rouge_l_per_sentence,
    score_text,
)
from ludwig_mt.ludwig_fixes import WorkflowError

PREDS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi"]
REFS = [["the cat is on the mat"], ["the quick brown fox jumped over the dog"], ["general kenobi, hello there"]]


def test_rouge_l_hand_case() -> None:
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each way.
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # Disjoint words: 0; identical: 1.
    assert rouge_l(["alpha beta"], [["gamma delta"]]) == 0.0
    assert rouge_l(["alpha beta"], [["Alpha, beta!"]]) == pytest.approx(1.0)


def test_rouge_l_stems_words() -> None:
    assert rouge_l(["cats running quickly"], [["cat runs quickly"]]) == pytest.approx(1.0)


def test_rouge_l_takes_the_best_reference() -> None:
    refs = [["completely unrelated words here", "the cat sat on the mat"]]
    assert rouge_l(["the cat sat on the mat"], refs) == pytest.approx(1.0)


def test_rouge_l_equals_rouge_score_mean() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(refs[0], pred)["rougeL"].fmeasure for pred, refs in zip(PREDS, REFS)]
    assert rouge_l_per_sentence(PREDS, REFS) == pytest.approx(expected)
    assert rouge_l(PREDS, REFS) == pytest.approx(sum(expected) / len(expected))


def test_chrf_equals_sacrebleu_corpus_chrf() -> None:
    expected = sacrebleu.corpus_chrf(PREDS, [[r[0] for r in REFS]]).score
    assert chrf(PREDS, REFS) == pytest.approx(expected)
    assert chrf(["identical text"], [["identical text"]]) == pytest.approx(100.0)
    assert 0.0 < chrf(PREDS, REFS) < 100.0


def test_multi_reference_bleu_and_chrf_use_every_reference() -> None:
    preds = ["the cat sat on the mat today", "it is raining again"]
    refs = [["a dog lay on a rug", "the cat sat on the mat today"], ["it is raining again"]]  # 2 refs, then 1
    # sacrebleu's layout for a variable number of references: one stream per position, None where missing.
    streams = [["a dog lay on a rug", "it is raining again"], ["the cat sat on the mat today", None]]
    assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    # Each prediction equals one of its references: a perfect score only when all references are used.
    assert bleu(preds, refs) == pytest.approx(100.0)
    assert bleu(preds, [["a dog lay on a rug"], ["it is raining again"]]) < 60.0


def test_exact_match_ignores_case_whitespace_and_end_punctuation_only() -> None:
    refs = [["Paris"], ["The  answer is 42."], ["yes", "no"], ["C++"]]
    assert exact_match(["paris ", "the answer is 42", "No", "c++"], refs) == pytest.approx(1.0)
    # Changed on purpose (issue #12): a right answer with end punctuation or '!' padding is right ("Paris." used
    # to be scored wrong against "Paris").
    assert exact_match(["Paris.", "The answer is 42!!!!", '"yes"', "C++!"], refs) == pytest.approx(1.0)
    assert exact_match(["answer 42", "maybe", "Pari", "C"], [["Paris"], ["The answer is 42"], ["yes"], ["C++"]]) == 0.0
    assert exact_match(["!!!", "..."], [["!"], ["."]]) == 0.0  # punctuation alone says nothing


def test_empty_and_missing_predictions_score_zero_without_crashing() -> None:
    preds = clean_predictions(["", None, float("nan"), "  "])
    assert preds == ["", "", "", ""]
    scores = score_text(["", None, float("nan"), "  "], [["a b c"]] * 4)
    assert scores.metrics == {"rougeL": 0.0, "exact_match": 0.0, "chrF": 0.0} and scores.settings == {"n": 4}
    assert scores.per_row == {"rougeL": [0.0] * 4, "exact_match": [0.0] * 4}
    empty = score_text([], [])
    assert empty.metrics == {"rougeL": 0.0, "exact_match": 0.0, "chrF": 0.0} and empty.settings == {"n": 0}


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        chrf(["a", "b"], [["a"]])


def test_references_of_reads_the_json_list_or_falls_back_to_response() -> None:
    multi = pd.DataFrame({"response": ["a", "c"], "references": [json.dumps(["a", "b"]), json.dumps(["c"])]})
    assert references_of(multi) == [["a", "b"], ["c"]]
    single = pd.DataFrame({"response": ["x", "y"]})
    assert references_of(single) == [["x"], ["y"]]


@pytest.mark.parametrize("bad", ["not json", "[]", '"a string"', "[1, 2]"])
def test_references_of_names_the_bad_row(bad: str) -> None:
    frame = pd.DataFrame({"response": ["a", "b"], "references": [json.dumps(["a"]), bad]})
    with pytest.raises(WorkflowError, match=r"test.csv row 3: 'references'"):
        references_of(frame)


def test_score_text_scales_and_rows() -> None:
    scores = score_text(PREDS, REFS)
    assert set(scores.metrics) == {"rougeL", "chrF", "exact_match"} and scores.settings == {"n": 3}
    assert 0.0 <= scores.metrics["rougeL"] <= 1.0 and 0.0 <= scores.metrics["chrF"] <= 100.0
    assert not math.isnan(scores.metrics["chrF"])
    assert scores.per_row["rougeL"] == pytest.approx(rouge_l_per_sentence(PREDS, REFS))
    assert scores.metrics["rougeL"] == statistics.fmean(scores.per_row["rougeL"])
    assert "chrF" not in scores.per_row  # corpus-level: no per-row values
