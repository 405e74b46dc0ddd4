"""bench/train_speed.py's bookkeeping: exact row lengths, the case plan, ratios vs plain, the loss check, merging,
the per-phase CPU clock and the loop timing."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from train_speed import (LOSS_TOLERANCE, Case, PeakMemory, PhaseClock, add_comparisons, build_rows,  # noqa: E402
                         cycle_times, live_at_peak, median_phases_ms, merge_runs, plan, summarize)


def row(name: str, path: str, tok_s: float, peak: float, loss: float, batch: int = 8, mode: str = "qlora") -> dict:
    case = Case(shape="llama3.2-1b", mode=mode, path=path, batch=batch, prompt_tokens=190, response_tokens=64,
                steps=4, warmup=1, label=name)
    return {"name": name, "case": asdict(case), "tokens_per_s": tok_s, "step_s": 0.1, "peak_gib": peak, "mfu": 0.1,
            "first_losses": [loss]}


def test_rows_tokenize_to_exactly_the_requested_lengths() -> None:
    from ludwig_mt.tiny_model import build_tokenizer

    tok = build_tokenizer()
    rows = build_rows(tok, 5, prompt_tokens=17, response_tokens=6)
    assert len(rows) == 5
    for r in rows:
        assert len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) == 17
        assert len(tok(r["response"], add_special_tokens=False)["input_ids"]) == 6


def test_plan_compares_three_paths_at_equal_batch_and_packs_only_rotary_models() -> None:
    cases = plan(["llama3.2-1b", "bloom-1b1"], ["qlora"], 8, 190, 64, 4, 1, 32, ablations=True)
    names = [c.label or f"{c.shape}-{c.mode}-{c.path}-b{c.batch}" for c in cases]
    assert {c.path for c in cases if c.batch == 8} == {"plain", "raw", "tuned"}
    assert "llama3.2-1b-qlora-plain-b32" in names
    assert {"llama3.2-1b-qlora-tuned-yaml-packed-b32", "llama3.2-1b-qlora-tuned-packed-b32-nogc",
            "llama3.2-1b-qlora-tuned-packed-b64", "bloom-1b1-qlora-tuned-yaml-unpacked-b32",
            "llama3.2-1b-qlora-ablate-bf16_autocast", "llama3.2-1b-qlora-ablate-packing"} <= set(names)
    nogc = next(c for c in cases if c.label == "llama3.2-1b-qlora-tuned-packed-b32-nogc")
    assert nogc.yaml == {"trainer": {"enable_gradient_checkpointing": False}} and nogc.batch == 32


def test_tuned_config_is_the_task_yaml_and_raw_turns_packing_off(tmp_path: Path) -> None:
    from train_speed import ludwig_config, task_yaml

    common = dict(mode="qlora", prompt_tokens=190, response_tokens=64, steps=4, warmup=1)
    declared = task_yaml()
    tuned = ludwig_config(Case(shape="llama3.2-1b", path="tuned", batch=32, **common), tmp_path, cpu=False)
    raw = ludwig_config(Case(shape="llama3.2-1b", path="raw", batch=8, **common), tmp_path, cpu=False)
    bloom = ludwig_config(Case(shape="bloom-1b1", path="tuned", batch=32, **common), tmp_path, cpu=False)
    for key in ("packing", "enable_gradient_checkpointing", "optimizer", "learning_rate"):
        assert tuned["trainer"].get(key) == declared["trainer"].get(key), key
    assert tuned["quantization"] == declared["quantization"] and tuned["trainer"]["batch_size"] == 32
    assert tuned["trainer"]["gradient_accumulation_steps"] == raw["trainer"]["gradient_accumulation_steps"] == 1
    if declared["trainer"].get("packing"):
        pack = declared["preprocessing"]["global_max_sequence_length"]
        assert tuned["preprocessing"]["global_max_sequence_length"] == max(pack, 255)
    assert raw["trainer"]["packing"] is False and raw["preprocessing"]["global_max_sequence_length"] == 255
    assert bloom["preprocessing"]["global_max_sequence_length"] == 255  # never packed


def test_ratios_are_against_plain_and_the_loss_check_against_raw_at_the_same_batch() -> None:
    results = [row("plain", "plain", 1000, 10.0, 12.3), row("raw", "raw", 500, 5.0, 12.0),
               row("tuned", "tuned", 1500, 8.0, 12.0 * (1 + LOSS_TOLERANCE / 2)),
               row("bad", "tuned", 1500, 8.0, 12.0 * (1 + 2 * LOSS_TOLERANCE)),
               row("packed", "tuned", 3000, 20.0, 11.0, batch=32), row("plain32", "plain", 2000, 40.0, 12.3, batch=32)]
    add_comparisons(results)
    by = {r["name"]: r for r in results}
    assert by["tuned"]["x_plain_tokens_per_s"] == 1.5 and by["tuned"]["x_plain_peak_gib"] == 0.8
    assert by["packed"]["x_plain_tokens_per_s"] == 3.0  # against the batch-8 plain loop, listed after it or not
    assert by["packed"]["x_plain_same_rows_tokens_per_s"] == 1.5 and by["packed"]["x_plain_same_rows_peak_gib"] == 0.5
    assert "x_plain_same_rows_tokens_per_s" not in by["tuned"]  # its plain reference is the batch-8 one
    assert by["tuned"]["loss_check"]["ok"] and not by["bad"]["loss_check"]["ok"]
    assert "loss_check" not in by["packed"] and "loss_check" not in by["plain"]  # no raw run at batch 32


def test_merge_keeps_the_latest_row_of_each_case(tmp_path: Path) -> None:
    meta = {"device": "cuda", "device_name": "H100", "versions": {}}
    (tmp_path / "a.json").write_text(json.dumps({**meta, "matmul_tflops": 800.0, "results": [
        row("plain", "plain", 1000, 10.0, 12.3), row("tuned", "tuned", 1200, 8.0, 12.0)]}))
    (tmp_path / "b.json").write_text(json.dumps({**meta, "matmul_tflops": 780.0, "results": [
        row("tuned", "tuned", 2000, 4.0, 12.0)]}))
    merge_runs([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")
    merged = json.loads((tmp_path / "out" / "train_speed.json").read_text())["results"]
    tuned = next(r for r in merged if r["name"] == "tuned")
    assert len(merged) == 2 and tuned["run"] == "b.json" and tuned["x_plain_tokens_per_s"] == 2.0
    assert "| tuned | 2000 |" in (tmp_path / "out" / "train_speed.md").read_text()


def test_live_at_peak_replays_the_allocator_trace_to_the_peak() -> None:
    def frames(name: str) -> list[dict]:  # C++ and torch's own frames first: the report names the caller outside
        return [{"filename": "memory_snapshot.cpp", "line": 0, "name": "gather_with_cpp"},
                {"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": f"/x/site-packages/{name}.py", "line": 7, "name": "forward"}]

    events = [{"action": "alloc", "addr": 1, "size": 2**30, "frames": frames("a")},
              {"action": "alloc", "addr": 2, "size": 2**29, "frames": frames("b")},
              {"action": "free_requested", "addr": 1, "size": 2**30},
              {"action": "free_completed", "addr": 1, "size": 2**30},
              {"action": "alloc", "addr": 3, "size": 2**28, "frames": frames("c")}]  # after the peak
    result = live_at_peak(events)
    assert result["peak_gib_above_start"] == 1.5
    assert result["largest"] == [{"gib": 1.0, "where": "a.py:7 forward"}, {"gib": 0.5, "where": "b.py:7 forward"}]
    many = [{"action": "alloc", "addr": i, "size": 2**28, "frames": frames("a" if i < 3 else "b")} for i in range(5)]
    assert live_at_peak(many)["by_where"] == [{"gib": 0.75, "count": 3, "where": "a.py:7 forward"},
                                              {"gib": 0.5, "count": 2, "where": "b.py:7 forward"}]


def test_the_census_counts_each_storage_once_and_names_parameters_and_gradients() -> None:
    import torch

    from train_speed import live_tensor_census

    layer = torch.nn.Linear(256, 256, bias=False)
    frozen = torch.nn.Parameter(torch.zeros(1024, 256, dtype=torch.bfloat16), requires_grad=False)
    layer(torch.ones(4, 256)).sum().backward()
    views = [layer.weight[:10], frozen[:3]]  # views hold no bytes of their own
    census = live_tensor_census("cpu", top=10**6)
    rows = census["largest"]
    assert {"kind": "frozen", "dtype": "bfloat16", "shape": "1024x256", "count": 1, "gib": 1024 * 256 * 2 / 2**30} in rows
    assert any(r["kind"] == "trainable" and r["shape"] == "256x256" for r in rows)
    assert any(r["kind"] == "grad" and r["shape"] == "256x256" for r in rows)
    assert not any(r["shape"] in ("10x256", "3x256") for r in rows)
    assert census["gib_by_kind"]["frozen"] >= 1024 * 256 * 2 / 2**30
    del views


class FakeAllocator:
    """CUDA's peak counter: ``use`` allocates to a level, a reset starts the peak from the current level."""

    def __init__(self) -> None:
        self.level = self.peak = 0.0

    def use(self, gib: float, then: float) -> None:
        self.peak, self.level = max(self.peak, gib), then

    def reset(self) -> None:
        self.peak = self.level


def test_a_process_peak_above_the_steps_is_placed_before_between_or_after_them(monkeypatch) -> None:
    import torch

    import train_speed

    gpu = FakeAllocator()
    monkeypatch.setattr(train_speed, "_peak_gib", lambda: gpu.peak)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", gpu.reset)
    peaks = PeakMemory()
    gpu.use(0.5, then=0.3)  # loading and quantizing
    for step_peak, between in ((0.8, 0.3), (0.7, 1.1)):  # a mid-run evaluation after the second step
        peaks.step_begin()
        gpu.use(step_peak, then=0.3)
        peaks.step_end()
        gpu.use(between, then=0.3)
    result = peaks.result()
    assert result["step_peaks_gib"] == [0.8, 0.7] and result["load_peak_gib"] == 0.5
    assert result["between_steps_peak_gib"] == 0.3 and result["after_steps_peak_gib"] == 1.1 == result["peak_gib"]

    import peers

    row = {"peak_gib": 1.1, "step_peak_gib": 0.8, **{k: result[k] for k in (
        "load_peak_gib", "between_steps_peak_gib", "after_steps_peak_gib")}}
    assert peers.placed_peak(row) == "1.10 (after 1.10)"
    assert peers.placed_peak({"peak_gib": 0.8, "step_peak_gib": 0.8}) == "0.80"


class Stepper:
    """Stands in for Ludwig's Trainer: a method and a classmethod, as ``_forward_pass`` and ``write_step_summary``."""

    def forward(self, x: int) -> int:
        time.sleep(0.002)
        return x + 1

    @classmethod
    def summary(cls, x: int) -> int:
        return x * 2


def test_phase_clock_times_methods_and_classmethods_per_step_and_keeps_their_results() -> None:
    clock = PhaseClock()
    clock.install([(f"{__name__}:Stepper", "forward", "forward"), (f"{__name__}:Stepper", "summary", "summary")])
    try:
        assert Stepper().forward(1) == 2 and Stepper().forward(2) == 3  # two calls in one step add up
        assert Stepper.summary(3) == 6  # still a classmethod
        clock.step_end(0.01)
        clock.step_end(0.02)  # a step that called neither
    finally:
        Stepper.forward = Stepper.forward.__wrapped__
        Stepper.summary = classmethod(Stepper.__dict__["summary"].__func__.__wrapped__)
    first, second = clock.steps
    assert first["forward"] >= 0.004 and first["step"] == 0.01 and "summary" in first
    assert second == {"step": 0.02}


def test_median_phases_put_the_rest_of_the_step_in_other_and_do_not_count_nested_lean_batch_twice() -> None:
    steps = [{"step": 0.100, "forward": 0.060, "lean_batch": 0.010, "backward": 0.030},
             {"step": 0.120, "forward": 0.060, "lean_batch": 0.010, "backward": 0.030},
             {"step": 0.110, "forward": 0.060, "lean_batch": 0.010, "backward": 0.030, "metrics": 0.050}]
    out = median_phases_ms(steps)
    assert out["step"] == pytest.approx(110) and out["metrics"] == 0  # 2 of 3 steps update no metrics
    assert out["other"] == pytest.approx(110 - 60 - 30)
    assert median_phases_ms([]) == {}


def test_loop_time_runs_from_step_start_to_step_start() -> None:
    assert cycle_times([1.0, 1.3, 1.5]) == pytest.approx([0.3, 0.2])
    case = Case(shape="tiny-llama", mode="lora", path="tuned", batch=2, prompt_tokens=4, response_tokens=4, steps=2,
                warmup=1)
    raw = {"step_times": [9.0, 0.1, 0.1], "cycle_times": [9.5, 0.2], "tokens_per_step": [100, 100, 100],
           "losses": [1.0]}
    out = summarize(case, raw, n_params=1, peak_tflops=1.0)
    assert out["tokens_per_s"] == pytest.approx(1000) and out["loop_tokens_per_s"] == pytest.approx(500)


def test_a_failed_case_says_ludwigs_nan_stop_before_the_traceback_it_caused(tmp_path: Path) -> None:
    from train_speed import failure_cause

    log = tmp_path / "case.log"
    log.write_text("loading\nNaN or inf tensors found in the model. Stopping training.\nTraceback\n  best_function(\n"
                   "ValueError: min() iterable argument is empty\n")
    assert failure_cause(log).startswith("NaN or inf tensors found in the model. Stopping training. | Traceback")
    log.write_text("a\nb\nc\nd\n")
    assert failure_cause(log) == "b | c | d"


def test_a_random_shape_takes_a_real_models_tokenizer_that_fits_its_vocabulary(tmp_path: Path) -> None:
    """Real rows at the 1B shape's cost (``bench/peers.py --tokenizer``): the model's ids are the tokenizer's; a
    tokenizer larger than the shape's vocabulary is refused with one line."""
    from train_speed import SHAPES, build_model_dir
    from transformers import AutoConfig, AutoTokenizer

    from ludwig_mt.tiny_model import build_tokenizer

    real = tmp_path / "real-tok"
    build_tokenizer(vocab_size=300).save_pretrained(real)
    model = build_model_dir("tiny-llama", tmp_path, real)
    tok, config = AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)
    assert model.name == "model-tiny-llama-real-tok-tokenizer" and len(tok) == len(AutoTokenizer.from_pretrained(real))
    assert (config.eos_token_id, config.pad_token_id, config.vocab_size) == (
        tok.eos_token_id, tok.pad_token_id, SHAPES["tiny-llama"]["vocab_size"])
    big = tmp_path / "big-tok"
    wide = build_tokenizer()
    wide.add_tokens([f"word{i}" for i in range(SHAPES["tiny-llama"]["vocab_size"])])
    wide.save_pretrained(big)
    with pytest.raises(SystemExit, match="do not fit tiny-llama's vocabulary of 1024"):
        build_model_dir("tiny-llama", tmp_path, big)
