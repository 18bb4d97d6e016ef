"""Batched, length-sorted inference for sequence classifiers and the zero-shot baseline.

The predictor serves with these classes and the trainer's promotion gate scores the serving model with the
same ones. Everything here is blocking torch work; the predictor runs it off the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from lsbert import cuda
from lsbert.model import ModelKind
from lsbert.model.decision import MULTI_LABEL, probabilities
from lsbert.model.runtime import Runtime, release_memory
from lsbert.model.text import clip, load_tokenizer, truncation_length
from lsbert.modelsource import resolve

log = logging.getLogger(__name__)

# Upper bound on padded tokens per forward pass; keeps memory flat for batches of long texts.
TOKEN_BUDGET = 16384
# Upper bound on the bytes of cached zero-shot label embeddings (the most recently used label set is kept).
LABEL_CACHE_BYTES = 64 * 1024 * 1024


class BatchedEncoder:
    """Tokenizes, sorts by length, pads per batch and runs ``forward`` under inference_mode."""

    def __init__(self, tokenizer: Any, model: Any, runtime: Runtime, max_length: int, batch_size: int):
        self.tokenizer = tokenizer
        self.model = model
        self.runtime = runtime
        self.max_length = max_length
        self.batch_size = batch_size  # CPU; on CUDA batches are cut by token_budget alone
        self.token_budget = cuda.TOKEN_BUDGET if cuda.is_cuda(runtime.device) else TOKEN_BUDGET
        self._lock = threading.Lock()  # one forward pass at a time per model

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = lengths[current[0]] if current else lengths[index]
            if current and (len(current) >= self.batch_size or longest * (len(current) + 1) > self.token_budget):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def run(self, texts: Sequence[str], forward: Callable[[dict], torch.Tensor]) -> np.ndarray:
        """Return ``forward``'s per-text output rows, in the order of ``texts``."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        clipped = clip(texts, self.max_length)
        if cuda.is_cuda(self.runtime.device):
            return self._run_cuda(clipped, forward)
        encoded = self.tokenizer(clipped, truncation=True, max_length=self.max_length)
        ids = encoded["input_ids"]
        lengths = [len(x) for x in ids]
        out: Optional[np.ndarray] = None
        with self._lock, torch.inference_mode():
            for batch in self._batches(lengths):
                features = [{k: encoded[k][i] for k in encoded} for i in batch]
                padded = self.tokenizer.pad(features, return_tensors="pt")
                padded = {k: v.to(self.runtime.device) for k, v in padded.items()}
                with self.runtime.autocast():
                    rows = forward(padded).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
                out[batch] = rows
        assert out is not None  # texts is not empty, so there was at least one batch
        return out

    def _run_cuda(self, texts: list[str], forward: Callable[[dict], torch.Tensor]) -> np.ndarray:
        def tokenize(chunk: Sequence[str]) -> list[list[int]]:
            encoded = self.tokenizer(
                list(chunk),
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            return encoded["input_ids"]

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self._lock, torch.inference_mode():
            return cuda.run_pipelined(
                tokenize,
                texts,
                forward,
                self.runtime.device,
                self.runtime.autocast_dtype,
                pad_id,
                left_padding=getattr(self.tokenizer, "padding_side", "right") == "left",
                token_budget=self.token_budget,
            )


def _serving(model, runtime: Runtime):
    """``model`` on the runtime's device in eval mode; on CUDA also in the serving dtype (and compiled if asked)."""
    model = model.to(runtime.device).eval()
    if cuda.is_cuda(runtime.device):
        model = cuda.prepare_for_serving(model, runtime.autocast_dtype, runtime.compile)
    return model


class SequenceClassifier:
    """A fine-tuned checkpoint: labels from its config, softmax or sigmoid from its problem type."""

    kind = ModelKind.FINETUNED

    def __init__(self, path: str | Path, runtime: Runtime, max_length: int = 0, batch_size: int = 64):
        source = str(path)
        tokenizer = load_tokenizer(source)
        model = _serving(AutoModelForSequenceClassification.from_pretrained(source), runtime)
        config = model.config
        self.labels: tuple[str, ...] = tuple(config.id2label[i] for i in range(config.num_labels))
        self.multi_label = config.problem_type == MULTI_LABEL
        self.encoder = BatchedEncoder(
            tokenizer, model, runtime, truncation_length(tokenizer, config, max_length), batch_size
        )

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return predict_proba(self.encoder, texts, self.multi_label)

    def warm_up(self) -> None:
        self.predict_proba(["warm up " * n for n in (1, 8, 32)])

    def release(self) -> None:
        del self.encoder
        release_memory()


class ZeroShotClassifier:
    """The baseline before any fine-tune: cosine similarity between mean-pooled embeddings of the text and
    of each label name. A freshly initialised classification head would be a random guess; this is not."""

    kind = ModelKind.ZEROSHOT
    # Inverse temperature on cosine similarities: the one with the lowest log-loss over offline sentiment
    # and topic sets (bench/zeroshot.py). Zero-shot is often little better than a guess on sentiment, and its
    # top probabilities stay modest accordingly (about 0.6-0.75 with two labels, 0.5-0.65 with five).
    SCALE = 15.0
    # Label prompts; a label's embedding is the normalised mean over them. Averaging several prompts was as
    # accurate as the best single prompt on average and less sensitive to any one prompt's quirks.
    TEMPLATES: tuple[str, ...] = ("{}", "This text is {}.", "This is {}.", "This text is about {}.")
    # Optional texts about nothing in particular: their mean similarity to each label is subtracted as that
    # label's bias. Empty: measured, the correction lowered accuracy on every set and prompt.
    ANCHORS: tuple[str, ...] = ()
    # Changes whenever the scores change for the same model and labels, so served versions change with them.
    REVISION = "2"

    def __init__(
        self, name: str, runtime: Runtime, max_length: int = 0, batch_size: int = 64, token: Optional[str] = None
    ):
        source = resolve(name)
        tokenizer = load_tokenizer(source, token)
        model = _serving(AutoModel.from_pretrained(source, token=token), runtime)
        self.name = name
        length = truncation_length(tokenizer, model.config, max_length)
        self.encoder = BatchedEncoder(tokenizer, model, runtime, length, batch_size)
        self._label_cache: OrderedDict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._label_cache_bytes = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length mean-pooled embeddings (texts × hidden size)."""

        def forward(batch: dict) -> torch.Tensor:
            hidden = self.encoder.model(**batch).last_hidden_state.float()
            if batch.get("attention_mask") is None:  # CUDA batches without padding carry no mask
                pooled = hidden.mean(1)
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

        return self.encoder.run(texts, forward)

    def label_prompts(self, labels: tuple[str, ...]) -> list[str]:
        """The texts whose embeddings make a label set's embeddings (``TEMPLATES`` × labels)."""
        return [template.format(label) for template in self.TEMPLATES for label in labels]

    def cached_labels(self, labels: tuple[str, ...]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """A label set's embeddings and biases if they are cached (never computes)."""
        cached = self._label_cache.get(labels)
        if cached is not None:
            self._label_cache.move_to_end(labels)
        return cached

    def remember_labels(self, labels: tuple[str, ...], prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Make a label set's embeddings from its prompts' (``embed(label_prompts(labels))``) and cache them in
        an LRU bounded by ``LABEL_CACHE_BYTES``."""
        embedded = np.asarray(prompts, dtype=np.float32).reshape(len(self.TEMPLATES), len(labels), -1).mean(axis=0)
        embedded /= np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)
        if self.ANCHORS:
            bias = (self.embed(list(self.ANCHORS)) @ embedded.T).mean(axis=0)
        else:
            bias = np.zeros(len(labels), dtype=np.float32)
        previous = self._label_cache.pop(labels, None)
        if previous is not None:
            self._label_cache_bytes -= _entry_bytes(labels, previous)
        cached = self._label_cache[labels] = (embedded, bias)
        self._label_cache_bytes += _entry_bytes(labels, cached)
        while len(self._label_cache) > 1 and self._label_cache_bytes > LABEL_CACHE_BYTES:
            old_labels, old = self._label_cache.popitem(last=False)
            self._label_cache_bytes -= _entry_bytes(old_labels, old)
        return cached

    def label_embeddings(self, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of a label set and each label's bias, from the cache or computed now (blocking)."""
        cached = self.cached_labels(labels)
        if cached is not None:
            return cached
        return self.remember_labels(labels, self.embed(self.label_prompts(labels)))

    def similarities(
        self,
        embedded: np.ndarray,
        labels: tuple[str, ...],
        label_vectors: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> np.ndarray:
        """Bias-corrected cosine similarities (texts × labels) of texts already embedded with :meth:`embed`
        (``label_vectors``: the label set's embeddings and biases, if the caller has them)."""
        label_embedded, bias = label_vectors if label_vectors is not None else self.label_embeddings(labels)
        return np.asarray(embedded, dtype=np.float32) @ label_embedded.T - bias

    def proba_from_embeddings(
        self,
        embedded: np.ndarray,
        labels: tuple[str, ...],
        multi_label: bool,
        label_vectors: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> np.ndarray:
        """Probabilities (texts × labels) of texts already embedded with :meth:`embed`."""
        return similarity_proba(self.similarities(embedded, labels, label_vectors), self.SCALE, multi_label)

    def predict_proba(self, texts: Sequence[str], labels: tuple[str, ...], multi_label: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(labels)), dtype=np.float32)
        return self.proba_from_embeddings(self.embed(texts), labels, multi_label)

    def warm_up(self) -> None:
        self.embed(["warm up " * n for n in (1, 8, 32)])


def similarity_proba(sims: np.ndarray, scale: float, multi_label: bool) -> np.ndarray:
    """Zero-shot probabilities from text-label similarities: a softmax over labels at inverse temperature
    ``scale``, or for multi-label a sigmoid per label of its similarity above the text's mean similarity."""
    logits = np.asarray(sims, dtype=np.float64) * scale
    if multi_label:
        centred = logits - logits.mean(axis=1, keepdims=True)
        return (1.0 / (1.0 + np.exp(-centred))).astype(np.float32)
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _entry_bytes(labels: tuple[str, ...], entry: tuple[np.ndarray, np.ndarray]) -> int:
    return entry[0].nbytes + entry[1].nbytes + sum(len(label) for label in labels)


def predict_proba(encoder: BatchedEncoder, texts: Sequence[str], multi_label: bool) -> np.ndarray:
    """Probabilities (texts × labels) of a sequence classifier (``encoder.model``), batched and length-sorted."""

    def forward(batch: dict) -> torch.Tensor:
        logits = encoder.model(**batch).logits
        return probabilities(logits, multi_label)

    return encoder.run(list(texts), forward)
