"""workflow/agreement.py: eval's generations against ludwig predict's, per adapter path, and the path chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.report import agreement_lines
from ludwig_mt.errors import WorkflowError
from workflow.agreement import choose, compare, main


def test_compare_counts_identical_texts_and_shows_the_first_difference() -> None:
    result = compare(["a b", "c", "d "], ["a b", "x", "d"])
    assert (result["equal"], result["rows"], result["equal_stripped"]) == (1, 3, 2)
    assert result["fraction"] == pytest.approx(1 / 3)
    assert result["first_difference"] == {"row": 1, "ludwig_predict": "c", "eval": "x"}
    with pytest.raises(WorkflowError, match="2 generations for 1 ludwig predictions"):
        compare(["a"], ["a", "b"])


def _result(unmerged: int, merged: int, rows: int = 8) -> dict:
    return {"model_dir": "m", "seconds_ludwig_predict": 1.0, "log": "predict.log",  # as agreement_for gives
            "unmerged": {"equal": unmerged, "rows": rows}, "merged": {"equal": merged, "rows": rows}}


def test_choice_is_the_path_that_agrees_most_ties_go_to_unmerged() -> None:
    assert choose({"sql": _result(8, 8), "banking77": _result(8, 8)})["merge_lora"] == "off"
    full = choose({"sql": _result(8, 3)})
    assert full["path"] == "unmerged" and "identical to ludwig predict on all 8 rows" in full["reason"]
    partial = choose({"sql": _result(2, 5), "banking77": _result(1, 6)})
    assert partial["merge_lora"] == "on" and partial["fraction"]["merged"] == 11 / 16
    assert "neither reproduces ludwig predict on every row" in partial["reason"]


def test_report_says_which_path_scored_or_that_agreement_was_not_measured() -> None:
    assert "not measured" in agreement_lines(None)[0]
    lines = agreement_lines({"rows_per_model": 8, "models": {"sql": _result(2, 5)},
                             "choice": choose({"sql": _result(2, 5)})})
    assert "Scored with the merged path (`--merge-lora on`)" in lines[1] and "| sql | 2/8 | 5/8 |" in lines[2]


def test_cli_refuses_a_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model", f"sql={tmp_path / 'none'}", "--prepared", str(tmp_path), "--out", str(tmp_path / "a.json")])
    assert code == 2 and "folder not found" in capsys.readouterr().err
