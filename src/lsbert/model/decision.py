"""From a classification head's output to label names, the same rule for serving and the promotion gate.

A multi-label head (``problem_type == "multi_label_classification"``) gives independent sigmoid
probabilities and every label at or above the threshold (``MULTI_LABEL_THRESHOLD``) is chosen; a single-label
head gives softmax probabilities and the most probable label is chosen.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MULTI_LABEL = "multi_label_classification"


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Sigmoid per label for a multi-label head, softmax over the labels otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def choose(row: np.ndarray, labels: Sequence[str], multi_label: bool, threshold: float) -> tuple[str, ...]:
    """The labels one probability row picks: every label ≥ ``threshold``, or the argmax (none if no labels)."""
    if multi_label:
        return tuple(labels[j] for j in np.flatnonzero(np.asarray(row) >= threshold))
    return (labels[int(np.argmax(row))],) if len(labels) else ()


def predicted_labels(
    proba: np.ndarray, labels: Sequence[str], multi_label: bool, threshold: float
) -> list[tuple[str, ...]]:
    """``choose`` for every row of an (examples × labels) probability matrix."""
    proba = np.asarray(proba, dtype=np.float32)
    if proba.ndim != 2 or (len(proba) and proba.shape[1] != len(labels)):
        raise ValueError(f"expected an (n, {len(labels)}) probability matrix, got shape {proba.shape}")
    return [choose(row, labels, multi_label, threshold) for row in proba]
