"""The task registry: one entry per dataset module. Adding a dataset = one module in prep/ + one line here.

Tasks declared in a few lines of YAML (``prep/custom/*.yaml``, see prep/custom_task.py) are registered too, so a
new dataset in an existing format needs no Python at all.
"""

from __future__ import annotations

from prep import banking77, commonsense_qa, gpteacher, lamini_docs, paradetox, samsum, spider, sql_create_context
from prep.common import PrepError
from prep.custom_task import load_custom_tasks
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

# Folder names of the published datasets under one data root (``python -m prep all --source <root>``).
SOURCE_FOLDERS: dict[str, str] = {
    "instruct": "gpteacher", "detox": "paradetox", "sql": "sql_create_context", "spider": "spider",
    "banking77": "banking77", "commonsense_qa": "commonsense_qa", "samsum": "samsum", "lamini_docs": "lamini_docs",
}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``, or an error that lists the known tasks."""
    if name not in TASKS:
        raise PrepError(name, "unknown task", f"use one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]
