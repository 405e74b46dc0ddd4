"""One entry point for every task's metrics: ``score_task(task, test, predictions, resources) -> TaskScores``.

Each task's record (``prep/task.py`` TaskSpec) names its scorer kind and the one metric the retention matrix uses
(higher is better); here are the scorers, by kind. Custom YAML tasks (prep/custom_task.py) and unregistered ones
get the free-text default: ROUGE-L, chrF and exact match. Scales: rates, accuracies, ROUGE-L, STA, SIM and J are in
[0, 1]; chrF and BLEU are 0-100 as sacrebleu reports them. ``TaskScores.per_row`` holds one value per test row for
every metric that is a mean over rows (always the primary one); ``TaskScores.settings`` holds what describes the
scoring rather than scores it: ``n`` (rows scored), ``n_real_db`` (Spider rows run on a real database),
``n_gold_fails``, ``J_includes_fluency``, ``classifier_heldout_accuracy``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from eval.classification import label_key, score_choices, score_labels
from eval.detox import SOURCE, load_encoder, load_or_train_classifier, score_detox
from eval.task_scores import TaskScores
from eval.text import clean_predictions, references_of, score_text
from ludwig_mt.errors import WorkflowError
from prep.banking77 import INTENTS
from prep.registry import TASKS
from prep.common import LUDWIG_SPLIT_CODE, TRAIN
from prep.task import DEFAULT_METRIC, DEFAULT_SCORER, RESPONSE, SPLIT

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
    from eval.sql import score_sql  # sqlglot: imported when SQL is scored (generate-only runs lack it)

    return score_sql(predictions, _column(test, RESPONSE, "sql"), _column(test, "context", "sql"))


def _score_spider(test: pd.DataFrame, predictions: list[str], resources: EvalResources) -> TaskScores:
    spider_dir = resources.spider_dir
    if spider_dir is None or not (spider_dir / "database").is_dir():
        where = "no spider_dir" if spider_dir is None else f"{spider_dir / 'database'} not found"
        raise WorkflowError(f"spider: {where}; pass spider_dir (--spider-dir), the Spider folder holding "
                            "database/<db_id>/<db_id>.sqlite, so execution accuracy runs on the real databases")
    from eval.sql import score_spider, spider_database  # sqlglot, as in _score_sql

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


def training_labels(train_csv: Path, golds: Sequence[str]) -> tuple[list[str], int]:
    """The label set of a ``metric: accuracy`` task (a spec's): the responses of its training split (``split``
    0 of train.csv), most frequent first, one spelling per label key (``classification.label_key``), plus any
    test label never seen in training (it counts as a class; a model can only get it right by naming it). Also
    returns how many test labels were unseen, a setting worth reporting."""
    if not train_csv.is_file():
        raise WorkflowError(f"{train_csv}: not found; its training responses are the task's labels. "
                            f"Fix: run ./run.sh prep --spec <the task's spec> --out {train_csv.parent.parent}")
    train = pd.read_csv(train_csv, keep_default_na=False, dtype=str)
    trained = train[RESPONSE][train[SPLIT] == str(LUDWIG_SPLIT_CODE[TRAIN])] if SPLIT in train else train[RESPONSE]
    keys: dict[str, str] = {}
    for label in trained.value_counts(sort=True).index:
        keys.setdefault(label_key(label), label)
    unseen = [g for g in dict.fromkeys(golds) if label_key(g) not in keys]
    return [*keys.values(), *unseen], len(unseen)


def _score_training_labels(test: pd.DataFrame, predictions: list[str], resources: EvalResources, *,
                           task: str) -> TaskScores:
    """Exact-match accuracy (the answer's first line is the label, case and punctuation aside) over the labels
    of the task's training split; ``invalid`` = answers that are no label."""
    if resources.prepared_dir is None:
        raise WorkflowError(f"{task}: no prepared_dir; pass prepared_dir (--prepared), the folder with "
                            f"{task}/train.csv, whose responses are the labels")
    golds = _column(test, RESPONSE, task)
    labels, unseen = training_labels(resources.prepared_dir / task / "train.csv", golds)
    scores = score_labels(predictions, golds, labels)
    return replace(scores, settings={**scores.settings, "labels": len(labels),
                                     "test_labels_unseen_in_training": unseen})


# scorer kind -> scorer; which task uses which kind is its record's ``scorer`` (prep/task.py TaskSpec).
SCORERS: dict[str, Scorer] = {
    "sql": _score_sql,
    "spider": _score_spider,
    "detox": _score_detox,
    "text": _score_text,
    "intents": _score_banking77,
    "choices": _score_commonsense_qa,
    "labels": _score_training_labels,  # needs the task's name: its labels are its train.csv's responses
}


def scorer_of(task: str) -> Scorer:
    """The scorer of ``task``'s kind (free text for tasks not registered); a one-line error for an unknown kind."""
    kind = TASKS[task].scorer if task in TASKS else DEFAULT_SCORER
    if kind not in SCORERS:
        raise WorkflowError(f"{task}: scorer {kind!r} is unknown. Fix: set its task spec's scorer to one of: "
                            f"{', '.join(SCORERS)}")
    return functools.partial(SCORERS[kind], task=task) if kind == "labels" else SCORERS[kind]


def primary_metric(task: str) -> str:
    """The metric of ``task`` used in the retention matrix (higher is better); rougeL for tasks not registered."""
    return TASKS[task].primary_metric if task in TASKS else DEFAULT_METRIC


class _PrimaryMetrics(Mapping[str, str]):
    """Every registered task -> its primary metric, read when asked: a task registered later (a spec passed to
    ``eval --spec``) is in it too."""

    def __getitem__(self, task: str) -> str:
        if task not in TASKS:
            raise KeyError(task)
        return primary_metric(task)

    def __iter__(self) -> Iterator[str]:
        return iter(list(TASKS))

    def __len__(self) -> int:
        return len(TASKS)


# Every registered task (built-in, prep/custom/*.yaml and specs given to eval --spec) -> its primary metric.
PRIMARY_METRIC: Mapping[str, str] = _PrimaryMetrics()


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
    return scorer_of(task)(test, clean_predictions(predictions), resources)
