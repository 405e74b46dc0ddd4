"""Load, validate and render the task YAMLs in ``ludwig_configs/``.

The YAML a GPU user runs is the file in ``ludwig_configs/`` exactly as committed. To run the same task on a CPU
or a small local model we never edit it: :func:`render_overrides` produces a copy with the few keys that must
change (base model, quantization off, a few steps) and every change is logged.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ludwig_mt.config_keys import check_keys, write_key_schema
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_text
from ludwig_mt.strategies import check_strategy_compatible, declared_backend
from ludwig_mt.tokens import LengthPlan, measure_lengths

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "ludwig_configs"


def config_file(name: str) -> Path:
    """``sql.yaml`` (or ``sql``) -> ``ludwig_configs/sql.yaml``; a clear error listing the YAMLs there otherwise.

    A file lookup, not a task lookup: which YAML trains which task is the task's record (``prep/task.py``).
    """
    path = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise WorkflowError(f"{path}: no such task config. Fix: use one of: {known}")
    return path


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with one-line errors for a missing file, bad syntax or a non-mapping document."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{p}: file not found. Fix: pass an existing YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f": line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise WorkflowError(f"{p}{at}: invalid YAML ({problem}). Fix: correct the syntax there") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{p}: expected a mapping of Ludwig config keys, got {type(data).__name__}")
    return data


def validate(config: dict[str, Any], source: str = "config", *, base_model: str | None = None) -> None:
    """Validate with Ludwig's own schema: its JSON schema on the file as written, then the full model config.

    The full check (marshmallow/pydantic + cross-field rules) loads the base model's ``config.json``; pass a local
    ``base_model`` folder to run it without reaching the Hugging Face Hub (everything else stays as written).
    """
    from ludwig.config_validation.validation import check_schema
    from ludwig.error import ConfigValidationError
    from ludwig.schema.model_types.base import ModelConfig

    full = copy.deepcopy(config)
    if base_model is not None:
        full["base_model"] = str(base_model)
    try:
        check_schema(copy.deepcopy(config))
        ModelConfig.from_dict(full)
    except ConfigValidationError as err:
        raise WorkflowError(f"{source}: rejected by Ludwig's schema: {err}") from None
    check_backend_section(config, source)


def check_backend_section(config: Mapping[str, Any], source: str = "config") -> None:
    """The ``backend:`` section is the project's (Ludwig's schema takes any dict there): its keys and values, and a
    declared strategy against the rest of the config (ZeRO-3/FSDP with 4-bit refused), each a one-line error."""
    declared = declared_backend(config, source)
    if declared.strategy:
        try:
            check_strategy_compatible(declared.strategy, config)
        except WorkflowError as err:
            raise WorkflowError(f"{source}: backend.trainer.strategy: {err}") from None


def for_raw_ludwig(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy Ludwig runs without the project's patches (``LUDWIG_MT_NO_FIXES=1``): ``backend.trainer`` removed,
    since raw ``LocalBackend`` fails on it (the regression tests and the raw benchmarks)."""
    out = copy.deepcopy(dict(config))
    if isinstance(out.get("backend"), dict):
        out["backend"] = {k: v for k, v in out["backend"].items() if k != "trainer"}
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def feature_column(config: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """The dataset column of the config's first ``input_features`` / ``output_features`` entry, and its
    preprocessing section."""
    features = config.get(key) or []
    if not features or not isinstance(features[0], dict) or "name" not in features[0]:
        raise WorkflowError(f"the config has no {key}. Fix: give it one text feature with a name")
    feature = features[0]
    return str(feature.get("column") or feature["name"]), dict(feature.get("preprocessing") or {})


def measured_lengths(config: dict[str, Any], base_model: str, dataset: str | Path) -> LengthPlan:
    """Sequence lengths that fit ``base_model`` for the rows of ``dataset`` (the CSV being trained: prompt and
    response columns as the config's features name them), measured with the model's own tokenizer."""
    import pandas as pd

    path = Path(dataset)
    if not path.is_file():
        raise WorkflowError(f"{path}: dataset not found (its rows set the sequence lengths for {base_model}). "
                            "Fix: run ./run.sh prep first or pass --dataset")
    (prompt, preprocessing), (response, _) = feature_column(config, "input_features"), \
        feature_column(config, "output_features")
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise WorkflowError(f"{path}: unreadable CSV ({str(err).splitlines()[0]}). Fix: re-run ./run.sh prep") from None
    missing = [c for c in (prompt, response) if c not in frame.columns]
    if missing:
        raise WorkflowError(f"{path}: no column {', '.join(missing)} (the config's features). Fix: pass a CSV "
                            "prepared by ./run.sh prep, or name the columns in the config")
    return measure_lengths(base_model, list(frame[prompt]), list(frame[response]),
                           lowercase=bool(preprocessing.get("lowercase", False)), source=str(path),
                           configured_input=preprocessing.get("max_sequence_length"),
                           configured_new_tokens=(config.get("generation") or {}).get("max_new_tokens"),
                           configured_global=(config.get("preprocessing") or {}).get("global_max_sequence_length"))


def fit_lengths(config: dict[str, Any], plan: LengthPlan) -> dict[str, Any]:
    """A copy of ``config`` with the sequence lengths of ``plan``: input and output ``max_sequence_length``,
    ``generation.max_new_tokens`` and ``preprocessing.global_max_sequence_length``. Pure."""
    out = copy.deepcopy(config)
    for key, length in (("input_features", plan.input_max), ("output_features", plan.output_max)):
        for feature in out.get(key) or []:
            feature.setdefault("preprocessing", {})["max_sequence_length"] = length
    out.setdefault("generation", {})["max_new_tokens"] = plan.max_new_tokens
    out.setdefault("preprocessing", {})["global_max_sequence_length"] = plan.global_max
    return out


def render_overrides(
    config: dict[str, Any],
    *,
    base_model: str | None = None,
    cpu: bool = False,
    epochs: int | None = None,
    batch_size: int | None = None,
    max_sequence_length: int | None = None,
    max_new_tokens: int | None = None,
    dataset: str | Path | None = None,
    notify: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """A copy of ``config`` with run-specific overrides; the input dict is not modified.

    ``cpu=True`` removes ``quantization`` (bitsandbytes 4-bit needs CUDA, see ludwig_mt.patches.fixes), drops paged
    optimizers (CUDA-only) and gradient checkpointing (no memory pressure on tiny CPU runs).

    ``base_model`` with ``dataset`` (the CSV to be trained): the YAML's sequence lengths count another tokenizer's
    tokens, so they are measured again with ``base_model``'s tokenizer on the dataset's rows and fitted to its
    context (:func:`ludwig_mt.tokens.plan_lengths`; refused in one line when even the responses do not fit); the
    numbers go to ``notify`` (the terminal) and the log. Explicit ``max_sequence_length`` / ``max_new_tokens``
    still win.
    """
    out = copy.deepcopy(config)
    trainer = out.setdefault("trainer", {})
    if base_model is not None:
        logger.info("override base_model: %s -> %s", config.get("base_model"), base_model)
        out["base_model"] = str(base_model)
        if dataset is not None:
            plan = measured_lengths(config, str(base_model), dataset)
            out = fit_lengths(out, plan)
            trainer = out.setdefault("trainer", {})
            line = f"{Path(str(base_model)).name or base_model}: {plan.describe()}"
            logger.info("%s", line)
            notify(line)
        else:
            logger.info("base_model %s: sequence lengths kept from the YAML (no dataset given to measure)", base_model)
    if cpu:
        if out.pop("quantization", None) is not None:
            logger.warning("CPU run: quantization removed (bitsandbytes 4-bit needs a CUDA GPU)")
        if str(trainer.get("optimizer", {}).get("type", "")).startswith("paged_"):
            trainer["optimizer"] = {"type": "adamw"}
            logger.info("CPU run: paged optimizer replaced by adamw")
        trainer["enable_gradient_checkpointing"] = False
    if epochs is not None:
        trainer["epochs"] = epochs
    if batch_size is not None:
        trainer["batch_size"] = batch_size
        trainer["eval_batch_size"] = batch_size
        trainer["gradient_accumulation_steps"] = 1
    if max_sequence_length is not None:
        for feature in out.get("input_features", []) + out.get("output_features", []):
            feature.setdefault("preprocessing", {})["max_sequence_length"] = max_sequence_length
        out.setdefault("preprocessing", {})["global_max_sequence_length"] = 2 * max_sequence_length
    if max_new_tokens is not None:
        out.setdefault("generation", {})["max_new_tokens"] = max_new_tokens
    return out


#: checkpoints per epoch ``./run.sh train`` asks for when the YAML sets neither ``steps_per_checkpoint`` nor
#: ``checkpoints_per_epoch`` (Ludwig's default is one, at the epoch's end: a 1-epoch run could not resume at all);
#: each checkpoint also evaluates the validation set, so not more
CHECKPOINTS_PER_EPOCH = 4


def with_checkpoint_default(config: dict[str, Any], train_rows: int, processes: int = 1) -> dict[str, Any]:
    """A copy of ``config`` with ``trainer.steps_per_checkpoint`` = a quarter of an epoch's steps (each of
    ``processes`` ranks trains ``train_rows / processes`` rows), unless the YAML chooses its checkpoints itself or
    an epoch has fewer than 2 x :data:`CHECKPOINTS_PER_EPOCH` steps (then Ludwig's one per epoch is often enough).
    Pure."""
    trainer = config.get("trainer") or {}
    batch = trainer.get("batch_size", 1)
    if trainer.get("steps_per_checkpoint") or trainer.get("checkpoints_per_epoch") or not isinstance(batch, int):
        return config
    steps_per_epoch = -(-(-(-train_rows // max(processes, 1))) // batch)
    if steps_per_epoch < 2 * CHECKPOINTS_PER_EPOCH:
        return config
    out = copy.deepcopy(config)
    out.setdefault("trainer", {})["steps_per_checkpoint"] = steps_per_epoch // CHECKPOINTS_PER_EPOCH
    logger.info("trainer.steps_per_checkpoint: %d (%d per epoch of %d steps)", steps_per_epoch // CHECKPOINTS_PER_EPOCH,
                CHECKPOINTS_PER_EPOCH, steps_per_epoch)
    return out


def write_yaml(config: dict[str, Any], path: str | Path, header: str = "") -> Path:
    p = Path(path)
    atomic_write_text(p, header + yaml.safe_dump(config, sort_keys=False))
    return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate a task YAML, or render a copy with overrides.")
    parser.add_argument("config", nargs="?", help="a YAML file, or the name of one in ludwig_configs/")
    parser.add_argument("--write-key-schema", action="store_true", help="regenerate ludwig_mt/ludwig_llm_keys.json "
                        "(the keys the project's key check allows) from the installed Ludwig's schema")
    parser.add_argument("--out", type=Path, help="write the rendered YAML here")
    parser.add_argument("--cpu", action="store_true", help="drop quantization and CUDA-only settings")
    parser.add_argument("--base-model", help="a local model folder or hub name to use instead")
    parser.add_argument("--dataset", type=Path, help="with --base-model: the CSV to be trained, whose rows set the "
                        "sequence lengths through that model's tokenizer")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    args = parser.parse_args(argv)
    if args.write_key_schema:
        print(write_key_schema())
        return
    if args.config is None:
        parser.error("give a YAML file or a task name (or --write-key-schema)")
    path = Path(args.config) if args.config.endswith((".yaml", ".yml")) else config_file(args.config)
    if args.base_model and args.dataset is None and args.max_sequence_length is None:
        _stderr(f"note: sequence lengths kept from {path}, which counts another tokenizer's tokens; pass --dataset "
                "<train.csv> to measure them with the base model's tokenizer")
    loaded = load_yaml(path)
    check_keys(loaded, str(path))
    config = render_overrides(
        loaded, base_model=args.base_model, cpu=args.cpu, epochs=args.epochs,
        batch_size=args.batch_size, max_sequence_length=args.max_sequence_length,
        max_new_tokens=args.max_new_tokens, dataset=args.dataset,
    )
    validate(config, str(path), base_model=args.base_model)
    if args.out:
        write_yaml(config, args.out, header=f"# Rendered from {path} by python -m ludwig_mt.config; do not edit.\n")
        print(args.out)
    else:
        print(f"{path}: valid")


if __name__ == "__main__":
    try:
        main()
    except WorkflowError as err:
        raise SystemExit(f"error: {err}") from None
