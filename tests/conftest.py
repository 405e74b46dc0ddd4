"""Shared fixtures: everything offline, built by the tests themselves (no ../shared, no Hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama + BPE tokenizer, saved with save_pretrained; built once per test session."""
    from ludwig_mt.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sql_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real `ludwig train` of the SQL task on the tiny model (120 sample rows, one CPU epoch), shared by the
    tests that need a trained Ludwig model folder: {"work": its folder, "model": the model, "test": test.csv}."""
    from ludwig_mt.config import load_yaml, render_overrides, write_yaml
    from prep.registry import get_task
    from prep.task import prepare
    from workflow.samples import write_sql_sample
    from workflow.train import train

    work = tmp_path_factory.mktemp("slice")
    report = prepare(get_task("sql"), str(write_sql_sample(work / "v4.json", 120)), work / "prepared")
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(tiny_model), cpu=True,
                              epochs=1, batch_size=8, max_new_tokens=12)
    model = train(write_yaml(config, work / "sql.cpu.yaml"), Path(report.files["train"]), work / "results")
    return {"work": work, "model": model, "test": Path(report.files["test"])}
