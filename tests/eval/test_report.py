"""report.md / report.json / retention.png from a run with the fake backend: written, parseable, consistent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.report import fmt, fmt_delta, markdown, matrix_table, write_report
from eval.runner import EvalResult, run_eval
from tests.eval.test_runner import request, world  # noqa: F401  (fixture)


@pytest.fixture
def result(world: dict[str, Any]) -> EvalResult:  # noqa: F811
    return run_eval(request(world, "sql", "detox", "multitask"), world["fake"].backend())


def test_writes_the_three_files_atomically(result: EvalResult) -> None:
    paths = write_report(result, generated_at="2026-01-01 00:00 UTC")
    folder = result.request.report_dir
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["report.json", "report.md", "retention.png"]
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".retention*"))
    assert paths["retention.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_json_holds_every_number(result: EvalResult) -> None:
    data = json.loads(write_report(result)["report.json"].read_text())
    assert data["retention"]["cells"]["sql"]["sql"] == {"score": 1.0, "delta": 1.0}
    assert data["scores"]["multitask/detox"]["exact_match"] == 1.0
    assert data["perplexity"]["multitask"]["story"] == 12.0
    assert data["perplexity_change"]["multitask"]["story"] == pytest.approx(0.2)
    assert data["rows"]["sql"] == {"test_rows": 4, "evaluated": 4}
    assert data["own_tasks"]["multitask"] == ["sql", "detox"]
    assert data["retention"]["mean_own_gain"] == 1.0 and data["retention"]["mean_other_change"] == 0.0
    assert data["request"]["probes"] == [{"name": "story", "texts": 1, "source": ""}]
    assert data["settings"]["sql"]["max_new_tokens"] == 7
    assert len(data["pairs"]) == 8 and "total" in data["timings"]


def test_report_md_has_the_matrix_with_deltas_and_sections(result: EvalResult) -> None:
    text = write_report(result)["report.md"].read_text()
    assert "| model | sql (exact_match) | detox (exact_match) |" in text
    assert "| sql | **1.000 (+1.000)** | 0.000 (+0.000) |" in text
    assert "| base | 0.000 | 0.000 |" in text
    for section in ("## Retention matrix", "## Summary", "## General-text perplexity", "## All metrics per task",
                    "### detox", "## Settings and rows", "## Timings", "![retention matrix](retention.png)"):
        assert section in text
    assert "`story` (1 texts from `memory`)" in text


def test_png_is_a_readable_image_of_reasonable_size(result: EvalResult) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(write_report(result)["retention.png"])
    height, width = image.shape[:2]
    assert 300 < width < 3000 and 200 < height < 2000


def test_markdown_escapes_pipes_and_formats_numbers() -> None:
    assert markdown((["a", "b"], [["x|y", "1"]])) == "| a | b |\n| --- | --- |\n| x\\|y | 1 |"
    assert fmt(0.12345) == "0.123" and fmt(45.678) == "45.68" and fmt(None) == "—"
    assert fmt_delta(-0.05) == "-0.050" and fmt_delta(2.0) == "+2.000" and fmt_delta(None) == "—"


def test_matrix_table_marks_own_tasks(result: EvalResult) -> None:
    header, rows = matrix_table(result)
    assert header[0] == "model" and [r[0] for r in rows] == ["base", "sql", "detox", "multitask"]
    assert rows[3][1].startswith("**") and rows[3][2].startswith("**")
    assert not rows[1][2].startswith("**")


def test_logging_to_sends_logs_to_the_file_and_silences_transformers_bars(tmp_path: Path) -> None:
    import logging

    from transformers.utils import logging as hf_logging

    from eval.report import logging_to

    hf_logging.enable_progress_bar()
    log = tmp_path / "eval.log"
    with logging_to(log):
        assert not hf_logging.is_progress_bar_enabled()
        logging.getLogger("eval.test").info("into the file")
    assert hf_logging.is_progress_bar_enabled(), "restored afterwards"
    assert "into the file" in log.read_text(encoding="utf-8")
