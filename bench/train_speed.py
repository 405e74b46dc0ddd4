"""Side-by-side training-speed benchmark: plain transformers+peft loop vs raw Ludwig vs the project's tuned Ludwig.

One call measures, for each architecture shape (random weights, public config values) and each mode (QLoRA 4-bit /
bf16 LoRA), at equal rows, batch, sequence length and LoRA settings (r 16, alpha 32, dropout 0.05, all linear
layers of attention and MLP):

* ``plain``  - the usual hand-written loop: ``from_pretrained`` (bf16, or nf4 + ``prepare_model_for_kbit_training``),
  ``get_peft_model``, torch AdamW, right-padded batches, default (SDPA) attention, no gradient checkpointing;
* ``raw``    - Ludwig 0.17.10 on ``ludwig_configs/sql.yaml`` rendered with the local random-weight model,
  ``LUDWIG_MT_SPEEDUPS=0`` (the project's correctness fixes stay on: without the paged-optimizer fix the YAML's
  ``paged_adam`` does not even build), packing off (:data:`RAW_YAML`: Ludwig's own packing crashes);
* ``tuned``  - the same rendered YAML as committed (its packing to ``global_max_sequence_length``, gradient
  checkpointing, optimizer), speed-ups on; at the equal batch, at the YAML's own rows per micro-batch
  (``-yaml-``), without gradient checkpointing (``-nogc``) and at twice the rows. Bloom (ALiBi, no
  ``position_ids``) is never packed (``unpacked``);
* ``ablate-*`` - tuned at the YAML's rows with one speed-up (or YAML setting) undone, each change measured alone.

Every path runs in its own subprocess (clean CUDA peak-memory counter, patches applied once). Ludwig's step time
is measured between its ``on_batch_start`` / ``on_batch_end`` callbacks (after a CUDA sync), so preprocessing, model
load and evaluation are excluded; the median of the steps after warm-up is reported. Tokens/s counts real
(non-pad) tokens; every row has the same length, so no path wastes compute on padding.

MFU, as issue #6 defines it: 4N FLOPs per token over the bf16 rate of a large ``torch.matmul`` measured in the
same run, N = parameters of all linear layers (LM head included, tied or not; the embedding lookup is not a
matmul). 4N is forward (2N) + the input-gradient half of the backward (2N): LoRA leaves the base weights frozen.
It leaves out attention-score FLOPs (understates by ~10% at 2048 tokens) and LoRA's own FLOPs, and counts the
LM head on every token although ``target_only_logits`` applies it to response tokens only (overstates then).

Correctness guard: the first training losses of each Ludwig case are recorded; ``loss_check`` compares the first
step (LoRA B = 0, so it is the base model's loss on the same rows) with raw Ludwig at the same batch, relative
tolerance :data:`LOSS_TOLERANCE` (bf16 vs fp32 weights differ in the 3rd digit).

Run (GPU):  python bench/train_speed.py --out $OUT
Run (CPU smoke test, tiny shapes, a few minutes):  python bench/train_speed.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Public config values (hub config.json of meta-llama/Llama-3.2-1B and bigscience/bloom-1b1).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0, max_position_embeddings=4096),
    "llama3.1-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                        rope_theta=500000.0, max_position_embeddings=4096),  # bench/scaling.py's larger point
    "bloom-1b1": dict(arch="bloom", hidden_size=1536, n_layer=24, n_head=16, vocab_size=250880),
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json: the real model's speed without carrying its weights
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    # CPU smoke-test shapes (same code paths, seconds per step)
    "tiny-llama": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=1024, tie_word_embeddings=True,
                       max_position_embeddings=4096),
    "tiny-bloom": dict(arch="bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=1024),
}
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# Ludwig 0.17.10's own ``trainer.packing`` crashes on this stack (bench/NOTES-speed.md), so raw Ludwig runs the
# YAML with packing off; everything else in the YAML stays as committed.
RAW_YAML: dict[str, Any] = {"trainer": {"packing": False}}
LOSS_TOLERANCE = 0.01  # relative, first-step loss of a tuned case vs raw Ludwig at the same batch


@dataclass
class Case:
    shape: str
    mode: str  # "qlora" | "lora"
    path: str  # "plain" | "raw" | "tuned"
    batch: int
    prompt_tokens: int
    response_tokens: int
    steps: int
    warmup: int
    extra_env: dict[str, str] = field(default_factory=dict)
    label: str = ""
    yaml: dict[str, Any] = field(default_factory=dict)  # merged into the rendered task YAML
    task: str = "sql"  # whose YAML (ludwig_configs/<task>.yaml) the tuned and raw paths train with
    arch: str = ""  # a real model's architecture family ("llama", "bloom"); empty: SHAPES[shape]'s
    real_rows: bool = False  # rows of unequal length from a prepared dataset (prompt/response: upper bounds)

    @property
    def seq_len(self) -> int:  # prompt + response + eos (with real rows: the longest a row may be)
        return self.prompt_tokens + self.response_tokens + 1

    @property
    def family(self) -> str:
        return self.arch or SHAPES[self.shape]["arch"]


# ---------------------------------------------------------------------------------------------------- fixtures


def build_model_dir(shape: str, out: Path, tokenizer: Path | None = None) -> Path:
    """Random-weight model of ``shape`` saved in bf16 with the tiny byte-level tokenizer (ids < 512 < vocab), or
    with a real model's ``tokenizer`` (its ids within the shape's vocabulary): real text then tokenizes as that
    model's does, at the shape's cost."""
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    from ludwig_mt.tiny_model import build_tokenizer

    path = out / (f"model-{shape}" if tokenizer is None else f"model-{shape}-{tokenizer.name}-tokenizer")
    if (path / "config.json").exists():
        return path
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    tok = build_tokenizer() if tokenizer is None else AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > spec["vocab_size"]:
        raise SystemExit(f"error: {tokenizer}: {len(tok)} tokens do not fit {shape}'s vocabulary of "
                         f"{spec['vocab_size']} (fix: a smaller tokenizer or another shape)")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(**spec, **ids) if arch == "llama" else BloomConfig(**spec, **ids)
    cls = LlamaForCausalLM if arch == "llama" else BloomForCausalLM
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if device == "cuda":  # hand the memory back: the cases run in subprocesses that need all of it
        torch.cuda.empty_cache()
    return path


def single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that are one token with a leading space, so n words encode to exactly n tokens."""
    words = []
    for token in tokenizer.get_vocab():
        if token.startswith("Ġ") and token[1:].isalpha():
            word = " " + token[1:]
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    return sorted(words)


def build_rows(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows whose prompt/response tokenize to exactly the requested lengths (checked)."""
    import random

    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice(words) for _ in range(prompt_tokens))
        response = "".join(rng.choice(words) for _ in range(response_tokens))
        rows.append({"prompt": prompt, "response": response})
    for key, want in (("prompt", prompt_tokens), ("response", response_tokens)):
        got = len(tokenizer(rows[0][key], add_special_tokens=False)["input_ids"])
        if got != want:
            raise RuntimeError(f"{key} tokenizes to {got} tokens, expected {want}")
    return rows


def write_dataset(rows: list[dict[str, str]], path: Path, n_val: int) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["split"] = [0] * (len(rows) - n_val) + [1] * n_val
    frame.to_csv(path, index=False)
    return path


def task_yaml(task: str = "sql") -> dict[str, Any]:
    """``ludwig_configs/<task>.yaml`` as committed: the tuned path's settings come from it, not from this script."""
    from ludwig_mt.config import load_yaml

    return load_yaml(REPO / "ludwig_configs" / f"{task}.yaml")


def ludwig_config(case: Case, model_dir: Path, cpu: bool) -> dict[str, Any]:
    """``ludwig_configs/sql.yaml`` with the local model and the case's mode, rows, lengths and overrides.

    One optimizer step per batch (as the plain loop), ``train_steps`` instead of epochs. Packing keeps the YAML's
    ``global_max_sequence_length`` (the pack length); unpacked cases use exactly the row length.
    """
    from ludwig_mt.config import for_raw_ludwig, render_overrides

    config = render_overrides(task_yaml(case.task), base_model=str(model_dir), cpu=cpu)
    arch = case.family
    config["adapter"]["target_modules"] = LORA_TARGETS[arch]
    if case.mode == "lora":
        config.pop("quantization", None)
    if not case.real_rows:  # real rows keep the YAML's limits (the rows were chosen to fit them)
        config["input_features"][0]["preprocessing"]["max_sequence_length"] = case.prompt_tokens
        config["output_features"][0]["preprocessing"]["max_sequence_length"] = case.response_tokens
    trainer = config["trainer"]
    trainer.update(batch_size=case.batch, eval_batch_size=case.batch, train_steps=case.steps + case.warmup,
                   gradient_accumulation_steps=1)
    trainer.pop("epochs", None)
    for overrides in ([RAW_YAML] if case.path == "raw" else []) + [case.yaml]:
        for key, value in overrides.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
    packed = arch == "llama" and case.path == "tuned" and "pack_training_rows" not in case.extra_env.get(
        "LUDWIG_MT_SPEEDUPS_OFF", "")  # the speed-up packs to the global length; unpacked: exactly the row length
    pack_length = config["preprocessing"].get("global_max_sequence_length") or 0
    config["preprocessing"]["global_max_sequence_length"] = max(pack_length, case.seq_len) if packed else case.seq_len
    return for_raw_ludwig(config) if case.path == "raw" else config  # raw LocalBackend fails on backend.trainer


# ---------------------------------------------------------------------------------------------------- workers


def matmul_tflops(device: str) -> float:
    """bf16 (GPU) / fp32 (CPU) dense matmul rate of this device, the MFU denominator."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device == "cuda" else 5
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def matmul_params(model_dir: Path) -> int:
    """N of the 4N convention: every Linear weight (LM head included, tied or not), no embedding lookup."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class PeakMemory:
    """CUDA peak memory of each training step (``step_peaks_gib``: the counter restarts at every step's start and
    end) and of the whole process (``peak_gib``), placed: before the first step (``load_peak_gib``: loading and
    quantizing), between steps (``between_steps_peak_gib``: Ludwig's evaluations and checkpoints inside the run) and
    after the last (``after_steps_peak_gib``: the end-of-training evaluation), so a process peak above the steps'
    says where it lies. Between and after are read at the next step's start and at :meth:`result`."""

    def __init__(self) -> None:
        self.load: float | None = None
        self.between = 0.0
        self.steps: list[float] = []

    def step_begin(self) -> None:
        import torch

        if self.load is None:
            self.load = _peak_gib()
        else:
            self.between = max(self.between, _peak_gib())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def step_end(self) -> None:
        import torch

        self.steps.append(_peak_gib())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict[str, Any]:
        after = _peak_gib() if self.steps else 0.0
        load = self.load if self.load is not None else _peak_gib()
        return {"peak_gib": max(load, self.between, after, *self.steps),
                "step_peak_gib": max(self.steps, default=None), "step_peaks_gib": self.steps,
                "load_peak_gib": load, "between_steps_peak_gib": self.between, "after_steps_peak_gib": after}


def live_at_peak(events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Replay a CUDA caching-allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): the moment
    the bytes allocated during the trace peaked, and the ``top`` largest allocations alive then, each with the first
    frame outside torch that made it, so the composition of a step's peak can be read (``BENCH_MEMORY_STEP``)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in events:
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _first_outside_torch(event.get("frames") or []))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
    largest = sorted(at_peak.values(), key=lambda item: -item[0])[:top]
    by_where: dict[str, list[int]] = {}
    for size, where in at_peak.values():
        by_where.setdefault(where, [0, 0])
        by_where[where][0] += size
        by_where[where][1] += 1
    places = sorted(by_where.items(), key=lambda item: -item[1][0])[:top]
    return {"peak_gib_above_start": peak / 2**30,
            "largest": [{"gib": size / 2**30, "where": where} for size, where in largest],
            "by_where": [{"gib": size / 2**30, "count": count, "where": where} for where, (size, count) in places]}


def live_tensor_census(device_type: str = "cuda", top: int = 15) -> dict[str, Any]:
    """What the tensors alive now on ``device_type`` hold (the start of a traced step: weights, adapter, gradients, optimizer
    state, whatever a trainer keeps between steps), grouped by kind (frozen or trainable parameter, gradient, other),
    dtype and shape, each storage counted once: the allocator trace starts after them, so without this the bytes a
    path holds before its step are one number."""
    import gc

    import torch

    kinds: dict[int, str] = {}
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == device_type]
    grads = []  # a gradient has no Python object (so none gc lists) until something reads .grad
    for t in tensors:
        if isinstance(t, torch.nn.Parameter):
            kinds.setdefault(id(t), "trainable" if t.requires_grad else "frozen")
            if t.grad is not None:
                grads.append(t.grad)
                kinds[id(t.grad)] = "grad"
    tensors += grads
    groups: dict[tuple[str, str, str], list[int]] = {}
    seen: set[int] = set()
    for t in sorted(tensors, key=lambda t: kinds.get(id(t), "other") == "other"):  # parameters claim first
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        key = (kinds.get(id(t), "other"), str(t.dtype).replace("torch.", ""), "x".join(map(str, t.shape)))
        groups.setdefault(key, [0, 0])
        groups[key][0] += storage.nbytes()
        groups[key][1] += 1
    by_kind: dict[str, float] = {}
    for (kind, _, _), (size, _) in groups.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + size / 2**30
    largest = sorted(groups.items(), key=lambda item: -item[1][0])[:top]
    return {"gib_by_kind": by_kind, "largest": [{"kind": k, "dtype": d, "shape": shape, "count": n, "gib": size / 2**30}
                                                 for (k, d, shape), (size, n) in largest]}


def _first_outside_torch(frames: list[dict[str, Any]]) -> str:
    """The first Python frame outside torch (the allocator's C++ frames come first and name no caller)."""
    for frame in frames:
        name = str(frame.get("filename", ""))
        if name.endswith(".py") and "/torch/" not in name:
            return f"{name.split('site-packages/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return "?"


class MemoryTrace:
    """Records the CUDA allocator's events of one training step (``BENCH_MEMORY_STEP=N``, counted from 0), or of
    everything after the last step (``BENCH_MEMORY_STEP=after``: the end-of-training evaluation; ``last_step``, the
    index of the run's last step, tells when that begins), and keeps what :func:`live_at_peak` reads from them, with
    the bytes already allocated when the recording began and, for a step, what they hold (:func:`live_tensor_census`)."""

    def __init__(self, last_step: int = -1) -> None:
        setting = os.environ.get("BENCH_MEMORY_STEP", "-1")
        self.after = setting == "after"
        self.step = last_step + 1 if self.after else int(setting)
        self.result: dict[str, Any] = {}

    def begin(self, steps_done: int) -> None:
        if steps_done == self.step and not self.after:
            self._record()

    def end(self, steps_done: int) -> None:
        if self.after and steps_done == self.step:
            self._record()
        elif steps_done == self.step + 1:
            self.finish()

    def finish(self) -> None:
        """Stop a recording that is running and keep its reading (``after``: called once training returned)."""
        import torch

        if "start_gib" in self.result and "peak_gib_above_start" not in self.result:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            traces = snapshot.get("device_traces") or [[]]
            self.result.update(live_at_peak(traces[torch.cuda.current_device()]))

    def _record(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.result["start_gib"] = torch.cuda.memory_allocated() / 2**30
            if not self.after:
                self.result["start_census"] = live_tensor_census()
            torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")


#: the parts of a Ludwig training step whose CPU time :class:`PhaseClock` records: (owner, attribute, phase)
LUDWIG_PHASES = (("ludwig.trainers.trainer:Trainer", "_batch_to_tensors", "to_device"),
                 ("ludwig.trainers.trainer:Trainer", "_forward_pass", "forward"),
                 ("ludwig_mt.patches.speedups", "lean_training_batch", "lean_batch"),
                 ("ludwig.trainers.trainer:Trainer", "_backward_pass", "backward"),
                 ("ludwig.trainers.trainer:Trainer", "_optimizer_step", "optimizer"),
                 ("ludwig.trainers.trainer:Trainer", "_update_training_metrics", "metrics"),
                 ("ludwig.trainers.trainer:Trainer", "write_step_summary", "step_summary"))


class PhaseClock:
    """Wall time the CPU spends in each part of a step (:data:`LUDWIG_PHASES`), per step, without adding a
    synchronisation. A CPU-bound step's time is the CPU's, so this says which part to cut; the GPU runs behind, so
    a part that waits for it (a ``.item()``, a pageable copy) shows the GPU's backlog, not its own work.
    ``lean_batch`` runs inside ``forward``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def install(self, phases=LUDWIG_PHASES) -> None:
        import importlib

        for owner_path, attr, phase in phases:
            module, _, cls = owner_path.partition(":")
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            setattr(owner, attr, self.timed(owner.__dict__[attr], phase))

    def timed(self, raw, phase: str):
        """``raw`` (a function, or a classmethod) that adds its wall time to ``phase`` of the current step."""
        import functools

        fn = raw.__func__ if isinstance(raw, classmethod) else raw

        @functools.wraps(fn)
        def timing(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t0

        return classmethod(timing) if isinstance(raw, classmethod) else timing

    def step_end(self, step_s: float) -> None:
        self.steps.append({**self.current, "step": step_s})
        self.current = {}


def median_phases_ms(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each phase over ``steps`` (a phase missing from a step counts 0 there), and
    ``other``: the step's time in none of the top-level phases (the batcher, the scheduler, the progress bar,
    callbacks), from the medians."""
    names = sorted({k for s in steps for k in s})
    out = {k: 1000 * statistics.median(s.get(k, 0.0) for s in steps) for k in names} if steps else {}
    if out:
        top = sum(v for k, v in out.items() if k not in ("step", "lean_batch"))
        out["other"] = out["step"] - top
    return out


def cycle_times(starts: list[float]) -> list[float]:
    """Seconds from each step's start to the next one's: everything the training loop does per step (fetching and
    collating the batch, logging), wherever its timing callbacks sit. The peers' Trainer fetches its batch before
    ``on_step_begin``, Ludwig after ``on_batch_start``, so only these are comparable between them."""
    return [b - a for a, b in zip(starts, starts[1:])]


def worker_plain(case: Case, model_dir: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The hand-written transformers + peft (+ bitsandbytes) loop, per the peft / QLoRA documentation."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if case.mode == "qlora":
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if case.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    arch = case.family
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=LORA_TARGETS[arch]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()

    def batch(i: int):
        chunk = rows[(i * case.batch) % len(rows):][: case.batch]
        ids, labels = [], []
        for r in chunk:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            t = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(map(len, ids))
        pad = lambda seqs, v: torch.tensor([s + [v] * (width - len(s)) for s in seqs], device=device)  # noqa: E731
        mask = pad([[1] * len(s) for s in ids], 0)
        return pad(ids, tok.pad_token_id), mask, pad(labels, -100), sum(map(len, ids))

    times, losses, tokens = [], [], []
    peaks = PeakMemory()
    for step in range(case.warmup + case.steps):
        input_ids, mask, labels, n_tok = batch(step)
        peaks.step_begin()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.step_end()
        tokens.append(n_tok)
    return {"step_times": times, "losses": losses, "tokens_per_step": tokens, **peaks.result()}


def worker_ludwig(case: Case, model_dir: Path, dataset: Path, workdir: Path) -> dict[str, Any]:
    """Real ``LudwigModel.train`` on the rendered task YAML; step time between batch callbacks."""
    import logging

    import torch
    from ludwig.api import LudwigModel
    from ludwig.callbacks import Callback

    from ludwig_mt.patches import instrumentation, registry, speedups

    lean = _recording_lean_batches(speedups)
    registry.apply_all()  # the .pth auto-loader is not installed on the GPU machine's Python (same switches)
    registry.apply("record_step_losses")  # after the others: the outermost layer of Trainer.train_step
    cuda = torch.cuda.is_available()
    losses = instrumentation.STEP_LOSSES
    phases = PhaseClock()
    phases.install()

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.starts: list[float] = []
            self._t0 = 0.0
            self.peaks = PeakMemory()
            self.memory = MemoryTrace(last_step=case.steps + case.warmup - 1)

        def on_batch_start(self, trainer, progress_tracker, save_path, **kwargs):
            self.peaks.step_begin()
            self.memory.begin(len(self.times))
            if cuda:
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()
            self.starts.append(self._t0)

        def on_batch_end(self, trainer, progress_tracker, save_path, sync_step=True, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)
            phases.step_end(self.times[-1])
            self.peaks.step_end()
            self.memory.end(len(self.times))

    timer_cls = Timer
    profile_table: list[str] = []
    syncs: dict[str, int] = {}
    if os.environ.get("BENCH_PROFILE_STEP"):
        timer_cls = _profiling(timer_cls, int(os.environ["BENCH_PROFILE_STEP"]), profile_table)
    if os.environ.get("BENCH_SYNC_STEP") and cuda:
        timer_cls = _sync_recording(timer_cls, int(os.environ["BENCH_SYNC_STEP"]), syncs)
    timer = timer_cls()
    config = ludwig_config(case, model_dir, cpu=not cuda)
    model = LudwigModel(config, callbacks=[timer], logging_level=logging.WARNING)
    inner = None
    model.train(dataset=str(dataset), output_directory=str(workdir / "results"), skip_save_processed_input=True,
                skip_save_model=True, skip_save_progress=True, skip_save_log=True)
    timer.memory.finish()
    inner = model.model.model
    dtypes = sorted({str(p.dtype) for p in inner.parameters()})
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    n = len(timer.times)
    return {"step_times": timer.times, "cycle_times": cycle_times(timer.starts), "phases": phases.steps,
            "losses": losses[:n],
            "tokens_per_step": lean["tokens"][:n] if len(lean["tokens"]) >= n else [case.batch * case.seq_len] * n,
            "loss_tokens_per_step": lean["loss_tokens"][:n], "rows_per_step": lean["rows"][:n],
            **timer.peaks.result(), "memory_at_peak": timer.memory.result,
            "param_dtypes": dtypes,
            "attn_implementation": attn,
            "config_trainer": config["trainer"], "profile": "\n".join(profile_table), "syncs": syncs}


def _recording_lean_batches(speedups) -> dict[str, list[int]]:
    """Count, per lean training step, the positions the loss is taken on, the real tokens (no padding) and the rows
    of the batch the step built: the peers' benchmark checks that every path trains on as many tokens, and with rows
    of unequal length the tokens per second count real tokens only. Read from shapes and CPU ints: no sync."""
    counts: dict[str, list[int]] = {"loss_tokens": [], "tokens": [], "rows": []}
    original = speedups.lean_training_batch

    def counting(llm, input_ids, target_ids):
        out = original(llm, input_ids, target_ids)
        counts["loss_tokens"].append(int(out["target_index"].numel()))
        counts["tokens"].append(int(out["n_tokens"]))
        counts["rows"].append(int(input_ids.shape[0]))
        return out

    speedups.lean_training_batch = counting
    return counts


def _sync_recording(timer_cls, step: int, sink: dict[str, int]):
    """A Timer class that also counts, by the Python line that caused it, every CPU-GPU synchronisation of training
    batch ``step`` (``torch.cuda.set_sync_debug_mode``): each one stalls the CPU that should be queueing kernels."""
    import traceback
    import warnings

    import torch

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "/warnings.py" not in f.filename][-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        sink[where] = sink.get(where, 0) + 1

    class SyncRecordingTimer(timer_cls):
        def on_batch_start(self, trainer, progress_tracker, save_path, **kwargs):
            super().on_batch_start(trainer, progress_tracker, save_path, **kwargs)
            if len(self.times) == step:
                self._saved = warnings.showwarning
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")

        def on_batch_end(self, trainer, progress_tracker, save_path, sync_step=True, **kwargs):
            if len(self.times) == step:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = self._saved
            super().on_batch_end(trainer, progress_tracker, save_path, sync_step=sync_step, **kwargs)

    return SyncRecordingTimer


def _profiling(timer_cls, step: int, sink: list[str]):
    """A Timer class that also records a torch.profiler table (CUDA time by op) of training batch ``step``."""
    import torch

    class ProfilingTimer(timer_cls):
        def on_batch_start(self, trainer, progress_tracker, save_path, **kwargs):
            if len(self.times) == step:
                self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA])
                self._prof.__enter__()
            super().on_batch_start(trainer, progress_tracker, save_path, **kwargs)

        def on_batch_end(self, trainer, progress_tracker, save_path, sync_step=True, **kwargs):
            super().on_batch_end(trainer, progress_tracker, save_path, sync_step=sync_step, **kwargs)
            if len(self.times) == step + 1:
                self._prof.__exit__(None, None, None)
                sink.extend(profile_tables(self._prof))

    return ProfilingTimer


def profile_tables(prof) -> list[str]:
    """The views of one profiled step kept in the JSON: CUDA time by op, CPU time by op (with children), CPU time
    by op (its own: where the Python and the launches go)."""
    averages = prof.key_averages()
    return [averages.table(sort_by=key, row_limit=rows, max_name_column_width=50)
            for key, rows in (("self_cuda_time_total", 22), ("cpu_time_total", 22), ("self_cpu_time_total", 30))]


def run_worker(args: argparse.Namespace) -> None:
    case = Case(**json.loads(args.case))
    model_dir, dataset = Path(args.model_dir), Path(args.dataset)
    import pandas as pd

    if case.path == "plain":
        rows = pd.read_csv(dataset)
        rows = rows[rows["split"] == 0][["prompt", "response"]].to_dict("records")
        result = worker_plain(case, model_dir, rows)
    else:
        result = worker_ludwig(case, model_dir, dataset, Path(args.workdir))
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- driver


def summarize(case: Case, raw: dict[str, Any], n_params: int, peak_tflops: float) -> dict[str, Any]:
    times = raw["step_times"][case.warmup:]
    toks = raw["tokens_per_step"][case.warmup:]
    step = statistics.median(times) if times else float("nan")
    cycles = (raw.get("cycle_times") or [])[case.warmup:]
    if len(set(toks)) > 1:  # steps of unequal size (real rows): all tokens over all the time, not a median step
        tok_s = sum(toks) / sum(times)
        loop = {"cycle_s": statistics.median(cycles),
                "loop_tokens_per_s": sum(toks[:len(cycles)]) / sum(cycles)} if cycles else {}
    else:
        tok_s = statistics.mean(toks) / step if times else float("nan")
        loop = {"cycle_s": statistics.median(cycles),
                "loop_tokens_per_s": statistics.mean(toks) / statistics.median(cycles)} if cycles and toks else {}
    if raw.get("phases"):
        loop["phases_ms"] = median_phases_ms(raw["phases"][case.warmup:])
    return {"case": asdict(case), "step_s": step, "tokens_per_s": tok_s, **loop, "peak_gib": raw.get("peak_gib"),
            "step_peak_gib": raw.get("step_peak_gib"), "step_peaks_gib": raw.get("step_peaks_gib"),
            **{k: raw.get(k) for k in ("load_peak_gib", "between_steps_peak_gib", "after_steps_peak_gib")},
            "mfu": 4 * n_params * tok_s / (peak_tflops * 1e12), "first_losses": raw["losses"][:5],
            **{k: raw[k] for k in ("param_dtypes", "attn_implementation") if k in raw}}


def case_result(case: Case, out: dict[str, Any], n_params: int, peak_tflops: float,
                keep: tuple[str, ...]) -> dict[str, Any]:
    """A launched case's row: its summary, step times and the worker's ``keep`` fields; a failed case as it came."""
    if "raw" not in out:
        return out
    raw = out["raw"]
    return {"name": out["name"], "wall_s": out["wall_s"], **summarize(case, raw, n_params, peak_tflops),
            "step_times": raw["step_times"], **{k: raw[k] for k in keep if raw.get(k)}}


def progress_line(out: dict[str, Any], elapsed: float) -> str:
    return f"[{elapsed:5.0f}s] {out['name']}: " + (
        f"{out['tokens_per_s']:.0f} tok/s, {out['peak_gib']:.2f} GiB, losses {out['first_losses'][:3]}"
        if "error" not in out else out["error"][:300])


def case_name(case: Case) -> str:
    return case.label or f"{case.shape}-{case.mode}-{case.path}-b{case.batch}"


def launch(case: Case, model_dir: Path, dataset: Path, work: Path, timeout: int,
           script: Path = Path(__file__)) -> dict[str, Any]:
    """Run ``case`` in a fresh process of ``script --worker`` (this file, or ``bench/peers.py`` for the peers)."""
    name = case_name(case)
    result = work / f"{name}.json"
    env = {**os.environ, "LUDWIG_MT_SPEEDUPS": "0" if case.path == "raw" else "1", **case.extra_env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(script), "--worker", "--case", json.dumps(asdict(case)), "--model-dir", str(model_dir),
           "--dataset", str(dataset), "--workdir", str(work / name), "--result", str(result)]
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not result.exists():
        return {"name": name, "case": asdict(case), "error": f"exit {rc}: {failure_cause(work / f'{name}.log')}",
                "wall_s": wall}
    return {"name": name, "raw": json.loads(result.read_text()), "wall_s": wall}


#: lines a failed case's log may hold that say more than its last lines (Ludwig stops on NaN, then its
#: end-of-training report fails on the missing validation metrics: the traceback's tail hides the cause)
FAILURE_CAUSES = ("NaN or inf tensors found in the model", "CUDA out of memory", "OutOfMemoryError")


def failure_cause(log: Path) -> str:
    """The first line of ``log`` naming a known cause (:data:`FAILURE_CAUSES`), then its last three lines."""
    lines = log.read_text(errors="replace").strip().splitlines()
    cause = next((line.strip() for line in lines if any(c in line for c in FAILURE_CAUSES)), None)
    return " | ".join(([cause] if cause else []) + lines[-3:])


def add_comparisons(results: list[dict[str, Any]]) -> None:
    """Speed and memory relative to the plain loop at the reference batch (same shape and mode, its smallest
    batch: the equal-batch comparison) and at the same rows when the plain loop ran those, and the loss check."""
    def key(r: dict[str, Any]) -> tuple:
        return r["case"]["shape"], r["case"]["mode"]

    ok = [r for r in results if "error" not in r]
    plain_runs = sorted((r for r in ok if r["case"]["path"] == "plain"), key=lambda r: -r["case"]["batch"])
    plain = {key(r): r for r in plain_runs}  # the smallest batch wins
    plain_same = {(*key(r), r["case"]["batch"]): r for r in plain_runs}
    raw = {(*key(r), r["case"]["batch"]): r for r in ok if r["case"]["path"] == "raw"}
    for r in ok:
        base = plain.get(key(r))
        if base and base is not r:
            r["x_plain_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["x_plain_peak_gib"] = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
        same = plain_same.get((*key(r), r["case"]["batch"]))
        if same and same is not r and same is not base:
            r["x_plain_same_rows_tokens_per_s"] = r["tokens_per_s"] / same["tokens_per_s"]
            r["x_plain_same_rows_peak_gib"] = r["peak_gib"] / same["peak_gib"] if same["peak_gib"] else None
        ref = raw.get((*key(r), r["case"]["batch"]))
        if r["case"]["path"] == "tuned" and ref and r["first_losses"] and ref["first_losses"]:
            delta = abs(r["first_losses"][0] - ref["first_losses"][0]) / abs(ref["first_losses"][0])
            r["loss_check"] = {"first_loss": r["first_losses"][0], "raw_first_loss": ref["first_losses"][0],
                               "rel_delta": delta, "tolerance": LOSS_TOLERANCE, "ok": delta <= LOSS_TOLERANCE}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table, one row per case; "x plain" is against the plain loop at its smallest batch (the equal-batch
    reference), "same rows" against the plain loop at this case's rows where it ran them."""
    runs = any("run" in r for r in results)
    lines = ["| case | tokens/s | step s | peak GiB | MFU | x plain tok/s | x plain mem | x plain same rows tok/s, mem "
             "| loss step 1 (vs raw) |" + (" run |" if runs else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if runs else "")]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | ERROR: {r['error'][:160].replace('|', '/')} | | | | | | | |"
                         + (f" {r.get('run', '')} |" if runs else ""))
            continue
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else ""  # noqa: E731
        check = r.get("loss_check")
        loss = fmt(r["first_losses"][0], ".4f") if r["first_losses"] else ""
        if check:
            loss += f" ({100 * check['rel_delta']:.2f}% {'ok' if check['ok'] else 'OUT OF TOLERANCE'})"
        same = ""
        if "x_plain_same_rows_tokens_per_s" in r:
            same = (f"{r['x_plain_same_rows_tokens_per_s']:.2f}, "
                    f"{fmt(r.get('x_plain_same_rows_peak_gib'), '.2f')}")
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | "
                     f"{100 * r['mfu']:.1f}% | {fmt(r.get('x_plain_tokens_per_s'), '.2f')} | "
                     f"{fmt(r.get('x_plain_peak_gib'), '.2f')} | {same} | {loss} |"
                     + (f" {r.get('run', '')} |" if runs else ""))
    return "\n".join(lines)


def plan(shapes: list[str], modes: list[str], batch: int, prompt: int, response: int, steps: int, warmup: int,
         yaml_batch: int, ablations: bool) -> list[Case]:
    """The side-by-side cases and the ablations.

    At equal batch (``batch`` rows): plain loop, raw Ludwig, tuned (the task YAML as committed, speed-ups on); the
    plain loop also at the YAML's rows (``yaml_batch``), the equal-batch reference for the tuned path there. Then tuned at the YAML's rows per micro-batch (``yaml_batch``), without gradient checkpointing (memory
    permitting) and at twice the rows (with and without); ablations undo one speed-up or change one YAML setting
    at ``yaml_batch``.
    """
    cases = []
    for shape in shapes:
        layout = "packed" if SHAPES[shape]["arch"] == "llama" else "unpacked"
        for mode in modes:
            common = dict(shape=shape, mode=mode, prompt_tokens=prompt, response_tokens=response, steps=steps,
                          warmup=warmup)
            for path in ("plain", "raw", "tuned"):
                cases.append(Case(path=path, batch=batch, **common))
            cases.append(Case(path="plain", batch=yaml_batch, **common))  # the plain loop at the YAML's rows too
            prefix = f"{shape}-{mode}-tuned"
            no_gc = {"trainer": {"enable_gradient_checkpointing": False}}
            cases += [Case(path="tuned", batch=yaml_batch, label=f"{prefix}-yaml-{layout}-b{yaml_batch}", **common),
                      Case(path="tuned", batch=yaml_batch, label=f"{prefix}-{layout}-b{yaml_batch}-nogc", yaml=no_gc,
                           **common),
                      Case(path="tuned", batch=2 * yaml_batch, label=f"{prefix}-{layout}-b{2 * yaml_batch}", **common),
                      Case(path="tuned", batch=2 * yaml_batch, label=f"{prefix}-{layout}-b{2 * yaml_batch}-nogc",
                           yaml=no_gc, **common)]
            if not ablations:
                continue
            undo = ["bf16_autocast", "target_only_logits", "liger_kernels"] + (
                ["lean_kbit_prep", "sdpa_attention"] if mode == "qlora" else ["bf16_weights"])
            for name in undo:
                cases.append(Case(path="tuned", batch=yaml_batch, label=f"{shape}-{mode}-ablate-{name}",
                                  extra_env={"LUDWIG_MT_SPEEDUPS_OFF": name}, **common))
            cases.append(Case(path="tuned", batch=yaml_batch, label=f"{shape}-{mode}-ablate-packing",
                              yaml={"trainer": {"packing": False}}, **common))
            cases.append(Case(path="tuned", batch=yaml_batch, label=f"{shape}-{mode}-ablate-optimizer-adamw",
                              yaml={"trainer": {"optimizer": {"type": "adamw"}}}, **common))
    return cases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--work", type=Path, default=None, help="scratch folder (models, datasets); default: /tmp")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny shapes, few steps, bf16 LoRA only")
    p.add_argument("--shapes", nargs="+", default=["llama3.2-1b", "bloom-1b1"])
    p.add_argument("--modes", nargs="+", default=["qlora", "lora"])
    p.add_argument("--only", nargs="*", default=[], help="keep only cases whose name contains one of these")
    p.add_argument("--ablations", action="store_true", help="also tuned with each speed-up undone (batch 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--yaml-batch", type=int, default=None,
                   help="rows per micro-batch of the tuned cases; default: the task YAML's trainer.batch_size")
    p.add_argument("--prompt-tokens", type=int, default=190)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=int, default=100000, help="skip the remaining cases after this many seconds")
    add_worker_arguments(p, "train_speed.json")
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.merge:
        return merge_runs(args.merge, args.out)
    if args.smoke:
        args.shapes = [s for s in args.shapes if s.startswith("tiny")] or ["tiny-llama", "tiny-bloom"]
        args.modes, args.steps, args.warmup = ["lora"], min(args.steps, 3), 1
        args.prompt_tokens, args.response_tokens = min(args.prompt_tokens, 40), min(args.response_tokens, 16)
        args.yaml_batch = min(args.yaml_batch or 16, 16)

    import tempfile

    import torch
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="train_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_tflops(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}): "
          f"matmul {peak:.0f} TFLOP/s", flush=True)
    yaml_batch = args.yaml_batch or int(task_yaml()["trainer"]["batch_size"])
    cases = plan(args.shapes, args.modes, args.batch, args.prompt_tokens, args.response_tokens, args.steps,
                 args.warmup, yaml_batch, args.ablations)
    if args.only:
        cases = [c for c in cases if any(o in case_name(c) for o in args.only)]
    models = {s: build_model_dir(s, work) for s in sorted({c.shape for c in cases})}
    n_params = {s: matmul_params(m) for s, m in models.items()}
    datasets: dict[tuple, Path] = {}
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for case in cases:
        if time.perf_counter() - t_start > args.budget:
            results.append({"name": case_name(case), "case": asdict(case), "error": "skipped: time budget spent"})
            continue
        key = (case.shape, case.batch, case.prompt_tokens, case.response_tokens)
        if key not in datasets:
            tok = AutoTokenizer.from_pretrained(models[case.shape])
            n_rows = case.batch * (case.steps + case.warmup + 1)
            rows = build_rows(tok, n_rows + 2, case.prompt_tokens, case.response_tokens)
            datasets[key] = write_dataset(rows, work / f"data-{'-'.join(map(str, key))}.csv", n_val=2)
        out = case_result(case, launch(case, models[case.shape], datasets[key], work, args.timeout),
                          n_params[case.shape], peak, ("profile", "syncs", "memory_at_peak"))
        results.append(out)
        print(progress_line(out, time.perf_counter() - t_start), flush=True)
        add_comparisons(results)
        (args.out / "train_speed.json").write_text(json.dumps(
            {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
             "matmul_tflops": peak, "matmul_params": n_params, "task_yaml_trainer": task_yaml()["trainer"],
             "raw_yaml": RAW_YAML,
             "mfu_definition": "4 * N_matmul_params * tokens_per_s / measured bf16 matmul FLOP/s",
             "versions": versions(), "results": results}, indent=1))
        (args.out / "train_speed.md").write_text(table(results) + "\n")
    print(table(results))


def add_worker_arguments(p: argparse.ArgumentParser, results_file: str) -> None:
    """Each case's time limit, the hidden arguments of its worker process (:func:`launch`), ``--merge``."""
    p.add_argument("--timeout", type=int, default=300, help="seconds per case")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case"), p.add_argument("--model-dir"), p.add_argument("--dataset")
    p.add_argument("--workdir"), p.add_argument("--result")
    p.add_argument("--merge", nargs="+", type=Path, help=f"only merge these runs' {results_file} into --out")


def merge_runs(paths: list[Path], out: Path) -> None:
    """One table from several runs' JSON (one device call holds about 13 cases): a case measured in several runs
    keeps its latest row; comparisons are recomputed; each row says which run it came from."""
    runs, rows = latest_rows(paths, lambda key: key.startswith("x_plain") or key == "loss_check")

    def rank(r: dict[str, Any]) -> tuple:
        c, name = r["case"], r["name"]
        order = (c["path"] != "plain", c["path"] != "raw", "packed" in name or "unpacked" in name, "ablate" in name)
        return c["shape"], c["mode"], order

    results = sorted(rows, key=rank)
    add_comparisons(results)
    write_merged(out, "train_speed", runs, results, table(results))


def latest_rows(paths: list[Path], derived) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each run's metadata (its file name added) and the latest row of every case over the runs, in the later run's
    order, naming its run; keys for which ``derived(key)`` is true are dropped (the merge recomputes them)."""
    runs, by_name = [], {}
    for path in paths:
        run = json.loads(path.read_text())
        runs.append({k: v for k, v in run.items() if k != "results"} | {"file": path.name})
        for r in run["results"]:
            r = {k: v for k, v in r.items() if not derived(k)}
            by_name.pop(r["name"], None)  # re-insert: the later run's row, in the later run's order
            by_name[r["name"]] = {**r, "run": path.name, "matmul_tflops": run["matmul_tflops"]}
    return runs, list(by_name.values())


def write_merged(out: Path, stem: str, runs: list[dict[str, Any]], results: list[dict[str, Any]],
                 table_text: str) -> None:
    """``stem``.json (runs and rows) and ``stem``.md (a legend of the runs, then the table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"runs": runs, "results": results}, indent=1))
    legend = "\n".join(f"- {r['file']}: {r.get('device_name', r['device'])}, measured bf16 matmul "
                       f"{r['matmul_tflops']:.0f} TFLOP/s, {r.get('versions')}" for r in runs)
    (out / f"{stem}.md").write_text(f"Runs merged (a later run's row replaces an earlier one):\n{legend}\n\n"
                                    + table_text + "\n")
    print(table_text)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "ludwig", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


if __name__ == "__main__":
    main()
