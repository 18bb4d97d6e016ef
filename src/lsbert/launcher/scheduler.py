"""When to train: Label Studio fit events become at most one run per project at a time.

- ``START_TRAINING`` always asks for a run.
- ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED``/``ANNOTATIONS_DELETED`` (and bulk ``ANNOTATIONS_CREATED``)
  count per project; every ``START_TRAINING_EACH_N_UPDATES`` changes ask for a run (0 disables).
  Creations and deletions are counted by Label Studio itself: their events carry the project's annotation
  count after the change (``project.total_annotations_number``), and the event whose change crosses a
  multiple of N asks for the run. That count is the same whichever predictor replica receives the event, so
  with several replicas exactly one of them asks, once per multiple. A run carries that count as its
  trigger (``annotations=<n>``): a replica that gets the same crossing again (Label Studio saving two
  annotations at once reports the same count twice) finds the run already there and asks for nothing.
  Updates leave the count unchanged; they (and events without the count) are counted by the replica that
  receives them.
- A request while the project's run is active sets one follow-up: however many arrive, exactly one
  more run starts when the active one finishes, so the newest labels are always trained on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from lsbert import metrics
from lsbert.launcher.base import Launcher, LaunchError, Run, RunPhase
from lsbert.store import CheckpointStore

log = logging.getLogger(__name__)

START_TRAINING = "START_TRAINING"
UPDATE_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED"}
CREATE_EVENTS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED"}
DELETE_EVENTS = {"ANNOTATIONS_DELETED"}
WEBHOOK_BUDGET_S = 0.5  # Label Studio gives event webhooks 1 s


def updates_in(action: str, payload: dict[str, Any]) -> int:
    """How many annotation changes one event carries."""
    if action == "ANNOTATIONS_DELETED":
        items = payload.get("annotations")
        return len(items) if isinstance(items, list) and items else 1
    if action == "ANNOTATIONS_CREATED":
        items = payload.get("annotation")
        return len(items) if isinstance(items, list) and items else 1
    return 1


def annotation_count(payload: dict[str, Any]) -> Optional[int]:
    """Label Studio's count of the project's annotations after the event (``project.total_annotations_number``
    in its annotation webhooks), or None when the event does not carry it."""
    project = payload.get("project")
    count = project.get("total_annotations_number") if isinstance(project, dict) else None
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return None


def crosses_multiple(before: int, after: int, every: int) -> bool:
    """Whether going from ``before`` to ``after`` annotations (either way) passes a multiple of ``every``."""
    return max(before, 0) // every != max(after, 0) // every


@dataclass
class ProjectTraining:
    updates: int = 0
    annotations: Optional[int] = None  # Label Studio's count of the project's annotations, as last seen
    active: Optional[Run] = None
    last: Optional[Run] = None
    follow_up: bool = False
    runs_started: int = 0
    waiting: bool = False  # queued for a free slot under the global limit of concurrent runs
    waiting_trigger: str = ""  # the trigger of the request that waits (Run.trigger)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def as_dict(self) -> dict[str, Any]:
        return {
            "updates_since_last_trigger": self.updates,
            "label_studio_annotations": self.annotations,
            "active": self.active.as_dict() if self.active else None,
            "last": self.last.as_dict() if self.last else None,
            "follow_up_pending": self.follow_up,
            "runs_started": self.runs_started,
            "waiting_for_slot": self.waiting,
        }


class TrainingScheduler:
    def __init__(
        self,
        launcher: Launcher,
        store: CheckpointStore,
        *,
        every_n_updates: int,
        version_name: str,
        train_args: Optional[list[str]] = None,
        poll_seconds: float = 2.0,
        on_finished: Optional[Callable[[int, Run], Awaitable[object]]] = None,
        max_concurrent: int = 0,
        refuse: Optional[str] = None,
    ):
        """``max_concurrent``: runs at once across all projects (0 = no limit); the others wait in arrival
        order, one pending request per project. ``refuse``: why no run can succeed here (every request is
        refused at once with this reason, which /health shows)."""
        self.launcher = launcher
        self.store = store
        self.every_n_updates = every_n_updates
        self.version_name = version_name
        self.train_args = list(train_args or [])
        self.poll_seconds = poll_seconds
        self.on_finished = on_finished
        self._projects: dict[int, ProjectTraining] = {}
        self._watch_task: Optional[asyncio.Task] = None
        self._tasks: set[asyncio.Task] = set()
        self.max_concurrent = max_concurrent
        self.refuse = refuse
        self._waiting: deque[int] = deque()
        self._slots = asyncio.Lock()

    def _state(self, project: int) -> ProjectTraining:
        state = self._projects.get(project)
        if state is None:
            state = self._projects[project] = ProjectTraining()
        return state

    def status(self) -> dict[str, Any]:
        return {str(p): s.as_dict() for p, s in sorted(self._projects.items())}

    # --- events -------------------------------------------------------------------------------------
    async def handle_event(self, action: str, project: int, payload: dict[str, Any]) -> dict[str, Any]:
        if action == START_TRAINING:
            return await self._request_within_budget(project, "START_TRAINING")
        if action in UPDATE_EVENTS:
            state = self._state(project)
            count = annotation_count(payload) if action in CREATE_EVENTS | DELETE_EVENTS else None
            if count is not None:
                return await self._count_changed(project, state, action, payload, count)
            state.updates += updates_in(action, payload)
            if self.every_n_updates and state.updates >= self.every_n_updates:
                log.info("project %s: %d annotation changes since the last trigger", project, state.updates)
                state.updates = 0
                return await self._request_within_budget(project, f"{self.every_n_updates} annotation changes")
            return {"status": "ok", "action": action, "updates": state.updates}
        return {"status": "ignored", "action": action}

    async def _count_changed(
        self, project: int, state: ProjectTraining, action: str, payload: dict[str, Any], count: int
    ) -> dict[str, Any]:
        """An event with Label Studio's annotation count: a run when the change crosses a multiple of N."""
        changes = updates_in(action, payload)
        before = count - changes if action in CREATE_EVENTS else count + changes
        state.annotations = count
        if self.every_n_updates and crosses_multiple(before, count, self.every_n_updates):
            log.info("project %s: Label Studio's annotation count went from %d to %d", project, before, count)
            reason = f"{count} annotations in Label Studio (every {self.every_n_updates})"
            return await self._request_within_budget(project, reason, trigger=f"annotations={count}")
        return {"status": "ok", "action": action, "annotations": count}

    async def _request_within_budget(self, project: int, reason: str, trigger: str = "") -> dict[str, Any]:
        task = asyncio.get_running_loop().create_task(self.request_run(project, reason, trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            run, collapsed = await asyncio.wait_for(asyncio.shield(task), WEBHOOK_BUDGET_S)
        except asyncio.TimeoutError:
            return {"status": "accepted", "project": project}
        except LaunchError as exc:
            return {"status": "error", "project": project, "message": str(exc)}
        answer = {"status": "queued" if collapsed else "started", "project": project}
        if run is not None:
            answer["job"] = run.run_id
        return answer

    async def request_run(self, project: int, reason: str, trigger: str = "") -> tuple[Optional[Run], bool]:
        """Start a run, or record one follow-up if a run is active, or queue the project for a free slot.
        A request whose ``trigger`` is the active run's own (another replica started it for the same
        annotation count) changes nothing. Returns (run, collapsed)."""
        state = self._state(project)
        if self.refuse:
            message = f"refused: {self.refuse}"
            state.last = Run(project, "", "", RunPhase.FAILED, finished_at=time.time(), message=message)
            log.warning("project %s: training refused: %s", project, self.refuse)
            raise LaunchError(self.refuse)
        async with state.lock, self._slots:
            if state.active is None:
                adopted = await asyncio.to_thread(self.launcher.active_run, project)
                if adopted is not None:
                    log.info("project %s: adopting active training run %s", project, adopted.run_id)
                    state.active = adopted
                    self._ensure_watching()
            if state.active is not None:
                if trigger and state.active.trigger == trigger:
                    log.info("project %s: %s: run %s was started for it already", project, reason, state.active.run_id)
                    return state.active, True
                state.follow_up = True
                log.info(
                    "project %s: %s while %s runs; one follow-up run queued", project, reason, state.active.version
                )
                return state.active, True
            if state.waiting:
                state.waiting_trigger = state.waiting_trigger or trigger
                return None, True
            if self.max_concurrent and self._active_count() >= self.max_concurrent:
                state.waiting = True
                state.waiting_trigger = trigger
                self._waiting.append(project)
                log.info(
                    "project %s: %s; waiting for a free slot (%d runs active, at most %d)",
                    project,
                    reason,
                    self._active_count(),
                    self.max_concurrent,
                )
                return None, True
            return await self._launch(project, state, reason, trigger), False

    def _active_count(self) -> int:
        return sum(1 for s in self._projects.values() if s.active is not None)

    async def _start_waiting(self) -> None:
        """Start the projects waiting for a slot, in arrival order, while slots are free."""
        while self._waiting and (not self.max_concurrent or self._active_count() < self.max_concurrent):
            project = self._waiting.popleft()
            state = self._state(project)
            state.waiting, trigger, state.waiting_trigger = False, state.waiting_trigger, ""
            try:
                await self.request_run(project, "a training slot became free", trigger)
            except LaunchError:
                pass

    async def _launch(self, project: int, state: ProjectTraining, reason: str, trigger: str = "") -> Run:
        try:
            version = await asyncio.to_thread(self.store.next_version, project, self.version_name)
            run = await asyncio.to_thread(self.launcher.launch, project, version, self.train_args, trigger=trigger)
        except Exception as exc:
            metrics.TRAINING_RUNS.labels("launch_failed").inc()
            state.last = Run(project, "", "", RunPhase.FAILED, finished_at=time.time(), message=f"launch failed: {exc}")
            log.error("project %s: cannot launch a training run: %s", project, exc)
            raise LaunchError(str(exc)) from None
        state.active = run
        state.runs_started += 1
        metrics.TRAINING_RUNS.labels("started").inc()
        log.info("project %s: training run %s launched (%s)", project, run.run_id, reason)
        self._ensure_watching()
        return run

    async def adopt_active_runs(self) -> None:
        """After a restart: follow the runs the launcher's backend still has (Kubernetes Jobs), so their
        completion is noticed and no duplicate is started."""
        active_runs = getattr(self.launcher, "active_runs", None)
        if active_runs is None:
            return
        try:
            runs = await asyncio.to_thread(active_runs)
        except Exception as exc:
            log.warning("cannot list active training runs: %s", exc)
            return
        for run in runs:
            state = self._state(run.project)
            if state.active is None:
                state.active = run
                log.info("project %s: adopted active training run %s", run.project, run.run_id)
        if runs:
            self._ensure_watching()

    # --- watching runs ------------------------------------------------------------------------------
    def _ensure_watching(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="lsbert-training-watch")

    async def _watch(self) -> None:
        while any(s.active for s in self._projects.values()):
            await asyncio.sleep(self.poll_seconds)
            for project, state in list(self._projects.items()):
                if state.active is not None:
                    await self.check(project)

    async def check(self, project: int) -> None:
        state = self._state(project)
        async with state.lock:
            run = state.active
            if run is None:
                return
            try:
                run = await asyncio.to_thread(self.launcher.poll, run)
            except Exception as exc:  # the backend is unreachable for a moment; try again next tick
                log.warning("project %s: cannot read the state of run %s: %s", project, run.run_id, exc)
                return
            if not run.phase.finished:
                return
            state.active, state.last = None, run
            metrics.TRAINING_RUNS.labels(run.phase.value).inc()
            if run.phase is RunPhase.FAILED:
                log.error("project %s: training run %s failed: %s", project, run.version, run.message)
            else:
                log.info("project %s: training run %s finished", project, run.version)
            follow_up, state.follow_up = state.follow_up, False
        if self.on_finished is not None:
            try:
                await self.on_finished(project, run)
            except Exception as exc:
                log.error("project %s: after run %s: %s", project, run.version, exc)
        if follow_up and not state.waiting:  # behind the projects already waiting, so every project gets a turn
            state.waiting = True
            self._waiting.append(project)
        await self._start_waiting()

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.launcher.close)
