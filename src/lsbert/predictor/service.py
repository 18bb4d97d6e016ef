"""The predictor's data plane: Label Studio tasks or plain texts in, predictions out.

The HTTP layers (Label Studio routes, KServe V1/V2) only translate requests into calls on this object.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from lsbert import metrics
from lsbert.labelconfig import ClassificationSpec, parse_label_config
from lsbert.model import ModelKind
from lsbert.predictor.errors import BadRequest, UnknownProject
from lsbert.predictor.inference import InferenceQueue
from lsbert.predictor.registry import ModelRegistry
from lsbert.predictor.results import Prediction, decide, project_probabilities, task_text, to_label_studio
from lsbert.predictor.textsource import TextSourceError, fetch_text

if TYPE_CHECKING:
    from lsbert.predictor.heads import HeadKeeper

log = logging.getLogger(__name__)


@dataclass
class Classified:
    version: str
    kind: ModelKind
    labels: tuple[str, ...]
    probabilities: np.ndarray
    predictions: list[Prediction]


# Label Studio's project ids are database serials (a 32-bit integer column): 1 .. 2**31 - 1.
MAX_PROJECT_ID = 2**31 - 1
# A labelling config (or a zero-shot label set) with more choices than this is refused.
MAX_LABELS = 1000
# The parsed-config cache keeps at most this many configs and this many bytes of config text.
SPEC_CACHE_ENTRIES = 256
SPEC_CACHE_BYTES = 16 * 1024 * 1024


def parse_project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created timestamp>"``; webhooks and the API send the integer id."""
    if isinstance(value, bool):
        raise ValueError("project must be an id")
    if isinstance(value, int):
        project = value
    elif isinstance(value, str) and value.strip():
        head = value.strip().split(".", 1)[0]
        if not head.isdigit() or len(head) > 10:
            raise ValueError(f"project {value[:40]!r} is not '<id>' or '<id>.<timestamp>'")
        project = int(head)
    else:
        raise ValueError("project must be an id or '<id>.<timestamp>'")
    if not 1 <= project <= MAX_PROJECT_ID:
        raise ValueError(f"project id must be between 1 and {MAX_PROJECT_ID} (a Label Studio project id)")
    return project


class PredictorService:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        threshold: float = 0.5,
        label_studio_url: Optional[str] = None,
        label_studio_api_key: Optional[str] = None,
        cache_dir: Path = Path(".lsbert-cache"),
        max_batch: int = 256,
        default_project: Optional[int] = None,
        url_allowed_hosts: Sequence[str] = (),
    ):
        self.registry = registry
        self.threshold = threshold
        self.queue = InferenceQueue(max_batch=max_batch)
        self.label_studio_url = label_studio_url
        self.label_studio_api_key = label_studio_api_key
        self.cache_dir = cache_dir
        self.default_project = default_project
        self.url_allowed_hosts = tuple(url_allowed_hosts)
        self.ready = False
        self.unloaded = False  # set once the model was unloaded through KServe's repository extension
        self._loaded = threading.Event()
        self._spec_cache: OrderedDict[str, ClassificationSpec] = OrderedDict()
        self._spec_cache_bytes = 0
        self.heads: Optional[HeadKeeper] = None  # embedding heads (set by the server when enabled)

    def attach_heads(self, heads: HeadKeeper) -> None:
        self.heads = heads
        self.registry.heads = heads

    # --- lifecycle ----------------------------------------------------------------------------------
    def load(self) -> None:
        self.registry.load_baseline()
        self.ready = True
        self._loaded.set()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (off the event loop) up to ``timeout`` seconds for the baseline to finish loading."""
        if self.ready:
            return True
        if timeout > 0:
            await asyncio.to_thread(self._loaded.wait, timeout)
        return self.ready

    # --- configs ------------------------------------------------------------------------------------
    def spec_from_config(self, xml: Any) -> ClassificationSpec:
        if not isinstance(xml, str):
            raise BadRequest(f"a labelling config must be an XML string, not {type(xml).__name__}")
        spec = self._spec_cache.get(xml)
        if spec is not None:
            self._spec_cache.move_to_end(xml)
            return spec
        spec = parse_label_config(xml)
        check_labels(spec.labels)
        self._spec_cache[xml] = spec
        self._spec_cache_bytes += len(xml)
        while self._spec_cache and (
            len(self._spec_cache) > SPEC_CACHE_ENTRIES or self._spec_cache_bytes > SPEC_CACHE_BYTES
        ):
            old, _ = self._spec_cache.popitem(last=False)
            self._spec_cache_bytes -= len(old)
        return spec

    def setup(self, project: int, schema: Optional[str]) -> str:
        """Remember the project's config and return the model version serving it."""
        spec = self.spec_from_config(schema) if schema else self.registry.spec(project)
        if spec is None:
            raise UnknownProject(f"project {project} is unknown: send its labelling config in 'schema'")
        self.registry.remember(project, spec)
        return self.registry.version_for(project, spec)

    def resolve_spec(self, project: int, label_config: Optional[str]) -> ClassificationSpec:
        if label_config:
            spec = self.spec_from_config(label_config)
            self.registry.remember(project, spec)
            return spec
        known = self.registry.spec(project)
        if known is None:
            raise UnknownProject(f"project {project} is unknown: send 'label_config' or call /setup first")
        return known

    # --- prediction ---------------------------------------------------------------------------------
    async def _classify(self, project: Optional[int], spec: ClassificationSpec, texts: Sequence[str]) -> Classified:
        if project is None:
            served = self.registry.zero_shot_served(spec)
        else:
            served = await self.registry.acquire(project, spec)
        raw = await self.registry.predict(served, spec, texts, self.queue)
        if not len(texts):
            raw = np.zeros((0, len(served.labels)), dtype=np.float32)
        probs, labels = project_probabilities(raw, served.labels, spec)
        predictions = [decide(row, labels, spec.multi_label, self.threshold) for row in probs]
        return Classified(served.version, served.kind, labels, probs, predictions)

    async def _texts_of(self, tasks: Sequence[Any], spec: ClassificationSpec) -> list[Optional[str]]:
        texts: list[Optional[str]] = []
        for task in tasks:
            text, reason = task_text(task, spec.data_key)
            if text is not None and spec.text_is_url:
                try:
                    text = await asyncio.to_thread(
                        fetch_text,
                        text,
                        task_id=task.get("id"),
                        hostname=self.label_studio_url,
                        api_key=self.label_studio_api_key,
                        cache_dir=self.cache_dir / "task-data",
                        allowed_hosts=self.url_allowed_hosts,
                    )
                except TextSourceError as exc:
                    text, reason = None, str(exc)
            if text is None:
                log.debug("task %s gets an empty prediction: %s", _task_id(task), reason)
            texts.append(text)
        return texts

    async def predict_tasks(
        self, project: int, spec: ClassificationSpec, tasks: Sequence[Any]
    ) -> tuple[str, list[dict]]:
        """Label Studio /predict: exactly one result per task, in order; bad tasks get an empty result."""
        started = time.perf_counter()
        texts = await self._texts_of(tasks, spec)
        good = [i for i, t in enumerate(texts) if t is not None]
        classified = await self._classify(project, spec, [t for t in texts if t is not None])
        by_index = dict(zip(good, classified.predictions))
        results = [to_label_studio(by_index.get(i), spec, classified.version) for i in range(len(tasks))]
        metrics.TASKS_PREDICTED.labels("ok").inc(len(good))
        metrics.TASKS_PREDICTED.labels("empty").inc(len(tasks) - len(good))
        log.info(
            "project %s: predicted %d tasks (%d empty) with %s in %.3fs",
            project,
            len(tasks),
            len(tasks) - len(good),
            classified.version,
            time.perf_counter() - started,
        )
        return classified.version, results

    async def classify_texts(
        self,
        texts: Sequence[str],
        *,
        project: Optional[int] = None,
        labels: Optional[Sequence[str]] = None,
        multi_label: bool = False,
    ) -> Classified:
        """KServe V1/V2: plain texts for a project's model, or zero-shot over the given labels."""
        if labels:
            if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
                raise BadRequest("'labels' must be a list of label names (strings)")
            unique = tuple(dict.fromkeys(labels))
            check_labels(unique)
            spec = ClassificationSpec("label", "text", "text", unique, bool(multi_label))
            return await self._classify(None, spec, texts)
        if project is None:
            project = self.default_project
        if project is None:
            known = self.registry.known_projects()
            if len(known) != 1:
                raise UnknownProject(
                    "say which project's model to use ('project' or parameters.project), or give 'labels' for "
                    f"zero-shot; known projects: {known}"
                )
            project = known[0]
        remembered = self.registry.spec(project)
        if remembered is not None:
            return await self._classify(project, remembered, texts)
        served = self.registry.loaded(project)
        version = await self.registry.read_pointer(project)
        if served is None and version:
            served = await self.registry.ensure_loaded(project, version)
        if served is None:
            raise UnknownProject(f"project {project} is unknown: connect it from Label Studio first")
        spec = ClassificationSpec("label", "text", "text", served.labels, served.multi_label)
        return await self._classify(project, spec, texts)

    def close(self) -> None:
        if self.heads is not None:
            self.heads.close()
        self.queue.close()
        self.registry.close()


def check_labels(labels: Sequence[str]) -> None:
    if len(labels) > MAX_LABELS:
        raise BadRequest(f"{len(labels)} labels; lsbert serves at most {MAX_LABELS} per project")
    if sum(len(label) for label in labels) > 64 * MAX_LABELS:
        raise BadRequest("the label names are too long")


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None
