"""``python -m eval --spec``: a bring-your-own task prepared with ``prep --spec`` is evaluated without copying its
spec into prep/custom/, scored by the spec's metric (exact-match accuracy over the training labels)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eval import runner, scoring
from eval.__main__ import main as eval_main
from eval.generate import settings_from_config
from eval.perplexity import TextNLL
from prep.__main__ import main as prep_main
from prep.registry import TASKS

SPEC = """name: stance
template: "### Task: Does the reply agree? Answer agree or disagree.\\n### Reply:\\n{text}\\n### Answer:\\n"
response: label
test_fraction: 0.25
metric: accuracy
ludwig_config: stance-ludwig.yaml
"""
LUDWIG_YAML = """model_type: llm
base_model: some/base
input_features: [{name: prompt, type: text, preprocessing: {max_sequence_length: 64}}]
output_features: [{name: response, type: text, preprocessing: {max_sequence_length: 4}}]
generation: {max_new_tokens: 4}
"""


@dataclass(frozen=True)
class FakeLoaded:
    name: str
    settings: Any = None


def fake_backend(answers: dict[str, str]) -> runner.Backend:
    """The real scoring, settings and metrics; a 'model' that answers ``answers[prompt]``."""
    def generate(loaded: Any, prompts: list[str], **_: Any) -> list[str]:
        return [answers[p] for p in prompts]

    return runner.Backend(
        load_base=lambda base, settings, *, device: FakeLoaded("base", settings),
        load_adapter=lambda *args, **kwargs: FakeLoaded("adapter"),
        generate=generate, text_nll=lambda loaded, texts: TextNLL((1.0,) * len(texts), (1,) * len(texts)),
        score=scoring.score_task, settings_from_config=settings_from_config, resources=scoring.EvalResources,
        primary_metric=scoring.PRIMARY_METRIC)


@pytest.fixture
def prepared_spec(tmp_path: Path) -> dict[str, Path]:
    spec = tmp_path / "byo" / "stance.yaml"
    spec.parent.mkdir()
    spec.write_text(SPEC, encoding="utf-8")
    (spec.parent / "stance-ludwig.yaml").write_text(LUDWIG_YAML, encoding="utf-8")
    source = tmp_path / "stance.csv"
    pd.DataFrame({"text": [f"Reply number {i}: {'yes, exactly' if i % 3 else 'no way'}" for i in range(80)],
                  "label": ["agree" if i % 3 else "disagree" for i in range(80)]}).to_csv(source, index=False)
    assert prep_main(["--spec", str(spec), "--source", str(source), "--out", str(tmp_path / "prepared")]) == 0
    return {"spec": spec, "prepared": tmp_path / "prepared", "tmp": tmp_path}


def test_eval_spec_scores_a_prepared_label_task_by_accuracy(prepared_spec: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    test = pd.read_csv(prepared_spec["prepared"] / "stance" / "test.csv", keep_default_na=False)
    assert len(test) >= 8
    # right on the first half of the rows (one of them in other case, with a reason after it), wrong on the rest
    half = len(test) // 2
    answers = {p: (r.upper() + "\nbecause it says so" if i == 0 else r) if i < half else
               ("disagree" if r == "agree" else "agree") for i, (p, r) in enumerate(zip(test["prompt"], test["response"]))}
    monkeypatch.setattr(runner, "default_backend", lambda: fake_backend(answers))
    assert "stance" not in TASKS
    code = eval_main(["--base-model", "some/base", "--spec", str(prepared_spec["spec"]),
                      "--prepared", str(prepared_spec["prepared"]), "--name", "byo",
                      "--out", str(prepared_spec["tmp"] / "reports"), "--no-perplexity"])
    assert code == 0
    assert "stance" not in TASKS  # registered for that run only
    report = json.loads((prepared_spec["tmp"] / "reports" / "byo" / "report.json").read_text())
    assert report["retention"]["metric"] == {"stance": "accuracy"}
    assert report["retention"]["cells"]["base"]["stance"]["score"]["value"] == pytest.approx(half / len(test))
    assert report["baselines"]["stance"]["name"].startswith("majority")  # the label tasks' trivial baseline
    pair = next(p for p in report["pairs"] if p["task"] == "stance")
    assert pair["scores"]["accuracy"] == pytest.approx(half / len(test))
    assert pair["scores"]["invalid"] == 0.0 and "rougeL" not in pair["scores"]


def test_eval_spec_refuses_a_built_in_name_and_an_unknown_key_in_one_line(
        prepared_spec: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    clash = prepared_spec["tmp"] / "sql.yaml"
    clash.write_text(SPEC.replace("name: stance", "name: sql"), encoding="utf-8")
    typo = prepared_spec["tmp"] / "typo.yaml"
    typo.write_text(SPEC + "test_fration: 0.1\n", encoding="utf-8")
    for spec, expected in ((clash, "task name 'sql' is a built-in task. Fix: give the spec another name"),
                           (typo, "unknown key 'test_fration' (did you mean 'test_fraction'?)")):
        assert eval_main(["--base-model", "b", "--spec", str(spec), "--prepared", str(prepared_spec["prepared"]),
                          "--name", "x", "--out", str(prepared_spec["tmp"] / "r"), "--no-perplexity"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and str(spec) in err
    assert "sql" in TASKS and TASKS["sql"].scorer == "sql"  # the built-in is untouched
