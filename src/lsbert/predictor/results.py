"""Shaping classifier output into Label Studio predictions. Pure functions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lsbert.labelconfig import ClassificationSpec
from lsbert.model.decision import choose


@dataclass(frozen=True)
class Prediction:
    """One text's answer over the labels of the current config."""

    chosen: tuple[str, ...]
    probabilities: dict[str, float]
    score: float


def project_probabilities(
    probs: np.ndarray, model_labels: Sequence[str], spec: ClassificationSpec
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Keep only the model's labels that the current config still has (config drift must never surface a
    label Label Studio cannot render). Single-label probabilities are renormalised over what is kept."""
    keep = [i for i, label in enumerate(model_labels) if label in spec.labels]
    kept = probs[:, keep] if keep else np.zeros((probs.shape[0], 0), dtype=np.float32)
    labels = tuple(model_labels[i] for i in keep)
    if not spec.multi_label and kept.shape[1]:
        total = kept.sum(axis=1, keepdims=True)
        kept = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)
    return kept, labels


def decide(row: np.ndarray, labels: Sequence[str], multi_label: bool, threshold: float) -> Prediction:
    probabilities = {label: round(float(p), 6) for label, p in zip(labels, row)}
    if not len(labels):
        return Prediction((), probabilities, 0.0)
    chosen = choose(row, labels, multi_label, threshold)
    if multi_label:
        # Confidence in the whole set: each label's decision is right with max(p, 1 - p).
        score = float(np.mean(np.maximum(row, 1.0 - row)))
        return Prediction(chosen, probabilities, score)
    return Prediction(chosen, probabilities, float(np.max(row)))  # the chosen (most probable) label


def to_label_studio(prediction: Optional[Prediction], spec: ClassificationSpec, model_version: str) -> dict[str, Any]:
    """One item of ``{"results": [...]}``. ``None`` (a task that could not be predicted) gives an empty
    result, so one bad task never fails its batch."""
    if prediction is None or not prediction.chosen:
        return {"result": [], "score": 0.0 if prediction is None else prediction.score, "model_version": model_version}
    region = {
        "id": uuid.uuid4().hex[:10],
        "from_name": spec.from_name,
        "to_name": spec.to_name,
        "type": "choices",
        "value": {"choices": list(prediction.chosen)},
        "score": prediction.score,
    }
    return {"result": [region], "score": prediction.score, "model_version": model_version}


def task_text(task: Any, data_key: str) -> tuple[Optional[str], Optional[str]]:
    """The text to classify, or (None, reason). URLs are resolved elsewhere."""
    if not isinstance(task, Mapping):
        return None, "task is not an object"
    data = task.get("data")
    if not isinstance(data, Mapping):
        return None, "task has no data object"
    if data_key not in data:
        return None, f"task data has no field {data_key!r}"
    value = data[data_key]
    if not isinstance(value, str):
        return None, f"task data field {data_key!r} is not a string"
    if not value.strip():
        return None, f"task data field {data_key!r} is empty"
    return value, None
