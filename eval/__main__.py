"""Score the base model and every adapter on every task's held-out set; write a retention report.

Run as ``python -m eval`` or ``./run.sh eval``:

  python -m eval --base-model Qwen/Qwen2.5-1.5B-Instruct \\
      --model sql=results/sql/experiment_run/model --model detox=results/detox/experiment_run/model \\
      --model multitask=results/multitask/experiment_run/model \\
      --prepared data/prepared --tasks sql,detox --name qwen-sql-detox

Writes reports/<name>/report.md, report.json, retention.png and eval.log. Every (model, task) pair is cached
under <out>/.cache, so adding one adapter only computes that adapter's pairs. Every cell carries a 95 % bootstrap
interval and its n, every task a trivial baseline built from its train.csv (see eval/stats.py, eval/baselines.py).

Seeds: --model sql=DIR1,DIR2 evaluates each folder (one trained seed each) and reports their mean, the spread
between seeds and whether they repeat within ±2 %.

Bring your own task: --spec my_task.yaml (the spec given to ./run.sh prep --spec; repeatable) registers its task
for this run and adds it to --tasks; it is scored by the spec's metric (metric: accuracy = exact-match accuracy over
the labels of its training split, <prepared>/<task>/train.csv; default rougeL) and generates under the YAML its
spec names (ludwig_config, beside the spec or in ludwig_configs/) or its single-task adapter's saved config.

Split runs: --generate-only generates every pair and probe and scores nothing: <out>/<name>/generations/ and
identities.json (model, seed, task, rows, settings, cache key of each generation; needs none of the scoring
libraries: the GPU image lacks them). --score-only DIR scores such a folder on another machine into the normal
report (no model is loaded; --prepared must hold the same test.csv files, checked by sha256; --name and
--base-model default to the recorded ones).

Which tasks an adapter owns (its "own" tasks in the summary): --owns NAME=t1,t2 when given; else its name when
that is a task (--model sql=DIR owns sql); else a merged adapter's tasks (its merge.json, ./run.sh merge); else the
tasks in its training data's `task` column (the multitask mixture has one, found through Ludwig's description.json
next to the model folder).

Choosing settings (merge weights, ...): --split validation scores the validation rows of <prepared>/<task>/train.csv
(split 1) instead of test.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eval.formatting import LEGEND, fmt_change
from eval.report import (
    LOG_FILE,
    logging_to,
    matrix_table,
    merges_table,
    notes,
    perplexity_table,
    seeds_table,
    summary_table,
    write_report,
)
from eval.runner import (
    EvalRequest,
    EvalResult,
    Probe,
    model_spec,
    parse_assignment,
    read_probe,
    run_eval,
    validate_request,
)
from ludwig_mt.errors import WorkflowError
from prep.common import PrepError

BUILTIN_PROBE = "builtin"  # the former name of the quick probe, still accepted


def split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base-model", help="local model folder or hub name (the adapters' base); required "
                                              "unless --score-only")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                        help="a trained Ludwig model folder (<output_directory>/<experiment>_run/model); several "
                             "comma-separated folders = the same adapter trained with different seeds; repeat")
    parser.add_argument("--owns", action="append", default=[], metavar="NAME=TASK,TASK",
                        help="the tasks model NAME was trained on (default: see the rule below)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"),
                        help="prepared data folder with <task>/test.csv (default: %(default)s)")
    parser.add_argument("--tasks", type=split_list, default=(),
                        help="comma-separated tasks, e.g. sql,detox (--spec tasks are added)")
    parser.add_argument("--spec", action="append", default=[], type=Path, metavar="FILE",
                        help="a bring-your-own task spec YAML (as given to ./run.sh prep --spec): its task is "
                             "registered for this run, scored by the spec's metric, and evaluated; repeat")
    parser.add_argument("--name", help="report name: writes <out>/<name>/ (required unless --score-only)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, help="pair cache (default: <out>/.cache)")
    parser.add_argument("--max-rows", type=int, help="score only the first N test rows of each task")
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="rows to score: test.csv (default), or the validation rows of train.csv (split 1), "
                             "to choose settings such as merge weights without touching the test set")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME|FILE",
                        help="probe for perplexity: a shipped one by name (general = 416 WikiText-2 test paragraphs, "
                             "the default; tinystories = 378 TinyStories validation stories; quick = 10 paragraphs, "
                             "a smoke test; see eval/probes/README.md) or a file (.txt paragraphs, .jsonl/.csv "
                             "'text'); best: held-out text from the base model's own domain; repeat")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity probes")
    parser.add_argument("--spider-dir", type=Path, help="Spider folder with database/ (execution match)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, help="generation batch size (default: eval.generate's)")
    parser.add_argument("--max-new-tokens", type=int, help="cap every task's max new tokens (quick runs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="generate with N processes sharing the device, one model at a time each (small "
                             "models leave a GPU idle; see eval/workers.py) (default: 1)")
    parser.add_argument("--rescore", action="store_true", help="re-score cached predictions (no generation)")
    parser.add_argument("--lm-eval-tasks", type=split_list, default=(),
                        help="lm-eval-harness tasks by name, e.g. hellaswag,arc_easy (needs lm-eval installed)")
    parser.add_argument("--lm-eval-limit", type=int, help="lm-eval: at most N examples per task")
    parser.add_argument("--chat-template", choices=("on", "off"), default="off",
                        help="wrap every prompt in the base tokenizer's chat template (an instruct model's format; "
                             "adapters were trained without it) (default: off); the report says which")
    parser.add_argument("--merge-lora", choices=("on", "off", "auto"), default="auto",
                        help="generate with the LoRA merged into bf16 weights (on) or kept apart on the trained "
                             "(4-bit) weights as ludwig predict does (off); auto: merged on CUDA only")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--generate-only", action="store_true",
                       help="generate and save every pair (generations/ + identities.json), score nothing")
    split.add_argument("--score-only", type=Path, metavar="DIR",
                       help="score the generations a --generate-only run saved in DIR (its report folder)")
    return parser


def probes_from_args(values: list[str], disabled: bool) -> tuple[Probe, ...]:
    if disabled:
        return ()
    from eval.perplexity import PROBES

    named = PROBES | {BUILTIN_PROBE: PROBES["quick"]}
    return tuple(read_probe(named.get(value, Path(value))) for value in values or ["general"])


def request_from_args(args: argparse.Namespace, spec_tasks: tuple[str, ...] = ()) -> EvalRequest:
    """Parse and check every argument; one-line WorkflowError on the first bad one. ``spec_tasks`` (the tasks of
    ``--spec`` files, registered by the caller) join ``--tasks``."""
    from prep.registry import TASKS

    for value, flag in ((args.base_model, "--base-model"), (args.name, "--name")):
        if not value:
            raise WorkflowError(f"{flag}: required. Fix: pass {flag} (or --score-only DIR)")
    if args.workers > 1 and args.spec:
        raise WorkflowError("--workers with --spec: worker processes know only the built-in tasks. "
                            "Fix: leave out --workers")
    if args.lm_eval_tasks and args.generate_only:
        raise WorkflowError("--lm-eval-tasks with --generate-only: lm-eval scores as it runs. Fix: run it apart")
    owns = {}
    for item in args.owns:
        name, tasks = parse_assignment(item, "--owns")
        owns[name] = split_list(tasks)
        unknown = [t for t in owns[name] if t not in TASKS]
        if unknown:
            raise WorkflowError(f"--owns {item}: unknown task {unknown[0]}. Fix: use one of: {', '.join(sorted(TASKS))}")
    models = []
    for item in args.model:
        name, value = parse_assignment(item, "--model")
        models.append(model_spec(name, value, list(TASKS), owns))
    for number, flag in ((args.max_rows, "--max-rows"), (args.batch_size, "--batch-size"),
                         (args.max_new_tokens, "--max-new-tokens"), (args.lm_eval_limit, "--lm-eval-limit"),
                         (args.workers, "--workers")):
        if number is not None and number < 1:
            raise WorkflowError(f"{flag} {number}: must be at least 1. Fix: pass a positive number")
    if args.spider_dir is not None and not args.spider_dir.is_dir():
        raise WorkflowError(f"--spider-dir {args.spider_dir}: folder not found. Fix: pass the Spider folder")
    return EvalRequest(
        name=args.name, base_model=args.base_model, models=tuple(models),
        tasks=(*args.tasks, *(t for t in spec_tasks if t not in args.tasks)), prepared=args.prepared,
        out=args.out, cache_dir=args.cache_dir, max_rows=args.max_rows,
        probes=probes_from_args(args.probe, args.no_perplexity), spider_dir=args.spider_dir, device=args.device,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, lm_eval_tasks=args.lm_eval_tasks,
        lm_eval_limit=args.lm_eval_limit, rescore=args.rescore, split=args.split, generate_only=args.generate_only,
        chat_template=args.chat_template == "on", merge_lora={"on": True, "off": False}.get(args.merge_lora),
    )


def rich_table(table: tuple[list[str], list[list[str]]], title: str) -> Table:
    """A report table for the terminal: no Markdown bold, and brackets shown as text (not rich markup)."""
    header, rows = table
    out = Table(title=escape(title), title_justify="left")
    for i, column in enumerate(header):
        out.add_column(escape(column), justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*[escape(cell.replace("**", "")) for cell in row])
    return out


def print_summary(result: EvalResult, paths: dict[str, Path], console: Console) -> None:
    """The one screen at the end: the matrix with intervals, the digests, perplexity, the notes, the report path."""
    ret = result.retention
    console.print(rich_table(matrix_table(result, bold_own=False),
                             "retention matrix: score [95 % CI] (change from base [paired 95 % CI]) n"))
    console.print(rich_table(summary_table(result), "summary per adapter"))
    merges = merges_table(result)
    if merges[1]:
        console.print(rich_table(merges, "merges against the single-task adapters and the mix"))
    if ret.seeds:
        console.print(rich_table(seeds_table(result), "seeds"))
    if result.probes:
        console.print(rich_table(perplexity_table(result), "general-text perplexity (lower is better)"))
    for line in notes(result):
        console.print(escape(f"- {line.replace('**', '')}"), highlight=False)
    legend = LEGEND.replace("**bold**", "bold (report.md)").replace("`", "")
    console.print(f"[dim]{escape(legend)}[/dim]", highlight=False)
    cached = sum(p.cached for p in result.pairs)
    console.print(escape(f"mean own-task gain {fmt_change(ret.mean_own_gain)}; mean other-task change "
                         f"{fmt_change(ret.mean_other_change)}; {len(result.pairs)} pairs ({cached} cached) in "
                         f"{result.timings.get('total', 0.0):.1f} s"), highlight=False)
    console.print(f"report: {paths['report.md']}  (+ report.json, retention.png, {LOG_FILE})")


def main(argv: list[str] | None = None) -> int:
    from prep.custom_task import load_spec
    from prep.registry import TASKS, registered

    args = build_parser().parse_args(argv)
    errors = Console(stderr=True)
    try:
        specs = tuple(load_spec(path) for path in args.spec)
        with registered(specs, [str(path) for path in args.spec]):
            if args.score_only is not None:
                from eval.saved import scoring_request

                request = scoring_request(args.score_only, prepared=args.prepared, out=args.out, name=args.name,
                                          cache_dir=args.cache_dir, spider_dir=args.spider_dir)
                if missing := request.saved.get("models_not_generated"):  # type: ignore[union-attr]
                    errors.print(f"[yellow]warning[/yellow]: {args.score_only} was cut short; not generated, so "
                                 f"not in the report: {', '.join(missing)}", highlight=False)
            else:
                request = request_from_args(args, tuple(spec.name for spec in specs))
            validate_request(request, list(TASKS))
            notify = lambda message: errors.print(f"[dim]eval[/dim] {message}")  # noqa: E731
            with logging_to(request.report_dir / LOG_FILE):
                if args.workers > 1:
                    from eval.workers import prefill

                    prefill(request, args.workers, notify)
                if request.generate_only:
                    from eval.saved import generate_only

                    saved = generate_only(request, notify=notify)
                    print(f"generations: {saved.parent / 'generations'}  identities: {saved}  (score them with "
                          f"--score-only {saved.parent})")
                    return 0
                result = run_eval(request, notify=notify)
                paths = write_report(result)
            print_summary(result, paths, Console())
    except (WorkflowError, PrepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
