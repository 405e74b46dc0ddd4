"""Generate and score every (model, task) pair, each cached on its own, plus perplexity on general-text probes.

The runner owns the bookkeeping only: which model is which, which tasks an adapter owns, which generation
settings each task uses, and the cache. Loading models and generating (``eval.generate``), perplexity
(``eval.perplexity``) and metrics (``eval.scoring``) come in through a :class:`Backend`, so the bookkeeping is
tested with fakes and no model.

Cache: one JSON file per (model, task) pair under ``<cache_dir>/pairs/<key>.json``, holding the predictions and
their scores. The key is a hash of the model's identity (adapter weight files + its config + the base model and
how it is loaded: ``--device``, 4-bit or not), the test.csv bytes, the generation settings that change greedy
outputs and ``max_rows``; adding an adapter or a task reuses every pair already computed, and changing any of
those inputs recomputes exactly the pairs it affects. ``batch_size`` is not part of the key (a throughput knob). Perplexities and lm-eval results are cached the same way.

Statistics: each pair's cache entry also holds the per-row values of every metric that is a mean over rows
(``row_scores``) and each probe entry each text's NLL and token count, so the report bootstraps over the same
rows for every model (``eval.retention``, ``eval.stats``). A task's trivial baseline (``eval.baselines``) is
scored on the same rows and cached the same way. An adapter given several trained folders (one per seed) is
evaluated once per folder and reported as their mean, with the spread between seeds.

Fair comparison: every model is scored on a task with that task's generation settings (its max input/new
tokens), read from the single-task adapter trained on it when one is given, else from
``ludwig_configs/<task>.yaml``; the base model and the multitask adapter therefore generate under the same
limits as the specialist.

Split runs (a GPU machine without the scoring libraries, then a CPU machine): ``generate_only`` generates every
pair and probe, scores nothing, and leaves ``<report>/generations/`` plus ``identities.json`` (model, seed, task,
key, rows, settings; :mod:`eval.saved`); a request built from that folder (``saved``) scores those generations
without loading any model: the keys recorded there are the cache keys, and any pair missing is a one-line error.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval import baselines as baseline_recipes
from eval import contamination, manifest, stats
from eval.generate import DECODING_RULE, HYPERPARAMETERS, WEIGHTS_DIR, saved_config
from eval.retention import BASE, CellInput, ProbeInput, Retention, build_retention
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_json

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the cached JSON changes shape: old entries are then ignored, never misread
MERGE_RECORD = "merge.json"  # what ./run.sh merge writes into a merged model folder (workflow.merge)
LM_EVAL_VERSION = "0.4.13"  # the release the lm-eval integration was written against (optional, not a dependency)


# ---------------------------------------------------------------------------------------------- what to evaluate
@dataclass(frozen=True)
class ModelSpec:
    """One row of the matrix: a name, a trained Ludwig model folder (None for the base), the tasks it owns, and
    further folders of the same adapter trained with other seeds (reported as the mean, with their spread)."""

    name: str
    path: Path | None
    own_tasks: tuple[str, ...] = ()
    other_seeds: tuple[Path, ...] = ()

    @property
    def seed_paths(self) -> tuple[Path, ...]:
        return () if self.path is None else (self.path, *self.other_seeds)


@dataclass(frozen=True)
class Run:
    """One trained folder to evaluate: seed ``seed`` (0-based) of model ``model``; ``label`` names it in logs."""

    model: str
    seed: int
    path: Path | None
    label: str


def model_runs(spec: ModelSpec) -> list[Run]:
    """The folders of one model: itself when it has one seed, else ``NAME#1``, ``NAME#2`` ..."""
    paths = spec.seed_paths or (None,)
    if len(paths) == 1:
        return [Run(spec.name, 0, paths[0], spec.name)]
    return [Run(spec.name, i, p, f"{spec.name}#{i + 1}") for i, p in enumerate(paths)]


def all_runs(request: EvalRequest) -> list[Run]:
    """Every model seed of ``request`` in the order the runner visits them: the base first."""
    return [run for spec in (ModelSpec(BASE, None, ()), *request.models) for run in model_runs(spec)]


@dataclass(frozen=True)
class Probe:
    """A named general-text probe set for perplexity (the task-free view of forgetting)."""

    name: str
    texts: tuple[str, ...]
    source: str = ""  # the file it was read from, named in the report


@dataclass(frozen=True)
class EvalRequest:
    """Everything one eval run needs; built by the CLI (``python -m eval``) or the demo."""

    name: str
    base_model: str
    models: tuple[ModelSpec, ...]
    tasks: tuple[str, ...]
    prepared: Path
    out: Path = Path("reports")
    cache_dir: Path | None = None  # default: <out>/.cache, shared by every report under <out>
    max_rows: int | None = None
    probes: tuple[Probe, ...] = ()
    spider_dir: Path | None = None
    device: str | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None  # one cap for every task (quick runs); default: each task's own
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None
    rescore: bool = False  # re-score cached predictions (after a metric changed) without generating again
    split: str = "test"  # "validation": the validation rows of train.csv (for choosing settings, never test)
    generate_only: bool = False  # generate and save every pair, score nothing (eval.saved writes the folder)
    saved: Mapping[str, Any] | None = None  # identities.json of a generate-only run: score its generations only
    chat_template: bool = False  # prompts wrapped in the base tokenizer's chat template (eval.generate)
    merge_lora: bool | None = None  # adapters merged into bf16 weights (True), kept apart (False); None: CUDA only

    @property
    def report_dir(self) -> Path:
        return self.out / self.name

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.out / ".cache"


@dataclass(frozen=True)
class Backend:
    """The model-facing functions the runner calls (signatures of eval.generate / perplexity / scoring)."""

    load_base: Callable[..., Any]  # (base_model, settings, *, device) -> LoadedModel
    load_adapter: Callable[..., Any]  # (model_dir, *, base_model, device) -> LoadedModel
    generate: Callable[..., list[str]]  # (loaded, prompts, *, max_new_tokens, batch_size, progress) -> texts
    text_nll: Callable[..., Any]  # (loaded, texts) -> eval.perplexity.TextNLL (per-text .nll and .tokens)
    score: Callable[..., Any]  # (task, test, predictions, resources) -> eval.task_scores.TaskScores
    settings_from_config: Callable[[dict[str, Any]], Any]  # Ludwig config -> GenerationSettings
    resources: Callable[..., Any]  # (work_dir=, prepared_dir=, spider_dir=) -> EvalResources
    primary_metric: Mapping[str, str]


def default_backend() -> Backend:
    """The real backend; imported lazily because torch/transformers take seconds to import. eval.scoring
    imports no optional scorer library at import time, so a generate-only run works without them."""
    from eval import generate, perplexity, scoring

    return Backend(
        load_base=lambda base, settings, *, device: generate.load_base_model(base, settings, device=device),
        load_adapter=lambda path, *, base_model, device, merge=None: generate.load_ludwig_model(
            path, base_model=base_model, device=device, merge=merge),
        generate=generate.generate,
        text_nll=perplexity.text_nll,
        score=scoring.score_task,
        settings_from_config=generate.settings_from_config,
        resources=scoring.EvalResources,
        primary_metric=scoring.PRIMARY_METRIC,
    )


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PairResult:
    """One (model seed, task): aggregate metrics, per-row values, scoring settings and the predictions."""

    model: str
    task: str
    key: str
    rows: int
    scores: dict[str, float]
    cached: bool
    seconds_generate: float
    seconds_score: float
    cache_file: str
    seed: int = 0
    row_scores: dict[str, list[float]] = field(default_factory=dict)
    scoring_settings: dict[str, Any] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list, repr=False)
    versions: dict[str, str | None] = field(default_factory=dict)  # model stack that generated the predictions


@dataclass
class BaselineResult:
    """A task's trivial baseline (``eval.baselines``): what it answers, how it was chosen, and its scores."""

    task: str
    name: str
    train_file: str
    train_rows: int
    train_scores: dict[str, float]  # candidate -> primary metric on the training sample
    chance: float | None
    scores: dict[str, float]
    row_scores: dict[str, list[float]]
    predictions: list[str] = field(default_factory=list, repr=False)


@dataclass
class ProbeResult:
    """One (model seed, probe): each text's summed NLL and token count."""

    model: str
    probe: str
    seed: int
    nll: list[float]
    tokens: list[int]

    @property
    def perplexity(self) -> float:
        return stats.perplexity_value(np.asarray(self.nll), np.asarray(self.tokens))


@dataclass
class EvalResult:
    request: EvalRequest
    own_tasks: dict[str, list[str]]
    settings: dict[str, dict[str, Any]]  # task -> max_input_tokens, max_new_tokens, batch_size, source
    rows: dict[str, dict[str, int]]  # task -> test_rows (in test.csv), evaluated
    pairs: list[PairResult]  # one per (model seed, task)
    perplexity: dict[str, dict[str, float]]  # model -> probe -> perplexity (NLL averaged over seeds)
    probes: dict[str, int]  # probe name -> number of texts
    lm_eval: dict[str, dict[str, dict[str, float]]]  # model -> lm-eval task -> metric -> value
    retention: Retention
    timings: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, BaselineResult] = field(default_factory=dict)
    probe_results: list[ProbeResult] = field(default_factory=list)
    contamination: contamination.Contamination = field(
        default_factory=lambda: contamination.Contamination([], {}, []))
    manifest: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)  # task -> the evaluated test rows

    def pair(self, model: str, task: str) -> PairResult | None:
        """The pair of ``model``'s first seed on ``task``."""
        return next((p for p in self.pairs if p.model == model and p.task == task), None)

    def seed_pairs(self, model: str, task: str) -> list[PairResult]:
        return [p for p in self.pairs if p.model == model and p.task == task]

    def seed_count(self, model: str) -> int:
        return len({p.seed for p in self.pairs if p.model == model}) or 1


# ---------------------------------------------------------------------------------------------- parsing inputs
def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """``"sql=results/sql/run/model"`` -> ``("sql", "results/sql/run/model")``, or a one-line error."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise WorkflowError(f"{option} {text!r}: expected NAME=VALUE. Fix: e.g. {option} sql=results/sql/run/model")
    return name.strip(), value.strip()


def require_model_dir(name: str, path: Path) -> Path:
    """A trained Ludwig model folder (``<output_directory>/<experiment>_run/model``), or a one-line error."""
    if not path.is_dir():
        raise WorkflowError(f"--model {name}={path}: folder not found. Fix: pass a trained model folder, "
                            f"e.g. results/{name}/experiment_run/model")
    if not (path / HYPERPARAMETERS).exists():
        hint = f"; did you mean {path / 'model'}?" if (path / "model" / HYPERPARAMETERS).exists() else ""
        raise WorkflowError(f"--model {name}={path}: no {HYPERPARAMETERS}, not a trained Ludwig model folder. "
                            f"Fix: pass <output_directory>/<experiment>_run/model{hint}")
    return path


def trained_tasks(model_dir: Path) -> tuple[str, ...] | None:
    """The tasks in the training data's ``task`` column, found through Ludwig's ``description.json``."""
    dataset = contamination.training_data(model_dir)
    if dataset is None:
        return None
    try:
        tasks = pd.read_csv(dataset, usecols=["task"], keep_default_na=False)["task"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return tuple(sorted(set(tasks) - {""})) or None


def merge_record(model_dir: Path | None) -> dict[str, Any] | None:
    """The ``merge.json`` that ``./run.sh merge`` wrote into a merged model folder; None for any other folder."""
    try:
        record = json.loads((Path(model_dir) / MERGE_RECORD).read_text(encoding="utf-8")) if model_dir else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def merged_tasks(model_dir: Path) -> tuple[str, ...] | None:
    """The tasks a merged adapter owns, as its ``merge.json`` records them (the union of the merged adapters'
    tasks); None when the folder is no merge."""
    tasks = (merge_record(model_dir) or {}).get("tasks")
    return tuple(str(t) for t in tasks) if isinstance(tasks, list) and tasks else None


def known_own_tasks(name: str, path: Path, known_tasks: Sequence[str],
                    owns: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Which tasks an adapter was trained on, or () when nothing says; the rule (documented in the README):

    1. ``--owns NAME=task1,task2`` when given;
    2. else the model's name when it is a task (``--model sql=DIR`` owns sql);
    3. else a merged adapter's recorded tasks (its ``merge.json``);
    4. else the tasks of the training data's ``task`` column (the multitask mixture has one).
    """
    from prep.registry import owned_by_name

    if name in owns:
        return tuple(owns[name])
    if named := owned_by_name(name, known_tasks):
        return named
    return merged_tasks(path) or trained_tasks(path) or ()


def resolve_own_tasks(name: str, path: Path, known_tasks: Sequence[str],
                      owns: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """:func:`known_own_tasks`, or a one-line error asking for ``--owns`` when nothing says."""
    found = known_own_tasks(name, path, known_tasks, owns)
    if found:
        return found
    raise WorkflowError(f"--model {name}={path}: cannot tell which tasks it was trained on (not a task name, "
                        f"no training data with a 'task' column). Fix: pass --owns {name}=task1,task2")


def model_spec(name: str, value: str, known_tasks: Sequence[str], owns: Mapping[str, Sequence[str]]) -> ModelSpec:
    """``--model NAME=DIR`` or ``--model NAME=DIR1,DIR2,...`` (one trained folder per seed of the same adapter;
    the first folder's training data decides its own tasks)."""
    paths = [require_model_dir(name, Path(item.strip())) for item in value.split(",") if item.strip()]
    if len(set(paths)) != len(paths):
        raise WorkflowError(f"--model {name}={value}: the same folder twice. Fix: one folder per seed")
    return ModelSpec(name, paths[0], resolve_own_tasks(name, paths[0], known_tasks, owns), tuple(paths[1:]))


def read_probe(path: Path) -> Probe:
    """Probe texts from a file: ``.txt`` (paragraphs separated by blank lines), ``.jsonl``/``.csv`` (``text``)."""
    if not path.is_file():
        raise WorkflowError(f"--probe {path}: file not found. Fix: pass a .txt/.jsonl/.csv file of general text")
    if path.suffix.lower() in (".jsonl", ".csv"):
        frame = pd.read_json(path, lines=True) if path.suffix.lower() == ".jsonl" else pd.read_csv(path)
        if "text" not in frame.columns:
            raise WorkflowError(f"--probe {path}: no 'text' column. Fix: one text per row in a 'text' column")
        texts = [str(t).strip() for t in frame["text"]]
    else:
        texts = [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise WorkflowError(f"--probe {path}: no text found. Fix: put a few paragraphs of general text in it")
    return Probe(name=path.stem, texts=tuple(texts), source=str(path))


# ---------------------------------------------------------------------------------------------- identities, data
def _digest(parts: Sequence[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def base_identity(base_model: str) -> str:
    """A local model folder: its config and the names and sizes of its weight files; a hub name: the name.

    Weights of a multi-GB base are not read in full: a changed checkpoint with the same file sizes would need a
    new name or ``--cache-dir``; adapters (small) are hashed byte for byte.
    """
    path = Path(base_model)
    if not path.is_dir():
        return _digest(["hub", base_model])
    config = path / "config.json"
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return _digest(["dir", config.read_bytes() if config.exists() else b"",
                    *[f"{p.name}:{p.stat().st_size}" for p in weights]])


def adapter_identity(model_dir: Path, base: str) -> str:
    """Every byte of the adapter weights and the saved config, plus the base model it is applied to."""
    files = sorted(p for p in (model_dir / WEIGHTS_DIR).rglob("*") if p.is_file())
    files.append(model_dir / HYPERPARAMETERS)
    parts: list[bytes | str] = ["adapter", base]
    for p in files:
        parts += [p.relative_to(model_dir).as_posix(), p.read_bytes()]
    return _digest(parts)


SPLITS = ("test", "validation")


def split_file(prepared: Path, task: str, split: str) -> Path:
    """Where a split's rows live: test.csv, or train.csv for the validation rows (Ludwig's ``split`` = 1)."""
    return prepared / task / ("test.csv" if split == "test" else "train.csv")


def load_test(prepared: Path, task: str, max_rows: int | None,
              split: str = "test") -> tuple[pd.DataFrame, str, int]:
    """The held-out rows of ``split`` (first ``max_rows`` rows: prep sorts them by a hash, so a fair sample),
    a hash of their file and split, and their full row count. ``validation``: the rows of train.csv with
    ``split`` 1, which training only used for early stopping, so settings can be chosen without the test set."""
    from prep.common import LUDWIG_SPLIT_CODE, VALIDATION

    path = split_file(prepared, task, split)
    if not path.is_file():
        raise WorkflowError(f"{path}: {path.name} not found. Fix: run ./run.sh prep {task} --out {prepared}")
    raw = path.read_bytes()
    test = pd.read_csv(path, keep_default_na=False, dtype=str)  # as eval.scoring expects: text stays text
    missing = [c for c in ("prompt", "response", *(["split"] if split != "test" else [])) if c not in test.columns]
    if missing:
        raise WorkflowError(f"{path}: no column {', '.join(missing)}. Fix: re-run ./run.sh prep {task}")
    if split != "test":
        test = test[test["split"] == str(LUDWIG_SPLIT_CODE[VALIDATION])].reset_index(drop=True)
    if test.empty:
        raise WorkflowError(f"{path}: no {split} rows. Fix: prepare more data for {task}")
    total = len(test)
    if max_rows is not None:
        test = test.head(max_rows).reset_index(drop=True)
    digest = hashlib.sha256(raw).hexdigest()
    return test, digest if split == "test" else f"{split}:{digest}", total


def task_config(task: str, models: Sequence[ModelSpec]) -> tuple[dict[str, Any], str]:
    """The Ludwig config that sets a task's generation limits, and where it came from (see module docstring)."""
    from ludwig_mt.config import load_yaml
    from prep.registry import get_task

    for spec in models:
        if spec.path is not None and spec.own_tasks == (task,):
            return saved_config(spec.path), str(spec.path / HYPERPARAMETERS)
    path = get_task(task).config_path()
    return load_yaml(path), str(path)


# Values of generation options that leave decoding unchanged (what Ludwig saves for options nobody set).
_NO_OP_GENERATION = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                     "length_penalty": 1.0, "diversity_penalty": 0.0, "min_length": 0, "early_stopping": False,
                     "renormalize_logits": False, "remove_invalid_values": False}


def effective_generation(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The options of Ludwig's ``generation`` section that change greedy outputs: those that differ from
    transformers' defaults, less what eval.generate forces (greedy) or ignores (sampling knobs, lengths).

    A task YAML's short section and the same section as Ludwig saves it (every default filled in) give the same
    result, so adding a specialist adapter (whose saved config then sets the task's settings) keeps the cache.
    """
    from transformers import GenerationConfig

    from eval.generate import _GREEDY, _INERT_WHEN_GREEDY

    ignored = {*_GREEDY, *_INERT_WHEN_GREEDY, "max_new_tokens", "use_cache"}
    defaults = GenerationConfig().to_dict()  # transformers 5 leaves most unset (None)
    return {k: v for k, v in sorted(generation.items())
            if k not in ignored and v is not None and v != defaults.get(k) and v != _NO_OP_GENERATION.get(k)}


def settings_key(settings: Any) -> dict[str, Any]:
    """The generation settings that change outputs: not the batch size (speed only), not quantization (part of
    the model's identity), and the generation section reduced to what changes greedy decoding."""
    values = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "quantization")}
    if not values.get("chat_template"):  # off: the key every cache entry had before the option existed
        values.pop("chat_template", None)
    if values.get("generation"):
        values["generation"] = effective_generation(values["generation"])
    return values


def pair_key(model_identity: str, task: str, test_hash: str, settings: Any, max_rows: int | None) -> str:
    payload = {"format": CACHE_FORMAT, "model": model_identity, "task": task, "test": test_hash,
               "settings": settings_key(settings), "max_rows": max_rows, "decoding": DECODING_RULE}
    return _digest([json.dumps(payload, sort_keys=True)])


def read_cache(path: Path) -> dict[str, Any] | None:
    """A cached entry, or None when absent or unreadable (a damaged entry is recomputed, never trusted)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT else None


# ---------------------------------------------------------------------------------------------- lm-eval (optional)
def require_lm_eval() -> None:
    """lm-eval is optional and not a dependency: one line saying how to install it when it is asked for."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise WorkflowError(f"--lm-eval-tasks needs lm-eval, which is not installed. "
                            f"Fix: pip install lm-eval=={LM_EVAL_VERSION}") from None


def run_lm_eval(base_model: str, model_dir: Path | None, tasks: Sequence[str], *, device: str | None,
                limit: int | None) -> dict[str, dict[str, float]]:
    """lm-eval-harness tasks on the base, or on the base + a Ludwig adapter through lm-eval's ``peft=``."""
    import lm_eval

    model_args = f"pretrained={base_model}"
    if model_dir is not None:
        model_args += f",peft={model_dir / WEIGHTS_DIR}"
    output = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), device=device,
                                     limit=limit)
    return {task: {metric: float(value) for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in output["results"].items()}


# ---------------------------------------------------------------------------------------------- the run
def validate_request(request: EvalRequest, known_tasks: Sequence[str]) -> None:
    """Every input checked before any model is loaded: one line naming the bad argument and the fix."""
    if not request.tasks:
        raise WorkflowError("--tasks: no task given. Fix: e.g. --tasks sql,detox")
    for task in request.tasks:
        if task not in known_tasks:
            raise WorkflowError(f"--tasks {task}: unknown task. Fix: use one of: {', '.join(sorted(known_tasks))}")
    names = [m.name for m in request.models]
    for name in names:
        if name == BASE:
            raise WorkflowError(f"--model {BASE}=...: '{BASE}' is the base model's row. Fix: pick another name")
        if names.count(name) > 1:
            raise WorkflowError(f"--model {name}: given twice. Fix: give each model its own name")
    for spec in request.models if request.saved is None else ():  # saved: the folders stayed where they ran
        for path in spec.seed_paths:
            require_model_dir(spec.name, path)
    if not request.prepared.is_dir():
        raise WorkflowError(f"--prepared {request.prepared}: folder not found. Fix: run ./run.sh prep first")
    if request.split not in SPLITS:
        raise WorkflowError(f"--split {request.split}: unknown. Fix: use one of: {', '.join(SPLITS)}")
    for task in request.tasks:
        test = split_file(request.prepared, task, request.split)
        if not test.is_file():
            raise WorkflowError(f"{test}: {test.name} not found. Fix: run ./run.sh prep {task} --out "
                                f"{request.prepared}")
    if request.lm_eval_tasks:
        require_lm_eval()


class _LazyModel:
    """Loads a model the first time a pair actually needs it: a fully cached model is never loaded."""

    def __init__(self, load: Callable[[], Any], label: str, timings: dict[str, float]) -> None:
        self._load, self._label, self._timings, self.value = load, label, timings, None

    def get(self) -> Any:
        if self.value is None:
            started = time.perf_counter()
            self.value = self._load()
            self._timings[f"load {self._label}"] = time.perf_counter() - started
            logger.info("loaded %s in %.1f s", self._label, self._timings[f"load {self._label}"])
        return self.value

    def release(self) -> None:
        """Drop the model before the next one loads (one model in memory at a time)."""
        if self.value is None:
            return
        self.value = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def task_settings(request: EvalRequest, backend: Backend) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each task's generation settings (see the module docstring) and their description for the report; a saved
    run's as recorded (its keys already hold them; the adapters' saved configs are not here)."""
    if request.saved is not None:
        return {task: None for task in request.tasks}, {t: dict(request.saved["tasks"][t]["settings"])
                                                          for t in request.tasks}
    settings, info = {}, {}
    for task in request.tasks:
        config, source = task_config(task, request.models)
        s = backend.settings_from_config(config)
        if request.batch_size:
            s = replace(s, batch_size=request.batch_size)
        if request.max_new_tokens:
            s = replace(s, max_new_tokens=min(s.max_new_tokens, request.max_new_tokens))
        if request.chat_template:
            s = replace(s, chat_template=True)
        settings[task] = s
        info[task] = asdict(s) | {"source": source}
    return settings, info


@dataclass
class Generated:
    """What the model side of a run produced: every pair (scored unless generate-only) and probe, with the
    identities, settings and test sets behind them; :func:`run_eval` scores on, ``eval.saved`` saves it."""

    tests: dict[str, tuple[pd.DataFrame, str, int]]
    settings_info: dict[str, dict[str, Any]]
    identities: dict[str, str]  # run label -> model identity (the cache keys' model part)
    pairs: list[PairResult]
    probe_results: list[ProbeResult]
    lm_eval: dict[str, dict[str, dict[str, float]]]
    timings: dict[str, float]
    resources: Any = None


def _model_loader(request: EvalRequest, backend: Backend, run: Run, first_settings: Any) -> Callable[[], Any]:
    """How to load one run's model; for a saved run, a one-line error: everything must come from its folder."""
    if request.saved is not None:
        def missing() -> Any:
            raise WorkflowError(f"{run.label}: a pair or probe was not generated in {request.saved['folder']} "
                                "(other tasks, rows, probes or settings?). Fix: score with the options it was "
                                "generated with (see its identities.json), or generate again")
        return missing
    if run.path is None:
        return lambda: backend.load_base(request.base_model, first_settings, device=request.device)
    merge = {} if request.merge_lora is None else {"merge": request.merge_lora}
    return lambda: backend.load_adapter(run.path, base_model=request.base_model, device=request.device, **merge)


def generate_all(request: EvalRequest, backend: Backend, notify: Callable[[str], None] = lambda message: None,
                 progress: bool = True, after_run: Callable[[Generated], None] | None = None,
                 only: frozenset[str] | None = None) -> Generated:
    """Every (model seed, task) pair and every probe, from the cache or generated (and scored, unless
    ``generate_only``); lm-eval results too. ``after_run`` sees what is done after each model seed (a
    generate-only run saves its progress, so a run cut short still leaves the models it finished). ``only``:
    the run labels to do, the others skipped (a generation worker's share, :mod:`eval.workers`)."""
    from prep.registry import TASKS

    validate_request(request, list(TASKS))
    tests = {task: load_test(request.prepared, task, request.max_rows, request.split) for task in request.tasks}
    for task in request.tasks:
        if task not in backend.primary_metric:
            raise WorkflowError(f"--tasks {task}: no metric defined for it in eval.scoring. "
                                f"Fix: use one of: {', '.join(sorted(backend.primary_metric))}")
    settings, settings_info = task_settings(request, backend)
    first_settings = settings[request.tasks[0]]
    # The base runs 4-bit on CUDA when the first task's config quantizes (eval.generate.load_base_model).
    base = _digest([base_identity(request.base_model), request.device or "auto",
                    json.dumps(getattr(first_settings, "quantization", None) or {}, sort_keys=True),
                    *([] if request.merge_lora is None else [f"merge_lora={request.merge_lora}"])])
    resources = None if request.generate_only else backend.resources(
        work_dir=request.cache / "resources", prepared_dir=request.prepared, spider_dir=request.spider_dir)
    specs = (ModelSpec(BASE, None, ()), *request.models)
    timings: dict[str, float] = {}
    identities: dict[str, str] = {}
    pairs: list[PairResult] = []
    probe_results: list[ProbeResult] = []
    lm_eval_results: dict[str, dict[str, dict[str, float]]] = {}
    for run in all_runs(request):
        if only is not None and run.label not in only:
            continue
        if request.saved is not None:
            identity = request.saved["identities"][run.label]
        else:
            identity = base if run.path is None else adapter_identity(run.path, base)
        identities[run.label] = identity
        model = _LazyModel(_model_loader(request, backend, run, first_settings), run.label, timings)
        for task in request.tasks:
            test, test_hash, _ = tests[task]
            pairs.append(_run_pair(request, backend, run, identity, task, test, test_hash, settings[task], model,
                                   resources, notify, progress))
        probe_results += [_run_probe(request, backend, run, identity, probe, model, notify)
                          for probe in request.probes]
        if request.lm_eval_tasks and run.seed == 0:
            spec = next(s for s in specs if s.name == run.model)
            lm_eval_results[run.model] = _run_lm_eval(request, spec, identity, notify)
        model.release()
        if after_run is not None:
            after_run(Generated(tests, settings_info, identities, pairs, probe_results, lm_eval_results, timings))
    return Generated(tests, settings_info, identities, pairs, probe_results, lm_eval_results, timings, resources)


def run_eval(request: EvalRequest, backend: Backend | None = None,
             notify: Callable[[str], None] = lambda message: None, progress: bool = True) -> EvalResult:
    """Every (model seed, task) pair, every probe and every task's trivial baseline, cached; the contamination
    check and the run manifest; returns everything the report needs."""
    from prep.registry import TASKS

    if request.generate_only:
        raise WorkflowError("run_eval scores; a generate-only request goes to eval.saved.generate_only")
    started = time.perf_counter()
    backend = backend or default_backend()
    generated = generate_all(request, backend, notify, progress)
    tests, settings_info, pairs, resources = generated.tests, generated.settings_info, generated.pairs, \
        generated.resources
    probe_results, lm_eval_results, timings = generated.probe_results, generated.lm_eval, generated.timings
    baselines = {task: b for task in request.tasks
                 if (b := _run_baseline(request, backend, task, tests[task][0], tests[task][1], resources, notify))}
    primary = {task: backend.primary_metric[task] for task in request.tasks}
    retention = build_retention(
        cell_inputs(pairs, primary), request.tasks, {m.name: m.own_tasks for m in request.models}, primary,
        baseline={t: np.asarray(b.row_scores[primary[t]]) for t, b in baselines.items()
                  if primary[t] in b.row_scores},
        probes=probe_inputs(probe_results))
    if request.split == "test":
        notify("contamination: comparing training data with the test sets and probes")
        overlaps = check_contamination(request, {t: test for t, (test, _, _) in tests.items()}, TASKS)
    else:  # validation rows live in train.csv by construction: every one would be reported
        overlaps = contamination.Contamination([], {}, [f"the {request.split} split (its rows are in train.csv)"])
    timings["total"] = time.perf_counter() - started
    return EvalResult(
        request=request, own_tasks={spec.name: list(spec.own_tasks) for spec in (ModelSpec(BASE, None, ()),
                                                                                  *request.models)},
        settings=settings_info,
        rows={task: {"test_rows": total, "evaluated": len(test)} for task, (test, _, total) in tests.items()},
        pairs=pairs, perplexity={m: {p: v.perplexity for p, v in row.items()}
                                 for m, row in probe_means(probe_results).items()},
        probes={p.name: len(p.texts) for p in request.probes}, lm_eval=lm_eval_results, retention=retention,
        timings=timings, baselines=baselines, probe_results=probe_results, contamination=overlaps,
        manifest=run_manifest(request, [p.versions for p in pairs]) | (
            {} if request.saved is None else {k: request.saved["manifest"].get(k)
                                              for k in ("models", "device", "base_model")}
            | ({"study": request.saved["extra"]} if request.saved.get("extra") else {})
            | {"models_not_generated": list(request.saved.get("models_not_generated", []))}),
        tests={t: test for t, (test, _, _) in tests.items()},
    )


# ---------------------------------------------------------------------------------------------- to the matrix
def score_metrics(scores: Mapping[str, float], settings: Mapping[str, Any]) -> dict[str, float]:
    """The scores among a pair's metrics: not its settings, not its row count."""
    return {k: v for k, v in scores.items() if k not in settings and k != "n"}


def cell_inputs(pairs: Sequence[PairResult], primary: Mapping[str, str]) -> dict[str, dict[str, CellInput]]:
    """model -> task -> the matrix's input: per-row primary values averaged over seeds (None unless every seed
    has them), each seed's aggregate, and each score metric (aggregate and per-row) averaged over seeds."""
    grouped: dict[tuple[str, str], list[PairResult]] = {}
    for pair in pairs:
        grouped.setdefault((pair.model, pair.task), []).append(pair)
    inputs: dict[str, dict[str, CellInput]] = {}
    for (model, task), seeds in grouped.items():
        metric = primary[task]
        rows = (np.mean([np.asarray(p.row_scores[metric], dtype=float) for p in seeds], axis=0)
                if all(metric in p.row_scores for p in seeds) else None)
        metrics = [score_metrics(p.scores, p.scoring_settings) for p in seeds]
        shared = [m for m in metrics[0] if all(m in other for other in metrics)]
        with_rows = [m for m in shared if all(m in p.row_scores for p in seeds)]
        inputs.setdefault(model, {})[task] = CellInput(
            rows, tuple(p.scores[metric] for p in seeds if metric in p.scores),
            {m: float(np.mean([values[m] for values in metrics])) for m in shared},
            {m: np.mean([np.asarray(p.row_scores[m], dtype=float) for p in seeds], axis=0) for m in with_rows})
    return inputs


def probe_means(results: Sequence[ProbeResult]) -> dict[str, dict[str, ProbeResult]]:
    """model -> probe -> its seeds' per-text NLL averaged (token counts are the tokenizer's: the same)."""
    grouped: dict[tuple[str, str], list[ProbeResult]] = {}
    for result in results:
        grouped.setdefault((result.model, result.probe), []).append(result)
    means: dict[str, dict[str, ProbeResult]] = {}
    for (model, probe), seeds in grouped.items():
        nll = np.mean([r.nll for r in seeds], axis=0)
        means.setdefault(model, {})[probe] = ProbeResult(model, probe, -1, [float(v) for v in nll], seeds[0].tokens)
    return means


def probe_inputs(results: Sequence[ProbeResult]) -> dict[str, dict[str, ProbeInput]]:
    return {model: {probe: ProbeInput(np.asarray(r.nll, dtype=float), np.asarray(r.tokens, dtype=float))
                    for probe, r in row.items()}
            for model, row in probe_means(results).items()}


# ---------------------------------------------------------------------------------------------- checks, manifest
def check_contamination(request: EvalRequest, tests: Mapping[str, pd.DataFrame],
                        tasks: Mapping[str, Any]) -> contamination.Contamination:
    """Every model's training data and every evaluated task's prepared train.csv against every test set and probe
    (``eval.contamination``); a file used by several sources is read once."""
    sources: dict[Path, list[str]] = {}  # training file -> the labels of everything that uses it
    defaults: dict[Path, str | None] = {}  # training file -> the task of rows without a task column
    trained_by: dict[Path, list[str]] = {}
    unchecked = []
    for spec in request.models:
        for run in model_runs(spec):
            data = contamination.training_data(run.path) if run.path else None
            if data is None:
                unchecked.append(f"model {run.label}")
                continue
            sources.setdefault(data.resolve(), []).append(f"model {run.label}")
            trained_by.setdefault(data.resolve(), []).append(spec.name)
            defaults.setdefault(data.resolve(), spec.own_tasks[0] if len(spec.own_tasks) == 1 else None)
    for task in request.tasks:
        train = request.prepared / task / "train.csv"
        if train.is_file():
            sources.setdefault(train.resolve(), []).append(f"prepared {task}/train.csv")
            defaults[train.resolve()] = task
    probes = {p.name: list(p.texts) for p in request.probes}
    overlaps = []
    for path, labels in sources.items():
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        overlaps += contamination.check_source(" = ".join(labels), frame, tasks, tests, probes, defaults.get(path),
                                               tuple(dict.fromkeys(trained_by.get(path, []))))
    return contamination.Contamination(overlaps, {" = ".join(v): str(k) for k, v in sources.items()}, unchecked)


def run_manifest(request: EvalRequest, generated_with: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``eval.manifest`` for this run: its data files, models, device, bootstrap settings and the model-stack
    versions stored with the predictions."""
    files = {f"{task}/test.csv": request.prepared / task / "test.csv" for task in request.tasks}
    files |= {f"{task}/train.csv": request.prepared / task / "train.csv" for task in request.tasks
              if (request.prepared / task / "train.csv").is_file()}
    files |= {f"probe {p.name}": Path(p.source) for p in request.probes if p.source}
    return manifest.build_manifest(
        files=files, models={m.name: m.seed_paths for m in request.models}, device=request.device,
        bootstrap={"resamples": stats.RESAMPLES, "seed": stats.SEED, "level": stats.LEVEL, "alpha": stats.ALPHA,
                   "intervals": "percentile", "multiple_testing": "Benjamini-Hochberg"},
        generated_with=generated_with, base_model=request.base_model)


# ---------------------------------------------------------------------------------------------- cached steps
def _run_pair(request: EvalRequest, backend: Backend, run: Run, identity: str, task: str,
              test: pd.DataFrame, test_hash: str, settings: Any, model: _LazyModel, resources: Any,
              notify: Callable[[str], None], progress: bool) -> PairResult:
    """One (model seed, task) pair from the cache, or generated, scored and written to the cache."""
    key = pair_key(identity, task, test_hash, settings, request.max_rows) if request.saved is None else \
        request.saved["keys"][f"{run.label}|{task}"]
    path = request.cache / "pairs" / f"{key}.json"
    entry = read_cache(path)
    if entry is not None and request.generate_only:
        notify(f"{run.label} × {task}: cached ({len(entry['predictions'])} rows)")
        return PairResult(run.model, task, key, len(entry["predictions"]), {}, True, entry["seconds_generate"], 0.0,
                          str(path), run.seed, {}, {}, entry["predictions"], entry["versions"])
    if entry is not None and not request.rescore and entry["scores"] is not None:
        notify(f"{run.label} × {task}: cached ({len(entry['predictions'])} rows)")
        logger.info("cache hit %s x %s: %s", run.label, task, path)
        return PairResult(run.model, task, key, len(entry["predictions"]), entry["scores"], True,
                          entry["seconds_generate"], entry["seconds_score"], str(path), run.seed,
                          entry["row_scores"], entry["scoring_settings"], entry["predictions"], entry["versions"])
    if entry is not None:
        predictions, seconds_generate, cached = entry["predictions"], entry["seconds_generate"], True
        versions = entry["versions"]
    else:
        notify(f"{run.label} × {task}: generating {len(test)} rows")
        loaded = replace(model.get(), settings=settings, name=run.label)  # name: progress-bar label
        started = time.perf_counter()  # after loading: load time is reported on its own
        predictions = backend.generate(loaded, test["prompt"].tolist(), max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size, progress=progress)
        seconds_generate, cached = time.perf_counter() - started, False
        versions = manifest.loaded_versions()
    if len(predictions) != len(test):
        raise WorkflowError(f"{run.label} x {task}: {len(predictions)} predictions for {len(test)} rows. "
                            f"Fix: report this bug in eval.generate")
    saved_settings = settings_key(settings) if settings is not None else entry["settings"]  # type: ignore[index]
    if request.generate_only:  # scores None: a later run scores these predictions
        atomic_write_json(path, {"format": CACHE_FORMAT, "model": run.label, "task": task, "key": key,
                                 "settings": saved_settings, "max_rows": request.max_rows,
                                 "predictions": list(predictions), "scores": None, "row_scores": None,
                                 "scoring_settings": None, "versions": versions,
                                 "seconds_generate": seconds_generate, "seconds_score": 0.0})
        return PairResult(run.model, task, key, len(predictions), {}, False, seconds_generate, 0.0, str(path),
                          run.seed, {}, {}, list(predictions), versions)
    started = time.perf_counter()
    scored = backend.score(task, test, predictions, resources)
    seconds_score = time.perf_counter() - started
    scores = {k: float(v) for k, v in scored.metrics.items()}
    row_scores = {k: [float(x) for x in v] for k, v in scored.per_row.items()}
    logger.info("%s x %s: %s (generate %.1f s, score %.1f s)", run.label, task, scores, seconds_generate,
                seconds_score)
    atomic_write_json(path, {"format": CACHE_FORMAT, "model": run.label, "task": task, "key": key,
                             "settings": saved_settings, "max_rows": request.max_rows,
                             "predictions": list(predictions), "scores": scores, "row_scores": row_scores,
                             "scoring_settings": dict(scored.settings), "versions": versions,
                             "seconds_generate": seconds_generate, "seconds_score": seconds_score})
    return PairResult(run.model, task, key, len(predictions), scores, cached, seconds_generate, seconds_score,
                      str(path), run.seed, row_scores, dict(scored.settings), list(predictions), versions)


def probe_key(identity: str, probe: Probe) -> str:
    """The cache key of one model's perplexity on one probe (its texts, not its name)."""
    return _digest([json.dumps({"format": CACHE_FORMAT, "model": identity, "texts": list(probe.texts)})])


def _run_probe(request: EvalRequest, backend: Backend, run: Run, identity: str, probe: Probe,
               model: _LazyModel, notify: Callable[[str], None]) -> ProbeResult:
    path = request.cache / "perplexity" / f"{probe_key(identity, probe)}.json"
    entry = read_cache(path)
    if entry is None:
        notify(f"{run.label}: perplexity on probe '{probe.name}' ({len(probe.texts)} texts)")
        measured = backend.text_nll(model.get(), list(probe.texts))
        entry = {"format": CACHE_FORMAT, "model": run.label, "probe": probe.name,
                 "nll": [float(v) for v in measured.nll], "tokens": [int(v) for v in measured.tokens]}
        atomic_write_json(path, entry)
    result = ProbeResult(run.model, probe.name, run.seed, entry["nll"], entry["tokens"])
    logger.info("%s: perplexity on %s = %.4f", run.label, probe.name, result.perplexity)
    return result


def _run_baseline(request: EvalRequest, backend: Backend, task: str, test: pd.DataFrame, test_hash: str,
                  resources: Any, notify: Callable[[str], None]) -> BaselineResult | None:
    """The task's trivial baseline (``eval.baselines``) from its train.csv, scored on the test rows; cached.
    None when the task has no training rows to build one from."""
    from prep.registry import TASKS

    train_path = request.prepared / task / "train.csv"
    key = _digest([json.dumps({"format": CACHE_FORMAT, "recipe": baseline_recipes.VERSION, "task": task,
                               "test": test_hash, "train": manifest.sha256(train_path),
                               "max_rows": request.max_rows})])
    path = request.cache / "baselines" / f"{key}.json"
    entry = read_cache(path)
    if entry is not None and not request.rescore:
        return BaselineResult(**entry["result"])
    notify(f"trivial baseline × {task}")
    primary, spec = backend.primary_metric[task], TASKS[task]
    train = baseline_recipes.read_train(train_path)

    def train_score(frame: pd.DataFrame, answers: list[str]) -> float:
        return backend.score(task, frame, answers, resources).metrics[primary]

    choice = baseline_recipes.choose(baseline_recipes.kind_of(primary), train, spec, train_score)
    if choice is None:
        return None
    predictions = baseline_recipes.answers(choice.candidate, test, spec)
    scored = backend.score(task, test, predictions, resources)
    result = BaselineResult(task, choice.candidate.name, str(train_path), choice.train_rows,
                            dict(choice.train_scores), choice.chance, {k: float(v) for k, v in scored.metrics.items()},
                            {k: [float(x) for x in v] for k, v in scored.per_row.items()}, predictions)
    atomic_write_json(path, {"format": CACHE_FORMAT, "result": asdict(result)})
    return result


def _run_lm_eval(request: EvalRequest, spec: ModelSpec, identity: str,
                 notify: Callable[[str], None]) -> dict[str, dict[str, float]]:
    key = _digest([json.dumps({"format": CACHE_FORMAT, "model": identity, "tasks": list(request.lm_eval_tasks),
                               "limit": request.lm_eval_limit})])
    path = request.cache / "lm_eval" / f"{key}.json"
    entry = read_cache(path)
    if entry is not None:
        return entry["results"]
    notify(f"{spec.name}: lm-eval {', '.join(request.lm_eval_tasks)}")
    results = run_lm_eval(request.base_model, spec.path, request.lm_eval_tasks, device=request.device,
                          limit=request.lm_eval_limit)
    atomic_write_json(path, {"format": CACHE_FORMAT, "model": spec.name, "results": results})
    return results
