"""How text becomes a base model's tokens: the tokenizer as Ludwig loads it, the model's context length, the token
lengths of a dataset's rows, the sequence lengths that fit them, and which side of an over-long prompt is cut.

Sequence lengths in a Ludwig YAML are counts of ONE tokenizer's tokens. The task YAMLs were sized for a 150k-piece
BPE; through another tokenizer the same rows can be far longer (banking77's prompt, which lists all 77 intents, is
~1,200 tokens through stories260k's 512-piece vocabulary, against a 512-token context). Kept as they were, the
lengths cut every prompt and push the response out of the merged training row (loss = nan: no target token left).
So a YAML rendered for another base model gets lengths measured on the rows it trains on (:func:`plan_lengths`,
pure, over token lengths; :func:`measure_lengths`, the thin tokenizer wrapper).

A prompt longer than the input's ``max_sequence_length`` loses its FIRST tokens (the instruction side), never its
last (the input and the answer cue, e.g. ``### Intent:``): :func:`keep_prompt_tail`, applied by the registry's fix
``cut_prompts_from_the_instruction_side`` at Ludwig's preprocessing (training and ``ludwig predict`` alike) and by
``eval.generate.prompt_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ludwig_mt.errors import WorkflowError

#: ``LLM.generate`` keeps at most ``context - max_new_tokens - 8`` input tokens (ludwig/models/llm.py)
GENERATION_MARGIN = 8
#: Ludwig's fallback context length when the model config names none (``utils/llm_utils.py`` get_context_len)
FALLBACK_CONTEXT_LEN = 2048
#: prompts are sized to this percentile of the measured lengths: a few outliers do not set every batch's width
PROMPT_PERCENTILE = 99
#: a prompt budget below this many tokens (and below the longest prompt) cannot carry an input and its answer cue
MIN_PROMPT_TOKENS = 16
#: Ludwig replaces ``generation.max_new_tokens: 32`` (its default) by a length it derives itself
LUDWIG_DEFAULT_MAX_NEW_TOKENS = 32


# ------------------------------------------------------------------------------------------- the prompt cut
def keep_prompt_tail(ids: Sequence[int], limit: int, bos_id: int | None) -> list[int]:
    """``ids`` cut to at most ``limit`` tokens by dropping FIRST tokens: the end of a prompt (its input and the
    answer cue the response follows) is what the model needs; the start is the instruction. A leading BOS (when
    the tokenizer adds one) stays first, as the model saw it in pre-training. Pure."""
    if len(ids) <= limit:
        return list(ids)
    if limit <= 0:
        return []
    if bos_id is not None and ids[0] == bos_id:
        return [ids[0], *ids[len(ids) - limit + 1:]]
    return list(ids[len(ids) - limit:])


# ------------------------------------------------------------------------------------------- the plan (pure)
@dataclass(frozen=True)
class LengthPlan:
    """Measured token lengths of a dataset's rows and the sequence lengths that fit them in a context."""

    context_len: int
    rows: int
    prompt_median: int
    prompt_percentile: int  # PROMPT_PERCENTILE-th percentile
    prompt_max: int
    response_max: int  # as Ludwig encodes a response (special tokens the tokenizer adds included)
    input_max: int  # the input feature's max_sequence_length
    output_max: int  # the output feature's max_sequence_length
    max_new_tokens: int  # generation.max_new_tokens
    global_max: int  # preprocessing.global_max_sequence_length: the longest merged row, or the pack length
    prompts_cut: int  # rows whose prompt is longer than input_max: their first tokens are cut

    def describe(self) -> str:
        """One line for the terminal and the log: what was measured, what was set, what gets cut."""
        cut = (f"; {self.prompts_cut} of {self.rows} prompts are longer than {self.input_max}: their start (the "
               f"instruction side) is cut, their end (input and answer cue) kept" if self.prompts_cut else "")
        return (f"lengths measured on {self.rows} rows (context {self.context_len}): prompts median "
                f"{self.prompt_median}, p{PROMPT_PERCENTILE} {self.prompt_percentile}, max {self.prompt_max} tokens; "
                f"responses max {self.response_max} -> input max_sequence_length {self.input_max}, output "
                f"{self.output_max}, max_new_tokens {self.max_new_tokens}, global_max_sequence_length "
                f"{self.global_max}{cut}")


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs): the smallest v with at least q % of ``values`` <= v."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def plan_lengths(prompt_lengths: Sequence[int], response_lengths: Sequence[int], context_len: int, *,
                 configured_input: int | None = None, configured_new_tokens: int | None = None,
                 configured_global: int | None = None, source: str = "the dataset") -> LengthPlan:
    """Sequence lengths for rows of these token lengths in a ``context_len`` model. Pure.

    * responses are never cut: output ``max_sequence_length`` = the longest response, ``max_new_tokens`` = that
      + 1 (the end-of-sequence token; never exactly 32, which Ludwig would replace);
    * prompts get what is left after the response and Ludwig's generation margin (``LLM.generate`` keeps at most
      ``context - max_new_tokens - 8`` input tokens), up to the p99 prompt: longer prompts lose their start;
    * ``global_max_sequence_length`` >= the longest merged row (prompt + response + eos), so Ludwig's cut of the
      merged row never reaches the response.

    The YAML's own values (``configured_*``, sized for another tokenizer) are kept where they ask for more and the
    context holds it: a larger input length costs nothing (Ludwig uses the longest prompt up to it), extra new
    tokens leave room for a model that answers at more length (the base model is scored under the same limit),
    a larger global length is ``trainer.packing``'s pack length. Refused (one line with the numbers) when even the
    responses leave no room for a prompt.
    """
    if not prompt_lengths or len(prompt_lengths) != len(response_lengths):
        raise WorkflowError(f"{source}: no rows to measure sequence lengths on. Fix: pass the prepared train.csv")
    response_max, prompt_max = max(response_lengths), max(prompt_lengths)
    needed_new = response_max + 1
    room = context_len - needed_new - GENERATION_MARGIN
    if room < min(MIN_PROMPT_TOKENS, prompt_max):
        too_long = sum(r + 1 + GENERATION_MARGIN + min(MIN_PROMPT_TOKENS, prompt_max) > context_len
                       for r in response_lengths)
        raise WorkflowError(
            f"{source}: responses do not fit the model's context: the longest response is {response_max} tokens, "
            f"+ 1 end-of-sequence + {GENERATION_MARGIN} (Ludwig's generation margin) leaves {max(room, 0)} of "
            f"{context_len} tokens for a prompt (longest prompt {prompt_max}; {too_long} of {len(response_lengths)} "
            "responses too long). Fix: use a base model with a longer context, or shorten or drop those rows")
    wanted_input = max(percentile(prompt_lengths, PROMPT_PERCENTILE), configured_input or 0)
    spare = max(0, room - wanted_input)  # context no prompt needs: the YAML's extra new tokens may use it
    new_tokens = needed_new + min(max(0, (configured_new_tokens or 0) - needed_new), spare)
    if new_tokens == LUDWIG_DEFAULT_MAX_NEW_TOKENS:  # one more than needed, or one of the YAML's extra less
        new_tokens = new_tokens + 1 if new_tokens == needed_new else new_tokens - 1
    input_max = min(wanted_input, context_len - new_tokens - GENERATION_MARGIN)
    longest_row = min(input_max, prompt_max) + response_max + 1
    return LengthPlan(
        context_len=context_len, rows=len(prompt_lengths), prompt_median=percentile(prompt_lengths, 50),
        prompt_percentile=percentile(prompt_lengths, PROMPT_PERCENTILE), prompt_max=prompt_max,
        response_max=response_max, input_max=input_max, output_max=response_max, max_new_tokens=new_tokens,
        global_max=min(context_len, max(configured_global or 0, longest_row)),
        prompts_cut=sum(length > input_max for length in prompt_lengths),
    )


# ------------------------------------------------------------------------------------- the tokenizer wrapper
def load_tokenizer(base_model: str) -> Any:
    """The base model's tokenizer as Ludwig uses it: pad token = eos token when the tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise WorkflowError(f"{base_model}: no tokenizer could be loaded ({str(err).splitlines()[0]}). Fix: pass "
                            "a model folder saved with save_pretrained (tokenizer files included) or a hub name "
                            "that is cached") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def config_context_length(config: Any) -> int:
    """A model config's context window as Ludwig reads it (``utils/llm_utils.py`` ``get_context_len``)."""
    for attribute in ("max_sequence_length", "max_position_embeddings", "n_positions"):
        if hasattr(config, attribute):
            return int(getattr(config, attribute))
    return FALLBACK_CONTEXT_LEN


def context_length(base_model: str) -> int:
    """The context window of ``base_model`` (its config.json only; the weights are not loaded)."""
    from transformers import AutoConfig

    try:
        return config_context_length(AutoConfig.from_pretrained(base_model))
    except (OSError, ValueError) as err:
        raise WorkflowError(f"{base_model}: no model config could be loaded ({str(err).splitlines()[0]}). Fix: pass "
                            "a model folder saved with save_pretrained (config.json included)") from None


def token_lengths(tokenizer: Any, texts: Iterable[str], *, lowercase: bool = False) -> list[int]:
    """Token counts of ``texts`` as Ludwig's ``HFTokenizer`` encodes them (special tokens the tokenizer adds, e.g.
    Llama's BOS, included), without truncation."""
    batch = [str(t).lower() if lowercase else str(t) for t in texts]
    return [len(ids) for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]] if batch else []


def measure_lengths(base_model: str, prompts: Sequence[str], responses: Sequence[str], *, lowercase: bool = False,
                    source: str = "the dataset", **configured: int | None) -> LengthPlan:
    """:func:`plan_lengths` for these rows through ``base_model``'s tokenizer and context (``configured``: the
    YAML's own ``configured_input`` / ``configured_new_tokens`` / ``configured_global``)."""
    tokenizer = load_tokenizer(base_model)
    return plan_lengths(token_lengths(tokenizer, prompts, lowercase=lowercase), token_lengths(tokenizer, responses),
                        context_length(base_model), source=source, **configured)
