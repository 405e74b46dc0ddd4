"""eval.manifest: commit and dirty flag, loaded versions, file hashes, saved configs and seeds."""

from __future__ import annotations

import hashlib
import json
import subprocess

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
