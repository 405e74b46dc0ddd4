"""ludwig_mt/patches/lean_evaluation.py: Ludwig's evaluation metrics, unchanged, from logits of the scored window only."""

from __future__ import annotations

import pytest
import torch

from ludwig_mt.patches import lean_evaluation, speedups
from tests.ludwig_mt.patches.test_speedups import llm, ludwig_batch  # noqa: F401  (llm: the shared fixture)

#: fp32 on the CPU: the same terms, summed over fewer zero-weight positions
TOLERANCE = 1e-5


def evaluate(model, batches, *, lean: bool) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """What ``LlmFineTunePredictor.batch_evaluation`` does per batch (forward, ``outputs_to_predictions``,
    ``update_metrics_finetune_llm``), then Ludwig's metrics; and, per batch, (positions, logits' positions)."""
    from ludwig.distributed import init_dist_strategy

    init_dist_strategy("local")  # Ludwig's metrics synchronise through it, as in a run
    model.eval()
    model._ludwig_mt_lean_eval = lean
    shapes = []
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                outputs = model((dict(inputs), {k: v.clone() for k, v in targets.items()}))
                shapes.append((outputs["predictions"].shape[1], outputs["logits"].shape[1]))
                model.update_metrics_finetune_llm({k: v.clone() for k, v in targets.items()},
                                                  model.outputs_to_predictions(outputs))
        metrics = model.get_metrics()
    finally:
        model.reset_metrics()
        model._ludwig_mt_lean_eval = False
        model.train()
    return {k: float(v) for k, v in metrics["response"].items()}, shapes


def greedy_responses(model, batch):
    """The batch with each response replaced by the model's own greedy continuation of its prompt (as long as the
    response was), so that Ludwig's token accuracy has hits to count (random responses give 0 either way)."""
    inputs, targets = batch
    pad = model.tokenizer.pad_token_id
    rows = []
    with torch.no_grad():
        for prompt, response in zip(inputs["prompt"], targets["response"]):
            ids = prompt[prompt != pad][None]
            for _ in range(int((response != pad).sum())):
                ids = torch.cat([ids, model.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            rows.append(ids[0, int((prompt != pad).sum()):])
    width = targets["response"].shape[1]
    return inputs, {"response": torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])}


def test_every_metric_equals_ludwigs_with_logits_of_the_scored_window_only(llm) -> None:  # noqa: F811
    """Long prompts, short responses, rows whose response is cut at the fixture's 64 positions: loss, perplexity,
    next-token perplexity (logits, probabilities) and token / sequence accuracy (predictions of every position)."""
    tokenizer = llm.tokenizer
    llm.eval()
    batches = [greedy_responses(llm, ludwig_batch(tokenizer, [30, 12, 25], [4, 9, 2], seed=3)),
               ludwig_batch(tokenizer, [40, 8], [6, 30], seed=4),  # 40 + 6 and 8 + 30 tokens
               ludwig_batch(tokenizer, [58, 20], [12, 5], seed=5)]  # 58 + 12 > 64: the response is cut
    ludwig, full_shapes = evaluate(llm, batches, lean=False)
    lean, lean_shapes = evaluate(llm, batches, lean=True)
    assert set(ludwig) == {"loss", "perplexity", "next_token_perplexity", "token_accuracy", "sequence_accuracy"}
    assert ludwig["token_accuracy"] > 0  # the greedy rows' hits, over every position as Ludwig counts
    for name, value in ludwig.items():
        assert lean[name] == pytest.approx(value, rel=TOLERANCE, abs=1e-7), name
    assert [p for p, _ in lean_shapes] == [p for p, _ in full_shapes]  # predictions keep every position
    assert all(window < positions for positions, window in lean_shapes[:2]), lean_shapes
    assert lean_shapes[0][1] == 9 + 1 + 1  # the longest response, its EOS and the position before


def test_the_window_starts_before_the_first_scored_target() -> None:
    ignore = lean_evaluation.IGNORE
    aligned = torch.tensor([[ignore, ignore, ignore, 5, 6, 2], [ignore, ignore, ignore, ignore, 7, 2]])
    assert lean_evaluation.scored_window(aligned) == 4  # positions 2-5: 2 predicts the target at 3
    assert lean_evaluation.scored_window(torch.full((2, 6), ignore)) == 2  # nothing scored: Ludwig's NaN, 2 wide
    assert lean_evaluation.scored_window(torch.tensor([[1, 2, 3]])) == 3  # never wider than the rows


def test_predictions_by_rows_are_the_full_argmax() -> None:
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8)
    assert torch.equal(lean_evaluation.argmax_by_rows(head, hidden), head(hidden).argmax(-1))
    assert lean_evaluation.argmax_by_rows(head, hidden[:, :0]).shape == (3, 0)


def test_only_ludwig_trains_evaluation_takes_the_lean_path(llm, monkeypatch) -> None:  # noqa: F811
    """``FineTuneTrainer.evaluation`` (the registered layer) marks the model for its duration, only with the speed-up
    on; everything else (``LudwigModel.evaluate``, prediction) calls the forward unmarked: Ludwig's own outputs."""
    from types import SimpleNamespace

    from ludwig_mt.patches import core

    assert lean_evaluation.NAME in core.layers().get(lean_evaluation.EVALUATION, [])
    seen = []
    evaluation = speedups.marking_evaluation(lambda self: seen.append(self.model._ludwig_mt_lean_eval))
    trainer = SimpleNamespace(model=llm)
    evaluation(trainer)
    monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", lean_evaluation.NAME)
    evaluation(trainer)
    assert seen == [True, False] and llm._ludwig_mt_lean_eval is False


@pytest.mark.slow
def test_ludwig_train_reports_the_same_validation_metrics_with_and_without_it(tiny_model, tmp_path, monkeypatch) -> None:
    """A real ``LudwigModel.train`` (the tiny model, 60 SQL rows, one epoch): the validation metrics Ludwig records
    are the same with the speed-up on as with Ludwig's own evaluation, and the lean path ran."""
    import logging

    from ludwig.api import LudwigModel

    from ludwig_mt.config import load_yaml, render_overrides
    from prep.registry import get_task
    from prep.task import prepare
    from workflow.samples import write_sql_sample

    report = prepare(get_task("sql"), str(write_sql_sample(tmp_path / "v4.json", 60)), tmp_path / "prepared")
    config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(tiny_model), cpu=True,
                              epochs=1, batch_size=8, max_new_tokens=12)
    windows = []
    real = lean_evaluation.lean_eval_outputs

    def recording(*args):
        outputs, window = real(*args)
        windows.append(window)
        return outputs, window

    monkeypatch.setattr(lean_evaluation, "lean_eval_outputs", recording)

    def metrics(off: str) -> dict:
        monkeypatch.setenv("LUDWIG_MT_SPEEDUPS_OFF", off)
        stats, _, _ = LudwigModel(config, logging_level=logging.WARNING).train(
            dataset=report.files["train"], output_directory=str(tmp_path / f"results-{off or 'on'}"),
            skip_save_model=True, skip_save_progress=True, skip_save_log=True, skip_save_processed_input=True,
            random_seed=7)
        (name,) = config["output_features"][0]["name"],
        return stats.validation[name]  # the prepared train.csv holds training and validation rows

    ludwig = metrics(lean_evaluation.NAME)
    assert windows == []
    lean = metrics("")
    assert windows
    assert set(ludwig) == {"loss", "perplexity", "next_token_perplexity", "token_accuracy", "sequence_accuracy"}
    for name, values in ludwig.items():
        assert lean[name] == pytest.approx(values, rel=TOLERANCE, abs=1e-7), name
