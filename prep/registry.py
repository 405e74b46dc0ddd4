"""The task registry: one entry per dataset module. Adding a dataset = one module in prep/ (its TaskSpec record:
source folder, template, YAML, scorer, primary metric) + one line here + its YAML in ludwig_configs/.

Tasks declared in a few lines of YAML (``prep/custom/*.yaml``, see prep/custom_task.py) are registered too, so a
new dataset in an existing format needs no Python at all.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from ludwig_mt.config import config_file
from ludwig_mt.errors import WorkflowError
from prep import banking77, commonsense_qa, gpteacher, lamini_docs, paradetox, samsum, spider, sql_create_context
from prep.common import PrepError
from prep.custom_task import load_custom_tasks
from prep.mix import MIX_CONFIG, MIX_TASK
from prep.task import TaskSpec

BUILTIN: tuple[TaskSpec, ...] = (
    gpteacher.TASK,
    paradetox.TASK,
    sql_create_context.TASK,
    spider.TASK,
    banking77.TASK,
    commonsense_qa.TASK,
    samsum.TASK,
    lamini_docs.TASK,
)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (*BUILTIN, *load_custom_tasks())}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``, or an error that lists the known tasks."""
    if name not in TASKS:
        raise PrepError(name, "unknown task", f"use one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def config_path(name: str) -> Path:
    """The Ludwig YAML that trains ``name``: a task's own (its record), or the task mixture's (``prep mix``)."""
    if name in TASKS:
        return TASKS[name].config_path()
    if name == MIX_TASK:
        return config_file(MIX_CONFIG)
    raise WorkflowError(f"{name}: no such task. Fix: use one of: {', '.join(sorted([*TASKS, MIX_TASK]))}, "
                        "or a YAML path")


def owned_by_name(model_name: str, tasks: Collection[str]) -> tuple[str, ...]:
    """The tasks among ``tasks`` that a model called ``model_name`` owns by its name alone (the record's rule,
    :meth:`TaskSpec.owned_by`: ``--model sql=DIR`` owns sql); empty when its name is no task's."""
    return tuple(task for task in tasks if task in TASKS and TASKS[task].owned_by(model_name))
