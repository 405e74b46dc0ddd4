"""ludwig_mt.tokens: which side of an over-long prompt is cut, and sequence lengths that fit a model's context."""

from __future__ import annotations

from pathlib import Path

import pytest

from ludwig_mt.errors import WorkflowError
from ludwig_mt.tokens import (
    GENERATION_MARGIN,
    context_length,
    keep_prompt_tail,
    load_tokenizer,
    measure_lengths,
    percentile,
    plan_lengths,
    token_lengths,
)


def test_keep_prompt_tail_drops_the_first_tokens_and_keeps_a_leading_bos() -> None:
    ids = [1, 10, 11, 12, 13, 14]  # 1 = BOS
    assert keep_prompt_tail(ids, 4, bos_id=1) == [1, 12, 13, 14]
    assert keep_prompt_tail(ids, 4, bos_id=None) == [11, 12, 13, 14]
    assert keep_prompt_tail([10, 11, 12, 13], 2, bos_id=1) == [12, 13]  # no BOS at the start: plain tail
    assert keep_prompt_tail(ids, 1, bos_id=1) == [1]
    assert keep_prompt_tail(ids, 6, bos_id=1) == ids and keep_prompt_tail(ids, 0, bos_id=1) == []
    assert ids == [1, 10, 11, 12, 13, 14], "pure: the input is left as it was"


def test_percentile_is_a_value_that_occurs() -> None:
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([7], 99) == 7


def test_plan_keeps_responses_whole_and_gives_prompts_the_rest_of_the_context() -> None:
    # stories260k on banking77: prompts ~1,384 tokens, intent names up to 10, a 512-token context
    prompts, responses = [1380 + i % 10 for i in range(200)], [4 + i % 7 for i in range(200)]
    plan = plan_lengths(prompts, responses, 512, configured_input=704, configured_new_tokens=24,
                        configured_global=2048)  # banking77.yaml's own values, sized for Qwen's tokenizer
    assert (plan.output_max, plan.max_new_tokens) == (10, 11)
    assert plan.input_max == 512 - 11 - GENERATION_MARGIN == 493
    assert plan.global_max == 512  # the YAML's 2048-token packs, capped at the context
    assert plan.input_max + plan.output_max + 1 <= plan.global_max  # the longest merged row keeps its response
    assert plan.prompts_cut == 200 and "200 of 200 prompts are longer than 493" in plan.describe()


def test_plan_sizes_prompts_to_their_p99_when_they_fit() -> None:
    prompts = [50] * 99 + [400]  # one outlier does not set the width of every batch
    plan = plan_lengths(prompts, [30] * 100, 8192)
    assert (plan.input_max, plan.prompt_max, plan.prompts_cut) == (50, 400, 1)
    assert plan.max_new_tokens == 31 and plan.global_max == 50 + 30 + 1  # no configured pack length: the longest row
    assert plan_lengths([50], [31], 8192).max_new_tokens == 33  # never 32: Ludwig would replace it
    assert plan_lengths([50], [4], 8192, configured_new_tokens=32).max_new_tokens == 31


def test_plan_keeps_the_yamls_larger_values_where_the_context_holds_them() -> None:
    prompts = [600] * 98 + [620, 667]  # SmolLM2 on banking77: the YAML's 704 input tokens hold every prompt
    plan = plan_lengths(prompts, [17] * 100, 8192, configured_input=704, configured_new_tokens=24,
                        configured_global=2048)
    assert (plan.input_max, plan.prompts_cut, plan.max_new_tokens, plan.global_max) == (704, 0, 24, 2048)
    assert plan_lengths([12] * 10, [1] * 10, 8192, configured_new_tokens=4).max_new_tokens == 4  # room to answer
    # extra new tokens only from context that no prompt needs: 512 - 11 - 8 - 400 = 93 spare
    squeezed = plan_lengths([400] * 10, [10] * 10, 512, configured_new_tokens=320)
    assert (squeezed.max_new_tokens, squeezed.input_max) == (11 + 93, 400)


def test_plan_refuses_with_the_numbers_when_responses_leave_no_room() -> None:
    with pytest.raises(WorkflowError) as info:
        plan_lengths([300, 320], [500, 20], 512, source="data/lamini_docs/train.csv")
    message = str(info.value)
    assert message.startswith("data/lamini_docs/train.csv: responses do not fit the model's context: the longest "
                              "response is 500 tokens, + 1 end-of-sequence + 8 (Ludwig's generation margin) leaves "
                              "3 of 512 tokens for a prompt (longest prompt 320; 1 of 2 responses too long). Fix: ")
    assert "\n" not in message
    assert plan_lengths([5, 6], [490, 1], 512).input_max == 6  # short prompts fit in a small room
    with pytest.raises(WorkflowError, match="no rows to measure"):
        plan_lengths([], [], 512)


def test_measure_lengths_counts_as_ludwig_encodes(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    texts = ["SELECT name FROM head", "x", "How many heads of the departments are older than 56 ?"]
    assert token_lengths(tokenizer, texts) == [len(tokenizer.encode(t)) for t in texts]
    assert token_lengths(tokenizer, ["SELECT"], lowercase=True) == [len(tokenizer.encode("select"))]
    assert context_length(str(tiny_model)) == 1024
    plan = measure_lengths(str(tiny_model), texts, ["a", "b", "c"])
    assert plan.prompt_max == max(token_lengths(tokenizer, texts)) and plan.context_len == 1024


def test_a_folder_without_a_model_config_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="no model config could be loaded") as info:
        context_length(str(tmp_path))
    assert "\n" not in str(info.value)
