"""``python -m prep <task|all> --source <hub name | file | folder> --out <dir>``: prepare instruction CSVs.

For ``all``, ``--source`` is a folder holding one sub-folder per task (named as the task), e.g. ``../shared/data``
style layouts; a task with no sub-folder there is skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from prep.common import PrepError, PrepReport
from prep.registry import TASKS, get_task
from prep.task import prepare


def summary_table(reports: list[PrepReport]) -> Table:
    table = Table(title="prep summary")
    for col in ("task", "rows in", "train", "validation", "test", "dropped", "seconds"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in reports:
        table.add_row(r.task, str(r.rows_in), str(r.rows_out.get("train", 0)), str(r.rows_out.get("validation", 0)),
                      str(r.rows_out.get("test", 0)), str(sum(r.dropped.values())), f"{r.seconds:.1f}")
    return table


def run(task: str, source: str | None, out: Path, max_rows: int | None, folder_names: dict[str, str]) -> list[PrepReport]:
    names = sorted(TASKS) if task == "all" else [task]
    reports = []
    for name in names:
        spec = get_task(name)
        if task == "all":
            sub = Path(source) / folder_names.get(name, name) if source else None
            if sub is None or not sub.exists():
                print(f"skip {name}: no folder {sub}", file=sys.stderr)
                continue
            task_source = str(sub)
        else:
            task_source = source or spec.hub_name
        bar = lambda rows, n=name: tqdm(rows, desc=f"prep {n}", unit="row", leave=False)  # noqa: E731
        reports.append(prepare(spec, task_source, out, max_rows=max_rows, progress=bar))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prep", description=__doc__.splitlines()[0])
    parser.add_argument("task", help=f"one of: all, {', '.join(sorted(TASKS))}")
    parser.add_argument("--source", help="hub dataset name, local file, or folder (default: the task's hub name)")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output folder (default: %(default)s)")
    parser.add_argument("--max-rows", type=int, help="read at most this many source rows (quick runs)")
    args = parser.parse_args(argv)
    try:
        reports = run(args.task, args.source, args.out, args.max_rows, folder_names={"sql": "sql_create_context"})
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console = Console()
    console.print(summary_table(reports))
    for r in reports:
        reasons = ", ".join(f"{k}: {v}" for k, v in r.dropped.items()) or "none"
        console.print(f"{r.task}: dropped {reasons}; wrote {r.files['train']}, {r.files['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
