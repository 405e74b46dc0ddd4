"""workflow/demo.py: the readings (a)(b)(c) come from report.json as it is; the shipped data is what it claims;
the terminal shows the demo's own progress and summary, not library chatter."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from transformers.utils import logging as hf_logging

from eval.contamination import probe_overlap
from eval.retention import BASE, CellInput, ProbeInput, build_retention
from eval.runner import read_probe
from prep.mix import MIX_TASK
from prep.registry import get_task
from prep.task import PROMPT, RESPONSE, prepare
from workflow import demo
from workflow.demo import (
    PROBE,
    STORIES,
    DemoSettings,
    cpu_lengths,
    head_csv,
    probe_file,
    quiet_library_chatter,
    readings,
    summary,
)


def report_json(accuracy: dict[str, float], nll_per_token: dict[str, float], rows: int = 200,
                texts: int = 100) -> dict[str, Any]:
    """A report.json's retention section from hand-made rows: accuracy = share of rows right, each probe text of
    10 tokens with the given NLL per token (plus a little text-to-text spread), through eval's own code."""
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 0.05, texts)

    def correct(share: float) -> np.ndarray:
        return (np.arange(rows) < round(share * rows)).astype(float)

    inputs = {m: {"banking77": CellInput(correct(a), (float(correct(a).mean()),), {"accuracy": float(correct(a).mean())})}
              for m, a in accuracy.items()}
    probes = {m: {"tinystories": ProbeInput((nll + spread) * 10, np.full(texts, 10.0))}
              for m, nll in nll_per_token.items()}
    retention = build_retention(inputs, ["banking77"], {"banking77": ["banking77"], MIX_TASK: ["banking77", "stories"]},
                                {"banking77": "accuracy"}, baseline={"banking77": correct(0.02)}, probes=probes)
    return json.loads(json.dumps({"retention": retention.as_dict()}))  # the JSON round trip report.json makes


def test_readings_are_computed_from_the_report() -> None:
    report = report_json({BASE: 0.0, "banking77": 0.10, MIX_TASK: 0.08}, {BASE: 1.2, "banking77": 2.0, MIX_TASK: 1.4})
    cells, ppl = report["retention"]["cells"], report["retention"]["perplexity"]
    out = readings(report)
    gain = cells["banking77"]["banking77"]["delta"]
    assert f"accuracy 0.000 -> 0.100: change {gain['value']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]" \
        in out["gain"]
    assert "(significant" in out["gain"] and "trivial baseline 0.020" in out["gain"]
    forget = ppl["banking77"]["tinystories"]["delta"]
    assert f"change {100 * forget['value']:+.1f} % [{100 * forget['low']:+.1f}, {100 * forget['high']:+.1f}]" \
        in out["forgetting"]
    assert f"{ppl[BASE]['tinystories']['score']['value']:.2f} -> " in out["forgetting"]
    assert "multitask forgot less than banking77 (intervals do not overlap)" in out["remedy"]
    mix_gain = cells[MIX_TASK]["banking77"]["delta"]["value"]
    assert f"banking77 change {mix_gain:+.3f}" in out["remedy"]


def test_readings_report_what_comes_out_either_way() -> None:
    worse = readings(report_json({BASE: 0.0, "banking77": 0.0, MIX_TASK: 0.0},
                                 {BASE: 1.2, "banking77": 1.3, MIX_TASK: 1.6}))
    assert "no significant change" in worse["gain"]
    assert "multitask forgot more than banking77" in worse["remedy"]
    same = readings(report_json({BASE: 0.0, "banking77": 0.1, MIX_TASK: 0.1},
                                {BASE: 1.2, "banking77": 1.5, MIX_TASK: 1.5}))
    assert "overlap: not distinguishable at this size" in same["remedy"]


def test_summary_shows_the_three_readings_and_timings() -> None:
    from rich.console import Console

    report = report_json({BASE: 0.0, "banking77": 0.10, MIX_TASK: 0.08}, {BASE: 1.2, "banking77": 2.0, MIX_TASK: 1.4})
    result = {"rows": {"banking77": {"rows_out": {"train": 950, "validation": 50, "test": 300}}},
              "timings": {"ludwig train banking77": 30.0, "eval": 20.0}, "paths": {"eval report": "r/report.md"},
              "settings": asdict(DemoSettings()), "report": report, "predict_agreement": (38, 40)}
    console = Console(width=200, record=True)
    console.print(summary(result))
    text = console.export_text()
    assert "(a) learned" in text and "(b) forgot" in text and "(c) remedy" in text
    assert "time: total" in text and "50.0 s" in text and "38 of 40 answers identical" in text


def test_cpu_lengths_cut_prompts_and_fit_the_merged_row() -> None:
    config = {"input_features": [{"name": "prompt", "preprocessing": {"max_sequence_length": 470}}],
              "output_features": [{"name": "response", "preprocessing": {"max_sequence_length": 33}}],
              "preprocessing": {"global_max_sequence_length": 512}}
    out = cpu_lengths(config, 96)
    assert out["input_features"][0]["preprocessing"]["max_sequence_length"] == 96
    assert out["preprocessing"]["global_max_sequence_length"] == 96 + 33 + 1
    assert config["input_features"][0]["preprocessing"]["max_sequence_length"] == 470  # input untouched
    assert cpu_lengths(config, 600)["input_features"][0]["preprocessing"]["max_sequence_length"] == 470  # never longer


def test_heads_of_the_shipped_slices(tmp_path: Path) -> None:
    train = head_csv(demo.BANKING77 / "train.csv", tmp_path / "train.csv", 50)
    assert len(pd.read_csv(train)) == 50
    shipped = pd.read_csv(demo.BANKING77 / "train.csv")
    assert len(shipped) == 2000 and shipped["category"].nunique() == 77  # a hash-ordered sample of every intent
    probe = probe_file(PROBE, tmp_path / "probe.txt", 7)
    assert read_probe(probe).texts == read_probe(PROBE).texts[:7]


def test_replay_stories_share_no_text_with_the_forgetting_probe(tmp_path: Path) -> None:
    prepare(get_task("stories"), str(STORIES), tmp_path)
    rows = pd.concat([pd.read_csv(tmp_path / "stories" / f, keep_default_na=False) for f in ("train.csv", "test.csv")])
    assert len(rows) >= 390  # 400 shipped stories, a few duplicates at most
    texts = (rows[PROMPT] + " " + rows[RESPONSE]).tolist()
    assert probe_overlap(texts, read_probe(PROBE).texts) == ()
    probe_stories = {" ".join(t.split()) for t in read_probe(PROBE).texts}
    assert not probe_stories & {" ".join(t.split()) for t in texts}


def test_quiet_library_chatter_silences_torch_deprecations_and_transformers_bars() -> None:
    pytree = logging.getLogger("torch.utils._pytree")
    level, bars = pytree.level, hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        pytree.setLevel(logging.NOTSET)
        quiet_library_chatter()
        assert not hf_logging.is_progress_bar_enabled()
        assert not pytree.isEnabledFor(logging.WARNING)
    finally:
        pytree.setLevel(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@pytest.mark.slow
def test_demo_end_to_end_on_a_few_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path (prep -> ludwig train x2 -> ludwig predict -> eval) on stories260k, with few rows: it runs,
    and its readings come from the report it wrote."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ludwig processes, as the demo runs them
    settings = DemoSettings(train_rows=40, test_rows=12, replay_rows=10, probe_texts=6, epochs=1, predict_rows=4)
    result = demo.run_demo(tmp_path, settings)
    report = json.loads((tmp_path / "reports" / "demo" / "report.json").read_text())
    assert report["retention"]["models"] == [BASE, "banking77", MIX_TASK]
    assert report["probes"] == {"tinystories_valid": 6}
    assert readings(result["report"]) == readings(report)
    assert result["predict_agreement"][1] == 4


def test_merge_option_lists_methods_and_other_settings_keep_their_defaults() -> None:
    from workflow.demo import DemoSettings, parse_args

    workdir, settings = parse_args(["--merge", "ties, linear", "--epochs", "3"])
    assert settings.merges == ("ties", "linear") and settings.epochs == 3 and workdir == Path("runs/demo")
    assert parse_args([])[1] == DemoSettings()
