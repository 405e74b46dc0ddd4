"""The SQL slice end to end with the real commands: prep -> `ludwig train` -> `ludwig predict`, offline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from prep.registry import get_task
from workflow.demo import predict
from workflow.train import ludwig_executable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_sql_run: dict[str, Path]) -> dict[str, Path]:
    return tiny_sql_run


def test_ludwig_train_writes_a_model_with_adapter_weights(trained: dict[str, Path]) -> None:
    model = trained["model"]
    assert (model / "model_hyperparameters.json").exists()
    assert any((model / "model_weights").rglob("adapter_model.*"))


def test_ludwig_predict_cli_on_held_out_rows(trained: dict[str, Path]) -> None:
    out = trained["work"] / "pred"
    predictions = pd.read_parquet(predict(trained["model"], trained["test"], out, trained["work"] / "p.log"))
    test = pd.read_csv(trained["test"], keep_default_na=False)
    assert len(predictions) == len(test) > 0
    assert "response_response" in predictions.columns


def test_ludwig_predict_needs_no_response_column(trained: dict[str, Path]) -> None:
    prompts_only = trained["work"] / "prompts.csv"
    pd.read_csv(trained["test"], keep_default_na=False)[["prompt"]].to_csv(prompts_only, index=False)
    predictions = pd.read_parquet(predict(trained["model"], prompts_only, trained["work"] / "pred2",
                                          trained["work"] / "p2.log"))
    assert len(predictions) == len(pd.read_csv(prompts_only))


def test_raw_ludwig_predict_fails_on_the_same_model(trained: dict[str, Path]) -> None:
    env = dict(os.environ, LUDWIG_MT_NO_FIXES="1")
    proc = subprocess.run([ludwig_executable(), "predict", "--model_path", str(trained["model"]), "--dataset",
                           str(trained["test"]), "--output_directory", str(trained["work"] / "raw")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "None is not of type 'object'" in proc.stderr


def test_ludwig_model_load_in_process(trained: dict[str, Path]) -> None:
    from ludwig.api import LudwigModel

    model = LudwigModel.load(str(trained["model"]))
    test = pd.read_csv(trained["test"], keep_default_na=False)
    predictions, _ = model.predict(test[["prompt"]].head(2))
    assert len(predictions) == 2


def test_4bit_yaml_on_cpu_stops_before_any_work_with_one_line(tiny_model: Path, tmp_path: Path,
                                                              trained: dict[str, Path]) -> None:
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(tiny_model))  # keeps 4-bit
    assert "quantization" in config
    out = tmp_path / "results"
    proc = subprocess.run([ludwig_executable(), "train", "--config", str(write_yaml(config, tmp_path / "q.yaml")),
                           "--dataset", str(trained["test"]), "--output_directory", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0] and "--cpu" in errors[0]
    assert not out.exists()
