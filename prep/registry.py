"""The task registry: one entry per dataset module. Adding a dataset = one module in prep/ (its TaskSpec record:
source folder, template, YAML, scorer, primary metric) + one line here + its YAML in ludwig_configs/.

Tasks declared in a few lines of YAML (``prep/custom/*.yaml``, see prep/custom_task.py) are registered too, so a
new dataset in an existing format needs no Python at all.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from ludwig_mt.config import config_file
from ludwig_mt.errors import WorkflowError
from prep import (
    banking77,
    commonsense_qa,
    gpteacher,
    lamini_docs,
    paradetox,
    samsum,
    spider,
    sql_create_context,
    tinystories,
)
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
    tinystories.TASK,
)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (*BUILTIN, *load_custom_tasks())}


@contextlib.contextmanager
def registered(specs: Sequence[TaskSpec], where: Sequence[str] = ()) -> Iterator[None]:
    """Inside the block, bring-your-own tasks (specs given on a command line, e.g. ``eval --spec``) are tasks
    like any other in :data:`TASKS`; afterwards the registry is as it was.

    A spec may replace a ``prep/custom/`` task of its name (the file given wins), never a built-in task, and two
    specs may not share a name. ``where`` names each spec's file for the errors.
    """
    builtin = {spec.name for spec in BUILTIN}
    names = [spec.name for spec in specs]
    for i, spec in enumerate(specs):
        origin = where[i] if i < len(where) else spec.name
        if spec.name in builtin:
            raise PrepError(origin, f"task name '{spec.name}' is a built-in task", "give the spec another name")
        if names.count(spec.name) > 1:
            raise PrepError(origin, f"task name '{spec.name}' is given by two specs", "give each spec its own name")
    saved = {name: TASKS[name] for name in names if name in TASKS}
    TASKS.update({spec.name: spec for spec in specs})
    try:
        yield
    finally:
        for name in names:
            TASKS.pop(name, None)
        TASKS.update(saved)


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
    known = sorted([*TASKS, MIX_TASK])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise WorkflowError(f"{name}: no such task. Fix: {hint}use one of: {', '.join(known)}, or a YAML path")


def owned_by_name(model_name: str, tasks: Collection[str]) -> tuple[str, ...]:
    """The tasks among ``tasks`` that a model called ``model_name`` owns by its name alone (the record's rule,
    :meth:`TaskSpec.owned_by`: ``--model sql=DIR`` owns sql); empty when its name is no task's."""
    return tuple(task for task in tasks if task in TASKS and TASKS[task].owned_by(model_name))
