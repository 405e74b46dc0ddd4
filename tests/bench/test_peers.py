"""bench/peers.py: every path gets the YAML's LoRA recipe, the same rows per step, and is checked on loss tokens and
first-step loss; the project's loss tokens are counted from the batches it really trains on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import peers  # noqa: E402
from train_speed import LOSS_TOLERANCE, Case, task_yaml  # noqa: E402


def case(path: str = "tuned", label: str = "qlora-project", batch: int = 64, **kw) -> Case:
    return Case(shape="llama3.2-1b", mode="qlora", path=path, batch=batch, prompt_tokens=190, response_tokens=64,
                steps=4, warmup=1, label=label, **kw)


def result(name: str, path: str, tok_s: float, peak: float, loss: float, loss_tokens: list[int],
           step_peak: float | None = None) -> dict:
    return {"name": name, "case": asdict(case(path, name)), "tokens_per_s": tok_s, "peak_gib": peak, "mfu": 0.3,
            "step_s": 0.3, "first_losses": [loss], "loss_tokens_per_step": loss_tokens, "step_peak_gib": step_peak}


def test_every_peer_trains_with_the_yamls_lora_recipe_and_the_fast_case_only_changes_dropout(tmp_path: Path) -> None:
    adapter, trainer = task_yaml()["adapter"], task_yaml()["trainer"]
    settings = peers.peer_settings(case("trl", "qlora-trl"), tmp_path)
    assert (settings["r"], settings["alpha"], settings["dropout"]) == (adapter["r"], adapter["alpha"],
                                                                       adapter["dropout"])
    assert settings["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]
    assert settings["gradient_checkpointing"] is trainer["enable_gradient_checkpointing"]
    fast = peers.peer_settings(case("unsloth", "qlora-unsloth-fast", extra_env={"BENCH_LORA_DROPOUT": "0.0"}),
                               tmp_path)
    assert fast["dropout"] == 0.0 and {k: v for k, v in fast.items() if k != "dropout"} == {
        k: v for k, v in settings.items() if k != "dropout"}
    no_gc = peers.peer_settings(case("trl", yaml={"trainer": {"enable_gradient_checkpointing": False}}), tmp_path)
    assert no_gc["gradient_checkpointing"] is False


def test_the_peers_pack_the_same_rows_per_step() -> None:
    assert peers.packs_per_step(case(batch=64)) == 8  # 8 rows of 255 tokens fill a 2048-token pack
    with pytest.raises(ValueError, match="do not fill packs"):
        peers.packs_per_step(case(batch=60))


def test_real_rows_give_each_peer_step_the_projects_rows_unless_packs_are_asked_for(monkeypatch) -> None:
    real = case("trl", batch=64, real_rows=True, task="samsum")
    monkeypatch.delenv("BENCH_PEER_STEPS", raising=False)
    assert peers.peer_batching(real) == {"per_device_train_batch_size": 64, "packing": False, "max_length": None}
    monkeypatch.setenv("BENCH_PEER_STEPS", "packs")
    monkeypatch.setenv("BENCH_PACKS_PER_STEP", "6")
    assert peers.peer_batching(real) == {"per_device_train_batch_size": 6, "packing": True, "max_length": 2048}
    monkeypatch.setenv("BENCH_PEER_STEPS", "rows")  # equal rows pack whatever is asked: 8 rows fill a pack
    monkeypatch.delenv("BENCH_PACKS_PER_STEP")
    assert peers.peer_batching(case("trl", batch=64))["per_device_train_batch_size"] == 8


def test_plan_pairs_each_peer_with_the_project_of_the_same_mode_and_checkpointing() -> None:
    cases = peers.plan("llama3.2-1b", ["qlora", "lora"], 64, 190, 64, 10, 4, list(peers.PATHS), ["adamw"])
    by = {c.label: c for c in cases}
    assert {"qlora-project", "qlora-trl", "qlora-unsloth", "qlora-unsloth-fast", "lora-project", "lora-gc-project",
            "lora-gc-unsloth-fast", "qlora-project+adamw"} <= set(by)
    assert by["lora-project"].yaml == by["lora-trl"].yaml == {"trainer": {"enable_gradient_checkpointing": False}}
    assert by["lora-gc-trl"].yaml == {} and by["qlora-unsloth-fast"].extra_env == {"BENCH_LORA_DROPOUT": "0.0"}
    assert by["lora-project+adamw"].yaml == {"trainer": {"enable_gradient_checkpointing": False,
                                                         "optimizer": {"type": "adamw"}}}
    assert all(c.batch == 64 for c in cases) and by["qlora-project"].path == "tuned"


def test_checks_fail_on_other_loss_tokens_or_a_first_loss_out_of_tolerance() -> None:
    results = [result("qlora-project", "tuned", 50_000, 5.0, 12.0, [4160, 4160], step_peak=3.0),
               result("qlora-unsloth", "unsloth", 40_000, 4.0, 12.0 * (1 + LOSS_TOLERANCE / 2), [4160, 4160],
                      step_peak=4.0),
               result("qlora-trl", "trl", 20_000, 5.0, 12.0, [4160, 4096]),
               result("qlora-unsloth-fast", "unsloth", 60_000, 2.5, 12.0 * (1 + 2 * LOSS_TOLERANCE), [4160, 4160]),
               result("lora-unsloth", "unsloth", 1.0, 1.0, 12.0, [4160]),  # no project row in its group
               result("qlora-project+no-x", "tuned", 40_000, 5.0, 12.0, [4160, 4160])]
    peers.add_checks(results)
    by = {r["name"]: r for r in results}
    assert by["qlora-unsloth"]["check"]["ok"] and by["qlora-unsloth"]["project_over_this_tokens_per_s"] == 1.25
    assert by["qlora-unsloth"]["project_over_this_peak_gib"] == 1.25
    assert by["qlora-unsloth"]["project_over_this_step_peak_gib"] == 0.75  # the training steps' peak alone
    assert "project_over_this_step_peak_gib" not in by["qlora-trl"]  # no step peak recorded: no ratio
    assert not by["qlora-trl"]["check"]["ok"] and not by["qlora-trl"]["check"]["loss_tokens_equal"]
    assert not by["qlora-unsloth-fast"]["check"]["ok"] and by["qlora-unsloth-fast"]["check"]["loss_tokens_equal"]
    assert "check" not in by["lora-unsloth"] and "check" not in by["qlora-project"]
    assert by["qlora-project+no-x"]["check"]["ok"] and by["qlora-project+no-x"]["project_over_this_tokens_per_s"] == 1.25
    text = peers.table(results + [{"name": "qlora-x", "case": {}, "error": peers.NEEDS_CUDA}])
    assert "| qlora-unsloth | 40000 | 4.00 / 4.00 | 30.0% | 1.25 | 0.75 / 1.25 |" in text
    assert "| qlora-trl | 20000 | - / 5.00 |" in text and "FAILED (tokens equal: False" in text
    assert "| qlora-x | did not run: needs a CUDA GPU" in text


def test_merge_keeps_each_cases_latest_row_and_rechecks(tmp_path: Path) -> None:
    meta = {"device": "cuda", "device_name": "H200", "matmul_tflops": 780.0, "versions": {}, "shape": "llama3.2-1b"}
    (tmp_path / "a.json").write_text(json.dumps({**meta, "results": [
        result("qlora-project", "tuned", 40_000, 5.0, 12.0, [4160]),
        result("qlora-trl", "trl", 20_000, 5.0, 12.0, [4160])]}))
    (tmp_path / "b.json").write_text(json.dumps({**meta, "results": [
        result("qlora-project", "tuned", 50_000, 5.0, 12.0, [4160])]}))
    peers.merge_runs([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")
    merged = json.loads((tmp_path / "out" / "peers.json").read_text())["results"]
    assert [r["name"] for r in merged] == ["qlora-project", "qlora-trl"]
    assert merged[0]["run"] == "b.json" and merged[1]["project_over_this_tokens_per_s"] == 2.5


def test_the_project_counts_loss_tokens_real_tokens_and_rows_of_the_batches_it_builds() -> None:
    import torch

    from ludwig_mt.patches import speedups
    from train_speed import _recording_lean_batches

    original = speedups.lean_training_batch
    try:
        speedups.lean_training_batch = lambda llm, input_ids, target_ids: {
            "target_index": torch.arange(int(target_ids.sum())), "n_tokens": int(input_ids.sum())}
        counts = _recording_lean_batches(speedups)
        speedups.lean_training_batch(None, torch.ones(4, 3, dtype=torch.long), torch.ones(4, 2, dtype=torch.long))
        speedups.lean_training_batch(None, torch.ones(2, 5, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))
        assert counts == {"loss_tokens": [8, 2], "tokens": [12, 10], "rows": [4, 2]}
    finally:
        speedups.lean_training_batch = original


def curve_run(losses: list[float], rows: list[int], loss_tokens: list[int] | None = None) -> dict:
    return {"losses": losses, "rows_per_step": rows, "loss_tokens_per_step": loss_tokens or [1] * len(rows)}


def test_steps_fall_in_the_window_of_their_first_row_and_only_complete_windows_count() -> None:
    assert peers.row_windows([400] * 7, 1000) == [[0, 1, 2], [3, 4]]  # rows 2400-2799 read, 2000-2999 not all
    assert peers.row_windows([64] * 54, 1000)[0] == list(range(16)) and peers.row_windows([10], 1000) == []


def test_loss_curves_compare_the_same_rows_though_the_peers_group_them_otherwise() -> None:
    """Run 16's trap: the peers' best-fit packs put each 1,000-row chunk's longest rows first and hold fewer rows per
    step, so step windows compared other rows (TRL and unsloth both 3.0 % above the project in steps 16-31)."""
    row_loss = [2.5 + 0.4 * math.sin(2 * math.pi * i / 1000) - 0.1 * i / 1000 for i in range(4000)]

    def steps(groups: list[list[int]]) -> dict:  # a step's loss: its rows' mean (one loss token per row)
        return curve_run([sum(row_loss[i] for i in g) / len(g) for g in groups], [len(g) for g in groups],
                         [len(g) for g in groups])

    project = steps([list(range(i, i + 64)) for i in range(0, 3456, 64)])
    chunks = [list(range(c, c + 1000))[::-1] for c in range(0, 4000, 1000)]  # each chunk's "longest" rows first
    order = [i for chunk in chunks for i in chunk][:3100]
    peer = steps([order[i:i + 57] for i in range(0, 3100, 57)])
    check = peers.loss_curve_check(project, peer)
    assert check["ok"] and len(check["windows"]) == 3 and check["max_abs_rel_delta"] < 0.01
    drifting = dict(peer, losses=[x * (1.05 if i >= 36 else 1.0) for i, x in enumerate(peer["losses"])])
    bad = peers.loss_curve_check(project, drifting)  # learns less in the third window
    assert not bad["ok"] and abs(bad["windows"][-1]["rel_delta"]) > 0.03 > abs(bad["windows"][0]["rel_delta"])
    short = curve_run(project["losses"][:20], project["rows_per_step"][:20])
    assert not peers.loss_curve_check(project, short)["ok"]  # one complete window is too few


def test_real_rows_keep_only_rows_within_the_yamls_limits_in_order() -> None:
    class Words:  # one token per word
        eos_token_id = "</s>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

    rows = [{"prompt": "a " * 8, "response": "b " * 2}, {"prompt": "a " * 9, "response": "b"},
            {"prompt": "a", "response": "b " * 3}, {"prompt": "a a", "response": "b b"}]
    kept, lengths = peers.fitting_rows(rows, Words(), prompt_limit=10, response_limit=4)
    assert kept == [rows[0], rows[3]] and lengths == [8 + 3, 2 + 3]  # prompt + 2 and response + EOS + 1 must fit
    assert peers.real_packs_per_step(64, [300, 340], 2048) == 10 and peers.real_packs_per_step(2, [10], 2048) == 1


def test_the_peers_get_real_rows_as_the_projects_token_ids_with_loss_on_response_and_eos() -> None:
    """Pre-tokenized rows (``input_ids`` + ``completion_mask``): every path trains on the project's token ids."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "summary": 2, "a": 3}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    [example] = peers.peer_examples([{"prompt": "summary a", "response": "a a"}], tok)
    prompt, response = peers.row_ids(tok, {"prompt": "summary a", "response": "a a"})
    assert example["input_ids"] == prompt + response and response[-1] == tok.eos_token_id == 1
    assert example["completion_mask"] == [0] * len(prompt) + [1, 1, 1]


def test_real_rows_are_checked_by_their_loss_curve_and_tokens_per_row() -> None:
    real = {"task": "samsum", "arch": "llama", "real_rows": True}
    cases = peers.plan("smollm2", ["qlora"], 64, 640, 128, 50, 4, ["project", "trl"], real=real)
    assert all(c.real_rows and c.task == "samsum" and c.yaml["trainer"]["should_shuffle"] is False for c in cases)

    def run(name, path, losses, tokens, rows):
        return {**result(name, path, 1.0, 1.0, losses[0], [r * 20 for r in rows]), "losses": losses,
                "tokens_per_step": tokens, "rows_per_step": rows,
                "case": asdict(case(path, name, **real))}

    project = run("qlora-project", "tuned", [2.0] * 50, [20_000] * 50, [64] * 50)
    trl = run("qlora-trl", "trl", [2.01] * 53, [19_000] * 53, [61] * 53)
    fewer = run("qlora-unsloth", "unsloth", [2.0] * 50, [18_000] * 50, [64] * 50)  # 10 % fewer tokens per row
    peers.add_checks([project, trl, fewer])
    assert trl["check"]["ok"] and trl["check"]["loss_curve"]["max_abs_rel_delta"] < 0.006
    assert not fewer["check"]["ok"] and fewer["check"]["loss_curve"]["ok"]
    text = peers.table([project, trl, fewer])
    assert "Loss curves (real rows)" in text and "| qlora-trl | 2.0100 / 2.0000 (+0.5%) |" in text
    assert "| rows 0-999 | rows 1000-1999 | rows 2000-2999 |" in text
    assert not trl["check"]["same_steps"] and "first_loss_rel_delta" not in trl["check"]

    same = run("qlora-unsloth", "unsloth", [2.0] * 50, [20_000] * 50, [64] * 50)  # the project's rows, step by step
    off = run("qlora-trl", "trl", [2.1] + [2.0] * 49, [20_000] * 50, [64] * 50)  # its first loss 5 % off
    peers.add_checks([project, same, off])
    assert same["check"]["same_steps"] and same["check"]["ok"] and same["check"]["first_loss_rel_delta"] == 0
    assert off["check"]["same_steps"] and off["check"]["loss_curve"]["ok"] and not off["check"]["ok"]
    assert "same rows per step, first loss delta 5.00%" in peers.table([project, off])


@pytest.mark.slow
def test_cpu_smoke_run_trains_the_project_and_says_why_the_peers_did_not_run(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "--smoke", "--only", "lora-project",
                           "lora-trl", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "out" / "peers.json").read_text())["results"]}
    project = results["lora-project"]
    assert project["loss_tokens_per_step"] == [16 * 17] * 3  # 16 rows of 16 response tokens + EOS, every step
    assert project["first_losses"][0] > 0 and project["tokens_per_s"] > 0
    assert results["lora-trl"]["error"] == peers.NEEDS_CUDA
