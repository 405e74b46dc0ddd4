"""bench/scaling.py's arithmetic: same global batch at every N, per-step loss across ranks, tokens/s, efficiency."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from scaling import accumulation_for, efficiency, gpu_counts, step_losses, tokens_per_second  # noqa: E402


def test_gpu_counts_are_powers_of_two_up_to_the_machine() -> None:
    assert gpu_counts(0) == [1]
    assert gpu_counts(1) == [1]
    assert gpu_counts(6) == [1, 2, 4]
    assert gpu_counts(8) == [1, 2, 4, 8]


def test_accumulation_keeps_the_global_batch() -> None:
    assert [accumulation_for(64, 8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_for(64, 8, 16)


def test_step_loss_sums_micro_batches_and_averages_ranks() -> None:
    # Ludwig reports micro-batch loss / accumulation; two ranks, accumulation 2, a trailing partial step dropped
    reports = [{"losses": [1.0, 2.0, 3.0, 4.0, 9.0]}, {"losses": [3.0, 2.0, 1.0, 2.0]}]
    assert step_losses(reports, 2) == [(3.0 + 5.0) / 2, (7.0 + 3.0) / 2]


def test_tokens_per_second_counts_every_rank_after_warm_up_over_rank0_time() -> None:
    reports = [{"rank": 0, "step_end_seconds": [1.0, 2.0, 3.0, 5.0], "tokens": [99, 10, 10, 10]},
               {"rank": 1, "step_end_seconds": [1.1, 2.1, 3.1, 5.1], "tokens": [99, 20, 20, 20]}]
    assert tokens_per_second(reports, 1) == pytest.approx(90 / 4.0)
    assert tokens_per_second(reports, 0) is None
    assert tokens_per_second(reports, 4) is None


def test_efficiency_and_loss_gap_are_against_the_one_gpu_point() -> None:
    points = [{"gpus": 1, "tokens_per_second": 100.0, "step_losses": [2.0, 1.0]},
              {"gpus": 2, "tokens_per_second": 180.0, "step_losses": [2.0, 1.02]},
              {"gpus": 4, "tokens_per_second": 200.0, "step_losses": [2.2, 1.0]}]
    efficiency(points)
    assert [p["scaling_efficiency"] for p in points] == [1.0, 0.9, 0.5]
    assert [p["max_loss_rel_gap"] for p in points] == [0.0, 0.02, 0.1]
    assert [p["loss_within_tolerance"] for p in points] == [True, False, False]
