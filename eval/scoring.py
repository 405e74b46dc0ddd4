"""One entry point for every task's metrics: ``score_task(task, test, predictions, resources) -> TaskScores``.

Each registered task maps to its scorer and to the one metric the retention matrix uses (higher is better).
Tasks without an entry, e.g. custom YAML tasks (prep/custom_task.py), get the free-text default: ROUGE-L,
chrF and exact match. Scales: rates, accuracies, ROUGE-L, STA, SIM and J are in [0, 1]; chrF and BLEU are
0-100 as sacrebleu reports them. ``TaskScores.per_row`` holds one value per test row for every metric that is a
mean over rows (always the primary one); ``TaskScores.settings`` holds what describes the scoring rather than
scores it: ``n`` (rows scored), ``n_real_db`` (Spider rows run on a real database), ``n_gold_fails``,
``J_includes_fluency``, ``classifier_heldout_accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from eval.classification import score_choices, score_labels
from eval.detox import SOURCE, load_encoder, load_or_train_classifier, score_detox
from eval.sql import score_spider, score_sql, spider_database
from eval.task_scores import TaskScores
from eval.text import clean_predictions, references_of, score_text
from ludwig_mt.ludwig_fixes import WorkflowError
from prep.banking77 import INTENTS
from prep.registry import TASKS
from prep.task import RESPONSE

TOXICITY_CLASSIFIER_FILE = "toxicity_classifier.joblib"


@dataclass(frozen=True)
class EvalResources:
    """What some metrics need beyond the test set and the predictions; built once per eval run."""

    work_dir: Path  # where to cache e.g. the toxicity classifier
    prepared_dir: Path | None = None  # prepared data root (detox/train.csv trains the toxicity classifier)
    spider_dir: Path | None = None  # Spider folder with database/<db_id>/<db_id>.sqlite


Scorer = Callable[[pd.DataFrame, list[str], EvalResources], TaskScores]


def _column(test: pd.DataFrame, name: str, task: str) -> list[str]:
    if name not in test.columns:
        raise WorkflowError(f"{task} test.csv has no '{name}' column; re-run `python -m prep {task}`")
    return [str(v) for v in test[name]]


def _score_sql(test: pd.DataFrame, predictions: list[str], _: EvalResources) -> TaskScores:
    return score_sql(predictions, _column(test, RESPONSE, "sql"), _column(test, "context", "sql"))


def _score_spider(test: pd.DataFrame, predictions: list[str], resources: EvalResources) -> TaskScores:
    spider_dir = resources.spider_dir
    if spider_dir is None or not (spider_dir / "database").is_dir():
        where = "no spider_dir" if spider_dir is None else f"{spider_dir / 'database'} not found"
        raise WorkflowError(f"spider: {where}; pass spider_dir (--spider-dir), the Spider folder holding "
                            "database/<db_id>/<db_id>.sqlite, so execution accuracy runs on the real databases")
    databases = [spider_database(spider_dir, db_id) for db_id in _column(test, "db_id", "spider")]
    return score_spider(predictions, _column(test, RESPONSE, "spider"), _column(test, "context", "spider"),
                        databases)


def _score_detox(test: pd.DataFrame, predictions: list[str], resources: EvalResources) -> TaskScores:
    if resources.prepared_dir is None:
        raise WorkflowError("detox: no prepared_dir; pass prepared_dir (--prepared), the folder with "
                            "detox/train.csv from `python -m prep detox`, to train the toxicity classifier")
    classifier = load_or_train_classifier(resources.prepared_dir / "detox",
                                          resources.work_dir / TOXICITY_CLASSIFIER_FILE)
    return score_detox(_column(test, SOURCE, "detox"), predictions, references_of(test, "detox test.csv"),
                       classifier, load_encoder())


def _score_banking77(test: pd.DataFrame, predictions: list[str], _: EvalResources) -> TaskScores:
    return score_labels(predictions, _column(test, RESPONSE, "banking77"), INTENTS)


def _score_commonsense_qa(test: pd.DataFrame, predictions: list[str], _: EvalResources) -> TaskScores:
    return score_choices(predictions, _column(test, RESPONSE, "commonsense_qa"))


def _score_text(test: pd.DataFrame, predictions: list[str], _: EvalResources) -> TaskScores:
    return score_text(predictions, references_of(test))


# task -> (scorer, primary metric); everything else is free text.
SCORERS: dict[str, tuple[Scorer, str]] = {
    "sql": (_score_sql, "execution_match"),
    "spider": (_score_spider, "execution_accuracy"),
    "detox": (_score_detox, "J"),
    "instruct": (_score_text, "rougeL"),
    "samsum": (_score_text, "rougeL"),
    "lamini_docs": (_score_text, "rougeL"),
    "banking77": (_score_banking77, "accuracy"),
    "commonsense_qa": (_score_commonsense_qa, "accuracy"),
}
DEFAULT_SCORER: tuple[Scorer, str] = (_score_text, "rougeL")


def primary_metric(task: str) -> str:
    """The metric of ``task`` used in the retention matrix (higher is better); rougeL for tasks not listed."""
    return SCORERS.get(task, DEFAULT_SCORER)[1]


# Every registered task (built-in and prep/custom/*.yaml) -> its primary metric.
PRIMARY_METRIC: dict[str, str] = {task: primary_metric(task) for task in TASKS}


def score_task(task: str, test: pd.DataFrame, predictions: Sequence[object],
               resources: EvalResources) -> TaskScores:
    """All metrics of one task, their per-row values and the scoring's settings. See the module docstring.

    ``test`` is the task's test.csv read with ``pd.read_csv(path, keep_default_na=False, dtype=str)``;
    ``predictions`` is one decoded output per test row, in order. Empty, missing or unparseable predictions are
    scored as wrong, never raise.
    """
    if len(predictions) != len(test):
        raise WorkflowError(f"{task}: {len(predictions)} predictions for {len(test)} test rows; "
                            "predict on exactly the task's test.csv")
    scorer, _ = SCORERS.get(task, DEFAULT_SCORER)
    return scorer(test, clean_predictions(predictions), resources)
