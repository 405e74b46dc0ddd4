"""ludwig_mt.launch: the commands it builds, its refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ludwig_mt import launch, strategies
from ludwig_mt.config import check_backend_section, config_file, for_raw_ludwig, load_yaml, render_overrides
from ludwig_mt.errors import WorkflowError
from ludwig_mt.strategies import ENV_DEEPSPEED, ENV_STRATEGY

LUDWIG_ARGS = ["train", "--config", "ludwig_configs/sql.yaml", "--dataset", "d.csv"]


def test_launcher_command_starts_one_worker_per_gpu_through_torchrun() -> None:
    cmd = launch.launcher_command(4, LUDWIG_ARGS, python="py", main_process_port=1234)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    flags = dict(zip(cmd[3:13:2], cmd[4:13:2]))
    assert flags == {"--nnodes": "1", "--node_rank": "0", "--nproc_per_node": "4", "--master_addr": "127.0.0.1",
                     "--master_port": "1234"}
    worker = cmd[cmd.index("-m", 3):]
    assert worker == ["-m", "ludwig_mt.launch", "worker", *LUDWIG_ARGS, "--skip_save_processed_input"]


def test_multi_node_command_uses_the_machine_rank_and_main_process() -> None:
    cmd = launch.launcher_command(8, LUDWIG_ARGS, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    flags = dict(zip(cmd[3:13:2], cmd[4:13:2]))
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"]) == ("2", "1", "10.0.0.1")
    assert flags["--master_port"] == str(launch.DEFAULT_PORT)  # every machine must agree on it
    with pytest.raises(ValueError):
        launch.launcher_command(8, LUDWIG_ARGS, num_machines=2, machine_rank=2)


def test_processed_input_cache_is_skipped_once_and_only_for_train() -> None:
    assert launch.with_skip_processed_input(LUDWIG_ARGS + ["--skip_save_processed_input"]).count(
        "--skip_save_processed_input") == 1
    assert launch.with_skip_processed_input(["predict", "--model_path", "m"]) == ["predict", "--model_path", "m"]


def test_launcher_env_sets_the_strategy_and_hides_cuda_on_cpu() -> None:
    env = launch.launcher_env("zero2", cpu=True, base={"PATH": "/bin"})
    assert env[ENV_STRATEGY] == "zero2" and env["CUDA_VISIBLE_DEVICES"] == "" and env["PATH"] == "/bin"
    assert "CUDA_VISIBLE_DEVICES" not in launch.launcher_env("ddp", base={})
    with pytest.raises(ValueError):
        launch.launcher_env("horovod", base={})


def test_parse_args_splits_launcher_and_ludwig_arguments() -> None:
    args, rest = launch.parse_args(["--gpus", "2", "--strategy", "ddp", "--", *LUDWIG_ARGS])
    assert (args.gpus, args.strategy, rest) == (2, "ddp", LUDWIG_ARGS)
    assert launch.config_path_in(rest) == "ludwig_configs/sql.yaml"
    assert launch.config_path_in(["train", "--config=x.yaml"]) == "x.yaml"


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_4bit_yaml_with_zero3_or_fsdp_stops_before_any_process_starts(
        strategy: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    assert launch.main(["--gpus", "2", "--strategy", strategy, "--", *LUDWIG_ARGS]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ludwig_configs/sql.yaml: ") and "zero2" in lines[0]


# ------------------------------------------------------------------------ the YAML's backend section (issue #18)
def plan(config: dict, *argv: str, cpu: bool = False, gpus_here: int = 4):
    args, _ = launch.parse_args([*argv, "--", *LUDWIG_ARGS])
    return launch.plan_launch(args, config, cpu=cpu, gpus_here=gpus_here, source="sql.yaml")


def test_the_yaml_alone_decides_processes_and_strategy() -> None:
    sql = load_yaml(config_file("sql"))
    spec, notes = plan(sql)
    assert (spec.processes_per_machine, spec.strategy, notes) == (4, "zero2", [])
    assert json.loads(launch.launcher_env(spec.strategy, base={}, declared=spec.declared)[ENV_DEEPSPEED]) == \
        strategies.deepspeed_settings("zero2", strategies.declared_backend(sql))  # the YAML's DeepSpeed settings
    sql["backend"]["trainer"].update(num_workers=2, strategy={"type": "ddp"})
    spec, _ = plan(sql)
    assert (spec.processes_per_machine, spec.strategy) == (2, "ddp")
    assert ENV_DEEPSPEED not in launch.launcher_env("ddp", base={ENV_DEEPSPEED: "{}"}, declared=spec.declared)


def test_flags_override_the_yaml_and_say_so() -> None:
    sql = load_yaml(config_file("sql"))
    sql["backend"]["trainer"]["num_workers"] = 2
    spec, notes = plan(sql, "--gpus", "3", "--strategy", "ddp")
    assert (spec.processes_per_machine, spec.strategy) == (3, "ddp")
    assert notes == ["--gpus 3 overrides sql.yaml's num_workers: 2", "--strategy ddp overrides sql.yaml's zero2"]


def test_one_process_is_always_a_plain_process() -> None:
    sql = load_yaml(config_file("sql"))
    assert plan(sql, gpus_here=1) == (None, [])  # one GPU: exactly `ludwig train`, no DeepSpeed engine
    assert plan(sql, "--gpus", "1")[0] is None
    spec, notes = plan(sql, cpu=True)
    assert spec is None and notes[0].startswith("--cpu: one plain process; sql.yaml declares zero2 on every visible GPU")
    spec, notes = plan(sql, gpus_here=0)
    assert spec is None and notes[0].startswith("no GPU visible: one process")
    assert plan({"model_type": "llm"}, gpus_here=8) == (None, [])  # no section: one process, as Ludwig does
    assert plan(sql, "--gpus", "1", "--strategy", "zero2")[0].strategy == "zero2"  # asked for by name: the engine


def test_declared_processes_beyond_the_visible_gpus_are_refused() -> None:
    sql = load_yaml(config_file("sql"))
    sql["backend"]["trainer"]["num_workers"] = 8
    with pytest.raises(WorkflowError, match=r"^sql.yaml: backend.trainer.num_workers: 8 processes, but 4 GPU"):
        plan(sql)


@pytest.mark.parametrize("strategy", [{"type": "fsdp"}, {"type": "deepspeed", "zero_optimization": {"stage": 3}}])
def test_4bit_yaml_declaring_zero3_or_fsdp_is_refused_before_any_work(strategy: dict, tmp_path: Path) -> None:
    sql = load_yaml(config_file("sql"))
    sql["backend"]["trainer"]["strategy"] = strategy
    with pytest.raises(WorkflowError, match="Fix: use --strategy zero2"):
        plan(sql)
    with pytest.raises(WorkflowError, match=r"^x.yaml: backend.trainer.strategy: .*4-bit"):
        check_backend_section(sql, "x.yaml")  # what every YAML check (validate) runs: plain `ludwig train` too
    check_backend_section(render_overrides(sql, cpu=True), "x.yaml")  # --cpu drops 4-bit: allowed


def test_plain_ludwig_train_of_a_multi_process_yaml_says_how_to_launch_it() -> None:
    sql = load_yaml(config_file("sql"))
    hint = strategies.launch_hint(sql, ["train", "--config", "sql.yaml"], gpus_here=4)
    assert hint.endswith("To launch them: python -m ludwig_mt.launch -- train --config sql.yaml")
    assert strategies.launch_hint(sql, ["train"], gpus_here=1) is None
    assert strategies.launch_hint(for_raw_ludwig(sql), ["train"], gpus_here=4) is None


def test_raw_ludwig_copy_has_no_backend_trainer() -> None:
    sql = load_yaml(config_file("sql"))
    assert for_raw_ludwig(sql)["backend"] == {"type": "local"} and "trainer" in sql["backend"]


@pytest.mark.parametrize("code", [None, 0, 2])
def test_a_worker_destroys_its_process_group_after_a_successful_run_only(code, tmp_path: Path, monkeypatch) -> None:
    """Left to the interpreter's exit, Gloo's threads can abort a finished rank (exit -6); after a failed run the
    group is left alone (a collective teardown would wait for ranks that went on)."""
    import ludwig.cli
    import torch.distributed as dist

    from ludwig_mt.patches import registry

    def main() -> None:
        if code is not None:
            raise SystemExit(code)

    monkeypatch.setattr(ludwig.cli, "main", main)
    monkeypatch.setattr(registry, "apply_all", lambda *args, **kwargs: None)
    monkeypatch.setattr(launch.sys, "argv", list(launch.sys.argv))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if code == 2:
            with pytest.raises(SystemExit):
                launch.worker(["train"])
        else:
            launch.worker(["train"])
        assert dist.is_initialized() == (code == 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
