"""ludwig_mt/config_keys.py: the one key check of a whole task YAML (Ludwig 0.17.10 ignores unknown keys)."""

from __future__ import annotations

import copy
import json

import pytest

from ludwig_mt import config_keys
from ludwig_mt.config import CONFIG_DIR, config_file, load_yaml
from ludwig_mt.config_keys import KEY_SCHEMA_FILE, check_keys, key_tree, load_key_schema, unknown_keys
from ludwig_mt.errors import WorkflowError

SQL = CONFIG_DIR / "sql.yaml"


def test_every_committed_yaml_passes_the_key_check() -> None:
    yamls = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(yamls) >= 8
    for path in yamls:
        check_keys(load_yaml(path), str(path))


def test_an_unknown_trainer_key_is_refused_in_one_line_with_the_close_match() -> None:
    config = load_yaml(SQL)
    config["trainer"]["epochz"] = 3
    with pytest.raises(WorkflowError) as err:
        check_keys(config, str(SQL))
    line = str(err.value)
    assert "\n" not in line and "unknown key 'trainer.epochz'" in line and "rename it to 'epochs'" in line
    assert line.startswith(str(SQL))


def test_keys_are_checked_everywhere_in_the_tree() -> None:
    config = load_yaml(SQL)
    bad = copy.deepcopy(config)
    bad["input_features"][0]["preprocessing"]["max_sequence_lenght"] = 3
    bad["quantization"]["bitz"] = 4
    bad["adapter"]["rank"] = 4
    bad["topp"] = 1
    assert [where for where, _ in unknown_keys(bad, load_key_schema())] == [
        "input_features[0].preprocessing.max_sequence_lenght", "quantization.bitz", "adapter.rank", "topp"]


def test_trainer_keys_follow_the_trainer_type() -> None:
    """Ludwig 0.17.10 declares ``packing`` on the zero-shot trainer (type none) only; the finetune trainer drops it
    unread, so the task YAMLs (type finetune) never packed: the key check refuses it there."""
    config = load_yaml(SQL)
    config["trainer"]["packing"] = True
    assert [where for where, _ in unknown_keys(config, load_key_schema())] == ["trainer.packing"]
    config["trainer"] = {"type": "none", "packing": True}
    assert unknown_keys(config, load_key_schema()) == []


def test_project_sections_join_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**load_yaml(SQL), "ludwig_mt": {"anything": 1}}
    assert [where for where, _ in unknown_keys(config, load_key_schema())] == ["ludwig_mt"]
    monkeypatch.setitem(config_keys.PROJECT_SECTIONS, "ludwig_mt", True)
    assert unknown_keys(config, load_key_schema()) == []


def test_key_tree_keeps_discriminated_cases_and_merges_branches() -> None:
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"type": {"default": "x"}},
              "allOf": [{"if": {"properties": {"type": {"const": "x"}}}, "then": {"properties": {"only_x": {}}}},
                        {"if": {"properties": {"type": {"const": "y"}}}, "then": {"properties": {"only_y": {}}}}]},
        "b": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {"c": {}}}]},
        "free": {"type": "object"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"name": {}}}}}}
    tree = key_tree(schema)
    assert unknown_keys({"a": {"only_x": 1}, "b": {"c": 1}, "free": {"z": 1}, "items": [{"name": 1}]}, tree) == []
    found = [where for where, _ in unknown_keys({"a": {"only_y": 1}, "b": {"d": 1}, "items": [{"nam": 1}]}, tree)]
    assert found == ["a.only_y", "b.d", "items[0].nam"]
    assert unknown_keys({"a": {"type": "y", "only_y": 1}}, tree) == []


@pytest.mark.slow  # imports Ludwig (~20 s in a fresh process)
def test_the_committed_snapshot_is_what_the_installed_ludwig_declares() -> None:
    import ludwig

    snapshot = json.loads(KEY_SCHEMA_FILE.read_text(encoding="utf-8"))
    assert snapshot["ludwig"] == ludwig.__version__
    assert snapshot["tree"] == json.loads(json.dumps(config_keys.ludwig_key_tree())), \
        "regenerate: python -m ludwig_mt.config --write-key-schema"


def test_the_backend_section_is_checked_by_the_same_key_check() -> None:
    """Ludwig's schema takes any mapping under ``backend``: the project's check refuses a bad section (issue #18)."""
    config = load_yaml(config_file("sql"))
    config["backend"]["trainer"]["num_wrokers"] = 2
    with pytest.raises(WorkflowError, match=r"^sql.yaml: backend.trainer.num_wrokers: unknown key"):
        check_keys(config, "sql.yaml")
