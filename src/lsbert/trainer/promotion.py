"""The promotion gate: does a new checkpoint replace the model that serves the project now?

The score is macro-F1 on the validation split. The serving model is the project's promoted checkpoint, or,
before any fine-tune, the project's embedding head where it serves (its state in the checkpoint store says
so), else the zero-shot baseline; it is scored on the *same* validation examples, restricted to the labels
the config has now. The new checkpoint is promoted iff

    new_score >= serving_score - PROMOTION_MARGIN

and with no validation data at all it is promoted (nothing to compare on; the annotators asked for it).
:func:`decide` is the pure rule; :func:`evaluate_serving` is the glue that loads and scores the serving
model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from lsbert.labelconfig import ClassificationSpec
from lsbert.model import ModelKind
from lsbert.model.decision import choose
from lsbert.model.engine import SequenceClassifier, ZeroShotClassifier
from lsbert.model.head import Head, fit, prior
from lsbert.model.headstate import HeadState
from lsbert.model.runtime import Runtime, release_memory
from lsbert.store import CheckpointStore, StoreError
from lsbert.trainer.dataset import Example
from lsbert.trainer.metrics import classification_metrics

log = logging.getLogger(__name__)

SCORE = "macro_f1"
NO_VALIDATION = "no validation data"


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    score: Optional[float]
    serving_score: Optional[float]
    margin: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    score: Optional[float], serving_score: Optional[float], margin: float, validation_size: int
) -> PromotionDecision:
    """The gate: promote iff ``score >= serving_score - margin``; always with no validation data."""
    if validation_size <= 0 or score is None:
        return PromotionDecision(True, NO_VALIDATION, score, serving_score, margin)
    if serving_score is None:
        return PromotionDecision(True, "no serving model to compare with", score, None, margin)
    # A hair of tolerance: equal scores computed along different paths must count as equal.
    if score + 1e-9 >= serving_score - margin:
        relation = "above" if score > serving_score else "at least" if score >= serving_score else "within margin of"
        return PromotionDecision(
            True,
            f"{SCORE} {score:.4f} {relation} serving {serving_score:.4f} (margin {margin:g})",
            score,
            serving_score,
            margin,
        )
    return PromotionDecision(
        False,
        f"{SCORE} {score:.4f} below serving {serving_score:.4f} - margin {margin:g}",
        score,
        serving_score,
        margin,
    )


def restrict_proba(proba: np.ndarray, model_labels: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Columns of ``proba`` (over ``model_labels``) re-ordered to ``labels``; a current label the model
    does not know gets probability 0, a model label the config dropped is left out."""
    proba = np.asarray(proba, dtype=np.float32)
    out = np.zeros((proba.shape[0], len(labels)), dtype=np.float32)
    index = {label: i for i, label in enumerate(model_labels)}
    for j, label in enumerate(labels):
        if label in index and proba.size:
            out[:, j] = proba[:, index[label]]
    return out


def predictions_for(
    proba: np.ndarray, labels: Sequence[str], multi_label: bool, model_multi_label: bool, threshold: float
) -> list[tuple[str, ...]]:
    """Label tuples from restricted probabilities, whichever kind of head produced them.

    A sigmoid head thresholds (at the serving ``MULTI_LABEL_THRESHOLD``); a softmax head (or a single-label
    config) takes the argmax of the labels still in the config. A row with no known label at all predicts
    nothing (a miss)."""
    out: list[tuple[str, ...]] = []
    for row in proba:
        if multi_label and model_multi_label:
            out.append(choose(row, labels, True, threshold))
        elif row.size and row.max() > 0:
            out.append(choose(row, labels, False, threshold))
        else:
            out.append(())
    return out


@dataclass
class ServingEvaluation:
    kind: ModelKind
    version: Optional[str]
    metrics: dict[str, Any]
    note: Optional[str] = None

    def describe(self) -> str:
        return f"{self.kind.value} {self.version}" if self.version else self.kind.value


def _score_finetuned(
    path: Any,
    runtime: Runtime,
    spec: ClassificationSpec,
    validation: Sequence[Example],
    max_length: int,
    threshold: float,
) -> list[tuple[str, ...]]:
    classifier = SequenceClassifier(path, runtime, max_length=max_length)
    try:
        proba = classifier.predict_proba([e.text for e in validation])
        proba = restrict_proba(proba, classifier.labels, spec.labels)
        return predictions_for(proba, spec.labels, spec.multi_label, classifier.multi_label, threshold)
    finally:
        classifier.release()


def _score_baseline(
    name: str,
    runtime: Runtime,
    spec: ClassificationSpec,
    validation: Sequence[Example],
    max_length: int,
    token: Optional[str],
    threshold: float,
    head: Optional[Head] = None,
) -> list[tuple[str, ...]]:
    """What the baseline serves on ``validation``: the embedding ``head`` on its embeddings, else zero-shot."""
    classifier = ZeroShotClassifier(name, runtime, max_length=max_length, token=token)
    try:
        texts = [e.text for e in validation]
        if head is None:
            proba = classifier.predict_proba(texts, spec.labels, spec.multi_label)
            return predictions_for(proba, spec.labels, spec.multi_label, spec.multi_label, threshold)
        proba = restrict_proba(head.predict_proba(classifier.embed(texts)), head.labels, spec.labels)
        return predictions_for(proba, spec.labels, spec.multi_label, head.multi_label, threshold)
    finally:
        del classifier
        release_memory()


def serving_head(store: CheckpointStore, project: int, baseline_model: str) -> Optional[HeadState]:
    """The project's embedding head state if its head serves (fitted on ``baseline_model``'s embeddings)."""
    try:
        found = store.read_head(project)
        state = HeadState.from_bytes(found[0]) if found else None
    except (StoreError, OSError, ValueError) as exc:
        log.warning("cannot read the embedding head of project %s: %s", project, exc)
        return None
    if state is None or not state.serves or state.head is None or state.baseline != baseline_model:
        return None
    return state


def head_without(state: HeadState, validation: Sequence[Example]) -> Head:
    """The serving head refitted, the same way, on its examples less the validation tasks: the head has
    usually seen them (it learns from every annotation), and scoring it on its own training examples would
    hold fine-tunes to an inflated score. The stored head where too few examples remain to refit."""
    assert state.head is not None
    held_out = {e.task_id for e in validation if e.task_id is not None}
    order, embeddings, answers = state.arrays()
    keep = [i for i, task_id in enumerate(order) if task_id not in held_out]
    if len(keep) == len(order) or len(keep) < 2:
        return state.head
    kept_answers = [answers[i] for i in keep]
    refit = fit if state.head.coef.any() else prior  # a serving label prior has no weights
    return refit(embeddings[keep], kept_answers, state.head.labels, state.head.multi_label)


def evaluate_serving(
    store: CheckpointStore,
    project: int,
    serving_version: Optional[str],
    spec: ClassificationSpec,
    validation: Sequence[Example],
    runtime: Runtime,
    baseline_model: str,
    max_length: int = 0,
    token: Optional[str] = None,
    *,
    threshold: float,
) -> ServingEvaluation:
    """Score the model serving ``project`` now on ``validation`` (multi-label decisions at ``threshold``,
    the serving ``MULTI_LABEL_THRESHOLD``).

    A promoted checkpoint that cannot be loaded is not serving either (the predictor falls back to the
    embedding head or the zero-shot baseline then), so that is scored instead and the reason recorded.
    A head serves only the label set and choice mode it was fitted for, as in the predictor."""
    truth = [e.labels for e in validation]
    note = None
    if serving_version is not None:
        try:
            path = store.local_path(project, serving_version)
            predicted = _score_finetuned(path, runtime, spec, validation, max_length, threshold)
            return ServingEvaluation(
                ModelKind.FINETUNED,
                serving_version,
                classification_metrics(truth, predicted, spec.labels, spec.multi_label),
            )
        except (StoreError, OSError, ValueError, KeyError) as exc:
            note = f"promoted version {serving_version} could not be evaluated ({type(exc).__name__}: {exc})"
            log.warning("%s; comparing with the embedding head or the zero-shot baseline instead", note)
    state = serving_head(store, project, baseline_model)
    if (
        state is not None
        and state.head is not None
        and state.head.multi_label == spec.multi_label
        and state.head.labels == spec.labels
    ):
        rival = head_without(state, validation)
        predicted = _score_baseline(baseline_model, runtime, spec, validation, max_length, token, threshold, rival)
        metrics = classification_metrics(truth, predicted, spec.labels, spec.multi_label)
        return ServingEvaluation(ModelKind.HEAD, state.version, metrics, note)
    predicted = _score_baseline(baseline_model, runtime, spec, validation, max_length, token, threshold)
    metrics = classification_metrics(truth, predicted, spec.labels, spec.multi_label)
    return ServingEvaluation(ModelKind.ZEROSHOT, None, metrics, note)
