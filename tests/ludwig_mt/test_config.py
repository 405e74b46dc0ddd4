"""ludwig_mt.config: loading with one-line errors, schema validation, CPU rendering that never edits the original."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ludwig_mt.config import load_yaml, render_overrides, config_file, validate
from ludwig_mt.errors import WorkflowError

def test_sql_yaml_declares_qlora() -> None:
    config = load_yaml(config_file("sql"))
    quant = config["quantization"]
    assert (quant["bits"], quant["bnb_4bit_quant_type"], quant["bnb_4bit_use_double_quant"],
            quant["bnb_4bit_compute_dtype"]) == (4, "nf4", True, "bfloat16")
    assert config["adapter"]["type"] == "lora" and config["trainer"]["type"] == "finetune"
    assert config["generation"]["max_new_tokens"] != 32  # Ludwig silently replaces exactly 32


def test_cpu_rendering_drops_cuda_only_settings_and_leaves_the_input_alone(tiny_model: Path) -> None:
    original = load_yaml(config_file("sql"))
    before = copy.deepcopy(original)
    cpu = render_overrides(original, base_model=str(tiny_model), cpu=True, epochs=1, batch_size=2)
    assert original == before
    assert "quantization" not in cpu and cpu["base_model"] == str(tiny_model)
    assert cpu["trainer"]["optimizer"]["type"] == "adamw" and cpu["trainer"]["epochs"] == 1
    validate(cpu, "rendered")


def test_unknown_config_lists_the_known_ones() -> None:
    with pytest.raises(WorkflowError, match=r"no such task config.*sql"):
        config_file("nope")
    assert config_file("sql.yaml") == config_file("sql")


@pytest.mark.parametrize(
    ("content", "expected"),
    [("a: [1, 2\n", r"bad.yaml: line \d+: invalid YAML"), ("- 1\n- 2\n", r"bad.yaml: expected a mapping")],
)
def test_bad_yaml_is_one_clear_line(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(WorkflowError, match=expected) as info:
        load_yaml(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)


def test_schema_rejection_names_the_file(tiny_model: Path) -> None:
    config = load_yaml(config_file("sql"))
    config["adapter"]["type"] = "not-an-adapter"
    with pytest.raises(WorkflowError, match="sql.yaml: rejected by Ludwig's schema"):
        validate(config, "sql.yaml", base_model=str(tiny_model))
