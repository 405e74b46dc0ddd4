"""./run.sh study (workflow/study.py): the plan's checks, sources, seeds and merges as eval models, throughput from
Ludwig's log, and one real CPU run on the tiny model (2 tasks + mix + a stand-in merge, generate here, score there)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from ludwig_mt.errors import WorkflowError
from workflow.samples import write_detox_sample, write_sql_sample
from workflow.study import (
    MIX,
    StudyPlan,
    Training,
    check_plan,
    eval_request,
    main,
    merge_all,
    source_for,
    training_progress,
)


def plan(tmp_path: Path, **kw: object) -> StudyPlan:
    return replace(StudyPlan(base_model=str(tmp_path / "base"), tasks=("sql", "detox"), out=tmp_path / "out",
                             data_root=tmp_path / "data", probe=None), **kw)


def training(name: str, task: str, seed: int = 1) -> Training:
    return Training(name, task, seed, f"/r/{name}/experiment_run/model", f"/r/{name}/train.log", "c.yaml", 10, 1.0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"tasks": ("sql", "spider")}, r"--tasks spider: not a trainable task"),
    ({"seed_tasks": ("banking77",), "seeds": 2}, r"--seed-tasks banking77: not in --tasks"),
    ({"seed_tasks": ("sql",)}, r"--seed-tasks without --seeds 2"),
    ({"merges": ("average",)}, r"--merge average: unknown method"),
    ({"max_rows": 0}, r"--max-rows 0: must be at least 1"),
    ({"data_root": None}, r"no data: pass --data-root"),
])
def test_plan_errors_are_one_line(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(WorkflowError, match=message):
        check_plan(plan(tmp_path, **changes))


def test_sql_reads_wikisql_when_the_data_root_has_it_and_source_wins(tmp_path: Path) -> None:
    (tmp_path / "data" / "sql_create_context").mkdir(parents=True)
    assert source_for("sql", plan(tmp_path)).endswith("sql_create_context")
    (tmp_path / "data" / "wikisql_mlx").mkdir()
    assert source_for("sql", plan(tmp_path)).endswith("wikisql_mlx")
    assert source_for("sql", plan(tmp_path, sources={"sql": "x.json"})) == "x.json"
    with pytest.raises(WorkflowError, match=r"no paradetox folder for detox"):
        source_for("detox", plan(tmp_path))


def test_seeds_and_merges_become_eval_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = plan(tmp_path, mix=True, seeds=3, seed_tasks=("sql",), merges=("linear", "ties"))
    assert p.models() == [("sql", "sql", 1), ("detox", "detox", 1), ("sql-seed2", "sql", 2),
                          ("sql-seed3", "sql", 3), (MIX, MIX, 1)]
    trained = {name: training(name, task, seed) for name, task, seed in p.models()}
    calls = []

    def merge_adapters(models, method, *, weights=None, density=None, seed=0, out):  # the merge branch's signature
        calls.append((dict(models), method))
        return out

    monkeypatch.setitem(sys.modules, "workflow.merge", types.SimpleNamespace(merge_adapters=merge_adapters))
    merged = merge_all(p, trained)
    assert [m for _, m in calls] == ["linear", "ties"] and set(calls[0][0]) == {"sql", "detox"}
    request = eval_request(p, trained, merged)
    specs = {m.name: m for m in request.models}
    assert list(specs) == ["sql", "detox", MIX, "merge-linear", "merge-ties"]
    assert [str(s) for s in specs["sql"].other_seeds] == ["/r/sql-seed2/experiment_run/model",
                                                         "/r/sql-seed3/experiment_run/model"]
    assert specs["merge-ties"].own_tasks == ("sql", "detox") and specs["merge-ties"].path == p.out / "merged/ties"


def test_merge_without_the_merge_module_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "workflow.merge", None)
    with pytest.raises(WorkflowError, match=r"--merge: workflow.merge is not available .* Fix: run without --merge"):
        merge_all(plan(tmp_path, merges=("linear",)), {})


def test_a_sub_second_training_loop_is_timed_from_the_progress_file(tmp_path: Path) -> None:
    """Two CPU steps take well under a second: the loop is timed from the records' clock, not from a progress
    bar's whole seconds (which read 00:00 there and left tokens/s blank)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_progress.json").write_text(json.dumps({"steps": 2, "total_tokens_used": 640}))
    records = [{"loop_start": 100.0}, {"step": 1, "total": 2, "loss": 2.0, "epoch": 0, "time": 100.25},
               {"checkpoint": 1}, {"step": 2, "total": 2, "loss": 1.5, "epoch": 0, "time": 100.5}]
    progress = tmp_path / "train.progress.jsonl"
    progress.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert training_progress(model, progress) == (2, 640, 0.5)
    assert training_progress(model, tmp_path / "none.jsonl") == (2, 640, None)  # no records: no rate, not a guess
    t = replace(training("sql", "sql"), steps=10, tokens=5000, loop_seconds=20.0)
    assert (t.tokens_per_second, t.steps_per_second) == (250.0, 0.5)


@pytest.mark.slow  # three real `ludwig train` runs of the tiny model on CPU
def test_cpu_study_generates_and_scores_elsewhere(tiny_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.__main__ import main as eval_main

    data = tmp_path / "data"
    write_sql_sample(data / "sql_create_context" / "sql_create_context_v4.json", 80)
    write_detox_sample(data / "paradetox" / "paradetox.tsv", 60)

    def merge_adapters(models, method, *, weights=None, density=None, seed=0, out):  # stand-in: the sql adapter
        shutil.copytree(models["sql"], out)
        return out

    monkeypatch.setitem(sys.modules, "workflow.merge", types.SimpleNamespace(merge_adapters=merge_adapters))
    out = tmp_path / "study"
    assert main(["--base-model", str(tiny_model), "--tasks", "sql,detox", "--data-root", str(data), "--out", str(out),
                 "--mix", "--merge", "linear", "--max-rows", "16", "--test-rows", "4", "--epochs", "1",
                 "--batch-size", "8", "--cpu", "--no-perplexity", "--max-new-tokens", "4", "--generate-only",
                 "--parallel", "3"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [t["name"] for t in study["trainings"]] == ["sql", "detox", MIX]
    assert study["rows"][MIX]["train"] == 32 and all(t["steps"] == 2 for t in study["trainings"][:2])
    assert all(t["tokens_per_second"] and t["steps_per_second"] for t in study["trainings"])
    identities = json.loads((out / "reports/study/identities.json").read_text())
    assert {m["name"] for m in identities["models"]} == {"sql", "detox", MIX, "merge-linear"}
    shutil.rmtree(out / "results")  # scoring needs none of the adapters
    shutil.rmtree(out / "merged")
    assert eval_main(["--score-only", str(out / "reports/study"), "--prepared", str(out / "prepared"),
                      "--out", str(tmp_path / "scored")]) == 0
    report = json.loads((tmp_path / "scored/study/report.json").read_text())
    assert report["manifest"]["study"]["trainings"][2]["name"] == MIX
    assert "## Training (./run.sh study)" in (tmp_path / "scored/study/report.md").read_text()


def test_a_failing_merge_is_left_out_and_reported_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def merge_adapters(models, method, *, weights=None, density=None, seed=0, out):
        if method == "ties":
            raise RuntimeError("shapes differ")
        return out

    monkeypatch.setitem(sys.modules, "workflow.merge", types.SimpleNamespace(merge_adapters=merge_adapters))
    p = plan(tmp_path, merges=("linear", "ties"))
    trained = {t: training(t, t) for t in p.tasks}
    failures: dict[str, str] = {}
    assert list(merge_all(p, trained, lambda m, e: failures.update({m: e}))) == ["merge-linear"]
    assert failures == {"ties": "RuntimeError: shapes differ"}
    with pytest.raises(RuntimeError, match="shapes differ"):
        merge_all(p, trained)


def test_a_failing_training_is_left_out_and_the_study_goes_on(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On the H200 samsum's NaN stopped a whole study (a GPU session): now it is reported and the rest goes on;
    a merge of the tasks asked for needs every one of them, so merges are reported as not made."""
    import workflow.study as study

    def train_one(p, name, task, seed):
        if name == "detox":
            raise WorkflowError("ludwig train failed (exit 1): RuntimeError: NaN or Inf values. Fix: see log")
        return training(name, task, seed)

    monkeypatch.setattr(study, "train_one", train_one)
    p = plan(tmp_path, mix=True, merges=("ties",))
    failures: dict[str, str] = {}
    trained = study.train_all(p, p.models(), lambda line: None, lambda n, e: failures.update({n: e}))
    assert list(trained) == ["sql", MIX] and "NaN" in failures["detox"]
    with pytest.raises(WorkflowError, match="NaN"):
        study.train_all(p, p.models(), lambda line: None)
    merge_failures: dict[str, str] = {}
    monkeypatch.setitem(sys.modules, "workflow.merge", types.SimpleNamespace(merge_adapters=lambda *a, **k: None))
    assert merge_all(p, trained, lambda m, e: merge_failures.update({m: e})) == {}
    assert merge_failures == {"ties": "not merged: the detox adapter did not train"}
    assert [m.name for m in eval_request(p, trained, {}).models] == ["sql", MIX]
    seeded = plan(tmp_path, tasks=("sql", "detox"), seeds=3, seed_tasks=("detox",))
    trained = study.train_all(seeded, seeded.models(), lambda line: None, lambda n, e: None)
    assert list(trained) == ["sql", "detox-seed2", "detox-seed3"]
    detox = eval_request(seeded, trained, {}).models[1]  # seed 1 failed: seed 2 stands for it, not left out
    assert detox.name == "detox" and str(detox.path).startswith("/r/detox-seed2/")
    assert [str(s) for s in detox.other_seeds] == ["/r/detox-seed3/experiment_run/model"]
    monkeypatch.setattr(study, "train_one", lambda *a: (_ for _ in ()).throw(WorkflowError("boom")))
    with pytest.raises(WorkflowError, match="every training failed"):
        study.train_all(p, p.models(), lambda line: None, lambda n, e: None)
