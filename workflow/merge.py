"""``./run.sh merge``: merge LoRA adapters trained on the same base into one, written as a Ludwig model folder.

  ./run.sh merge --model sql=results/sql/experiment_run/model --model detox=results/detox/experiment_run/model \\
      --method ties --density 0.5 --out results/merged-ties/model

The adapters are combined with PEFT's ``add_weighted_adapter`` (methods below). The result is a folder exactly like
the one ``ludwig train`` writes (``model_hyperparameters.json``, ``training_set_metadata.json``, ``model_weights/``
with one PEFT adapter), so plain ``ludwig predict --model_path OUT`` loads it, and ``./run.sh eval --model
merged=OUT`` scores it as owning the union of the inputs' tasks, read from the ``merge.json`` written beside it
(method, weights, density, seed, each input's folder and tasks, and a grid search's results).

Methods: ``cat`` stacks the factors (rank = the sum of the ranks): the merged update is exactly
``sum_i w_i * s_i * B_i A_i``. ``svd`` sums the full updates ``w_i * s_i * B_i A_i`` and factors the sum by SVD at
rank = the sum of the ranks (exact); ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
prune/elect on the full updates, then cut to that rank. ``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
``magnitude_prune`` combine the A factors and the B factors separately (each scaled by ``sqrt(w_i * s_i)``), so
the merged update ``(sum B)(sum A)`` holds cross terms ``B_i A_j``: an approximation, and all ranks must be equal.
``dare_*`` drop entries at random: ``--seed`` makes them reproducible.

Grid search: ``--grid weights=1,1:0.5,1 --grid density=0.3,0.5 --prepared DIR --tasks sql,detox`` merges every
combination, scores each on the prepared *validation* rows (never the test split) with ``eval --split
validation`` and writes the best at ``--out``; every candidate's scores are recorded in its ``merge.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.generate import HYPERPARAMETERS, WEIGHTS_DIR
from eval.runner import MERGE_RECORD, known_own_tasks, parse_assignment, require_model_dir
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_json
from prep.common import PrepError

logger = logging.getLogger(__name__)

METADATA = "training_set_metadata.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_ADAPTER = "default"  # PEFT saves the adapter called "default" at the folder's top, where Ludwig looks
RECORD_FORMAT = 1

#: Methods that combine the A and B factors separately: PEFT needs one rank for all of them.
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Methods that combine the full updates B_i A_i, then factor the result by SVD.
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
#: Methods that prune: they take a density (the fraction of entries kept).
DENSITY_METHODS = tuple(m for m in METHODS if m.startswith(("ties", "dare", "magnitude")))
#: Methods that drop entries at random (DARE): the seed decides which.
RANDOM_METHODS = tuple(m for m in METHODS if m.startswith("dare"))
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class AdapterInput:
    """One trained Ludwig model folder to merge: its Ludwig config, its PEFT adapter config and its tasks."""

    name: str
    path: Path
    config: dict[str, Any]
    adapter: dict[str, Any]
    tasks: tuple[str, ...]

    @property
    def rank(self) -> int:
        """The largest rank any layer of the adapter uses (PEFT allocates the merged tensors with it)."""
        return max([int(self.adapter["r"]), *map(int, (self.adapter.get("rank_pattern") or {}).values())])


# ---------------------------------------------------------------------------------------------- checks
def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{path}: not found. Fix: {fix}") from None
    except json.JSONDecodeError as err:
        raise WorkflowError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}). Fix: {fix}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: not a JSON object. Fix: {fix}")
    return data


def read_input(name: str, path: Path) -> AdapterInput:
    """A trained Ludwig model folder with a LoRA adapter, or a one-line error naming the folder and the fix."""
    from prep.registry import TASKS

    require_model_dir(name, path)
    retrain = "pass a folder written by ludwig train with a LoRA adapter"
    config = _read_json(path / HYPERPARAMETERS, retrain)
    adapter_path = path / WEIGHTS_DIR / ADAPTER_CONFIG
    if not adapter_path.is_file():
        raise WorkflowError(f"--model {name}={path}: no {WEIGHTS_DIR}/{ADAPTER_CONFIG}, so no LoRA adapter to merge "
                            "(trained without one, or merged into the base by merge_adapter_into_base_model). "
                            "Fix: train with adapter: {type: lora} and merge_adapter_into_base_model: false")
    adapter = _read_json(adapter_path, retrain)
    if adapter.get("peft_type") != "LORA" or adapter.get("use_dora"):
        kind = "DoRA" if adapter.get("use_dora") else adapter.get("peft_type")
        raise WorkflowError(f"--model {name}={path}: a {kind} adapter; only plain LoRA adapters can be merged. "
                            "Fix: train with adapter: {type: lora, use_dora: false}")
    tasks = known_own_tasks(name, path, list(TASKS), {})
    if not tasks:
        raise WorkflowError(f"--model {name}={path}: cannot tell which tasks it was trained on (not a task name, "
                            f"no merge.json, no training data with a 'task' column). Fix: name it after its task, "
                            f"e.g. --model sql={path}")
    return AdapterInput(name, path, config, adapter, tasks)


def _base_of(item: AdapterInput) -> str:
    """The base model an adapter was trained on: a local folder resolved (so two spellings compare equal)."""
    base = str(item.config.get("base_model") or item.adapter.get("base_model_name_or_path") or "")
    return str(Path(base).resolve()) if base and Path(base).is_dir() else base


def _merges_into_4bit_base(config: Mapping[str, Any]) -> bool:
    quantization = config.get("quantization") or {}
    postprocessor = (config.get("adapter") or {}).get("postprocessor") or {}
    return bool(postprocessor.get("merge_adapter_into_base_model")) and quantization.get("bits") in (4, "4")


def check_inputs(inputs: Sequence[AdapterInput], method: str) -> None:
    """Adapters that can be merged with ``method``: same base, same target modules, equal ranks where the
    method combines the factors, and none that Ludwig would merge into 4-bit base weights when loading."""
    first = inputs[0]
    for item in inputs[1:]:
        if _base_of(item) != _base_of(first):
            raise WorkflowError(f"--model {item.name}: trained on base {_base_of(item)!r}, --model {first.name} on "
                                f"{_base_of(first)!r}; adapters of different bases cannot be merged. Fix: merge "
                                "adapters trained on the same base_model")
        mine = sorted(item.adapter.get("target_modules") or [])
        theirs = sorted(first.adapter.get("target_modules") or [])
        if mine != theirs:
            raise WorkflowError(f"--model {item.name}: target modules {','.join(mine)} differ from --model "
                                f"{first.name}'s {','.join(theirs)}. Fix: merge adapters trained with the same "
                                "adapter.target_modules")
        if method in FACTOR_METHODS and item.rank != first.rank:
            raise WorkflowError(f"--model {item.name}: rank {item.rank}, --model {first.name}: rank {first.rank}; "
                                f"--method {method} combines the A and B factors, so the ranks must be equal. "
                                "Fix: use --method cat or svd, or retrain with the same adapter.r")
    for item in inputs:
        if _merges_into_4bit_base(item.config):
            raise WorkflowError(f"--model {item.name}: its config merges the adapter into the 4-bit base weights "
                                "(adapter.postprocessor.merge_adapter_into_base_model with quantization.bits 4), "
                                "which rounds the merged update away. Fix: set merge_adapter_into_base_model: false "
                                f"in {item.path / HYPERPARAMETERS}")


def check_options(method: str, count: int, weights: Sequence[float] | None,
                  density: float | None) -> tuple[list[float], float | None]:
    """The weights (default 1 each) and the density (default 0.5 where the method prunes), or a one-line error."""
    if method not in METHODS:
        raise WorkflowError(f"--method {method}: unknown. Fix: use one of: {', '.join(METHODS)}")
    if count < 2:
        raise WorkflowError(f"{count} --model given: a merge needs at least 2. "
                            "Fix: pass --model NAME=DIR twice or more")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise WorkflowError(f"--weights {','.join(map(str, weights))}: {len(weights)} weights for {count} models. "
                            "Fix: one weight per --model, in the same order")
    if not all(math.isfinite(w) for w in weights):
        raise WorkflowError(f"--weights {','.join(map(str, weights))}: not finite. Fix: pass numbers like 1,0.5")
    if density is not None and method not in DENSITY_METHODS:
        raise WorkflowError(f"--density {density}: --method {method} does not prune. Fix: drop --density, or use "
                            f"one of: {', '.join(DENSITY_METHODS)}")
    if density is None and method in DENSITY_METHODS:
        density = DEFAULT_DENSITY
    if density is not None and not 0.0 < density <= 1.0:
        raise WorkflowError(f"--density {density}: must be in (0, 1], the fraction of entries kept. Fix: e.g. 0.5")
    return weights, density


# ---------------------------------------------------------------------------------------------- the folder
def _get(data: Mapping[str, Any], path: Sequence[Any]) -> Any:
    for key in path:
        if isinstance(data, Mapping):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        else:
            return None
    return data


def _set(data: Any, path: Sequence[Any], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def widest(documents: Sequence[dict[str, Any]], paths: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A copy of the first document with each length at ``paths`` set to the largest among the documents: the
    merged model must take the longest prompt and write the longest answer any of its tasks was trained with."""
    out = json.loads(json.dumps(documents[0]))
    for path in paths:
        values = [v for doc in documents if isinstance(v := _get(doc, path), (int, float))]
        if values and _get(out, path) is not None:
            _set(out, path, max(values))
    return out


def _length_paths(config: Mapping[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Where the sequence lengths live in Ludwig's saved config and in its training-set metadata."""
    config_paths: list[list[Any]] = [["generation", "max_new_tokens"], ["preprocessing", "global_max_sequence_length"]]
    metadata_paths: list[list[Any]] = []
    for kind in ("input_features", "output_features"):
        for i, feature in enumerate(config.get(kind) or []):
            config_paths += [[kind, i, "preprocessing", "max_sequence_length"],
                             [kind, i, "encoder", "max_sequence_length"]]
            metadata_paths += [[feature["name"], "max_sequence_length"],
                               [feature["name"], "max_sequence_length_99ptile"],
                               [feature["name"], "preprocessing", "max_sequence_length"]]
    return config_paths, metadata_paths


def merged_config(inputs: Sequence[AdapterInput], rank: int) -> dict[str, Any]:
    """Ludwig's config for the merged folder: the first input's, with the widest lengths and the merged adapter's
    rank (PEFT saves the merge with alpha = r, so scaling 1, and no rsLoRA: the inputs' scalings are folded in)."""
    config_paths, _ = _length_paths(inputs[0].config)
    config = widest([item.config for item in inputs], config_paths)
    adapter = config.setdefault("adapter", {})
    adapter.update(r=rank, alpha=rank, use_rslora=False, rank_pattern=None, alpha_pattern=None)
    postprocessor = adapter.get("postprocessor")
    if isinstance(postprocessor, dict):
        postprocessor["merge_adapter_into_base_model"] = False
    return config


def merged_metadata(inputs: Sequence[AdapterInput]) -> dict[str, Any]:
    """The first input's training-set metadata with the widest prompt and response lengths of all inputs."""
    _, metadata_paths = _length_paths(inputs[0].config)
    return widest([_read_json(item.path / METADATA, "pass a complete model folder") for item in inputs],
                  metadata_paths)


def _svd_rank(inputs: Sequence[AdapterInput]) -> int:
    """The sum of the ranks: the sum of the updates has at most that rank, so ``svd`` keeps all of it."""
    return sum(item.rank for item in inputs)


def merged_rank(inputs: Sequence[AdapterInput], method: str) -> int:
    if method == "cat" or method in SVD_METHODS:
        return _svd_rank(inputs)
    return inputs[0].rank


def merge_weights(inputs: Sequence[AdapterInput], method: str, weights: Sequence[float], density: float | None,
                  seed: int, weights_dir: Path) -> None:
    """Load the base once (on CPU, float32), every input adapter onto it, merge them with PEFT's
    ``add_weighted_adapter`` and save only the merged adapter (PEFT format) to ``weights_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base_of(inputs[0])
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise WorkflowError(f"base model {base}: could not load it ({str(err).splitlines()[0]}). Fix: make the "
                            "base the adapters were trained on available offline (a local folder or a cached hub "
                            "name)") from None
    names = [f"input{i}" for i in range(len(inputs))]
    peft_model = PeftModel.from_pretrained(model, str(inputs[0].path / WEIGHTS_DIR), adapter_name=names[0])
    for name, item in zip(names[1:], inputs[1:], strict=True):
        peft_model.load_adapter(str(item.path / WEIGHTS_DIR), adapter_name=name)
    torch.manual_seed(seed)  # DARE's random drops (torch.bernoulli) come from torch's global generator
    peft_model.add_weighted_adapter(names, list(weights), MERGED_ADAPTER, combination_type=method,
                                    svd_rank=_svd_rank(inputs) if method in SVD_METHODS else None, density=density)
    merged = peft_model.peft_config[MERGED_ADAPTER]
    merged.use_rslora = False  # the inputs' scalings are folded into the merged factors; alpha = r gives scale 1
    merged.base_model_name_or_path = str(inputs[0].config.get("base_model") or base)
    peft_model.save_pretrained(str(weights_dir), selected_adapters=[MERGED_ADAPTER])


def build_record(inputs: Sequence[AdapterInput], method: str, weights: Sequence[float], density: float | None,
                 seed: int, rank: int, grid: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """What ``merge.json`` holds: eval reads ``tasks`` (the union, in the inputs' order), people read the rest
    (``models`` is a list in the inputs' order, each with its weight: the JSON's keys are sorted)."""
    tasks = list(dict.fromkeys(t for item in inputs for t in item.tasks))
    return {"format": RECORD_FORMAT, "method": method, "weights": list(weights), "density": density,
            "seed": seed if method in RANDOM_METHODS else None, "rank": rank, "tasks": tasks,
            "base_model": inputs[0].config.get("base_model"),
            "models": [{"name": item.name, "path": str(item.path.resolve()), "tasks": list(item.tasks),
                        "rank": item.rank, "weight": weight} for item, weight in zip(inputs, weights, strict=True)],
            "grid": list(grid)}


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``; an earlier merge there is replaced, anything else refused."""
    if out.exists():
        if not (out / MERGE_RECORD).is_file():
            raise WorkflowError(f"--out {out}: exists and is not a merged model folder. Fix: pass a new folder")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def merge_adapters(models: Mapping[str, Path], method: str, *, weights: Sequence[float] | None = None,
                   density: float | None = None, seed: int = 0, out: Path,
                   grid: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Merge the LoRA adapters of ``models`` (name -> trained Ludwig model folder, all on the same base) with
    PEFT's ``method`` into a Ludwig model folder at ``out`` (built in a temporary folder beside it, renamed into
    place when complete); returns ``out``. ``weights``: one per model (default 1 each); ``density``: the fraction
    kept by pruning methods (default 0.5); ``seed``: DARE's random drops. ``grid``: search results to record."""
    out = Path(out)
    weights, density = check_options(method, len(models), weights, density)
    inputs = [read_input(name, Path(path)) for name, path in models.items()]
    check_inputs(inputs, method)
    rank = merged_rank(inputs, method)
    if out.exists() and not (out / MERGE_RECORD).is_file():
        raise WorkflowError(f"--out {out}: exists and is not a merged model folder. Fix: pass a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        merge_weights(inputs, method, weights, density, seed, tmp / WEIGHTS_DIR)
        atomic_write_json(tmp / HYPERPARAMETERS, merged_config(inputs, rank))
        atomic_write_json(tmp / METADATA, merged_metadata(inputs))
        atomic_write_json(tmp / MERGE_RECORD, build_record(inputs, method, weights, density, seed, rank, grid))
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s with %s into %s", ", ".join(models), method, out)
    return out


# ---------------------------------------------------------------------------------------------- grid search
@dataclass(frozen=True)
class Candidate:
    """One setting of a grid search: the weights (None: 1 each) and the density (None: the method's default)."""

    weights: tuple[float, ...] | None = None
    density: float | None = None


#: A candidate's merged folder -> task -> its primary score on the validation split (higher is better).
Evaluate = Callable[[Path], Mapping[str, float]]


def parse_grid(items: Sequence[str]) -> list[Candidate]:
    """``["weights=1,1:0.5,1", "density=0.3,0.5"]`` -> every combination (weights lists are ``:``-separated)."""
    weights: list[tuple[float, ...] | None] = [None]
    densities: list[float | None] = [None]
    for item in items:
        key, value = parse_assignment(item, "--grid")
        if key == "weights":
            weights = [tuple(parse_numbers(part, "--grid weights=")) for part in value.split(":") if part.strip()]
        elif key == "density":
            densities = list(parse_numbers(value, "--grid density="))
        else:
            raise WorkflowError(f"--grid {item}: unknown setting {key}. Fix: --grid weights=1,1:0.5,1 and/or "
                                "--grid density=0.3,0.5,0.7")
    return [Candidate(w, d) for w, d in itertools.product(weights, densities)]


def grid_search(models: Mapping[str, Path], method: str, candidates: Sequence[Candidate], *, evaluate: Evaluate,
                seed: int = 0, out: Path, notify: Callable[[str], None] = lambda message: None) -> Path:
    """Merge with every candidate setting, score each with ``evaluate`` (on the validation split: the test split
    must not choose settings), and write the best (the highest mean score over the tasks; the first of equals)
    at ``out``, its ``merge.json`` holding every candidate's scores. Candidates are built in a hidden folder
    beside ``out``, removed at the end."""
    if not candidates:
        raise WorkflowError("--grid: no candidate settings. Fix: e.g. --grid weights=1,1:0.5,1")
    for candidate in candidates:  # every setting checked before any model is loaded
        check_options(method, len(models), candidate.weights, candidate.density)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.grid.", dir=out.parent))
    results: list[dict[str, Any]] = []
    try:
        for i, candidate in enumerate(candidates):
            weights, density = check_options(method, len(models), candidate.weights, candidate.density)
            notify(f"candidate {i + 1}/{len(candidates)}: weights {weights}, density {density}")
            folder = merge_adapters(models, method, weights=weights, density=density, seed=seed,
                                    out=work / f"candidate{i}")
            scores = {task: float(v) for task, v in evaluate(folder).items()}
            mean = sum(scores.values()) / len(scores) if scores else float("nan")
            results.append({"weights": weights, "density": density, "scores": scores, "mean": mean})
            notify(f"candidate {i + 1}/{len(candidates)}: mean validation score {mean:.4f} {scores}")
        best = max(range(len(results)), key=lambda i: (not math.isnan(results[i]["mean"]), results[i]["mean"], -i))
        for i, result in enumerate(results):
            result["best"] = i == best
        return merge_adapters(models, method, weights=results[best]["weights"], density=results[best]["density"],
                              seed=seed, out=out, grid=results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def validation_evaluator(models: Mapping[str, Path], *, prepared: Path, tasks: Sequence[str], reports: Path,
                         max_rows: int | None = None, max_new_tokens: int | None = None,
                         device: str | None = None, notify: Callable[[str], None] = lambda message: None) -> Evaluate:
    """``evaluate`` for :func:`grid_search`: ``eval --split validation`` of a candidate next to the input
    adapters (so each task generates under its specialist's settings, and their scores are cached once); the
    candidate's primary score per task. Predictions are cached under ``<reports>/.cache`` like eval's."""
    from eval.runner import EvalRequest, ModelSpec, run_eval, validate_request
    from prep.registry import TASKS

    inputs = [read_input(name, Path(path)) for name, path in models.items()]
    specs = tuple(ModelSpec(item.name, item.path, item.tasks) for item in inputs)
    base = str(inputs[0].config.get("base_model") or "")

    def evaluate(folder: Path) -> dict[str, float]:
        request = EvalRequest(name=f"merge-grid-{folder.name}", base_model=base,
                              models=(*specs, ModelSpec("candidate", folder, tuple(tasks))), tasks=tuple(tasks),
                              prepared=prepared, out=reports, max_rows=max_rows, max_new_tokens=max_new_tokens,
                              device=device, split="validation")
        validate_request(request, list(TASKS))
        result = run_eval(request, notify=notify, progress=False)
        return {task: result.retention.cells["candidate"][task].score.value for task in tasks}

    return evaluate


# ---------------------------------------------------------------------------------------------- command line
def parse_numbers(text: str, option: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise WorkflowError(f"{option} {text}: not a comma-separated list of numbers. "
                            f"Fix: e.g. {option} 1,0.5") from None


def parse_models(items: Sequence[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for item in items:
        name, value = parse_assignment(item, "--model")
        if name in models:
            raise WorkflowError(f"--model {name}: given twice. Fix: give each model its own name")
        models[name] = Path(value)
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="./run.sh merge", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a trained Ludwig model folder (<output_directory>/<experiment>_run/model); NAME is "
                             "its task (or it is a mix/merge whose tasks its folder records); repeat, 2 or more")
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    parser.add_argument("--weights", help="one weight per --model, comma-separated (default: 1 each)")
    parser.add_argument("--density", type=float, help=f"fraction kept by {', '.join(DENSITY_METHODS)} "
                                                        f"(default {DEFAULT_DENSITY})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dare_* methods' random drops (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="the merged Ludwig model folder to write")
    search = parser.add_argument_group("grid search (scored on the validation split, never on test)")
    search.add_argument("--grid", action="append", default=[], metavar="weights=W,W:W,W|density=D,D",
                        help="settings to try, e.g. --grid weights=1,1:0.5,1 --grid density=0.3,0.5,0.7; repeat")
    search.add_argument("--prepared", type=Path, default=Path("data/prepared"),
                        help="prepared data with <task>/train.csv holding validation rows (default: %(default)s)")
    search.add_argument("--tasks", help="comma-separated tasks to score (default: every task the inputs own)")
    search.add_argument("--reports", type=Path, default=Path("reports"),
                        help="eval's folder, for its cache and the grid log (default: %(default)s)")
    search.add_argument("--max-rows", type=int, help="score only the first N validation rows of each task")
    search.add_argument("--max-new-tokens", type=int, help="cap every task's new tokens (quick searches)")
    search.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    return parser


def run_grid(args: argparse.Namespace, models: Mapping[str, Path]) -> Path:
    """The command line's grid search, logged to ``<reports>/merge-grid-<out name>.log``."""
    from rich.console import Console

    from eval.report import logging_to

    candidates = parse_grid(args.grid)
    tasks = [t for t in (args.tasks or "").split(",") if t.strip()] or list(dict.fromkeys(
        t for name, path in models.items() for t in read_input(name, path).tasks))
    log = args.reports / f"merge-grid-{args.out.name}.log"
    console = Console(stderr=True)

    def notify(message: str) -> None:
        console.print(f"[dim]merge[/dim] {message}", highlight=False)

    notify(f"{len(candidates)} candidates, scored on the validation rows of {', '.join(tasks)}; log: {log}")
    with logging_to(log):
        evaluate = validation_evaluator(models, prepared=args.prepared, tasks=tasks, reports=args.reports,
                                        max_rows=args.max_rows, max_new_tokens=args.max_new_tokens,
                                        device=args.device, notify=notify)
        return grid_search(models, args.method, candidates, evaluate=evaluate, seed=args.seed, out=args.out,
                           notify=notify)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        weights = parse_numbers(args.weights, "--weights") if args.weights else None
        models = parse_models(args.model)
        if args.grid:
            if weights is not None or args.density is not None:
                raise WorkflowError("--weights/--density with --grid: the grid sets them. Fix: put the values in "
                                    "--grid weights=... / --grid density=...")
            out = run_grid(args, models)
        else:
            out = merge_adapters(models, args.method, weights=weights, density=args.density, seed=args.seed,
                                 out=args.out)
    except (WorkflowError, PrepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = json.loads((out / MERGE_RECORD).read_text(encoding="utf-8"))
    chosen = f"weights {record['weights']}" + (f", density {record['density']}" if record["density"] else "")
    best = next((c for c in record["grid"] if c.get("best")), None)
    score = f" (best of {len(record['grid'])} on validation: mean {best['mean']:.4f})" if best else ""
    print(f"merged {', '.join(m['name'] for m in record['models'])} ({args.method}, rank {record['rank']}, {chosen}){score} into "
          f"{out}; owns {', '.join(record['tasks'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
