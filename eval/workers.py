"""Generation in several processes sharing one device, for many small models.

Greedy generation with a 135M-parameter model is bound by Python's per-token overhead, not by the GPU: on an
H200 one process generated one SmolLM2 adapter's 5 tasks x 200 rows in 60-80 s with the GPU mostly idle; 7
processes generated the study's 11 model runs in 275 s (docs/study/README.md). ``prefill(request, workers)``
splits the model seeds over ``workers`` spawned processes; each generates its share into the pair cache
(``generate_only``: predictions, no scores) exactly as the one-process run would, keyed the same way. The
caller's own run then finds every pair and probe in the cache, loads no model, and scores or saves as usual, so
the report cannot tell how it was made except by its timings. Each worker logs to
``<report>/generate-worker-<i>.log``; a failed worker stops the run with one line naming its log.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from eval.runner import EvalRequest, all_runs, default_backend, generate_all
from ludwig_mt.errors import WorkflowError


def run_labels(request: EvalRequest) -> list[str]:
    """Every model seed's label in the order the runner visits them: the base first."""
    return [run.label for run in all_runs(request)]


def partition(labels: Sequence[str], workers: int) -> list[tuple[str, ...]]:
    """``labels`` dealt round-robin into at most ``workers`` non-empty shares (the runs cost about the same:
    the same tasks and rows for each model)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    shares = [tuple(labels[i::workers]) for i in range(min(workers, len(labels)))]
    return [share for share in shares if share]


def worker_log(request: EvalRequest, index: int) -> Path:
    return request.report_dir / f"generate-worker-{index}.log"


def _generate_share(request: EvalRequest, labels: tuple[str, ...], log: str) -> float:
    """One worker: generate its runs' pairs and probes into the shared cache (nothing scored); seconds taken."""
    from eval.report import logging_to

    started = time.perf_counter()
    with logging_to(Path(log)):
        generate_all(request, default_backend(), progress=False, only=frozenset(labels))
    return time.perf_counter() - started


def prefill(request: EvalRequest, workers: int, notify: Callable[[str], None] = lambda message: None) -> list[float]:
    """Fill the pair and probe cache of ``request`` using ``workers`` processes (spawned: CUDA cannot be forked);
    returns each worker's seconds. A no-op for one worker or a request that scores saved generations."""
    labels = run_labels(request)
    if workers <= 1 or request.saved is not None:
        return []
    shares = partition(labels, workers)
    share_request = replace(request, generate_only=True, lm_eval_tasks=(), rescore=False)
    notify(f"generating {len(labels)} model runs in {len(shares)} processes (logs: "
           f"{request.report_dir}/generate-worker-<i>.log)")
    request.report_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(shares), mp_context=context) as pool:
        futures = [pool.submit(_generate_share, share_request, share, str(worker_log(request, i)))
                   for i, share in enumerate(shares)]
        seconds = []
        for index, future in enumerate(futures):
            try:
                seconds.append(future.result())
            except Exception as err:  # noqa: BLE001  (any failure in the worker: one line, its log named)
                raise WorkflowError(f"generation worker {index} ({', '.join(shares[index])}) failed: "
                                    f"{type(err).__name__}: {err}. Log: {worker_log(request, index)}") from None
    return seconds
