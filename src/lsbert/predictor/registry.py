"""Which model serves each project, loaded once per process and swapped atomically on a new version.

In order: the project's promoted fine-tuned checkpoint; else its embedding head when that beats zero-shot
(``lsbert.predictor.heads``); else the zero-shot baseline. Loaded checkpoints are kept in a small LRU; an
evicted one is reloaded on its next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional, Sequence

import numpy as np

from lsbert import metrics
from lsbert.labelconfig import ClassificationSpec
from lsbert.model import ModelKind
from lsbert.model.engine import SequenceClassifier, ZeroShotClassifier
from lsbert.model.runtime import Runtime, release_memory
from lsbert.modelsource import short_name
from lsbert.predictor.inference import InferenceQueue
from lsbert.store import CheckpointStore, StoreError

if TYPE_CHECKING:
    from lsbert.predictor.heads import HeadKeeper

log = logging.getLogger(__name__)

# A version that failed to load is retried after 5 s, then twice as long after each failure, at most 10 min
# (a new promoted version is tried at once).
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 600.0
# How long a request waits for the checkpoint store to say which version is promoted.
POINTER_READ_TIMEOUT_S = 5.0


@dataclass
class LoadFailure:
    attempts: int
    retry_at: float  # time.monotonic()
    error: str


@dataclass(frozen=True)
class Served:
    """A model answering for one project: a fine-tuned checkpoint, an embedding head or the zero-shot
    baseline."""

    version: str
    kind: ModelKind
    labels: tuple[str, ...]
    multi_label: bool
    classifier: Any  # SequenceClassifier (FINETUNED), Head (HEAD) or ZeroShotClassifier (ZEROSHOT)
    encoder: Any = None  # HEAD: the ZeroShotClassifier whose embeddings the head reads

    def key(self, spec: ClassificationSpec) -> Hashable:
        """Requests with equal keys may share a forward pass (zero-shot over any labels and the heads of
        every project share the baseline's embedding pass)."""
        if self.kind is ModelKind.ZEROSHOT:
            return ("embed", id(self.classifier))
        if self.kind is ModelKind.HEAD:
            return ("embed", id(self.encoder))
        return id(self.classifier)

    def runner(self, spec: ClassificationSpec) -> Callable[[Sequence[str]], np.ndarray]:
        if self.kind is ModelKind.ZEROSHOT:
            return self.classifier.embed
        if self.kind is ModelKind.HEAD:
            return self.encoder.embed
        return self.classifier.predict_proba

    def finish(
        self,
        raw: np.ndarray,
        spec: ClassificationSpec,
        label_vectors: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> np.ndarray:
        """Probabilities from what the pass returned (a head's or zero-shot's from the embeddings; cheap
        arithmetic, fine on the event loop once zero-shot's ``label_vectors`` are at hand)."""
        if self.kind is ModelKind.HEAD:
            return self.classifier.predict_proba(raw)
        if self.kind is ModelKind.ZEROSHOT:
            return self.classifier.proba_from_embeddings(raw, spec.labels, spec.multi_label, label_vectors)
        return raw


class ModelRegistry:
    def __init__(
        self,
        store: CheckpointStore,
        runtime: Runtime,
        baseline_name: str,
        *,
        max_loaded: int = 4,
        max_length: int = 0,
        batch_size: int = 64,
        hf_token: Optional[str] = None,
    ):
        self.store = store
        self.runtime = runtime
        self.baseline_name = baseline_name
        self.max_loaded = max_loaded
        self.max_length = max_length
        self.batch_size = batch_size
        self.hf_token = hf_token
        self.zero_shot: Optional[ZeroShotClassifier] = None
        self._loaded: OrderedDict[int, Served] = OrderedDict()
        self._pointers: dict[int, Optional[str]] = {}
        self._specs: dict[int, ClassificationSpec] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbert-load")
        self._loading: dict[tuple[int, str], asyncio.Future] = {}
        # version and kind last exported as a metric per project, while it is not a loaded checkpoint
        self._reported: dict[int, tuple[str, ModelKind]] = {}
        self.heads: Optional[HeadKeeper] = None  # set when embedding heads are enabled
        self._failures: dict[tuple[int, str], LoadFailure] = {}
        self._pointer_reads: dict[int, asyncio.Future] = {}
        self._label_jobs: dict[tuple[int, tuple[str, ...]], asyncio.Future] = {}

    # --- start-up ---------------------------------------------------------------------------------
    def load_baseline(self) -> None:
        """Blocking: load and warm up the baseline encoder (readiness waits for this)."""
        self.zero_shot = ZeroShotClassifier(
            self.baseline_name, self.runtime, self.max_length, self.batch_size, self.hf_token
        )
        self.zero_shot.warm_up()
        log.info("baseline %s loaded on %s (%s)", self.baseline_name, self.runtime.device, self.runtime.precision)

    # --- project configs ----------------------------------------------------------------------------
    def remember(self, project: int, spec: ClassificationSpec) -> None:
        self._specs[project] = spec

    def spec(self, project: int) -> Optional[ClassificationSpec]:
        return self._specs.get(project)

    def known_projects(self) -> list[int]:
        return sorted(set(self._specs) | set(self._loaded) | {p for p, v in self._pointers.items() if v})

    # --- versions -----------------------------------------------------------------------------------
    def zero_shot_version(self, spec: ClassificationSpec) -> str:
        # the scoring's revision is part of the version: Label Studio re-predicts when zero-shot changes
        return f"zeroshot-{short_name(self.baseline_name)}-r{ZeroShotClassifier.REVISION}-{spec.fingerprint}"

    def set_pointer(self, project: int, version: Optional[str]) -> None:
        self._pointers[project] = version

    def pointer(self, project: int) -> Optional[str]:
        """The promoted version as last read from the store; never reads the store (``read_pointer`` does)."""
        return self._pointers.get(project)

    async def read_pointer(self, project: int, timeout: float = POINTER_READ_TIMEOUT_S) -> Optional[str]:
        """The promoted version, read from the store once per project off the event loop (then kept up to
        date by the rollout watcher). A store that does not answer within ``timeout`` leaves it unknown."""
        if project in self._pointers:
            return self._pointers[project]
        # One read per project at a time, however many requests ask: a store that hangs holds one thread.
        read = self._pointer_reads.get(project)
        if read is None:
            read = asyncio.ensure_future(asyncio.to_thread(self.store.promoted, project))
            self._pointer_reads[project] = read
            read.add_done_callback(lambda _f: self._pointer_reads.pop(project, None))
        try:
            version = await asyncio.wait_for(asyncio.shield(read), timeout)
        except asyncio.TimeoutError:
            log.warning("project %s: the checkpoint store did not say the promoted version in %.0fs", project, timeout)
            return None
        except (StoreError, OSError) as exc:
            log.warning("cannot read the promoted version of project %s: %s", project, exc)
            return None
        self._pointers.setdefault(project, version)
        return self._pointers[project]

    def loaded(self, project: int) -> Optional[Served]:
        with self._lock:
            return self._loaded.get(project)

    def version_for(self, project: int, spec: ClassificationSpec) -> str:
        """The version /setup reports: what /predict will serve for this project right now (never a
        promoted version that failed to load)."""
        served = self.loaded(project)
        if served is not None and _compatible(served, spec):
            return served.version
        pointer = self.pointer(project) if served is None else None
        if pointer and (project, pointer) in self._failures:
            pointer = None
        return pointer or self._light_version(project, spec)

    def _light_version(self, project: int, spec: ClassificationSpec) -> str:
        """The version serving a project that has no usable checkpoint: its head's, else zero-shot's."""
        head = self.heads.serving(project, spec) if self.heads is not None else None
        return head[1] if head is not None else self.zero_shot_version(spec)

    def serving_kind(self, project: int, spec: Optional[ClassificationSpec]) -> tuple[ModelKind, Optional[str]]:
        """Which kind of model serves the project now and its version, from memory only."""
        loaded = self.loaded(project)
        if loaded is not None and (spec is None or _compatible(loaded, spec)):
            return loaded.kind, loaded.version
        if spec is None:
            return ModelKind.ZEROSHOT, None
        head = self.heads.serving(project, spec) if self.heads is not None else None
        if head is not None:
            return ModelKind.HEAD, head[1]
        return ModelKind.ZEROSHOT, self.zero_shot_version(spec)

    # --- failed loads -------------------------------------------------------------------------------
    def load_due(self, project: int, version: str) -> bool:
        """False while a version that failed to load waits for its next retry."""
        failure = self._failures.get((project, version))
        return failure is None or time.monotonic() >= failure.retry_at

    def load_failures(self) -> dict[str, dict[str, Any]]:
        """The promoted versions that cannot be loaded, per project, with the error and the next retry."""
        now = time.monotonic()
        return {
            str(project): {
                "version": version,
                "error": failure.error,
                "attempts": failure.attempts,
                "retry_in_s": round(max(0.0, failure.retry_at - now), 1),
            }
            for (project, version), failure in sorted(self._failures.items())
            if self._pointers.get(project) == version
        }

    def _record_failure(self, project: int, version: str, exc: BaseException) -> LoadFailure:
        previous = self._failures.get((project, version))
        attempts = previous.attempts + 1 if previous else 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
        failure = LoadFailure(attempts, time.monotonic() + delay, f"{type(exc).__name__}: {exc}"[:300])
        # only the current attempt per project is kept
        for key in [k for k in self._failures if k[0] == project and k[1] != version]:
            del self._failures[key]
        self._failures[(project, version)] = failure
        return failure

    def serving_summary(self, limit: Optional[int] = None) -> dict[str, str]:
        """What serves each known project, from memory only (the store is never read here): the loaded
        model, else the zero-shot version for its config (with the promoted version waiting to load, if
        one was read). At most ``limit`` projects, the highest ids."""
        projects = self.known_projects()
        if limit is not None:
            projects = projects[-limit:]
        summary = {}
        for project in projects:
            spec = self._specs.get(project)
            loaded = self.loaded(project)
            pending = self._pointers.get(project)
            if loaded is not None and (spec is None or _compatible(loaded, spec)):
                summary[str(project)] = loaded.version
            elif spec is not None:
                summary[str(project)] = self._light_version(project, spec)
            else:
                summary[str(project)] = pending or "-"
        return summary

    # --- serving ------------------------------------------------------------------------------------
    def _report(self, project: int, version: str, kind: ModelKind) -> None:
        """Export what serves a project that has no loaded checkpoint (a head or zero-shot) as a metric."""
        previous = self._reported.get(project)
        if previous == (version, kind):
            return
        if previous:
            metrics.SERVING_MODEL.labels(str(project), previous[0], previous[1].value).set(0)
        metrics.SERVING_MODEL.labels(str(project), version, kind.value).set(1)
        self._reported[project] = (version, kind)

    def zero_shot_served(self, spec: ClassificationSpec, project: Optional[int] = None) -> Served:
        version = self.zero_shot_version(spec)
        if project is not None:
            self._report(project, version, ModelKind.ZEROSHOT)
        return Served(version, ModelKind.ZEROSHOT, spec.labels, spec.multi_label, self.zero_shot)

    async def light_served(self, project: int, spec: ClassificationSpec) -> Served:
        """The project's embedding head if it serves, else the zero-shot baseline."""
        if self.heads is not None:
            await self.heads.prepare(project)
            head = self.heads.serving(project, spec)
            if head is not None:
                self._report(project, head[1], ModelKind.HEAD)
                return Served(head[1], ModelKind.HEAD, head[0].labels, head[0].multi_label, head[0], self.zero_shot)
        return self.zero_shot_served(spec, project)

    async def acquire(self, project: int, spec: ClassificationSpec) -> Served:
        served = self.loaded(project)
        if served is None:
            version = await self.read_pointer(project)
            if version and self.load_due(project, version):
                try:
                    served = await self.ensure_loaded(project, version)
                except Exception:  # a broken checkpoint must not take the project down (ensure_loaded logs it)
                    served = None
        if served is not None and _compatible(served, spec):
            with self._lock:
                if project in self._loaded:
                    self._loaded.move_to_end(project)
            return served
        return await self.light_served(project, spec)

    def _load_blocking(self, project: int, version: str) -> Served:
        path = self.store.local_path(project, version)
        classifier = SequenceClassifier(path, self.runtime, self.max_length, self.batch_size)
        classifier.warm_up()
        return Served(version, ModelKind.FINETUNED, classifier.labels, classifier.multi_label, classifier)

    async def ensure_loaded(self, project: int, version: str) -> Served:
        """Load ``version`` in the background (once, however many callers ask) and swap it in."""
        current = self.loaded(project)
        if current is not None and current.version == version:
            return current
        key = (project, version)
        future = self._loading.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._loader, self._load_blocking, project, version)
            self._loading[key] = future
            future.add_done_callback(lambda _f: self._loading.pop(key, None))
            future.add_done_callback(lambda f: self._loaded_or_failed(project, version, f))
        served = await asyncio.shield(future)
        self._swap(project, served)
        return served

    def _loaded_or_failed(self, project: int, version: str, future: asyncio.Future) -> None:
        """Once per load attempt, however many requests waited for it."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._failures.pop((project, version), None)
            return
        failure = self._record_failure(project, version, exc)
        log.error(
            "project %s: cannot load %s (%s); serving the zero-shot baseline, retrying in %.0fs",
            project,
            version,
            failure.error,
            failure.retry_at - time.monotonic(),
        )

    def _swap(self, project: int, served: Served) -> None:
        evicted: list[Served] = []
        with self._lock:
            old = self._loaded.get(project)
            if old is not None and old.version == served.version:
                return
            self._loaded[project] = served  # one assignment: requests see the old or the new model, never a mix
            self._loaded.move_to_end(project)
            while len(self._loaded) > self.max_loaded:
                _, victim = self._loaded.popitem(last=False)
                evicted.append(victim)
        self._pointers[project] = served.version
        if old is not None:
            metrics.SERVING_MODEL.labels(str(project), old.version, old.kind.value).set(0)
            metrics.MODEL_SWAPS.inc()
            log.info("project %s: swapped %s -> %s", project, old.version, served.version)
        else:
            log.info("project %s: serving %s", project, served.version)
        metrics.SERVING_MODEL.labels(str(project), served.version, served.kind.value).set(1)
        if project in self._reported:
            version, kind = self._reported.pop(project)
            metrics.SERVING_MODEL.labels(str(project), version, kind.value).set(0)
        # In-flight requests keep their reference to the old model; memory returns once they finish.
        del old, evicted
        release_memory()

    async def label_vectors(
        self, zero_shot: ZeroShotClassifier, labels: tuple[str, ...], queue: InferenceQueue
    ) -> tuple[np.ndarray, np.ndarray]:
        """A label set's zero-shot embeddings: cached, or computed once (however many requests ask) as bulk
        work in the inference queue when large (in chunks, after interactive requests), so that a new, large
        label set does not hold up other requests."""
        cached = zero_shot.cached_labels(labels)
        if cached is not None:
            return cached
        key = (id(zero_shot), labels)
        job = self._label_jobs.get(key)
        if job is None:

            async def compute() -> tuple[np.ndarray, np.ndarray]:
                prompts = zero_shot.label_prompts(labels)
                raw = await queue.run(("embed", id(zero_shot)), prompts, zero_shot.embed)
                return zero_shot.remember_labels(labels, raw)

            job = asyncio.ensure_future(compute())
            self._label_jobs[key] = job
            job.add_done_callback(lambda _f: self._label_jobs.pop(key, None))
        return await asyncio.shield(job)

    async def predict(
        self, served: Served, spec: ClassificationSpec, texts: Sequence[str], queue: InferenceQueue
    ) -> np.ndarray:
        label_vectors = None
        if served.kind is ModelKind.ZEROSHOT and len(texts):
            label_vectors = await self.label_vectors(served.classifier, spec.labels, queue)
        raw = await queue.run(served.key(spec), texts, served.runner(spec))
        return served.finish(raw, spec, label_vectors) if len(texts) else raw

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


def _compatible(served: Served, spec: ClassificationSpec) -> bool:
    """A checkpoint can answer for the config if it shares at least one label and the choice mode."""
    return served.multi_label == spec.multi_label and bool(set(served.labels) & set(spec.labels))
