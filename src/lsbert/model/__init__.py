"""Model code shared by serving (``lsbert.predictor``) and training (``lsbert.trainer``).

One place for what both sides must agree on: how texts are clipped and tokenized (``text``), where and in
which precision forward passes run (``runtime``), how a head's logits become probabilities and
probabilities become labels (``decision``), and the batched classifiers themselves (``engine``).
"""

from __future__ import annotations

from enum import Enum


class ModelKind(str, Enum):
    """What answers for a project: one of its fine-tuned checkpoints, the embedding head fitted on its first
    labels (``lsbert.model.head``), or the zero-shot baseline."""

    FINETUNED = "finetuned"
    HEAD = "head"
    ZEROSHOT = "zeroshot"

    def __str__(self) -> str:
        return self.value
