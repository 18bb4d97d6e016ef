"""The Label Studio ML backend API (as Label Studio 1.23 speaks it), on the KServe FastAPI app.

Handlers only parse and validate, call the predictor service or the training scheduler, and shape the
answer. Malformed requests raise the domain errors of ``lsbert.predictor.errors``, which answers each with
its 4xx and a message Label Studio shows to the user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from lsbert import metrics
from lsbert.labelconfig import LabelConfigError
from lsbert.predictor.auth import BasicAuth
from lsbert.predictor.errors import (
    BadRequest,
    NotReady,
    TooManyTasks,
    TrainingDisabled,
    UnknownProject,
    install_error_handlers,
)
from lsbert.predictor.service import PredictorService, parse_project_id

log = logging.getLogger(__name__)

MAX_TASKS = 100_000
STORE_READ_TIMEOUT_S = 5.0  # /versions: one project's checkpoints, read off the event loop
# Webhook actions Label Studio sends; any other value is counted under "other" so that invented actions
# cannot grow /metrics without bound.
KNOWN_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "START_TRAINING",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
        "REVIEW_CREATED",
        "REVIEW_UPDATED",
        "REVIEWS_DELETED",
    }
)
# Projects listed one by one in /health; beyond that only their number.
HEALTH_PROJECTS = 100


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _project(value: Any, where: str) -> int:
    try:
        return parse_project_id(value)
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None


class LabelStudioEndpoints:
    def __init__(self, service: PredictorService, scheduler=None, store=None, load_wait_seconds: float = 60.0):
        self.service = service
        self.scheduler = scheduler
        self.store = store
        self.load_wait_seconds = load_wait_seconds
        self._project_reads: dict[int, asyncio.Future] = {}

    async def health(self, request: Request) -> dict[str, Any]:
        """Answered from memory only (never the store or the cluster), and never an error: Label Studio
        calls it before every /setup. Without credentials (basic auth on) only up and ready."""
        ready = self.service.ready and not self.service.unloaded
        answer: dict[str, Any] = {"status": "UP", "model_class": "lsbert", "ready": ready}
        if not request.scope.get("state", {}).get("lsbert_authorized", True):
            return answer
        try:
            serving = self.service.registry.serving_summary(limit=HEALTH_PROJECTS)
            failures = self.service.registry.load_failures()
            training = self.scheduler.status() if self.scheduler else {}
            if len(training) > HEALTH_PROJECTS:
                training = dict(list(training.items())[-HEALTH_PROJECTS:])
        except Exception as exc:  # a bug in a summary must not turn the health check red
            log.error("health details unavailable: %s", exc)
            serving, training, failures = {}, {}, {}
        if failures:
            answer["load_failures"] = dict(list(failures.items())[:HEALTH_PROJECTS])
        answer.update(
            baseline=self.service.registry.baseline_name,
            projects=len(self.service.registry.known_projects()),
            serving=serving,
            training=training,
        )
        return answer

    async def live(self, request: Request) -> Any:
        """``GET /``: the health answer, and the liveness probe: 503 once the model was unloaded (it cannot
        be loaded back), so that the pod is restarted rather than left alive but never ready."""
        answer = await self.health(request)
        if self.service.unloaded:
            return JSONResponse({**answer, "status": "DOWN"}, status_code=503)
        return answer

    async def setup(self, request: Request) -> dict[str, Any]:
        with metrics.REQUEST_SECONDS.labels("setup").time():
            body = await _json_body(request)
            project = _project(body.get("project"), "setup")
            schema = body.get("schema")
            if schema is not None and not isinstance(schema, str):
                raise BadRequest("'schema' must be the labelling config as an XML string")
            await self.service.registry.read_pointer(project)  # off the event loop, bounded
            if self.service.heads is not None:
                await self.service.heads.prepare(project)  # the head state, read once, bounded
            version = self.service.setup(project, schema)
            return {"model_version": version}

    async def predict(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        body = await _json_body(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("'tasks' must be a list of Label Studio tasks")
        if len(tasks) > MAX_TASKS:
            raise TooManyTasks(f"{len(tasks)} tasks in one request; at most {MAX_TASKS}")
        project_field = body.get("project")
        if project_field is None and tasks and isinstance(tasks[0], dict):
            project_field = tasks[0].get("project")
        project = _project(project_field, "predict")
        label_config = body.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise BadRequest("'label_config' must be the labelling config as an XML string")
        # Label Studio does not retry a failed /predict: a request that comes while the baseline is still
        # loading waits for it (bounded) rather than failing.
        if not await self.service.wait_ready(self.load_wait_seconds):
            raise NotReady("the model is still loading; retry in a few seconds")
        spec = self.service.resolve_spec(project, label_config)
        version, results = await self.service.predict_tasks(project, spec, tasks)
        metrics.REQUEST_SECONDS.labels("predict").observe(time.perf_counter() - started)
        return {"results": results, "model_version": version}

    async def webhook(self, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("a webhook body needs an 'action'")
        metrics.WEBHOOK_EVENTS.labels(action if action in KNOWN_ACTIONS else "other").inc()
        project_obj = body.get("project")
        project_value = project_obj.get("id") if isinstance(project_obj, dict) else project_obj
        if project_value is None:
            return {"status": "ignored", "action": action, "reason": "no project in the event"}
        project = _project(project_value, "webhook")
        if isinstance(project_obj, dict) and isinstance(project_obj.get("label_config"), str):
            try:
                self.service.registry.remember(project, self.service.spec_from_config(project_obj["label_config"]))
            except LabelConfigError:
                pass  # the event is still counted; /predict reports the config problem
        if self.service.heads is not None:
            try:
                self.service.heads.on_event(action, project, body)
            except Exception as exc:  # the head is a bonus: an odd payload must not fail the event
                log.warning("project %s: %s not applied to the embedding head: %s", project, action, exc)
        if self.scheduler is None:
            return {"status": "ignored", "action": action, "reason": "training is disabled"}
        return await self.scheduler.handle_event(action, project, body)

    async def train(self, request: Request) -> dict[str, Any]:
        """Legacy ``POST /train`` (Label Studio with the webhook feature flag off): same as START_TRAINING."""
        body = await _json_body(request)
        project = _project(body.get("project"), "train")
        if self.scheduler is None:
            raise TrainingDisabled("training is disabled (TRAINING_LAUNCHER=none)")
        return await self.scheduler.handle_event("START_TRAINING", project, body)

    async def versions(self, project: Optional[str] = None) -> dict[str, Any]:
        if self.store is None:
            raise UnknownProject("no checkpoint store configured")
        projects = [_project(project, "versions")] if project else self.service.registry.known_projects()
        if not project:
            try:
                stored = await asyncio.wait_for(asyncio.to_thread(self.store.projects), STORE_READ_TIMEOUT_S)
            except Exception as exc:  # the projects the predictor knows are still listed
                log.warning("/versions: cannot list the store's projects: %s", exc or type(exc).__name__)
                stored = []
            projects = sorted(set(projects) | set(stored))
        details: dict[str, Any] = {}
        names: list[str] = []
        training = self.scheduler.status() if self.scheduler else {}
        for pid in projects:
            try:
                promoted, infos = await self._read_project(pid)
            except Exception as exc:  # one unreadable project never fails the answer for the others
                log.warning("/versions: cannot read project %s: %s", pid, exc or type(exc).__name__)
                details[str(pid)] = {
                    "error": f"cannot read the project's checkpoints: {type(exc).__name__}",
                    "serving": self._serving(pid),
                }
                continue
            entries = []
            for info in reversed(infos):
                names.append(info.version)
                entries.append(
                    {
                        "version": info.version,
                        "promoted": info.version == promoted,
                        "created_at": info.metadata.get("created_at"),
                        "metrics": info.metrics,
                        "promotion": info.metadata.get("promotion"),
                    }
                )
            details[str(pid)] = {"promoted": promoted, "versions": entries, "serving": self._serving(pid)}
            if training.get(str(pid)):
                # the active or last run, with why it is pending or failed (as /health has it)
                details[str(pid)]["training"] = training[str(pid)]
        return {"versions": names, "projects": details}

    async def _read_project(self, pid: int) -> tuple[Optional[str], list]:
        """A project's promoted version and versions, read off the event loop within STORE_READ_TIMEOUT_S;
        one read per project at a time, so a store that hangs holds one thread however often it is asked."""
        read = self._project_reads.get(pid)
        if read is None:
            store = self.store
            read = asyncio.ensure_future(asyncio.to_thread(lambda: (store.promoted(pid), store.versions(pid))))
            self._project_reads[pid] = read

            def done(future: asyncio.Future) -> None:
                self._project_reads.pop(pid, None)
                if not future.cancelled():
                    future.exception()  # retrieved: a read that ended after its request gave up logs nothing

            read.add_done_callback(done)
        return await asyncio.wait_for(asyncio.shield(read), STORE_READ_TIMEOUT_S)

    def _serving(self, project: int) -> dict[str, Any]:
        """Which kind of model serves the project here now, and its embedding head's held-out scores."""
        registry = self.service.registry
        kind, version = registry.serving_kind(project, registry.spec(project))
        answer: dict[str, Any] = {"kind": kind.value, "version": version}
        head = self.service.heads.status(project) if self.service.heads is not None else None
        if head is not None:
            answer["head"] = head
        return answer


def register_label_studio_routes(
    app: FastAPI, endpoints: LabelStudioEndpoints, auth: BasicAuth, prefix: str = ""
) -> None:
    install_error_handlers(app)
    guarded = APIRouter(prefix=prefix, dependencies=[Depends(auth)])
    open_router = APIRouter(prefix=prefix)
    open_router.add_api_route("/health", endpoints.health, methods=["GET"])
    open_router.add_api_route("/", endpoints.live, methods=["GET"])
    guarded.add_api_route("/setup", endpoints.setup, methods=["POST"])
    guarded.add_api_route("/predict", endpoints.predict, methods=["POST"])
    guarded.add_api_route("/webhook", endpoints.webhook, methods=["POST"])
    guarded.add_api_route("/train", endpoints.train, methods=["POST"])
    guarded.add_api_route("/versions", endpoints.versions, methods=["GET"])
    app.include_router(open_router)
    app.include_router(guarded)
