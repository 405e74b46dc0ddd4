"""The offline demo behind ``./run.sh``: a real pretrained model learns a real task, forgets, and replay helps.

Base model: stories260k (260K parameters, Llama architecture, pretrained on TinyStories; MIT), shipped in
``workflow/assets/stories260k`` with its provenance. Trained task: banking77 intents from a small real slice of the
published dataset (``workflow/assets/banking77``, CC BY 4.0). The steps are the real ones: ``prep`` -> ``ludwig
train`` (``workflow.train``) of ``ludwig_configs/banking77.yaml`` and of the mixture ``ludwig_configs/multitask.yaml``
(banking77 + replay of TinyStories *train* stories, ``workflow/assets/tinystories``) -> ``ludwig predict`` -> eval
(``eval.runner``: intervals, trivial baseline, Benjamini-Hochberg q-values) with the perplexity probe
``tinystories`` (held-out TinyStories *validation* stories, the model's own kind of text). Only what a CPU needs is
overridden (rows, epochs, learning rate, LoRA rank, prompt length), and the demo prints each override.

The final screen states three readings computed from the eval's report.json (:func:`readings`): (a) the gain on
banking77 and its interval, (b) the forgetting on the stories probe, (c) the mixture with replay next to the
single-task adapter. They are reported as they come out, whichever way they go.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_text
from prep.mix import MIX_TASK, build_mixture
from prep.registry import config_path, get_task
from prep.task import prepare
from workflow.steps import timed_steps
from workflow.train import ludwig_executable, train

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_MODEL = ASSETS / "stories260k"
BANKING77 = ASSETS / "banking77"  # train.csv / test.csv: rows in sha256(text) order, so any head is a fair sample
STORIES = ASSETS / "tinystories" / "TinyStories-train-sample.txt"
PROBE = Path(__file__).resolve().parent.parent / "eval" / "probes" / "tinystories_valid.txt"
TASK, REPLAY = "banking77", "stories"


@dataclass(frozen=True)
class DemoSettings:
    """What the CPU demo sizes down; every other setting is the task YAML's. Defaults: measured on 2 shared cores
    to fit about 3 minutes (docs/demo/README.md)."""

    train_rows: int = 750  # banking77 training rows (of the 2,000 shipped)
    test_rows: int = 300  # banking77 held-out rows (official test split; of the 400 shipped)
    replay_rows: int = 150  # TinyStories train stories mixed into the multitask adapter's training data
    probe_texts: int = 150  # held-out TinyStories validation stories the forgetting is measured on (of 378)
    epochs: int = 2
    learning_rate: float = 3e-3  # the YAMLs' 2e-4 is for 1.5B-parameter bases; a 260K model needs far more
    lora_r: int = 32  # alpha = 2 r, as the YAMLs
    prompt_tokens: int = 96  # prompts keep their last 96 tokens: the message and the answer cue (see cpu_lengths)
    batch_size: int = 8
    predict_rows: int = 40  # rows `ludwig predict` runs on: the real command, compared with eval's generations
    threads: int = 1  # torch threads: on 2 cores shared with other work, 1 thread ran 6x faster than 2
    # --merge linear,ties,...: also train a stories adapter (the replay rows alone) and merge it with the banking77
    # adapter by each method: the merge as the remedy, next to the mix (issue #15's CPU evidence; ~2 min more)
    merges: tuple[str, ...] = ()


def head_csv(source: Path, target: Path, rows: int) -> Path:
    """The header and first ``rows`` rows of a CSV (the shipped slices are in hash order: a head is a sample)."""
    import pandas as pd

    frame = pd.read_csv(source, keep_default_na=False, dtype=str)
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.head(rows).to_csv(target, index=False)
    return target


def probe_file(source: Path, target: Path, texts: int) -> Path:
    """The first ``texts`` texts of a probe file (paragraphs separated by blank lines)."""
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    atomic_write_text(target, "\n\n".join(paragraphs[:texts]) + "\n")
    return target


def cpu_lengths(config: Mapping[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """``config`` with prompts cut to ``prompt_tokens`` (from the instruction side, by the registry fix
    cut_prompts_from_the_instruction_side) and the merged row length to match. Pure.

    banking77's prompt lists all 77 intents: ~1,200 tokens through stories260k's 512-piece vocabulary, already cut
    to ~480 to fit its context. On 2 CPU cores a 480-token row costs ~12x a 96-token one (attention is quadratic),
    and 96 tokens keep the whole message for ~93 % of rows (median 50 tokens with the cue)."""
    import copy

    out = copy.deepcopy(dict(config))
    prompt = out["input_features"][0].setdefault("preprocessing", {})
    prompt["max_sequence_length"] = min(prompt_tokens, int(prompt.get("max_sequence_length") or prompt_tokens))
    response = int(out["output_features"][0].get("preprocessing", {}).get("max_sequence_length") or 0)
    out.setdefault("preprocessing", {})["global_max_sequence_length"] = prompt["max_sequence_length"] + response + 1
    return out


def demo_config(task: str, dataset: Path, settings: DemoSettings, notify: Callable[[str], None]) -> dict[str, Any]:
    """The task's YAML rendered for the CPU demo: base model and lengths (measured with its tokenizer on the
    rows), then the demo's overrides, each one said."""
    yaml_task = MIX_TASK if task == REPLAY else task  # replay rows have no YAML of their own: the mix's recipe
    config = render_overrides(load_yaml(config_path(yaml_task)), base_model=str(BASE_MODEL), cpu=True,
                              epochs=settings.epochs, batch_size=settings.batch_size, dataset=dataset, notify=notify)
    config = cpu_lengths(config, settings.prompt_tokens)
    config["trainer"]["learning_rate"] = settings.learning_rate
    config["adapter"] |= {"r": settings.lora_r, "alpha": 2 * settings.lora_r}
    notify(f"{task}: CPU demo overrides: epochs {settings.epochs}, batch {settings.batch_size}, learning rate "
           f"{settings.learning_rate}, LoRA r {settings.lora_r}, prompts cut to their last {settings.prompt_tokens} "
           f"tokens")
    return config


def merge_two(adapters: Mapping[str, Path], method: str, out: Path) -> Path:
    """The banking77 and stories adapters merged by ``method`` (weights 1 each, PEFT's default density)."""
    from workflow.merge import merge_adapters

    return merge_adapters({TASK: adapters[TASK], REPLAY: adapters[REPLAY]}, method, out=out)


def predict(model: Path, dataset: Path, out_dir: Path, log: Path) -> Path:
    """The plain ``ludwig predict`` command (patched by ludwig_mt.patches); returns the predictions file."""
    cmd = [ludwig_executable(), "predict", "--model_path", str(model), "--dataset", str(dataset),
           "--output_directory", str(out_dir)]
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise WorkflowError(f"ludwig predict failed (exit {code}). Fix: see {log}")
    return out_dir / "predictions.parquet"


def run_demo(workdir: Path, settings: DemoSettings = DemoSettings(), *,
             console: Console | None = None) -> dict[str, Any]:
    """Run every step, timing each; return the summary's inputs (printed as one screen by ``main``)."""
    console = console or Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    paths: dict[str, str] = {}

    step = timed_steps(console, timings)

    def notify(line: str) -> None:
        console.print(f"  {line}", soft_wrap=True, highlight=False)

    prepared, raw = workdir / "prepared", workdir / "raw"

    def prep_all() -> dict[str, Any]:
        head_csv(BANKING77 / "train.csv", raw / TASK / "train.csv", settings.train_rows)
        head_csv(BANKING77 / "test.csv", raw / TASK / "test.csv", settings.test_rows)
        reports = {TASK: prepare(get_task(TASK), str(raw / TASK), prepared),
                   REPLAY: prepare(get_task(REPLAY), str(STORIES), prepared)}
        reports[MIX_TASK] = build_mixture(prepared, {TASK: None, REPLAY: settings.replay_rows}, prepared)
        return {name: report.as_dict() for name, report in reports.items()}

    rows = step("prep banking77, stories replay, their mix", prep_all)
    adapters: dict[str, Path] = {}
    datasets = {name: prepared / name / "train.csv" for name in (TASK, MIX_TASK)}
    if settings.merges:  # the replay rows the mix holds, alone
        datasets[REPLAY] = head_csv(prepared / REPLAY / "train.csv", workdir / "replay" / "train.csv",
                                    settings.replay_rows)
    for name, dataset in datasets.items():
        config = demo_config(name, dataset, settings, notify)
        rendered = write_yaml(config, workdir / f"{name}.cpu.yaml",
                              header=f"# ludwig_configs/{name}.yaml rendered for the CPU demo (workflow.demo).\n")
        adapters[name] = step(f"ludwig train {name}", lambda r=rendered, d=dataset, n=name: train(
            r, d, workdir / "results" / n))
        paths[f"trained {name}"] = str(adapters[name])
    merged = {f"merge-{method}": step(f"merge {TASK} + {REPLAY} ({method})", lambda m=method: merge_two(
        adapters, m, workdir / "merged" / m)) for method in settings.merges}
    predict_csv = head_csv(prepared / TASK / "test.csv", workdir / "predict" / "test.csv", settings.predict_rows)
    predictions = step(f"ludwig predict {TASK} ({settings.predict_rows} rows)", lambda: predict(
        adapters[TASK], predict_csv, workdir / "predictions" / TASK, logs / "predict.log"))
    paths["predictions"] = str(predictions)
    probe = probe_file(PROBE, workdir / "probe" / PROBE.name, settings.probe_texts)  # named as the shipped one
    evaluation = step(f"eval: base, {', '.join([*adapters, *merged])} on banking77 + stories probe",
                      lambda: retention_report(adapters, probe, prepared, workdir, merged))
    report_dir = evaluation.request.report_dir
    paths["eval report"] = str(report_dir / "report.md")
    agreement = predict_agreement(predictions, evaluation.pair(TASK, TASK).predictions)
    return {"rows": rows, "timings": timings, "paths": paths, "settings": asdict(settings),
            "report": json.loads((report_dir / "report.json").read_text(encoding="utf-8")),
            "predict_agreement": agreement}


def retention_report(adapters: Mapping[str, Path], probe: Path, prepared: Path, workdir: Path,
                     merged: Mapping[str, Path] | None = None) -> Any:
    """``python -m eval`` in-process: the base, the adapters (and merges) on banking77, perplexity on the stories
    probe."""
    from eval.report import LOG_FILE, logging_to, write_report
    from eval.runner import EvalRequest, ModelSpec, read_probe, run_eval

    models = (ModelSpec(TASK, adapters[TASK], (TASK,)), ModelSpec(MIX_TASK, adapters[MIX_TASK], (TASK, REPLAY)),
              *([ModelSpec(REPLAY, adapters[REPLAY], (REPLAY,))] if REPLAY in adapters else []),
              *(ModelSpec(name, path, (TASK, REPLAY)) for name, path in (merged or {}).items()))
    request = EvalRequest(name="demo", base_model=shown(BASE_MODEL), models=models, tasks=(TASK,), prepared=prepared,
                          out=workdir / "reports", probes=(read_probe(probe),), device="cpu")
    with logging_to(request.report_dir / LOG_FILE):
        result = run_eval(request, progress=False)
        write_report(result)
    return result


def shown(path: Path) -> str:
    """``path`` relative to the working folder when inside it (reports name ``workflow/assets/...``, not a home
    folder), else as it is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def predict_agreement(predictions: Path, eval_texts: list[str]) -> tuple[int, int]:
    """How many of ``ludwig predict``'s answers equal eval's generations for the same first rows (same adapter,
    greedy): (equal, compared)."""
    import pandas as pd

    from eval.text import clean_predictions

    ludwig = clean_predictions(pd.read_parquet(predictions)["response_response"].map(_as_text).tolist())
    ours = clean_predictions(eval_texts[: len(ludwig)])
    return sum(a.strip() == b.strip() for a, b in zip(ludwig, ours, strict=True)), len(ludwig)


def _as_text(value: Any) -> str:
    """Ludwig stores decoded text as a string or a list of tokens depending on the path taken."""
    return value if isinstance(value, str) else " ".join(map(str, value))


# ---------------------------------------------------------------------------------------------- the readings
def _interval(estimate: Mapping[str, Any], scale: float = 1.0, unit: str = "") -> str:
    """``+0.060 [+0.037, +0.083]`` (``scale`` 100 with unit ``%`` for relative changes)."""
    value, low, high = (estimate.get(k) for k in ("value", "low", "high"))
    digits = 1 if unit else 3
    if low is None or high is None:
        return f"{value * scale:+.{digits}f}{unit} (no interval)"
    return f"{value * scale:+.{digits}f}{unit} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"


def _verdict(cell: Mapping[str, Any]) -> str:
    """significant or not, as the report decided it (interval and Benjamini-Hochberg q-value)."""
    q = cell.get("q_value")
    q_text = f", q = {q:.2g}" if q is not None else ""
    return ("significant" if cell.get("significant") else "no significant change") + q_text


def readings(report: Mapping[str, Any], task: str = TASK, single: str = TASK, mix: str = MIX_TASK) -> dict[str, str]:
    """The demo's three readings, as sentences, from an eval ``report.json``:

    * (a) ``gain``: the single-task adapter's change on its task from the base, with interval;
    * (b) ``forgetting``: its perplexity change on the probe (the first probe: the model's own kind of text);
    * (c) ``remedy``: the mixture's gain and forgetting next to the single-task adapter's, and whether the
      forgetting intervals separate (the mixture forgot less / more / not distinguishable at this size).

    Pure: nothing is hard-coded but the model names; reads only the report's retention section."""
    retention = report["retention"]
    metric = retention["metric"][task]
    cells, ppl = retention["cells"], retention["perplexity"]
    probe = next(iter(ppl.get(single, {})), None)
    base = cells["base"][task]["score"]["value"]
    out: dict[str, str] = {}
    gain = cells[single][task]
    out["gain"] = (f"{task} {metric} {base:.3f} -> {gain['score']['value']:.3f}: change "
                   f"{_interval(gain['delta'])} ({_verdict(gain)}); trivial baseline "
                   f"{retention['baseline'][task]['value']:.3f}" if retention["baseline"].get(task) else "")
    if probe is None:
        out["forgetting"] = "no perplexity probe in the report"
        out["remedy"] = f"{mix} {metric} change {_interval(cells[mix][task]['delta'])} ({_verdict(cells[mix][task])})"
        return out
    forget, forget_mix = ppl[single][probe], ppl[mix][probe]
    base_ppl = ppl["base"][probe]["score"]["value"]
    out["forgetting"] = (f"{single} adapter: perplexity on '{probe}' {base_ppl:.2f} -> {forget['score']['value']:.2f}, "
                         f"change {_interval(forget['delta'], 100, ' %')} ({_verdict(forget)})")
    single_d, mix_d = forget["delta"], forget_mix["delta"]
    if None in (single_d.get("low"), mix_d.get("low")):
        compare = "no intervals to compare"
    elif mix_d["high"] < single_d["low"]:
        compare = f"{mix} forgot less than {single} (intervals do not overlap)"
    elif mix_d["low"] > single_d["high"]:
        compare = f"{mix} forgot more than {single} (intervals do not overlap)"
    else:
        compare = f"{mix} and {single} forgetting intervals overlap: not distinguishable at this size"
    mix_cell = cells[mix][task]
    out["remedy"] = (f"{mix} (with replay): {task} change {_interval(mix_cell['delta'])} ({_verdict(mix_cell)}); "
                     f"perplexity change {_interval(mix_d, 100, ' %')} ({_verdict(forget_mix)}); {compare}")
    return out


def summary(result: Mapping[str, Any]) -> Table:
    """The one screen: rows, settings, timings, the readings (a)(b)(c) from report.json, and the paths."""
    table = Table(title="ludwig-multitask offline demo: stories260k learns banking77, forgets, replays (CPU)",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, report in result["rows"].items():
        out = report["rows_out"]
        table.add_row(f"rows: {name}", f"train {out.get('train', 0)}, validation {out.get('validation', 0)}, "
                                       f"test {out.get('test', 0)}")
    s = result["settings"]
    table.add_row("CPU overrides", f"epochs {s['epochs']}, lr {s['learning_rate']}, LoRA r {s['lora_r']}, prompts "
                                   f"{s['prompt_tokens']} tokens, probe {s['probe_texts']} stories")
    for name, seconds in result["timings"].items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    table.add_row("time: total", f"{sum(result['timings'].values()):.1f} s")
    equal, compared = result["predict_agreement"]
    table.add_row("ludwig predict = eval", f"{equal} of {compared} answers identical")
    for key, label in (("gain", "(a) learned"), ("forgetting", "(b) forgot"), ("remedy", "(c) remedy")):
        table.add_row(label, readings(result["report"])[key])
    for name, path in result["paths"].items():
        table.add_row(name, path)
    return table


def quiet_library_chatter() -> None:
    """Keep the terminal to the demo's own progress and summary (its steps log to files under the workdir):
    torch prints import-time deprecation warnings for torchao's enums, transformers a bar per saved model."""
    import logging

    import torch  # noqa: F401  (its logging setup must exist before the level is set)
    from transformers.utils import logging as hf_logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def use_threads(threads: int) -> None:
    """torch threads here and in the ``ludwig`` subprocesses (OMP_NUM_THREADS)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def parse_args(argv: list[str] | None = None) -> tuple[Path, DemoSettings]:
    """The work folder and the settings: one option per DemoSettings field, ``--merge`` a comma-separated list."""
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    for name, value in asdict(defaults).items():
        if name != "merges":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--merge", default="", metavar="METHODS",
                        help="also train a stories (replay) adapter and merge it with banking77's, e.g. ties,linear")
    args = parser.parse_args(argv)
    settings = DemoSettings(**{name: getattr(args, name) for name in asdict(defaults) if name != "merges"},
                            merges=tuple(m.strip() for m in args.merge.split(",") if m.strip()))
    return args.workdir, settings


def main(argv: list[str] | None = None) -> int:
    workdir, settings = parse_args(argv)
    quiet_library_chatter()
    use_threads(settings.threads)
    try:
        result = run_demo(workdir, settings)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console = Console()
    console.print(summary(result))
    console.print(f"eval report: {result['paths']['eval report']} (+ report.json, retention.png)", soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
