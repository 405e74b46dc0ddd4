"""workflow.merge: merged updates checked against numpy computations of each method, loading through Ludwig and
PEFT, the record eval reads, and the refusals.

The shared real `ludwig train` (conftest tiny_sql_run: tiny model, one epoch) gives a faithful Ludwig model folder; the "sql" and
"detox" adapters are copies of it whose LoRA factors are replaced by seeded random ones (training for one epoch
leaves B near its zero init, which would make every merge trivially zero).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ludwig_mt.errors import WorkflowError
from workflow.merge import MERGE_RECORD, Candidate, grid_search, main, merge_adapters, parse_grid

WEIGHTS = "model_weights/adapter_model.safetensors"


def randomize(folder: Path, seed: int, rank: int | None = None) -> None:
    """Replace every LoRA factor with seeded random values (cut to ``rank`` when given, config updated)."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    tensors = load_file(folder / WEIGHTS)
    if rank is not None:
        tensors = {k: (v[:rank] if ".lora_A." in k else v[:, :rank]) for k, v in tensors.items()}
        config_path = folder / "model_weights/adapter_config.json"
        config = json.loads(config_path.read_text())
        config["r"] = rank
        config_path.write_text(json.dumps(config))
    save_file({k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in tensors.items()}, folder / WEIGHTS)


@pytest.fixture(scope="module")
def adapters(tiny_sql_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("merge")
    folders = {}
    for seed, name in enumerate(("sql", "detox", "low_rank")):
        folders[name] = work / name
        shutil.copytree(tiny_sql_run["model"], folders[name])
        randomize(folders[name], seed, rank=4 if name == "low_rank" else None)
    folders["test_csv"] = tiny_sql_run["test"]
    folders["prepared"] = tiny_sql_run["work"] / "prepared"
    return folders


def factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """module -> (A, B, scaling alpha/r) read straight from the saved files."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "model_weights/adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / WEIGHTS)
    return {k.replace(".lora_A.weight", ""): (v.astype(np.float64),
                                               tensors[k.replace("lora_A", "lora_B")].astype(np.float64), scale)
            for k, v in tensors.items() if ".lora_A." in k}


def deltas(folder: Path) -> dict[str, np.ndarray]:
    return {m: s * b @ a for m, (a, b, s) in factors(folder).items()}


def ties_by_hand(tensors: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023) as PEFT applies it: keep each tensor's top density by |value|, elect each entry's
    sign from the sum of the kept values, average the weighted kept values that agree with it."""
    kept = []
    for t in tensors:
        k = int(density * t.size)
        threshold = np.sort(np.abs(t).ravel())[::-1][k - 1]
        kept.append(np.where(np.abs(t) >= threshold, t, 0.0))
    stack = np.stack(kept)
    sign = np.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == sign
    weighted = stack * np.asarray(weights)[:, None, None]
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.slow
def test_cat_is_exactly_the_weighted_sum_of_the_updates(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = merge_adapters({"sql": adapters["sql"], "detox": adapters["detox"]}, "cat", weights=[1.0, 0.5],
                         out=tmp_path / "cat")
    sql, detox, merged = deltas(adapters["sql"]), deltas(adapters["detox"]), deltas(out)
    assert merged.keys() == sql.keys() and len(merged) == 14  # 7 modules x 2 layers
    for module, delta in merged.items():
        np.testing.assert_allclose(delta, sql[module] + 0.5 * detox[module], atol=1e-5)
    assert json.loads((out / "model_weights/adapter_config.json").read_text())["r"] == 32


@pytest.mark.slow
def test_linear_merges_the_factors_separately(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = merge_adapters({"sql": adapters["sql"], "detox": adapters["detox"]}, "linear", weights=[1.0, 0.25],
                         out=tmp_path / "linear")
    sql, detox, merged = factors(adapters["sql"]), factors(adapters["detox"]), factors(out)
    for module, (a, b, scale) in merged.items():
        (a1, b1, s1), (a2, b2, s2) = sql[module], detox[module]
        c1, c2 = np.sqrt(1.0 * s1), np.sqrt(0.25 * s2)
        np.testing.assert_allclose(a, c1 * a1 + c2 * a2, atol=1e-5)
        np.testing.assert_allclose(b, c1 * b1 + c2 * b2, atol=1e-5)
        assert scale == 1.0
        exact = s1 * b1 @ a1 + 0.25 * s2 * b2 @ a2  # the cross terms make linear differ from the sum
        assert not np.allclose(scale * b @ a, exact, atol=1e-3)


@pytest.mark.slow
def test_svd_keeps_the_whole_sum_at_rank_sum_of_ranks(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = merge_adapters({"sql": adapters["sql"], "samsum": adapters["low_rank"]}, "svd", weights=[1.0, 2.0],
                         out=tmp_path / "svd")
    sql, low, merged = deltas(adapters["sql"]), deltas(adapters["low_rank"]), deltas(out)
    for module, delta in merged.items():
        np.testing.assert_allclose(delta, sql[module] + 2.0 * low[module], atol=1e-4)
    assert json.loads((out / "model_hyperparameters.json").read_text())["adapter"]["r"] == 16 + 4


@pytest.mark.slow
def test_ties_matches_a_computation_by_hand(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = merge_adapters({"sql": adapters["sql"], "detox": adapters["detox"]}, "ties", weights=[1.0, 0.5],
                         density=0.3, out=tmp_path / "ties")
    sql, detox, merged = factors(adapters["sql"]), factors(adapters["detox"]), factors(out)
    for module, (a, b, _) in merged.items():
        (a1, b1, s1), (a2, b2, s2) = sql[module], detox[module]
        w = [np.sqrt(1.0 * s1), np.sqrt(0.5 * s2)]
        np.testing.assert_allclose(a, ties_by_hand([a1, a2], w, 0.3), atol=1e-5)
        np.testing.assert_allclose(b, ties_by_hand([b1, b2], w, 0.3), atol=1e-5)


@pytest.mark.slow
def test_dare_is_reproducible_by_seed_and_drops_at_the_density(adapters: dict[str, Path], tmp_path: Path) -> None:
    models = {"sql": adapters["sql"], "detox": adapters["detox"]}
    first = merge_adapters(models, "dare_linear", density=0.5, seed=7, out=tmp_path / "a")
    again = merge_adapters(models, "dare_linear", density=0.5, seed=7, out=tmp_path / "b")
    other = merge_adapters(models, "dare_linear", density=0.5, seed=8, out=tmp_path / "c")
    assert (first / WEIGHTS).read_bytes() == (again / WEIGHTS).read_bytes()
    assert (first / WEIGHTS).read_bytes() != (other / WEIGHTS).read_bytes()
    sql, detox, merged = factors(adapters["sql"]), factors(adapters["detox"]), factors(first)
    kept = []
    for module, (a, _, _) in merged.items():
        (a1, _, s1), (a2, _, s2) = sql[module], detox[module]
        c1, c2 = np.sqrt(s1) * a1 / 0.5, np.sqrt(s2) * a2 / 0.5  # dropped or kept, kept ones rescaled by 1/density
        choices = np.stack([np.zeros_like(a), c1, c2, c1 + c2])
        assert np.isclose(choices, a, atol=1e-5).any(axis=0).all()
        kept.append(np.isclose(c1 + c2, a, atol=1e-6).mean())
    assert 0.2 < np.mean(kept) < 0.3  # both kept with probability density**2
    assert json.loads((first / MERGE_RECORD).read_text())["seed"] == 7


@pytest.mark.slow
def test_merged_folder_loads_through_ludwig_and_peft_and_owns_both_tasks(adapters: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    import pandas as pd
    import torch
    from ludwig.api import LudwigModel
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from eval.runner import resolve_own_tasks

    out = merge_adapters({"sql": adapters["sql"], "detox": adapters["detox"]}, "ties", out=tmp_path / "m")
    model = LudwigModel.load(str(out))
    prompts = pd.read_csv(adapters["test_csv"], keep_default_na=False)[["prompt"]].head(2)
    predictions, _ = model.predict(prompts)
    assert len(predictions) == 2
    loaded = model.model.model.state_dict()
    a_key = next(k for k in loaded if k.endswith("q_proj.lora_A.default.weight"))
    expected = factors(out)[a_key.replace(".lora_A.default.weight", "")]
    np.testing.assert_allclose(loaded[a_key].float().numpy(), expected[0], atol=1e-6)

    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "model_hyperparameters.json").read_text())
                                                ["base_model"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "model_weights"))
    assert peft_model.peft_config["default"].r == 16

    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["tasks"] == ["sql", "detox"] and record["method"] == "ties" and record["density"] == 0.5
    assert [(m["name"], m["weight"], m["rank"]) for m in record["models"]] == [("sql", 1.0, 16), ("detox", 1.0, 16)]
    assert resolve_own_tasks("merged", out, ["sql", "detox", "samsum"], {}) == ("sql", "detox")


@pytest.mark.slow
def test_command_line_writes_the_folder_and_replaces_an_earlier_merge(adapters: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--model", f"sql={adapters['sql']}", "--model", f"detox={adapters['detox']}", "--method", "cat",
            "--weights", "1,2", "--out", str(out)]
    assert main(argv) == 0
    assert "owns sql, detox" in capsys.readouterr().out
    assert main([*argv[:-4], "--weights", "2,1", "--out", str(out)]) == 0
    assert json.loads((out / MERGE_RECORD).read_text())["weights"] == [2.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["cli"]  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------- refusals
def _one_line(excinfo: pytest.ExceptionInfo[WorkflowError], *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "Fix:" in message
    for needle in needles:
        assert needle in message


def test_refusals_of_options_come_before_any_folder_is_read(tmp_path: Path) -> None:
    two = {"sql": tmp_path / "a", "detox": tmp_path / "b"}
    with pytest.raises(WorkflowError) as err:
        merge_adapters(two, "average", out=tmp_path / "x")
    _one_line(err, "--method average", "ties")
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": tmp_path / "a"}, "ties", out=tmp_path / "x")
    _one_line(err, "at least 2")
    with pytest.raises(WorkflowError) as err:
        merge_adapters(two, "linear", density=0.5, out=tmp_path / "x")
    _one_line(err, "--density", "does not prune")
    with pytest.raises(WorkflowError) as err:
        merge_adapters(two, "ties", weights=[1.0], out=tmp_path / "x")
    _one_line(err, "1 weights for 2 models")
    with pytest.raises(WorkflowError) as err:
        merge_adapters(two, "ties", density=1.5, out=tmp_path / "x")
    _one_line(err, "--density 1.5", "(0, 1]")
    with pytest.raises(WorkflowError) as err:
        merge_adapters(two, "ties", out=tmp_path / "x")
    _one_line(err, f"--model sql={tmp_path / 'a'}", "folder not found")
    assert not (tmp_path / "x").exists()


def test_grid_is_every_combination_and_refuses_unknown_settings() -> None:
    assert parse_grid(["weights=1,1:0.5,1", "density=0.3,0.7"]) == [
        Candidate((1.0, 1.0), 0.3), Candidate((1.0, 1.0), 0.7), Candidate((0.5, 1.0), 0.3), Candidate((0.5, 1.0), 0.7)]
    assert parse_grid(["density=0.5"]) == [Candidate(None, 0.5)]
    with pytest.raises(WorkflowError) as err:
        parse_grid(["rank=4"])
    _one_line(err, "--grid rank=4", "weights=")
    with pytest.raises(WorkflowError) as err:
        parse_grid(["weights=1,x"])
    _one_line(err, "not a comma-separated list of numbers")


def test_grid_and_fixed_settings_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "sql=a", "--model", "detox=b", "--method", "ties", "--grid", "density=0.5",
                 "--density", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--weights/--density with --grid" in capsys.readouterr().err


@pytest.mark.slow
def test_refusals_of_missing_folders_and_unequal_ranks(adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": tmp_path / "missing"}, "ties", out=tmp_path / "x")
    _one_line(err, "detox=", "not found")
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "samsum": adapters["low_rank"]}, "ties", out=tmp_path / "x")
    _one_line(err, "rank 4", "cat or svd")
    assert not (tmp_path / "x").exists()


def _variant(adapters: dict[str, Path], tmp_path: Path, name: str, edit_config=None, edit_adapter=None) -> Path:
    folder = tmp_path / name
    shutil.copytree(adapters["detox"], folder)
    for path, edit in (("model_hyperparameters.json", edit_config), ("model_weights/adapter_config.json",
                                                                      edit_adapter)):
        if edit:
            data = json.loads((folder / path).read_text())
            edit(data)
            (folder / path).write_text(json.dumps(data))
    return folder


@pytest.mark.slow
def test_refusals_of_incompatible_adapters(adapters: dict[str, Path], tmp_path: Path) -> None:
    other_base = _variant(adapters, tmp_path, "base", edit_config=lambda c: c.update(base_model="other/model"))
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": other_base}, "cat", out=tmp_path / "x")
    _one_line(err, "different bases", "other/model")
    fewer = _variant(adapters, tmp_path, "modules", edit_adapter=lambda a: a.update(target_modules=["q_proj"]))
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": fewer}, "cat", out=tmp_path / "x")
    _one_line(err, "target modules q_proj", "adapter.target_modules")

    def merge_into_4bit(config: dict) -> None:
        config["quantization"] = {"bits": 4}
        config["adapter"]["postprocessor"]["merge_adapter_into_base_model"] = True

    quantized = _variant(adapters, tmp_path, "4bit", edit_config=merge_into_4bit)
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": quantized}, "cat", out=tmp_path / "x")
    _one_line(err, "4-bit", "merge_adapter_into_base_model: false")
    unmerged = _variant(adapters, tmp_path, "merged_into_base")
    (unmerged / "model_weights/adapter_config.json").unlink()
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": unmerged}, "cat", out=tmp_path / "x")
    _one_line(err, "no model_weights/adapter_config.json")
    with pytest.raises(WorkflowError) as err:
        merge_adapters({"sql": adapters["sql"], "detox": adapters["detox"]}, "cat", out=adapters["sql"])
    _one_line(err, "not a merged model folder")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_grid_search_writes_the_best_candidate_with_every_score(adapters: dict[str, Path], tmp_path: Path) -> None:
    seen = []

    def evaluate(folder: Path) -> dict[str, float]:
        """Prefers density 0.7 and a larger second weight, read back from the candidate's own record."""
        record = json.loads((folder / MERGE_RECORD).read_text())
        seen.append((tuple(record["weights"]), record["density"]))
        return {"sql": 1 - abs(record["density"] - 0.7), "detox": record["weights"][1]}

    candidates = parse_grid(["weights=1,0.5:1,1", "density=0.3,0.7"])
    out = grid_search({"sql": adapters["sql"], "detox": adapters["detox"]}, "ties", candidates, evaluate=evaluate,
                      out=tmp_path / "best")
    record = json.loads((out / MERGE_RECORD).read_text())
    assert seen == [((1.0, 0.5), 0.3), ((1.0, 0.5), 0.7), ((1.0, 1.0), 0.3), ((1.0, 1.0), 0.7)]
    assert record["weights"] == [1.0, 1.0] and record["density"] == 0.7
    assert [c["best"] for c in record["grid"]] == [False, False, False, True]
    assert record["grid"][3]["scores"] == {"sql": 1.0, "detox": 1.0} and record["grid"][3]["mean"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # the candidates' hidden folder is gone


@pytest.mark.slow
def test_grid_on_the_command_line_scores_the_validation_rows(adapters: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import eval.runner

    splits, load_test = [], eval.runner.load_test
    monkeypatch.setattr(eval.runner, "load_test", lambda *a: splits.append(a[-1]) or load_test(*a))
    reports = tmp_path / "reports"
    argv = ["--model", f"sql={adapters['sql']}", "--model", f"detox={adapters['detox']}", "--method", "dare_ties",
            "--grid", "weights=1,1:1,0.5", "--prepared", str(adapters["prepared"]), "--tasks", "sql", "--reports",
            str(reports), "--max-rows", "2", "--max-new-tokens", "4", "--device", "cpu", "--out",
            str(tmp_path / "best")]
    assert main(argv) == 0
    assert splits == ["validation", "validation"]  # one eval per candidate, never the test split
    record = json.loads((tmp_path / "best" / MERGE_RECORD).read_text())
    assert len(record["grid"]) == 2 and sum(c["best"] for c in record["grid"]) == 1
    assert all(set(c["scores"]) == {"sql"} for c in record["grid"]) and record["seed"] == 0
    assert (reports / "merge-grid-best.log").is_file()
    cached = [json.loads(p.read_text()) for p in (reports / ".cache" / "pairs").glob("*.json")]
    assert len(cached) == 5  # base, sql, detox once; each candidate once
