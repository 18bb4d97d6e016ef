"""A light classification head on the baseline's frozen, mean-pooled embeddings.

Between zero-shot and a fine-tune: fitted in milliseconds on a CPU from a project's first labels (a
class-weighted logistic regression per project), it serves once it beats zero-shot and the label prior on
examples it did not fit (out-of-fold predictions, scored as the promotion gate scores: macro-F1).

Its probabilities are calibrated: the regularised regression is under-confident on unit-length embeddings,
so its logits are multiplied by the factor that minimises the log-loss of out-of-fold predictions. Decisions
(the top label; a multi-label logit above zero) do not change with that factor, only the scores do.

A head is plain arrays and label names; it is stored as an ``.npz`` without pickles, so a head read from a
shared store cannot run code.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import KFold, StratifiedKFold
from threadpoolctl import threadpool_limits

FORMAT = 1
# Regularisation of the logistic regression (inverse strength); embeddings are unit vectors.
C = 10.0
MAX_ITER = 300
# Out-of-fold scoring uses at most this many folds (fewer when a class has fewer examples).
FOLDS = 5
# Below this many labelled examples per seen class the head is not assessed.
MIN_PER_CLASS = 2
# The head serves only with at least this many examples of each label seen (of each label's positives and
# negatives for multi-label), and this many examples in all...
MIN_PER_CLASS_TO_SERVE = 5
MIN_EXAMPLES_TO_SERVE = 10
# ...and only when its out-of-fold macro-F1 beats zero-shot's and the prior's by this much.
MARGIN = 0.02
# A project's head is fitted on its most recent examples, at most this many: bounds fit time and memory
# (5,000 × 768 float32 embeddings are 15 MB).
MAX_EXAMPLES = 5000
# Out-of-fold work (assessment, calibration) uses only the most recent examples, at most this many: enough
# to compare rivals and to fit one calibration factor, and cheap enough to redo on every label.
ASSESS_EXAMPLES = 2000
# Folds for the out-of-fold logits that calibrate a head, and the range of its calibration factor.
CALIBRATION_FOLDS = 3
CALIBRATION_RANGE = (0.25, 8.0)
# A label with no examples (or, for multi-label, with no negatives) gets this logit and no weights.
UNSEEN_LOGIT = 20.0


def logits_to_proba(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """A sigmoid per label (multi-label) or a softmax over labels."""
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


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
        return logits_to_proba(self.logits(embeddings), self.multi_label)

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
        """A head written by :meth:`to_bytes`; ``ValueError`` for anything else (never unpickles)."""
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                if set(data.files) != {"coef", "intercept", "meta"}:
                    raise ValueError(f"unexpected arrays {sorted(data.files)}")
                meta = json.loads(bytes(data["meta"]).decode())
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError(f"unknown head format {meta.get('format') if isinstance(meta, dict) else None!r}")
                coef = np.asarray(data["coef"], dtype=np.float32)
                intercept = np.asarray(data["intercept"], dtype=np.float32)
            labels = tuple(str(x) for x in meta["labels"])
            multi_label, examples = meta["multi_label"], meta["examples"]
        except ValueError as exc:
            raise ValueError(f"not a head: {exc}") from None
        except (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a head: {type(exc).__name__}: {exc}") from None
        if coef.ndim != 2 or coef.shape[0] != len(labels) or intercept.shape != (len(labels),):
            raise ValueError("head weights do not match its labels")
        if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise ValueError("head weights are not finite")
        if not isinstance(multi_label, bool) or not isinstance(examples, int):
            raise ValueError("head metadata has the wrong types")
        return cls(labels, multi_label, coef, intercept, examples)


def _targets(answers: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    index = {label: j for j, label in enumerate(labels)}
    y = np.zeros((len(answers), len(labels)), dtype=np.int8)
    for i, chosen in enumerate(answers):
        for label in chosen:
            if label in index:
                y[i, index[label]] = 1
    return y


def _recent(
    x: np.ndarray, answers: Sequence[Sequence[str]], limit: int = MAX_EXAMPLES
) -> tuple[np.ndarray, Sequence[Sequence[str]]]:
    """The last ``limit`` examples (callers pass them oldest first)."""
    if len(x) <= limit:
        return x, answers
    return x[-limit:], list(answers)[-limit:]


def _one_blas_thread() -> threadpool_limits:
    """Small solves run many times slower with several BLAS threads on a busy CPU (they wait for each
    other), and the predictor's model inference wants those cores anyway."""
    return threadpool_limits(limits=1, user_api="blas")


def _regression() -> LogisticRegression:
    return LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER)


def _fit_raw(x: np.ndarray, y: np.ndarray, multi_label: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights and intercepts for the 0/1 targets ``y`` (examples × labels), and which labels were learnt
    (the others keep zero weights and a fixed intercept of ±``UNSEEN_LOGIT``)."""
    n_labels = y.shape[1]
    coef = np.zeros((n_labels, x.shape[1]), dtype=np.float32)
    intercept = np.full(n_labels, -UNSEEN_LOGIT, dtype=np.float32)  # labels never seen: never chosen
    learnt = np.zeros(n_labels, dtype=bool)
    if multi_label:
        for j in range(n_labels):
            positives = int(y[:, j].sum())
            if positives == 0 or positives == len(y):
                intercept[j] = UNSEEN_LOGIT if positives else -UNSEEN_LOGIT
                continue
            model = _regression().fit(x, y[:, j])
            coef[j], intercept[j], learnt[j] = model.coef_[0], model.intercept_[0], True
        return coef, intercept, learnt
    target = y.argmax(axis=1)
    seen = np.unique(target)
    if len(seen) == 1:
        intercept[seen[0]] = 0.0
        return coef, intercept, learnt
    model = _regression().fit(x, target)
    if len(seen) == 2:  # sklearn's binary form: one row for the second class
        coef[seen[1]], intercept[seen[1]] = model.coef_[0] / 2, model.intercept_[0] / 2
        coef[seen[0]], intercept[seen[0]] = -model.coef_[0] / 2, -model.intercept_[0] / 2
    else:
        coef[seen], intercept[seen] = model.coef_, model.intercept_
    learnt[seen] = True
    return coef, intercept, learnt


def _splits(y: np.ndarray, multi_label: bool, folds: int, seed: int) -> Optional[list[tuple[np.ndarray, np.ndarray]]]:
    """Train/test index pairs for out-of-fold predictions; ``None`` with too few examples per seen label."""
    counts = y.sum(axis=0)
    seen = counts[counts > 0]
    if len(y) < 2 * MIN_PER_CLASS or len(seen) < (1 if multi_label else 2) or seen.min() < MIN_PER_CLASS:
        return None
    if multi_label:
        return list(KFold(n_splits=min(folds, len(y)), shuffle=True, random_state=seed).split(y))
    n_splits = int(min(folds, seen.min()))
    target = y.argmax(axis=1)
    return list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, target))


def _oof_logits(x: np.ndarray, y: np.ndarray, multi_label: bool, folds: int, seed: int) -> Optional[np.ndarray]:
    splits = _splits(y, multi_label, folds, seed)
    if splits is None:
        return None
    logits = np.zeros(y.shape, dtype=np.float32)
    for train, test in splits:
        coef, intercept, _ = _fit_raw(x[train], y[train], multi_label)
        logits[test] = x[test] @ coef.T + intercept
    return logits


def _log_loss(logits: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    if multi_label:
        # -log sigmoid(z) for positives, -log sigmoid(-z) for negatives
        signed = np.where(y > 0, logits, -logits)
        return float(np.logaddexp(0.0, -signed).mean())
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float((log_norm - shifted[np.arange(len(y)), y.argmax(axis=1)]).mean())


def calibration_factor(logits: np.ndarray, y: np.ndarray, multi_label: bool, learnt: np.ndarray) -> float:
    """The factor on the learnt labels' logits that minimises the log-loss of out-of-fold ``logits``."""
    low, high = np.log(CALIBRATION_RANGE[0]), np.log(CALIBRATION_RANGE[1])
    candidates = np.exp(np.linspace(low, high, 49))
    losses = []
    for factor in candidates:
        scaled = np.where(learnt, logits * factor, logits)
        losses.append(_log_loss(scaled, y, multi_label))
    return float(candidates[int(np.argmin(losses))])


def fit(
    embeddings: np.ndarray,
    answers: Sequence[Sequence[str]],
    labels: Sequence[str],
    multi_label: bool,
    calibrate: bool = True,
    seed: int = 0,
) -> Head:
    """Fit a head: ``answers[i]`` are the labels chosen for ``embeddings[i]`` (one, for single-label), oldest
    first; only the last ``MAX_EXAMPLES`` are used. With ``calibrate`` (and enough examples for out-of-fold
    logits) the head's logits are scaled to calibrated probabilities; without, decisions are the same."""
    x, answers = _recent(np.asarray(embeddings, dtype=np.float32), answers)
    y = _targets(answers, labels)
    with _one_blas_thread():
        coef, intercept, learnt = _fit_raw(x, y, multi_label)
        if calibrate and learnt.any():
            recent = y[-ASSESS_EXAMPLES:]
            oof = _oof_logits(x[-ASSESS_EXAMPLES:], recent, multi_label, CALIBRATION_FOLDS, seed)
            if oof is not None:
                factor = calibration_factor(oof, recent, multi_label, learnt)
                coef[learnt] *= factor
                intercept[learnt] *= factor
    return Head(tuple(labels), multi_label, coef, intercept, len(x))


def prior(embeddings: np.ndarray, answers: Sequence[Sequence[str]], labels: Sequence[str], multi_label: bool) -> Head:
    """The label prior as a head: no weights, each label's log frequency (log-odds for multi-label) as its
    intercept, so it always answers the most frequent label(s), with their frequency as the probability."""
    x, answers = _recent(np.asarray(embeddings, dtype=np.float32), answers)
    y = _targets(answers, labels).astype(np.float64)
    count = max(len(y), 1)
    frequency = np.clip(y.sum(axis=0) / count, 0.5 / count, 1 - 0.5 / count)
    if multi_label:
        intercept = np.log(frequency / (1 - frequency))
    else:
        intercept = np.where(y.sum(axis=0) > 0, np.log(frequency), -UNSEEN_LOGIT)
    return Head(
        tuple(labels),
        multi_label,
        np.zeros((len(labels), x.shape[1]), np.float32),
        intercept.astype(np.float32),
        len(y),
    )


@dataclass(frozen=True)
class Assessment:
    """Out-of-fold macro-F1 of the head, of zero-shot and of always answering the most frequent label, on the
    ``examples`` labelled so far (``fewest`` is the count of the rarest label seen, of its positives or
    negatives for multi-label)."""

    examples: int
    head_score: Optional[float]
    zero_shot_score: Optional[float]
    prior_score: Optional[float]
    fewest: int = 0

    @property
    def enough_examples(self) -> bool:
        return self.examples >= MIN_EXAMPLES_TO_SERVE and self.fewest >= MIN_PER_CLASS_TO_SERVE

    @property
    def head_serves(self) -> bool:
        """The head beats zero-shot and the prior by ``MARGIN`` out of fold, with enough examples to tell."""
        if self.head_score is None or not self.enough_examples:
            return False
        rivals = [s for s in (self.zero_shot_score, self.prior_score) if s is not None]
        return all(self.head_score >= s + MARGIN for s in rivals)

    @property
    def serving(self) -> str:
        """What should answer: ``"head"``, ``"prior"`` or ``"zeroshot"``. The head when it beats both rivals;
        where zero-shot loses to the prior, the better of the head and the prior; else zero-shot."""
        if self.head_serves:
            return "head"
        if self.zero_shot_loses:
            assert self.prior_score is not None  # zero_shot_loses compares with it
            if self.head_score is not None and self.enough_examples and self.head_score >= self.prior_score:
                return "head"
            return "prior"
        return "zeroshot"

    @property
    def zero_shot_loses(self) -> bool:
        """Zero-shot scores below the prior (always the most frequent label) by ``MARGIN`` on the labels seen
        so far (at least ``MIN_EXAMPLES_TO_SERVE``; neither rival is fitted, so no label needs a minimum)."""
        if self.zero_shot_score is None or self.prior_score is None or self.examples < MIN_EXAMPLES_TO_SERVE:
            return False
        return self.zero_shot_score + MARGIN <= self.prior_score


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
    """Each example's (uncalibrated) probabilities from a head fitted without it; ``None`` with too few examples.
    Only the last ``ASSESS_EXAMPLES`` examples are used (the rows returned are theirs)."""
    x, answers = _recent(np.asarray(embeddings, dtype=np.float32), answers, ASSESS_EXAMPLES)
    y = _targets(answers, labels)
    with _one_blas_thread():
        logits = _oof_logits(x, y, multi_label, FOLDS, seed)
    if logits is None:
        return None
    return logits_to_proba(logits, multi_label)


def _fewest(y: np.ndarray, multi_label: bool) -> int:
    counts = y.sum(axis=0)
    if multi_label:
        learnable = counts[(counts > 0) & (counts < len(y))]
        if not len(learnable):
            return 0
        return int(min(learnable.min(), (len(y) - learnable).min()))
    seen = counts[counts > 0]
    return int(seen.min()) if len(seen) >= 2 else 0


def assess(
    embeddings: np.ndarray,
    answers: Sequence[Sequence[str]],
    labels: Sequence[str],
    multi_label: bool,
    zero_shot_proba: Optional[np.ndarray],
    threshold: float = 0.5,
) -> Assessment:
    """Score the head out of fold against zero-shot (``zero_shot_proba`` on the same examples) and the prior.

    Only the last ``ASSESS_EXAMPLES`` examples count (``zero_shot_proba`` may be given for all examples or
    for those only)."""
    x, answers = _recent(np.asarray(embeddings, dtype=np.float32), answers, ASSESS_EXAMPLES)
    y = _targets(answers, labels)
    oof = out_of_fold_proba(x, answers, labels, multi_label)
    head_score = None if oof is None else macro_f1(y, _decisions(oof, multi_label, threshold), multi_label)
    zs_score = None
    if zero_shot_proba is not None and len(y):
        zs = np.asarray(zero_shot_proba)[-len(y) :]
        zs_score = macro_f1(y, _decisions(zs, multi_label, threshold), multi_label)
    prior_score = None
    if len(y):
        prior = np.tile(y.mean(axis=0, dtype=np.float32), (len(y), 1))
        prior_score = macro_f1(y, _decisions(prior, multi_label, threshold), multi_label)
    return Assessment(len(y), head_score, zs_score, prior_score, _fewest(y, multi_label))
