"""The eval runner's bookkeeping with a fake backend: cache per pair, own tasks, settings, one-line errors."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from eval.__main__ import main
from eval.perplexity import TextNLL
from eval.runner import (
    CACHE_FORMAT,
    Backend,
    EvalRequest,
    ModelSpec,
    Probe,
    model_spec,
    read_probe,
    require_lm_eval,
    resolve_own_tasks,
    run_eval,
    run_lm_eval,
    settings_key,
)
from eval.task_scores import TaskScores
from ludwig_mt.errors import WorkflowError

TASKS = ("sql", "detox")


@dataclass(frozen=True)
class FakeSettings:
    max_input_tokens: int
    max_new_tokens: int
    batch_size: int = 32


@dataclass(frozen=True)
class FakeLoaded:
    name: str
    settings: FakeSettings
    own: tuple[str, ...]


@dataclass
class FakeBackend:
    """Counts every call; an adapter answers its own task's references exactly and the base answers nothing."""

    own: dict[str, tuple[str, ...]] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)
    generated: list[tuple[str, int, int]] = field(default_factory=list)  # (model, rows, max_new_tokens)
    scored: list[str] = field(default_factory=list)
    perplexities: list[str] = field(default_factory=list)
    references: dict[str, list[str]] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)  # run label -> its first N answers are wrong

    def backend(self) -> Backend:
        return Backend(
            load_base=self.load_base, load_adapter=self.load_adapter, generate=self.generate,
            text_nll=self.text_nll, score=self.score, settings_from_config=settings_from_config,
            resources=lambda **kw: kw, primary_metric={"sql": "exact_match", "detox": "exact_match"},
        )

    def load_base(self, base: str, settings: FakeSettings, *, device: str | None) -> FakeLoaded:
        self.loads.append("base")
        return FakeLoaded("base", settings, ())

    def load_adapter(self, path: Path, *, base_model: str, device: str | None) -> FakeLoaded:
        name = path.parent.parent.name
        self.loads.append(name)
        config = json.loads((path / "model_hyperparameters.json").read_text())
        return FakeLoaded(name, settings_from_config(config), tuple(config["tasks"]))

    def generate(self, loaded: FakeLoaded, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                 progress: bool) -> list[str]:
        self.generated.append((loaded.name, len(prompts), max_new_tokens))
        skip = self.misses.get(loaded.name, 0)
        return [self.references.get(p, "") if _task_of(p) in loaded.own and i >= skip else ""
                for i, p in enumerate(prompts)]

    def text_nll(self, loaded: FakeLoaded, texts: list[str]) -> TextNLL:
        """Perplexity 10 + the number of tasks the model owns, on every text."""
        self.perplexities.append(loaded.name)
        tokens = tuple(len(t.split()) for t in texts)
        return TextNLL(tuple(math.log(10.0 + len(loaded.own)) * n for n in tokens), tokens)

    def score(self, task: str, test: pd.DataFrame, predictions: list[str], resources: Any) -> TaskScores:
        self.scored.append(task)
        hits = [float(p == r) for p, r in zip(predictions, test["response"], strict=True)]
        return TaskScores({"exact_match": sum(hits) / len(test)}, {"exact_match": hits}, {"n": len(test)})


def settings_from_config(config: dict[str, Any]) -> FakeSettings:
    return FakeSettings(config["input_features"][0]["preprocessing"]["max_sequence_length"],
                        config["generation"]["max_new_tokens"])


def _task_of(prompt: str) -> str:
    return prompt.split(":")[0]


def write_prepared(root: Path, rows: int = 4) -> Path:
    for task in TASKS:
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"prompt": [f"{task}: question {i}" for i in range(rows)],
                      "response": [f"{task} answer {i}" for i in range(rows)], "task": task}).to_csv(
            folder / "test.csv", index=False)
    return root


def write_model(root: Path, name: str, tasks: tuple[str, ...], max_new_tokens: int = 7,
                weights: bytes = b"weights") -> Path:
    """A folder shaped like Ludwig's <output_directory>/<experiment>_run/model (fake weights)."""
    model = root / name / "experiment_run" / "model"
    (model / "model_weights").mkdir(parents=True)
    (model / "model_weights" / "adapter_model.safetensors").write_bytes(weights)
    config = {"input_features": [{"preprocessing": {"max_sequence_length": 99}}],
              "generation": {"max_new_tokens": max_new_tokens}, "tasks": list(tasks)}
    (model / "model_hyperparameters.json").write_text(json.dumps(config))
    return model


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    prepared = write_prepared(tmp_path / "prepared")
    fake = FakeBackend(references={f"{t}: question {i}": f"{t} answer {i}" for t in TASKS for i in range(4)})
    return {
        "tmp": tmp_path, "prepared": prepared, "fake": fake,
        "sql": ModelSpec("sql", write_model(tmp_path / "results", "sql", ("sql",)), ("sql",)),
        "detox": ModelSpec("detox", write_model(tmp_path / "results", "detox", ("detox",), 9), ("detox",)),
        "multitask": ModelSpec("multitask", write_model(tmp_path / "results", "multitask", TASKS), TASKS),
    }


def request(world: dict[str, Any], *models: str, **kw: Any) -> EvalRequest:
    """A request for the named models of ``world`` (or ``models=`` given as specs) on both tasks."""
    base = {"name": "r", "base_model": "tiny/base", "models": tuple(world[m] for m in models), "tasks": TASKS,
            "prepared": world["prepared"], "out": world["tmp"] / "reports",
            "probes": (Probe("story", ("Once upon a time.",)),)}
    return EvalRequest(**(base | kw))


def test_scores_every_pair_and_builds_the_matrix(world: dict[str, Any]) -> None:
    result = run_eval(request(world, "sql", "detox"), world["fake"].backend())
    assert {(p.model, p.task) for p in result.pairs} == {(m, t) for m in ("base", "sql", "detox") for t in TASKS}
    cells = result.retention.cells
    assert cells["sql"]["sql"].score.value == 1.0 and cells["sql"]["sql"].delta.value == 1.0
    assert cells["sql"]["detox"].delta.value == 0.0 and cells["base"]["sql"].delta is None
    assert result.perplexity == {"base": {"story": pytest.approx(10.0)}, "sql": {"story": pytest.approx(11.0)},
                                 "detox": {"story": pytest.approx(11.0)}}
    assert result.rows == {"sql": {"test_rows": 4, "evaluated": 4}, "detox": {"test_rows": 4, "evaluated": 4}}


def test_second_run_is_served_from_the_cache_without_loading_or_generating(world: dict[str, Any]) -> None:
    fake = world["fake"]
    first = run_eval(request(world, "sql", "detox"), fake.backend())
    assert len(fake.generated) == 6 and fake.loads == ["base", "sql", "detox"]
    fake.loads.clear(), fake.generated.clear(), fake.perplexities.clear()
    second = run_eval(request(world, "sql", "detox"), fake.backend())
    assert fake.generated == [] and fake.loads == [] and fake.perplexities == []
    assert all(p.cached for p in second.pairs)
    assert [p.scores for p in second.pairs] == [p.scores for p in first.pairs]


def test_adding_an_adapter_computes_only_its_pairs(world: dict[str, Any]) -> None:
    fake = world["fake"]
    run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear(), fake.loads.clear()
    result = run_eval(request(world, "sql", "multitask"), fake.backend())
    assert fake.loads == ["multitask"] and [g[0] for g in fake.generated] == ["multitask", "multitask"]
    assert result.retention.cells["multitask"]["detox"].delta.value == 1.0


def test_changed_test_set_recomputes_only_that_task(world: dict[str, Any]) -> None:
    fake = world["fake"]
    run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear()
    path = world["prepared"] / "detox" / "test.csv"
    pd.read_csv(path).head(3).to_csv(path, index=False)
    run_eval(request(world, "sql"), fake.backend())
    assert sorted(fake.generated) == [("base", 3, 64), ("sql", 3, 64)]  # detox.yaml: 64 new tokens


def test_changed_adapter_weights_recompute_that_adapter(world: dict[str, Any]) -> None:
    fake = world["fake"]
    run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear()
    (world["sql"].path / "model_weights" / "adapter_model.safetensors").write_bytes(b"retrained")
    run_eval(request(world, "sql"), fake.backend())
    assert {g[0] for g in fake.generated} == {"sql"}


def test_max_rows_takes_the_first_rows_and_is_part_of_the_key(world: dict[str, Any]) -> None:
    fake = world["fake"]
    run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear()
    result = run_eval(request(world, "sql", max_rows=2), fake.backend())
    assert {g[1] for g in fake.generated} == {2} and len(fake.generated) == 4
    assert result.rows["sql"] == {"test_rows": 4, "evaluated": 2}


def write_train_with_validation(prepared: Path) -> None:
    """train.csv beside each test.csv: 3 training rows (split 0), then 2 validation rows (split 1)."""
    for task in TASKS:
        pd.DataFrame({"prompt": [f"{task}: question {i}" for i in range(5)],
                      "response": [f"{task} answer {i}" for i in range(5)], "task": task,
                      "split": [0, 0, 0, 1, 1]}).to_csv(prepared / task / "train.csv", index=False)


def test_validation_split_scores_only_the_validation_rows_of_train_csv(world: dict[str, Any]) -> None:
    from eval.report import notes

    fake = world["fake"]
    fake.references |= {f"{t}: question {i}": f"{t} answer {i}" for t in TASKS for i in range(5)}
    write_train_with_validation(world["prepared"])
    test = run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear()
    result = run_eval(request(world, "sql", split="validation"), fake.backend())
    assert {g[1] for g in fake.generated} == {2} and len(fake.generated) == 4  # not served from test's cache
    assert result.rows["sql"] == {"test_rows": 2, "evaluated": 2}
    assert list(result.tests["sql"]["prompt"]) == ["sql: question 3", "sql: question 4"]
    assert {p.key for p in result.pairs}.isdisjoint({p.key for p in test.pairs})
    assert result.retention.cells["sql"]["sql"].score.value == 1.0
    assert result.contamination.overlaps == [] and "validation" in result.contamination.unchecked[0]
    assert any("Scored on the validation split" in line for line in notes(result))


def test_validation_split_needs_train_csv_with_validation_rows(world: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match=r"train.csv not found. Fix: run ./run.sh prep sql"):
        run_eval(request(world, "sql", split="validation"), world["fake"].backend())
    write_train_with_validation(world["prepared"])
    path = world["prepared"] / "sql" / "train.csv"
    pd.read_csv(path).head(3).to_csv(path, index=False)
    with pytest.raises(WorkflowError, match=r"no validation rows. Fix: prepare more data for sql"):
        run_eval(request(world, "sql", split="validation"), world["fake"].backend())


def test_a_merged_model_owns_the_tasks_its_merge_json_records(tmp_path: Path) -> None:
    model = write_model(tmp_path, "merged", ())
    (model / "merge.json").write_text(json.dumps({"tasks": ["sql", "detox"]}))
    assert resolve_own_tasks("ties", model, ["sql", "detox"], {}) == ("sql", "detox")


def test_each_task_uses_its_specialists_settings_for_every_model(world: dict[str, Any]) -> None:
    fake = world["fake"]
    result = run_eval(request(world, "sql", "detox", "multitask"), fake.backend())
    by_model_task = {}
    for (model, _, new_tokens), task in zip(fake.generated, [t for _ in range(4) for t in TASKS]):
        by_model_task[(model, task)] = new_tokens
    assert {v for (m, t), v in by_model_task.items() if t == "sql"} == {7}
    assert {v for (m, t), v in by_model_task.items() if t == "detox"} == {9}
    assert result.settings["detox"]["source"].endswith("detox/experiment_run/model/model_hyperparameters.json")


def test_without_a_specialist_the_task_yaml_sets_the_limits(world: dict[str, Any]) -> None:
    fake = world["fake"]
    result = run_eval(request(world, "sql"), fake.backend())
    assert result.settings["detox"]["source"].endswith("ludwig_configs/detox.yaml")
    assert result.settings["detox"]["max_new_tokens"] == 64


def test_max_new_tokens_caps_every_task_and_batch_size_overrides(world: dict[str, Any]) -> None:
    result = run_eval(request(world, "sql", max_new_tokens=8, batch_size=2), world["fake"].backend())
    assert result.settings["sql"]["max_new_tokens"] == 7  # already under the cap
    assert result.settings["detox"]["max_new_tokens"] == 8  # detox.yaml's 64, capped
    assert {g[2] for g in world["fake"].generated} == {7, 8}
    assert result.settings["sql"]["batch_size"] == 2


def test_rescore_scores_cached_predictions_without_generating(world: dict[str, Any]) -> None:
    fake = world["fake"]
    run_eval(request(world, "sql"), fake.backend())
    fake.generated.clear(), fake.scored.clear()
    run_eval(request(world, "sql", rescore=True), fake.backend())
    assert fake.generated == [] and len(fake.scored) == 4 + 2  # 4 pairs and each task's trivial baseline


def test_a_damaged_cache_entry_is_recomputed(world: dict[str, Any]) -> None:
    fake = world["fake"]
    first = run_eval(request(world, "sql"), fake.backend())
    Path(first.pairs[0].cache_file).write_text("{not json")
    fake.generated.clear()
    run_eval(request(world, "sql"), fake.backend())
    assert len(fake.generated) == 1


def test_cache_entries_hold_predictions_scores_and_row_scores(world: dict[str, Any]) -> None:
    world["fake"].misses["sql"] = 1
    result = run_eval(request(world, "sql"), world["fake"].backend())
    pair = result.pair("sql", "sql")
    entry = json.loads(Path(pair.cache_file).read_text())
    assert entry["format"] == CACHE_FORMAT == 3
    assert set(entry["versions"]) == {"torch", "transformers", "peft", "ludwig"}  # what generated the predictions
    assert entry["predictions"] == ["", *[f"sql answer {i}" for i in range(1, 4)]]
    assert entry["scores"]["exact_match"] == 0.75
    assert entry["row_scores"] == {"exact_match": [0.0, 1.0, 1.0, 1.0]} and entry["scoring_settings"] == {"n": 4}
    again = run_eval(request(world, "sql"), world["fake"].backend()).pair("sql", "sql")
    assert again.cached and again.row_scores == pair.row_scores and again.predictions == pair.predictions


def test_probe_cache_holds_each_texts_nll(world: dict[str, Any]) -> None:
    probe = Probe("story", ("Once upon a time.", "The end of the story here."))
    result = run_eval(request(world, "sql", probes=(probe,)), world["fake"].backend())
    base = next(r for r in result.probe_results if r.model == "base")
    assert base.tokens == [4, 6] and base.nll == pytest.approx([4 * math.log(10), 6 * math.log(10)])
    assert result.retention.perplexity["sql"]["story"].delta.value == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ seeds
def test_seeds_are_evaluated_one_by_one_and_averaged_per_row(world: dict[str, Any]) -> None:
    fake = world["fake"]
    second = write_model(world["tmp"] / "results", "sql-seed2", ("sql",), weights=b"other seed")
    fake.misses["sql#2"] = 2  # runs of a model with several seeds are labelled NAME#1, NAME#2
    spec = ModelSpec("sql", world["sql"].path, ("sql",), (second,))
    result = run_eval(request(world, models=(spec,)), fake.backend())
    assert [(p.seed, p.scores["exact_match"]) for p in result.seed_pairs("sql", "sql")] == [(0, 1.0), (1, 0.5)]
    cell = result.retention.cells["sql"]["sql"]
    assert cell.score.value == pytest.approx(0.75) and result.seed_count("sql") == 2
    spread = result.retention.seeds["sql"]["sql"]
    assert spread.values == (1.0, 0.5) and spread.spread == 0.5 and not spread.repeats
    assert result.retention.repeats("sql") is False
    assert {g[0] for g in fake.generated} == {"base", "sql#1", "sql#2"}


def test_model_spec_parses_seed_folders_and_refuses_duplicates(world: dict[str, Any]) -> None:
    second = write_model(world["tmp"] / "results", "sql-seed2", ("sql",))
    spec = model_spec("sql", f"{world['sql'].path}, {second}", ["sql", "detox"], {})
    assert spec.seed_paths == (world["sql"].path, second) and spec.own_tasks == ("sql",)
    with pytest.raises(WorkflowError, match="the same folder twice"):
        model_spec("sql", f"{second},{second}", ["sql"], {})


# ------------------------------------------------------------------------------------------ baselines
def write_train(prepared: Path, task: str, responses: list[str]) -> Path:
    path = prepared / task / "train.csv"
    pd.DataFrame({"prompt": [f"{task}: train question {i}" for i in range(len(responses))], "response": responses,
                  "task": task, "split": [0] * (len(responses) - 1) + [1]}).to_csv(path, index=False)
    return path


def test_baseline_is_chosen_on_train_rows_and_scored_on_the_test_rows(world: dict[str, Any]) -> None:
    # train: "sql answer 1" is the most frequent response (the validation row, split 1, is left out)
    write_train(world["prepared"], "sql", ["sql answer 1", "sql answer 1", "sql answer 2", "sql answer 3"])
    result = run_eval(request(world, "sql"), world["fake"].backend())
    baseline = result.baselines["sql"]
    assert baseline.name == "the most frequent training response 'sql answer 1'"
    assert baseline.train_scores["the input, unchanged"] == 0.0 and baseline.train_rows == 3
    assert baseline.row_scores["exact_match"] == [0.0, 1.0, 0.0, 0.0]
    assert result.retention.baseline["sql"].value == 0.25
    assert result.baselines["detox"].name == "the input, unchanged"  # no train.csv: the first candidate
    assert result.retention.cells["sql"]["sql"].vs_baseline.value == 0.75


# ------------------------------------------------------------------------------------------ contamination, manifest
def test_contamination_flags_test_rows_in_a_models_training_data(world: dict[str, Any]) -> None:
    train = world["tmp"] / "sql_train.csv"
    pd.DataFrame({"prompt": ["sql: question 2", "sql: something else"], "response": ["a", "b"],
                  "task": "sql"}).to_csv(train, index=False)
    (world["sql"].path.parent / "description.json").write_text(json.dumps({"dataset": str(train),
                                                                           "random_seed": 42}))
    result = run_eval(request(world, "sql", "detox"), world["fake"].backend())
    assert result.contamination.seen("sql", "sql") == 1 and result.contamination.seen("sql", "detox") == 0
    assert [o.rows for o in result.contamination.flagged("sql")] == [(2,)]
    assert result.contamination.unchecked == ["model detox"]
    assert result.manifest["models"]["sql"][0]["random_seed"] == 42


def test_manifest_records_commit_packages_data_hashes_and_configs(world: dict[str, Any]) -> None:
    import hashlib

    result = run_eval(request(world, "sql"), world["fake"].backend())
    manifest = result.manifest
    test_csv = world["prepared"] / "sql" / "test.csv"
    assert manifest["data"]["sql/test.csv"]["sha256"] == hashlib.sha256(test_csv.read_bytes()).hexdigest()
    assert len(manifest["git"]["commit"] or "x" * 40) == 40 and manifest["git"]["dirty"] in (True, False, None)
    assert manifest["packages"]["numpy"]["loaded"] == np.__version__
    assert manifest["models"]["sql"][0]["config"]["tasks"] == ["sql"]
    assert manifest["bootstrap"]["resamples"] == 2000 and manifest["device"]["requested"] == "auto"
    assert manifest["generated_with"] == [result.pairs[0].versions]  # one model stack for every pair


def test_settings_key_ignores_defaults_ludwig_fills_in_and_batch_size() -> None:
    from eval.generate import GenerationSettings

    yaml_section = GenerationSettings(128, 64, 32, generation={"max_new_tokens": 64, "do_sample": False,
                                                               "num_beams": 1})
    saved_section = GenerationSettings(128, 64, 8, generation={
        "max_new_tokens": 64, "do_sample": False, "num_beams": 1, "temperature": 0.1, "top_k": 50, "top_p": 1.0,
        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "max_length": 32, "bos_token_id": None},
        quantization={"bits": 4})
    assert settings_key(yaml_section) == settings_key(saved_section)
    penalised = GenerationSettings(128, 64, generation={"repetition_penalty": 1.3})
    assert settings_key(penalised) != settings_key(yaml_section)
    assert settings_key(GenerationSettings(128, 65)) != settings_key(GenerationSettings(128, 64))


# ------------------------------------------------------------------------------------------ own tasks
def test_own_tasks_rule(tmp_path: Path) -> None:
    model = write_model(tmp_path, "mix", TASKS)
    known = ["sql", "detox", "instruct"]
    assert resolve_own_tasks("sql", model, known, {}) == ("sql",)
    assert resolve_own_tasks("mix", model, known, {"mix": ("sql", "instruct")}) == ("sql", "instruct")
    with pytest.raises(WorkflowError, match="--owns mix=task1,task2"):
        resolve_own_tasks("mix", model, known, {})
    train = tmp_path / "train.csv"
    pd.DataFrame({"prompt": ["a", "b", "c"], "response": "x", "task": ["sql", "detox", "sql"]}).to_csv(train)
    (model.parent / "description.json").write_text(json.dumps({"dataset": str(train)}))
    assert resolve_own_tasks("mix", model, known, {}) == ("detox", "sql")


def test_read_probe_txt_paragraphs_and_errors(tmp_path: Path) -> None:
    probe = tmp_path / "stories.txt"
    probe.write_text("Once upon a time\nthere was a cat.\n\n\nThe end.\n")
    assert read_probe(probe) == Probe("stories", ("Once upon a time there was a cat.", "The end."), str(probe))
    with pytest.raises(WorkflowError, match="--probe .*missing.txt: file not found"):
        read_probe(tmp_path / "missing.txt")
    bad = tmp_path / "bad.csv"
    bad.write_text("body\nhello\n")
    with pytest.raises(WorkflowError, match="no 'text' column"):
        read_probe(bad)


# ------------------------------------------------------------------------------------------ lm-eval (optional)
def test_lm_eval_missing_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(WorkflowError, match=r"pip install lm-eval==\d+\.\d+\.\d+$"):
        require_lm_eval()


def test_lm_eval_runs_adapters_through_peft(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def simple_evaluate(**kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return {"results": {"hellaswag": {"acc,none": 0.25, "alias": "hellaswag", "acc_stderr,none": 0.01}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    results = run_lm_eval("base/model", tmp_path / "model", ["hellaswag"], device="cpu", limit=5)
    assert calls[0]["model_args"] == f"pretrained=base/model,peft={tmp_path / 'model' / 'model_weights'}"
    assert results == {"hellaswag": {"acc,none": 0.25, "acc_stderr,none": 0.01}}


# ------------------------------------------------------------------------------------------ CLI bad input
def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_cli_missing_model_dir(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(capsys, ["--base-model", "b", "--model", f"sql={world['tmp'] / 'nope'}", "--tasks", "sql",
                              "--prepared", str(world["prepared"]), "--name", "x", "--out", str(world["tmp"]),
                              "--no-perplexity"])
    assert "--model sql=" in err and "folder not found" in err


def test_cli_model_dir_without_ludwig_files_suggests_model_subfolder(world: dict[str, Any],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = world["sql"].path.parent
    err = _cli_error(capsys, ["--base-model", "b", "--model", f"sql={run_dir}", "--tasks", "sql",
                              "--prepared", str(world["prepared"]), "--name", "x", "--out", str(world["tmp"]),
                              "--no-perplexity"])
    assert "did you mean" in err and str(world["sql"].path) in err


def test_cli_missing_test_csv(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    (world["prepared"] / "detox" / "test.csv").unlink()
    err = _cli_error(capsys, ["--base-model", "b", "--tasks", "sql,detox", "--prepared", str(world["prepared"]),
                              "--name", "x", "--out", str(world["tmp"] / "reports"), "--no-perplexity"])
    assert "detox/test.csv: test.csv not found" in err and "./run.sh prep detox" in err
    assert not (world["tmp"] / "reports").exists()  # nothing written for a bad input


def test_cli_unknown_task(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(capsys, ["--base-model", "b", "--tasks", "sql,poetry", "--prepared", str(world["prepared"]),
                              "--name", "x", "--out", str(world["tmp"]), "--no-perplexity"])
    assert "--tasks poetry: unknown task" in err and "sql" in err


@pytest.mark.parametrize("argv, expected", [
    (["--model", "sql"], "expected NAME=VALUE"),
    (["--owns", "multitask=sql,poetry"], "--owns multitask=sql,poetry: unknown task poetry"),
    (["--max-rows", "0"], "--max-rows 0: must be at least 1"),
    (["--probe", "missing-probe.txt"], "--probe missing-probe.txt: file not found"),
    (["--spider-dir", "no-such-spider"], "--spider-dir no-such-spider: folder not found"),
    (["--prepared", "no-such-prepared"], "--prepared no-such-prepared: folder not found"),
])
def test_cli_other_bad_arguments(world: dict[str, Any], capsys: pytest.CaptureFixture[str], argv: list[str],
                                 expected: str) -> None:
    common = ["--base-model", "b", "--tasks", "sql", "--name", "x", "--out", str(world["tmp"]),
              "--prepared", str(world["prepared"])]
    no_builtin_probe = [] if "--probe" in argv else ["--no-perplexity"]  # keeps torch unimported
    assert expected in _cli_error(capsys, common + argv + no_builtin_probe)


def test_cli_lm_eval_tasks_without_lm_eval(world: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    err = _cli_error(capsys, ["--base-model", "b", "--tasks", "sql", "--prepared", str(world["prepared"]),
                              "--name", "x", "--out", str(world["tmp"]), "--lm-eval-tasks", "hellaswag",
                              "--no-perplexity"])
    assert "pip install lm-eval==" in err


def test_chat_template_and_merge_path_are_part_of_the_key_and_reach_the_loader(world: dict[str, Any]) -> None:
    @dataclass(frozen=True)
    class ChatSettings(FakeSettings):
        chat_template: bool = False

    assert "chat_template" not in settings_key(ChatSettings(1, 2))  # off: keys made before the option stay valid
    assert settings_key(ChatSettings(1, 2, chat_template=True))["chat_template"] is True
    merges = []
    fake = world["fake"]
    backend = fake.backend()
    load = backend.load_adapter
    backend = Backend(**{**backend.__dict__, "load_adapter": lambda p, *, base_model, device, merge=None: (
        merges.append(merge), load(p, base_model=base_model, device=device))[1]})
    keys = {}
    for merge in (None, False):
        result = run_eval(request(world, "sql", merge_lora=merge), backend, progress=False)
        keys[merge] = {p.key for p in result.pairs}
    assert merges == [None, False]  # None: merge= not passed, the loader decides (merged on CUDA only)
    assert not keys[None] & keys[False]
