"""The correctness fixes: every workaround for a Ludwig 0.17.10 bug, one patch body each.

Each body patches Ludwig from the outside (never site-packages), only through
:func:`ludwig_mt.patches.core.rebind`, and is applied by the registry (:mod:`ludwig_mt.patches`: its table names
each patch's targets and switch), which runs them whenever ``ludwig.api`` is imported (see
:mod:`ludwig_mt.autoload`, wired into the virtualenv by a ``.pth`` file that ``./run.sh setup`` installs), so the
plain ``ludwig train`` / ``ludwig predict`` commands and ``LudwigModel`` in user code all get them.

Known problems (one line each in the registry's table: README, section "Ludwig 0.17.10 patches"):

1. ``LudwigModel.load`` / ``ludwig predict`` fail on every LLM model: the saved config holds ``adapters: null``
   and the JSON schema of ``adapters`` accepts objects only. Fixed at the schema: ``null`` is allowed, exactly as
   Ludwig already does for ``quantization``.
2. ``ludwig predict`` fails with ``Invalid missing value strategy fill_with_const`` for base models whose tokenizer
   has no unknown token (Qwen, Llama 3, GPT-2 style BPE): during training Ludwig overwrites the text feature's
   ``fill_value`` with the tokenizer's unknown token (``None``) and saves that. We keep the configured value.
3. 4-bit quantization on a machine without CUDA trains, then crashes at the best-checkpoint reload. We refuse
   such a run before any work, with one line that says how to run it instead.
4. Every bitsandbytes optimizer (``paged_adam``, ``paged_adamw``, ``adam_8bit``, ``paged_lion``...) fails to build
   with bitsandbytes 0.50: ``TypeError: PagedAdam.__init__() got an unexpected keyword argument 'block_wise'``.
   Ludwig's optimizer schemas pass ``block_wise`` and ``percentile_clipping``, which bitsandbytes removed (its
   state is always quantized block-wise now, and percentile clipping is gone). We drop the two arguments when the
   optimizer class does not take them; a ``percentile_clipping`` other than 100 (off) is refused, not ignored.
5. Every response that ends before ``max_new_tokens`` gets garbage appended: Ludwig pads each generated sequence
   with token id 0 up to ``max_new_tokens`` and decodes the padding with the response. In Qwen2.5 and Llama 3
   id 0 is the ordinary token ``!``, so "SELECT 1" comes back as "SELECT 1!!!!!!!!". Greedy generation of one
   sample stops at the first end-of-sequence token, so everything after it is padding: we overwrite it with that
   end-of-sequence token, which decoding skips as a special token.
6. Every 4-bit (QLoRA) training run crashes when it ends, on GPU as on CPU: Ludwig reloads its best checkpoint with
   ``load_state_dict`` and refuses the bitsandbytes quantization state it saved itself (``weight.absmax``,
   ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) as "unexpected keys". That
   state belongs to the frozen 4-bit base weights, which training never changes and the model already holds; we
   leave it out of the state dict before loading (best-checkpoint reload and resume alike).
7. ``trainer.packing: true`` crashes: Ludwig's own packed forward hands transformers a 3-D attention mask, and
   aligns the targets with the unpacked batch. Training steps that do not take the lean path of the speed-ups
   (:mod:`ludwig_mt.patches.speedups`, which packs correctly) run Ludwig's forward unpacked.
8. A resumed run does not end where an uninterrupted one ends: Ludwig rebuilds the learning-rate scheduler at step 0
   after restoring it, and restarts a killed epoch at its first batch. On a resumed run (and only then) we move the
   schedule on to the checkpoint's step and skip the batches the checkpoint already holds.
9. Errors raised by these checks would reach the ``ludwig`` command as tracebacks: it prints them as one line.
10. A prompt longer than the input feature's ``max_sequence_length`` loses its END: ``build_sequence_matrix``
    keeps the FIRST tokens, so the input and the answer cue (``### Intent:``) the response must follow are cut
    off and only the instruction is left (banking77 through stories260k's tokenizer: every row). For an LLM's
    prompt (text input, passthrough encoder, HF tokenizer) we keep the LAST tokens instead, a leading BOS kept
    first (:func:`ludwig_mt.tokens.keep_prompt_tail`). It acts where Ludwig builds the feature's ids, which
    training preprocessing and ``ludwig predict`` share, so both cut alike; ``eval.generate.prompt_ids`` cuts the
    same way. Responses keep Ludwig's cut (their start is the answer).
11. In training every row shorter than its batch's longest attends to its left padding, which inference never
    shows it: ``generate_merged_ids`` pads the merged prompt+response rows with id 0 but masks ``ids !=
    pad_token_id``, so wherever the pad token is not id 0 (SmolLM2: pad = EOS = 2, Qwen2.5: 151643, the tiny test
    Llama) the padding is attended, and a real token equal to the pad token (an EOS inside a row) is masked. We pad
    with the pad token and mask by position: every real token attended, the padding never.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches.core import rebind
from ludwig_mt.tokens import keep_prompt_tail

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [{"type": "null", "title": "disabled"}, schema]}


def allow_null_adapters_schema() -> None:
    """Let ``adapters: null`` (what Ludwig itself saves) pass JSON-schema validation, so saved models load."""
    from ludwig.config_validation import validation

    def nullable(original):
        def nullable_mapping(self):
            return _nullable(original(self))

        return nullable_mapping

    for field_cls in ("NamedAdaptersConfigField", "MergeAdaptersConfigField"):
        rebind(f"ludwig.schema.llms.peft:{field_cls}._jsonschema_type_mapping", nullable)
    validation.get_schema.cache_clear()  # the schema is lru-cached; rebuild it with the patched fields


def keep_text_fill_value_when_tokenizer_has_no_unk() -> None:
    """Stop ``TextFeatureMixin.feature_data`` from replacing the fill value by ``None`` in saved metadata."""
    keys = ("fill_value", "computed_fill_value")

    def keeping_fill_value(original):
        def feature_data(column, metadata, preprocessing_parameters, backend):
            before = {k: preprocessing_parameters.get(k) for k in keys}
            result = original(column, metadata, preprocessing_parameters, backend)
            for key, value in before.items():
                if key in preprocessing_parameters and preprocessing_parameters[key] is None:
                    preprocessing_parameters[key] = value
            return result

        return feature_data

    rebind("ludwig.features.text_feature:TextFeatureMixin.feature_data", keeping_fill_value)


def check_quantization_supported(config: dict[str, Any], cuda_available: bool) -> None:
    """Refuse bitsandbytes quantization without CUDA before any work is done (it crashes after training)."""
    quant = config.get("quantization")
    if quant and not cuda_available:
        bits = quant.get("bits", 4) if isinstance(quant, dict) else 4
        raise WorkflowError(
            f"this config asks for {bits}-bit quantization, which needs a CUDA GPU and none is visible. "
            "Fix: run on a GPU, or render a CPU copy without quantization: "
            "./run.sh train <task> --cpu (or: python -m ludwig_mt.config <yaml> --cpu --out cpu.yaml)"
        )


def refuse_quantized_training_without_cuda() -> None:
    """Wrap ``LudwigModel.train``/``experiment`` with :func:`check_quantization_supported`."""
    import torch

    def checking(original):
        @functools.wraps(original)
        def checked(self, *args, **kwargs):
            check_quantization_supported(self.config_obj.to_dict(), torch.cuda.is_available())
            return original(self, *args, **kwargs)

        return checked

    for name in ("train", "experiment"):
        rebind(f"ludwig.api:LudwigModel.{name}", checking)


#: Ludwig optimizer arguments that bitsandbytes (0.50.2 here) no longer takes, and the value that means "what
#: bitsandbytes does anyway" (block-wise state quantization is the only kind left; 100 = no percentile clipping)
_REMOVED_BNB_ARGUMENTS = {"block_wise": None, "percentile_clipping": 100}


def drop_removed_bnb_arguments(optimizer_cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the arguments ``optimizer_cls`` no longer accepts (see :data:`_REMOVED_BNB_ARGUMENTS`).

    Pure; raises :class:`WorkflowError` when a dropped argument asks for something bitsandbytes cannot do any more.
    """
    import inspect

    accepted = inspect.signature(optimizer_cls.__init__).parameters
    out = dict(kwargs)
    for name, neutral in _REMOVED_BNB_ARGUMENTS.items():
        if name not in out or name in accepted:
            continue
        value = out.pop(name)
        if neutral is not None and value != neutral:
            raise WorkflowError(
                f"trainer.optimizer.{name}: {value} is not supported by the installed bitsandbytes "
                f"({optimizer_cls.__name__} no longer has this option). Fix: remove {name} from the optimizer config."
            )
    return out


def build_bitsandbytes_optimizers_without_removed_arguments() -> None:
    """Make Ludwig's optimizer factory stop passing ``block_wise`` / ``percentile_clipping`` to bitsandbytes."""

    def dropping(original):
        @functools.wraps(original)
        def get_optimizer_class_and_kwargs(optimizer_config, learning_rate):
            optimizer_cls, kwargs = original(optimizer_config, learning_rate)
            return optimizer_cls, drop_removed_bnb_arguments(optimizer_cls, kwargs)

        return get_optimizer_class_and_kwargs

    # create_optimizer looks the function up in the module's globals at call time
    rebind("ludwig.modules.optimization_modules:get_optimizer_class_and_kwargs", dropping)


def blank_after_first_eos(predictions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``predictions`` (batch x new tokens) with every token after a row's first ``eos_token_id`` set to it.

    Pure (returns a new tensor). Rows without an end-of-sequence token ran to ``max_new_tokens``: no padding there.
    """
    is_eos = (predictions == eos_token_id).long()
    eos_strictly_before = (is_eos.cumsum(dim=-1) - is_eos) > 0
    return predictions.masked_fill(eos_strictly_before, eos_token_id)


def stop_responses_at_eos() -> None:
    """Wrap ``LLM.generate`` so Ludwig's id-0 padding after an early end of sequence decodes to nothing."""
    from ludwig.constants import PREDICTIONS

    def stopping(original):
        @functools.wraps(original)
        def generate(self, *args, **kwargs):
            outputs = original(self, *args, **kwargs)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            predictions = outputs.get(PREDICTIONS) if isinstance(outputs, dict) else None
            if eos is not None and predictions is not None and predictions.dim() == 2:
                outputs[PREDICTIONS] = blank_after_first_eos(predictions, int(eos))
            return outputs

        return generate

    rebind("ludwig.models.llm:LLM.generate", stopping)


#: what bitsandbytes' ``Linear4bit`` adds to a state dict next to each packed 4-bit ``weight``
_BNB_4BIT_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                            ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def without_4bit_quant_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the bitsandbytes 4-bit quantization state of frozen base weights (pure)."""
    return {key: value for key, value in state_dict.items() if not key.endswith(_BNB_4BIT_STATE_SUFFIXES)}


def reload_checkpoints_of_4bit_models() -> None:
    """Make ``LLM.load_state_dict`` (Ludwig's checkpoint reloads) skip 4-bit quantization state, see item 6."""

    def skipping(original):
        @functools.wraps(original)
        def load_state_dict(self, state_dict, *args, **kwargs):
            return original(self, without_4bit_quant_state(state_dict), *args, **kwargs)

        return load_state_dict

    rebind("ludwig.models.llm:LLM.load_state_dict", skipping)


@contextlib.contextmanager
def packing_off(trainer_config: Any) -> Iterator[None]:
    """Inside the block ``trainer.packing`` reads False (for the steps that run Ludwig's own forward)."""
    trainer_config.packing = False
    try:
        yield
    finally:
        trainer_config.packing = True


def unpacked_forward_instead_of_broken_packing() -> None:
    """Make ``LLM.forward`` run Ludwig's training forward unpacked when ``trainer.packing`` is on (see item 7)."""

    def unpacking(original):
        @functools.wraps(original)
        def forward(self, inputs, mask=None):
            if self.training and getattr(self.config_obj.trainer, "packing", False):
                with packing_off(self.config_obj.trainer):  # Ludwig's own packing misaligns the targets
                    return original(self, inputs, mask)
            return original(self, inputs, mask)

        return forward

    rebind("ludwig.models.llm:LLM.forward", unpacking)


def batches_per_epoch(rows: int, batch_size: int, ignore_last: bool) -> int:
    """How many batches Ludwig's ``RandomAccessBatcher`` really yields in one epoch of ``rows`` rows.

    Its ``steps_per_epoch`` is ``ceil(rows / batch_size)``, but with ``ignore_last`` (always on for training) a last
    batch of one row is dropped ("Last batch in epoch only has 1 sample and will be dropped"), so an epoch of
    ``k * batch_size + 1`` rows has one batch fewer than Ludwig plans for.
    """
    if rows <= 0 or batch_size <= 0:
        return 0
    planned = -(-rows // batch_size)
    dropped = ignore_last and batch_size > 1 and rows % batch_size == 1
    return planned - int(dropped)


def batches_done_in_epoch(steps: int, epoch: int, per_epoch: int) -> int:
    """How many batches of epoch ``epoch`` a run at global step ``steps`` has already trained on.

    ``steps`` counts every optimizer step since the start; each finished epoch holds ``per_epoch`` of them (the
    batches the batcher really yields, see :func:`batches_per_epoch`). A count outside ``[0, per_epoch)`` means the
    checkpoint does not describe this data (other rows or batch size): nothing is skipped then, never a whole epoch.
    """
    done = steps - epoch * per_epoch
    return done if 0 <= done < per_epoch else 0


def fast_forward_scheduler(scheduler: Any, steps: int) -> int:
    """Step a freshly built LR scheduler up to ``steps``; return how many steps that took.

    Ludwig restores the scheduler's state on resume, then builds a new one before the loop (warm-up and decay would
    start again from step 0). Stepping the new one forward gives the learning rate of an uninterrupted run.
    """
    import warnings

    train_scheduler = scheduler._train_scheduler
    missing = max(0, steps - int(train_scheduler.last_epoch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(missing):
            train_scheduler.step()
    return missing


def resume_mid_epoch_where_it_stopped() -> None:
    """On resume, and only then: the learning rate of step N, not of step 0, and skip the batches the checkpoint
    already holds.

    A run counts as resumed when Ludwig's progress tracker comes back from a checkpoint (a fresh tracker starts at
    step 0). The skip happens once, in the first epoch loop after resuming; later epochs, and every epoch of a
    fresh run, are Ludwig's own. (Acting on every epoch loop made a fresh run of ``k * batch + 1`` rows skip a whole
    epoch forever: Ludwig's ``steps_per_epoch`` counts the dropped one-row batch.)
    """
    def noting_resume(original_tracker):
        @functools.wraps(original_tracker)
        def _create_or_resume_progress_tracker(self, *args, **kwargs):
            progress_tracker = original_tracker(self, *args, **kwargs)
            self._ludwig_mt_resumed_at = progress_tracker.steps if progress_tracker.steps > 0 else None
            return progress_tracker

        return _create_or_resume_progress_tracker

    def resuming(original_loop):
        @functools.wraps(original_loop)
        def _train_loop(self, batcher, progress_tracker, *args, **kwargs):
            resumed_at, self._ludwig_mt_resumed_at = getattr(self, "_ludwig_mt_resumed_at", None), None
            if resumed_at is not None:
                if fast_forward_scheduler(self.scheduler, progress_tracker.steps):
                    logger.info("ludwig_mt: resumed at step %d, learning-rate schedule moved on to it",
                                progress_tracker.steps)
                per_epoch = batches_per_epoch(batcher.total_size, batcher.batch_size, batcher.ignore_last)
                done = batches_done_in_epoch(progress_tracker.steps, progress_tracker.epoch, per_epoch)
                if done and getattr(batcher, "step", None) == 0:
                    logger.info("ludwig_mt: resuming mid-epoch, skipping %d batch(es) already trained on", done)
                    for _ in range(done):
                        batcher.next_batch()
            return original_loop(self, batcher, progress_tracker, *args, **kwargs)

        return _train_loop

    rebind("ludwig.trainers.trainer:Trainer._create_or_resume_progress_tracker", noting_resume)
    rebind("ludwig.trainers.trainer:Trainer._train_loop", resuming)


def one_line_errors_in_cli() -> None:
    """Make ``ludwig ...`` print a :class:`WorkflowError` as one line (exit 2) instead of a traceback."""
    import sys

    def one_line(original):
        @functools.wraps(original)
        def main() -> None:
            try:
                original()
            except WorkflowError as err:
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None

        return main

    rebind("ludwig.cli:main", one_line)


#: While Ludwig builds an LLM prompt's ids: [the feature's max_sequence_length, prompts cut so far]
_PROMPT_CUT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("ludwig_mt_prompt_cut", default=None)


def is_llm_prompt(feature_config: Mapping[str, Any], preprocessing: Mapping[str, Any]) -> bool:
    """A text input feature of an LLM: Ludwig gives those the passthrough encoder and the base model's HF
    tokenizer (``schema/model_types/utils.py`` ``_set_llm_tokenizers``); output features have a decoder instead."""
    encoder = feature_config.get("encoder") or {}
    return (feature_config.get("type") == "text" and encoder.get("type") == "passthrough"
            and preprocessing.get("tokenizer") == "hf_tokenizer")


def cut_prompts_from_the_instruction_side() -> None:
    """Make Ludwig keep the LAST ``max_sequence_length`` tokens of an LLM's prompt (a leading BOS kept), see item
    10: around ``TextFeatureMixin.add_feature_data`` of such a feature, every sequence vector Ludwig tokenizes
    (``strings_utils._get_sequence_vector``, looked up at call time by ``build_sequence_matrix``) is cut from the
    start, so ``build_sequence_matrix``'s own cut to the first tokens finds nothing left to cut."""
    import numpy as np

    def cutting_vectors(original):
        @functools.wraps(original)
        def _get_sequence_vector(sequence, tokenizer, *args, **kwargs):
            vector = original(sequence, tokenizer, *args, **kwargs)
            cut = _PROMPT_CUT.get()
            if cut is None or len(vector) <= cut[0]:
                return vector
            cut[1] += 1
            bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None)
            return np.asarray(keep_prompt_tail(vector.tolist(), cut[0], bos), dtype=vector.dtype)

        return _get_sequence_vector

    def marking_prompts(original):
        @functools.wraps(original)
        def add_feature_data(feature_config, input_df, proc_df, metadata, preprocessing_parameters, *args, **kwargs):
            limit = (metadata.get(feature_config.get("name")) or {}).get("max_sequence_length")
            if limit is None or not is_llm_prompt(feature_config, preprocessing_parameters):
                return original(feature_config, input_df, proc_df, metadata, preprocessing_parameters, *args, **kwargs)
            cut = [int(limit), 0]
            token = _PROMPT_CUT.set(cut)
            try:
                result = original(feature_config, input_df, proc_df, metadata, preprocessing_parameters, *args,
                                  **kwargs)
            finally:
                _PROMPT_CUT.reset(token)
            if cut[1]:
                logger.info("ludwig_mt: %d prompt(s) longer than %d tokens: their first tokens (the instruction "
                            "side) cut, their end (input and answer cue) kept", cut[1], cut[0])
            return result

        return add_feature_data

    rebind("ludwig.utils.strings_utils:_get_sequence_vector", cutting_vectors)
    rebind("ludwig.features.text_feature:TextFeatureMixin.add_feature_data", marking_prompts)


def pad_token_id(tokenizer) -> int:
    """The id Ludwig pads with: the tokenizer's pad token, else its EOS (Ludwig sets pad = EOS when none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def merged_rows(input_ids, target_ids, tokenizer, max_length: int | None) -> list[tuple[Any, int]]:
    """Each row as Ludwig merges it (prompt without padding + response without padding + EOS, cut to
    ``max_length``) and the number of prompt tokens in it; the same rule as ``llm_utils.generate_merged_ids``."""
    import torch
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


def left_pad_rows(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded with ``pad_id`` to the longest, and the int64 mask that attends their tokens only.

    The mask is by position, not ``ids != pad_id``: where pad = EOS a row's own EOS must stay attended.
    """
    import torch

    width = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.int64, device=rows[0].device)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[0]:] = row
        mask[i, width - row.shape[0]:] = 1
    return ids, mask


def pad_merged_rows_with_the_pad_token() -> None:
    """Make ``generate_merged_ids`` (training's prompt+response rows) pad with the pad token and mask the padding."""

    def padding(original):
        @functools.wraps(original)
        def generate_merged_ids(input_ids, target_ids, tokenizer, max_sequence_length=None):
            rows = merged_rows(input_ids, target_ids, tokenizer, max_sequence_length)
            return left_pad_rows([ids for ids, _ in rows], pad_token_id(tokenizer))

        return generate_merged_ids

    # ``LLM.forward`` calls the name that ``ludwig.models.llm`` imported; other callers look it up in llm_utils
    rebind("ludwig.utils.llm_utils:generate_merged_ids", padding)
    rebind("ludwig.models.llm:generate_merged_ids", padding)
