"""eval.generate: Ludwig's input ids and decoding reproduced, batching that changes nothing, clear errors.

The faithfulness test trains a tiny Ludwig LLM with the real ``ludwig train``, runs the real ``ludwig predict``
CLI on held-out prompts of varied lengths (one longer than anything seen in training, so Ludwig's truncation
matters) and requires eval.generate to produce the very same texts with batches of 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from eval.generate import (
    GenerationSettings,
    LoadedModel,
    _until_eos,
    decode,
    dequantize_to_bf16,
    generate,
    generate_ids,
    load_base_model,
    load_causal_lm,
    load_ludwig_model,
    load_tokenizer,
    prompt_ids,
    settings_from_config,
)
from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from ludwig_mt.errors import WorkflowError
from prep.registry import get_task

PROMPTS = [
    "SELECT name FROM head",
    "How many heads of the departments are older than 56 ?",
    "### Instruction: rewrite the sentence so that it is polite.",
    "What is the capital of France?",
    "Summarize the dialogue. Amanda: I baked cookies. Do you want some? Jerry: Sure! Amanda: I'll bring you some.",
    "card_arrival",
    "CREATE TABLE head (age INTEGER, name VARCHAR, born_state VARCHAR) -- list the names of heads born in Alabama",
    "The answer is (A) (B) (C) (D) (E).",
    "x",
]


@pytest.fixture(scope="module")
def eos_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with its eos logit row scaled up: greedy outputs then stop at varied positions,
    so batching has to handle rows that finish early (padding after eos) and texts of varied lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("eos-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] *= 3.0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(eos_model: Path) -> LoadedModel:
    return load_base_model(str(eos_model), GenerationSettings(max_input_tokens=256, max_new_tokens=24),
                           device="cpu")


# ------------------------------------------------------------------------------------------------ settings
def test_settings_from_config_derives_max_new_tokens_like_ludwig() -> None:
    base = {"input_features": [{"name": "prompt", "type": "text", "preprocessing": {"max_sequence_length": 100}}],
            "output_features": [{"name": "response", "type": "text", "preprocessing": {"max_sequence_length": 70}}]}
    assert settings_from_config({**base, "generation": {"max_new_tokens": 50}}).max_new_tokens == 50
    # unset or exactly 32 (Ludwig's default) -> the output feature's max_sequence_length (at least 32)
    assert settings_from_config(base).max_new_tokens == 70
    assert settings_from_config({**base, "generation": {"max_new_tokens": 32}}).max_new_tokens == 70
    settings = settings_from_config(base)
    assert settings.max_input_tokens == 100 and settings.lowercase is False and settings.quantization is None


def test_settings_from_task_yaml() -> None:
    config = load_yaml(get_task("sql").config_path())
    settings = settings_from_config(config)
    assert settings.max_input_tokens == config["input_features"][0]["preprocessing"]["max_sequence_length"]
    assert settings.max_new_tokens == config["generation"]["max_new_tokens"]
    assert settings.quantization and settings.quantization["bits"] == 4


def test_settings_without_a_length_to_derive_from_is_a_clear_error() -> None:
    config = {"input_features": [{"name": "p", "type": "text"}], "output_features": [{"name": "r", "type": "text"}]}
    with pytest.raises(WorkflowError, match="generation.max_new_tokens"):
        settings_from_config(config)


# ------------------------------------------------------------------------------------------------ errors
def test_model_dir_without_hyperparameters_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "model_weights").mkdir()
    with pytest.raises(WorkflowError, match="model_hyperparameters.json: not found") as err:
        load_ludwig_model(tmp_path, device="cpu")
    assert "\n" not in str(err.value)


def test_missing_model_dir_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="no such model directory"):
        load_ludwig_model(tmp_path / "nope", device="cpu")


def test_base_model_dir_without_tokenizer_is_a_one_line_error(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(WorkflowError, match="no tokenizer could be loaded") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


def test_base_model_dir_without_weights_is_a_one_line_error(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="could not load the model"):
        load_causal_lm(str(tmp_path), device="cpu")


def test_prompt_template_is_refused(tmp_path: Path) -> None:
    hyper = {"model_type": "llm", "base_model": "x", "prompt": {"template": "Q: {prompt}"},
             "input_features": [{"name": "prompt", "type": "text"}],
             "output_features": [{"name": "response", "type": "text"}], "generation": {"max_new_tokens": 8}}
    (tmp_path / "model_hyperparameters.json").write_text(json.dumps(hyper))
    (tmp_path / "training_set_metadata.json").write_text(json.dumps({"prompt": {"max_sequence_length": 9}}))
    with pytest.raises(WorkflowError, match="prompt.template"):
        load_ludwig_model(tmp_path, device="cpu")


# ------------------------------------------------------------------------------------------------ input ids
def test_prompt_ids_cut_like_ludwig(loaded: LoadedModel) -> None:
    tok = loaded.tokenizer
    text = PROMPTS[4]
    full = tok.encode(text, truncation=True)
    assert len(full) > 12
    tail = GenerationSettings(max_input_tokens=10, max_new_tokens=4)
    # 1) the LAST max_sequence_length tokens are kept (Ludwig's preprocessing with the project's fix
    #    cut_prompts_from_the_instruction_side; this tokenizer adds no BOS, see test_fixes for one that does)
    assert prompt_ids(tok, text, tail, context_len=1024, max_new_tokens=4) == full[-10:]
    # 2) then, if longer than context - new tokens - 8, the last that many (LLM.generate)
    wide = GenerationSettings(max_input_tokens=1000, max_new_tokens=4)
    assert prompt_ids(tok, text, wide, context_len=len(full) + 4 + 8 - 3, max_new_tokens=4) == full[3:]
    # 3) everything up to the last pad token is dropped, then everything before the first BOS
    pad, bos = tok.pad_token, tok.bos_token
    ids = prompt_ids(tok, f"ab{pad}cd{bos}ef", wide, context_len=1024, max_new_tokens=4)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "ef"
    lower = GenerationSettings(max_input_tokens=1000, max_new_tokens=4, lowercase=True)
    assert prompt_ids(tok, "SELECT", lower, context_len=1024, max_new_tokens=4) == tok.encode("select")


def test_until_eos_keeps_the_first_eos_and_drops_the_rest() -> None:
    assert _until_eos([5, 6, 2, 3, 3], {2}) == [5, 6, 2]
    assert _until_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert _until_eos([5, 6, 7], set()) == [5, 6, 7]


# ------------------------------------------------------------------------------------------------ generation
def test_sorted_batched_generation_equals_one_at_a_time(loaded: LoadedModel) -> None:
    one_by_one = [generate_ids(loaded, [p], batch_size=1, progress=False)[0] for p in PROMPTS]
    batched = generate_ids(loaded, PROMPTS, batch_size=4, progress=False)
    assert batched == one_by_one
    # the check means something: outputs differ between prompts and stop at eos after varied numbers of tokens
    lengths = {len(ids) for ids in batched}
    assert len({tuple(ids) for ids in batched}) >= 5 and len(lengths) >= 4 and max(lengths) >= 10
    assert generate(loaded, PROMPTS, batch_size=3, progress=False) == [decode(loaded, ids) for ids in one_by_one]


def test_empty_prompt_list_gives_empty_list(loaded: LoadedModel) -> None:
    assert generate(loaded, [], progress=False) == []


def test_max_new_tokens_override_caps_every_output(loaded: LoadedModel) -> None:
    assert all(len(ids) <= 3 for ids in generate_ids(loaded, PROMPTS, max_new_tokens=3, progress=False))


def test_dequantized_4bit_model_computes_what_the_4bit_model_computes(tiny_model: Path) -> None:
    quantization = {"bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": "bfloat16"}
    try:
        quantized = load_causal_lm(str(tiny_model), device="cpu", quantization=quantization)
    except (WorkflowError, RuntimeError, ImportError) as err:
        pytest.skip(f"bitsandbytes cannot load 4-bit weights on this CPU: {err}")
    fresh = load_causal_lm(str(tiny_model), device="cpu", quantization=quantization)
    full = load_causal_lm(str(tiny_model), device="cpu")
    ids = torch.tensor([[0, 40, 41, 42, 43, 44, 45, 46]])
    dequantized = dequantize_to_bf16(fresh)  # before any forward pass (see its docstring)
    assert not any("4bit" in type(m).__name__ for m in dequantized.modules())
    with torch.no_grad():
        q, d, f = (m(ids).logits.float() for m in (quantized, dequantized, full))
    assert (q - d).abs().max() < 0.02 < (f - d).abs().max()  # same 4-bit function; not the original weights


# ------------------------------------------------------------------------------------------------ vs Ludwig
@pytest.fixture(scope="module")
def ludwig_run(eos_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Ludwig LLM trained with ``ludwig train`` and ``ludwig predict``'s output on held-out prompts."""
    from prep.task import prepare
    from workflow.demo import predict
    from workflow.samples import write_sql_sample
    from workflow.train import train

    work = tmp_path_factory.mktemp("faithful")
    report = prepare(get_task("sql"), str(write_sql_sample(work / "v4.json", 60)), work / "prepared")
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(eos_model), cpu=True, epochs=1,
                              batch_size=8, max_new_tokens=20)
    model = train(write_yaml(config, work / "sql.cpu.yaml"), Path(report.files["train"]), work / "results")
    test = pd.read_csv(report.files["test"], keep_default_na=False)["prompt"].tolist()[:8]
    # a prompt longer than any training prompt (Ludwig keeps its first tokens) and a very short one
    prompts = [*test, " ".join(test[:3]), "SELECT"]
    dataset = work / "prompts.csv"
    pd.DataFrame({"prompt": prompts}).to_csv(dataset, index=False)
    predictions = predict(model, dataset, work / "pred", work / "predict.log")
    return {"model": model, "dataset": dataset, "predictions": predictions}


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_generate_matches_ludwig_predict(ludwig_run: dict[str, Path], merge: bool) -> None:
    prompts = pd.read_csv(ludwig_run["dataset"], keep_default_na=False)["prompt"].tolist()
    expected = pd.read_parquet(ludwig_run["predictions"])["response_response"].tolist()
    loaded = load_ludwig_model(ludwig_run["model"], device="cpu", merge=merge)
    assert loaded.merged is merge
    longest = max(len(loaded.tokenizer.encode(p)) for p in prompts)
    assert longest > loaded.settings.max_input_tokens  # Ludwig's truncation is exercised
    assert generate(loaded, prompts, batch_size=4, progress=False) == expected
    assert len(set(expected)) >= 4 and len({len(t) for t in expected}) >= 3  # varied, so equality means something


def test_chat_template_wraps_the_prompt_or_is_refused_without_one(loaded: LoadedModel) -> None:
    from dataclasses import replace

    tok = loaded.tokenizer
    plain = GenerationSettings(max_input_tokens=1000, max_new_tokens=4)
    chat = replace(plain, chat_template=True)
    saved = getattr(tok, "chat_template", None)
    try:
        tok.chat_template = None
        with pytest.raises(WorkflowError, match=r"no chat template. Fix: score with --chat-template off"):
            prompt_ids(tok, "the cat", chat, context_len=1024, max_new_tokens=4)
        tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
        ids = prompt_ids(tok, "the cat", chat, context_len=1024, max_new_tokens=4)
        assert ids == tok.encode("<u>the cat</u><a>") != prompt_ids(tok, "the cat", plain, context_len=1024,
                                                                     max_new_tokens=4)
        # the pad token as real text of the template (SmolLM2: pad = <|im_end|> ends each turn): the message stays
        pad = tok.convert_ids_to_tokens(tok.pad_token_id)
        tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}" + pad + "{% endfor %}<a>"
        ids = prompt_ids(tok, "the cat", chat, context_len=1024, max_new_tokens=4)
        assert ids == tok.encode("<u>the cat" + pad + "<a>") and tok.encode("the cat")[-1] in ids
    finally:
        tok.chat_template = saved


def test_stops_at_the_tokenizer_eos_ludwig_trains_with_too() -> None:
    """Tokenizer EOS (appended to every training row by Ludwig) and the generation config's EOS both stop."""
    from types import SimpleNamespace

    from eval.generate import eos_ids

    loaded = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=1), model=None)
    assert eos_ids(loaded, SimpleNamespace(eos_token_id=2)) == {1, 2}
    assert eos_ids(loaded, SimpleNamespace(eos_token_id=[2, 5])) == {1, 2, 5}
    none = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=None), model=None)
    assert eos_ids(none, SimpleNamespace(eos_token_id=None)) == set()


def test_the_decoding_rule_is_part_of_every_pair_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import eval.runner as runner

    settings = GenerationSettings(max_input_tokens=16, max_new_tokens=8)
    before = runner.pair_key("m", "sql", "h", settings, None)
    monkeypatch.setattr(runner, "DECODING_RULE", runner.DECODING_RULE + 1)
    assert runner.pair_key("m", "sql", "h", settings, None) != before
