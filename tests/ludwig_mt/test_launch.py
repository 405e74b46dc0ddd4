"""ludwig_mt.launch: the commands it builds, its refusals."""

from __future__ import annotations

import subprocess

import pytest

from ludwig_mt import launch
from ludwig_mt.strategies import ENV_STRATEGY

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
