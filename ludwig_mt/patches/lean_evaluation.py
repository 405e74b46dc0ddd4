"""Ludwig's evaluation of a fine-tuned LLM with logits only where its metrics read them (``response_only_eval_logits``).

Why: after training, Ludwig scores the validation (and test) rows with ``LLM.forward`` in eval mode, which puts every
position of every row, prompt included, through the LM head over the whole vocabulary, then keeps the logits and
their softmax as float32 ``[rows, positions, vocabulary]`` tensors, and its next-token loss copies and log-softmaxes
them again. On the H200 (run 18, SmolLM2-135M, samsum.yaml, QLoRA) scoring 8 validation rows of about 508 positions
took 3.25 GiB, four tensors of 0.744 GiB, where a training step peaked at 0.84 GiB: the evaluation, not the training,
set the memory the run needed, and with Llama 3's 128k vocabulary at 2,048 positions it would be tens of GB.

What Ludwig's metrics read, and why the result is the same:

* the loss, ``perplexity`` and ``next_token_perplexity`` read the logits or probabilities and skip every position
  whose target is -100 (``IGNORE_INDEX_TOKEN_ID``: the prompt and the left padding), so they need the positions from
  the one before the first scored target (position i predicts target i + 1) to the end: :func:`scored_window`, found
  with Ludwig's own target alignment; the logits and probabilities are computed there only, in the model's dtype,
  then cast to float32, as Ludwig does;
* ``token_accuracy`` and ``sequence_accuracy`` read the predictions of every position (they count the prompt's -100
  targets as misses), so the predictions keep every position: an argmax of the LM head row by row
  (:func:`argmax_by_rows`), never holding more than one row's logits;
* the metric updates are Ludwig's own: its loop for the prediction-based metrics, the logit- and probability-based
  ones updated with the targets cut to the same window.

Only inside ``FineTuneTrainer.evaluation`` (the evaluations during and at the end of ``ludwig train``, which collect
no predictions); ``LudwigModel.evaluate`` and prediction keep Ludwig's forward. Tests compare every metric with
Ludwig's on the same batches (``tests/ludwig_mt/patches/test_lean_evaluation.py``). The speed-up's switch and the
marking of the evaluation live with the other speed-ups (:func:`ludwig_mt.patches.speedups.patch_response_only_eval_logits`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ludwig_mt.patches.fixes import base_causal_lm

logger = logging.getLogger(__name__)

#: ludwig.constants.IGNORE_INDEX_TOKEN_ID: the targets no metric scores
IGNORE = -100
NAME = "response_only_eval_logits"
EVALUATION = "ludwig.trainers.trainer_llm:FineTuneTrainer.evaluation"
FORWARD = "ludwig.models.llm:LLM.forward"
UPDATE_METRICS = "ludwig.models.llm:LLM.update_metrics_finetune_llm"
TARGETS = (EVALUATION, FORWARD, UPDATE_METRICS)


def scored_window(aligned_targets) -> int:
    """How many of the last positions Ludwig's logit- and probability-based metrics read for targets aligned to the
    positions (``[rows, positions]``, -100 where nothing is scored): from the position before the first scored target
    to the end, at least 2 (a next-token pair); all positions when the first column is already scored."""
    import torch

    width = aligned_targets.shape[1]
    scored = torch.nonzero((aligned_targets != IGNORE).any(dim=0)).flatten()
    first = int(scored[0]) if scored.numel() else width - 1
    return min(width, max(2, width - first + 1))


def argmax_by_rows(head, hidden):
    """``head(hidden).argmax(-1)`` for ``hidden`` of ``[rows, positions, width]``, one row's logits at a time."""
    import torch

    if hidden.shape[1] == 0:
        return torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    return torch.cat([head(hidden[i:i + 1]).argmax(-1) for i in range(hidden.shape[0])])


def lean_eval_outputs(llm, input_ids, target_ids) -> tuple[dict[str, Any], int]:
    """What Ludwig's eval forward returns (``predictions``, ``probabilities``, ``logits``, used tokens), with the
    logits and probabilities of the last :func:`scored_window` positions only; and that window."""
    import torch
    from ludwig.accounting.used_tokens import get_used_tokens_for_llm
    from ludwig.constants import LOGITS, PREDICTIONS, PROBABILITIES, USED_TOKENS
    from ludwig.models import llm as llm_module  # the name LLM.forward calls (and the project's fixes rebind)

    llm.model_inputs, llm.attention_masks = llm_module.generate_merged_ids(input_ids, target_ids, llm.tokenizer,
                                                                           llm.global_max_sequence_length)
    (name,) = llm.output_features.keys()
    aligned = llm._update_target_tensor_for_finetuning({name: target_ids.clone()},
                                                       {name: {PREDICTIONS: llm.model_inputs}}, name)[name]
    window = scored_window(aligned)
    base = base_causal_lm(llm.model)
    hidden = base.base_model(input_ids=llm.model_inputs, attention_mask=llm.attention_masks, use_cache=False)[0]
    head = base.get_output_embeddings()
    cut = hidden.shape[1] - window
    logits = head(hidden[:, cut:])
    predictions = torch.cat([argmax_by_rows(head, hidden[:, :cut]), logits.argmax(-1)], dim=1)
    outputs = {PREDICTIONS: predictions, PROBABILITIES: torch.softmax(logits, -1).float(), LOGITS: logits.float(),
               USED_TOKENS: get_used_tokens_for_llm(llm.model_inputs, llm.tokenizer)}
    return outputs, window


def update_with_window(llm, targets: dict[str, Any], predictions: dict[str, Any], window: int) -> None:
    """``LLM.update_metrics_finetune_llm`` for outputs of :func:`lean_eval_outputs`: Ludwig's target alignment and
    metric loop, the logit- and probability-based metrics (the loss included) given the targets of the window."""
    import torch
    from ludwig.constants import LOGITS, PROBABILITIES
    from ludwig.modules.metric_registry import get_metric_tensor_input

    (name, feature), = llm.output_features.items()
    aligned = llm._update_target_tensor_for_finetuning(targets, predictions, name)[name]
    width = aligned.shape[1]
    tail = aligned[:, width - window:]
    if window < width and bool((aligned[:, :width - window + 1] != IGNORE).any()):
        raise RuntimeError(f"{NAME}: a scored target lies before the evaluated window of {window} positions "
                           f"(alignment changed between forward and metrics). Fix: LUDWIG_MT_SPEEDUPS_OFF={NAME}")
    metrics = feature._metric_functions
    windowed = {k: fn for k, fn in metrics.items() if get_metric_tensor_input(k) in (LOGITS, PROBABILITIES)}
    outputs = predictions[name]
    for metric_name, fn in windowed.items():
        key = get_metric_tensor_input(metric_name)
        try:  # as Ludwig's loop (TextOutputFeature.update_metrics): a metric that fails is logged and skipped
            fn.to(outputs[key].device).update(outputs[key].detach(), tail)
        except Exception:
            logger.warning(f"Ran into error when calculating metric {metric_name}. Skipping.", exc_info=True)
    feature._metric_functions = {k: fn for k, fn in metrics.items() if k not in windowed}
    try:
        feature.update_metrics(aligned, outputs, llm.tokenizer)
    finally:
        feature._metric_functions = metrics
    # LLM.eval_loss for one text feature whose targets match its predictions' length (it would pad the window's
    # targets to the predictions' full length, so it is spelled out here: the feature's loss and the extra losses)
    extra = llm.losses()
    llm.eval_loss_metric.update(feature.loss.weight * feature.eval_loss(tail, outputs))
    llm.eval_additional_losses_metrics.update(torch.sum(torch.stack(extra)) if extra else 0)


def lean_forward(original):
    """``LLM.forward`` returning :func:`lean_eval_outputs` for a marked model in eval mode given targets."""

    @functools.wraps(original)
    def forward(self, inputs, mask=None):
        if self.training or not getattr(self, "_ludwig_mt_lean_eval", False) or not isinstance(inputs, tuple):
            return original(self, inputs, mask)
        input_ids, target_ids = self._unpack_inputs(inputs)
        outputs, self._ludwig_mt_eval_window = lean_eval_outputs(self, input_ids, target_ids)
        return outputs

    return forward


def windowed_update(original):
    """``LLM.update_metrics_finetune_llm`` with :func:`update_with_window` after a lean forward (once per forward)."""

    @functools.wraps(original)
    def update_metrics_finetune_llm(self, targets, predictions):
        window, self._ludwig_mt_eval_window = getattr(self, "_ludwig_mt_eval_window", None), None
        if window is None:
            return original(self, targets, predictions)
        return update_with_window(self, targets, predictions, window)

    return update_metrics_finetune_llm
