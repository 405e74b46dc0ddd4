"""report.md / report.json / retention.png from a run with the fake backend: written, parseable, consistent, and
every cell with its interval, n, baseline and flags."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from eval.report import fmt, fmt_delta, markdown, matrix_table, merges_table, notes, render_markdown, write_report
from eval.retention import BASE, CellInput, build_retention
from eval.runner import EvalResult, ModelSpec, run_eval
from tests.eval.test_runner import request, world, write_model, write_train  # noqa: F401  (fixture)


@pytest.fixture
def result(world: dict[str, Any]) -> EvalResult:  # noqa: F811
    return run_eval(request(world, "sql", "detox", "multitask"), world["fake"].backend())


def test_writes_the_three_files_atomically(result: EvalResult) -> None:
    paths = write_report(result, generated_at="2026-01-01 00:00 UTC")
    folder = result.request.report_dir
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["report.json", "report.md", "retention.png"]
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".retention*"))
    assert paths["retention.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_json_holds_every_number_with_its_interval(result: EvalResult) -> None:
    data = json.loads(write_report(result)["report.json"].read_text())
    cell = data["retention"]["cells"]["sql"]["sql"]
    assert cell["score"] == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 4, "p_value": None}
    assert cell["delta"]["value"] == 1.0 and cell["significant"] is True and cell["q_value"] < 0.05
    assert data["retention"]["cells"]["sql"]["detox"]["significant"] is False
    assert data["retention"]["tests"] == 3 * 2  # adapters x tasks; a one-text probe has no interval: not a test
    assert data["scores"]["multitask/detox"]["exact_match"] == 1.0
    assert data["perplexity"]["multitask"]["story"] == pytest.approx(12.0)
    assert data["perplexity_change"]["multitask"]["story"] == pytest.approx(0.2)
    assert data["rows"]["sql"] == {"test_rows": 4, "evaluated": 4}
    assert data["own_tasks"]["multitask"] == ["sql", "detox"]
    assert data["retention"]["mean_own_gain"]["value"] == 1.0
    assert data["retention"]["mean_other_change"]["value"] == 0.0
    assert data["request"]["probes"] == [{"name": "story", "texts": 1, "source": ""}]
    assert data["settings"]["sql"]["max_new_tokens"] == 7
    assert len(data["pairs"]) == 8 and "total" in data["timings"]
    assert data["pairs"][0]["row_scores"] == {"exact_match": [0.0] * 4} and "predictions" not in data["pairs"][0]
    assert data["baselines"]["sql"]["name"] == "the input, unchanged"
    assert data["retention"]["floor_tasks"] == ["sql", "detox"]  # the fake base answers nothing: at the floor
    assert data["samples"]["sql"]["rows"][0][:3] == ["1", "sql: question 0", "sql answer 0"]
    assert set(data["manifest"]) == {"git", "packages", "data", "base_model", "models", "bootstrap", "device",
                                     "generated_with"}
    assert data["contamination"]["unchecked"] == ["model sql", "model detox", "model multitask"]
    assert "stand_in_metrics" in data and "detox" in data["stand_in_metrics"]


def test_report_md_cells_carry_interval_change_n_and_flags(result: EvalResult) -> None:
    text = write_report(result)["report.md"].read_text()
    assert "| model | sql (exact_match) | detox (exact_match) |" in text
    assert ("| sql | **1.000 [1.000, 1.000] (+1.000 [1.000, 1.000]) n=4** "
            "| 0.000 [0.000, 0.000] (+0.000 [0.000, 0.000] ns) n=4 ≤bl |") in text
    assert "| base | 0.000 [0.000, 0.000] n=4 ≤bl | 0.000 [0.000, 0.000] n=4 ≤bl |" in text
    assert "| trivial baseline | 0.000 [0.000, 0.000] n=4 | 0.000 [0.000, 0.000] n=4 |" in text
    assert "**sql cannot show forgetting**" in text
    assert "6 changes from the base were tested" in text
    for section in ("## Retention matrix", "## Summary", "## General-text perplexity", "## All metrics per task",
                    "### detox", "## Trivial baselines", "## Stand-in metrics", "## Contamination",
                    "## Run manifest", "## Settings and rows", "## Timings", "![retention matrix](retention.png)",
                    "Sample outputs (first 3 test rows"):
        assert section in text, section
    assert "`story` (1 texts from `memory`)" in text and "--probe FILE" in text


def test_settings_are_listed_apart_never_as_a_change(result: EvalResult) -> None:
    text = render_markdown(result, "now")
    assert "Scoring settings: n = 4" in text
    assert "| model | exact_match |" in text  # n is not a column of the metrics table
    assert "(+0.000)" not in text.split("### sql")[1].split("Scoring settings")[0].split("| base |")[0]


def test_metric_disagreement_and_below_baseline_are_said_next_to_the_cell(result: EvalResult) -> None:
    rows = np.array([0.2, 0.4, 0.3, 0.1])
    inputs = {BASE: {"sql": CellInput(rows, (0.25,), {"rougeL": 0.25, "chrF": 16.8})},
              "sql": {"sql": CellInput(rows + 0.05, (0.30,), {"rougeL": 0.30, "chrF": 11.3})}}
    retention = build_retention(inputs, ("sql",), {"sql": ("sql",)}, {"sql": "rougeL"},
                                baseline={"sql": np.full(4, 0.5)})
    shown = replace(result, retention=retention, request=replace(result.request, tasks=("sql",), models=()))
    header, table = matrix_table(shown)
    assert "⚠ rougeL ↑ chrF ↓" in table[1][1] and "≤bl" in table[1][1]
    assert any("Metrics disagree in direction" in line and "sql on sql (rougeL ↑ chrF ↓)" in line
               for line in notes(shown))


def test_seeds_section_reports_spread_and_the_repeat_claim(world: dict[str, Any]) -> None:  # noqa: F811
    second = write_model(world["tmp"] / "results", "sql-seed2", ("sql",), weights=b"seed 2")
    world["fake"].misses["sql#2"] = 1
    spec = ModelSpec("sql", world["sql"].path, ("sql",), (second,))
    text = render_markdown(run_eval(request(world, models=(spec,)), world["fake"].backend()), "now")
    assert "| sql (mean of 2 seeds) | **0.875 [" in text
    assert "**sql: repeats within ±2% does not hold.**" in text
    assert "| sql | sql | 2 | 1.000, 0.750 | 0.875 [" in text and "| 0.250 | 0.125 | no |" in text
    assert "| row | input | reference | base | sql (seed 1) | trivial baseline |" in text
    assert "| sql seed 2 | 0.750 (+0.750) |" in text


def test_contaminated_rows_are_counted_in_the_cell_and_the_table(world: dict[str, Any]) -> None:  # noqa: F811
    train = write_train(world["prepared"], "sql", ["x", "y"])
    frame = pd.read_csv(train)
    frame.loc[0, "prompt"] = "sql: question 3"  # a test prompt in the training data
    frame.to_csv(train, index=False)
    (world["sql"].path.parent / "description.json").write_text(json.dumps({"dataset": str(train)}))
    result = run_eval(request(world, "sql"), world["fake"].backend())
    header, rows = matrix_table(result)
    assert rows[1][1].endswith("seen 1**")
    text = render_markdown(result, "now")
    assert "| model sql = prepared sql/train.csv | sql | 1 of 4 (rows 4) | split key or question |" in text


def test_the_report_recommends_the_base_models_own_domain() -> None:
    from eval.report import probe_advice

    assert "`--probe tinystories`" in probe_advice("/models/stories260k", ["wikitext2_test"])
    assert "`--probe tinystories`" not in probe_advice("/models/stories260k", ["tinystories_valid"])
    assert "own pretraining domain" in probe_advice("Qwen/Qwen2.5-1.5B", [])


def test_png_is_a_readable_image_of_reasonable_size(result: EvalResult) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(write_report(result)["retention.png"])
    height, width = image.shape[:2]
    assert 300 < width < 3000 and 200 < height < 2000


def test_markdown_escapes_pipes_and_formats_numbers() -> None:
    assert markdown((["a", "b"], [["x|y", "1"]])) == "| a | b |\n| --- | --- |\n| x\\|y | 1 |"
    assert fmt(0.12345) == "0.123" and fmt(45.678) == "45.68" and fmt(None) == "—"
    assert fmt_delta(-0.05) == "-0.050" and fmt_delta(2.0) == "+2.000" and fmt_delta(None) == "—"


def test_matrix_table_marks_own_tasks_and_ends_with_the_baseline(result: EvalResult) -> None:
    header, rows = matrix_table(result)
    assert header[0] == "model" and [r[0] for r in rows] == ["base", "sql", "detox", "multitask", "trivial baseline"]
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


def test_merges_are_compared_per_task_with_the_single_task_adapter_and_the_mix(world: dict[str, Any],  # noqa: F811
                                                                                 result: EvalResult) -> None:
    assert merges_table(result)[1] == [] and "### Merges" not in render_markdown(result, "now")
    merged = write_model(world["tmp"] / "results", "ties", ())  # the fake: answers nothing, perplexity 10
    (merged / "merge.json").write_text(json.dumps({"tasks": ["sql", "detox"], "method": "ties"}))
    with_merge = run_eval(request(world, "sql", "detox", "multitask", models=(
        world["sql"], world["detox"], world["multitask"], ModelSpec("ties", merged, ("sql", "detox")))),
        world["fake"].backend())
    header, rows = merges_table(with_merge)
    assert header[-2:] == ["perplexity change (story)", "keeps most general skill"]
    assert [r[:3] for r in rows] == [
        ["sql", "sql", "single-task adapter"], ["sql", "multitask", "mix"], ["sql", "ties", "merge (ties)"],
        ["detox", "detox", "single-task adapter"], ["detox", "multitask", "mix"], ["detox", "ties", "merge (ties)"]]
    assert [r[-1] for r in rows] == ["", "", "**yes**"] * 2  # perplexity 10 against 11 and 12
    assert rows[0][3].startswith("1.000") and rows[2][3].startswith("0.000")
    text = render_markdown(with_merge, "now")
    assert "### Merges against the single-task adapters and the mix" in text
    data = json.loads(write_report(with_merge)["report.json"].read_text())
    assert data["merge_comparison"][2] == dict(zip(header, rows[2], strict=True))


def test_a_studys_failed_trainings_and_merges_are_said_in_its_section() -> None:
    from eval.report import study_section

    lines = study_section({"study": {"base_model": "b", "trainings": [], "training_errors": {"samsum": "NaN"},
                                     "merge_errors": {"ties": "not merged: the samsum adapter did not train"}}})
    text = "\n".join(lines)
    assert "**Not trained, so not in this report**: samsum: NaN." in text
    assert "Merges left out (failed): ties: not merged" in text
    assert study_section({}) == []
