"""Generate on one machine, score on another (eval/saved.py): nothing scored while generating, the same report
from the saved generations with the adapters gone, tests checked, and no scoring library needed to generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eval.runner import run_eval
from eval.saved import GENERATIONS, IDENTITIES, generate_only, scoring_request
from ludwig_mt.errors import WorkflowError
from tests.eval.test_runner import FakeBackend, request, world  # noqa: F401  (world: the fixture)

ROOT = Path(__file__).resolve().parents[2]


def _generate(world: dict[str, Any]) -> Path:  # noqa: F811
    req = replace(request(world, "sql", "multitask"), name="gen", out=world["tmp"] / "gpu")
    return generate_only(req, world["fake"].backend(), progress=False, extra={"chat_template": "off"})


def test_generate_only_saves_every_pair_and_scores_nothing(world: dict[str, Any]) -> None:  # noqa: F811
    saved = _generate(world)
    record = json.loads(saved.read_text())
    assert world["fake"].scored == [] and len(world["fake"].generated) == 6  # 3 models x 2 tasks
    assert set(record["keys"]) == {f"{m}|{t}" for m in ("base", "sql", "multitask") for t in ("sql", "detox")}
    assert record["extra"] == {"chat_template": "off"} and record["tasks"]["sql"]["evaluated"] == 4
    entries = [json.loads(p.read_text()) for p in (saved.parent / GENERATIONS / "pairs").glob("*.json")]
    assert len(entries) == 6 and all(e["scores"] is None and len(e["predictions"]) == 4 for e in entries)
    assert len(list((saved.parent / GENERATIONS / "perplexity").glob("*.json"))) == 3


def test_score_only_gives_the_full_runs_scores_without_adapters_or_models(world: dict[str, Any]) -> None:  # noqa: F811
    full = run_eval(request(world, "sql", "multitask"), FakeBackend(references=world["fake"].references).backend(),
                    progress=False)
    saved = _generate(world)
    shutil.rmtree(world["tmp"] / "results")  # the adapters stay on the GPU machine
    scorer = FakeBackend()
    req = scoring_request(saved.parent, prepared=world["prepared"], out=world["tmp"] / "cpu")
    result = run_eval(req, scorer.backend(), progress=False)
    assert scorer.loads == [] and scorer.generated == [] and len(scorer.scored) >= 6
    assert {(p.model, p.task): p.scores for p in result.pairs} == {(p.model, p.task): p.scores for p in full.pairs}
    assert result.own_tasks["multitask"] == ["sql", "detox"] and result.request.name == "gen"
    assert result.manifest["models"]["sql"][0]["path"].endswith("sql/experiment_run/model")
    from eval.report import report_data

    assert report_data(result, "now")["request"]["saved"] == {"folder": str(req.saved["folder"])}  # not its content


def test_score_only_refuses_other_test_rows_and_missing_pairs(world: dict[str, Any]) -> None:  # noqa: F811
    saved = _generate(world)
    test = world["prepared"] / "sql" / "test.csv"
    frame = pd.read_csv(test)
    frame.loc[0, "response"] = "changed"
    frame.to_csv(test, index=False)
    with pytest.raises(WorkflowError, match=r"sql/test.csv: sha256 .* was generated on sha256"):
        scoring_request(saved.parent, prepared=world["prepared"], out=world["tmp"] / "cpu")
    with pytest.raises(WorkflowError, match=rf"no readable {IDENTITIES}"):
        scoring_request(world["tmp"], prepared=world["prepared"], out=world["tmp"] / "cpu")


def test_score_only_of_a_missing_pair_names_the_folder(world: dict[str, Any]) -> None:  # noqa: F811
    saved = _generate(world)
    for entry in (saved.parent / GENERATIONS / "pairs").glob("*.json"):
        entry.unlink()
    req = scoring_request(saved.parent, prepared=world["prepared"], out=world["tmp"] / "cpu")
    with pytest.raises(WorkflowError, match=r"base: a pair or probe was not generated in .*gen"):
        run_eval(req, FakeBackend().backend(), progress=False)


def test_generate_path_imports_no_scoring_library() -> None:
    """The GPU image lacks these: the eval CLI, the runner, scoring and generation must import without them."""
    blocked = ("sqlglot", "rouge_score", "nltk", "datasets", "sentence_transformers")
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import eval.__main__, eval.saved, eval.scoring, eval.generate, eval.perplexity\n"
            "import workflow.study, workflow.agreement\n"
            "from eval.__main__ import build_parser\n"
            "assert build_parser().parse_args(['--score-only', 'x']).score_only.name == 'x'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_run_cut_short_leaves_the_models_it_finished(world: dict[str, Any]) -> None:  # noqa: F811
    fake = world["fake"]
    real_generate = fake.generate

    def generate(loaded, prompts, **kw):  # the time limit strikes while the multitask adapter generates
        if loaded.name == "multitask":
            raise KeyboardInterrupt
        return real_generate(loaded, prompts, **kw)

    fake.generate = generate
    with pytest.raises(KeyboardInterrupt):
        _generate(world)
    folder = world["tmp"] / "gpu" / "gen"
    record = json.loads((folder / IDENTITIES).read_text())
    assert record["complete"] is False and record["models_not_generated"] == ["multitask"]
    assert [m["name"] for m in record["models"]] == ["sql"] and set(record["identities"]) == {"base", "sql"}
    result = run_eval(scoring_request(folder, prepared=world["prepared"], out=world["tmp"] / "cpu"),
                      FakeBackend().backend(), progress=False)
    assert {p.model for p in result.pairs} == {"base", "sql"}
    assert result.manifest["models_not_generated"] == ["multitask"]


def test_score_only_knows_a_merge_whose_folder_stayed_on_the_gpu(world: dict[str, Any]) -> None:  # noqa: F811
    """identities.json keeps each model's merge.json: scored elsewhere, the report still compares the merge with
    the single-task adapters (before, with the folder gone, the merge counted as a mix and the table was empty)."""
    from eval.report import merges_table

    merged = world["multitask"].path
    (merged / "merge.json").write_text(json.dumps({"method": "ties", "tasks": ["sql", "detox"]}))
    saved = _generate(world)
    assert json.loads(saved.read_text())["models"][1]["merge"]["method"] == "ties"
    shutil.rmtree(world["tmp"] / "results")
    result = run_eval(scoring_request(saved.parent, prepared=world["prepared"], out=world["tmp"] / "cpu"),
                      FakeBackend().backend(), progress=False)
    kinds = {(row[0], row[1]): row[2] for row in merges_table(result)[1]}
    assert kinds[("sql", "multitask")] == "merge (ties)" and kinds[("sql", "sql")] == "single-task adapter"
