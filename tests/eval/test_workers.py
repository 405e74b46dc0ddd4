"""eval.workers: how model runs are shared between generation processes (the processes: test_eval_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.runner import EvalRequest, ModelSpec
from eval.workers import partition, prefill, run_labels


def test_partition_deals_every_label_once_round_robin() -> None:
    labels = ["base", "sql", "detox", "mix", "sql#2"]
    shares = partition(labels, 2)
    assert shares == [("base", "detox", "sql#2"), ("sql", "mix")]
    assert sorted(label for share in shares for label in share) == sorted(labels)


def test_partition_never_makes_empty_shares() -> None:
    assert partition(["base", "sql"], 7) == [("base",), ("sql",)]
    with pytest.raises(ValueError):
        partition(["base"], 0)


def test_run_labels_put_the_base_first_and_name_every_seed(tmp_path: Path) -> None:
    request = EvalRequest(name="n", base_model="b", tasks=("sql",), prepared=tmp_path, models=(
        ModelSpec("sql", tmp_path / "a", ("sql",), (tmp_path / "b",)), ModelSpec("mix", tmp_path / "c", ("sql",))))
    assert run_labels(request) == ["base", "sql#1", "sql#2", "mix"]


def test_one_worker_or_saved_generations_start_no_process(tmp_path: Path) -> None:
    request = EvalRequest(name="n", base_model="b", tasks=("sql",), prepared=tmp_path, models=())
    assert prefill(request, 1) == []
    assert prefill(EvalRequest(name="n", base_model="b", tasks=("sql",), prepared=tmp_path, models=(),
                               saved={"identities": {}}), 4) == []
