"""The project against the fine-tuning tools users would pick instead: TRL's ``SFTTrainer`` and unsloth, one run.

Issue #17. Same shape (random weights, public config values: :data:`bench.train_speed.SHAPES`), same rows (exactly
190 prompt + 64 response tokens + EOS, loss on the response and EOS), same LoRA recipe, same rows per optimizer
step; each path as its own documentation recommends for speed:

* ``project`` - ``ludwig_configs/sql.yaml`` as committed through real ``LudwigModel.train`` (the benchmark's
  ``tuned`` path: :func:`bench.train_speed.worker_ludwig`), with the local model and these rows;
* ``trl``     - TRL ``SFTTrainer``: prompt/completion loss, ``packing=True`` (best-fit decreasing) with
  ``padding_free``, ``use_liger_kernel``; QLoRA with gradient checkpointing and paged AdamW, LoRA without
  checkpointing (the TRL/PEFT docs' recipes). Flash-attention is not on the GPU image, so attention is SDPA on the
  flattened packs (TRL warns about it; the table says so);
* ``unsloth`` - ``FastLanguageModel`` (its 4-bit loading, its "unsloth" gradient checkpointing, its kernels) and
  unsloth's patched ``SFTTrainer`` with the same packing, ``adamw_8bit`` as its notebooks; once at the YAML's
  LoRA dropout and once at dropout 0 (its fast LoRA path, ``-fast``).

The LoRA recipe (r, alpha, dropout, target modules) and gradient checkpointing of every path are read from the
same rendered YAML the project trains with (:func:`peer_settings`), so they cannot drift apart.

Checks (in the JSON and the table): every path trains on the same number of loss tokens per step (counted from the
batches each one built: the project's target positions, the peers' shifted labels) and starts from the same
first-step loss (LoRA B = 0: the base model's loss) within :data:`bench.train_speed.LOSS_TOLERANCE` of the
project's. A path that cannot run gets one line saying why.

Real rows (``--data prepared.csv --task samsum --model DIR``, e.g. SmolLM2-135M and samsum's dialogues): rows
of unequal length from a prepared task dataset (those that fit the task YAML's sequence limits, in file order),
the task's YAML, a real model. The peers get the rows as the project's token ids (:func:`peer_examples`: the same
sequences, loss on the same tokens). Each path reads the rows in file order (Ludwig ``should_shuffle: false``, the
peers a sequential sampler; with packs, the peers' best-fit packing regroups rows within chunks of 1,000), at a constant
learning rate (the YAML's schedules differ between Ludwig and the Trainer, and 50 steps are too few for them to
matter). A peer's step holds the project's rows (``--peer-steps rows``, the default: padding-free batches of the
YAML's rows per step, so steps hold the same rows, losses compare step by step and memory at equal work), or
(``--peer-steps packs``) as many 2,048-token packs as the project's rows fill on average. The check is
then the loss curve (:func:`loss_curve_check`): the mean loss per loss token over every window of
:data:`CURVE_WINDOW_ROWS` rows (the same rows on every path) within :data:`CURVE_TOLERANCE` of the project's, and the
same tokens and loss tokens per row over those windows; tokens per second count
real tokens (no padding) over all timed steps.

``--project-variants NAME`` adds the project with one change (:data:`PROJECT_VARIANTS`: a YAML override, or a
speed-up switched off) to the same run, checked and compared like a peer.

Run (GPU): bash bench/peers_gpu.sh install, then at once bash bench/peers_gpu.sh run [ARGS] (its header: the carries)
Real rows as run 13 (after install and the two ``gguf`` calls): bash bench/peers_gpu.sh run --data
    .bench-data/samsum-5k.csv --task samsum --model /tmp/models/smollm2-135m --modes qlora --project-variants no-pack
    --skip fast --steps 50 --warmup 4   (the CSV: the first 5,000 training rows of ``./run.sh prep samsum``'s train.csv)
Run (CPU smoke test of the project path; TRL 1.15 and unsloth need CUDA, their rows say so):
    python bench/peers.py --smoke --out /tmp/peers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (bench/ is scripts, not a package)

PATHS = ("project", "trl", "unsloth")
PACK_LENGTH = 2048  # tokens per packed sequence: the setting, what the peers pack to


#: real rows: rows per window of the loss-curve check: the chunk the peers' best-fit packing regroups (TRL packs with
#: ``datasets.Dataset.map``, batches of 1,000 rows), so a window holds the same rows on every path
CURVE_WINDOW_ROWS = 1000
#: real rows: complete windows a path must have read for its curve to count
CURVE_MIN_WINDOWS = 3
#: real rows: largest relative gap allowed between a window's mean loss and the project's
CURVE_TOLERANCE = 0.03
#: real rows: largest relative gap in tokens (and loss tokens) per row (the tokenizers split prompt and response
#: alike; a merge across their boundary moves a token)
ROW_TOKENS_TOLERANCE = 0.02
#: real rows: every path reads rows in file order at a constant learning rate (the peers: :func:`worker_peer`)
REAL_ROWS_YAML: dict[str, Any] = {"trainer": {"should_shuffle": False,
                                              "learning_rate_scheduler": {"decay": None, "warmup_fraction": 0.0}}}

NEEDS_CUDA = "needs a CUDA GPU (TRL 1.15 takes its loss through a Triton kernel; unsloth's kernels are Triton)"


def pack_length() -> int:
    """The pack length of this run (the driver sets ``BENCH_PACK_LENGTH`` for its workers; the smoke test packs
    four of its short rows)."""
    return int(os.environ.get("BENCH_PACK_LENGTH", PACK_LENGTH))


# ---------------------------------------------------------------------------------------------------- settings


def peer_settings(case: ts.Case, model_dir: Path) -> dict[str, Any]:
    """The LoRA recipe and checkpointing of the rendered task YAML, as every path must use them."""
    config = ts.ludwig_config(case, model_dir, cpu=False)
    adapter, trainer = config["adapter"], config["trainer"]
    return {"r": adapter["r"], "alpha": adapter["alpha"],
            "dropout": float(case.extra_env.get("BENCH_LORA_DROPOUT", adapter["dropout"])),
            "target_modules": list(adapter["target_modules"]),
            "gradient_checkpointing": bool(trainer.get("enable_gradient_checkpointing")),
            "learning_rate": float(trainer["learning_rate"]),
            "max_grad_norm": float((trainer.get("gradient_clipping") or {}).get("clipglobalnorm",
                                                                                LUDWIG_CLIP_GLOBAL_NORM))}


#: Ludwig 0.17.10's default ``trainer.gradient_clipping.clipglobalnorm`` (the Trainer's default is 1.0)
LUDWIG_CLIP_GLOBAL_NORM = 0.5


#: real rows, how a peer's optimizer step is made (``--peer-steps``): ``rows`` (default) - the project's rows per step,
#: in file order, padding-free without packing (the collator joins a step's rows into one sequence whose positions
#: restart at each row: unsloth's default, TRL's ``padding_free``), so every path's step holds the same rows: losses
#: compare step by step, and memory and speed at equal work; ``packs`` - ``packing=True`` (best-fit decreasing) into
#: as many 2,048-token packs per step as the project's rows fill on average (:func:`real_packs_per_step`): the peers'
#: recommended packing, with steps of other rows (and fewer tokens at most) than the project's
PEER_STEPS = ("rows", "packs")


def same_rows(case: ts.Case) -> bool:
    """Whether a peer's step holds exactly the project's rows (real rows with ``--peer-steps rows``; the driver sets
    ``BENCH_PEER_STEPS`` for its workers). Equal rows always pack: 8 rows of 255 tokens fill a 2,048-token pack, the
    same work either way."""
    return bool(case.real_rows) and os.environ.get("BENCH_PEER_STEPS", PEER_STEPS[0]) == "rows"


def peer_batching(case: ts.Case) -> dict[str, Any]:
    """The ``SFTConfig`` fields that make a peer's step (padding-free in both: one sequence per step whose positions
    restart at each row). Same rows: the project's rows per step, no packing and no ``max_length`` (every row fits
    the YAML's limits already, :func:`fitting_rows`, and TRL refuses a ``max_length`` it would not enforce); else
    best-fit packs of :func:`pack_length` tokens."""
    if same_rows(case):
        return {"per_device_train_batch_size": case.batch, "packing": False, "max_length": None}
    return {"per_device_train_batch_size": packs_per_step(case), "packing": True, "max_length": pack_length()}


def rows_per_pack(case: ts.Case) -> int:
    return pack_length() // case.seq_len


def packs_per_step(case: ts.Case) -> int:
    """Packed sequences per optimizer step that hold the case's rows per step (64 rows of 255 -> 8 packs of 8);
    with real rows, what the driver computed from their mean length (:func:`real_packs_per_step`)."""
    if os.environ.get("BENCH_PACKS_PER_STEP"):
        return int(os.environ["BENCH_PACKS_PER_STEP"])
    if case.batch % rows_per_pack(case):
        raise ValueError(f"{case.batch} rows per step do not fill packs of {rows_per_pack(case)} rows")
    return case.batch // rows_per_pack(case)


def real_packs_per_step(rows_per_step: int, row_tokens: list[int], length: int) -> int:
    """Packs per step that hold as many tokens as ``rows_per_step`` rows of the data's mean length (at least 1)."""
    return max(1, round(rows_per_step * sum(row_tokens) / len(row_tokens) / length))


def row_ids(tokenizer, row: dict[str, str]) -> tuple[list[int], list[int]]:
    """A row's prompt and response + EOS token ids as the project trains on them: Ludwig's ``HFTokenizer`` encodes
    prompt and response apart (no token merges across the boundary) and the LLM appends EOS to the response. Checked
    on SmolLM2 (its tokenizer adds no special tokens) against ``LudwigModel.preprocess``; a tokenizer that adds BOS
    gets it on the prompt here."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt), list(response)


def fitting_rows(rows: list[dict[str, str]], tokenizer, prompt_limit: int, response_limit: int
                 ) -> tuple[list[dict[str, str]], list[int]]:
    """The rows (in order) whose prompt and response + EOS fit the task YAML's limits, so that no path truncates
    (Ludwig cuts at its limits, the peers at the pack length), and each kept row's token count."""
    kept, lengths = [], []
    for row in rows:
        prompt, response = row_ids(tokenizer, row)
        if len(prompt) + 2 <= prompt_limit and len(response) + 1 <= response_limit:  # spare: Ludwig's own symbols
            kept.append(row)
            lengths.append(len(prompt) + len(response))
    return kept, lengths


def peer_examples(rows: list[dict[str, str]], tokenizer) -> list[dict[str, list[int]]]:
    """Real rows for the peers, pre-tokenized (a documented ``SFTTrainer`` input: ``input_ids`` and
    ``completion_mask``) by :func:`row_ids`: every path trains on the very token ids the project does, whatever
    a peer's own tokenization of prompt + completion would merge or add."""
    examples = []
    for row in rows:
        prompt, response = row_ids(tokenizer, row)
        examples.append({"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + [1] * len(response)})
    return examples


def row_windows(rows_per_step: list[int], window_rows: int) -> list[list[int]]:
    """The steps of each complete window of ``window_rows`` rows, in file order: a step belongs to the window its
    first row lies in, and a window counts once the run has read all of its rows."""
    total, windows, start = sum(rows_per_step), [], 0
    for step, n in enumerate(rows_per_step):
        window = start // window_rows
        if (window + 1) * window_rows <= total:
            windows += [[] for _ in range(window + 1 - len(windows))]
            windows[window].append(step)
        start += n
    return windows


def window_loss(result: dict[str, Any], steps: list[int]) -> float:
    """Mean loss per loss token over ``steps`` (each step's loss is already its own loss tokens' mean)."""
    losses, weights = result["losses"], result.get("loss_tokens_per_step") or [1] * len(result["losses"])
    return sum(losses[i] * weights[i] for i in steps) / sum(weights[i] for i in steps)


def loss_curve_check(reference: dict[str, Any], result: dict[str, Any], window_rows: int = CURVE_WINDOW_ROWS,
                     tolerance: float = CURVE_TOLERANCE) -> dict[str, Any]:
    """Window by window of rows in file order, the mean loss per loss token of ``result`` against ``reference``'s:
    with rows of unequal length grouped differently per step (the peers' best-fit packs put each chunk's longest
    rows first), single steps hold different rows, windows of the same rows do. Needs ``losses`` and
    ``rows_per_step`` (and weighs by ``loss_tokens_per_step`` where recorded)."""
    mine = row_windows(result.get("rows_per_step") or [], window_rows)
    theirs = row_windows(reference.get("rows_per_step") or [], window_rows)
    windows = []
    for i, (ref_steps, steps) in enumerate(zip(theirs, mine)):
        if not ref_steps or not steps or max(steps) >= len(result.get("losses") or []):
            break
        ref, got = window_loss(reference, ref_steps), window_loss(result, steps)
        windows.append({"rows": [i * window_rows, (i + 1) * window_rows], "steps": [steps[0], steps[-1] + 1],
                        "reference_steps": [ref_steps[0], ref_steps[-1] + 1], "reference": ref, "mean": got,
                        "rel_delta": (got - ref) / ref})
    worst = max((abs(w["rel_delta"]) for w in windows), default=float("inf"))
    return {"windows": windows, "window_rows": window_rows, "max_abs_rel_delta": worst, "tolerance": tolerance,
            "ok": len(windows) >= CURVE_MIN_WINDOWS and worst <= tolerance}


def per_row(result: dict[str, Any], key: str, steps: list[int] | None = None) -> float | None:
    """``key`` (tokens, loss tokens) per row over ``steps`` (default all) of a run that recorded its rows per step."""
    rows, values = result.get("rows_per_step"), result.get(key)
    if not rows or not values:
        return None
    steps = range(min(len(rows), len(values))) if steps is None else steps
    return sum(values[i] for i in steps) / sum(rows[i] for i in steps) if steps else None


def window_steps(windows: list[dict[str, Any]], span: str) -> list[int]:
    """Every step of the compared windows (``span``: ``steps`` for the path, ``reference_steps`` for the project)."""
    return [i for w in windows for i in range(*w[span])]


# ---------------------------------------------------------------------------------------------------- peers


def _lora_config(settings: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=settings["target_modules"], task_type="CAUSAL_LM", bias="none")


def trl_model(case: ts.Case, model_dir: Path, settings: dict[str, Any]):
    """The model as TRL's QLoRA / LoRA docs load it; the adapter is added by ``SFTTrainer(peft_config=...)``."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if case.mode == "qlora":
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model, _lora_config(settings)


def unsloth_model(case: ts.Case, model_dir: Path, settings: dict[str, Any]):
    """``FastLanguageModel`` as unsloth's notebooks use it; its own ``get_peft_model`` and checkpointing."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (patches transformers / peft / trl: must come first)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=pack_length(), dtype=torch.bfloat16,
        load_in_4bit=case.mode == "qlora", load_in_16bit=case.mode == "lora")
    checkpointing = "unsloth" if settings["gradient_checkpointing"] else False
    model = FastLanguageModel.get_peft_model(
        model, r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"], bias="none", use_gradient_checkpointing=checkpointing,
        random_state=0)
    return model, None


def sft_config(case: ts.Case, peer: str, settings: dict[str, Any], workdir: Path):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    if peer == "unsloth":
        optim = "adamw_8bit"  # unsloth's notebooks
    else:
        optim = "paged_adamw_32bit" if case.mode == "qlora" and cuda else "adamw_torch"
    checkpointing = settings["gradient_checkpointing"] and peer == "trl"  # unsloth set its own on the model
    return SFTConfig(
        output_dir=str(workdir), **peer_batching(case), gradient_accumulation_steps=1,
        max_steps=case.warmup + case.steps, learning_rate=settings["learning_rate"], lr_scheduler_type="constant",
        max_grad_norm=settings["max_grad_norm"],
        optim=optim, bf16=cuda, use_cpu=not cuda, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, use_liger_kernel=cuda and peer == "trl",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=10**6, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
        include_num_input_tokens_seen="no")


def worker_peer(case: ts.Case, model_dir: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """One peer's training run; step time between the trainer's step callbacks (after a CUDA sync); loss tokens
    and the loss of every step recorded as tensors and read once at the end (no extra synchronisation)."""
    peer = case.path
    settings = peer_settings(case, model_dir)
    build = unsloth_model if peer == "unsloth" else trl_model
    model, peft_config = build(case, model_dir, settings)  # unsloth before trl: it patches trl on import
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list(peer_examples(rows, tok) if case.real_rows else
                             [{"prompt": r["prompt"], "completion": r["response"]} for r in rows])
    times: list[float] = []
    starts: list[float] = []
    losses: list[Any] = []
    loss_tokens: list[Any] = []
    tokens: list[Any] = []
    row_counts: list[Any] = []

    profile_step = int(os.environ.get("BENCH_PROFILE_STEP", -1))
    profile: list[str] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.peaks.step_begin()
            self.memory.begin(len(times))
            if len(times) == profile_step:  # the same torch.profiler tables as the project's cases
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            starts.append(self.t0)

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            self.peaks.step_end()
            self.memory.end(len(times))
            if len(times) == profile_step + 1:
                self.prof.__exit__(None, None, None)
                profile.extend(ts.profile_tables(self.prof))

    class Recording(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            loss_tokens.append((labels[:, 1:] != -100).sum())
            mask = inputs.get("attention_mask")
            tokens.append(mask.sum() if mask is not None else labels.new_tensor(labels.numel()))
            positions = inputs.get("position_ids")  # padding-free packs: a row starts at each position 0
            row_counts.append((positions == 0).sum() if positions is not None else labels.new_tensor(len(labels)))
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss.detach())
            return loss

        def _get_train_sampler(self, *args, **kwargs):  # real rows: in file order, as the project reads them
            if case.real_rows:
                from torch.utils.data import SequentialSampler

                return SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

    timer = StepTimer()
    timer.peaks, timer.memory = ts.PeakMemory(), ts.MemoryTrace(last_step=case.steps + case.warmup - 1)
    trainer = Recording(model=model, args=sft_config(case, peer, settings, Path(tempfile.mkdtemp())),
                        train_dataset=data, processing_class=tok, peft_config=peft_config, callbacks=[timer])
    trainer.train()
    timer.memory.finish()
    n = len(times)
    return {"step_times": times, "cycle_times": ts.cycle_times(starts), "losses": [float(x) for x in losses[:n]],
            "tokens_per_step": [int(x) for x in tokens[:n]], "loss_tokens_per_step": [int(x) for x in loss_tokens[:n]],
            "rows_per_step": [int(x) for x in row_counts[:n]],
            **timer.peaks.result(), "memory_at_peak": timer.memory.result, "settings": settings, "profile": "\n".join(profile),
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "versions": versions()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "unsloth", "unsloth_zoo", "liger-kernel",
                 "ludwig"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# ---------------------------------------------------------------------------------------------------- driver


#: the project with one change (YAML overrides, environment), measured next to it (``--project-variants``): a YAML
#: change is adopted only after it beats the committed YAML in the same run; ``no-NAME`` undoes speed-up NAME
PROJECT_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "adamw": ({"trainer": {"optimizer": {"type": "adamw"}}}, {}),  # torch's multi-tensor AdamW, not bnb's paged
    "no-lean-lora": ({}, {"LUDWIG_MT_SPEEDUPS_OFF": "lean_lora_forward"}),
    "no-fused-mlp": ({}, {"LUDWIG_MT_SPEEDUPS_OFF": "fused_lora_mlp"}),
    "no-offload": ({}, {"LUDWIG_MT_SPEEDUPS_OFF": "offload_checkpoints"}),
    "no-pack": ({}, {"LUDWIG_MT_SPEEDUPS_OFF": "pack_training_rows"}),  # Ludwig's left-padded batches
    "pack-2048": ({}, {"LUDWIG_MT_PACK_LENGTH": "2048"}),  # packs of 2,048 tokens (the peers' length)
    "pack-longest": ({}, {"LUDWIG_MT_PACK_LENGTH": "longest"}),  # packs as wide as the batch's longest row
    "ludwig-eval": ({}, {"LUDWIG_MT_SPEEDUPS_OFF": "response_only_eval_logits"}),  # Ludwig's own evaluation
    # Ludwig's loop keeping each step's graph through the next step (the fix off)
    "held-graph": ({}, {"LUDWIG_MT_PATCHES_OFF": "release_each_steps_graph_when_it_returns"}),
    "varlen": ({}, {"LUDWIG_MT_PACK_LENGTH": "varlen"}),  # padding-free steps (the default on a CUDA GPU since run 28)
    "pow2": ({}, {"LUDWIG_MT_PACK_LENGTH": "pow2"}),  # power-of-two packs with a block mask (the default before run 28)
    "adam8bit": ({"trainer": {"optimizer": {"type": "paged_adam_8bit"}}}, {}),  # 8-bit Adam states (unsloth: adamw_8bit)
}


def merged(*overrides: dict[str, Any]) -> dict[str, Any]:
    """YAML overrides merged section by section (a later one wins inside a section)."""
    out: dict[str, Any] = {}
    for override in overrides:
        for key, value in override.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def plan(shape: str, modes: list[str], rows: int, prompt: int, response: int, steps: int, warmup: int,
         paths: list[str], project_variants: list[str] = (), real: dict[str, Any] | None = None) -> list[ts.Case]:
    """Per mode: the project as committed (bf16 LoRA: checkpointing off, as NOTES-speed.md compares) and its
    ``project_variants`` (``project+name``), TRL, unsloth at the YAML's dropout and at dropout 0 (its fast path); bf16
    LoRA also with checkpointing on. ``real``: the :class:`ts.Case` fields of real rows (task, arch), every case
    then with :data:`REAL_ROWS_YAML`."""
    cases = []
    base = REAL_ROWS_YAML if real else {}
    no_gc = merged(base, {"trainer": {"enable_gradient_checkpointing": False}})
    for mode in modes:
        common = dict(shape=shape, mode=mode, batch=rows, prompt_tokens=prompt, response_tokens=response,
                      steps=steps, warmup=warmup, **({**real, "real_rows": True} if real else {}))
        variants = [("", base)] if mode == "qlora" else [("", no_gc), ("-gc", base)]
        for suffix, yaml in variants:
            for path in paths:
                label = f"{mode}{suffix}-{path}"
                cases.append(ts.Case(path="tuned" if path == "project" else path, label=label, yaml=yaml,
                                     **common))
                if path == "project":
                    cases += [ts.Case(path="tuned", label=f"{label}+{name}",
                                      yaml=merged(yaml, PROJECT_VARIANTS[name][0]),
                                      extra_env=PROJECT_VARIANTS[name][1], **common) for name in project_variants]
                if path == "unsloth":
                    cases.append(ts.Case(path=path, label=f"{label}-fast", yaml=yaml,
                                         extra_env={"BENCH_LORA_DROPOUT": "0.0"}, **common))
    return cases


def add_checks(results: list[dict[str, Any]]) -> None:
    """Against the project's row of the same mode and checkpointing: speed and memory ratios, equal loss tokens per
    step, first-step loss within tolerance."""
    def group(r: dict[str, Any]) -> str:  # "lora-gc" of lora-gc-unsloth-fast, lora-gc-project+adamw, ...
        name = r["name"].split("+")[0]
        return name.rsplit("-", 2 if name.endswith("-fast") else 1)[0]

    project = {group(r): r for r in results if "error" not in r and r["name"].endswith("-project")}
    for r in results:
        ref = project.get(group(r))
        if "error" in r or ref is None or ref is r:
            continue
        r["project_over_this_tokens_per_s"] = ref["tokens_per_s"] / r["tokens_per_s"]
        if r.get("loop_tokens_per_s") and ref.get("loop_tokens_per_s"):
            r["project_over_this_loop_tokens_per_s"] = ref["loop_tokens_per_s"] / r["loop_tokens_per_s"]
        r["project_over_this_peak_gib"] = ref["peak_gib"] / r["peak_gib"] if r["peak_gib"] else None
        if r.get("step_peak_gib") and ref.get("step_peak_gib"):
            r["project_over_this_step_peak_gib"] = ref["step_peak_gib"] / r["step_peak_gib"]
        if r["case"].get("real_rows"):
            r["check"] = real_rows_check(ref, r)
            continue
        same_tokens = r.get("loss_tokens_per_step") == ref.get("loss_tokens_per_step")
        delta = abs(r["first_losses"][0] - ref["first_losses"][0]) / abs(ref["first_losses"][0])
        r["check"] = {"loss_tokens_equal": same_tokens, "first_loss_rel_delta": delta,
                      "tolerance": ts.LOSS_TOLERANCE, "ok": same_tokens and delta <= ts.LOSS_TOLERANCE}


def real_rows_check(ref: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Real rows: the loss curve against the project's, and the same tokens and loss tokens per row over the rows
    both read in the compared windows."""
    curve = loss_curve_check(ref, r)
    gaps = {}
    for key in ("tokens_per_step", "loss_tokens_per_step"):
        mine = per_row(r, key, window_steps(curve["windows"], "steps"))
        theirs = per_row(ref, key, window_steps(curve["windows"], "reference_steps"))
        gaps[key] = None if mine is None or theirs is None else abs(mine - theirs) / theirs
    tokens_ok = all(g is not None and g <= ROW_TOKENS_TOLERANCE for g in gaps.values())
    check = {"loss_curve": curve, "per_row_rel_gap": gaps, "row_tokens_tolerance": ROW_TOKENS_TOLERANCE,
             "loss_tokens_equal": tokens_ok, "same_steps": same_steps(ref, r), "ok": curve["ok"] and tokens_ok}
    if check["same_steps"]:  # the first step's rows are the same: its loss is the base model's on both paths
        delta = abs(r["first_losses"][0] - ref["first_losses"][0]) / abs(ref["first_losses"][0])
        check.update(first_loss_rel_delta=delta, tolerance=ts.LOSS_TOLERANCE,
                     ok=check["ok"] and delta <= ts.LOSS_TOLERANCE)
    return check


def same_steps(ref: dict[str, Any], r: dict[str, Any]) -> bool:
    """Whether every step both runs took held the same rows: as many rows and the same loss tokens, step by step
    (``--peer-steps rows``; best-fit packs regroup the rows)."""
    keys = ("rows_per_step", "loss_tokens_per_step")
    n = min(len(x.get(k) or []) for x in (ref, r) for k in keys)
    return n > 0 and all(ref[k][:n] == r[k][:n] for k in keys)


def placed_peak(r: dict[str, Any]) -> str:
    """The process peak, and where it lies when above the steps' (before them: loading; after: Ludwig's
    end-of-training evaluation), so a process peak the peers do not have reads as what it is."""
    peak, places = r["peak_gib"], {"load": r.get("load_peak_gib"), "between": r.get("between_steps_peak_gib"),
                                   "after": r.get("after_steps_peak_gib")}
    if r.get("step_peak_gib") is None or peak <= r["step_peak_gib"] or None in places.values():
        return f"{peak:.2f}"
    return f"{peak:.2f} ({', '.join(f'{k} {v:.2f}' for k, v in places.items() if v > r['step_peak_gib'])})"


def table(results: list[dict[str, Any]]) -> str:
    """One row per case; the ratios are the project's (same mode and checkpointing) over this row's: tokens/s
    above 1 means the project is faster, GiB below 1 that it needs less memory. ``run`` when merged."""
    runs = any("run" in r for r in results)
    lines = ["| case | tokens/s: step / loop | peak GiB: steps / process (where, if above the steps) | MFU | project tok/s ÷ this: step / loop "
             "| project GiB ÷ this: steps / process | loss tokens/step | first loss | check |"
             + (" run |" if runs else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if runs else "")]
    for r in results:
        tail = f" {r.get('run', '')} |" if runs else ""
        if "error" in r:
            lines.append(f"| {r['name']} | did not run: {r['error'][:200].replace('|', '/')} | | | | | | | |{tail}")
            continue
        check = r.get("check")
        if check is not None and "loss_curve" in check:
            curve = check["loss_curve"]
            verdict = (f"{'ok' if check['ok'] else 'FAILED'} (loss curve: largest gap "
                       f"{100 * curve['max_abs_rel_delta']:.1f}% over {len(curve['windows'])} windows of "
                       f"{curve['window_rows']} rows; tokens per row equal: {check['loss_tokens_equal']}"
                       + (f"; same rows per step, first loss delta {100 * check['first_loss_rel_delta']:.2f}%"
                          if check.get("same_steps") else "") + ")")
        else:
            verdict = "" if check is None else ("ok" if check["ok"] else
                                                f"FAILED (tokens equal: {check['loss_tokens_equal']}, "
                                                f"loss delta {100 * check['first_loss_rel_delta']:.2f}%)")
        ratio = " / ".join(format(x, ".2f") for x in (r.get("project_over_this_tokens_per_s"),
                                                       r.get("project_over_this_loop_tokens_per_s")) if x)
        loop = f" / {r['loop_tokens_per_s']:.0f}" if r.get("loop_tokens_per_s") else ""
        mems = [r.get("project_over_this_step_peak_gib"), r.get("project_over_this_peak_gib")]
        mem = " / ".join("-" if m is None else format(m, ".2f") for m in mems) if mems[1] is not None else ""
        step_peak = "-" if r.get("step_peak_gib") is None else format(r["step_peak_gib"], ".2f")
        per_step = sorted(set(r.get("loss_tokens_per_step") or []))
        loss_tokens = (f"{per_row(r, 'loss_tokens_per_step'):.1f} per row" if r.get("case", {}).get("real_rows")
                       and per_row(r, "loss_tokens_per_step") else ",".join(map(str, per_step)))
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f}{loop} | {step_peak} / {placed_peak(r)} | "
                     f"{100 * r['mfu']:.1f}% | {ratio} | {mem} | "
                     f"{loss_tokens} | "
                     f"{r['first_losses'][0]:.4f} | {verdict} |{tail}")
    curves = [r for r in results if (r.get("check") or {}).get("loss_curve")]
    if curves:
        spans = max((r["check"]["loss_curve"]["windows"] for r in curves), key=len)
        lines += ["", "Loss curves (real rows): mean loss per loss token over the same rows in file order, this path / "
                  "the project's (relative gap)", "", "| case | " + " | ".join(
                      f"rows {w['rows'][0]}-{w['rows'][1] - 1}" for w in spans) + " |", "|---|" + "---:|" * len(spans)]
        for r in curves:
            cells = [f"{w['mean']:.4f} / {w['reference']:.4f} ({100 * w['rel_delta']:+.1f}%)"
                     for w in r["check"]["loss_curve"]["windows"]]
            lines.append(f"| {r['name']} | " + " | ".join(cells + [""] * (len(spans) - len(cells))) + " |")
    return "\n".join(lines)


def merge_runs(paths: list[Path], out: Path) -> None:
    """One table from several runs' peers.json (a device call holds about 8 cases): a case measured in several
    runs keeps its latest row, the checks are recomputed against the project's row of the latest run that has it,
    and each row names its run."""
    derived = ("check", "project_over_this_tokens_per_s", "project_over_this_loop_tokens_per_s",
               "project_over_this_peak_gib", "project_over_this_step_peak_gib")
    runs, rows = ts.latest_rows(paths, lambda key: key in derived)
    order = {name: i for i, name in enumerate(c.label for c in plan(
        runs[-1]["shape"], ["qlora", "lora"], 1, 0, 0, 0, 0, list(PATHS), sorted(PROJECT_VARIANTS)))}
    results = sorted(rows, key=lambda r: order.get(r["name"], len(order)))
    add_checks(results)
    ts.write_merged(out, "peers", runs, results, table(results))


def model_family(model_dir: Path) -> str:
    """The LoRA target family of a real model folder: Bloom's fused names, else Llama-style projections."""
    config = json.loads((model_dir / "config.json").read_text())
    return "bloom" if config.get("model_type") == "bloom" else "llama"


def real_dataset(path: Path, tokenizer, limits: list[int], needed: int, work: Path) -> tuple[Path, dict[str, Any]]:
    """The first ``needed`` training rows of a prepared CSV that fit ``limits`` (+8 validation rows), written for
    every path; what was kept and dropped, and the rows' token counts."""
    import pandas as pd

    frame = pd.read_csv(path)
    if "split" in frame:
        frame = frame[frame["split"] == 0]
    rows = frame[["prompt", "response"]].astype(str).to_dict("records")
    kept, lengths = fitting_rows(rows, tokenizer, *limits)
    n_val = 8  # with fewer than 3 Ludwig skips validation, and then its end-of-training report can crash
    if len(kept) < needed + n_val:
        raise SystemExit(f"error: {path}: {len(kept)} rows fit the limits {limits}, {needed + n_val} needed "
                         "(fewer --steps or --rows, or another task)")
    last = kept[needed + n_val - 1]
    examined = next(i for i, row in enumerate(rows) if row is last) + 1  # identity: equal rows may repeat
    out = ts.write_dataset(kept[:needed + n_val], work / "data.csv", n_val=n_val)
    lengths = lengths[:needed]
    return out, {"data": str(path), "rows": needed, "rows_examined": examined,
                 "rows_dropped_over_limits": examined - needed - n_val, "limits": limits,
                 "row_tokens_mean": sum(lengths) / needed, "row_tokens_min": min(lengths),
                 "row_tokens_max": max(lengths), "row_tokens": lengths}


def run_worker(args: argparse.Namespace) -> None:
    case = ts.Case(**json.loads(args.case))
    if case.path == "tuned":
        return ts.run_worker(args)
    import pandas as pd

    rows = pd.read_csv(args.dataset)
    rows = rows[rows["split"] == 0][["prompt", "response"]].to_dict("records")
    Path(args.result).write_text(json.dumps(worker_peer(case, Path(args.model_dir), rows)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shape, a few steps, project and TRL only")
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--modes", nargs="+", default=["qlora", "lora"])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--only", nargs="*", default=[], help="keep only cases whose name matches one of these regular "
                   "expressions (re.search: a plain word matches anywhere, ^lora- only the bf16 LoRA cases)")
    p.add_argument("--skip", nargs="*", default=[], help="then drop cases whose name matches one of these")
    p.add_argument("--project-variants", nargs="*", default=[], choices=sorted(PROJECT_VARIANTS),
                   help="also the project with this YAML change (same run, same rows)")
    p.add_argument("--rows", type=int, default=None, help="rows per optimizer step; default: the YAML's batch_size")
    p.add_argument("--steps", type=int, default=30,
                   help="timed steps per case (the project's CPU-bound steps jitter with the host: 10 were too few)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="real rows: a prepared task CSV (prompt, response, split)")
    p.add_argument("--task", default="sql", help="the task YAML (ludwig_configs/<task>.yaml) the project trains with")
    p.add_argument("--peer-steps", choices=PEER_STEPS, default=PEER_STEPS[0], help="real rows: a peer's step holds "
                   "the project's rows (rows, padding-free) or as many 2,048-token packs as they fill (packs)")
    p.add_argument("--model", type=Path, default=None, help="a real model folder instead of --shape's random "
                   "weights (its name replaces the shape's in the results)")
    p.add_argument("--tokenizer", type=Path, default=None, help="random weights of --shape with this model folder's "
                   "tokenizer (real rows at the shape's cost, e.g. the 1B shape with SmolLM2's tokenizer)")
    ts.add_worker_arguments(p, "peers.json")
    args = p.parse_args(argv)
    if args.worker or args.merge:  # a case's process, or only merging earlier runs
        return run_worker(args) if args.worker else merge_runs(args.merge, args.out)
    if args.smoke:
        args.shape, args.modes, args.steps, args.warmup = "tiny-llama", ["lora"], 2, 1
        args.paths = [x for x in args.paths if x != "unsloth"]
        args.rows = args.rows or 16
        if not args.data:  # real rows keep the pack length: their rows are as long as the task's
            os.environ["BENCH_PACK_LENGTH"] = str(4 * (40 + 16 + 1))

    import torch
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = ts.matmul_tflops(device)
    yaml = ts.task_yaml(args.task)
    rows = args.rows or int(yaml["trainer"]["batch_size"])
    model_dir = args.model or ts.build_model_dir(args.shape, work, args.tokenizer)
    tok = AutoTokenizer.from_pretrained(model_dir)
    real_rows: dict[str, Any] = {}
    if args.data:
        args.shape = model_dir.name
        limits = [yaml[f"{side}_features"][0]["preprocessing"]["max_sequence_length"] for side in ("input", "output")]
        real = {"task": args.task, "arch": model_family(model_dir)}
        cases = plan(args.shape, args.modes, rows, *limits, args.steps, args.warmup, args.paths, args.project_variants,
                     real=real)
        # 20 % spare: the peers' packs per step are rounded to whole packs (a step may hold a few more rows)
        data, real_rows = real_dataset(args.data, tok, limits, int(1.2 * rows * (args.steps + args.warmup + 1)), work)
        real_rows["peer_steps"] = os.environ["BENCH_PEER_STEPS"] = args.peer_steps
        if args.peer_steps == "packs":
            real_rows["packs_per_step"] = real_packs_per_step(rows, real_rows["row_tokens"], pack_length())
            os.environ["BENCH_PACKS_PER_STEP"] = str(real_rows["packs_per_step"])
        real_rows.pop("row_tokens")
        print(f"real rows: {real_rows}", flush=True)
    else:
        cases = plan(args.shape, args.modes, rows, 190 if not args.smoke else 40, 64 if not args.smoke else 16,
                     args.steps, args.warmup, args.paths, args.project_variants)
        data = ts.write_dataset(ts.build_rows(tok, rows * (args.steps + args.warmup + 1) + 2, cases[0].prompt_tokens,
                                              cases[0].response_tokens), work / "data.csv", n_val=2)
    if args.only:
        cases = [c for c in cases if any(re.search(o, c.label) for o in args.only)]
    cases = [c for c in cases if not any(re.search(o, c.label) for o in args.skip)]
    n_params = ts.matmul_params(model_dir)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for case in cases:
        if device == "cpu" and case.path != "tuned":
            out = {"name": case.label, "case": asdict(case), "error": NEEDS_CUDA}
        else:
            out = ts.case_result(case, ts.launch(case, model_dir, data, work, args.timeout, script=Path(__file__)),
                                 n_params, peak, ("loss_tokens_per_step", "tokens_per_step", "cycle_times", "settings",
                                                  "versions", "profile", "memory_at_peak", "losses", "rows_per_step"))
        results.append(out)
        print(ts.progress_line(out, time.perf_counter() - t_start), flush=True)
        add_checks(results)
        (args.out / "peers.json").write_text(json.dumps(
            {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
             "matmul_tflops": peak, "matmul_params": n_params, "shape": args.shape, "rows_per_step": rows,
             "pack_length": pack_length(), "real_rows": real_rows,
             "mfu_definition": "4 * N_matmul_params * tokens_per_s / measured bf16 "
             "matmul FLOP/s", "versions": versions(), "results": results}, indent=1))
        (args.out / "peers.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
