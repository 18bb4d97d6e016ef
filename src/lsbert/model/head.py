"""A light classification head on the baseline's frozen, mean-pooled embeddings.

Between zero-shot and a fine-tune: fitted in milliseconds on a CPU from a project's first labels (a
class-weighted logistic regression per project), it serves once it beats zero-shot on examples it did not
fit (out-of-fold predictions, scored as the promotion gate scores: macro-F1).

A head is plain arrays and label names; it is stored as an ``.npz`` without pickles, so a head read from a
shared store cannot run code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import KFold, StratifiedKFold

FORMAT = 1
# Regularisation of the logistic regression (inverse strength); embeddings are unit vectors.
C = 10.0
MAX_ITER = 300
# Out-of-fold scoring uses at most this many folds (fewer when a class has fewer examples).
FOLDS = 5
# Below this many labelled examples per seen class the head is not assessed (and does not serve).
MIN_PER_CLASS = 2


@dataclass(frozen=True)
class Head:
    """Weights per label (softmax over labels, or one sigmoid per label when ``multi_label``)."""

    labels: tuple[str, ...]
    multi_label: bool
    coef: np.ndarray  # (labels, dim)
    intercept: np.ndarray  # (labels,)
    examples: int

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, dtype=np.float32) @ self.coef.T + self.intercept

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        logits = self.logits(embeddings)
        if self.multi_label:
            return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "examples": self.examples,
        }
        buffer = io.BytesIO()
        np.savez(
            buffer, coef=self.coef, intercept=self.intercept, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8)
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Head:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown head format {meta.get('format')!r}")
            coef = np.asarray(data["coef"], dtype=np.float32)
            intercept = np.asarray(data["intercept"], dtype=np.float32)
        labels = tuple(str(x) for x in meta["labels"])
        if coef.shape[0] != len(labels) or intercept.shape != (len(labels),):
            raise ValueError("head weights do not match its labels")
        return cls(labels, bool(meta["multi_label"]), coef, intercept, int(meta["examples"]))


def _targets(answers: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    index = {label: j for j, label in enumerate(labels)}
    y = np.zeros((len(answers), len(labels)), dtype=np.int8)
    for i, chosen in enumerate(answers):
        for label in chosen:
            if label in index:
                y[i, index[label]] = 1
    return y


def fit(embeddings: np.ndarray, answers: Sequence[Sequence[str]], labels: Sequence[str], multi_label: bool) -> Head:
    """Fit a head: ``answers[i]`` are the labels chosen for ``embeddings[i]`` (one, for single-label)."""
    x = np.asarray(embeddings, dtype=np.float32)
    y = _targets(answers, labels)
    dim = x.shape[1]
    coef = np.zeros((len(labels), dim), dtype=np.float32)
    intercept = np.full(len(labels), -20.0, dtype=np.float32)  # labels never seen: never chosen
    if multi_label:
        for j in range(len(labels)):
            positives = int(y[:, j].sum())
            if positives == 0 or positives == len(y):
                intercept[j] = 20.0 if positives else -20.0
                continue
            model = LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER).fit(x, y[:, j])
            coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
    else:
        target = y.argmax(axis=1)
        seen = np.unique(target)
        if len(seen) == 1:
            intercept[seen[0]] = 0.0
        else:
            model = LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER).fit(x, target)
            if len(seen) == 2:  # sklearn's binary form: one row for the second class
                coef[seen[1]], intercept[seen[1]] = model.coef_[0] / 2, model.intercept_[0] / 2
                coef[seen[0]], intercept[seen[0]] = -model.coef_[0] / 2, -model.intercept_[0] / 2
            else:
                coef[seen], intercept[seen] = model.coef_, model.intercept_
    return Head(tuple(labels), multi_label, coef, intercept, len(x))


@dataclass(frozen=True)
class Assessment:
    """Out-of-fold macro-F1 of the head, of zero-shot and of always answering the most frequent label."""

    examples: int
    head_score: Optional[float]
    zero_shot_score: Optional[float]
    prior_score: Optional[float]

    @property
    def head_serves(self) -> bool:
        if self.head_score is None:
            return False
        rivals = [s for s in (self.zero_shot_score, self.prior_score) if s is not None]
        return all(self.head_score > s for s in rivals)


def _decisions(proba: np.ndarray, multi_label: bool, threshold: float) -> np.ndarray:
    if multi_label:
        return (proba >= threshold).astype(np.int8)
    out = np.zeros_like(proba, dtype=np.int8)
    out[np.arange(len(proba)), proba.argmax(axis=1)] = 1
    return out


def macro_f1(truth: np.ndarray, decided: np.ndarray, multi_label: bool) -> float:
    if multi_label:
        return float(f1_score(truth, decided, average="macro", zero_division=0))
    present = np.flatnonzero(truth.sum(axis=0))
    return float(
        f1_score(truth.argmax(axis=1), decided.argmax(axis=1), labels=present, average="macro", zero_division=0)
    )


def out_of_fold_proba(
    embeddings: np.ndarray, answers: Sequence[Sequence[str]], labels: Sequence[str], multi_label: bool, seed: int = 0
) -> Optional[np.ndarray]:
    """Each example's probabilities from a head fitted without it; ``None`` with too few examples."""
    x = np.asarray(embeddings, dtype=np.float32)
    y = _targets(answers, labels)
    counts = y.sum(axis=0)
    seen = counts[counts > 0]
    if len(x) < 2 * MIN_PER_CLASS or len(seen) < (1 if multi_label else 2) or seen.min() < MIN_PER_CLASS:
        return None
    if multi_label:
        splitter = KFold(n_splits=min(FOLDS, len(x)), shuffle=True, random_state=seed)
        splits = splitter.split(x)
    else:
        folds = int(min(FOLDS, seen.min()))
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y.argmax(axis=1))
    proba = np.zeros(y.shape, dtype=np.float32)
    for train, test in splits:
        head = fit(x[train], [answers[i] for i in train], labels, multi_label)
        proba[test] = head.predict_proba(x[test])
    return proba


def assess(
    embeddings: np.ndarray,
    answers: Sequence[Sequence[str]],
    labels: Sequence[str],
    multi_label: bool,
    zero_shot_proba: Optional[np.ndarray],
    threshold: float = 0.5,
) -> Assessment:
    """Score the head out of fold against zero-shot (``zero_shot_proba`` on the same examples) and the prior."""
    y = _targets(answers, labels)
    oof = out_of_fold_proba(embeddings, answers, labels, multi_label)
    head_score = None if oof is None else macro_f1(y, _decisions(oof, multi_label, threshold), multi_label)
    zs_score = None
    if zero_shot_proba is not None and len(y):
        zs_score = macro_f1(y, _decisions(np.asarray(zero_shot_proba), multi_label, threshold), multi_label)
    prior_score = None
    if len(y):
        prior = np.tile(y.mean(axis=0, dtype=np.float32), (len(y), 1))
        prior_score = macro_f1(y, _decisions(prior, multi_label, threshold), multi_label)
    return Assessment(len(y), head_score, zs_score, prior_score)
