"""Real checkpoints for serving tests without a training run: the pretrained MiniLM encoder with a
classification head initialised from a seed, saved exactly as the trainer saves them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lsbert.modelsource import resolve
from lsbert.store import CheckpointStore

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def save_checkpoint(
    store: CheckpointStore,
    project: int,
    version: str,
    labels: Sequence[str],
    *,
    seed: int = 0,
    multi_label: bool = False,
    metrics: dict | None = None,
) -> None:
    path = resolve(MINILM)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    with torch.no_grad():  # a head that makes clear, seed-dependent decisions
        model.classifier.weight.normal_(0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.save(
            project,
            version,
            Path(tmp),
            {
                "format": 1,
                "project": project,
                "version": version,
                "labels": list(labels),
                "multi_label": multi_label,
                "base_model": MINILM,
                "metrics": metrics or {"macro_f1": 0.5},
            },
        )
