"""Regression tests for every Ludwig 0.17.10 workaround in ludwig_mt/patches/fixes.py.

Each test shows the failure with raw Ludwig (LUDWIG_MT_NO_FIXES=1 in a subprocess) and the fixed behaviour, so
removing a fix makes its test fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches import fixes
from ludwig_mt.patches.fixes import check_quantization_supported

SAVED_CONFIG_CHECK = textwrap.dedent(
    """
    import ludwig.api  # the import LudwigModel.load and `ludwig predict` go through
    from ludwig.config_validation.validation import check_schema
    # What Ludwig 0.17.10 itself writes to model_hyperparameters.json for every LLM model:
    check_schema({"model_type": "llm", "base_model": "x", "adapters": None,
                  "input_features": [{"name": "prompt", "type": "text"}],
                  "output_features": [{"name": "response", "type": "text"}]})
    print("VALID")
    """
)


def run_python(code: str, *, fixes: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LUDWIG_MT_NO_FIXES="0" if fixes else "1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def run_python_script(code: str, work_dir, *, fixes: bool, args: list[str] | None = None,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Like :func:`run_python`, with ``work_dir`` (created) as the script's first argument, then ``args``;
    ``env`` adds to the environment."""
    work_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, LUDWIG_MT_NO_FIXES="0" if fixes else "1") | (env or {})
    return subprocess.run([sys.executable, "-c", code, str(work_dir), *(args or [])], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_saved_llm_config_with_null_adapters_validates_only_with_the_fix() -> None:
    raw = run_python(SAVED_CONFIG_CHECK, fixes=False)
    assert raw.returncode != 0 and "None is not of type 'object'" in raw.stderr
    fixed = run_python(SAVED_CONFIG_CHECK, fixes=True)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "VALID" in fixed.stdout


def test_fixes_are_applied_automatically_when_ludwig_api_is_imported() -> None:
    code = "import ludwig.api\nfrom ludwig_mt.patches import core\nprint(sorted(core.applied()))"
    out = run_python(code, fixes=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("allow_null_adapters_schema", "keep_text_fill_value_when_tokenizer_has_no_unk",
                 "refuse_quantized_training_without_cuda", "one_line_errors_in_cli"):
        assert name in out.stdout


def test_text_fill_value_survives_a_tokenizer_without_unknown_token() -> None:
    """Ludwig copies the tokenizer's unknown token (None for Qwen/Llama-3/GPT-2 BPE) over the fill value, saves
    that in the model's metadata, and `ludwig predict` then fails with 'Invalid missing value strategy'."""
    code = textwrap.dedent(
        """
        import pandas as pd
        import ludwig.api
        from ludwig.backend import LOCAL_BACKEND
        from ludwig.features.text_feature import TextFeatureMixin
        params = {"fill_value": "<UNK>", "computed_fill_value": "<UNK>", "tokenizer": "space", "padding": "right",
                  "padding_symbol": "<PAD>", "unknown_symbol": "<UNK>", "lowercase": False, "vocab_file": None,
                  "pretrained_model_name_or_path": None}
        metadata = {"str2idx": {"<PAD>": 0, "<SOS>": 1, "<EOS>": 2, "a": 3}, "padding_symbol": "<PAD>", "unknown_symbol": None,
                    "max_sequence_length": 4}
        TextFeatureMixin.feature_data(pd.Series(["a"]), metadata, params, LOCAL_BACKEND)
        print(params["fill_value"], params["computed_fill_value"])
        """
    )
    raw = run_python(code, fixes=False)
    assert raw.returncode == 0, raw.stderr[-2000:]
    assert raw.stdout.splitlines()[-1].split() == ["None", "None"]
    assert run_python(code, fixes=True).stdout.splitlines()[-1].split() == ["<UNK>", "<UNK>"]


@pytest.mark.parametrize("cuda", [False, True])
def test_quantization_check(cuda: bool) -> None:
    config = {"quantization": {"bits": 4}}
    if cuda:
        check_quantization_supported(config, cuda_available=True)
        check_quantization_supported({"quantization": None}, cuda_available=False)
    else:
        with pytest.raises(WorkflowError, match=r"4-bit quantization, which needs a CUDA GPU.*--cpu"):
            check_quantization_supported(config, cuda_available=False)


BUILD_BNB_OPTIMIZERS = textwrap.dedent(
    """
    import torch
    import ludwig.api
    from ludwig.modules.optimization_modules import get_optimizer_class_and_kwargs
    from ludwig.schema.optimizers import optimizer_registry
    # paged_adam is what every task YAML in ludwig_configs/ asks for; the others share the same schema bug.
    # create_optimizer refuses paged/8-bit optimizers without CUDA before building them, so build them here the
    # way it does; the constructors themselves run on CPU.
    for name in ("paged_adam", "paged_adamw", "adam_8bit", "paged_lion"):
        optimizer_cls, kwargs = get_optimizer_class_and_kwargs(optimizer_registry[name][1](), 2e-4)
        optimizer_cls([torch.nn.Parameter(torch.zeros(8))], **kwargs)
        print("BUILT", name, optimizer_cls.__name__, kwargs["lr"])
    """
)


def test_bitsandbytes_optimizers_build_only_with_the_fix() -> None:
    raw = run_python(BUILD_BNB_OPTIMIZERS, fixes=False)
    assert raw.returncode != 0
    assert "PagedAdam.__init__() got an unexpected keyword argument 'block_wise'" in raw.stderr
    fixed = run_python(BUILD_BNB_OPTIMIZERS, fixes=True)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert [line.split()[1] for line in fixed.stdout.splitlines() if line.startswith("BUILT")] == [
        "paged_adam", "paged_adamw", "adam_8bit", "paged_lion"]
    assert "BUILT paged_adam PagedAdam 0.0002" in fixed.stdout


def test_removed_bnb_arguments_are_dropped_only_when_harmless() -> None:
    from ludwig_mt.patches.fixes import drop_removed_bnb_arguments

    class NewStyle:  # the bitsandbytes 0.50 signature: neither argument exists any more
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999)): ...

    class OldStyle:
        def __init__(self, params, lr=1e-3, block_wise=True, percentile_clipping=100): ...

    kwargs = {"lr": 1e-4, "block_wise": True, "percentile_clipping": 100}
    assert drop_removed_bnb_arguments(NewStyle, kwargs) == {"lr": 1e-4}
    assert drop_removed_bnb_arguments(OldStyle, kwargs) == kwargs
    with pytest.raises(WorkflowError, match="percentile_clipping: 5 is not supported.*remove percentile_clipping"):
        drop_removed_bnb_arguments(NewStyle, {**kwargs, "percentile_clipping": 5})


def test_blank_after_first_eos_keeps_everything_up_to_the_first_eos() -> None:
    import torch

    from ludwig_mt.patches.fixes import blank_after_first_eos

    eos = 2
    predictions = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 0], [2, 0, 0, 0, 0], [5, 2, 3, 2, 0]])
    assert blank_after_first_eos(predictions, eos).tolist() == [
        [5, 6, 2, 2, 2], [5, 6, 7, 8, 0], [2, 2, 2, 2, 2], [5, 2, 2, 2, 2]]
    assert predictions[0, 3] == 0, "pure: the input is left as it was"


# A word-level model whose id 0 is the ordinary word "w0" (as id 0 is "!" in Qwen2.5 and Llama 3), with an
# end-of-sequence token made likely, so greedy generation stops early on most prompts.
EARLY_EOS_PREDICT = textwrap.dedent(
    """
    import json, logging, sys, random, torch, pandas as pd
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM
    from ludwig.api import LudwigModel
    work, V = Path(sys.argv[1]), 300
    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<s>": V - 3, "</s>": V - 2, "<pad>": V - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", V - 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="w1",
                            pad_token="<pad>").save_pretrained(work / "base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=V - 3,
                                         eos_token_id=V - 2, pad_token_id=V - 1, max_position_embeddings=256))
    with torch.no_grad():
        model.lm_head.weight[V - 2] *= 3.0
    model.save_pretrained(work / "base")
    rng = random.Random(0)
    words = lambda n, k: [" ".join(f"w{rng.randrange(1, V - 3)}" for _ in range(rng.randint(k // 2, k)))
                          for _ in range(n)]
    frame = pd.DataFrame({"prompt": words(12, 20), "response": words(12, 5), "split": [0] * 10 + [1, 1]})
    config = {"model_type": "llm", "base_model": str(work / "base"),
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "adapter": {"type": "lora"}, "generation": {"max_new_tokens": 16, "do_sample": False},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 1e-4},
              "preprocessing": {"split": {"type": "fixed", "column": "split"}}}
    ludwig_model = LudwigModel(config, logging_level=logging.WARNING)
    ludwig_model.train(dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True,
                       skip_save_progress=True, skip_save_log=True, skip_save_model=True)
    predictions, _ = ludwig_model.predict(pd.DataFrame({"prompt": words(10, 20)}), skip_save_predictions=True,
                                          skip_save_unprocessed_output=True)
    for response in predictions["response_response"]:
        print("RESPONSE", json.dumps(response))
    """
)


@pytest.mark.slow
def test_responses_that_stop_early_carry_no_padding_only_with_the_fix(tmp_path) -> None:
    # the same training on both sides (the other fixes change training: this model's pad id is not 0), so the
    # unfixed side leaves out only this fix; what generation appends after an early EOS is all that differs
    raw = run_python_script(EARLY_EOS_PREDICT, tmp_path / "raw", fixes=True,
                            env={"LUDWIG_MT_PATCHES_OFF": "stop_responses_at_eos"})
    fixed = run_python_script(EARLY_EOS_PREDICT, tmp_path / "fixed", fixes=True)
    for run in (raw, fixed):
        assert run.returncode == 0, run.stderr[-2000:]
    raw_rows, fixed_rows = ([json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
                             if line.startswith("RESPONSE ")] for run in (raw, fixed))
    assert len(raw_rows) == len(fixed_rows) == 10
    padded = 0
    for raw_text, fixed_text in zip(raw_rows, fixed_rows, strict=True):
        # the same greedy generation; without the fix Ludwig appends its id-0 padding ("w0") after an early eos
        assert raw_text.startswith(fixed_text), (raw_text, fixed_text)
        tail = raw_text[len(fixed_text):].split()
        assert set(tail) <= {"w0"}, (raw_text, fixed_text)
        padded += bool(tail)
    assert padded >= 5, "the model should stop early on most prompts, or this test shows nothing"


def test_without_4bit_quant_state_keeps_weights_and_adapters() -> None:
    from ludwig_mt.patches.fixes import without_4bit_quant_state

    layer = "model.base_model.model.model.layers.0.self_attn.q_proj"
    state = {f"{layer}.base_layer.weight": 1, f"{layer}.lora_A.default.weight": 2,
             **{f"{layer}.base_layer.weight.{suffix}": 0 for suffix in (
                 "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")}}
    assert without_4bit_quant_state(state) == {f"{layer}.base_layer.weight": 1, f"{layer}.lora_A.default.weight": 2}


# 4-bit QLoRA training to the end (Ludwig reloads its best checkpoint there). Run on CPU with the project's CPU
# refusal left out (LUDWIG_MT_NO_FIXES=1 in both runs); the fixed run applies only the checkpoint fix.
QUANTIZED_TRAINING = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    import pandas as pd
    from ludwig.api import LudwigModel
    from workflow.samples import sql_rows
    from ludwig_mt.tiny_model import build_tiny_llama
    work = Path(sys.argv[1])
    if sys.argv[2] == "fixed":
        from ludwig_mt.patches import registry
        registry.apply("reload_checkpoints_of_4bit_models")
    build_tiny_llama(work / "base")
    rows = pd.DataFrame(sql_rows(24))
    frame = pd.DataFrame({"prompt": rows["question"], "response": rows["answer"], "split": [0] * 20 + [1] * 4})
    config = {"model_type": "llm", "base_model": str(work / "base"),
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "quantization": {"bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
              "adapter": {"type": "lora"}, "generation": {"max_new_tokens": 8},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 1e-4},
              "preprocessing": {"split": {"type": "fixed", "column": "split"}}}
    LudwigModel(config, logging_level=logging.WARNING).train(
        dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True,
        skip_save_progress=True, skip_save_log=True)
    print("TRAINED")
    """
)


@pytest.mark.slow
def test_4bit_training_reloads_its_best_checkpoint_only_with_the_fix(tmp_path) -> None:
    runs = {}
    for mode in ("raw", "fixed"):
        work = tmp_path / mode
        work.mkdir()
        runs[mode] = subprocess.run([sys.executable, "-c", QUANTIZED_TRAINING, str(work), mode], capture_output=True,
                                    text=True, timeout=600, env=dict(os.environ, LUDWIG_MT_NO_FIXES="1"))
    assert runs["raw"].returncode != 0
    assert "Unexpected keys found in state dict" in runs["raw"].stderr
    assert ".weight.absmax" in runs["raw"].stderr
    assert runs["fixed"].returncode == 0, runs["fixed"].stderr[-3000:]
    assert "TRAINED" in runs["fixed"].stdout


# ------------------------------------------------------------------- resume: the learning rate and the batches
def test_batches_per_epoch_counts_the_dropped_one_row_batch() -> None:
    # Ludwig plans ceil(rows / batch) steps but drops a last batch of one row while training (ignore_last)
    assert [fixes.batches_per_epoch(rows, 8, True) for rows in (48, 49, 50, 55, 56, 57)] == [6, 6, 7, 7, 7, 7]
    assert [fixes.batches_per_epoch(rows, 8, False) for rows in (48, 49, 57)] == [6, 7, 8]
    assert fixes.batches_per_epoch(1, 1, True) == 1  # a batch of one is only dropped when batches are larger
    assert fixes.batches_per_epoch(0, 8, True) == 0


def test_batches_done_in_epoch() -> None:
    # 6 real batches per epoch (49 rows at batch 8): epoch 1 starts at step 6, not at Ludwig's planned step 7
    assert [fixes.batches_done_in_epoch(s, e, 6) for s, e in ((0, 0), (5, 0), (6, 1), (7, 1), (11, 1))] == [
        0, 5, 0, 1, 5]
    assert fixes.batches_done_in_epoch(12, 1, 6) == 0  # inconsistent with the data: skip nothing
    assert fixes.batches_done_in_epoch(3, 0, 0) == 0


def test_fast_forward_scheduler_reaches_the_uninterrupted_learning_rate() -> None:
    from ludwig.modules.lr_scheduler import LRScheduler
    from ludwig.schema.lr_scheduler import LRSchedulerConfig

    def scheduler() -> LRScheduler:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return LRScheduler(LRSchedulerConfig(decay="cosine", warmup_fraction=0.2), optimizer, 5, 20)

    uninterrupted, resumed = scheduler(), scheduler()
    for _ in range(7):
        uninterrupted.optimizer.step()
        uninterrupted.step()
    assert fixes.fast_forward_scheduler(resumed, 7) == 7
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(uninterrupted.optimizer.param_groups[0]["lr"])
    assert fixes.fast_forward_scheduler(resumed, 7) == 0  # already there: a no-op


# Over-long prompts through real Ludwig: the ids its training preprocessing builds, the ids `ludwig predict` (the same
# LudwigModel.load + predict the CLI runs) hands the model's generate, and eval's prompt_ids. argv: work dir, base
# model (a tokenizer that adds BOS), "train" (train, save, load, predict, eval) or "preprocess" (training ids only).
PROMPT_CUT = textwrap.dedent(
    """
    import json, logging, sys, pandas as pd, torch
    from pathlib import Path
    from transformers import AutoTokenizer
    from ludwig.api import LudwigModel
    from ludwig.utils.llm_utils import remove_left_padding
    work, base, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    instruction = "### Instruction: rewrite the sentence so that it is polite and keeps its meaning. "
    prompts = [instruction * (i % 4) + f"### Input:\\nHow many heads are older than {i} ?\\n### Answer:\\n"
               for i in range(12)]
    frame = pd.DataFrame({"prompt": prompts, "response": [f"SELECT {i}" for i in range(12)],
                          "split": [0] * 10 + [1, 1]})
    config = {"model_type": "llm", "base_model": base,
              "input_features": [{"name": "prompt", "type": "text", "preprocessing": {"max_sequence_length": 24}}],
              "output_features": [{"name": "response", "type": "text", "preprocessing": {"max_sequence_length": 8}}],
              "adapter": {"type": "lora"}, "generation": {"max_new_tokens": 4, "do_sample": False},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 1e-4},
              "preprocessing": {"split": {"type": "fixed", "column": "split"}, "global_max_sequence_length": 64},
              "backend": {"type": "local"}}
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LudwigModel(config, logging_level=logging.WARNING)
    training, _, _, _ = model.preprocess(frame, skip_save_processed_input=True)  # what training trains on
    rows = training.dataset[next(k for k in training.dataset if k.startswith("prompt_"))]
    print("IDS", json.dumps({"prompts": prompts[:10], "encoded": [tokenizer.encode(p) for p in prompts[:10]],
                             "train": [remove_left_padding(torch.tensor(row), tokenizer)[0].tolist() for row in rows]}))
    if mode == "train":
        model.train(dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True,
                    skip_save_progress=True, skip_save_log=True)
        model_dir = next((work / "results").glob("*/model"))
        loaded = LudwigModel.load(str(model_dir))
        fed = []
        inner = loaded.model.model
        generate = inner.generate
        def recording(*args, **kwargs):
            fed.append(kwargs["input_ids"][0].tolist())
            return generate(*args, **kwargs)
        inner.generate = recording
        loaded.predict(pd.DataFrame({"prompt": prompts[:10]}), skip_save_predictions=True,
                       skip_save_unprocessed_output=True)
        from eval.generate import prompt_ids, settings_from_model_dir
        settings = settings_from_model_dir(model_dir)
        print("IDS", json.dumps({"predict": fed, "eval": [
            prompt_ids(tokenizer, p, settings, context_len=1024, max_new_tokens=settings.max_new_tokens)
            for p in prompts[:10]], "max_input_tokens": settings.max_input_tokens}))
    """
)


@pytest.fixture(scope="module")
def bos_model(tiny_model, tmp_path_factory):
    """The session's tiny Llama with a tokenizer that adds BOS (as Llama's and stories260k's do)."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bos-llama")
    for path in tiny_model.iterdir():
        if path.is_file() and not path.name.startswith("tokenizer"):
            shutil.copy(path, out / path.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(out)
    return out


def _ids(run: subprocess.CompletedProcess[str]) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    found: dict = {}
    for line in run.stdout.splitlines():
        if line.startswith("IDS "):
            found.update(json.loads(line[4:]))
    return found


def _ends_with_the_answer_cue(tokenizer, ids: list[int]) -> bool:
    return tokenizer.decode(ids, skip_special_tokens=True).endswith("### Answer:\n")


@pytest.mark.slow
def test_training_predict_and_eval_cut_over_long_prompts_alike_keeping_the_answer_cue(bos_model, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bos_model)
    ids = _ids(run_python_script(PROMPT_CUT, tmp_path, fixes=True, args=[str(bos_model), "train"]))
    limit = ids["max_input_tokens"]
    assert limit == 24
    long = [i for i, encoded in enumerate(ids["encoded"]) if len(encoded) > limit]
    assert len(long) >= 5 and len(long) < len(ids["encoded"]), "some prompts over the limit, some not"
    # the same ids, prompt by prompt: training preprocessing, what `ludwig predict` feeds generate, eval
    assert ids["train"] == ids["predict"] == ids["eval"]
    for i in long:
        assert len(ids["train"][i]) == limit and ids["train"][i][0] == tokenizer.bos_token_id
        assert ids["train"][i] == [ids["encoded"][i][0], *ids["encoded"][i][-(limit - 1):]]
        assert _ends_with_the_answer_cue(tokenizer, ids["train"][i])
    assert all(ids["train"][i] == ids["encoded"][i] for i in range(10) if i not in long)  # short ones intact


@pytest.mark.slow
@pytest.mark.parametrize("switch", [{"LUDWIG_MT_NO_FIXES": "1"},
                                    {"LUDWIG_MT_PATCHES_OFF": "cut_prompts_from_the_instruction_side"}],
                         ids=["no-fixes", "patch-off"])
def test_without_the_fix_ludwig_cuts_the_end_of_over_long_prompts(bos_model, tmp_path, switch) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bos_model)
    ids = _ids(run_python_script(PROMPT_CUT, tmp_path, fixes=True, args=[str(bos_model), "preprocess"], env=switch))
    long = [i for i, encoded in enumerate(ids["encoded"]) if len(encoded) > 24]
    assert len(long) >= 5
    for i in long:  # raw Ludwig keeps the FIRST tokens: the instruction; the input and the answer cue are gone
        assert ids["train"][i] == ids["encoded"][i][:24]
        assert not _ends_with_the_answer_cue(tokenizer, ids["train"][i])


UNKNOWN_KEY_ACCEPTED = textwrap.dedent(
    """
    import sys
    from ludwig.config_validation.validation import check_schema
    from ludwig_mt.config import load_yaml
    check_schema(load_yaml(sys.argv[1] + "/bad.yaml"))
    print("ACCEPTED")
    """
)


@pytest.mark.slow  # two fresh interpreters importing Ludwig
def test_ludwig_train_refuses_a_key_ludwig_would_ignore_only_with_the_fix(tmp_path) -> None:
    from ludwig_mt.config import config_file, load_yaml, write_yaml
    from workflow.train import ludwig_executable

    config = load_yaml(config_file("sql"))
    config["trainer"]["epochz"] = 3
    bad = write_yaml(config, tmp_path / "bad.yaml")
    raw = run_python_script(UNKNOWN_KEY_ACCEPTED, tmp_path, fixes=False)
    assert raw.returncode == 0 and "ACCEPTED" in raw.stdout, raw.stderr[-2000:]  # Ludwig's own schema: silent
    fixed = subprocess.run([ludwig_executable(), "train", "--config", str(bad), "--dataset", str(tmp_path / "x.csv")],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, LUDWIG_MT_NO_FIXES="0"))
    assert fixed.returncode == 2
    assert fixed.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: unknown key 'trainer.epochz', which Ludwig 0.17.10 would ignore silently. Fix: rename it to "
        "'epochs'")


def test_random_states_saved_with_a_checkpoint_come_back_only_for_its_step(tmp_path) -> None:
    """What a resumed run restores (``resume_mid_epoch_where_it_stopped``): every generator dropout and shuffles
    draw from, as it was at the checkpoint's step; a file of another step is left alone."""
    import random

    import numpy as np

    path = tmp_path / "state.pt"
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"steps": 5, "ranks": fixes.gathered_random_states()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    assert not fixes.restore_random_states(path, 6) and not fixes.restore_random_states(tmp_path / "none.pt", 5)
    assert fixes.restore_random_states(path, 5)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and (again[1] == expected[1]).all() and again[2] == expected[2]


def test_a_ctrl_c_during_a_checkpoint_save_is_held_and_delivered_after_it_not_dropped() -> None:
    """What Ludwig's ``Checkpoint.save`` does with SIGINT (a no-op handler around the save, then the earlier one
    back), through the real ``signal`` module (raw: the Ctrl-C is lost) and through the fix's stand-in (held)."""
    import signal

    def save(sig) -> None:
        original = sig.getsignal(signal.SIGINT)
        sig.signal(signal.SIGINT, lambda _sig, _frame: None)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the save
        finally:
            sig.signal(signal.SIGINT, original)

    seen: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        save(signal)
        assert seen == []  # raw Ludwig: dropped
        save(fixes.DeferringSignal(signal))
        assert seen == [signal.SIGINT]  # fixed: delivered once, after the save
    finally:
        signal.signal(signal.SIGINT, before)


# ------------------------------------------------------------------------------------- train_eos_row_when_frozen_dead

def tied_llama(dead_rows: int) -> torch.nn.Module:
    """A tiny tied-embedding Llama whose EOS row (id 2) shares one vector with ``dead_rows`` other rows, as rows
    no pretraining target ever pulled up end up (stories260k: 253 of 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))
    with torch.no_grad():
        rows = model.get_input_embeddings().weight
        rows *= 100  # row norms of a trained model (~2), not of the 0.02-std init
        rows[3:3 + dead_rows] = rows[2]
    return model


def test_eos_ceiling_tells_a_dead_eos_row_from_a_learned_one() -> None:
    assert fixes.eos_ceiling(tied_llama(dead_rows=100), 2) < 0.02  # at most 1/101
    assert fixes.eos_ceiling(tied_llama(dead_rows=0), 2) >= fixes.EOS_LEARNABLE
    assert fixes.eos_row_dead(tied_llama(dead_rows=100), 2)[0]
    assert not fixes.eos_row_dead(tied_llama(dead_rows=0), 2)[0]


def test_a_flat_random_head_is_not_a_dead_eos_row(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # random init: every token's logit is near 0
    dead, ceiling = fixes.eos_row_dead(model, model.config.eos_token_id)
    assert ceiling < fixes.EOS_LEARNABLE and not dead


# stories260k (the committed demo asset; its </s> was never a pretraining target) fine-tuned with LoRA through
# LudwigModel on a trivially learnable set: say the word the prompt names. Prints P(EOS) right after the answer,
# measured on the reloaded model, and what `predict` returns.
STOPPING_TOY = textwrap.dedent(
    """
    import json, logging, statistics, sys, torch, pandas as pd
    from pathlib import Path
    from ludwig.api import LudwigModel
    torch.set_num_threads(1)
    work, base, reload = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "reload"
    words = ["red", "blue", "green", "happy", "sad", "big", "small", "cat", "dog", "sun", "tree", "ball"]
    prompt = lambda w: f"Tom saw a {w} thing. Say the word: {w}.\\nWord:"
    frame = pd.DataFrame({"prompt": [prompt(w) for w in words] * 4, "response": words * 4, "split": [0] * 48})
    config = {"model_type": "llm", "base_model": base,
              "input_features": [{"name": "prompt", "type": "text", "preprocessing": {"max_sequence_length": 32}}],
              "output_features": [{"name": "response", "type": "text",
                                   "preprocessing": {"max_sequence_length": 8}}],
              "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
              "generation": {"max_new_tokens": 8, "do_sample": False},
              "trainer": {"type": "finetune", "epochs": 8, "batch_size": 8, "learning_rate": 0.003,
                          "optimizer": {"type": "adamw"}},
              "preprocessing": {"global_max_sequence_length": 48, "split": {"type": "fixed", "column": "split"}}}
    model = LudwigModel(config, logging_level=logging.WARNING)
    model.train(dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True,
                skip_save_progress=True, skip_save_log=True, skip_save_model=not reload)
    if reload:
        model = LudwigModel.load(str(work / "results" / "api_experiment_run" / "model"), backend="local")
    tok, net = model.model.tokenizer, model.model.model.eval()
    p_eos = []
    for w in words:
        ids = tok(prompt(w))["input_ids"] + tok(w)["input_ids"]
        with torch.no_grad():
            p_eos.append(net(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)[tok.eos_token_id].item())
    print("P_EOS", statistics.median(p_eos))
    predictions, _ = model.predict(pd.DataFrame({"prompt": [prompt(w) for w in words]}), skip_save_predictions=True,
                                   skip_save_unprocessed_output=True)
    print("ANSWERS", json.dumps([str(a).strip() for a in predictions["response_response"]]))
    """
)


@pytest.mark.slow
def test_lora_learns_to_stop_on_a_dead_eos_row_only_with_the_fix(tmp_path) -> None:
    from workflow.demo import BASE_MODEL  # stories260k, committed under workflow/assets

    runs = {fixed: run_python_script(STOPPING_TOY, tmp_path / str(fixed), fixes=fixed,
                                     args=[str(BASE_MODEL), "reload" if fixed else "no"])
            for fixed in (False, True)}
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-2000:]
    read = {fixed: {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
                    if line.startswith(("P_EOS ", "ANSWERS "))} for fixed, run in runs.items()}
    words = ["red", "blue", "green", "happy", "sad", "big", "small", "cat", "dog", "sun", "tree", "ball"]
    # raw: the word is learned, but no hidden state can make EOS likely, so every answer runs on
    assert read[False]["P_EOS"] < 0.01
    assert all(answer != word for answer, word in zip(read[False]["ANSWERS"], words, strict=True))
    # fixed (and saved, reloaded by LudwigModel.load): the answer is the word, and generation stops there
    assert read[True]["P_EOS"] > 0.9
    assert read[True]["ANSWERS"] == words
def test_merged_training_rows_attend_to_their_tokens_not_their_padding_only_with_the_fix() -> None:
    """pad = EOS = 2 as in SmolLM2: raw Ludwig pads the short row with id 0 and attends to it; fixed, the padding
    is the pad token and masked, and every real token (the appended EOS target included) is attended."""
    from types import SimpleNamespace

    import ludwig.api  # noqa: F401  (the import hook applies the registry's patches)
    import ludwig.models.llm
    from ludwig.utils import llm_utils

    from ludwig_mt.patches import core, registry

    registry.apply_all()
    tokenizer = SimpleNamespace(pad_token_id=2, eos_token_id=2, bos_token_id=1)
    prompts = torch.tensor([[2, 2, 1, 20, 21], [2, 2, 2, 1, 30]])  # Ludwig's left-padded prompt and response ids
    responses = torch.tensor([[40, 41], [2, 50]])
    for generate_merged_ids in (llm_utils.generate_merged_ids, ludwig.models.llm.generate_merged_ids):
        ids, mask = generate_merged_ids(prompts, responses, tokenizer, 64)
        assert ids.tolist() == [[1, 20, 21, 40, 41, 2], [2, 2, 1, 30, 50, 2]]
        assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]] and mask.dtype == torch.int64
    raw_ids, raw_mask = core.original("ludwig.utils.llm_utils:generate_merged_ids")(prompts, responses, tokenizer, 64)
    assert raw_ids[1].tolist() == [0, 0, 1, 30, 50, 2] and raw_mask[1].tolist() == [1] * 6  # the bug
    assert fixes.left_pad_rows([torch.tensor([5, 2]), torch.tensor([2])], pad_id=2)[1].tolist() == [[1, 1], [0, 1]]


# ------------------------------------- training rows built for the whole batch: the same as Ludwig's per-row loop
# merged_rows, left_pad_rows and speedups.pack_rows run on the CPU every training step; they are
# whole-batch tensor ops. The references below are the per-row code they replaced (merged_rows: Ludwig's own
# remove_left_padding, twice per row), compared on random batches whose pad, BOS and EOS ids collide with each
# other and with ordinary tokens.
IGNORE = -100


def per_row_merged_rows(input_ids, target_ids, tokenizer, max_length):
    from ludwig.utils.llm_utils import remove_left_padding

    eos = torch.tensor([tokenizer.eos_token_id], device=target_ids[0].device)
    rows = []
    for prompt, target in zip(input_ids, target_ids):
        prompt = remove_left_padding(prompt, tokenizer)[0]
        merged = torch.cat((prompt, remove_left_padding(target, tokenizer)[0], eos))
        if max_length and merged.shape[0] > max_length:
            merged = merged[:max_length]
        rows.append((merged, min(prompt.shape[0], merged.shape[0])))
    return rows


def per_row_left_pad_rows(rows, pad_id):
    width = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.int64, device=rows[0].device)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[0]:] = row
        mask[i, width - row.shape[0]:] = 1
    return ids, mask


def per_row_pack_rows(rows, pack_length, pad_id):
    order = sorted(range(len(rows)), key=lambda i: -rows[i][0].shape[0])
    packs, free = [], []
    for i in order:
        n = rows[i][0].shape[0]
        slot = next((p for p, room in enumerate(free) if room >= n), None)
        if slot is None:
            packs.append([]), free.append(pack_length)
            slot = len(packs) - 1
        packs[slot].append(i)
        free[slot] -= n
    width = max(pack_length - room for room in free)
    device = rows[0][0].device
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((len(packs), width), dtype=torch.long, device=device)
    labels = torch.full((len(packs), width), IGNORE, dtype=torch.long, device=device)
    for p, members in enumerate(packs):
        at = 0
        for i in members:
            seq, n_prompt = rows[i]
            n = seq.shape[0]
            ids[p, at:at + n] = seq
            pos[p, at:at + n] = torch.arange(n, device=device)
            labels[p, at + n_prompt:at + n] = seq[n_prompt:]
            at += n
        pos[p, at:] = torch.arange(n, n + width - at, device=device)  # the tail padding continues the last row
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """One int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def random_ids(gen: torch.Generator, rows: int, width: int, vocab: int, pad_id: int, bos_id: int) -> torch.Tensor:
    """Rows of a few token ids (so pad, BOS and EOS also turn up mid-row), some left-padded, some all padding, some
    all padding but the last token, some BOS right after the padding."""
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    for i in range(rows):
        shape = randint(gen, 0, 4)
        n_pad = {0: 0, 1: width, 2: max(width - 1, 0)}.get(shape, randint(gen, 0, width))
        ids[i, :n_pad] = pad_id
        if shape == 4 and n_pad < width:
            ids[i, n_pad] = bos_id
    return ids


def random_batch(gen: torch.Generator):
    from types import SimpleNamespace

    vocab = randint(gen, 2, 9)
    pad_id, bos_id, eos_id = (randint(gen, 0, vocab - 1) for _ in range(3))
    if randint(gen, 0, 3) == 0:
        eos_id = pad_id
    rows = randint(gen, 1, 6)
    prompts = random_ids(gen, rows, randint(gen, 0, 12), vocab, pad_id, bos_id)
    targets = random_ids(gen, rows, randint(gen, 0, 8), vocab, pad_id, bos_id)
    if randint(gen, 0, 4) == 0:
        prompts, targets = prompts.to(torch.int32), targets.to(torch.int32)
    max_length = [None, 0, randint(gen, 1, 22), randint(gen, 1, 8), -randint(gen, 1, 3)][randint(gen, 0, 4)]
    return prompts, targets, SimpleNamespace(pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id), max_length


def assert_same_rows(new, reference) -> None:
    assert len(new) == len(reference)
    for (ids, n_prompt), (ref_ids, ref_n_prompt) in zip(new, reference, strict=True):
        assert ids.dtype == ref_ids.dtype == torch.int64 and ids.device == ref_ids.device
        assert torch.equal(ids, ref_ids), (ids, ref_ids)
        assert type(n_prompt) is int and n_prompt == ref_n_prompt


def assert_same_tensors(new, reference) -> None:
    for a, b in zip(new, reference, strict=True):
        assert a.dtype == b.dtype == torch.int64 and a.device == b.device and torch.equal(a, b), (a, b)


def test_merged_rows_are_ludwigs_per_row_merge_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        prompts, targets, tokenizer, max_length = random_batch(gen)
        reference = per_row_merged_rows(prompts, targets, tokenizer, max_length)
        assert_same_rows(fixes.merged_rows(prompts, targets, tokenizer, max_length), reference)
    assert_same_rows(fixes.merged_rows(list(prompts), list(targets), tokenizer, max_length), reference)  # row lists


def test_merged_rows_without_a_bos_or_pad_id_match_no_token() -> None:
    """Ludwig's loop raises TypeError on a None id (``tensor == None`` is False); here it is an id no token has."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        prompts, targets, tokenizer, max_length = random_batch(gen)
        for name in ("bos_token_id", "pad_token_id"):
            unmatched = SimpleNamespace(**{**vars(tokenizer), name: -1})
            none = SimpleNamespace(**{**vars(tokenizer), name: None})
            assert_same_rows(fixes.merged_rows(prompts, targets, none, max_length),
                             per_row_merged_rows(prompts, targets, unmatched, max_length))


def test_padding_and_packing_of_merged_rows_are_the_per_row_ones() -> None:
    from ludwig_mt.patches import speedups

    gen = torch.Generator().manual_seed(2)
    for _ in range(400):
        prompts, targets, tokenizer, max_length = random_batch(gen)
        rows = fixes.merged_rows(prompts, targets, tokenizer, max_length)
        ids = [row for row, _ in rows]
        assert_same_tensors(fixes.left_pad_rows(ids, tokenizer.pad_token_id),
                            per_row_left_pad_rows(ids, tokenizer.pad_token_id))
        pack_length = randint(gen, 1, 2 * max(row.shape[0] for row in ids) + 1)  # rows longer than a pack too
        packed = speedups.pack_rows(rows, pack_length, tokenizer.pad_token_id)
        reference = per_row_pack_rows(rows, pack_length, tokenizer.pad_token_id)
        assert packed.keys() == reference.keys()
        assert_same_tensors(packed.values(), reference.values())


# ---------------------------------------------------------------------------- stop_on_nan_on_every_rank_with_its_cause


class OtherRankFoundNaN:
    """Ludwig's distributed strategy as seen from local rank 1 when rank 0 found NaN: every all-reduce adds 1."""

    def __init__(self, others: int) -> None:
        self.others = others

    def local_rank(self) -> int:
        return 1

    def allreduce(self, tensor: torch.Tensor) -> None:
        tensor += self.others


def trainer_stub(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(device="cpu", config=SimpleNamespace(learning_rate=3e-4), dist_model=None, **fields)


@pytest.mark.parametrize("others", [0, 1])
def test_the_nan_check_gives_every_rank_the_same_answer(others: int) -> None:
    """Raw Ludwig answers on local rank 0 only (None on rank 1: it trains on while rank 0 stops, and waits)."""
    import ludwig.api  # noqa: F401  (applies the patches)
    from ludwig.trainers.trainer import Trainer

    stub = trainer_stub(distributed=OtherRankFoundNaN(others))
    assert Trainer._has_nan_or_inf_weights(stub, torch.nn.Linear(2, 2)) is bool(others)


def eval_and_checkpoint_kwargs(tracker) -> dict:
    names = ("loss", "all_losses", "training_set", "validation_set", "test_set", "train_summary_writer",
             "validation_summary_writer", "test_summary_writer", "model_hyperparameters_path", "output_features",
             "metrics_names", "early_stopping_steps", "checkpoint_manager")
    return {**dict.fromkeys(names), "progress_tracker": tracker, "save_path": "results/run/model"}


def test_a_nan_stop_before_any_evaluation_raises_one_line_and_after_one_keeps_ludwigs_stop() -> None:
    import ludwig.api  # noqa: F401  (applies the patches)
    from types import SimpleNamespace

    from ludwig.trainers.trainer import Trainer

    stub = trainer_stub(_has_nan_or_inf_weights=lambda model: True)
    fresh = SimpleNamespace(steps=8, train_metrics={"combined": {"loss": []}}, validation_metrics={})
    with pytest.raises(WorkflowError, match=r"^results/run/model: training diverged: .* at step 8 .*learning_rate "
                       r"\(0.0003\)"):
        Trainer._eval_and_checkpoint(stub, **eval_and_checkpoint_kwargs(fresh))
    evaluated = SimpleNamespace(steps=16, train_metrics={"combined": {"loss": [(0, 8, 2.5)]}}, validation_metrics={})
    assert Trainer._eval_and_checkpoint(stub, **eval_and_checkpoint_kwargs(evaluated)) == (False, True)


DIVERGING_TRAINING = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    import pandas as pd
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from ludwig.api import LudwigModel
    from ludwig_mt.errors import WorkflowError
    from workflow.samples import sql_rows
    from ludwig_mt.tiny_model import build_tiny_llama
    work = Path(sys.argv[1])
    build_tiny_llama(work / "base")
    register_optimizer_step_post_hook(  # the run diverges at its first step
        lambda optimizer, args, kwargs: optimizer.param_groups[0]["params"][0].data.fill_(float("nan")))
    rows = pd.DataFrame(sql_rows(24))
    frame = pd.DataFrame({"prompt": rows["question"], "response": rows["answer"], "split": [0] * 20 + [1] * 4})
    config = {"model_type": "llm", "base_model": str(work / "base"),
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "adapter": {"type": "lora"}, "generation": {"max_new_tokens": 4},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "steps_per_checkpoint": 2},
              "preprocessing": {"split": {"type": "fixed", "column": "split"}}}
    try:  # skip_save_model, as the benchmarks train
        LudwigModel(config, logging_level=logging.WARNING).train(
            dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True,
            skip_save_model=True, skip_save_log=True)
    except WorkflowError as error:
        print("ERROR", error)
    """
)


@pytest.mark.slow
def test_a_run_that_diverges_before_evaluating_says_so_not_min_of_an_empty_iterable(tmp_path) -> None:
    run = run_python_script(DIVERGING_TRAINING, tmp_path, fixes=True)
    assert run.returncode == 0, run.stderr[-3000:]
    [line] = [x for x in run.stdout.splitlines() if x.startswith("ERROR ")]
    assert "training diverged: NaN or inf in the model's weights at step 2" in line
    assert "min() iterable argument is empty" not in run.stderr


def test_a_detached_step_result_lets_go_of_what_a_checkpointed_step_held() -> None:
    """Reentrant checkpointing keeps a layer's call (here its keyword mask) in the graph after the backward: kept
    attached, the step's loss keeps the mask; detached, the result holds the values alone."""
    import functools
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(4, 4)
    mask = torch.ones(2, 4)
    mask_alive = weakref.ref(mask)
    loss = checkpoint(functools.partial(lambda x, mask: layer(x) * mask, mask=mask), torch.randn(2, 4, requires_grad=True),
                      use_reentrant=True).sum()
    del mask
    loss.backward()
    result = (loss, {"response": loss * 1.0}, 8)
    del loss
    gc.collect()
    assert mask_alive() is not None  # the backward is done, the graph still holds the mask
    kept = fixes.detached_step_result(result)
    del result
    gc.collect()
    assert mask_alive() is None
    assert kept[0].grad_fn is None and kept[1]["response"].grad_fn is None and kept[2] == 8
    assert kept[0].item() == pytest.approx(kept[1]["response"].item())


GRAPH_SPY = textwrap.dedent(
    """
    import json, logging, sys, weakref
    from pathlib import Path
    import pandas as pd
    import torch
    from ludwig.api import LudwigModel
    from ludwig.trainers.trainer import Trainer
    from workflow.samples import sql_rows
    from ludwig_mt.tiny_model import build_tiny_llama
    work = Path(sys.argv[1])
    build_tiny_llama(work / "base")
    held, previous = [], []  # per step: is an attached loss of the step before still alive when it begins
    forward_pass = Trainer._forward_pass
    def spying(self, *args, **kwargs):
        held.append(any(alive() is not None for alive in previous))
        outputs, loss, all_losses = forward_pass(self, *args, **kwargs)
        previous[:] = [weakref.ref(t) for t in (loss, *all_losses.values()) if getattr(t, "grad_fn", None) is not None]
        return outputs, loss, all_losses
    Trainer._forward_pass = spying
    rows = pd.DataFrame(sql_rows(20))
    frame = pd.DataFrame({"prompt": rows["question"], "response": rows["answer"], "split": [0] * 16 + [1] * 4})
    config = {"model_type": "llm", "base_model": str(work / "base"),
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "response", "type": "text"}],
              "adapter": {"type": "lora"}, "generation": {"max_new_tokens": 4},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "enable_gradient_checkpointing": True},
              "preprocessing": {"split": {"type": "fixed", "column": "split"}}}
    LudwigModel(config, logging_level=logging.WARNING).train(
        dataset=frame, output_directory=str(work / "results"), skip_save_processed_input=True, skip_save_model=True,
        skip_save_log=True, skip_save_progress=True)
    print("HELD", json.dumps(held))
    """
)


@pytest.mark.slow  # two fresh interpreters training the tiny model
def test_a_training_step_begins_without_the_previous_steps_graph_only_with_the_fix(tmp_path) -> None:
    off = {"LUDWIG_MT_PATCHES_OFF": "release_each_steps_graph_when_it_returns"}
    runs = {fixed: run_python_script(GRAPH_SPY, tmp_path / str(fixed), fixes=True, env=None if fixed else off)
            for fixed in (False, True)}
    held = {}
    for fixed, run in runs.items():
        assert run.returncode == 0, run.stderr[-3000:]
        [line] = [x for x in run.stdout.splitlines() if x.startswith("HELD ")]
        held[fixed] = json.loads(line.split(" ", 1)[1])
    assert len(held[True]) == len(held[False]) == 4  # 16 rows in batches of 4
    assert held[False] == [False, True, True, True]  # Ludwig's loop: each step starts with the last one's graph
    assert held[True] == [False] * 4


@pytest.mark.parametrize("optimizer", ["paged_adam_8bit", "adam_8bit"])
def test_an_8bit_optimizer_leaves_the_base_embedding_frozen(tiny_model, optimizer: str) -> None:
    """Ludwig's trainer swaps the embedding for bitsandbytes' under an 8-bit optimizer (kept: its 32-bit optimizer
    override), but the swap made the base model's embedding trainable in a LoRA run; with the fix the same
    parameters train before and after it, and the weight is the one that was loaded."""
    import ludwig.api  # noqa: F401  (the import hook applies the registry's patches)
    from bitsandbytes.nn import Embedding as BnbEmbedding
    from ludwig.models.llm import LLM
    from ludwig.schema.model_types.base import ModelConfig
    from ludwig.trainers import trainer as ludwig_trainer

    from ludwig_mt.patches import registry

    registry.apply_all()
    config = ModelConfig.from_dict({
        "model_type": "llm", "base_model": str(tiny_model), "adapter": {"type": "lora"},
        "input_features": [{"name": "prompt", "type": "text"}], "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"type": "finetune", "optimizer": {"type": optimizer}}})
    model = LLM(config)
    model.prepare_for_training()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    loaded = model.model.get_input_embeddings().weight
    assert trainable and all("lora_" in name for name in trainable)
    ludwig_trainer.update_embedding_layer(model, config.trainer)  # what Trainer.__init__ calls
    swapped = model.model.get_input_embeddings()
    assert isinstance(swapped, BnbEmbedding) and swapped.weight.data_ptr() == loaded.data_ptr()
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
