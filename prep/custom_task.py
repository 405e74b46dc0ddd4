"""Bring your own data: a task declared in a few lines of YAML, for any CSV / JSONL / JSON / Parquet / hub dataset.

A spec maps a dataset's columns to the instruction format; no Python is needed unless the format is truly new::

    name: claims                                   # task name
    hub_name: infinite-dataset-hub/TextClaimsDataset   # loaded with `datasets` when --source is not a local path
    template: "### Task: Is this text a claim?\\n### Text:\\n{text}\\n### Answer:\\n"
    response: label                                # the column holding the target
    fields: {text: text}                           # optional: template field -> column (default: same names)
    group_by: [text]                               # optional: split key columns (default: the template fields)
    test_fraction: 0.1                             # optional (default 0.05; validation_fraction likewise)
    ludwig_config: claims.yaml                     # optional: its YAML in ludwig_configs/ (default: <name>.yaml)
    scorer: text                                   # optional: eval's scorer kind (default: text, free text)
    primary_metric: rougeL                         # optional: the retention matrix's metric (default: rougeL)

Specs in ``prep/custom/*.yaml`` are registered as tasks; ``python -m prep --spec my.yaml`` loads one from anywhere.
Each becomes a :class:`~prep.task.TaskSpec`, the same record a built-in task has (no source folder: ``prep all``
reads built-in datasets only).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from prep.common import PrepError, SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import DEFAULT_METRIC, DEFAULT_SCORER, RESPONSE, TaskSpec

CUSTOM_DIR = Path(__file__).resolve().parent / "custom"
_REQUIRED = ("name", "template", "response")


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def spec_from_dict(raw: Mapping[str, Any], where: str) -> TaskSpec:
    """Build a TaskSpec from a parsed YAML spec, checking it with one-line errors."""
    missing = [key for key in _REQUIRED if not raw.get(key)]
    if missing:
        raise PrepError(where, f"missing key(s) {', '.join(missing)}", f"a task spec needs {', '.join(_REQUIRED)}")
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
        test_fraction=float(raw.get("test_fraction", 0.05)),
        validation_fraction=float(raw.get("validation_fraction", 0.05)),
        hub_split=raw.get("hub_split"),
        ludwig_config=str(raw.get("ludwig_config") or f"{raw['name']}.yaml"),
        scorer=str(raw.get("scorer", DEFAULT_SCORER)),
        primary_metric=str(raw.get("primary_metric", DEFAULT_METRIC)),
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
    return spec_from_dict(raw, str(p))


def load_custom_tasks(folder: Path = CUSTOM_DIR) -> list[TaskSpec]:
    return [load_spec(p) for p in sorted(folder.glob("*.yaml"))]
