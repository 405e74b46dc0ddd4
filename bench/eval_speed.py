"""Generation-speed benchmark: Ludwig's ``LudwigModel.predict`` vs ``eval.generate`` on the very same model.

One process, one model: a Llama-3.2-1B-shaped causal LM (public config values, random weights: speed does not
depend on weight values) with a word-level tokenizer covering its whole 128,256-token vocabulary, fine-tuned by
Ludwig itself for one short epoch (4-bit nf4 QLoRA on CUDA; float32 LoRA on CPU) so that the model directory is
exactly what ``ludwig train`` writes. The LoRA B matrices are then replaced by random values so the adapter
really changes the outputs. Then, on the same prompts (~200 tokens each, lengths varied so padding matters):

* ``ludwig predict``: ``LudwigModel.load(model_dir).predict(prompts)`` on a subset (it generates one prompt at a
  time); with the project's fixes and speed-ups (what ``ludwig predict`` does in this venv) and, on CUDA, also
  with ``LUDWIG_MT_SPEEDUPS=0`` (raw Ludwig 0.17.10 loading: eager attention);
* ``eval.generate``: batched greedy generation, unmerged (4-bit base + LoRA, as Ludwig runs it) and merged
  (LoRA merged into a bf16 copy of the dequantized base), at each batch size.

Random weights rarely emit eos, and might emit special tokens that decode to nothing, so the generation config
sets ``min_new_tokens = max_new_tokens`` and suppresses the special tokens: every method generates exactly
``new_tokens`` per prompt. Tokens are counted, not assumed: Ludwig's responses are re-tokenized (a word-level
tokenizer round-trips exactly) and ours are the returned ids. Texts of the two are compared on Ludwig's subset.
Timings exclude model loading (reported separately); ours exclude one tiny warm-up call and are the second of
two passes over the prompts (the first is in the JSON as ``first_seconds``).

Run on the GPU (one device call, about 5 minutes; Ludwig + bitsandbytes from .gpu-site, see ../shared/gpu):
    python3 bench/eval_speed.py --out $OUT
CPU smoke test (tiny model, under a minute of work after imports):
    python3 bench/eval_speed.py --smoke --out /tmp/eval_speed
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Public config values of meta-llama/Llama-3.2-1B (hub config.json); the smoke shape takes the same code paths.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=4096),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; <s> is prepended to every text, as Llama's tokenizer does
QLORA = {"bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
         "bnb_4bit_compute_dtype": "bfloat16"}


@dataclass
class Row:
    method: str
    batch_size: int
    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    load_seconds: float
    peak_gib: float | None
    matches_ludwig: str  # "k/n" identical texts on Ludwig's subset, or "-"
    first_seconds: float | None = None  # ours: the first of two timed passes (compilation, allocator warm-up)


# ------------------------------------------------------------------------------------------------ the model
def build_tokenizer(vocab_size: int, out: Path):
    """A word-level tokenizer with one token per model id (every generated id decodes; decode/encode round-trip)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(out)
    return tokenizer


def build_base_model(shape: dict[str, Any], out: Path, device: str) -> Path:
    """Random-weight Llama saved with ``save_pretrained`` (bf16 on CUDA, where it is built in seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(shape["vocab_size"], out)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def word_rows(n: int, words: int, vocab_size: int, seed: int) -> list[str]:
    """``n`` texts of about ``words`` random vocabulary words (+-10%, so batches need padding)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}"
                     for _ in range(rng.randint(int(words * 0.9), int(words * 1.1)))) for _ in range(n)]


def ludwig_config(base: Path, *, cuda: bool, new_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_type": "llm",
        "base_model": str(base),
        "input_features": [{"name": "prompt", "type": "text",
                            "preprocessing": {"max_sequence_length": 2 * prompt_tokens}}],
        "output_features": [{"name": "response", "type": "text", "preprocessing": {"max_sequence_length": 16}}],
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": LORA_TARGETS},
        # every method generates exactly new_tokens word tokens (see the module docstring)
        "generation": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                       "num_beams": 1, "suppress_tokens": [0, 1, 3]},
        "trainer": {"type": "finetune", "epochs": 1, "batch_size": 8, "eval_batch_size": 8,
                    "learning_rate": 0.0002, "gradient_accumulation_steps": 1,
                    "enable_gradient_checkpointing": False,
                    "optimizer": {"type": "paged_adam" if cuda else "adamw"}},
        "preprocessing": {"split": {"type": "fixed", "column": "split"},
                          "global_max_sequence_length": 4 * prompt_tokens},
        "backend": {"type": "local"},
    }
    if cuda:
        config["quantization"] = dict(QLORA)
    return config


def train_with_ludwig(config: dict[str, Any], rows: int, prompt_tokens: int, vocab_size: int, out: Path) -> Path:
    """One short Ludwig fine-tuning run; returns its model directory (``<run>/model``)."""
    import pandas as pd
    from ludwig.api import LudwigModel

    prompts = word_rows(rows, prompt_tokens, vocab_size, seed=1)
    responses = word_rows(rows, 8, vocab_size, seed=2)
    frame = pd.DataFrame({"prompt": prompts, "response": responses,
                          "split": [0] * (rows - 2) + [1, 1]})
    model = LudwigModel(config, logging_level=logging.WARNING)
    results = model.train(dataset=frame, output_directory=str(out), skip_save_processed_input=True,
                          skip_save_progress=True, skip_save_log=True)
    del model
    return Path(results.output_directory) / "model"


def randomize_lora_b(model_dir: Path, std: float = 0.02, seed: int = 0) -> None:
    """Replace the LoRA B matrices (zero-initialised, barely trained) by random values: a real adapter effect."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model_weights" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if "lora_B" in key:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
            tensors[key] = noise.to(value.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ measuring
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def measure_ludwig(model_dir: Path, prompts: list[str], tokenizer, *, speedups: bool) -> tuple[Row, list[str]]:
    """``LudwigModel.load`` + ``predict`` as a user runs it; new tokens counted by re-tokenizing responses."""
    import pandas as pd
    from ludwig.api import LudwigModel

    os.environ["LUDWIG_MT_SPEEDUPS"] = "1" if speedups else "0"
    _reset_peak()
    started = time.perf_counter()
    model = LudwigModel.load(str(model_dir), logging_level=logging.WARNING)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predictions, _ = model.predict(pd.DataFrame({"prompt": prompts}), skip_save_predictions=True,
                                   skip_save_unprocessed_output=True)
    _sync()
    seconds = time.perf_counter() - started
    texts = [str(t) for t in predictions["response_response"].tolist()]
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    peak = _peak_gib()
    del model, predictions
    os.environ.pop("LUDWIG_MT_SPEEDUPS", None)
    name = "ludwig predict" + ("" if speedups else " (raw, LUDWIG_MT_SPEEDUPS=0)")
    return Row(name, 1, len(prompts), tokens, seconds, tokens / seconds, load_seconds, peak, "-"), texts


def measure_ours(model_dir: Path, prompts: list[str], batch_sizes: list[int], *, merge: bool, label: str,
                 ludwig_texts: list[str], static_cache: bool = False) -> list[Row]:
    """``eval.generate`` at each batch size on one loaded model (merged or not); two passes, the second timed
    (the first is reported as ``first_seconds``: with a static cache it includes torch.compile)."""
    from dataclasses import replace

    from eval.generate import decode, generate_ids, load_ludwig_model, new_token_count

    _reset_peak()
    started = time.perf_counter()
    loaded = load_ludwig_model(model_dir, merge=merge)
    load_seconds = time.perf_counter() - started
    if static_cache:  # transformers compiles the decoding step for a static KV cache on CUDA
        generation = {**loaded.settings.generation, "cache_implementation": "static"}
        loaded.settings = replace(loaded.settings, generation=generation)
    generate_ids(loaded, prompts[:2], max_new_tokens=2, batch_size=2, progress=False)  # warm-up (kernels, caches)
    subset = len(ludwig_texts)
    rows = []
    for batch_size in batch_sizes:
        passes = []
        for _ in range(2):
            _sync()
            started = time.perf_counter()
            results = generate_ids(loaded, prompts, batch_size=batch_size, progress=False)
            _sync()
            passes.append(time.perf_counter() - started)
        tokens = new_token_count(results)
        same = sum(decode(loaded, ids) == text for ids, text in zip(results[:subset], ludwig_texts))
        rows.append(Row(label, batch_size, len(prompts), tokens, passes[1], tokens / passes[1], load_seconds,
                        _peak_gib(), f"{same}/{subset}" if subset else "-", first_seconds=passes[0]))
    del loaded
    return rows


# ------------------------------------------------------------------------------------------------ report
def table(rows: list[Row], baseline: float) -> str:
    head = (f"{'method':<52} {'batch':>5} {'prompts':>7} {'tokens':>6} {'seconds':>8} {'tok/s':>9} "
            f"{'x ludwig':>8} {'load s':>7} {'peak GiB':>8} {'= ludwig':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
        lines.append(f"{r.method:<52} {r.batch_size:>5} {r.prompts:>7} {r.new_tokens:>6} {r.seconds:>8.2f} "
                     f"{r.tokens_per_s:>9.1f} {r.tokens_per_s / baseline:>8.1f} {r.load_seconds:>7.1f} {peak:>8} "
                     f"{r.matches_ludwig:>8}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for eval_speed.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few prompts (tests the script)")
    parser.add_argument("--work", type=Path, help="scratch folder for the model and Ludwig run (default: a temp dir)")
    parser.add_argument("--prompts", type=int, help="prompts for eval.generate (default 64; smoke 8)")
    parser.add_argument("--ludwig-prompts", type=int, help="subset for Ludwig's predict (default 8; smoke 4)")
    parser.add_argument("--prompt-tokens", type=int, help="about this many tokens per prompt (default 200; smoke 40)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per prompt (default 48; smoke 8)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 32,64; smoke 4,8)")
    parser.add_argument("--no-raw-ludwig", action="store_true", help="skip the LUDWIG_MT_SPEEDUPS=0 Ludwig run")
    parser.add_argument("--static-cache", action="store_true",
                        help="also measure the merged model with a static KV cache (compiled decoding on CUDA)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tempfile

    import torch

    from ludwig_mt.patches.registry import apply_all

    apply_all()  # what the venv's .pth hook does for `ludwig predict` (same switches); the GPU machine has no hook
    cuda = torch.cuda.is_available() and not args.smoke
    shape_name = "tiny" if args.smoke else "llama3.2-1b"
    shape = SHAPES[shape_name]
    n_prompts = args.prompts or (8 if args.smoke else 64)
    n_ludwig = min(args.ludwig_prompts or (4 if args.smoke else 8), n_prompts)
    prompt_tokens = args.prompt_tokens or (40 if args.smoke else 200)
    new_tokens = args.new_tokens or (8 if args.smoke else 48)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("4,8" if args.smoke else "32,64")).split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="eval_speed_"))
    device = "cuda" if cuda else "cpu"

    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = build_base_model(shape, work / "base", device)
    timings["build_base_model"] = time.perf_counter() - started
    config = ludwig_config(base, cuda=cuda, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
    started = time.perf_counter()
    model_dir = train_with_ludwig(config, 10, prompt_tokens, shape["vocab_size"], work / "ludwig")
    timings["ludwig_train"] = time.perf_counter() - started
    randomize_lora_b(model_dir)
    _reset_peak()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompts = word_rows(n_prompts, prompt_tokens, shape["vocab_size"], seed=3)
    rows: list[Row] = []
    ludwig_row, ludwig_texts = measure_ludwig(model_dir, prompts[:n_ludwig], tokenizer, speedups=True)
    rows.append(ludwig_row)
    if cuda and not args.no_raw_ludwig:
        rows.append(measure_ludwig(model_dir, prompts[:n_ludwig], tokenizer, speedups=False)[0])
    unmerged = "eval.generate 4-bit + LoRA (unmerged)" if cuda else "eval.generate fp32 + LoRA (unmerged)"
    merged = "eval.generate LoRA merged into bf16 (dequantized)" if cuda else "eval.generate fp32 LoRA merged"
    rows += measure_ours(model_dir, prompts, batch_sizes, merge=False, label=unmerged, ludwig_texts=ludwig_texts)
    rows += measure_ours(model_dir, prompts, batch_sizes, merge=True, label=merged, ludwig_texts=ludwig_texts)
    if args.static_cache:
        try:
            rows += measure_ours(model_dir, prompts, batch_sizes, merge=True, label=merged + " static cache",
                                 ludwig_texts=ludwig_texts, static_cache=True)
        except Exception as err:  # an optional experiment must not cost the measured rows above
            print(f"static cache run failed: {type(err).__name__}: {err}", file=sys.stderr)

    expected = {r.method: r.prompts * new_tokens for r in rows}
    short = [r.method for r in rows if r.new_tokens != expected[r.method]]
    baseline = ludwig_row.tokens_per_s
    report = {
        "shape": shape_name, "config": shape, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "prompts": n_prompts, "ludwig_prompts": n_ludwig,
        "prompt_tokens_about": prompt_tokens, "new_tokens": new_tokens, "quantization": QLORA if cuda else None,
        "timings_s": timings, "rows": [asdict(r) for r in rows],
        "speedup_vs_ludwig": {f"{r.method} @ {r.batch_size}": r.tokens_per_s / baseline for r in rows},
        "token_count_mismatch": short,
    }
    (args.out / "eval_speed.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\neval speed: {shape_name} on {report['device']}, {new_tokens} new tokens/prompt, "
          f"prompts ~{prompt_tokens} tokens (Ludwig on the first {n_ludwig})")
    print(table(rows, baseline))
    if short:
        print(f"WARNING: token counts differ from prompts x new_tokens for: {', '.join(short)}")
    print(f"written: {args.out / 'eval_speed.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
