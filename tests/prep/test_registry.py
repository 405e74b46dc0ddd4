"""prep/registry.py and prep/task.py's record: a task's YAML, source folder and ownership come from its TaskSpec."""

from __future__ import annotations

import pytest

from ludwig_mt.config import CONFIG_DIR
from ludwig_mt.errors import WorkflowError
from prep.mix import MIX_TASK
from prep.registry import BUILTIN, TASKS, config_path, get_task, owned_by_name


def test_every_builtin_record_names_its_yaml_source_folder_scorer_and_metric() -> None:
    for spec in BUILTIN:
        assert spec.source_folder and spec.scorer and spec.primary_metric, spec.name
        if spec.ludwig_config is not None:
            assert spec.config_path() == CONFIG_DIR / spec.ludwig_config and spec.config_path().exists()
    assert get_task("sql").config_path() == CONFIG_DIR / "sql.yaml"
    assert (get_task("detox").scorer, get_task("detox").primary_metric) == ("detox", "J")


def test_config_path_is_the_records_or_the_mixtures_and_one_line_otherwise() -> None:
    assert config_path("instruct") == CONFIG_DIR / "instruct.yaml"
    assert config_path(MIX_TASK) == CONFIG_DIR / "multitask.yaml"
    with pytest.raises(WorkflowError, match="nope: no such task. Fix: use one of: .*multitask") as err:
        config_path("nope")
    with pytest.raises(WorkflowError, match="spider: evaluation-only task") as err_spider:
        config_path("spider")
    assert "\n" not in str(err.value) + str(err_spider.value)


def test_a_model_named_after_a_task_owns_it() -> None:
    assert get_task("sql").owned_by("sql") and not get_task("sql").owned_by("detox")
    assert owned_by_name("sql", ["sql", "detox"]) == ("sql",)
    assert owned_by_name("sql", ["detox"]) == ()  # not among the tasks asked about
    assert owned_by_name(MIX_TASK, list(TASKS)) == ()  # the mixture is no task: its tasks come from its data
