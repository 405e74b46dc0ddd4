"""ludwig_mt/preflight.py: every input of a training run checked before Ludwig starts, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ludwig_mt.config import CONFIG_DIR, load_yaml
from ludwig_mt.errors import WorkflowError
from ludwig_mt.preflight import (check_base_model, check_base_model_folder, check_context, check_dataset,
                                 check_devices)

SQL = load_yaml(CONFIG_DIR / "sql.yaml")


def model_folder(root: Path, *, weights: bool = True, tokenizer: bool = True, context: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": context}))
    if weights:
        (root / "model.safetensors").write_bytes(b"x")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Fix:" in text
    return text


@pytest.mark.parametrize(("kwargs", "says"), [({"weights": False}, "no weights"),
                                              ({"tokenizer": False}, "no tokenizer files")])
def test_a_base_model_folder_needs_weights_and_a_tokenizer(tmp_path: Path, kwargs: dict, says: str) -> None:
    folder = model_folder(tmp_path / "m", **kwargs)
    with pytest.raises(WorkflowError) as err:
        check_base_model_folder(folder, "--base-model")
    assert one_line(err).startswith(str(folder)) and says in str(err.value)
    assert check_base_model_folder(model_folder(tmp_path / "ok", context=96), "--base-model") == 96


def test_a_missing_folder_or_an_uncached_hub_id_offline_is_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WorkflowError, match="base model folder not found"):
        check_base_model(str(tmp_path / "nope"), "--base-model", offline=True)
    with pytest.raises(WorkflowError, match="not in the local Hugging Face cache"):
        check_base_model("no-such-org/no-such-model", "base_model in sql.yaml", offline=True)
    assert check_base_model("no-such-org/no-such-model", "base_model in sql.yaml", offline=False) is None


def test_sequence_lengths_beyond_the_context_are_refused() -> None:
    with pytest.raises(WorkflowError) as err:
        check_context(SQL, 64, "tiny", "sql.yaml")  # 256 + 128 tokens per row
    assert "more than tiny's context of 64" in one_line(err)
    check_context(SQL, 32768, "Qwen", "sql.yaml")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty file"),
    ("prompt,response,split\n", "no rows, only a header"),
    ("prompt,split\nq,0\nq,0\n", "no column response"),
    ("prompt,response\nq,a\n", "no column split"),
    ("prompt,response,split\nq,a,0\nq,a,1\n", "1 training row(s), fewer than one batch of 64"),
])
def test_bad_datasets_are_refused_in_one_line(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path / "train.csv", text)
    with pytest.raises(WorkflowError) as err:
        check_dataset(path, SQL, 64)
    assert one_line(err).startswith(str(path)) and says in str(err.value)


def test_a_dataset_with_a_batch_of_training_rows_passes(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "prompt,response,split\n" + "q,a,0\n" * 4 + "q,a,1\n")
    found = check_dataset(path, SQL, 4)
    assert (found.rows, found.train_rows) == (5, 4)
    with pytest.raises(WorkflowError, match="dataset not found"):
        check_dataset(tmp_path / "missing.csv", SQL, 4)


def test_gpus_are_required_by_4bit_and_by_gpus_n_unless_cpu() -> None:
    with pytest.raises(WorkflowError) as err:
        check_devices(SQL, gpus=None, cpu=False, cuda_devices=0, source="sql.yaml")
    assert "4-bit quantization needs a CUDA GPU" in one_line(err) and "--cpu" in str(err.value)
    cpu_yaml = {k: v for k, v in SQL.items() if k != "quantization"}
    with pytest.raises(WorkflowError) as err:
        check_devices(cpu_yaml, gpus=2, cpu=False, cuda_devices=0, source="sql.yaml")
    assert one_line(err).startswith("--gpus 2: none visible") and "--cpu" in str(err.value)
    with pytest.raises(WorkflowError, match="only 1 visible"):
        check_devices(SQL, gpus=2, cpu=False, cuda_devices=1, source="sql.yaml")
    check_devices(SQL, gpus=2, cpu=True, cuda_devices=0, source="sql.yaml")
    check_devices(SQL, gpus=2, cpu=False, cuda_devices=2, source="sql.yaml")
