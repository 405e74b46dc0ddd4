"""Do eval's generations equal plain ``ludwig predict``'s for the same rows? Measured for eval's two adapter paths.

  python -m workflow.agreement --model banking77=RUN/model --model sql=RUN/model --prepared DIR --rows 24 \\
      --out agreement.json [--base-model DIR] [--device cuda]

For each ``--model NAME=DIR`` the first ``--rows`` rows of ``<prepared>/<NAME>/test.csv`` go through ``ludwig
predict`` (one process per model, its own numerics: the trained, possibly 4-bit, base with the LoRA applied on
the side) and through ``eval.generate`` twice: unmerged (the adapter kept apart, as Ludwig does) and merged (the
LoRA folded into bf16 weights: eval's fast path on CUDA). Each path's agreement is the fraction of rows whose text
is identical. The choice for scoring is the path that agrees on the most rows (ties: unmerged, Ludwig's own
numerics); when neither agrees on every row the JSON says so and why that path is still the one used. On CPU both
paths agree (tests/eval/test_generate.py); on a GPU, batching with left padding and bf16 merging change the
arithmetic, and greedy decoding can then take another token at a near tie.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_csv, atomic_write_json

PATHS = {"unmerged": False, "merged": True}


def compare(expected: Sequence[str], got: Sequence[str]) -> dict[str, Any]:
    """How many texts are identical, the fraction, identical after stripping whitespace, and the first row that
    differs (both texts) so a reader sees what kind of difference it is."""
    if len(expected) != len(got):
        raise WorkflowError(f"agreement: {len(got)} generations for {len(expected)} ludwig predictions. Fix: report "
                            "this bug in workflow.agreement")
    equal = [a == b for a, b in zip(expected, got, strict=True)]
    stripped = [a.strip() == b.strip() for a, b in zip(expected, got, strict=True)]
    first = next((i for i, same in enumerate(equal) if not same), None)
    return {"rows": len(equal), "equal": sum(equal), "fraction": sum(equal) / len(equal) if equal else 0.0,
            "equal_stripped": sum(stripped),
            "first_difference": None if first is None else {"row": first, "ludwig_predict": expected[first],
                                                            "eval": got[first]}}


def choose(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The path to score with: most rows identical over every model (ties: unmerged); and why, in words."""
    totals = {path: sum(r[path]["equal"] for r in results.values()) for path in PATHS}
    rows = sum(r["unmerged"]["rows"] for r in results.values())
    best = max(PATHS, key=lambda path: (totals[path], path == "unmerged"))
    share = {path: (totals[path] / rows if rows else 0.0) for path in PATHS}
    if rows and totals[best] == rows:
        reason = f"{best}: identical to ludwig predict on all {rows} rows"
    else:
        reason = (f"{best}: the closer path ({totals[best]}/{rows} rows identical; the other "
                  f"{totals[[p for p in PATHS if p != best][0]]}/{rows}); neither reproduces ludwig predict on every "
                  "row (batched, left-padded GPU arithmetic and bf16 merging change near-tie greedy tokens), so "
                  "the scores are of eval's generations on this path")
    return {"merge_lora": "on" if PATHS[best] else "off", "path": best, "fraction": share, "reason": reason}


def ludwig_predictions(name: str, model_dir: Path, test: pd.DataFrame, work: Path) -> tuple[list[str], float]:
    """Plain ``ludwig predict`` on the rows (its own process): the texts and the seconds it took."""
    from workflow.demo import _as_text, predict

    dataset = work / name / "rows.csv"
    atomic_write_csv(dataset, test[["prompt"]])
    started = time.perf_counter()
    predictions = predict(model_dir, dataset, work / name / "predict", work / name / "predict.log")
    return [_as_text(v) for v in pd.read_parquet(predictions)["response_response"]], time.perf_counter() - started


def agreement_for(name: str, model_dir: Path, test: pd.DataFrame, work: Path, expected: list[str], seconds: float,
                  *, base_model: str | None, device: str | None, batch_size: int) -> dict[str, Any]:
    """One model: eval's generation unmerged and merged, compared with ``ludwig predict``'s texts."""
    from eval.generate import generate, load_ludwig_model

    out: dict[str, Any] = {"model_dir": str(model_dir), "seconds_ludwig_predict": seconds,
                           "log": str(work / name / "predict.log")}
    for path, merge in PATHS.items():
        loaded = load_ludwig_model(model_dir, base_model=base_model, device=device, merge=merge)
        got = generate(loaded, test["prompt"].tolist(), batch_size=batch_size, progress=False)
        out[path] = compare(expected, got) | {"device": loaded.device, "merged": loaded.merged,
                                              "quantized": loaded.quantized}
        del loaded
    return out


def run(models: Mapping[str, Path], prepared: Path, rows: int, out: Path, *, base_model: str | None = None,
        device: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Every model's agreement and the path to score with; written to ``out`` (JSON) and returned."""
    from concurrent.futures import ThreadPoolExecutor

    tests = {}
    for name in models:
        test_csv = prepared / name / "test.csv"
        if not test_csv.is_file():
            raise WorkflowError(f"--model {name}: {test_csv} not found. Fix: name each model after its task, with "
                                "--prepared holding that task")
        tests[name] = pd.read_csv(test_csv, keep_default_na=False, dtype=str).head(rows)
    work = out.parent / "agreement-work"
    with ThreadPoolExecutor(max_workers=len(models) or 1) as pool:  # ludwig predict processes run at once
        predicted = dict(zip(models, pool.map(lambda n: ludwig_predictions(n, models[n], tests[n], work), models)))
    results = {name: agreement_for(name, models[name], tests[name], work, *predicted[name], base_model=base_model,
                                   device=device, batch_size=batch_size) for name in models}
    record = {"rows_per_model": rows, "models": results, "choice": choose(results)}
    atomic_write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow.agreement", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="TASK=DIR",
                        help="a trained Ludwig model folder, named after the task whose test rows it predicts")
    parser.add_argument("--prepared", type=Path, required=True, help="folder with <task>/test.csv")
    parser.add_argument("--rows", type=int, default=24, help="first test rows per model (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--base-model", help="the base the adapters load on (default: their saved base_model)")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32, help="eval's generation batch size")
    args = parser.parse_args(argv)
    try:
        from eval.runner import parse_assignment, require_model_dir

        models = {name: require_model_dir(name, Path(path))
                  for name, path in (parse_assignment(item, "--model") for item in args.model)}
        record = run(models, args.prepared, args.rows, args.out, base_model=args.base_model, device=args.device,
                     batch_size=args.batch_size)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in record["models"].items():
        print(f"{name}: " + ", ".join(f"{p} {result[p]['equal']}/{result[p]['rows']} identical" for p in PATHS))
    print(f"score with --merge-lora {record['choice']['merge_lora']}: {record['choice']['reason']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
