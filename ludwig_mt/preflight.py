"""Checks of a training run's inputs before Ludwig starts: each failure is one line naming the input and the fix.

Ludwig finds most of these problems itself, but late (after ~15 s of imports, model loading and preprocessing,
with a half-made ``experiment_run/`` left behind) and in a library's words (a tokenizer's ``OSError``, a pandas
``KeyError`` on line 34 of the log). Everything here reads only the files named (and ``config.json`` of the base
model), so the checks take well under a second; the device check imports torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ludwig_mt.errors import WorkflowError

#: files of which at least one holds a model's weights (``save_pretrained``: safetensors or PyTorch, maybe sharded)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
#: files of which at least one holds a tokenizer's vocabulary (fast, sentencepiece, BPE or WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
#: ``config.json`` fields that give a model's context length, in the order transformers' configs use them
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: Ludwig's default split when the YAML gives none: random 70 / 10 / 20 (``preprocessing.split``)
DEFAULT_TRAIN_SHARE = 0.7


def looks_like_path(name: str) -> bool:
    """A local folder rather than a Hub id: absolute, relative with ``./``/``../``/``~``, or more than one ``/``."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists()


def check_base_model_folder(folder: Path, source: str) -> int | None:
    """Refuse a base-model folder without ``config.json``, weights or tokenizer files; return its context length
    (None when ``config.json`` gives none). ``source`` says where the name came from (``--base-model``, the YAML)."""
    if not folder.is_dir():
        raise WorkflowError(f"{folder}: base model folder not found ({source}). Fix: pass an existing folder, e.g. "
                            "./run.sh model smollm2-135m --out models/, or a Hugging Face id")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WorkflowError(f"{folder}: no config.json, not a saved transformers model ({source}). Fix: pass the "
                            "folder save_pretrained wrote")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise WorkflowError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin) ({source}). Fix: copy the "
                            "model's weight files there")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise WorkflowError(f"{folder}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}) ({source}). Fix: save the "
                            "tokenizer there too (tokenizer.save_pretrained(folder))")
    try:
        model_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkflowError(f"{config_file}: not valid JSON ({err}). Fix: restore the file") from None
    return context_length(model_config)


def context_length(model_config: Mapping[str, Any]) -> int | None:
    """The context length a transformers ``config.json`` declares (None if it declares none). Pure."""
    for field in CONTEXT_FIELDS:
        value = model_config.get(field)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_lengths(config: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """The YAML's prompt and response ``max_sequence_length`` and ``global_max_sequence_length``. Pure."""
    def first(key: str) -> int | None:
        features = config.get(key) or []
        feature = features[0] if features and isinstance(features[0], Mapping) else {}
        return (feature.get("preprocessing") or {}).get("max_sequence_length")

    return first("input_features"), first("output_features"), \
        (config.get("preprocessing") or {}).get("global_max_sequence_length")


def check_context(config: Mapping[str, Any], context: int | None, model: str, source: str) -> None:
    """Refuse sequence lengths the model's context cannot hold: a training row (prompt + response, capped at
    ``global_max_sequence_length``) longer than the context indexes positions the model never had."""
    prompt, response, global_max = config_lengths(config)
    if context is None or prompt is None or response is None:
        return
    row = prompt + response if global_max is None else min(prompt + response, global_max)
    if row > context:
        raise WorkflowError(
            f"{source}: input max_sequence_length {prompt} + output {response} (global {global_max}) = {row} tokens "
            f"per row, more than {model}'s context of {context} (config.json). Fix: lower them in the YAML, or pass "
            "--base-model with --dataset so ./run.sh train measures them with that model's tokenizer")


@dataclass(frozen=True)
class DatasetCheck:
    """What the dataset check found: its rows and the rows Ludwig will train on."""

    rows: int
    train_rows: int


def feature_columns(config: Mapping[str, Any]) -> list[str]:
    """Every column the YAML's input and output features read (``column``, else ``name``). Pure."""
    out = []
    for key in ("input_features", "output_features"):
        for feature in config.get(key) or []:
            if isinstance(feature, Mapping) and (feature.get("column") or feature.get("name")):
                out.append(str(feature.get("column") or feature["name"]))
    return out


def train_rows(frame: Any, config: Mapping[str, Any]) -> int:
    """The rows Ludwig trains on: split 0 of a ``fixed`` split column, else its default random 70 %."""
    split = (config.get("preprocessing") or {}).get("split") or {}
    if split.get("type") == "fixed":
        column = split.get("column", "split")
        return int((frame[column].astype(str).str.strip() == "0").sum())
    probabilities = split.get("probabilities") or [DEFAULT_TRAIN_SHARE]
    return int(len(frame) * float(probabilities[0]))


def check_dataset(path: Path, config: Mapping[str, Any], batch_size: int | None) -> DatasetCheck:
    """Refuse a dataset that is missing, empty, header-only, without the columns the YAML's features (and its fixed
    split) name, or with fewer training rows than one batch."""
    import pandas as pd

    if not path.is_file():
        raise WorkflowError(f"{path}: dataset not found. Fix: run ./run.sh prep first or pass --dataset")
    if path.suffix.lower() not in (".csv", ".tsv"):
        return DatasetCheck(rows=-1, train_rows=-1)  # other formats Ludwig reads: left to Ludwig
    try:
        frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                            keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise WorkflowError(f"{path}: empty file. Fix: run ./run.sh prep again or pass another --dataset") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise WorkflowError(f"{path}: unreadable CSV ({str(err).splitlines()[0]}). Fix: re-run ./run.sh prep") from None
    needed = feature_columns(config)
    split = (config.get("preprocessing") or {}).get("split") or {}
    if split.get("type") == "fixed":
        needed.append(str(split.get("column", "split")))
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise WorkflowError(f"{path}: no column {', '.join(missing)} (the YAML's features/split read it; columns: "
                            f"{', '.join(map(str, frame.columns))}). Fix: pass a CSV prepared by ./run.sh prep, or "
                            "name the columns in the YAML")
    if frame.empty:
        raise WorkflowError(f"{path}: no rows, only a header. Fix: run ./run.sh prep again or pass another --dataset")
    rows = train_rows(frame, config)
    if isinstance(batch_size, int) and rows < max(batch_size, 2):
        raise WorkflowError(f"{path}: {rows} training row(s), fewer than one batch of {batch_size} (trainer."
                            "batch_size). Fix: more rows, or a smaller --batch-size")
    return DatasetCheck(rows=len(frame), train_rows=rows)


def check_devices(config: Mapping[str, Any], *, gpus: int | None, cpu: bool, cuda_devices: int, source: str) -> None:
    """Refuse a run the machine has no GPU for: a 4-bit (bitsandbytes) YAML, or ``--gpus N`` beyond the GPUs
    visible. ``--cpu`` runs (quantization removed, processes on CPU) need none. Pure given ``cuda_devices``."""
    if cpu:
        return
    quantization = config.get("quantization")
    if quantization and cuda_devices == 0:
        bits = quantization.get("bits", 4) if isinstance(quantization, Mapping) else 4
        raise WorkflowError(f"{source}: {bits}-bit quantization needs a CUDA GPU and none is visible. Fix: add --cpu "
                            "(a copy without quantization is rendered and trained)")
    if gpus is not None and gpus > cuda_devices:
        seen = f"only {cuda_devices} visible" if cuda_devices else "none visible"
        raise WorkflowError(f"--gpus {gpus}: {seen} (CUDA_VISIBLE_DEVICES / nvidia-smi). Fix: --gpus {cuda_devices} "
                            "or fewer" + (", or add --cpu to run the processes on the CPU" if not cuda_devices else ""))


def cuda_device_count() -> int:
    """GPUs torch sees (imports torch: ~2 s)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cached_hub_config(name: str) -> str | None:
    """The path of ``name``'s ``config.json`` in the Hugging Face cache (what an offline run needs), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return found if isinstance(found, str) else None


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` in the Hub's characters."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def check_base_model(name: str, source: str, *, offline: bool) -> int | None:
    """Refuse a base model Ludwig cannot load; its context length when known. A local folder must hold a saved
    model (:func:`check_base_model_folder`); a Hub id must be in the local cache when the Hub is off
    (``HF_HUB_OFFLINE=1``); online, a Hub id is left to the Hub."""
    if looks_like_path(name) or not is_hub_id(name):
        return check_base_model_folder(Path(name).expanduser(), source)
    if not offline:
        return None
    cached = cached_hub_config(name)
    if cached is None:
        raise WorkflowError(f"{name}: no such folder, and not in the local Hugging Face cache while HF_HUB_OFFLINE=1 "
                            f"({source}). Fix: --base-model <a model folder> (e.g. ./run.sh model smollm2-135m --out "
                            "models/), or unset HF_HUB_OFFLINE to download it")
    return context_length(json.loads(Path(cached).read_text(encoding="utf-8")))
