"""Every YAML in ludwig_configs/: valid for Ludwig's own schema, runnable as its header says, and trainable.

Like litgpt's test_config_hub.py: a config that does not load and train is a bug in the product.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ludwig_mt.config import CONFIG_DIR, load_yaml, render_overrides, validate, write_yaml
from prep.mix import MIX_CONFIG, MIX_TASK, build_mixture
from prep.registry import TASKS, config_path, get_task
from prep.task import prepare
from workflow.train import train
from tests.prep.published_fixtures import WRITERS

TASK_YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))
MIX = {"sql": 12, "detox": 12}


def test_every_trainable_task_has_a_yaml() -> None:
    # spider is evaluation-only; stories is replay rows for a mix (the demo's remedy), never trained alone
    trainable = {name for name in WRITERS if name not in ("spider", "stories")}
    assert trainable | {"multitask"} <= {p.stem for p in TASK_YAMLS}
    assert all(p.stem in TASKS or p.stem == "multitask" for p in TASK_YAMLS)
    # the records name them: every built-in task's YAML, the mixture's, and nothing else
    assert {config_path(name) for name in trainable} | {config_path(MIX_TASK)} == set(TASK_YAMLS)
    assert config_path(MIX_TASK).name == MIX_CONFIG and get_task("spider").ludwig_config is None


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_yaml_is_valid_for_ludwig(path: Path, tiny_model: Path) -> None:
    validate(load_yaml(path), str(path), base_model=str(tiny_model))


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_yaml_header_states_the_commands_that_run_it(path: Path) -> None:
    head = path.read_text(encoding="utf-8").split("\nmodel_type:")[0]
    assert f"ludwig train --config ludwig_configs/{path.name} --dataset data/prepared/{path.stem}/train.csv" in head
    assert f"ludwig predict --model_path results/{path.stem}/experiment_run/model" in head
    assert "./run.sh prep" in head and "ludwig_configs/distributed/" in head
    assert f"./run.sh train {path.stem} --gpus 4" in head


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_yaml_generation_never_uses_the_value_ludwig_overrides(path: Path) -> None:
    config = load_yaml(path)
    assert config["generation"]["max_new_tokens"] != 32
    assert config["quantization"]["bits"] == 4 and config["adapter"]["type"] == "lora"
    assert config["preprocessing"]["split"] == {"type": "fixed", "column": "split"}


def prepared_task(task: str, root: Path) -> Path:
    """The task's train.csv, prepared from fixture rows in its published format."""
    if task == "multitask":
        for name in MIX:
            prepare(get_task(name), str(WRITERS[name](root / "src" / name)), root / "prepared")
        build_mixture(root / "prepared", MIX, root / "prepared")
    else:
        prepare(get_task(task), str(WRITERS[task](root / "src")), root / "prepared")
    return root / "prepared" / task / "train.csv"


@pytest.mark.slow
@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_yaml_trains_on_its_prepared_data(path: Path, tiny_model: Path, tmp_path: Path) -> None:
    train_csv = prepared_task(path.stem, tmp_path)
    config = load_yaml(path)
    columns = set(pd.read_csv(train_csv, nrows=1).columns)
    names = {f["name"] for f in config["input_features"] + config["output_features"]}
    assert names | {"split"} <= columns  # the YAML reads what prep writes
    cpu = render_overrides(config, base_model=str(tiny_model), cpu=True, epochs=1, batch_size=4,
                           max_sequence_length=48, max_new_tokens=4)
    model = train(write_yaml(cpu, tmp_path / "cpu.yaml"), train_csv, tmp_path / "results")
    assert any((model / "model_weights").rglob("adapter_model.*"))
