"""A project's embedding head as it is kept in the checkpoint store: the head, the labelled examples it was
fitted on, and its assessment, in one ``.npz`` (no pickles: a state read from a shared store cannot run code).

Examples are one per Label Studio task: the baseline's embedding of the task's text, the labels its
annotation chose, the annotation's id and when it last changed. Deleted tasks leave a tombstone (task id
and time), so that replicas merging their states do not bring a deleted example back.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from lsbert.model.head import Head

FORMAT = 1
# Tombstones kept per project (the newest); an older deletion can only be undone by a replica that missed
# this many later deletions.
MAX_TOMBSTONES = 1000


def head_version(head: Head) -> str:
    """``head-<examples>-<hash>`` (``prior-…`` for the label prior, a head without weights): changes whenever
    the weights or the labels do."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(head.labels), head.multi_label]).encode())
    digest.update(np.ascontiguousarray(head.coef, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(head.intercept, dtype=np.float32).tobytes())
    kind = "head" if head.coef.any() else "prior"
    return f"{kind}-{head.examples}-{digest.hexdigest()[:8]}"


def assessment_steps(minimum: int) -> list[int]:
    """Example counts at which a head is (re)fitted and assessed: ``minimum`` × 1, 1.5, 2, 3, 4, 6, 8, …
    (each step 33-50 % above the last), up to ten million."""
    steps, base = [], max(2, int(minimum))
    while base <= 10_000_000:
        steps.extend([base, math.ceil(base * 1.5)])
        base *= 2
    return sorted(set(steps))


def step_of(count: int, steps: Sequence[int]) -> int:
    """How many steps ``count`` examples have reached (0: not yet the first)."""
    return sum(1 for step in steps if count >= step)


@dataclass
class Labelled:
    """One task's labelled example."""

    embedding: np.ndarray  # (dim,) float32, unit length
    labels: tuple[str, ...]
    annotation_id: Optional[int]
    changed_at: float  # seconds since the epoch


@dataclass
class HeadState:
    """Everything a replica needs to serve a project's head and to keep fitting it."""

    baseline: str  # embeddings are only meaningful for the model that computed them
    labels: tuple[str, ...]
    multi_label: bool
    examples: dict[int, Labelled] = field(default_factory=dict)  # task id -> example
    tombstones: dict[int, float] = field(default_factory=dict)  # task id -> when its example was deleted
    head: Optional[Head] = None
    version: Optional[str] = None
    serves: bool = False
    assessment: dict[str, Any] = field(default_factory=dict)  # examples, head/zero-shot/prior macro-F1
    fitted_at: float = 0.0

    # --- examples -----------------------------------------------------------------------------------
    def put(self, task_id: int, example: Labelled) -> bool:
        """Keep ``example`` for the task unless what is kept (or its deletion) is newer."""
        current = self.examples.get(task_id)
        if current is not None and current.changed_at > example.changed_at:
            return False
        if self.tombstones.get(task_id, -math.inf) > example.changed_at:
            return False
        self.examples[task_id] = example
        self.tombstones.pop(task_id, None)
        return True

    def delete(self, task_id: int, when: float) -> bool:
        current = self.examples.get(task_id)
        if current is None or current.changed_at > when:
            return False
        del self.examples[task_id]
        self.tombstones[task_id] = when
        self._trim_tombstones()
        return True

    def _trim_tombstones(self) -> None:
        if len(self.tombstones) > MAX_TOMBSTONES:
            newest = sorted(self.tombstones.items(), key=lambda kv: kv[1])[-MAX_TOMBSTONES:]
            self.tombstones = dict(newest)

    def trim(self, keep: int) -> list[int]:
        """Drop the oldest examples beyond ``keep``; returns the dropped task ids."""
        if len(self.examples) <= keep:
            return []
        ordered = sorted(self.examples, key=lambda t: (self.examples[t].changed_at, t))
        dropped = ordered[: len(ordered) - keep]
        for task_id in dropped:
            del self.examples[task_id]
        return dropped

    def oldest(self) -> Optional[tuple[float, int]]:
        if not self.examples:
            return None
        return min((e.changed_at, t) for t, e in self.examples.items())

    def restrict(self, labels: tuple[str, ...], multi_label: bool) -> None:
        """Follow a new label set: keep each example's labels that remain (single-label: its one label),
        drop examples left without any, and forget the head (it no longer matches)."""
        if self.labels == labels and self.multi_label == multi_label:
            return
        known = set(labels)
        for task_id in list(self.examples):
            example = self.examples[task_id]
            kept = tuple(label for label in example.labels if label in known)
            if not kept or (not multi_label and len(kept) > 1):
                del self.examples[task_id]
            else:
                example.labels = kept
        self.labels, self.multi_label = labels, multi_label
        self.head, self.version, self.serves, self.assessment = None, None, False, {}

    def merge(self, other: HeadState) -> None:
        """Fold in a state another replica wrote: per task the newer of example and deletion wins; its head
        is adopted if it was fitted later. States of another baseline or label set are not merged."""
        if other.baseline != self.baseline or other.labels != self.labels or other.multi_label != self.multi_label:
            return
        for task_id, when in other.tombstones.items():
            if task_id in self.examples:
                self.delete(task_id, when)
            elif when > self.tombstones.get(task_id, -math.inf):
                self.tombstones[task_id] = when
        self._trim_tombstones()
        for task_id, example in other.examples.items():
            self.put(task_id, example)
        if other.fitted_at > self.fitted_at and other.head is not None:
            self.head, self.version, self.serves = other.head, other.version, other.serves
            self.assessment, self.fitted_at = dict(other.assessment), other.fitted_at

    def arrays(self) -> tuple[list[int], np.ndarray, list[tuple[str, ...]]]:
        """Task ids, embeddings (examples × dim) and answers, oldest first."""
        order = sorted(self.examples, key=lambda t: (self.examples[t].changed_at, t))
        if not order:
            return [], np.zeros((0, 0), dtype=np.float32), []
        embeddings = np.stack([self.examples[t].embedding for t in order]).astype(np.float32, copy=False)
        return order, embeddings, [self.examples[t].labels for t in order]

    # --- bytes ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        order, embeddings, answers = self.arrays()
        index = {label: j for j, label in enumerate(self.labels)}
        chosen = np.zeros((len(order), len(self.labels)), dtype=np.int8)
        for i, labels in enumerate(answers):
            for label in labels:
                chosen[i, index[label]] = 1
        annotation_ids = [self.examples[t].annotation_id for t in order]
        meta = {
            "format": FORMAT,
            "baseline": self.baseline,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "version": self.version,
            "serves": self.serves,
            "assessment": self.assessment,
            "fitted_at": self.fitted_at,
        }
        tombstones = sorted(self.tombstones.items())
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "task_ids": np.asarray(order, dtype=np.int64),
            "annotation_ids": np.asarray([-1 if a is None else a for a in annotation_ids], dtype=np.int64),
            "changed_at": np.asarray([self.examples[t].changed_at for t in order], dtype=np.float64),
            "embeddings": embeddings if len(order) else np.zeros((0, 0), dtype=np.float32),
            "answers": chosen,
            "tombstone_ids": np.asarray([t for t, _ in tombstones], dtype=np.int64),
            "tombstone_at": np.asarray([w for _, w in tombstones], dtype=np.float64),
        }
        if self.head is not None:
            arrays["head"] = np.frombuffer(self.head.to_bytes(), np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first keyword only
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> HeadState:
        """Raises ValueError on anything that is not a head state of this format."""
        try:
            return cls._decode(raw)
        except ValueError:
            raise
        except (KeyError, IndexError, TypeError, OSError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a head state: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _decode(cls, raw: bytes) -> HeadState:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("unknown head state format")
            task_ids = data["task_ids"].astype(np.int64)
            annotation_ids = data["annotation_ids"].astype(np.int64)
            changed = data["changed_at"].astype(np.float64)
            embeddings = data["embeddings"].astype(np.float32)
            answers = data["answers"]
            tombstone_ids = data["tombstone_ids"].astype(np.int64)
            tombstone_at = data["tombstone_at"].astype(np.float64)
            head_raw = bytes(data["head"]) if "head" in data.files else None
        labels = tuple(str(x) for x in meta["labels"])
        n = len(task_ids)
        if not (len(annotation_ids) == len(changed) == n and answers.shape == (n, len(labels))):
            raise ValueError("head state arrays do not match")
        if n and embeddings.shape[0] != n:
            raise ValueError("head state embeddings do not match its examples")
        state = cls(str(meta["baseline"]), labels, bool(meta["multi_label"]))
        for i in range(n):
            chosen = tuple(labels[j] for j in np.flatnonzero(answers[i]))
            annotation = int(annotation_ids[i])
            state.examples[int(task_ids[i])] = Labelled(
                embeddings[i], chosen, None if annotation < 0 else annotation, float(changed[i])
            )
        state.tombstones = {int(t): float(w) for t, w in zip(tombstone_ids, tombstone_at)}
        if head_raw is not None:
            state.head = Head.from_bytes(head_raw)
        version = meta.get("version")
        state.version = version if isinstance(version, str) and state.head is not None else None
        state.serves = bool(meta.get("serves")) and state.head is not None
        assessment = meta.get("assessment")
        state.assessment = assessment if isinstance(assessment, dict) else {}
        state.fitted_at = float(meta.get("fitted_at") or 0.0)
        return state
