"""The task registry: one entry per dataset module. Adding a dataset = one module in prep/ + one line here."""

from __future__ import annotations

from prep import sql_create_context
from prep.task import TaskSpec

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    sql_create_context.TASK,
)}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``, or an error that lists the known tasks."""
    from prep.common import PrepError

    if name not in TASKS:
        raise PrepError(name, "unknown task", f"use one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]
