"""Fast, faithful greedy generation for trained Ludwig LLM models and their plain base model.

Ludwig 0.17.10's ``LudwigModel.predict`` generates one prompt at a time (``models/llm.py``, ``LLM.generate``),
about 25 new tokens/s for a 1.2B model on an H100. Here the same model is loaded with transformers + peft and
prompts are generated in batches: sorted by token length (little padding), left-padded with an attention mask,
greedy, stopping at eos. On CUDA the LoRA adapter can be merged into a bf16 copy of the (dequantized) base.

Faithfulness: prompts are turned into input ids exactly as Ludwig does it at predict time, and generated tokens
are decoded exactly as Ludwig fills ``<output>_response`` (tests/eval/test_generate.py checks the texts are
identical to ``ludwig predict``'s on a trained model):

1. the prompt column is cast to ``str`` (and lower-cased if the feature's ``preprocessing.lowercase``);
2. ``tokenizer.encode(text, truncation=True)`` (``utils/tokenizers.py`` ``HFTokenizer``: special tokens as the
   tokenizer adds them, e.g. Llama's BOS; no template, the project's prompts are formatted by prep);
3. the ids are cut to the LAST ``max_sequence_length`` tokens, a leading BOS kept first (the project's fix
   ``cut_prompts_from_the_instruction_side``, :func:`ludwig_mt.tokens.keep_prompt_tail`, in place of raw
   Ludwig's cut to the FIRST tokens in ``utils/strings_utils.py`` ``build_sequence_matrix``, which dropped the
   input and the answer cue), where ``max_sequence_length`` is the one in ``training_set_metadata.json`` (the
   longest training prompt, capped by the configured value), not the configured value;
4. the left padding is removed: everything up to the last pad token, then everything before the first BOS
   (``utils/llm_utils.py`` ``remove_left_padding``);
5. if still longer than ``context_len - max_new_tokens - 8`` the LAST that many tokens are kept (``LLM.generate``;
   a YAML rendered for the base model by ``ludwig_mt.config`` sizes the input so that this never happens);
6. ``model.generate`` with Ludwig's ``generation`` config and ``pad_token_id = tokenizer.pad_token_id``
   (the tokenizer's eos when it has no pad token);
7. the new tokens (including the eos, if any) are decoded with ``skip_special_tokens=True``, no stripping.

One deliberate difference: Ludwig right-pads the new tokens with id 0 up to ``max_new_tokens`` before decoding
(``decoders/utils.py`` ``extract_generated_tokens``). For tokenizers whose id 0 is a special token (Llama 2,
SentencePiece models) that decodes to nothing; for those where id 0 is an ordinary token (Qwen2.5 and Llama 3:
``!``) Ludwig's response after an early eos ends in a run of ``!`` (reproduced with a word-level tokenizer whose
id 0 is an ordinary word: ``ludwig predict`` gave ``"w23 w173 w0 w0 ... w0"`` where the model generated
``w23 w173 </s>``). We decode only what the model generated.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ludwig_mt.errors import WorkflowError
# load_tokenizer is part of this module's interface too: eval loads tokenizers the way Ludwig does (ludwig_mt.tokens)
from ludwig_mt.tokens import FALLBACK_CONTEXT_LEN, config_context_length, keep_prompt_tail, load_tokenizer

logger = logging.getLogger(__name__)

#: Ludwig's schema default for ``generation.max_new_tokens``; an explicit 32 is replaced by a derived value
#: (``schema/model_types/utils.py`` ``_set_generation_max_new_tokens``), so we derive it the same way.
LUDWIG_DEFAULT_MAX_NEW_TOKENS = 32
#: Ludwig's default ``max_sequence_length`` of a text input feature (``schema/features/preprocessing/text.py``).
LUDWIG_DEFAULT_INPUT_MAX_SEQUENCE_LENGTH = 256
#: Ludwig's default ``quantization.bnb_4bit_compute_dtype`` (``schema/llms/quantization.py``).
LUDWIG_DEFAULT_COMPUTE_DTYPE = "float16"
# Bumped when a change to decoding changes what the same model generates; part of every pair's cache key, so an
# older cached generation is never scored as if made by the current rule. 2: also stops at the tokenizer's EOS.
DECODING_RULE = 2
#: Generation settings that would make decoding non-greedy; we force them to greedy (the issue asks for greedy).
_GREEDY = {"do_sample": False, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None}
#: Settings with no effect on greedy decoding with ``max_new_tokens`` set (sampling warpers, ``max_length``);
#: dropped only to keep transformers from warning about them on every batch.
_INERT_WHEN_GREEDY = ("temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "max_length")


@dataclass(frozen=True)
class GenerationSettings:
    """How prompts become input ids and how many tokens are generated (one task's Ludwig settings)."""

    max_input_tokens: int  # prompts are cut to their last this-many tokens (Ludwig's input max_sequence_length)
    max_new_tokens: int
    batch_size: int = 32
    lowercase: bool = False  # the input feature's preprocessing.lowercase
    generation: Mapping[str, Any] = field(default_factory=dict)  # Ludwig's `generation:` section, as given
    quantization: Mapping[str, Any] | None = None  # Ludwig's `quantization:` section (bitsandbytes), if any
    # Wrap each prompt in the tokenizer's chat template (one user turn + the assistant cue) before encoding: how an
    # instruct model is meant to be prompted. Ludwig trains and predicts without it, so off for adapters' parity.
    chat_template: bool = False


@dataclass
class LoadedModel:
    """A model ready for :func:`generate` / ``eval.perplexity``: the torch model, its tokenizer and settings."""

    model: Any
    tokenizer: Any
    settings: GenerationSettings
    name: str
    device: str
    context_len: int = FALLBACK_CONTEXT_LEN
    merged: bool = False  # LoRA merged into (dequantized) bf16 weights
    quantized: bool = False  # runs on bitsandbytes 4/8-bit weights


# ------------------------------------------------------------------------------------------------ settings
def _first_feature(config: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    features = config.get(key) or []
    if not features or not isinstance(features[0], Mapping):
        raise WorkflowError(f"{source}: no {key} in the Ludwig config. Fix: pass an LLM config with a text {key[:-1]}")
    return features[0]


def _derived_max_new_tokens(config: Mapping[str, Any], source: str) -> int:
    """``generation.max_new_tokens`` as Ludwig resolves it (an unset or default 32 is derived from lengths)."""
    requested = (config.get("generation") or {}).get("max_new_tokens", LUDWIG_DEFAULT_MAX_NEW_TOKENS)
    if requested is not None and requested != LUDWIG_DEFAULT_MAX_NEW_TOKENS:
        return int(requested)
    output = _first_feature(config, "output_features", source)
    output_length = (output.get("preprocessing") or {}).get("max_sequence_length")
    global_length = (config.get("preprocessing") or {}).get("global_max_sequence_length")
    for length in (output_length, global_length):
        if length is not None:
            return max(LUDWIG_DEFAULT_MAX_NEW_TOKENS, int(length))
    raise WorkflowError(f"{source}: cannot tell how many tokens to generate (no generation.max_new_tokens, no "
                        "output max_sequence_length). Fix: set generation.max_new_tokens in the config")


def settings_from_config(config: Mapping[str, Any], *, source: str = "config") -> GenerationSettings:
    """Settings from a Ludwig config dict (a task YAML): input length cap, new tokens, generation, quantization."""
    prompt = _first_feature(config, "input_features", source)
    preprocessing = prompt.get("preprocessing") or {}
    max_input = preprocessing.get("max_sequence_length", LUDWIG_DEFAULT_INPUT_MAX_SEQUENCE_LENGTH)
    return GenerationSettings(
        max_input_tokens=int(max_input) if max_input is not None else sys.maxsize,
        max_new_tokens=_derived_max_new_tokens(config, source),
        lowercase=bool(preprocessing.get("lowercase", False)),
        generation=dict(config.get("generation") or {}),
        quantization=dict(config["quantization"]) if config.get("quantization") else None,
    )


HYPERPARAMETERS = "model_hyperparameters.json"  # Ludwig's saved config inside a trained model folder
WEIGHTS_DIR = "model_weights"  # Ludwig's adapter weights (PEFT format) inside a trained model folder


def saved_config(model_dir: Path) -> dict[str, Any]:
    """The config Ludwig saved with a trained model (one-line error when the folder is not a trained model)."""
    return _read_json(model_dir / HYPERPARAMETERS, HYPERPARAMETERS)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{path}: not found, so {path.parent} is not a trained Ludwig model. "
                            f"Fix: pass <output_directory>/<experiment>_run/model (it holds {what})") from None
    except json.JSONDecodeError as err:
        raise WorkflowError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}). Fix: retrain or restore "
                            "the file") from None


def settings_from_model_dir(model_dir: Path) -> GenerationSettings:
    """Settings a trained model predicts with: its saved config plus the training-set metadata's input length."""
    hyper = saved_config(model_dir)
    metadata = _read_json(model_dir / "training_set_metadata.json", "training_set_metadata.json")
    _check_supported(hyper, model_dir)
    settings = settings_from_config(hyper, source=str(model_dir / HYPERPARAMETERS))
    prompt_name = _first_feature(hyper, "input_features", str(model_dir))["name"]
    learned = (metadata.get(prompt_name) or {}).get("max_sequence_length")
    if learned is None:
        raise WorkflowError(f"{model_dir / 'training_set_metadata.json'}: no max_sequence_length for input "
                            f"'{prompt_name}'. Fix: retrain the model with this Ludwig version")
    return replace(settings, max_input_tokens=int(learned))


def _check_supported(hyper: Mapping[str, Any], model_dir: Path) -> None:
    """Refuse the Ludwig features we do not reproduce, rather than generate from different inputs silently."""
    if hyper.get("model_type") not in (None, "llm"):
        raise WorkflowError(f"{model_dir}: model_type {hyper.get('model_type')!r} is not an LLM. Fix: pass an "
                            "LLM model directory")
    if (hyper.get("prompt") or {}).get("template"):
        raise WorkflowError(f"{model_dir}: prompt.template is set; eval expects prompts formatted by prep. "
                            "Fix: train with prompts formatted by ./run.sh prep and no prompt.template")
    if (hyper.get("quantization") or {}).get("backend", "bitsandbytes") != "bitsandbytes":
        raise WorkflowError(f"{model_dir}: quantization backend {hyper['quantization']['backend']!r}; only "
                            "bitsandbytes is supported. Fix: train with quantization.backend: bitsandbytes")
    if hyper.get("adapters"):
        raise WorkflowError(f"{model_dir}: several named adapters (adapters:) are not supported. "
                            "Fix: train one adapter (adapter:) per model")
    for feature in hyper.get("input_features", [])[:1]:
        tokenizer = (feature.get("preprocessing") or {}).get("tokenizer", "hf_tokenizer")
        if tokenizer != "hf_tokenizer":
            raise WorkflowError(f"{model_dir}: input tokenizer {tokenizer!r}; only hf_tokenizer is supported")


# ------------------------------------------------------------------------------------------------ loading
def resolve_device(device: str | None) -> str:
    """``cuda`` when available and not told otherwise, else ``cpu``."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise WorkflowError(f"device {device!r} requested but no CUDA GPU is visible. Fix: use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bitsandbytes_config(quantization: Mapping[str, Any]):
    """Ludwig's ``QuantizationConfig.to_bitsandbytes`` for a ``quantization:`` section (same defaults)."""
    from transformers import BitsAndBytesConfig

    bits = int(quantization.get("bits", 4))
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        llm_int8_threshold=float(quantization.get("llm_int8_threshold", 6.0)),
        llm_int8_has_fp16_weight=bool(quantization.get("llm_int8_has_fp16_weight", False)),
        bnb_4bit_compute_dtype=quantization.get("bnb_4bit_compute_dtype", LUDWIG_DEFAULT_COMPUTE_DTYPE),
        bnb_4bit_use_double_quant=bool(quantization.get("bnb_4bit_use_double_quant", True)),
        bnb_4bit_quant_type=quantization.get("bnb_4bit_quant_type", "nf4"),
    )


def load_causal_lm(path: str, *, device: str, quantization: Mapping[str, Any] | None = None):
    """A causal LM in eval mode: bitsandbytes-quantized if asked, else bf16 on CUDA, float32 on CPU.

    float32 on CPU is what Ludwig loads unquantized models in; bf16 on CUDA matches the project's ``bf16_weights``
    speed-up and the QLoRA compute dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization:
        kwargs["quantization_config"] = _bitsandbytes_config(quantization)
        kwargs["dtype"] = getattr(torch, quantization.get("bnb_4bit_compute_dtype", LUDWIG_DEFAULT_COMPUTE_DTYPE))
        kwargs["device_map"] = {"": torch.device(device).index or 0} if device.startswith("cuda") else {"": device}
    else:
        kwargs["dtype"] = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise WorkflowError(f"{path}: could not load the model ({str(err).splitlines()[0]}). Fix: pass a folder "
                            "saved with save_pretrained (config.json + weights) or a cached hub name") from None
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def dequantize_to_bf16(model):
    """The bitsandbytes-quantized ``model`` with its quantized linear layers replaced by bf16 ``nn.Linear`` layers
    holding the same dequantized weights: the function the 4-bit model computes, at bf16 matmul speed. Done before
    merging LoRA, so the merged model is the adapter on the 4-bit base it was trained on, not on the original base.

    transformers' ``dequantize`` (meant for merging QLoRA adapters) also drops the quantization state. Call it
    right after loading: bitsandbytes' CPU backend repacks 4-bit weights on the first forward pass, after which
    dequantization reads them wrongly (seen on CPU with bitsandbytes 0.50.2).
    """
    import torch

    try:
        model = model.dequantize(dtype=torch.bfloat16)
    except TypeError:  # transformers versions whose dequantize() takes no dtype
        model = model.dequantize()
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        model = model.to(torch.bfloat16)
    return model.eval()


def context_length(model) -> int:
    """The model's context window as Ludwig reads it (``utils/llm_utils.py`` ``get_context_len``)."""
    return config_context_length(model.config)


def _wants_fast_path(choice: bool | None, device: str) -> bool:
    """Merge / dequantize: explicit choice, else on CUDA only (bf16 matmuls beat bitsandbytes and LoRA side
    paths there, see bench/eval_speed.py); on CPU we keep Ludwig's unmerged float32 numerics."""
    return device.startswith("cuda") if choice is None else choice


def load_ludwig_model(model_dir: str | Path, *, base_model: str | None = None, device: str | None = None,
                      merge: bool | None = None, batch_size: int | None = None) -> LoadedModel:
    """A trained Ludwig LLM model directory (``<run>/model``) loaded with transformers + peft.

    ``base_model`` replaces the saved ``base_model`` (e.g. a hub name -> a local folder). ``merge=None`` merges
    the LoRA weights into a bf16 copy of the base on CUDA (dequantizing a 4-bit base first) and not on CPU.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WorkflowError(f"{model_dir}: no such model directory. Fix: pass <output_directory>/<run>/model")
    settings = settings_from_model_dir(model_dir)
    if batch_size:
        settings = replace(settings, batch_size=batch_size)
    hyper = saved_config(model_dir)
    base = str(base_model or hyper.get("base_model") or "")
    if not base:
        raise WorkflowError(f"{model_dir}: the saved config names no base_model. Fix: pass base_model=")
    device = resolve_device(device)
    weights = model_dir / WEIGHTS_DIR
    has_adapter = (weights / "adapter_config.json").exists()
    if not has_adapter and not (weights / "config.json").exists():
        raise WorkflowError(f"{weights}: neither a LoRA adapter (adapter_config.json) nor full weights "
                            "(config.json). Fix: pass a model directory written by ludwig train")
    quantization = settings.quantization if device.startswith("cuda") else None
    if settings.quantization and not device.startswith("cuda"):
        logger.warning("%s: trained with %s-bit quantization; loading unquantized float32 on CPU", model_dir,
                       settings.quantization.get("bits", 4))
    fast = _wants_fast_path(merge, device)
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base if has_adapter else str(weights), device=device, quantization=quantization)
    if quantization and fast:
        model = dequantize_to_bf16(model)
    if has_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(weights), is_trainable=False)
        if fast:
            model = model.merge_and_unload()
        model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, settings=settings, name=model_dir.parent.name,
                       device=device, context_len=context_length(model), merged=fast and has_adapter,
                       quantized=bool(quantization) and not fast)


def load_base_model(base_model: str, settings: GenerationSettings, *, device: str | None = None,
                    quantize_4bit: bool | None = None, dequantize: bool | None = None) -> LoadedModel:
    """The plain base model (no adapter) under a task's settings (e.g. :func:`settings_from_config` of its YAML).

    ``quantize_4bit=None`` follows ``settings.quantization`` on CUDA, so the base is scored on the same 4-bit
    weights its QLoRA adapters were trained on; ``dequantize=None`` then runs those weights as bf16 on CUDA.
    """
    device = resolve_device(device)
    use_quant = bool(settings.quantization) if quantize_4bit is None else quantize_4bit
    if use_quant and not device.startswith("cuda"):
        if quantize_4bit:
            raise WorkflowError("4-bit quantization needs a CUDA GPU. Fix: pass quantize_4bit=False on CPU")
        use_quant = False
    quantization = (settings.quantization or {"bits": 4, "bnb_4bit_compute_dtype": "bfloat16",
                                              "bnb_4bit_quant_type": "nf4"}) if use_quant else None
    tokenizer = load_tokenizer(base_model)
    model = load_causal_lm(base_model, device=device, quantization=quantization)
    fast = bool(quantization) and _wants_fast_path(dequantize, device)
    if fast:
        model = dequantize_to_bf16(model)
    return LoadedModel(model=model, tokenizer=tokenizer, settings=settings, name=Path(base_model).name or base_model,
                       device=device, context_len=context_length(model), quantized=bool(quantization) and not fast)


# ------------------------------------------------------------------------------------------------ inputs
def prompt_ids(tokenizer, prompt: str, settings: GenerationSettings, *, context_len: int,
               max_new_tokens: int) -> list[int]:
    """The input ids Ludwig's predict feeds ``model.generate`` for one prompt (steps 1-5 of the module doc)."""
    text = str(prompt)
    text = text.lower() if settings.lowercase else text
    if settings.chat_template:
        text = with_chat_template(tokenizer, text)
    ids = list(tokenizer.encode(text, truncation=True))
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    ids = keep_prompt_tail(ids, settings.max_input_tokens, bos)
    # Ludwig's predict drops everything up to the last pad token (its left padding), and eval copies that for
    # parity; a chat template is eval's own mode, where the pad token can be real text (SmolLM2: pad = <|im_end|>
    # ends the user's turn): cutting there would score the model on its assistant cue without the message
    if pad is not None and pad in ids and not settings.chat_template:
        ids = ids[len(ids) - ids[::-1].index(pad):]
    if bos is not None and bos in ids:
        ids = ids[ids.index(bos):]
    max_input_length = context_len - max_new_tokens - 8
    if len(ids) > max_input_length:
        ids = ids[-max_input_length:] if max_input_length > 0 else []
    return ids


def with_chat_template(tokenizer, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, ending with the assistant's cue; a one-line
    error for a tokenizer without a template (a base, not an instruct, model)."""
    if not getattr(tokenizer, "chat_template", None):
        raise WorkflowError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template. Fix: score "
                            "with --chat-template off (a base model is prompted with plain text)")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: str):
    """Input ids and attention mask for a batch, padded on the left (generation continues at the right): the same
    padding and mask as Ludwig's training rows get (``ludwig_mt.patches.fixes.left_pad_rows``)."""
    import torch

    from ludwig_mt.patches.fixes import left_pad_rows

    ids, mask = left_pad_rows([torch.tensor(list(row), dtype=torch.long) for row in rows], pad_id)
    return ids.to(device), mask.to(device)


def generation_config(loaded: LoadedModel, max_new_tokens: int):
    """Ludwig's ``generation`` section as an HF ``GenerationConfig``, forced greedy, with Ludwig's pad token."""
    from transformers import GenerationConfig

    requested = dict(loaded.settings.generation)
    if requested.get("do_sample") or (requested.get("num_beams") or 1) > 1:
        logger.warning("%s: the config asks for sampling/beam search; eval decodes greedily", loaded.name)
    kept = {k: v for k, v in requested.items() if k not in _INERT_WHEN_GREEDY}
    if (kept.get("min_new_tokens") or 0) > max_new_tokens:  # a smaller max_new_tokens override wins
        kept["min_new_tokens"] = max_new_tokens
    config = GenerationConfig(**{**kept, **_GREEDY, "max_new_tokens": max_new_tokens})
    config.pad_token_id = loaded.tokenizer.pad_token_id
    return config


def eos_ids(loaded: LoadedModel, config) -> set[int]:
    """The eos ids ``generate`` stops at: the generation config's (else the model's generation config's), and the
    tokenizer's EOS, which Ludwig appends to every training row and ``ludwig predict`` stops at. They differ when a
    folder's tokenizer and config disagree (SmolLM2 converted by transformers 5.17: tokenizer EOS id 1, config
    id 2); stopping at the config's only, eval ran on past every adapter's answer (0 of 32 rows equal to
    ``ludwig predict`` on the H200; with both, 15 of 16 unmerged and 16 of 16 merged)."""
    eos = config.eos_token_id
    if eos is None:
        model_config = getattr(loaded.model, "generation_config", None)
        eos = getattr(model_config, "eos_token_id", None)
    stop = set() if eos is None else {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}
    trained = getattr(loaded.tokenizer, "eos_token_id", None)  # what Ludwig appends to every training row
    return stop | ({int(trained)} if trained is not None else set())


def _until_eos(tokens: Sequence[int], stop: set[int]) -> list[int]:
    """New tokens up to and including the first eos (what single-prompt generation returns)."""
    out: list[int] = []
    for token in tokens:
        out.append(int(token))
        if token in stop:
            break
    return out


def _length_order(rows: Sequence[Sequence[int]]) -> list[int]:
    """Indices longest first: batches of similar lengths pad little, and an out-of-memory shows up at once."""
    return sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


# ------------------------------------------------------------------------------------------------ generation
def generate_ids(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                 batch_size: int | None = None, progress: bool = True) -> list[list[int]]:
    """New token ids for each prompt (input order), greedy and batched; each ends at its first eos, if any."""
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    new_tokens = int(max_new_tokens or loaded.settings.max_new_tokens)
    size = max(1, int(batch_size or loaded.settings.batch_size))
    rows = [prompt_ids(loaded.tokenizer, p, loaded.settings, context_len=loaded.context_len,
                       max_new_tokens=new_tokens) for p in prompts]
    config = generation_config(loaded, new_tokens)
    stop = eos_ids(loaded, config)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else next(iter(stop), 0)
    device = str(next(loaded.model.parameters()).device)
    results: list[list[int]] = [[] for _ in prompts]
    order = [i for i in _length_order(rows) if rows[i]]  # an empty prompt generates nothing (Ludwig crashes)
    with tqdm(total=len(prompts), desc=f"generate {loaded.name}", unit="prompt", file=sys.stderr,
              disable=not progress, leave=False) as bar, torch.inference_mode():
        bar.update(len(prompts) - len(order))
        for batch in _chunks(order, size):
            input_ids, mask = _left_pad([rows[i] for i in batch], pad, device)
            output = loaded.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for row, i in zip(output[:, input_ids.shape[1]:].tolist(), batch):
                results[i] = _until_eos(row, stop)
            bar.update(len(batch))
    return results


def decode(loaded: LoadedModel, tokens: Sequence[int]) -> str:
    """Generated ids -> text as Ludwig's ``<output>_response``: ``skip_special_tokens=True``, no stripping."""
    return loaded.tokenizer.decode(list(tokens), skip_special_tokens=True)


def generate(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int | None = None,
             batch_size: int | None = None, progress: bool = True) -> list[str]:
    """Greedy responses for ``prompts`` (input order), as Ludwig's predict would write them, only faster."""
    return [decode(loaded, tokens) for tokens in generate_ids(loaded, prompts, max_new_tokens=max_new_tokens,
                                                               batch_size=batch_size, progress=progress)]


def new_token_count(results: Sequence[Sequence[int]]) -> int:
    """Total generated tokens (what tokens/s figures count)."""
    return sum(len(r) for r in results)
