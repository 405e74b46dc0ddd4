"""Bring your own data: a task declared in a few lines of YAML, for any CSV / JSONL / JSON / Parquet / hub dataset.

A spec maps a dataset's columns to the instruction format; no Python is needed unless the format is truly new::

    name: claims                                   # task name
    hub_name: infinite-dataset-hub/TextClaimsDataset   # loaded with `datasets` when --source is not a local path
    template: "### Task: Is this text a claim?\\n### Text:\\n{text}\\n### Answer:\\n"
    response: label                                # the column holding the target
    fields: {text: text}                           # optional: template field -> column (default: same names)
    group_by: [text]                               # optional: split key columns (default: the template fields)
    test_fraction: 0.1                             # optional (default 0.05; validation_fraction likewise)
    metric: accuracy                               # optional: accuracy (label answers) or rougeL (free text,
                                                   # the default): how eval scores it
    ludwig_config: claims.yaml                     # optional: its YAML, a path relative to the spec or a file in
                                                   # ludwig_configs/ (default: <name>.yaml)
    scorer: text                                   # optional, instead of metric: eval's scorer kind
    primary_metric: rougeL                         # optional, instead of metric: the retention matrix's metric

Specs in ``prep/custom/*.yaml`` are registered as tasks; ``python -m prep --spec my.yaml`` and ``python -m eval
--spec my.yaml`` load one from anywhere. Each becomes a :class:`~prep.task.TaskSpec`, the same record a built-in
task has (no source folder: ``prep all`` reads built-in datasets only). An unknown key is refused with the closest
known one, so a typo (``test_fration``) never leaves a default in place silently.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from prep.common import PrepError, SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import DEFAULT_METRIC, DEFAULT_SCORER, RESPONSE, TaskSpec

CUSTOM_DIR = Path(__file__).resolve().parent / "custom"
_REQUIRED = ("name", "template", "response")
KEYS = (*_REQUIRED, "hub_name", "hub_split", "fields", "group_by", "test_fraction", "validation_fraction", "metric",
        "ludwig_config", "scorer", "primary_metric")
#: ``metric:`` -> (eval's scorer kind, primary metric): exact-match accuracy over the labels of the training
#: split's responses (eval/scoring.py), or ROUGE-L for free text
METRICS: dict[str, tuple[str, str]] = {"accuracy": ("labels", "accuracy"),
                                       DEFAULT_METRIC: (DEFAULT_SCORER, DEFAULT_METRIC)}


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_keys(raw: Mapping[str, Any], where: str) -> None:
    """Refuse a key the spec format does not have, naming the closest known one."""
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PrepError(where, f"unknown key '{key}'{hint}", f"use the known keys: {', '.join(KEYS)}")


def scoring_of(raw: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(scorer kind, primary metric) from ``metric:``, or from ``scorer:`` / ``primary_metric:`` (default: free
    text, ROUGE-L)."""
    if "metric" not in raw:
        return str(raw.get("scorer", DEFAULT_SCORER)), str(raw.get("primary_metric", DEFAULT_METRIC))
    if "scorer" in raw or "primary_metric" in raw:
        raise PrepError(where, "both metric and scorer/primary_metric are set", "keep metric only")
    metric = str(raw["metric"])
    if metric not in METRICS:
        raise PrepError(where, f"metric '{metric}' is not supported",
                        "use metric: accuracy (answers are labels) or metric: rougeL (free text)")
    return METRICS[metric]


def fraction(raw: Mapping[str, Any], key: str, default: float, where: str) -> float:
    """A split fraction in [0, 1), with a one-line error for anything else."""
    value = raw.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not 0 <= number < 1 or (key == "test_fraction" and number == 0):
        low = "0 <" if key == "test_fraction" else "0 <="
        raise PrepError(where, f"{key} {value!r} is out of range", f"use a number with {low} {key} < 1")
    return number


def config_reference(raw: Mapping[str, Any], spec_path: Path | None) -> str:
    """The spec's ``ludwig_config``: when given and a file next to the spec, its absolute path (a bring-your-own
    task keeps its YAML beside its spec); else a name in ``ludwig_configs/`` (default ``<name>.yaml``)."""
    value = raw.get("ludwig_config")
    if not value:
        return f"{raw['name']}.yaml"
    beside = spec_path.parent / str(value) if spec_path is not None else None
    if beside is not None and beside.is_file() and beside.resolve() != spec_path.resolve():
        return str(beside.resolve())
    return str(value)


def spec_from_dict(raw: Mapping[str, Any], where: str, spec_path: Path | None = None) -> TaskSpec:
    """Build a TaskSpec from a parsed YAML spec, checking it with one-line errors."""
    check_keys(raw, where)
    missing = [key for key in _REQUIRED if not raw.get(key)]
    if missing:
        raise PrepError(where, f"missing key(s) {', '.join(missing)}", f"a task spec needs {', '.join(_REQUIRED)}")
    test_fraction = fraction(raw, "test_fraction", 0.05, where)
    validation_fraction = fraction(raw, "validation_fraction", 0.05, where)
    if test_fraction + validation_fraction >= 1:
        raise PrepError(where, "test_fraction + validation_fraction leave no training rows",
                        "keep their sum below 1")
    scorer, primary_metric = scoring_of(raw, where)
    template, response_col = str(raw["template"]), str(raw["response"])
    names = template_fields(template)
    columns: dict[str, str] = {name: name for name in names} | dict(raw.get("fields") or {})
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise PrepError(where, f"fields {unknown} are not used in the template", "add {field} to the template")
    group_by = list(raw.get("group_by") or names)

    def to_fields(row: SourceRow) -> dict[str, str]:
        fields = {name: require_text(row, column) for name, column in columns.items()}
        fields[RESPONSE] = require_text(row, response_col)
        return fields

    def group_key(fields: Mapping[str, str]) -> str:
        return normalise_key(*(fields.get(col, "") for col in group_by))

    return TaskSpec(
        name=str(raw["name"]),
        hub_name=str(raw.get("hub_name", "")),
        template=template,
        read_local=lambda path: read_file_or_folder(path),
        to_fields=to_fields,
        group_key=group_key,
        keep_columns=tuple(names),
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        hub_split=raw.get("hub_split"),
        ludwig_config=config_reference(raw, spec_path),
        scorer=scorer,
        primary_metric=primary_metric,
    )


def load_spec(path: str | Path) -> TaskSpec:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepError(str(p), "file not found", "pass an existing task spec YAML") from None
    except yaml.YAMLError as err:
        raise PrepError(str(p), f"invalid YAML ({str(err).splitlines()[0]})", "fix its syntax") from None
    if not isinstance(raw, dict):
        raise PrepError(str(p), "expected a mapping", "see prep/custom_task.py for the keys")
    return spec_from_dict(raw, str(p), p)


def load_custom_tasks(folder: Path = CUSTOM_DIR) -> list[TaskSpec]:
    return [load_spec(p) for p in sorted(folder.glob("*.yaml"))]
