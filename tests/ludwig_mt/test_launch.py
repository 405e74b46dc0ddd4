"""ludwig_mt.launch and the launcher options of ./run.sh train: the commands they build, their refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ludwig_mt import launch, train
from ludwig_mt.distributed import ENV_STRATEGY
from ludwig_mt.errors import WorkflowError

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


def test_default_strategy_is_zero2_for_qlora_and_ddp_otherwise() -> None:
    assert launch.default_strategy({"quantization": {"bits": 4}}) == "zero2"
    assert launch.default_strategy({"model_type": "llm"}) == "ddp"


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_4bit_yaml_with_zero3_or_fsdp_stops_before_any_process_starts(
        strategy: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    assert launch.main(["--gpus", "2", "--strategy", strategy, "--", *LUDWIG_ARGS]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ludwig_configs/sql.yaml: ") and "zero2" in lines[0]


def fake_run(calls: list, out: Path):
    """Stands in for subprocess.run in ludwig_mt.train: records the call, writes a trained-model folder."""
    def run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        (out / "experiment_run" / "model").mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_run_sh_train_with_gpus_goes_through_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(train.subprocess, "run", fake_run(calls, tmp_path))
    dataset = tmp_path / "train.csv"
    dataset.write_text("prompt,response,split\n")
    code = train.main(["sql", "--dataset", str(dataset), "--output-directory", str(tmp_path), "--gpus", "4",
                       "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1"])
    assert code == 0
    (cmd, env), = calls
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[cmd.index("--node_rank") + 1] == "1"
    assert env[ENV_STRATEGY] == "zero2"  # the YAML is 4-bit QLoRA
    assert cmd[cmd.index("--config") + 1].endswith("ludwig_configs/sql.yaml")


def test_run_sh_train_without_gpus_is_plain_ludwig_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(train.subprocess, "run", fake_run(calls, tmp_path))
    dataset = tmp_path / "train.csv"
    dataset.write_text("prompt,response,split\n")
    assert train.main(["sql", "--dataset", str(dataset), "--output-directory", str(tmp_path)]) == 0
    (cmd, env), = calls
    assert Path(cmd[0]).name == "ludwig" and cmd[1] == "train" and ENV_STRATEGY not in env


def test_resume_continues_the_newest_run_with_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="no run with a checkpoint"):
        train.resume_args(tmp_path)
    for run in ("experiment_run", "experiment_run_1"):
        checkpoints = tmp_path / run / "model" / "training_checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "latest.ckpt").write_bytes(b"")
    assert train.resume_args(tmp_path) == ["--model_resume_path", str(tmp_path / "experiment_run_1")]
