"""Per-project embedding heads: fitted in the predictor from a project's first labels, served between the
zero-shot baseline and the first promoted fine-tune.

For each project the keeper holds the labelled examples (task id -> the baseline's embedding of the task's
text, the chosen labels), bounded per project and across projects (the newest are kept). Annotation events
(``ANNOTATION_CREATED``/``ANNOTATION_UPDATED``/``ANNOTATIONS_CREATED``/``ANNOTATIONS_DELETED``) carry the
task data and the answer, so no download is needed; cancelled (skipped) annotations are ignored. When the
keeper meets a project it holds nothing for, or the project's label set changes, it rebuilds the examples
from the Label Studio API (when ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` are set).

The head is refitted and assessed out of fold (``lsbert.model.head.assess``: against zero-shot and the
label prior) in steps of the number of examples (10, 15, 20, 30, 40, 60, … with ``HEAD_MIN_LABELS=10``),
not on every label, so its ``model_version`` (``head-<examples>-<hash>``) changes only at those steps. It
serves while it beats both rivals.

Embeddings are computed on the predictor's inference queue (the same worker thread and merged batches as
predictions); fits run on one worker thread of their own; events that arrive during a fit are coalesced
into the next round. The state is written to the checkpoint store (``<project>/.head/state.npz``) after
each round, and read back on the first request for a project after a start; a periodic check of its tag
picks up what other replicas wrote (merged per task: the newer change wins).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from lsbert.labelconfig import ClassificationSpec
from lsbert.labelstudio.examples import CANCELLED, task_example
from lsbert.model.head import Head, assess, fit, prior
from lsbert.model.headstate import HeadState, Labelled, assessment_steps, head_version, step_of
from lsbert.predictor.inference import BULK
from lsbert.store import CheckpointStore, StoreError

if TYPE_CHECKING:
    from lsbert.predictor.service import PredictorService

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETE_EVENT = "ANNOTATIONS_DELETED"
# How long the first request for a project waits for its head state to be read from the store.
LOAD_WAIT_S = 5.0
# A rebuild from Label Studio that failed is retried after this long (on the project's next change or request).
REBUILD_RETRY_S = 300.0
# How long the worker waits for the baseline to load before leaving the changes for the next round.
READY_WAIT_S = 600.0


@dataclass
class Change:
    """One annotation event, reduced to what the head needs."""

    kind: str  # "put" (task -> labels), "drop" (the task's example if it came from this annotation),
    # "delete" (the example that came from this annotation)
    task_id: Optional[int]
    annotation_id: Optional[int]
    changed_at: float
    labels: tuple[str, ...] = ()
    task: Optional[dict[str, Any]] = None  # {"id", "data"}: for the text


@dataclass
class ProjectHead:
    state: Optional[HeadState] = None
    tag: Optional[str] = None  # store tag of the state last read or written here
    loaded: bool = False  # the store was read (or found empty)
    load: Optional[asyncio.Future] = None
    pending: list[Change] = field(default_factory=list)
    worker: Optional[asyncio.Task] = None
    rebuild: bool = False  # wanted from Label Studio
    rebuild_after: float = 0.0  # time.monotonic()
    assessed_step: int = 0
    refit: bool = False
    dirty: bool = False


def zero_shot_proba(
    zero_shot: Any,
    embeddings: np.ndarray,
    labels: tuple[str, ...],
    multi_label: bool,
    label_vectors: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> np.ndarray:
    """The zero-shot baseline's probabilities for texts already embedded with its ``embed``."""
    return np.asarray(zero_shot.proba_from_embeddings(embeddings, labels, multi_label, label_vectors), np.float32)


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return [value] if isinstance(value, dict) else []


def changes_from_event(action: str, payload: dict[str, Any], spec: ClassificationSpec, now: float) -> list[Change]:
    """What an annotation event means for the project's examples (nothing for other events)."""
    if action == DELETE_EVENT:
        return [
            Change("delete", None, annotation_id, now)
            for item in _as_list(payload.get("annotations"))
            if (annotation_id := _int(item.get("id"))) is not None
        ]
    if action not in ANNOTATION_EVENTS:
        return []
    annotations = _as_list(payload.get("annotation"))
    tasks = _as_list(payload.get("task"))
    by_id = {task_id: task for task in tasks if (task_id := _int(task.get("id"))) is not None}
    changes = []
    for annotation in annotations:
        owner = _int(annotation.get("task"))
        task = by_id.get(owner) if owner is not None else None
        if task is None and len(tasks) == 1 and len(annotations) == 1:
            task = tasks[0]
        task_id = _int(task.get("id")) if task else _int(annotation.get("task"))
        if task is None or task_id is None:
            continue
        annotation_id = _int(annotation.get("id"))
        example, reason = task_example({"id": task_id, "data": task.get("data"), "annotations": [annotation]}, spec)
        if reason == CANCELLED:
            continue  # a skip says nothing about the task's label
        if example is None:
            changes.append(Change("drop", task_id, annotation_id, now))
            continue
        changes.append(
            Change(
                "put",
                task_id,
                annotation_id,
                example.changed_at if example.changed_at is not None else now,
                example.labels,
                {"id": task_id, "data": task.get("data")},
            )
        )
    return changes


class HeadKeeper:
    def __init__(
        self,
        service: PredictorService,
        store: CheckpointStore,
        *,
        baseline: str,
        min_labels: int = 10,
        max_examples: int = 2000,
        max_total_examples: int = 50_000,
        poll_seconds: float = 30.0,
        source: Optional[Callable[[], Any]] = None,
    ):
        """``source``: makes a ``lsbert.labelstudio.source.LabelStudioSource`` (None: no rebuilds)."""
        self.service = service
        self.registry = service.registry
        self.store = store
        self.baseline = baseline
        self.min_labels = min_labels
        self.steps = assessment_steps(min_labels)
        self.max_examples = max_examples
        self.max_total_examples = max_total_examples
        self.poll_seconds = poll_seconds
        self._source_factory = source
        self._source: Any = None
        self._projects: dict[int, ProjectHead] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbert-head")
        self._poller: Optional[asyncio.Task] = None

    # --- what serves ----------------------------------------------------------------------------------
    def serving(self, project: int, spec: ClassificationSpec) -> Optional[tuple[Head, str]]:
        """The head and its version if the project's head serves for this config now (memory only; a
        project not read from the store yet, or whose labels changed, gets its worker started)."""
        entry = self._projects.get(project)
        if entry is None or not entry.loaded:
            self._kick(project)
            return None
        state = entry.state
        if state is None or state.labels != spec.labels or state.multi_label != spec.multi_label:
            self._kick(project)
            return None
        if state.serves and state.head is not None and state.version:
            return state.head, state.version
        return None

    async def prepare(self, project: int, timeout: float = LOAD_WAIT_S) -> None:
        """Read the project's state from the store if that has not happened yet (off the event loop, at
        most ``timeout`` seconds; later requests find it in memory)."""
        entry = self._entry(project)
        if entry.loaded:
            return
        load = self._start_load(project, entry)
        try:
            await asyncio.wait_for(asyncio.shield(load), timeout)
        except asyncio.TimeoutError:
            log.warning("project %s: the head state was not read from the store in %.0fs", project, timeout)
        except Exception:  # logged by the load itself
            pass

    def status(self, project: int) -> Optional[dict[str, Any]]:
        """The project's head for /versions: version, examples, whether it serves, held-out scores."""
        entry = self._projects.get(project)
        if entry is None or entry.state is None:
            return None
        state = entry.state
        return {
            "version": state.version,
            "serves": state.serves,
            "examples": len(state.examples),
            "labels": list(state.labels),
            "next_assessment_at": next((s for s in self.steps if s > len(state.examples)), None),
            "assessment": dict(state.assessment),
        }

    async def wait_idle(self, project: int, timeout: float = 60.0) -> bool:
        """Wait until the project's queued changes are applied (and fitted, and written); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._projects.get(project)
            worker = entry.worker if entry is not None else None
            if worker is None or worker.done():
                if entry is None or not entry.pending:
                    return True
                self._kick(project)
                continue
            await asyncio.wait({worker}, timeout=max(0.0, deadline - time.monotonic()))
        return False

    # --- events ---------------------------------------------------------------------------------------
    def on_event(self, action: str, project: int, payload: dict[str, Any]) -> int:
        """Queue what an event changes (cheap; the work happens on the project's worker). Returns the
        number of changes queued."""
        spec = self.registry.spec(project)
        if spec is None:
            return 0
        changes = changes_from_event(action, payload, spec, time.time())
        if changes:
            entry = self._entry(project)
            entry.pending.extend(changes)
            limit = 10 * self.max_examples
            if len(entry.pending) > limit:  # far behind: the oldest changes are superseded anyway
                del entry.pending[: len(entry.pending) - limit]
            self._kick(project)
        elif action == "PROJECT_UPDATED":
            self._kick(project)  # the worker follows a new label set
        return len(changes)

    # --- the per-project worker -------------------------------------------------------------------------
    def _entry(self, project: int) -> ProjectHead:
        entry = self._projects.get(project)
        if entry is None:
            entry = self._projects[project] = ProjectHead()
        return entry

    def _kick(self, project: int) -> None:
        entry = self._entry(project)
        if entry.worker is None or entry.worker.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            entry.worker = loop.create_task(self._work(project), name=f"lsbert-head-{project}")

    def _start_load(self, project: int, entry: ProjectHead) -> asyncio.Future:
        if entry.load is None:
            entry.load = asyncio.ensure_future(self._load(project, entry))
        return entry.load

    async def _load(self, project: int, entry: ProjectHead) -> None:
        try:
            found = await asyncio.to_thread(self.store.read_head, project)
            state = HeadState.from_bytes(found[0]) if found else None
        except (StoreError, OSError, ValueError) as exc:
            log.warning("project %s: cannot read the head state (%s); starting afresh", project, exc)
            found, state = None, None
        if state is not None and state.baseline != self.baseline:
            log.info("project %s: the stored head was fitted on %s; starting afresh", project, state.baseline)
            state = None
        if state is not None:
            entry.state = state
            entry.assessed_step = step_of(state.head.examples if state.head is not None else 0, self.steps)
            log.info(
                "project %s: head state read: %d examples, %s",
                project,
                len(state.examples),
                f"{state.version} {'serving' if state.serves else 'not serving'}" if state.version else "no head",
            )
        else:
            entry.rebuild = True
        entry.tag = found[1] if found else None
        entry.loaded = True

    async def _work(self, project: int) -> None:
        entry = self._entry(project)
        try:
            await self._start_load(project, entry)
            if not await self.service.wait_ready(READY_WAIT_S):
                return
            while True:
                spec = self.registry.spec(project)
                if spec is None:
                    entry.pending.clear()
                    return
                self._follow(project, entry, spec)
                if entry.rebuild and self._source_factory is not None and time.monotonic() >= entry.rebuild_after:
                    await self._rebuild(project, entry, spec)
                changes, entry.pending = entry.pending, []
                if changes:
                    await self._apply(project, entry, spec, changes)
                await self._maybe_fit(project, entry)
                if entry.dirty:
                    await self._save(project, entry)
                if not entry.pending:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("project %s: the embedding head could not be updated", project)

    def _follow(self, project: int, entry: ProjectHead, spec: ClassificationSpec) -> None:
        """Make the state match the project's current label set."""
        state = entry.state
        if state is None:
            entry.state = HeadState(self.baseline, spec.labels, spec.multi_label)
            entry.refit = entry.dirty = True
            return
        if state.labels != spec.labels or state.multi_label != spec.multi_label:
            log.info("project %s: the label set changed; the head follows it", project)
            state.restrict(spec.labels, spec.multi_label)
            entry.rebuild = True
            entry.rebuild_after = 0.0
            entry.refit = entry.dirty = True

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        zero_shot = self.registry.zero_shot
        assert zero_shot is not None  # the worker waits for the baseline
        # learning is background work: predictions people wait for go first
        return await self.service.queue.run(("embed", id(zero_shot)), list(texts), zero_shot.embed, priority=BULK)

    async def _texts(self, spec: ClassificationSpec, tasks: Sequence[dict[str, Any]]) -> list[Optional[str]]:
        return await self.service._texts_of(tasks, spec)

    async def _apply(self, project: int, entry: ProjectHead, spec: ClassificationSpec, changes: list[Change]) -> None:
        state = entry.state
        assert state is not None
        puts = [c for c in changes if c.kind == "put" and c.task is not None]
        texts = await self._texts(spec, [c.task for c in puts if c.task is not None]) if puts else []
        wanted = [t for t in texts if t is not None]
        embedded = await self._embed(wanted) if wanted else np.zeros((0, 0), dtype=np.float32)
        rows = iter(embedded)
        embedding_of: dict[int, np.ndarray] = {}
        for change, text in zip(puts, texts):
            if text is not None:
                embedding_of[id(change)] = next(rows)
        known = set(state.labels)
        for change in changes:
            if change.kind == "delete":
                for task_id, example in list(state.examples.items()):
                    if example.annotation_id == change.annotation_id:
                        entry.dirty |= state.delete(task_id, change.changed_at)
                continue
            if change.task_id is None:
                continue
            current = state.examples.get(change.task_id)
            vector = embedding_of.get(id(change))
            if change.kind == "put" and vector is not None and set(change.labels) <= known:
                example = Labelled(vector, change.labels, change.annotation_id, change.changed_at)
                entry.dirty |= state.put(change.task_id, example)
            elif current is not None and current.annotation_id == change.annotation_id:
                # the annotation that gave the example no longer answers (emptied, skipped, no text)
                entry.dirty |= state.delete(change.task_id, change.changed_at)
        state.trim(self.max_examples)
        self._bound_total()

    def _bound_total(self) -> None:
        """Keep at most ``max_total_examples`` across projects: the oldest go first."""
        total = sum(len(e.state.examples) for e in self._projects.values() if e.state is not None)
        excess = total - self.max_total_examples
        if excess <= 0:
            return
        everything = sorted(
            (example.changed_at, project, task_id)
            for project, e in self._projects.items()
            if e.state is not None
            for task_id, example in e.state.examples.items()
        )
        for _, project, task_id in everything[:excess]:
            state = self._projects[project].state
            if state is not None:
                state.examples.pop(task_id, None)
        log.info("embedding heads: %d examples over HEAD_MAX_TOTAL_EXAMPLES; the oldest were dropped", excess)

    async def _maybe_fit(self, project: int, entry: ProjectHead) -> None:
        state = entry.state
        if state is None:
            return
        order, embeddings, answers = state.arrays()
        step = step_of(len(order), self.steps)
        if step == entry.assessed_step and not entry.refit:
            return
        entry.refit = False
        entry.assessed_step = step
        entry.dirty = True
        if step == 0:
            if state.head is not None:
                log.info("project %s: %d labelled examples, too few for a head", project, len(order))
            state.head, state.version, state.serves, state.assessment = None, None, False, {}
            return
        labels, multi_label = state.labels, state.multi_label
        zero_shot = self.registry.zero_shot
        assert zero_shot is not None  # examples were embedded with it
        threshold = self.service.threshold
        started = time.perf_counter()
        label_vectors = await self.registry.label_vectors(zero_shot, labels, self.service.queue)

        def work() -> tuple[Head, Any]:
            rivals = zero_shot_proba(zero_shot, embeddings, labels, multi_label, label_vectors)
            assessment = assess(embeddings, answers, labels, multi_label, rivals, threshold)
            if assessment.serving == "prior":  # zero-shot loses to the label prior, and so does the head
                return prior(embeddings, answers, labels, multi_label), assessment
            return fit(embeddings, answers, labels, multi_label), assessment

        head, assessment = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        previous = state.version
        state.head, state.version = head, head_version(head)
        state.serves = assessment.serving != "zeroshot"
        state.assessment = {
            "serving": assessment.serving,
            "examples": assessment.examples,
            "head_macro_f1": _rounded(assessment.head_score),
            "zero_shot_macro_f1": _rounded(assessment.zero_shot_score),
            "prior_macro_f1": _rounded(assessment.prior_score),
        }
        state.fitted_at = time.time()
        log.info(
            "project %s: %s fitted on %d examples in %.2fs; held-out macro-F1 %s vs zero-shot %s and prior %s: %s",
            project,
            state.version,
            len(order),
            time.perf_counter() - started,
            _shown(assessment.head_score),
            _shown(assessment.zero_shot_score),
            _shown(assessment.prior_score),
            {
                "head": "the head serves",
                "prior": "zero-shot loses to the label prior: the prior serves",
                "zeroshot": "zero-shot keeps serving",
            }[assessment.serving],
        )
        if previous and previous != state.version:
            log.debug("project %s: head %s replaced by %s", project, previous, state.version)

    async def _rebuild(self, project: int, entry: ProjectHead, spec: ClassificationSpec) -> None:
        """Replace the examples with the project's annotations as Label Studio has them now."""
        started = time.perf_counter()
        try:
            if self._source is None:
                assert self._source_factory is not None
                self._source = self._source_factory()
            tasks = await asyncio.to_thread(self._source.labelled_tasks, project)
        except Exception as exc:  # Label Studio unreachable, bad key: the events keep the head going
            entry.rebuild_after = time.monotonic() + REBUILD_RETRY_S
            log.warning(
                "project %s: cannot read the annotations for the embedding head (%s); retrying in %.0fs",
                project,
                exc,
                REBUILD_RETRY_S,
            )
            return
        found = []
        for task in tasks:
            example, _ = task_example(task, spec)
            if example is not None and example.task_id is not None:
                found.append(example)
        found.sort(key=lambda e: (e.changed_at or 0.0, e.task_id or 0))
        found = found[-self.max_examples :]
        texts = await self._texts(spec, [{"id": e.task_id, "data": {spec.data_key: e.text}} for e in found])
        usable = [(e, t) for e, t in zip(found, texts) if t is not None]
        embedded = await self._embed([t for _, t in usable]) if usable else np.zeros((0, 0), dtype=np.float32)
        state = HeadState(self.baseline, spec.labels, spec.multi_label)
        now = time.time()
        for (example, _), vector in zip(usable, embedded):
            assert example.task_id is not None
            changed = example.changed_at if example.changed_at is not None else now
            state.examples[example.task_id] = Labelled(vector, example.labels, example.annotation_id, changed)
        previous = entry.state
        if previous is not None and previous.labels == state.labels and previous.multi_label == state.multi_label:
            state.tombstones = dict(previous.tombstones)
        entry.state = state
        entry.rebuild = False
        entry.refit = entry.dirty = True
        self._bound_total()
        log.info(
            "project %s: %d labelled examples read from Label Studio for the embedding head in %.1fs",
            project,
            len(state.examples),
            time.perf_counter() - started,
        )

    async def _save(self, project: int, entry: ProjectHead) -> None:
        state = entry.state
        if state is None or (not state.examples and entry.tag is None):
            entry.dirty = False  # nothing learnt and nothing stored: nothing to write
            return
        try:
            tag = await asyncio.to_thread(self.store.head_tag, project)
            if tag is not None and tag != entry.tag:  # another replica wrote since: keep its changes too
                await self._merge_stored(project, entry)
            data = await asyncio.to_thread(state.to_bytes)
            entry.tag = await asyncio.to_thread(self.store.write_head, project, data)
            entry.dirty = False
        except (StoreError, OSError) as exc:
            log.warning("project %s: cannot write the head state: %s", project, exc)

    async def _merge_stored(self, project: int, entry: ProjectHead) -> bool:
        """Fold the stored state into ours; True if the head that serves changed."""
        found = await asyncio.to_thread(self.store.read_head, project)
        if found is None or entry.state is None:
            return False
        try:
            other = HeadState.from_bytes(found[0])
        except ValueError as exc:
            log.warning("project %s: the stored head state is unreadable (%s); it will be replaced", project, exc)
            return False
        before = entry.state.version
        entry.state.merge(other)
        entry.tag = found[1]
        if entry.state.version != before:
            head = entry.state.head
            entry.assessed_step = step_of(head.examples if head is not None else 0, self.steps)
            log.info("project %s: head %s from another replica", project, entry.state.version)
            return True
        return False

    # --- other replicas -----------------------------------------------------------------------------------
    async def check(self, project: int) -> None:
        """Pick up a state another replica wrote (compared by its tag)."""
        entry = self._projects.get(project)
        if entry is None or not entry.loaded or (entry.worker is not None and not entry.worker.done()):
            return
        try:
            tag = await asyncio.to_thread(self.store.head_tag, project)
            if tag is None or tag == entry.tag:
                return
            if entry.state is None:
                entry.loaded, entry.load = False, None
                await self._start_load(project, entry)
                return
            await self._merge_stored(project, entry)
        except (StoreError, OSError) as exc:
            log.warning("project %s: cannot check the head state: %s", project, exc)
            return
        state = entry.state
        if state is not None and step_of(len(state.examples), self.steps) != entry.assessed_step:
            self._kick(project)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            for project in list(self._projects):
                await self.check(project)

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self.run_forever(), name="lsbert-heads")

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for entry in self._projects.values():
            if entry.worker is not None:
                entry.worker.cancel()

    def close(self) -> None:
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _rounded(score: Optional[float]) -> Optional[float]:
    return None if score is None or math.isnan(score) else round(float(score), 4)


def _shown(score: Optional[float]) -> str:
    return "-" if score is None else f"{score:.3f}"
