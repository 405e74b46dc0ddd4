"""workflow/train.py (./run.sh train): plain ``ludwig train``, or the launcher with --gpus; resuming the newest run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ludwig_mt.errors import WorkflowError
from ludwig_mt.strategies import ENV_STRATEGY
from workflow import train


def fake_run(calls: list, out: Path):
    """Stands in for subprocess.run in workflow.train: records the call, writes a trained-model folder."""
    def run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        (out / "experiment_run" / "model").mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0)
    return run


@pytest.fixture
def ludwig_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, Path]:
    """The (command, environment) of every ``ludwig train`` workflow.train would start, none started; a dataset."""
    calls: list = []
    monkeypatch.setattr(train.subprocess, "run", fake_run(calls, tmp_path))
    dataset = tmp_path / "train.csv"
    dataset.write_text("prompt,response,split\n")
    return calls, dataset


def test_run_sh_train_with_gpus_goes_through_the_launcher(tmp_path: Path, ludwig_calls: tuple[list, Path]) -> None:
    calls, dataset = ludwig_calls
    code = train.main(["sql", "--dataset", str(dataset), "--output-directory", str(tmp_path), "--gpus", "4",
                       "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1"])
    assert code == 0
    (cmd, env), = calls
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[cmd.index("--node_rank") + 1] == "1"
    assert env[ENV_STRATEGY] == "zero2"  # the YAML is 4-bit QLoRA
    assert cmd[cmd.index("--config") + 1].endswith("ludwig_configs/sql.yaml")


def test_run_sh_train_without_gpus_is_plain_ludwig_train(tmp_path: Path, ludwig_calls: tuple[list, Path]) -> None:
    calls, dataset = ludwig_calls
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


def test_run_sh_train_takes_the_yaml_from_the_task_record(tmp_path: Path, ludwig_calls: tuple[list, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    calls, dataset = ludwig_calls
    assert train.main(["multitask", "--dataset", str(dataset), "--output-directory", str(tmp_path)]) == 0
    (cmd, _), = calls
    assert cmd[cmd.index("--config") + 1].endswith("ludwig_configs/multitask.yaml")
    assert train.main(["spider"]) == 2 and train.main(["nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    notes, errors = [x for x in lines if x.startswith("note: ")], [x for x in lines if not x.startswith("note: ")]
    assert all("multitask.yaml declares zero2 on every visible GPU" in x for x in notes)  # what became of the section
    assert errors[0].startswith("error: spider: evaluation-only task") and errors[1].startswith("error: nope: no such")
    assert len(errors) == 2 and len(calls) == 1
