"""ludwig_mt.config: loading with one-line errors, schema validation, CPU rendering that never edits the original."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ludwig_mt.config import config_file, fit_lengths, load_yaml, main, render_overrides, validate
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


def write_rows(path: Path, prompts: list[str], responses: list[str]) -> Path:
    import pandas as pd

    pd.DataFrame({"prompt": prompts, "response": responses, "split": 0}).to_csv(path, index=False)
    return path


def test_fit_lengths_sets_the_four_lengths_and_leaves_the_input_alone() -> None:
    from ludwig_mt.tokens import plan_lengths

    original = load_yaml(config_file("banking77"))
    before = copy.deepcopy(original)
    fitted = fit_lengths(original, plan_lengths([1384] * 10, [10] * 10, 512, configured_input=704,
                                                configured_new_tokens=24, configured_global=2048))
    assert original == before
    assert fitted["input_features"][0]["preprocessing"]["max_sequence_length"] == 493
    assert fitted["output_features"][0]["preprocessing"]["max_sequence_length"] == 10
    assert fitted["generation"]["max_new_tokens"] == 11
    assert fitted["preprocessing"]["global_max_sequence_length"] == 512
    assert fitted["generation"]["do_sample"] is False  # the rest of the section is kept


def test_rendering_for_another_base_model_measures_the_dataset_with_its_tokenizer(tiny_model: Path,
                                                                                 tmp_path: Path) -> None:
    from ludwig_mt.tokens import load_tokenizer, token_lengths

    prompts = ["### Task: answer. " + "List the names of heads born in Alabama. " * (20 + i) +
               f"\n### Question:\nHow many heads are older than {i} ?\n### Answer:\n" for i in range(20)]
    dataset = write_rows(tmp_path / "train.csv", prompts, [f"SELECT COUNT(*) FROM head WHERE age > {i}"
                                                           for i in range(20)])
    lines: list[str] = []
    config = render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), cpu=True,
                              dataset=dataset, notify=lines.append)
    tokenizer = load_tokenizer(str(tiny_model))
    longest_prompt = max(token_lengths(tokenizer, prompts))
    longest_response = max(token_lengths(tokenizer, [f"SELECT COUNT(*) FROM head WHERE age > {i}"
                                                     for i in range(20)]))
    assert 256 < longest_prompt < 1024 - 128 - 8  # longer than sql.yaml's 256 through this tokenizer; they fit
    assert config["input_features"][0]["preprocessing"]["max_sequence_length"] == longest_prompt  # p99 of 20
    assert config["output_features"][0]["preprocessing"]["max_sequence_length"] == longest_response
    assert config["generation"]["max_new_tokens"] == 128  # sql.yaml's own, more than the responses need
    assert config["preprocessing"]["global_max_sequence_length"] == 1024  # the YAML's 2048 capped at the context
    assert len(lines) == 1 and lines[0].startswith(f"{tiny_model.name}: lengths measured on 20 rows (context 1024)")
    validate(config, "rendered", base_model=str(tiny_model))
    pinned = render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), dataset=dataset,
                              max_sequence_length=48, notify=lines.append)
    assert pinned["input_features"][0]["preprocessing"]["max_sequence_length"] == 48  # explicit values still win


def test_rendering_refuses_responses_that_do_not_fit_and_a_missing_dataset(tiny_model: Path, tmp_path: Path) -> None:
    dataset = write_rows(tmp_path / "train.csv", ["short prompt"], [" ".join(["SELECT name FROM head"] * 400)])
    with pytest.raises(WorkflowError, match=r"train.csv: responses do not fit the model's context: the longest "
                                            r"response is \d+ tokens") as info:
        render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), dataset=dataset)
    assert "\n" not in str(info.value)
    with pytest.raises(WorkflowError, match=r"nope.csv: dataset not found .*Fix: run ./run.sh prep first"):
        render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), dataset=tmp_path / "nope.csv")
    other = tmp_path / "other.csv"
    other.write_text("question,answer\nq,a\n")
    with pytest.raises(WorkflowError, match=r"other.csv: no column prompt, response \(the config's features\)"):
        render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), dataset=other)


def test_cli_prints_the_measured_lengths_on_the_terminal(tiny_model: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_rows(tmp_path / "train.csv", ["### Question:\nhow many?\n### Answer:\n"] * 3, ["SELECT 1"] * 3)
    main(["sql", "--cpu", "--base-model", str(tiny_model), "--dataset", str(dataset), "--out", str(tmp_path / "o.yaml")])
    err = capsys.readouterr().err
    assert f"{tiny_model.name}: lengths measured on 3 rows (context 1024): prompts median" in err
    assert load_yaml(tmp_path / "o.yaml")["generation"]["max_new_tokens"] > 0


def test_checkpoint_default_is_four_per_epoch_unless_the_yaml_chooses() -> None:
    from ludwig_mt.config import with_checkpoint_default

    config = load_yaml(config_file("sql"))  # batch 64, no checkpoint keys
    assert with_checkpoint_default(config, 64 * 100)["trainer"]["steps_per_checkpoint"] == 25
    assert with_checkpoint_default(config, 64 * 100, processes=4)["trainer"]["steps_per_checkpoint"] == 6
    assert "steps_per_checkpoint" not in config["trainer"]  # the input is left alone
    assert with_checkpoint_default(config, 64 * 7) is config  # 7 steps an epoch: Ludwig's one per epoch
    for key in ("steps_per_checkpoint", "checkpoints_per_epoch"):
        chosen = copy.deepcopy(config)
        chosen["trainer"][key] = 3
        assert with_checkpoint_default(chosen, 64 * 100) is chosen
