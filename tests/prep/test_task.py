"""prep.task.prepare: sources that give no usable, test or training rows are refused before anything is written;
--max-rows keeps every official split and says what it read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prep.__main__ import main as prep_main
from prep.common import PrepError
from prep.registry import get_task
from prep.task import prepare
from tests.prep.published_fixtures import WRITERS, lamini_docs


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(task: str, source: Path, out: Path, expected: str, **kwargs: object) -> str:
    with pytest.raises(PrepError, match=expected) as info:
        prepare(get_task(task), str(source), out, **kwargs)
    assert "\n" not in str(info.value) and "Fix: " in str(info.value)
    return str(info.value)


def test_a_refused_run_leaves_the_previous_outputs_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(get_task("lamini_docs"), str(lamini_docs(tmp_path / "good")), out)
    before = _outputs(out / "lamini_docs")
    one_row = lamini_docs(tmp_path / "one", n=1)
    message = _refused("lamini_docs", one_row, out, r"no test rows for lamini_docs: 1 source row gave 1 train, "
                       r"0 validation and 0 test rows \(held out: .*\)\. Fix: pass more rows")
    assert str(one_row) in message
    assert _outputs(out / "lamini_docs") == before


def test_a_fresh_refused_run_writes_nothing(tmp_path: Path) -> None:
    _refused("lamini_docs", lamini_docs(tmp_path / "one", n=1), tmp_path / "out", "no test rows")
    assert not (tmp_path / "out").exists()


def test_a_source_whose_rows_are_all_dropped_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "lamini_docs.jsonl"
    src.write_text("".join(f'{{"question": " ", "answer": "a{i}"}}\n' for i in range(5)), encoding="utf-8")
    _refused("lamini_docs", src, tmp_path / "out",
             r"no usable rows for lamini_docs: all 5 source rows were dropped \(empty field 'question': 5\)\. "
             r"Fix: correct the rows for the reasons given, or run with --strict")


def test_an_official_test_split_alone_gives_no_training_rows(tmp_path: Path) -> None:
    folder = WRITERS["banking77"](tmp_path / "src")
    (folder / "train.csv").unlink()
    _refused("banking77", folder, tmp_path / "out",
             r"no training rows for banking77: 4 source rows gave 0 train, 0 validation and 4 test rows")


def test_an_evaluation_only_task_needs_no_training_rows(tmp_path: Path) -> None:
    report = prepare(get_task("spider"), str(WRITERS["spider"](tmp_path / "src")), tmp_path / "out")
    assert report.rows_out["train"] == 0 and report.rows_out["test"] == 6


def test_max_rows_reads_every_official_split_in_proportion_and_reports_it(tmp_path: Path) -> None:
    folder = WRITERS["banking77"](tmp_path / "src", n=36)  # 36 train rows + 4 official test rows
    report = prepare(get_task("banking77"), str(folder), tmp_path / "out", max_rows=10)
    assert report.rows_out["test"] == 1 and report.rows_out["train"] + report.rows_out["validation"] == 9
    saved = json.loads((tmp_path / "out/banking77/report.json").read_text())
    assert saved["max_rows"]["limit"] == 10
    assert (saved["max_rows"]["read"], saved["max_rows"]["available"]) == ({"train": 9, "test": 1},
                                                                           {"train": 36, "test": 4})


def test_cli_refusal_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header_only = tmp_path / "data.csv"
    header_only.write_text("text,label\n", encoding="utf-8")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntemplate: '{text}'\nresponse: label\n", encoding="utf-8")
    assert prep_main(["--spec", str(spec), "--source", str(header_only), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {header_only}: header row only, no data rows. Fix: pass the file that holds the data rows\n"
    assert not (tmp_path / "out").exists()
    assert prep_main(["lamini_docs", "--source", str(lamini_docs(tmp_path / "l")), "--max-rows", "0"]) == 2
    assert "--max-rows 0: must be at least 1" in capsys.readouterr().err


def test_cli_says_what_max_rows_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = WRITERS["banking77"](tmp_path / "src", n=36)
    assert prep_main(["banking77", "--source", str(folder), "--out", str(tmp_path / "out"), "--max-rows", "10"]) == 0
    assert "banking77: --max-rows 10 read 9 of 36 train, 1 of 4 test rows" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "out/banking77/test.csv")) == 1
