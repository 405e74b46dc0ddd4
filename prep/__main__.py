"""``python -m prep``: prepare instruction CSVs for fine-tuning and evaluation.

  python -m prep <task> [--source <hub name | file | folder>] --out <dir>
  python -m prep all --source <folder with one sub-folder per dataset> --out <dir>
  python -m prep mix --tasks sql:2000 detox:2000 instruct:1000 --prepared <dir> --out <dir>
  python -m prep --spec my_task.yaml [--source ...] --out <dir>        (bring your own data)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from prep.common import PrepError, PrepReport
from prep.custom_task import load_spec
from prep.mix import build_mixture, parse_caps
from prep.registry import TASKS, get_task
from prep.task import TaskSpec, prepare


def summary_table(reports: list[PrepReport]) -> Table:
    table = Table(title="prep summary")
    for col in ("task", "rows in", "train", "validation", "test", "dropped", "seconds"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in reports:
        table.add_row(r.task, str(r.rows_in), str(r.rows_out.get("train", 0)), str(r.rows_out.get("validation", 0)),
                      str(r.rows_out.get("test", 0)), str(sum(r.dropped.values())), f"{r.seconds:.1f}")
    return table


def _progress(name: str):
    return lambda rows: tqdm(rows, desc=f"prep {name}", unit="row", leave=False)


def prepare_all(root: Path, out: Path, max_rows: int | None, strict: bool) -> list[PrepReport]:
    """Every task with a source folder (its record's) whose published folder exists under ``root``."""
    reports = []
    for name, spec in TASKS.items():
        if spec.source_folder is None:
            continue
        folder = root / spec.source_folder
        if not folder.exists():
            print(f"skip {name}: no folder {folder}", file=sys.stderr)
            continue
        reports.append(prepare(spec, str(folder), out, max_rows=max_rows, progress=_progress(name), strict=strict))
    return reports


def run(args: argparse.Namespace) -> list[PrepReport]:
    if args.max_rows is not None and args.max_rows < 1:
        raise PrepError(f"--max-rows {args.max_rows}", "must be at least 1", "pass a positive number of rows")
    if args.task == "mix":
        return [build_mixture(args.prepared or args.out, parse_caps(args.tasks), args.out, args.test_cap)]
    if args.task == "all":
        if not args.source:
            raise PrepError("all", "--source is required", "pass the folder that holds one folder per dataset")
        return prepare_all(Path(args.source), args.out, args.max_rows, args.strict)
    spec: TaskSpec = load_spec(args.spec) if args.spec else get_task(args.task)
    source = args.source or spec.hub_name
    return [prepare(spec, source, args.out, max_rows=args.max_rows, progress=_progress(spec.name),
                    strict=args.strict)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("task", nargs="?", default="", help=f"all, mix, or one of: {', '.join(sorted(TASKS))}")
    parser.add_argument("--source", help="hub dataset name, local file, or folder (default: the task's hub name)")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output folder (default: %(default)s)")
    parser.add_argument("--max-rows", type=int, help="read at most this many source rows (quick runs): the first "
                        "rows of each official split, in proportion to the splits' sizes")
    parser.add_argument("--strict", action="store_true", help="stop at the first empty field instead of dropping")
    parser.add_argument("--spec", type=Path, help="a task spec YAML (bring your own data), instead of a task name")
    parser.add_argument("--tasks", nargs="+", default=[], help="mix: task[:max_train_rows] ...")
    parser.add_argument("--prepared", type=Path, help="mix: folder of prepared tasks (default: --out)")
    parser.add_argument("--test-cap", type=int, help="mix: at most this many test rows per task")
    args = parser.parse_args(argv)
    if not args.task and not args.spec:
        parser.error("name a task, 'all', 'mix', or pass --spec")
    try:
        reports = run(args)
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console = Console()
    console.print(summary_table(reports))
    for r in reports:
        if r.max_rows is not None and r.read is not None:
            console.print(f"{r.task}: --max-rows {r.max_rows} read {r.read.describe()} (the first rows of each "
                          "source split, in proportion to its size)", highlight=False)
        console.print(f"{r.task}: dropped {r.dropped_text()}; wrote {r.files['train']}, {r.files['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
