"""prep.mix: a deterministic multi-task mixture with per-task caps and each task's own held-out rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prep.__main__ import main as prep_main
from prep.common import PrepError
from prep.mix import build_mixture, parse_caps
from prep.registry import get_task
from prep.task import prepare
from tests.prep.published_fixtures import WRITERS


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    for task in ("sql", "detox"):
        prepare(get_task(task), str(WRITERS[task](tmp_path / "src" / task)), tmp_path / "prepared")
    return tmp_path / "prepared"


def test_caps_and_task_column(prepared: Path, tmp_path: Path) -> None:
    report = build_mixture(prepared, {"sql": 20, "detox": None}, tmp_path / "out")
    train = pd.read_csv(tmp_path / "out/multitask/train.csv", keep_default_na=False)
    test = pd.read_csv(tmp_path / "out/multitask/test.csv", keep_default_na=False)
    detox_train = pd.read_csv(prepared / "detox/train.csv", keep_default_na=False)
    assert (train["task"] == "sql").sum() == 20 and (train["task"] == "detox").sum() == len(detox_train)
    assert set(test["task"]) == {"sql", "detox"} and list(train.columns[:3]) == ["prompt", "response", "task"]
    assert train.columns[-1] == "split" and not set(train["prompt"]) & set(test["prompt"])
    per_task = json.loads((tmp_path / "out/multitask/report.json").read_text())["per_task"]
    assert per_task["sql"]["train"] + per_task["sql"]["validation"] == 20
    assert report.rows_out["test"] == len(test)


def test_mixture_is_deterministic(prepared: Path, tmp_path: Path) -> None:
    build_mixture(prepared, {"sql": 15, "detox": 15}, tmp_path / "a")
    build_mixture(prepared, {"sql": 15, "detox": 15}, tmp_path / "b")
    assert (tmp_path / "a/multitask/train.csv").read_bytes() == (tmp_path / "b/multitask/train.csv").read_bytes()


def test_bad_caps_and_missing_tasks_are_clear(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="cap is not a whole number"):
        parse_caps(["sql:lots"])
    with pytest.raises(PrepError, match=r"samsum/train.csv: file not found. Fix: run ./run.sh prep samsum first"):
        build_mixture(prepared, {"samsum": 5}, tmp_path / "out")


def test_cli_mix(prepared: Path) -> None:
    assert prep_main(["mix", "--tasks", "sql:10", "detox:10", "--out", str(prepared)]) == 0
    assert (prepared / "multitask/train.csv").exists()


@pytest.mark.parametrize(("content", "expected"), [
    ("prompt,response,task\n", r"detox/test.csv: no test rows. Fix: re-run ./run.sh prep detox with more rows, "
                               r"or leave detox out of the mix"),
    ("", r"detox/test.csv: unreadable \(No columns to parse from file\). Fix: re-run ./run.sh prep detox"),
])
def test_a_task_without_test_rows_is_refused_in_one_line(prepared: Path, tmp_path: Path, content: str,
                                                          expected: str) -> None:
    (prepared / "detox/test.csv").write_text(content, encoding="utf-8")
    with pytest.raises(PrepError, match=expected) as info:
        build_mixture(prepared, {"sql": 5, "detox": 5}, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    (prepared / "detox/test.csv").unlink()
    with pytest.raises(PrepError, match=r"detox/test.csv: file not found. Fix: run ./run.sh prep detox first"):
        build_mixture(prepared, {"sql": 5, "detox": 5}, tmp_path / "out")
