"""Data-parallel training through ludwig_mt.launch on CPU (gloo), with real Ludwig, on the tiny model (issue #5).

Every rank writes a report (``LUDWIG_MT_RANK_REPORT``): the rows it trained on, its loss per step and its trainable
weights after the last step. The fast tests cover the pure helpers; the slow ones launch real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from ludwig_mt.config import load_yaml, render_overrides, config_file, write_yaml
from ludwig_mt.launch import free_port
from ludwig_mt.patches import distributed, model_loading
from ludwig_mt.patches.instrumentation import ENV_CRASH_AFTER_CHECKPOINT, ENV_RANK_REPORT
from ludwig_mt.strategies import ENV_STRATEGY
from prep.registry import get_task
from prep.task import prepare
from workflow.demo import predict
from workflow.samples import write_sql_sample
from workflow.train import ludwig_executable

TRAIN_ROWS, VALIDATION_ROWS, BATCH = 64, 8, 4
EPOCHS, STEPS_PER_CHECKPOINT = 2, 5  # 2 ranks: 8 steps per epoch, so checkpoint 1 (step 5) is mid-epoch


# ---------------------------------------------------------------------------------------------- fast: pure helpers
def test_4bit_model_is_placed_on_the_rank_gpu_only_under_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []

    class Loader:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            seen.append(kwargs)

    placement = model_loading.LudwigModelLoader(Loader, kwargs_rules=[distributed.rank_device_map], after_load=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(ENV_STRATEGY, raising=False)
    placement.from_pretrained("m", device_map="auto")  # plain process: Ludwig's choice stays
    monkeypatch.setenv(ENV_STRATEGY, "zero2")
    placement.from_pretrained("m", device_map="auto")
    placement.from_pretrained("m", dtype="float32")  # no device map asked for: none added
    assert [kw.get("device_map") for kw in seen] == ["auto", {"": 3}, None]
    assert placement.from_pretrained is not Loader.from_pretrained and placement.__name__ == "Loader"


def test_a_declared_backend_section_breaks_raw_ludwigs_local_backend_but_not_the_patched_one() -> None:
    """Ludwig 0.17.10's schema takes the section, its ``LocalBackend(**kwargs)`` does not (issue #18)."""
    import ludwig.api  # noqa: F401  (the import hook applies the registry)
    from ludwig.backend import initialize_backend

    from ludwig_mt.patches import core

    section = load_yaml(config_file("sql"))["backend"]
    with pytest.raises(TypeError, match="trainer"):
        core.original("ludwig.backend:create_backend")(**section)
    assert type(initialize_backend(section)).__name__ == "LocalBackend"
    assert "accept_declared_backend_section" in core.layers()["ludwig.backend:create_backend"]


@pytest.mark.slow  # a fresh interpreter importing Ludwig: ~20 s on 2 shared cores
def test_plain_process_keeps_the_local_strategy() -> None:
    code = ("import ludwig.api; from ludwig.backend import initialize_backend; from ludwig import distributed as d; "
            "b = initialize_backend('local'); print(type(d.get_current_dist_strategy()).__name__, b.is_coordinator())")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", ENV_STRATEGY)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().splitlines()[-1:] == ["LocalStrategy True"], out.stderr[-2000:]


# ------------------------------------------------------------------------------------------- slow: real launches
@pytest.fixture(scope="module")
def work(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SQL slice on the tiny model: an even number of training rows, dropout 0 (runs are comparable)."""
    root = tmp_path_factory.mktemp("distributed")
    report = prepare(get_task("sql"), str(write_sql_sample(root / "v4.json", 120)), root / "prepared")
    rows = pd.read_csv(report.files["train"], keep_default_na=False)
    rows = pd.concat([rows[rows.split == 0].head(TRAIN_ROWS), rows[rows.split == 1].head(VALIDATION_ROWS)])
    assert (rows.split == 0).sum() == TRAIN_ROWS
    rows.to_csv(root / "train.csv", index=False)
    config = render_overrides(load_yaml(config_file("sql")), base_model=str(tiny_model), cpu=True,
                              epochs=EPOCHS, batch_size=BATCH, max_sequence_length=48, max_new_tokens=4)
    config["adapter"]["dropout"] = 0.0
    config["trainer"].update(learning_rate=0.05, steps_per_checkpoint=STEPS_PER_CHECKPOINT)
    write_yaml(config, root / "sql.yaml")
    # one optimizer step, no shuffling, SGD (its update is linear in the gradient), no world-size LR scaling
    config["trainer"].update(train_steps=1, should_shuffle=False, learning_rate=0.5, learning_rate_scaling="constant",
                             optimizer={"type": "sgd"}, learning_rate_scheduler={"decay": None, "warmup_fraction": 0.0})
    config["trainer"].pop("steps_per_checkpoint")
    config["trainer"]["skip_all_evaluation"] = True
    for batch in (BATCH, 2 * BATCH):
        config["trainer"].update(batch_size=batch, eval_batch_size=batch)
        write_yaml(config, root / f"one_step_b{batch}.yaml")
    return {"root": root, "test": Path(report.files["test"])}


#: the ``backend.trainer.strategy`` a YAML declares for each strategy name (issue #18: the launcher reads it)
STRATEGY_SECTIONS: dict[str, dict] = {
    "ddp": {"type": "ddp"},
    "fsdp": {"type": "fsdp"},
    "zero2": {"type": "deepspeed", "zero_optimization": {"stage": 2}},
    # persistence 0: every weight is sharded, the small LoRA tensors too, so the gathered save/load path always runs
    "zero3": {"type": "deepspeed", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
}


def declaring(work: dict[str, Path], config: str, strategy: str, processes: int) -> str:
    """A copy of the YAML ``config`` whose ``backend:`` declares ``strategy`` on ``processes`` processes."""
    name = f"{Path(config).stem}.{strategy}{processes}.yaml"
    declared = load_yaml(work["root"] / config)
    declared["backend"] = {"type": "local", "trainer": {"num_workers": processes,
                                                        "strategy": STRATEGY_SECTIONS[strategy]}}
    write_yaml(declared, work["root"] / name)
    return name


def ludwig_train(work: dict[str, Path], name: str, *, config: str = "sql.yaml", processes: int = 0,
                 strategy: str = "ddp", env: dict[str, str] | None = None,
                 resume: bool = False) -> subprocess.CompletedProcess:
    """``ludwig train`` (processes=0) or ``python -m ludwig_mt.launch --cpu`` of a copy of ``config`` that declares
    ``strategy`` on ``processes`` processes in its backend section (no --gpus, no --strategy); output under root/name."""
    if processes:
        config = declaring(work, config, strategy, processes)
    with open(work["root"] / f"{name}.log", "a", encoding="utf-8") as log:
        return subprocess.run(train_command(work, name, config, processes, (), resume),
                              timeout=600, stdout=log, stderr=subprocess.STDOUT, env=train_env(work, name, env))


def train_command(work: dict[str, Path], name: str, config: str, processes: int, launch_args: tuple[str, ...],
                  resume: bool) -> list[str]:
    """Plain ``ludwig train`` (processes=0), else the launcher with ``launch_args`` (flags over the YAML)."""
    root = work["root"]
    args = ["train", "--config", str(root / config), "--dataset", str(root / "train.csv"), "--skip_save_processed_input"]
    args += ["--model_resume_path", str(root / name / "experiment_run")] if resume else [
        "--output_directory", str(root / name)]
    if processes:
        cmd = [sys.executable, "-m", "ludwig_mt.launch", "--cpu", *launch_args, "--", *args]
    else:
        cmd = [ludwig_executable(), *args]
    return cmd


def train_env(work: dict[str, Path], name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", ENV_STRATEGY)}
    return {**env, ENV_RANK_REPORT: str(work["root"] / f"{name}.report"), **(extra or {})}


def rank_report(work: dict[str, Path], name: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = work["root"] / f"{name}.report"
    return json.loads((folder / f"rank{rank}.json").read_text()), load_file(str(folder / f"rank{rank}.safetensors"))


def log_tail(work: dict[str, Path], name: str) -> str:
    return (work["root"] / f"{name}.log").read_text(errors="replace")[-3000:]


def run_files(run: Path) -> set[str]:
    """The run folder's layout: relative paths, without the names that carry a time stamp or a step number."""
    skip = ("events.out.tfevents", "llm_eval_examples/")
    return {str(p.relative_to(run)) for p in run.rglob("*") if not any(s in str(p) for s in skip)}


def trained(work: dict[str, Path], name: str, **kwargs) -> str:
    """Run :func:`ludwig_train` once for a module-scoped fixture; the run's name if it succeeded."""
    proc = ludwig_train(work, name, **kwargs)
    assert proc.returncode == 0, log_tail(work, name)
    return name


@pytest.fixture(scope="module")
def single(work: dict[str, Path]) -> str:
    return trained(work, "single")


@pytest.fixture(scope="module")
def ddp(work: dict[str, Path]) -> str:
    return trained(work, "ddp", processes=2)


@pytest.fixture(scope="module")
def zero2(work: dict[str, Path]) -> str:
    return trained(work, "zero2", processes=2, strategy="zero2")


@pytest.fixture(scope="module")
def zero3(work: dict[str, Path]) -> str:
    return trained(work, "zero3", processes=2, strategy="zero3")


@pytest.fixture(scope="module")
def fsdp(work: dict[str, Path]) -> str:
    return trained(work, "fsdp", processes=2, strategy="fsdp")


def saved_weights(work: dict[str, Path], name: str, file: str) -> dict[str, torch.Tensor]:
    """A weights file of run ``name``'s model folder, keyed like the rank reports (Ludwig's module names)."""
    weights = load_file(str(work["root"] / name / "experiment_run/model" / file))
    if file.startswith("model_weights/"):  # peft's adapter file: no "model." prefix, no adapter name
        return {"model." + k.replace(".weight", ".default.weight"): v for k, v in weights.items()}
    return weights


@pytest.fixture(scope="module")
def one_process_2b(work: dict[str, Path]) -> str:
    proc = ludwig_train(work, "one_b8", config=f"one_step_b{2 * BATCH}.yaml")
    assert proc.returncode == 0, log_tail(work, "one_b8")
    return "one_b8"


@pytest.mark.slow
def test_two_ranks_train_disjoint_halves_of_the_rows(work: dict[str, Path], ddp: str) -> None:
    reports = [rank_report(work, ddp, rank)[0] for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["steps"] for r in reports] == [EPOCHS * TRAIN_ROWS // (2 * BATCH)] * 2
    for epoch in range(EPOCHS):
        rows = [set(r["rows"][epoch]) for r in reports]
        assert not rows[0] & rows[1] and len(rows[0]) == len(rows[1]) == TRAIN_ROWS // 2
        assert rows[0] | rows[1] == set(range(TRAIN_ROWS))


@pytest.mark.slow
def test_two_ranks_end_with_identical_adapter_weights_and_falling_loss(work: dict[str, Path], ddp: str) -> None:
    (report0, weights0), (report1, weights1) = (rank_report(work, ddp, rank) for rank in (0, 1))
    assert weights0.keys() == weights1.keys() and any("lora_B" in k for k in weights0)
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert any(weights0[k].abs().sum() > 0 for k in weights0 if "lora_B" in k)  # trained (B starts at zero)
    for losses in (report0["losses"], report1["losses"]):
        half = len(losses) // 2
        assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half


@pytest.mark.slow
def test_zero2_ranks_train_disjoint_rows_and_stay_in_sync(work: dict[str, Path], zero2: str) -> None:
    (report0, weights0), (report1, weights1) = (rank_report(work, zero2, rank) for rank in (0, 1))
    assert [report0["world_size"], report1["world_size"]] == [2, 2] and report0["steps"] == report1["steps"]
    assert not set(report0["rows"][0]) & set(report1["rows"][0])
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    checkpoints = work["root"] / zero2 / "experiment_run/model/training_checkpoints"
    assert {p.name for p in checkpoints.glob("latest.ckpt.zero-*")} == {
        "latest.ckpt.zero-rank0-of2.pt", "latest.ckpt.zero-rank1-of2.pt"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_sharded_weights_ranks_train_disjoint_rows_and_save_whole_weights(
        work: dict[str, Path], ddp: str, strategy: str, request: pytest.FixtureRequest) -> None:
    """ZeRO-3 and FSDP shard the LoRA weights too: what Ludwig writes must be gathered, not this rank's shard."""
    run = request.getfixturevalue(strategy)
    (report0, weights0), (report1, weights1) = (rank_report(work, run, rank) for rank in (0, 1))
    assert [report0["world_size"], report1["world_size"]] == [2, 2] and report0["steps"] == report1["steps"]
    assert not set(report0["rows"][0]) & set(report1["rows"][0])
    _, reference = rank_report(work, ddp, 0)
    assert {k: v.shape for k, v in weights0.items()} == {k: v.shape for k, v in reference.items()}  # whole tensors
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert any(weights0[k].abs().sum() > 0 for k in weights0 if "lora_B" in k)
    for losses in (report0["losses"], report1["losses"]):
        half = len(losses) // 2
        assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half
    latest = saved_weights(work, run, "training_checkpoints/latest.ckpt.safetensors")
    assert latest.keys() == weights0.keys() and all(torch.equal(latest[k], weights0[k]) for k in latest)
    best = saved_weights(work, run, "training_checkpoints/best.ckpt.safetensors")
    adapter = saved_weights(work, run, "model_weights/adapter_model.safetensors")  # the best checkpoint's weights
    assert adapter.keys() == best.keys() and all(v.numel() > 0 and torch.equal(best[k], v) for k, v in adapter.items())
    checkpoints = work["root"] / run / "experiment_run/model/training_checkpoints"
    kind = "zero" if strategy == "zero3" else strategy
    assert {p.name for p in checkpoints.glob(f"latest.ckpt.{kind}-*")} == {
        f"latest.ckpt.{kind}-rank0-of2.pt", f"latest.ckpt.{kind}-rank1-of2.pt"}
    if strategy == "fsdp":  # really sharded (not accelerate's silent DDP fallback): each rank holds half the state
        held = [sum(s["exp_avg"].numel() for s in torch.load(
            checkpoints / f"latest.ckpt.fsdp-rank{rank}-of2.pt", weights_only=False)["state"].values()) for rank in (0, 1)]
        assert held[0] + held[1] == sum(v.numel() for v in weights0.values()) and 0 < held[0] < held[0] + held[1]


@pytest.mark.slow
def test_launch_writes_the_single_process_layout_once(work: dict[str, Path], single: str, ddp: str) -> None:
    ddp_runs, single_runs = sorted((work["root"] / ddp).iterdir()), sorted((work["root"] / single).iterdir())
    assert [p.name for p in ddp_runs] == [p.name for p in single_runs] == ["experiment_run"]
    assert run_files(ddp_runs[0]) == run_files(single_runs[0])
    assert rank_report(work, single, 0)[0]["steps"] == 2 * rank_report(work, ddp, 0)[0]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_ludwig_predict_loads_the_launched_model(
        work: dict[str, Path], strategy: str, request: pytest.FixtureRequest) -> None:
    model = work["root"] / request.getfixturevalue(strategy) / "experiment_run" / "model"
    out = work["root"] / f"pred_{strategy}"
    predictions = pd.read_parquet(predict(model, work["test"], out, out.with_suffix(".log")))
    assert len(predictions) == len(pd.read_csv(work["test"])) and "response_response" in predictions.columns


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_one_step_on_two_ranks_of_b_equals_one_step_on_one_process_of_2b(
        work: dict[str, Path], one_process_2b: str, strategy: str) -> None:
    name = f"two_b4_{strategy}"
    two = ludwig_train(work, name, config=f"one_step_b{BATCH}.yaml", processes=2, strategy=strategy)
    assert two.returncode == 0, log_tail(work, name)
    (r1, w1), (r2, w2) = rank_report(work, one_process_2b, 0), rank_report(work, name, 0)
    assert r1["steps"] == r2["steps"] == 1
    assert sorted(r1["rows"][0][: 2 * BATCH]) == sorted(
        r2["rows"][0][:BATCH] + rank_report(work, name, 1)[0]["rows"][0][:BATCH])  # the same 2b rows in that step
    step = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)  # B starts at 0: w1[B] is the SGD update
    gap = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert step > 1e-4 and gap <= 1e-5 * step, (step, gap)
    adapter = saved_weights(work, name, "model_weights/adapter_model.safetensors")  # no evaluation: the last step
    assert adapter.keys() == w2.keys() and all(torch.equal(adapter[k], w2[k]) for k in w2)


@pytest.mark.slow
def test_two_machine_launch_on_localhost_matches_one_machine(work: dict[str, Path], ddp: str) -> None:
    port = str(free_port())
    with open(work["root"] / "two_machines.log", "a", encoding="utf-8") as log:
        machines = [subprocess.Popen(train_command(work, "two_machines", "sql.yaml", 1, (
            "--gpus", "1", "--strategy", "ddp", "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
            "--main-process-port", port), False), stdout=log, stderr=subprocess.STDOUT,
            env=train_env(work, "two_machines")) for rank in (0, 1)]
        codes = [m.wait(timeout=600) for m in machines]
    assert codes == [0, 0], log_tail(work, "two_machines")
    reports = [rank_report(work, "two_machines", rank) for rank in (0, 1)]
    assert [r[0]["world_size"] for r in reports] == [2, 2]
    _, reference = rank_report(work, ddp, 0)
    assert all(torch.equal(reports[1][1][k], reference[k]) for k in reference)  # same world, same result
    assert [p.name for p in (work["root"] / "two_machines").iterdir()] == ["experiment_run"]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["single", "zero2", "zero3", "fsdp"],
                         ids=["single-process", "launcher-zero2", "launcher-zero3", "launcher-fsdp"])
def test_killed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(
        work: dict[str, Path], reference: str, request: pytest.FixtureRequest) -> None:
    """ZeRO-2/3 and FSDP for the launcher: optimizer state partitioned per rank (DDP's is Ludwig's own checkpoint),
    and under ZeRO-3 and FSDP the weights too, so the checkpoint's weights are gathered on save and sharded again on load."""
    request.getfixturevalue(reference)
    processes = 0 if reference == "single" else 2
    strategy = "zero2" if reference == "single" else reference  # ignored by a single process
    name = f"killed_{reference}"
    crashed = ludwig_train(work, name, processes=processes, strategy=strategy,
                           env={ENV_CRASH_AFTER_CHECKPOINT: "1"})
    assert crashed.returncode != 0
    progress = json.loads((work["root"] / name / "experiment_run/model/training_progress.json").read_text())
    total = rank_report(work, reference, 0)[0]["steps"]
    assert progress["checkpoint_number"] == 1 and progress["steps"] == STEPS_PER_CHECKPOINT < total
    resumed = ludwig_train(work, name, processes=processes, strategy=strategy, resume=True)
    assert resumed.returncode == 0, log_tail(work, name)
    assert "Resuming training from previous run" in (work["root"] / f"{name}.log").read_text(errors="replace")
    _, expected = rank_report(work, reference, 0)
    for rank in range(max(processes, 1)):
        report, weights = rank_report(work, name, rank)
        assert report["steps"] == total - STEPS_PER_CHECKPOINT  # only the steps the checkpoint did not hold
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert (work["root"] / name / "experiment_run/model/model_weights/adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------- slow: every remainder
REMAINDER_BATCH = 3  # rows = 2 * batch + r for every r: r = 1 is the one-row last batch Ludwig drops


@pytest.fixture(scope="module")
def remainder_work(work: dict[str, Path]) -> dict[str, Path]:
    """Per remainder r, a train CSV of 2 * REMAINDER_BATCH + r rows (+ 2 validation rows) and one YAML: 2 epochs,
    a checkpoint after every step (so the first is mid-epoch), no shuffling (runs are comparable), and the task
    YAMLs' LoRA dropout (a resumed run must continue the random generators, not reseed them)."""
    root = work["root"] / "remainders"
    root.mkdir()
    rows = pd.read_csv(work["root"] / "train.csv", keep_default_na=False)
    for r in range(REMAINDER_BATCH):
        train = rows[rows.split == 0].head(2 * REMAINDER_BATCH + r)
        pd.concat([train, rows[rows.split == 1].head(2)]).to_csv(root / f"train_r{r}.csv", index=False)
    config = load_yaml(work["root"] / "sql.yaml")
    config["trainer"].update(batch_size=REMAINDER_BATCH, eval_batch_size=REMAINDER_BATCH, epochs=2,
                             steps_per_checkpoint=1, should_shuffle=False)
    config["adapter"]["dropout"] = 0.05
    write_yaml(config, root / "sql.yaml")
    return {"root": root, "fresh": set()}


def fresh_remainder_run(work: dict[str, Path], r: int) -> str:
    """The uninterrupted run of remainder ``r`` (once per module: the Ctrl-C test compares with it too)."""
    name = f"fresh_r{r}"
    if name not in work["fresh"]:
        fresh = remainder_train(work, r, name)  # timeout=300: a hang fails the test
        assert fresh.returncode == 0, log_tail(work, name)
        work["fresh"].add(name)
    return name


def remainder_train(work: dict[str, Path], r: int, name: str, *, resume: bool = False,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    root = work["root"]
    where = ["--model_resume_path", str(root / name / "experiment_run")] if resume else [
        "--output_directory", str(root / name)]
    with open(root / f"{name}.log", "a", encoding="utf-8") as log:
        return subprocess.run([ludwig_executable(), "train", "--config", str(root / "sql.yaml"), "--dataset",
                               str(root / f"train_r{r}.csv"), "--skip_save_processed_input", *where],
                              timeout=300, stdout=log, stderr=subprocess.STDOUT,
                              env={**train_env(work, name), **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("r", range(REMAINDER_BATCH))
def test_every_remainder_of_rows_trains_to_the_end_fresh_and_resumed(remainder_work: dict[str, Path], r: int) -> None:
    """A fresh run of k * batch + 1 rows looped forever while the resume fix acted on every epoch (Ludwig plans one
    step more per epoch than its batcher yields); fresh and killed-then-resumed runs must end, and agree."""
    fresh_remainder_run(remainder_work, r)
    assert "skipping" not in (remainder_work["root"] / f"fresh_r{r}.log").read_text(errors="replace")
    report, expected = rank_report(remainder_work, f"fresh_r{r}", 0)
    crashed = remainder_train(remainder_work, r, f"resumed_r{r}", env={ENV_CRASH_AFTER_CHECKPOINT: "1"})
    assert crashed.returncode != 0
    resumed = remainder_train(remainder_work, r, f"resumed_r{r}", resume=True)
    assert resumed.returncode == 0, log_tail(remainder_work, f"resumed_r{r}")
    log = (remainder_work["root"] / f"resumed_r{r}.log").read_text(errors="replace")
    assert log.count("skipping 1 batch(es) already trained on") == 1  # once, in the first epoch after resuming
    assert log.count("random states of step 1 restored") == 1
    resumed_report, weights = rank_report(remainder_work, f"resumed_r{r}", 0)
    assert resumed_report["steps"] == report["steps"] - 1  # the one step the checkpoint held
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_ctrl_c_of_run_sh_train_stops_cleanly_and_its_resume_command_ends_where_an_uninterrupted_run_ends(
        remainder_work: dict[str, Path]) -> None:
    """``./run.sh train`` (workflow.train) on remainder 2's YAML and rows, as the fresh run: one SIGINT after the
    first step stops Ludwig after its current step with a checkpoint, no traceback, and the printed command; that
    command (--resume) ends with the uninterrupted run's weights, bit for bit (dropout on)."""
    root, r = remainder_work["root"], 2
    reference = fresh_remainder_run(remainder_work, r)
    out = root / "ctrl_c"
    argv = [str(root / "sql.yaml"), "--dataset", str(root / f"train_r{r}.csv"), "--output-directory", str(out)]
    env = train_env(remainder_work, "ctrl_c")
    proc = subprocess.Popen([sys.executable, "-m", "workflow.train", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    progress = out / "train.progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and '"step": 1,' not in (
            progress.read_text() if progress.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped at step ") and "last checkpoint at step" in last, last
    command = last.split("Resume: ", 1)[1]
    assert command == "./run.sh train " + " ".join(argv) + " --resume"
    log = (out / "train.log").read_text(errors="replace")
    assert log.count("Received SIGINT") == 1  # one press reached Ludwig once
    resumed = subprocess.run([sys.executable, "-m", "workflow.train", *argv, "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, expected = rank_report(remainder_work, reference, 0)
    _, weights = rank_report(remainder_work, "ctrl_c", 0)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
