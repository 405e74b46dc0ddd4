"""bench/publish_report.py: a committed report leaves out the samples of tasks whose licence forbids it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("publish_report", ROOT / "bench" / "publish_report.py")
publish = importlib.util.module_from_spec(spec)
spec.loader.exec_module(publish)


def test_samsum_samples_are_left_out_and_the_rest_is_kept() -> None:
    text = ("# Eval report\n### samsum\n| model | rougeL |\nSample outputs (first 3):\n| row | input |\n| 1 | Amanda: hi |\n"
            "### sql\nSample outputs (first 3):\n| 1 | SELECT |\n")
    out = publish.strip_markdown(text, ("samsum",))
    assert "Amanda" not in out and "| model | rougeL |" in out and "| 1 | SELECT |" in out
    assert "Sample outputs: omitted" in out
    data = publish.strip_json({"samples": {"samsum": {"x": ["Amanda: hi"]}, "sql": {"x": ["q"]}}}, ("samsum",))
    assert "Amanda" not in str(data) and data["samples"]["sql"] == {"x": ["q"]}
