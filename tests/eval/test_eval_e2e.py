"""``python -m eval`` end to end: a tiny adapter trained with the real ``ludwig train``, scored on sql and detox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.__main__ import main
from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from prep.registry import get_task
from prep.task import prepare
from workflow.samples import write_detox_sample, write_sql_sample
from workflow.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("eval-e2e")
    prepared = work / "prepared"
    sql = prepare(get_task("sql"), str(write_sql_sample(work / "raw" / "v4.json", 80)), prepared)
    prepare(get_task("detox"), str(write_detox_sample(work / "raw" / "paradetox.tsv", 80)), prepared)
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(tiny_model), cpu=True,
                              epochs=1, batch_size=8, max_new_tokens=12)
    model = train(write_yaml(config, work / "sql.cpu.yaml"), Path(sql.files["train"]), work / "results" / "sql")
    return {"work": work, "prepared": prepared, "model": model, "base": tiny_model}


def _argv(trained: dict[str, Path], probe: Path) -> list[str]:
    return ["--base-model", str(trained["base"]), "--model", f"sql={trained['model']}", "--tasks", "sql,detox",
            "--prepared", str(trained["prepared"]), "--name", "e2e", "--out", str(trained["work"] / "reports"),
            "--max-rows", "4", "--device", "cpu", "--probe", "builtin", "--probe", str(probe)]


def test_cli_writes_the_report_and_reuses_the_cache(trained: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    probe = trained["work"] / "stories.txt"
    probe.write_text("Once upon a time there was a cat.\n\nThe cat liked to sleep in the sun.\n")
    assert main(_argv(trained, probe)) == 0
    out = capsys.readouterr().out
    assert "retention matrix" in out and "report:" in out
    folder = trained["work"] / "reports" / "e2e"
    for name in ("report.md", "report.json", "retention.png", "eval.log"):
        assert (folder / name).stat().st_size > 0, name
    data = json.loads((folder / "report.json").read_text())
    assert data["retention"]["models"] == ["base", "sql"]
    assert data["retention"]["metric"] == {"sql": "execution_match", "detox": "J"}
    assert set(data["perplexity"]["sql"]) == {"quick", "stories"}  # "builtin" is the quick probe's old name
    assert all(v > 1.0 for by_probe in data["perplexity"].values() for v in by_probe.values())
    assert data["rows"]["sql"]["evaluated"] == 4
    assert data["settings"]["sql"]["max_new_tokens"] == 12  # from the sql adapter's own config
    assert not any(p["cached"] for p in data["pairs"])
    assert "| model | sql (execution_match) | detox (J) |" in (folder / "report.md").read_text()
    cell = data["retention"]["cells"]["sql"]["sql"]
    assert cell["score"]["n"] == 4 and cell["delta"]["low"] is not None and cell["q_value"] is not None
    assert data["baselines"]["sql"]["name"].startswith("SELECT ") and data["retention"]["baseline"]["detox"]
    assert data["pairs"][0]["row_scores"] and data["manifest"]["data"]["sql/train.csv"]["sha256"]
    assert data["contamination"]["sources"]  # the adapter's training CSV and the prepared train.csv files

    assert main(_argv(trained, probe)) == 0  # the same run again: every pair from the cache
    again = json.loads((folder / "report.json").read_text())
    assert all(p["cached"] for p in again["pairs"])
    assert again["scores"] == data["scores"] and again["perplexity"] == data["perplexity"]
    assert "load base" not in again["timings"] and "load sql" not in again["timings"]
