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
   after restoring it, restarts a killed epoch at its first batch, and reseeds every random generator at the start
   of ``Trainer.train`` while its checkpoints hold none of their states (so dropout, e.g. the YAMLs' LoRA dropout
   0.05, draws other masks after a resume: max |dw| 1.1e-3 after 2 epochs on CPU). Every checkpoint now also
   writes every rank's random states (torch, CUDA, numpy, python) next to it (rank 0 writes them all); on a resumed run (and only then) we
   move the schedule on to the checkpoint's step, skip the batches the checkpoint already holds and restore the
   random states it was written with, right before the first step.
9. Errors raised by these checks would reach the ``ludwig`` command as tracebacks: it prints them as one line.
   Before that, ``ludwig train`` / ``experiment`` check the ``--config`` YAML's keys (Ludwig's schema ignores unknown
   keys such as ``trainer.epochz`` silently): the project's one key check, :mod:`ludwig_mt.config_keys`.
11. Ludwig ignores Ctrl-C while it saves a checkpoint (a no-op SIGINT handler around the save), so the one press
    that should stop training after the current step is lost when it lands in a save (with frequent checkpoints,
    often). The save now holds it and hands it to Ludwig's own handler when the save is done.
10. A prompt longer than the input feature's ``max_sequence_length`` loses its END: ``build_sequence_matrix``
    keeps the FIRST tokens, so the input and the answer cue (``### Intent:``) the response must follow are cut
    off and only the instruction is left (banking77 through stories260k's tokenizer: every row). For an LLM's
    prompt (text input, passthrough encoder, HF tokenizer) we keep the LAST tokens instead, a leading BOS kept
    first (:func:`ludwig_mt.tokens.keep_prompt_tail`). It acts where Ludwig builds the feature's ids, which
    training preprocessing and ``ludwig predict`` share, so both cut alike; ``eval.generate.prompt_ids`` cuts the
    same way. Responses keep Ludwig's cut (their start is the answer).
13. A LoRA fine-tune never learns to stop when the base model's end-of-sequence token was never a target in its
    pretraining: Ludwig trains the EOS after every response (it is in the labels, in Ludwig's loss and the lean
    one alike), but LoRA leaves the output embeddings frozen, and an output row no pretraining target ever pulled
    up sits with the other never-seen rows (stories260k: ``</s>`` is one of 253 of its 512 rows that are the same
    vector). No hidden state can then make EOS likely (stories260k: at most P = 0.005), so generations run to
    ``max_new_tokens``. When :func:`eos_row_dead` says so (EOS below :data:`EOS_LEARNABLE`, an ordinary token
    above), that one embedding row is trained with the adapter (peft's ``trainable_token_indices``; saved in and loaded from the adapter).
12. In training every row shorter than its batch's longest attends to its left padding, which inference never
    shows it: ``generate_merged_ids`` pads the merged prompt+response rows with id 0 but masks ``ids !=
    pad_token_id``, so wherever the pad token is not id 0 (SmolLM2: pad = EOS = 2, Qwen2.5: 151643, the tiny test
    Llama) the padding is attended, and a real token equal to the pad token (an EOS inside a row) is masked. We pad
    with the pad token and mask by position: every real token attended, the padding never.
14. A run that diverges (NaN or inf in the weights, found at a checkpoint) before its first evaluation fails late
    and hides why: with ``skip_save_model`` Ludwig returns and ``LudwigModel.train`` dies in its training report
    (``ValueError: min() iterable argument is empty``, the bench's SmolLM2 runs), otherwise rank 0 alone raises.
    And the NaN check answers on local rank 0 only, so on several GPUs the other ranks never stop (a hang). The
    check's answer is now shared by every rank, and a NaN stop before any evaluation raises one line on every
    rank, naming the step and the fix. A NaN after an evaluation keeps Ludwig's behaviour: stop, keep the best
    model.
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


#: every rank's random states at the latest checkpoint, next to Ludwig's ``latest.ckpt`` (written by rank 0 only,
#: so a launched run's folder stays the one a single process writes)
RANDOM_STATE_FILE = "ludwig_mt_random_states.pt"


def random_states() -> dict[str, Any]:
    """Every random generator training draws from (dropout, shuffles, augmentations): torch's CPU and CUDA ones,
    numpy's global and python's."""
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: Mapping[str, Any]) -> None:
    """Put back what :func:`random_states` returned."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def random_state_file(save_path: str) -> Any:
    """Where rank 0 keeps every rank's random states for the checkpoints under ``save_path`` (the model folder)."""
    from pathlib import Path

    from ludwig.globals import TRAINING_CHECKPOINTS_DIR_PATH

    return Path(save_path) / TRAINING_CHECKPOINTS_DIR_PATH / RANDOM_STATE_FILE


def world() -> tuple[int, int]:
    """(rank, world size) of the torch process group; (0, 1) in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered_random_states() -> list[dict[str, Any]]:
    """Every rank's :func:`random_states`, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [random_states()]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, random_states())
    return out


def broadcast_from_rank0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (a collective; the identity in a single process)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resume_mid_epoch_where_it_stopped() -> None:
    """On resume, and only then: the learning rate of step N, not of step 0, and skip the batches the checkpoint
    already holds.

    Every checkpoint also saves the rank's random states (:func:`random_states`, with the step), atomically; a
    resumed run puts them back when they belong to the step it resumes at.

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
        def _train_loop(self, batcher, progress_tracker, save_path, *args, **kwargs):
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
                restore_random_states(random_state_file(save_path), progress_tracker.steps)
            return original_loop(self, batcher, progress_tracker, save_path, *args, **kwargs)

        return _train_loop

    def saving_random_states(original_save):
        @functools.wraps(original_save)
        def save_checkpoint(self, progress_tracker, save_path, checkpoint_manager):
            original_save(self, progress_tracker, save_path, checkpoint_manager)
            import torch

            states = gathered_random_states()
            if world()[0] == 0:
                path = random_state_file(save_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                torch.save({"steps": int(progress_tracker.steps), "ranks": states}, tmp)
                tmp.replace(path)

        return save_checkpoint

    rebind("ludwig.trainers.trainer:Trainer._create_or_resume_progress_tracker", noting_resume)
    rebind("ludwig.trainers.trainer:Trainer._train_loop", resuming)
    rebind("ludwig.trainers.trainer:Trainer.save_checkpoint", saving_random_states)


def restore_random_states(path: Any, steps: int) -> bool:
    """Put back this rank's random states saved with the checkpoint of step ``steps`` (rank 0 reads the file and
    hands it to every rank: other machines have no copy); False (and a log line) when the file is missing, belongs
    to another step (a checkpoint written before this fix, or by another run) or to another number of processes."""
    import torch

    rank, size = world()
    saved = torch.load(path, weights_only=False) if rank == 0 and path.is_file() else None
    saved = broadcast_from_rank0(saved)
    if saved is None:
        logger.warning("ludwig_mt: no random states saved with this checkpoint (%s): dropout and shuffles will "
                       "differ from an uninterrupted run", path.name)
        return False
    if saved.get("steps") != steps or len(saved.get("ranks", [])) != size:
        logger.warning("ludwig_mt: random states in %s are of step %s and %d process(es), not %d and %d: not "
                       "restored", path.name, saved.get("steps"), len(saved.get("ranks", [])), steps, size)
        return False
    set_random_states(saved["ranks"][rank])
    logger.info("ludwig_mt: random states of step %d restored", steps)
    return True


class DeferringSignal:
    """The ``signal`` module as ``ludwig.utils.checkpoint_utils`` sees it: every name is the real one, except that a
    SIGINT handler installed while another one is active (Ludwig's ``lambda _sig, _frame: None`` during a checkpoint
    save, which drops a Ctrl-C) records the signal instead, and putting the earlier handler back hands it a recorded
    Ctrl-C at once: a Ctrl-C during a save is delivered right after it, not lost."""

    def __init__(self, real: Any) -> None:
        self._real, self._outer, self._pending = real, None, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def signal(self, signum: int, handler: Any) -> Any:
        if signum != self._real.SIGINT:
            return self._real.signal(signum, handler)
        if self._outer is None:  # the save begins: hold Ctrl-C until the earlier handler is back
            self._outer, self._pending = self._real.getsignal(signum), False
            return self._real.signal(signum, self._hold)
        outer, pending, self._outer = self._outer, self._pending, None
        previous = self._real.signal(signum, handler)
        if pending and handler is outer and callable(handler):
            handler(signum, None)
        return previous

    def _hold(self, signum: int, frame: Any) -> None:
        self._pending = True


def defer_ctrl_c_during_checkpoint_saves() -> None:
    """Make Ludwig's checkpoint saves hold a Ctrl-C until the save is done instead of dropping it (item 11)."""
    rebind("ludwig.utils.checkpoint_utils:signal", DeferringSignal)


def check_cli_config_keys(argv: list[str]) -> None:
    """``ludwig train`` / ``experiment``: refuse an LLM ``--config`` YAML with a key Ludwig would ignore (item 9)."""
    from pathlib import Path

    from ludwig_mt.config import load_yaml
    from ludwig_mt.config_keys import check_keys
    from ludwig_mt.config_args import config_path_in

    path = config_path_in(argv) if argv[:1] in (["train"], ["experiment"]) else None
    if path is not None and Path(path).is_file():
        config = load_yaml(path)
        if config.get("model_type") == "llm":
            check_keys(config, path)


def one_line_errors_in_cli() -> None:
    """Make ``ludwig ...`` print a :class:`WorkflowError` as one line (exit 2) instead of a traceback, after the key
    check of ``ludwig train`` / ``experiment`` (one patch: a second one of ``ludwig.cli:main`` could be applied
    first, inside-out, when ``ludwig.api`` is imported before ``ludwig.cli``)."""
    import sys

    def one_line(original):
        @functools.wraps(original)
        def main() -> None:
            try:
                check_cli_config_keys(sys.argv[1:])
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


# ------------------------------------------------------------------------------------- train_eos_row_when_frozen_dead

#: below this best achievable P(EOS) the EOS row is trained with the adapter: a learned row reaches ~1.0
#: (SmolLM2-135M-Instruct 0.999), a never-trained one stays near 1 / (rows sharing its vector) (stories260k 0.005)
EOS_LEARNABLE = 0.5
_TRAIN_TOKENS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("ludwig_mt_train_tokens",
                                                                                  default=None)


def base_causal_lm(causal_lm):
    """The ``*ForCausalLM`` itself: peft's model unwrapped when there is one (its inner ``base_model`` then runs the
    adapted layers, and ``get_output_embeddings`` is the LM head)."""
    return causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm


def final_norm_weight(causal_lm) -> torch.Tensor | None:
    """The scale of the norm just before the LM head (``model.norm`` in Llama/Qwen/Mistral, ``transformer.ln_f`` in
    GPT-2/Bloom), which bounds what a hidden state can look like; None if the model has none we know."""
    inner = base_causal_lm(causal_lm)
    inner = getattr(inner, "base_model", inner)
    for name in ("norm", "ln_f", "final_layernorm", "norm_f"):
        weight = getattr(getattr(inner, name, None), "weight", None)
        if weight is not None:
            return weight.detach()
    return None


def eos_ceiling(causal_lm, eos_token_id: int, steps: int = 200) -> float:
    """The highest probability of ``eos_token_id`` that ANY final hidden state can give with the output embeddings
    as they are (frozen, as LoRA leaves them): a direction of unit RMS, times the final norm's scale, fitted by
    gradient ascent on log P(EOS). Why: if even the best hidden state cannot make EOS likely, no adapter on the
    layers below can teach the model to stop. Stops early once EOS is clearly reachable."""
    import torch

    head = causal_lm.get_output_embeddings().weight.detach()
    if head.device.type == "meta" or head.dim() != 2 or head.numel() == 0:
        return 1.0  # weights not materialised or sharded here (meta loading, ZeRO-3's empty shards): nothing to measure
    scale = final_norm_weight(causal_lm)
    scale = torch.ones(head.shape[1], device=head.device) if scale is None else scale.float().to(head.device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(head.shape[1], generator=generator).to(head.device).requires_grad_(True)
    optimizer = torch.optim.Adam([direction], lr=0.05)
    best = 0.0
    with torch.enable_grad():
        for _ in range(steps):
            hidden = scale * direction / direction.pow(2).mean().sqrt()
            log_p = (head @ hidden.to(head.dtype)).float().log_softmax(-1)[eos_token_id]
            best = max(best, float(log_p.exp()))
            if best >= EOS_LEARNABLE:
                break
            optimizer.zero_grad()
            (-log_p).backward()
            optimizer.step()
    return best


def eos_row_dead(causal_lm, eos_token_id: int) -> tuple[bool, float]:
    """Whether the frozen output embeddings cannot make EOS likely while they can make an ordinary token likely
    (the row of largest norm, a trained one in a pretrained model), and EOS's ceiling. Why both: a randomly
    initialised head (the tests' tiny models) is flat for every token, which is not this problem, and training
    one row there would only change the adapters those tests build."""
    ceiling = eos_ceiling(causal_lm, eos_token_id)
    if ceiling >= EOS_LEARNABLE:
        return False, ceiling
    ordinary = int(causal_lm.get_output_embeddings().weight.detach().float().norm(dim=1).argmax())
    return eos_ceiling(causal_lm, ordinary) >= EOS_LEARNABLE, ceiling


def train_eos_row_when_frozen_dead() -> None:
    """Make ``LLM.initialize_adapter`` add the EOS embedding row to a new LoRA adapter's trainable parameters when
    :func:`eos_row_dead` says so (see item 13); ``LoraConfig.to_config`` passes it to peft."""

    def checking(original):
        @functools.wraps(original)
        def initialize_adapter(self):
            adapter = self.config_obj.adapter
            fresh_lora = (adapter is not None and getattr(adapter, "type", None) == "lora"
                          and not adapter.pretrained_adapter_weights and not self._adapter_initialized
                          and getattr(self.config_obj, "adapters", None) is None)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if not fresh_lora or eos is None:
                return original(self)
            dead, ceiling = eos_row_dead(self.model, int(eos))
            if not dead:
                return original(self)
            logger.warning("ludwig_mt: %s cannot learn to stop with frozen output embeddings (best possible "
                           "P(EOS) %.3f): the EOS embedding row (id %d) is trained with the LoRA adapter",
                           self.config_obj.base_model, ceiling, eos)
            token = _TRAIN_TOKENS.set([int(eos)])
            try:
                return original(self)
            finally:
                _TRAIN_TOKENS.reset(token)

        return initialize_adapter

    def with_tokens(original):
        @functools.wraps(original)
        def to_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            tokens = _TRAIN_TOKENS.get()
            if tokens:
                config.trainable_token_indices = list(tokens)
            return config

        return to_config

    rebind("ludwig.models.llm:LLM.initialize_adapter", checking)
    rebind("ludwig.schema.llms.peft:LoraConfig.to_config", with_tokens)
def pad_token_id(tokenizer) -> int:
    """The id Ludwig pads with: the tokenizer's pad token, else its EOS (Ludwig sets pad = EOS when none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def merged_rows(input_ids, target_ids, tokenizer, max_length: int | None) -> list[tuple[torch.Tensor, int]]:
    """Each row as Ludwig merges it (prompt without padding + response without padding + EOS, cut to
    ``max_length``) and the number of prompt tokens in it; the same rule as ``llm_utils.generate_merged_ids``.

    Whole-batch tensor ops instead of Ludwig's ``remove_left_padding`` twice per row: it runs on the CPU every
    training step while the GPU waits (~60 us a row). ``input_ids`` and ``target_ids`` are ``[rows, width]`` tensors
    (or sequences of equal-length rows); the rows returned are views of one buffer. A ``None`` pad or BOS id matches
    no token (Ludwig's own loop raises ``TypeError`` there).
    """
    import torch

    # HF tokenizers resolve these through properties: read each once
    pad_id, bos_id, eos_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts, targets = _as_batch(input_ids), _as_batch(target_ids)
    if prompts.shape[0] == 0:
        return []
    eos = torch.full((prompts.shape[0], 1), eos_id, dtype=torch.int64, device=targets.device)
    both = torch.cat((prompts, targets, eos), dim=1)  # the dtype torch.cat gave Ludwig's rows: int64
    prompt_start = _kept_starts(prompts, pad_id, bos_id)
    n_prompt = prompts.shape[1] - prompt_start
    target_start = _kept_starts(targets, pad_id, bos_id)
    n_merged = _cut_lengths(n_prompt + (targets.shape[1] - target_start) + 1, max_length)
    # merged[i, j] = both[i, j + prompt_start[i]] on the prompt, then skips the target's dropped head as well
    cols = torch.arange(both.shape[1], device=both.device)
    skip = prompt_start[:, None] + torch.where(cols >= n_prompt[:, None], target_start[:, None], 0)
    merged = both.gather(1, (cols + skip).clamp_(max=both.shape[1] - 1))
    lengths = n_merged.tolist()
    # one split into [row 0, rest of line 0, row 1, ...], not a boolean gather and a slice per row
    pieces = merged.view(-1).split([size for n in lengths for size in (n, both.shape[1] - n)])
    return list(zip(pieces[::2], torch.minimum(n_prompt, n_merged).tolist()))


def _as_batch(ids) -> torch.Tensor:
    """``ids`` as one ``[rows, width]`` tensor."""
    import torch

    return ids if isinstance(ids, torch.Tensor) else torch.stack(list(ids))


def _kept_starts(ids: torch.Tensor, pad_id: int | None, bos_id: int | None) -> torch.Tensor:
    """Per row of ``ids`` (``[rows, width]``), where ``llm_utils.remove_left_padding`` starts keeping it: after the
    row's LAST pad token (wherever it is; 0 without one), then at the first BOS token from there on, if any."""
    import torch

    cols = torch.arange(ids.shape[1], device=ids.device)
    cut = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    if ids.shape[1] == 0:
        return cut
    if pad_id is not None:
        cut = torch.where(ids == pad_id, cols + 1, 0).amax(dim=1)
    if bos_id is None:
        return cut
    first_bos = torch.where((ids == bos_id) & (cols >= cut[:, None]), cols, ids.shape[1]).amin(dim=1)
    return torch.where(first_bos < ids.shape[1], first_bos, cut)


def _cut_lengths(lengths: torch.Tensor, max_length: int | None) -> torch.Tensor:
    """``lengths`` after ``row[:max_length]`` where ``max_length`` is set (Ludwig skips a None or 0 one)."""
    if not max_length:
        return lengths
    if max_length < 0:  # Python slicing, as Ludwig's ``merged[:max_length]`` does
        return (lengths + max_length).clamp(min=0)
    return lengths.clamp(max=max_length)


def left_pad_rows(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded with ``pad_id`` to the longest, and the int64 mask that attends their tokens only.

    The mask is by position, not ``ids != pad_id``: where pad = EOS a row's own EOS must stay attended. One
    masked write for the whole batch, not one per row (this runs on the CPU every training step).
    """
    import torch

    lengths = [row.shape[0] for row in rows]
    width, device = max(lengths), rows[0].device
    mask = torch.arange(width, device=device) >= width - torch.tensor(lengths, device=device)[:, None]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64, device=device)
    ids[mask] = torch.cat(rows).to(torch.int64)
    return ids, mask.to(torch.int64)


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


# ------------------------------------------------------------------------ NaN stops: every rank, one clear error


def on_any_rank(distributed: Any, found: bool, device: Any) -> bool:
    """True on every rank when ``found`` is True on any (one all-reduce): Ludwig's NaN check answers on local
    rank 0 only (None elsewhere), so the other ranks train on alone and wait for rank 0 forever."""
    import torch

    count = torch.tensor(int(found), device=device)
    distributed.allreduce(count)
    return bool(count.item() > 0)


def evaluated(progress_tracker: Any) -> bool:
    """Whether any evaluation has run: Ludwig appends training (and validation) metrics only when it evaluates, so
    a run without them has no best model to keep."""
    logs = (progress_tracker.train_metrics, progress_tracker.validation_metrics)
    return any(values for log in logs for by_metric in log.values() for values in by_metric.values())


def diverged_message(save_path: str, steps: int, learning_rate: Any) -> str:
    return (f"{save_path}: training diverged: NaN or inf in the model's weights at step {steps} (its first "
            f"checkpoint), before any evaluation, so there is no model to keep. Fix: lower trainer.learning_rate "
            f"({learning_rate}) or keep trainer.gradient_clipping on; on a GPU keep the project's packing on "
            "(left-padded rows can make SDPA return NaN)")


def stop_on_nan_on_every_rank_with_its_cause() -> None:
    """Make Ludwig's NaN stop agree on every rank and, before any evaluation, raise one clear error (item 14)."""

    def agreeing(original):
        @functools.wraps(original)
        def _has_nan_or_inf_weights(self, model):
            return on_any_rank(self.distributed, bool(original(self, model)), self.device)

        return _has_nan_or_inf_weights

    def raising(original):
        @functools.wraps(original)
        def _eval_and_checkpoint(self, *args, **kwargs):
            should_break, has_nan_or_inf = original(self, *args, **kwargs)
            tracker = kwargs["progress_tracker"]  # Ludwig passes every argument by name
            if has_nan_or_inf and not evaluated(tracker):
                raise WorkflowError(diverged_message(kwargs["save_path"], tracker.steps,
                                                     getattr(self.config, "learning_rate", None)))
            return should_break, has_nan_or_inf

        return _eval_and_checkpoint

    rebind("ludwig.trainers.trainer:Trainer._has_nan_or_inf_weights", agreeing)
    rebind("ludwig.trainers.trainer:Trainer._eval_and_checkpoint", raising)


def detached_step_result(result: tuple) -> tuple:
    """``Trainer.train_step``'s ``(loss, all_losses, used_tokens)`` with every loss cut from its autograd graph (the
    values are the same tensors' data; nothing after the step's backward needs the graph)."""
    import torch

    loss, all_losses, *rest = result
    losses = ({name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in all_losses.items()}
              if isinstance(all_losses, dict) else all_losses)
    return (loss.detach() if isinstance(loss, torch.Tensor) else loss, losses, *rest)


#: Ludwig's swap of an LLM's embedding for bitsandbytes' under 8-bit optimizers, as its trainer imported it
EMBEDDING_SWAP = "ludwig.trainers.trainer:update_embedding_layer"


def refreeze(model, frozen_before: set[str]) -> list[str]:
    """Freeze every parameter of ``model`` named in ``frozen_before`` that trains now; returns their names."""
    refrozen = [name for name, param in model.named_parameters() if name in frozen_before and param.requires_grad]
    for name in refrozen:
        model.get_parameter(name).requires_grad_(False)
    return refrozen


def keep_the_base_frozen_under_8bit_optimizers() -> None:
    """With an 8-bit optimizer (``adam_8bit``, ``paged_adam_8bit``, ...) Ludwig's trainer replaces the LLM's input
    embedding with bitsandbytes' ``Embedding`` built around the same weight, and ``nn.Embedding`` wraps that weight
    in a new ``Parameter`` that requires gradients: a LoRA or QLoRA run then trains the base model's whole
    embedding (and, sharing its storage, a tied LM head), which the saved adapter does not hold, so the model that
    Ludwig evaluates in the run is not the one it saves. Found on the H200 (``bench/NOTES-speed.md``, run 28: the
    ``adam8bit`` variant's losses 0.3 % lower and its peak 1.4x). The weight stays as frozen as it was."""
    def keeping_frozen(original):
        @functools.wraps(original)
        def update_embedding_layer(model, config_obj):
            frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
            result = original(model, config_obj)
            refrozen = refreeze(model, frozen)
            if refrozen:
                logger.info("ludwig_mt: kept frozen under the 8-bit optimizer: %s", ", ".join(refrozen))
            return result

        return update_embedding_layer

    rebind(EMBEDDING_SWAP, keeping_frozen)


def release_each_steps_graph_when_it_returns() -> None:
    """Ludwig's training loop keeps ``train_step``'s loss in a local (``loss, all_losses, used_tokens = ...``) until
    the next step returns, so the previous step's autograd graph lives through the whole next step: its backward
    freed what was saved for it, but not what its nodes hold otherwise. Reentrant gradient checkpointing (what Ludwig
    enables) keeps each layer's call with its keyword tensors (the attention mask, the rotary tables) and the
    detached layer inputs: measured on the H200 (``bench/NOTES-speed.md``, run 26), a 14x1024x576 hidden state and a
    14x1x1024x1024 attention mask of the previous step still allocated when a QLoRA step of SmolLM2-135M began, 4 %
    of its peak. The loop only logs the losses (``.detach()``, ``.item()``), so they come back detached and the graph
    goes when the step returns."""
    def detaching(original_step):
        @functools.wraps(original_step)
        def train_step(self, *args, **kwargs):
            return detached_step_result(original_step(self, *args, **kwargs))

        return train_step

    rebind("ludwig.trainers.trainer:Trainer.train_step", detaching)
