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


def test_every_task_yaml_declares_deepspeed_zero2_on_every_visible_gpu() -> None:
    for path in sorted(config_file("sql").parent.glob("*.yaml")):
        declared = strategies.declared_backend(load_yaml(path), str(path))
        assert (declared.strategy, declared.num_workers) == ("zero2", "auto"), path
        assert declared.deepspeed["zero_optimization"]["stage"] == 2
        assert not set(strategies.TRAINER_OWNED_KEYS) & set(declared.deepspeed)  # batch sizes come from trainer:


def section(trainer: object) -> dict:
    return {"backend": {"type": "local", "trainer": trainer}}


def test_declared_backend_reads_ludwigs_earlier_form_and_plain_local() -> None:
    assert strategies.declared_backend({}) == strategies.DeclaredBackend()
    assert strategies.declared_backend({"backend": "local"}).strategy is None
    assert strategies.declared_backend({"backend": {"type": "local"}}).num_workers == 1
    zero3 = strategies.declared_backend(section({"num_workers": 4, "use_gpu": True, "strategy": {
        "type": "deepspeed", "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}}))
    assert (zero3.strategy, zero3.num_workers) == ("zero3", 4)
    assert zero3.deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert strategies.declared_backend(section({"strategy": "ddp"})) == strategies.DeclaredBackend("ddp", "auto")
    assert strategies.declared_backend(section({"strategy": {"type": "fsdp"}, "num_workers": 2})).strategy == "fsdp"


@pytest.mark.parametrize("config, key", [
    ({"backend": {"type": "ray"}}, "backend.type"),
    ({"backend": {"type": "local", "trainerz": {}}}, "backend.trainerz"),
    (section({"num_workers": 0}), "backend.trainer.num_workers"),
    (section({"num_workers": "all"}), "backend.trainer.num_workers"),
    (section({"strategy": {"type": "horovod"}}), "backend.trainer.strategy.type"),
    (section({"strategy": {"type": "deepspeed", "zero_optimization": {"stage": 1}}}),
     "backend.trainer.strategy.zero_optimization.stage"),
    (section({"strategy": {"type": "deepspeed", "zero_optimization": {"stage": 2}, "train_batch_size": 64}}),
     "backend.trainer.strategy.train_batch_size"),
    (section({"strategy": {"type": "ddp", "static_graph": True}}), "backend.trainer.strategy.static_graph"),
    (section({"num_workers": 2, "epochs": 3}), "backend.trainer.epochs"),
])
def test_a_bad_backend_section_is_refused_in_one_line_naming_the_key(config: dict, key: str) -> None:
    with pytest.raises(WorkflowError) as err:
        strategies.declared_backend(config, "x.yaml")
    assert str(err.value).startswith(f"x.yaml: {key}") and "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_settings_keep_the_yamls_and_take_the_stage_of_the_strategy_run() -> None:
    declared = strategies.declared_backend(load_yaml(config_file("sql")))
    assert strategies.deepspeed_settings("zero2", declared) == dict(declared.deepspeed)
    zero3 = strategies.deepspeed_settings("zero3", declared)  # --strategy zero3 over a zero2 YAML
    assert zero3["zero_optimization"] == {**declared.deepspeed["zero_optimization"], "stage": 3}
    assert declared.deepspeed["zero_optimization"]["stage"] == 2  # not modified
    bare = strategies.deepspeed_settings("zero2", strategies.DeclaredBackend())
    assert bare["zero_optimization"] == {"stage": 2} and bare["zero_allow_untested_optimizer"] is True


def test_workers_take_the_launchers_settings_or_the_defaults() -> None:
    env = {strategies.ENV_DEEPSPEED: '{"zero_optimization": {"stage": 3, "overlap_comm": false}}'}
    assert strategies.worker_deepspeed_settings("zero3", env)["zero_optimization"]["overlap_comm"] is False
    assert strategies.worker_deepspeed_settings("zero3", {})["zero_optimization"] == {"stage": 3}


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
