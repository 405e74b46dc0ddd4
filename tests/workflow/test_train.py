"""workflow/train.py (./run.sh train): plain ``ludwig train``, or the launcher with --gpus; resuming the newest run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ludwig_mt import preflight
from ludwig_mt.config import config_file, load_yaml, write_yaml
from ludwig_mt.errors import WorkflowError
from ludwig_mt.strategies import ENV_STRATEGY
from workflow import train


def fake_run(calls: list, out: Path):
    """Stands in for run_with_progress in workflow.train: records the call, writes a trained-model folder."""
    def run(cmd, env, log, progress_file, *, show):
        calls.append((cmd, env))
        (out / "experiment_run" / "model").mkdir(parents=True, exist_ok=True)
        return 0, train.Progress(), False
    return run


def sql_rows(path: Path, train_rows: int = 64) -> Path:
    """A CSV with the columns sql.yaml reads: ``train_rows`` training rows (one batch of the YAML) and one
    validation row."""
    path.write_text("prompt,response,split\n" + "q,a,0\n" * train_rows + "q,a,1\n")
    return path


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 4 GPUs whose Hugging Face cache holds the YAMLs' base models (32k context)."""
    cached = tmp_path / "hub-config.json"
    cached.write_text('{"max_position_embeddings": 32768}')
    monkeypatch.setattr(preflight, "cached_hub_config", lambda name: str(cached))
    monkeypatch.setattr(train, "cuda_device_count", lambda: 4)


@pytest.fixture
def ludwig_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine: None) -> tuple[list, Path]:
    """The (command, environment) of every ``ludwig train`` workflow.train would start, none started; a dataset."""
    calls: list = []
    monkeypatch.setattr(train, "run_with_progress", fake_run(calls, tmp_path))
    return calls, sql_rows(tmp_path / "train.csv")


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


def test_run_sh_train_launches_what_the_yaml_declares_and_one_gpu_is_plain_ludwig_train(
        tmp_path: Path, ludwig_calls: tuple[list, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls, dataset = ludwig_calls
    args = ["sql", "--dataset", str(dataset), "--output-directory", str(tmp_path)]
    assert train.main(args) == 0  # 4 GPUs: sql.yaml declares ZeRO-2 on every visible GPU (issue #18)
    assert train.main([*args, "--cpu"]) == 0  # --cpu: one plain process
    monkeypatch.setattr(train, "cuda_device_count", lambda: 1)
    assert train.main(args) == 0  # one GPU: one plain process, no DeepSpeed engine
    (four, four_env), (cpu, cpu_env), (one, one_env) = calls
    assert four[1:3] == ["-m", "torch.distributed.run"] and four[four.index("--nproc_per_node") + 1] == "4"
    assert four_env[ENV_STRATEGY] == "zero2"
    for cmd, env in ((cpu, cpu_env), (one, one_env)):
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
    lines = capsys.readouterr().err.splitlines()
    notes, errors = [x for x in lines if x.startswith("note: ")], [x for x in lines if x.startswith("error:")]
    assert all("multitask.yaml declares zero2 on every visible GPU" in x for x in notes)  # what became of the section
    assert errors[0].startswith("error: spider: evaluation-only task") and errors[1].startswith("error: nope: no such")
    assert train.main(["sqll"]) == 2 and "did you mean 'sql'?" in capsys.readouterr().err
    assert len(errors) == 2 and len(calls) == 1


# ---------------------------------------------------------------------------- inputs checked before Ludwig starts
def yaml_with(tmp_path: Path, edit) -> Path:
    config = load_yaml(config_file("sql"))
    edit(config)
    return write_yaml(config, tmp_path / "my_task.yaml")


@pytest.mark.parametrize(("case", "says"), [
    ("unknown key", "unknown key 'trainer.epochz'"),
    ("missing yaml", "file not found"),
    ("no response column", "no column response"),
    ("missing dataset", "dataset not found"),
    ("header only", "no rows, only a header"),
    ("base model without tokenizer", "no tokenizer files"),
    ("4-bit without a GPU", "needs a CUDA GPU"),
    ("--gpus 2 without GPUs", "--gpus 2: none visible"),
])
def test_every_bad_input_is_refused_in_one_line_before_ludwig_starts_and_nothing_is_written(
        tmp_path: Path, ludwig_calls: tuple[list, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, case: str, says: str) -> None:
    calls, dataset = ludwig_calls
    out = tmp_path / "results"
    args = ["sql", "--dataset", str(dataset), "--output-directory", str(out)]
    if case == "unknown key":
        args[0] = str(yaml_with(tmp_path, lambda c: c["trainer"].update(epochz=3)))
    elif case == "missing yaml":
        args[0] = str(tmp_path / "nope.yaml")
    elif case == "no response column":
        dataset.write_text("prompt,split\nq,0\n")
    elif case == "missing dataset":
        dataset.unlink()
    elif case == "header only":
        dataset.write_text("prompt,response,split\n")
    elif case == "base model without tokenizer":
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        args += ["--cpu", "--base-model", str(folder)]
    elif case == "4-bit without a GPU":
        monkeypatch.setattr(train, "cuda_device_count", lambda: 0)
    elif case == "--gpus 2 without GPUs":
        monkeypatch.setattr(train, "cuda_device_count", lambda: 0)
        args = [str(yaml_with(tmp_path, lambda c: c.pop("quantization"))), *args[1:], "--gpus", "2"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0] and "Fix:" in err[0], err
    assert calls == [] and not out.exists()


def test_a_one_epoch_run_checkpoints_four_times_an_epoch_in_its_rendered_yaml(
        tmp_path: Path, ludwig_calls: tuple[list, Path]) -> None:
    calls, dataset = ludwig_calls
    sql_rows(dataset, 64 * 10)  # 10 steps of the YAML's batch of 64
    assert train.main(["sql", "--dataset", str(dataset), "--output-directory", str(tmp_path)]) == 0
    (cmd, _), = calls
    rendered = Path(cmd[cmd.index("--config") + 1])
    assert rendered == tmp_path / "sql.rendered.yaml"
    assert load_yaml(rendered)["trainer"]["steps_per_checkpoint"] == 2


FAKE_LUDWIG = """#!{python}
import json, os, sys
progress = os.environ["LUDWIG_MT_PROGRESS_FILE"]
for step in (1, 2, 3):
    print(f"Training: {{step * 33}}%|###   | {{step}}/3 [00:01<00:02]", flush=True)
    with open(progress, "a") as fh:
        fh.write(json.dumps({{"step": step, "total": 3, "loss": 1.0 / step, "epoch": 0}}) + "\\n")
if "{outcome}" == "fail":
    print("Traceback (most recent call last):")
    print("ValueError: the real problem")
    print("=" * 40)
    print("Training:  66%|######    | 2/3")
    sys.exit(1)
out = sys.argv[sys.argv.index("--output_directory") + 1]
os.makedirs(os.path.join(out, "experiment_run", "model"))
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_train_shows_progress_names_the_log_and_fails_with_the_real_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, outcome: str) -> None:
    fake = tmp_path / "ludwig"
    fake.write_text(FAKE_LUDWIG.format(python=sys.executable, outcome=outcome))
    fake.chmod(0o755)
    monkeypatch.setattr(train, "ludwig_executable", lambda: str(fake))
    monkeypatch.setattr(train, "POLL_SECONDS", 0.05)
    dataset, out = sql_rows(tmp_path / "train.csv"), tmp_path / "out"
    if outcome == "ok":
        assert train.train(config_file("sql"), dataset, out, show_progress=True) == out / "experiment_run" / "model"
    else:
        with pytest.raises(WorkflowError) as err:
            train.train(config_file("sql"), dataset, out, show_progress=True)
        assert str(err.value) == (f"ludwig train failed (exit 1): ValueError: the real problem. Fix: see "
                                  f"{out / 'train.log'}")
    shown = capsys.readouterr().err
    assert shown.startswith(f"ludwig train: full log in {out / 'train.log'}")
    assert "3/3" in shown and "loss=0.3333" in shown  # the bar: steps, loss (and tqdm's ETA)
    assert "Training:" in (out / "train.log").read_text()  # Ludwig's own output stays in the log


def test_failure_line_is_the_last_exception_not_a_bar_or_a_rule() -> None:
    log = "step\nTraceback (most recent call last):\n  File x\nKeyError: 'response'\n=====\n 50%|##  | 1/2\r 60%|##\n"
    assert train.failure_line(log) == "KeyError: 'response'"
    assert train.failure_line("error: sql.yaml: unknown key\n-----\n") == "error: sql.yaml: unknown key"
    assert train.failure_line("loading\nkilled\n=====\n") == "killed"
    launcher = "[rank0]: ValueError: x\nValueError: bad rows\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    assert train.failure_line(launcher) == "ValueError: bad rows"


def test_the_resume_command_is_the_same_command_with_resume() -> None:
    assert train.resume_command(["sql", "--cpu", "--base-model", "my model"]) == \
        "./run.sh train sql --cpu --base-model 'my model' --resume"
    assert train.resume_command(["sql", "--resume"]) == "./run.sh train sql --resume"


def test_a_nan_failure_names_the_switch_that_fixed_it() -> None:
    line = ("RuntimeError: Training ran into an error. No checkpoint was saved. This is because training was "
            "terminated early due to the presence of NaN or Inf values in the model weights")
    assert "LUDWIG_MT_SPEEDUPS_OFF=sdpa_attention" in train.known_fix(line)
    assert train.known_fix("KeyError: 'response'") is None
