"""Bring your own data: a task declared in YAML, no Python."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from prep.__main__ import main as prep_main
from prep.common import PrepError
from prep.custom_task import load_spec
from prep.registry import TASKS
from prep.task import prepare

SPEC = """
name: claims
hub_name: infinite-dataset-hub/TextClaimsDataset
template: "### Task: Is the text a claim?\\n### Text:\\n{text}\\n### Answer:\\n"
response: label
test_fraction: 0.2
"""


def write_claims(path: Path, n: int = 50) -> Path:
    pd.DataFrame({"text": [f"The moon is made of cheese, says person {i}." for i in range(n)],
                  "label": ["Claim" if i % 2 else "Not a Claim" for i in range(n)]}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_yaml_spec_maps_any_file_format(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "claims.yaml").write_text(SPEC)
    frame = pd.read_csv(write_claims(tmp_path / "claims.csv"))
    source = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        frame.to_json(source, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(source)
    else:
        frame.to_csv(source, index=False)
    spec = load_spec(tmp_path / "claims.yaml")
    report = prepare(spec, str(source), tmp_path / "out")
    assert sum(report.rows_out.values()) == 50 and report.rows_out["test"] > 0
    test = pd.read_csv(tmp_path / "out/claims/test.csv", keep_default_na=False)
    assert test["prompt"].iloc[0].startswith("### Task: Is the text a claim?\n### Text:\nThe moon")
    assert set(test["response"]) <= {"Claim", "Not a Claim"}


def test_a_custom_task_gets_the_same_record_as_a_builtin_one(tmp_path: Path) -> None:
    (tmp_path / "claims.yaml").write_text(SPEC, encoding="utf-8")
    spec = load_spec(tmp_path / "claims.yaml")
    assert (spec.source_folder, spec.ludwig_config, spec.scorer, spec.primary_metric) == (
        None, "claims.yaml", "text", "rougeL")
    (tmp_path / "own.yaml").write_text(SPEC + "ludwig_config: sql.yaml\nscorer: intents\nprimary_metric: accuracy\n",
                                       encoding="utf-8")
    own = load_spec(tmp_path / "own.yaml")
    assert (own.ludwig_config, own.scorer, own.primary_metric) == ("sql.yaml", "intents", "accuracy")
    assert own.owned_by("claims") and own.config_path().name == "sql.yaml"


def test_the_shipped_example_is_registered() -> None:
    assert TASKS["claims"].hub_name == "infinite-dataset-hub/TextClaimsDataset"


def test_cli_spec(tmp_path: Path) -> None:
    (tmp_path / "claims.yaml").write_text(SPEC)
    code = prep_main(["--spec", str(tmp_path / "claims.yaml"), "--source", str(write_claims(tmp_path / "c.csv")),
                      "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out/claims/train.csv").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("name: x\ntemplate: '{a}'\n", r"missing key\(s\) response"),
     ("name: x\ntemplate: '{a}'\nresponse: r\nfields: {b: c}\n", r"fields \['b'\] are not used in the template"),
     ("name: [x\n", "invalid YAML")],
)
def test_bad_specs(tmp_path: Path, spec: str, expected: str) -> None:
    (tmp_path / "s.yaml").write_text(spec)
    with pytest.raises(PrepError, match=expected):
        load_spec(tmp_path / "s.yaml")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("test_fration: 0.2\n", r"s.yaml: unknown key 'test_fration' \(did you mean 'test_fraction'\?\)\. "
                             r"Fix: use the known keys: name, template, response, "),
     ("metrik: accuracy\n", r"unknown key 'metrik' \(did you mean 'metric'\?\)"),
     ("colour: red\n", r"unknown key 'colour'\. Fix"),
     ("metric: bleu\n", r"metric 'bleu' is not supported\. Fix: use metric: accuracy \(answers are labels\) or "
                        r"metric: rougeL \(free text\)"),
     ("metric: accuracy\nscorer: text\n", "both metric and scorer/primary_metric are set"),
     ("test_fraction: 1.5\n", r"test_fraction 1.5 is out of range\. Fix: use a number with 0 < test_fraction < 1"),
     ("test_fraction: many\n", r"test_fraction 'many' is out of range"),
     ("test_fraction: 0.5\nvalidation_fraction: 0.5\n", "leave no training rows")],
)
def test_spec_keys_and_values_are_checked(tmp_path: Path, extra: str, expected: str) -> None:
    (tmp_path / "s.yaml").write_text("name: s\ntemplate: '{text}'\nresponse: label\n" + extra)
    with pytest.raises(PrepError, match=expected) as info:
        load_spec(tmp_path / "s.yaml")
    assert "\n" not in str(info.value)


def test_spec_metric_sets_the_scorer_and_primary_metric(tmp_path: Path) -> None:
    (tmp_path / "labels.yaml").write_text(SPEC + "metric: accuracy\n")
    (tmp_path / "text.yaml").write_text(SPEC + "metric: rougeL\n")
    labels, text = load_spec(tmp_path / "labels.yaml"), load_spec(tmp_path / "text.yaml")
    assert (labels.scorer, labels.primary_metric) == ("labels", "accuracy")
    assert (text.scorer, text.primary_metric) == ("text", "rougeL")
    assert (TASKS["claims"].scorer, TASKS["claims"].primary_metric) == ("labels", "accuracy")  # the shipped example


def test_spec_ludwig_config_may_sit_beside_the_spec(tmp_path: Path) -> None:
    (tmp_path / "claims-train.yaml").write_text("model_type: llm\n")
    (tmp_path / "claims.yaml").write_text(SPEC + "ludwig_config: claims-train.yaml\n")
    spec = load_spec(tmp_path / "claims.yaml")
    assert spec.config_path() == (tmp_path / "claims-train.yaml").resolve()
