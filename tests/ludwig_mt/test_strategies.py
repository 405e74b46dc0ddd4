"""ludwig_mt.strategies: the strategy names and switch, the refused combinations, the rendered DeepSpeed files."""

from __future__ import annotations

import pytest

from ludwig_mt import strategies
from ludwig_mt.config import load_yaml, render_overrides, config_file
from ludwig_mt.errors import WorkflowError


def test_zero3_and_fsdp_are_refused_for_4bit_with_the_reason_and_the_fix() -> None:
    qlora = load_yaml(config_file("sql"))
    for strategy, reason in (("zero3", "4-bit"), ("fsdp", "bnb_4bit_quant_storage")):
        with pytest.raises(WorkflowError, match="--strategy zero2") as err:
            strategies.check_strategy_compatible(strategy, qlora)
        assert reason in str(err.value) and "\n" not in str(err.value)
    for config in (qlora, render_overrides(qlora, cpu=True)):
        strategies.check_strategy_compatible("zero2", config)
        strategies.check_strategy_compatible("ddp", config)
    for strategy in strategies.SHARDED_WEIGHT_STRATEGIES:  # no quantization: allowed
        strategies.check_strategy_compatible(strategy, render_overrides(qlora, cpu=True))


@pytest.mark.parametrize("strategy", strategies.SHARDED_WEIGHT_STRATEGIES)
def test_sharded_weights_refuse_merging_the_adapter_into_sharded_base_weights(strategy: str) -> None:
    config = render_overrides(load_yaml(config_file("sql")), cpu=True)
    config["adapter"]["postprocessor"] = {"merge_adapter_into_base_model": True}
    with pytest.raises(WorkflowError, match="merge_adapter_into_base_model") as err:
        strategies.check_strategy_compatible(strategy, config)
    assert "\n" not in str(err.value)
    strategies.check_strategy_compatible("zero2", config)


def test_zero3_file_is_stage_3_and_comments_are_dropped_at_every_depth() -> None:
    class Trainer:
        batch_size, gradient_accumulation_steps, gradient_clipping = 4, 1, None

    config = strategies.deepspeed_config("zero3", Trainer(), world_size=2)
    assert config["zero_optimization"]["stage"] == 3 and config["train_batch_size"] == 8
    assert strategies.without_comments({"_a": 1, "b": {"_c": 2, "d": [3]}}) == {"b": {"d": [3]}}
    assert not any(k.startswith("_") for k in config["zero_optimization"])


def test_deepspeed_config_takes_batch_sizes_and_clipping_from_the_trainer() -> None:
    class Clip:
        clipglobalnorm = 0.5

    class Trainer:
        batch_size, gradient_accumulation_steps, gradient_clipping = 8, 2, Clip()

    config = strategies.deepspeed_config("zero2", Trainer(), world_size=4)
    assert config["zero_optimization"]["stage"] == 2
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (8, 2)
    assert config["train_batch_size"] == 64 and config["gradient_clipping"] == 0.5
    assert not any(key.startswith("_") for key in config)
    Trainer.batch_size = "auto"
    with pytest.raises(WorkflowError, match="trainer.batch_size"):
        strategies.deepspeed_config("zero2", Trainer(), world_size=4)


def test_every_strategy_is_documented_and_its_file_exists() -> None:
    readme = (strategies.DISTRIBUTED_CONFIG_DIR / "README.md").read_text(encoding="utf-8")
    for name in strategies.STRATEGIES:
        assert f"--strategy {name}" in readme
    for file in filter(None, strategies.STRATEGY_FILES.values()):
        assert (strategies.DISTRIBUTED_CONFIG_DIR / file).exists() and file in readme


def test_strategy_comes_from_the_launcher_switch_or_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(strategies.ENV_STRATEGY, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert strategies.strategy_name() is None and not strategies.is_distributed_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert strategies.strategy_name() == "ddp"
    monkeypatch.setenv(strategies.ENV_STRATEGY, "zero2")
    assert strategies.strategy_name() == "zero2"
    monkeypatch.setenv(strategies.ENV_STRATEGY, "horovod")
    with pytest.raises(WorkflowError, match="unknown strategy"):
        strategies.strategy_name()


def test_default_strategy_is_zero2_for_qlora_and_ddp_otherwise() -> None:
    assert strategies.default_strategy({"quantization": {"bits": 4}}) == "zero2"
    assert strategies.default_strategy({"model_type": "llm"}) == "ddp"
