"""Regression tests for every Ludwig 0.17.10 workaround in ludwig_mt/ludwig_fixes.py.

Each test shows the failure with raw Ludwig (LUDWIG_MT_NO_FIXES=1 in a subprocess) and the fixed behaviour, so
removing a fix makes its test fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ludwig_mt.ludwig_fixes import WorkflowError, check_quantization_supported

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


def test_saved_llm_config_with_null_adapters_validates_only_with_the_fix() -> None:
    raw = run_python(SAVED_CONFIG_CHECK, fixes=False)
    assert raw.returncode != 0 and "None is not of type 'object'" in raw.stderr
    fixed = run_python(SAVED_CONFIG_CHECK, fixes=True)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "VALID" in fixed.stdout


def test_fixes_are_applied_automatically_when_ludwig_api_is_imported() -> None:
    code = "import ludwig.api\nfrom ludwig_mt import ludwig_fixes\nprint(sorted(ludwig_fixes._APPLIED))"
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
