"""Training runs as Kubernetes Jobs (``TRAINING_LAUNCHER=kubernetes``).

The Job is rendered by ``lsbert.launcher.jobspec`` from the template (the one shipped in this package, or
``JOB_TEMPLATE``) and the cluster-specific values (``JOB_VALUES``, a YAML file the Helm chart mounts from a
ConfigMap); both are described in ``jobs/README.md``. The cluster, not this process, is the record of what
runs:

* a Job's name is deterministic, ``<release>-train-p<project>-<seq>`` (``seq`` from the version id), so a
  duplicate launch of the same run gets 409 AlreadyExists and adopts the Job instead of making a second;
* ``active_run`` lists the release's Jobs of the project by label, so a restarted predictor (or another
  replica) adopts an unfinished Job;
* when two replicas race and both create a Job for the same project, the older Job wins (by creation time,
  then sequence number, then name): the launcher that tracks the newer one deletes it and adopts the older,
  right after creating it and again on every ``poll``, so the cluster converges to one active Job per project.

Only the ``kubernetes`` Python client is used (no ``kubectl``): RBAC needed in the Job namespace is
jobs.batch create/get/list/watch/delete, pods get/list and pods/log get (see jobs/README.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Optional

from lsbert.kubeclient import REQUEST_TIMEOUT, api_message, load_api_client, resolve_namespace
from lsbert.launcher.base import Launcher, LaunchError, Run, RunPhase
from lsbert.launcher.jobspec import (
    ANNOTATION_TRIGGER,
    CONTAINER,
    active_jobs,
    condition,
    job_finished,
    job_name,
    job_phase,
    job_project,
    job_version,
    label_selector,
    last_line,
    load_job_values,
    load_template,
    owner_reference,
    parse_job_values,
    render_job,
    selection_labels,
    timestamp,
    to_v1_job,
    valid_label_value,
)
from lsbert.launcher.pending import diagnose, timed_out
from lsbert.settings import SettingsError

log = logging.getLogger(__name__)

JOB_NAME_POD_LABELS = ("batch.kubernetes.io/job-name", "job-name")
FIELD_MANAGER = "lsbert"
MESSAGE_LIMIT = 1000


class KubernetesLaunchError(LaunchError):
    """A launch the API server refused; ``status`` is the HTTP status (403 forbidden, 422 invalid, ...)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class KubernetesLauncher(Launcher):
    def __init__(
        self,
        api_client,
        namespace: str,
        *,
        values: dict[str, Any],
        template: Optional[dict] = None,
        release: str = "lsbert",
        owns_client: bool = False,
        pending_timeout: float = 0.0,
        owner_configmap: Optional[str] = None,
    ):
        from kubernetes import client

        if not valid_label_value(release):
            raise SettingsError(f"RELEASE_NAME {release!r} is not a valid label value")
        self.api_client = api_client
        self.namespace = namespace
        self.release = release
        self.template = template if template is not None else load_template()
        self.values = parse_job_values(values)
        self._owns_client = owns_client
        self.pending_timeout = float(pending_timeout or 0)
        self.owner_configmap = owner_configmap or None
        self._owner: Optional[dict[str, Any]] = None
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        to_v1_job(self.render(0, "check-0001", []))  # a bad template or values file fails at start

    @classmethod
    def from_environment(cls, settings) -> KubernetesLauncher:
        """In-cluster ServiceAccount (else KUBECONFIG); namespace POD_NAMESPACE; JOB_TEMPLATE, JOB_VALUES,
        RELEASE_NAME from the settings. Configuration errors stop the process with a message."""
        values = load_job_values(settings.job_values)
        template = load_template(settings.job_template)
        api_client = load_api_client()
        namespace = resolve_namespace(settings.pod_namespace)
        try:
            launcher = cls(
                api_client,
                namespace,
                values=values,
                template=template,
                release=settings.release_name,
                owns_client=True,
                pending_timeout=settings.training_pending_timeout,
                owner_configmap=settings.job_owner_configmap,
            )
        except LaunchError as exc:
            raise SettingsError(f"JOB_TEMPLATE/JOB_VALUES: {exc}") from None
        log.info(
            "training runs are Kubernetes Jobs in namespace %s (release %s, image %s)",
            namespace,
            settings.release_name,
            values["image"],
        )
        return launcher

    # --- rendering ---------------------------------------------------------------------------------
    def render(
        self,
        project: int,
        version: str,
        args: Iterable[str] = (),
        owner: Optional[dict[str, Any]] = None,
        trigger: str = "",
    ) -> dict[str, Any]:
        return render_job(
            self.template,
            self.values,
            release=self.release,
            namespace=self.namespace,
            project=project,
            version=version,
            args=args,
            owner=owner,
            trigger=trigger,
        )

    def owner(self) -> Optional[dict[str, Any]]:
        """The ownerReference of new Jobs: the JOB_OWNER_CONFIGMAP ConfigMap (the chart's job-values), so that
        deleting it (``helm uninstall``) deletes every training Job and its pods. Looked up once; a lookup
        that fails is logged and retried at the next launch, and the Job is created without an owner."""
        if self.owner_configmap is None or self._owner is not None:
            return self._owner
        try:
            cm = self._core.read_namespaced_config_map(
                self.owner_configmap, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as exc:
            log.warning(
                "cannot read ConfigMap %s/%s, the owner of training Jobs (%s): this Job will survive "
                "the predictor's uninstall",
                self.namespace,
                self.owner_configmap,
                api_message(exc),
            )
            return None
        meta = cm.metadata
        if meta is None or not meta.name or not meta.uid:  # an API server always sets both
            return None
        self._owner = owner_reference("ConfigMap", meta.name, meta.uid)
        return self._owner

    def job_name(self, project: int, version: str) -> str:
        return job_name(self.release, project, version)

    def dry_run(self, project: int, version: str, args: Iterable[str] = ()):
        """Server-side validation (admission, defaulting, strict fields) of the Job without creating it."""
        try:
            return self._batch.create_namespaced_job(
                self.namespace,
                to_v1_job(self.render(project, version, args)),
                dry_run="All",
                field_validation="Strict",
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except Exception as exc:
            raise self._error("validate", exc) from None

    # --- the cluster -------------------------------------------------------------------------------
    def _error(self, what: str, exc: Exception) -> LaunchError:
        from kubernetes.client.exceptions import ApiException

        status = exc.status if isinstance(exc, ApiException) else None
        hint = ""
        if status == 403:
            hint = (
                f" (the predictor's ServiceAccount lacks a permission in namespace {self.namespace}; "
                "see jobs/README.md for the Role it needs)"
            )
        return KubernetesLaunchError(f"cannot {what} training Jobs: {api_message(exc)}{hint}", status)

    def list_jobs(self, project: Optional[int] = None) -> list:
        """The release's training Jobs (of one project), as the API server has them now."""
        try:
            return self._batch.list_namespaced_job(
                self.namespace,
                label_selector=label_selector(selection_labels(self.release, project)),
                _request_timeout=REQUEST_TIMEOUT,
            ).items
        except Exception as exc:
            raise self._error("list", exc) from None

    def _read(self, name: str):
        return self._batch.read_namespaced_job(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)

    def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch.delete_namespaced_job(
                name, self.namespace, propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise self._error("delete", exc) from None

    def active_run(self, project: int) -> Optional[Run]:
        """The project's unfinished Job (the oldest, should there be several), decided from the cluster."""
        active = active_jobs(self.list_jobs(project))
        if not active:
            return None
        run = self._run_from(active[0])
        self._update(run, active[0])
        return run

    def active_runs(self) -> list[Run]:
        """One Run per project with an unfinished Job of this release (for adopting them all at start)."""
        by_project: dict[int, Any] = {}
        for job in active_jobs(self.list_jobs()):
            project = job_project(job)
            if project is not None and project not in by_project:
                by_project[project] = job
        return [self._adopt(job) for _, job in sorted(by_project.items())]

    def launch(self, project: int, version: str, args: list[str], *, trigger: str = "") -> Run:
        active = active_jobs(self.list_jobs(project))
        if active:  # another replica (or an earlier life of this one) already trains this project
            log.info(
                "project %s: Job %s is already active; adopting it instead of launching %s",
                project,
                active[0].metadata.name,
                version,
            )
            return self._adopt(active[0])
        from kubernetes.client.exceptions import ApiException

        body = to_v1_job(self.render(project, version, args, owner=self.owner(), trigger=trigger))
        name = body.metadata.name
        try:
            job = self._batch.create_namespaced_job(
                self.namespace,
                body,
                field_validation="Strict",
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 409:
                raise self._error("create", exc) from None
            try:
                job = self._read(name)
            except Exception as read_exc:
                raise self._error("read", read_exc) from None
            if job_project(job) != project or job_version(job) != version:
                raise KubernetesLaunchError(
                    f"a Job named {name} already exists for project {job_project(job)} version "
                    f"{job_version(job)!r}, not for project {project} version {version!r}",
                    409,
                ) from None
            log.info("project %s: Job %s already exists; adopting it", project, name)
            return self._adopt(job)
        except Exception as exc:
            raise self._error("create", exc) from None
        log.info("project %s: created Job %s/%s for %s", project, self.namespace, name, version)
        run = self._run_from(job)
        self._resolve_race(run)
        return run

    def _adopt(self, job) -> Run:
        run = self._run_from(job)
        self._update(run, job)
        return run

    def _resolve_race(self, run: Run, jobs: Optional[list] = None) -> bool:
        """If another active Job of the project is older than ours, delete ours and track that one.

        Every replica applies the same order to the same Jobs, so they all keep the same one."""
        try:
            active = active_jobs(jobs if jobs is not None else self.list_jobs(run.project))
        except LaunchError as exc:
            log.warning("project %s: cannot check for concurrent Jobs: %s", run.project, exc)
            return False
        if not active or active[0].metadata.name == run.run_id:
            return False
        if not any(j.metadata.name == run.run_id for j in active):
            return False  # ours has finished or is gone: nothing to resolve
        winner = active[0]
        log.warning(
            "project %s: Jobs %s and %s raced; keeping the older %s and deleting %s",
            run.project,
            winner.metadata.name,
            run.run_id,
            winner.metadata.name,
            run.run_id,
        )
        self._delete(run.run_id)
        self._become(run, winner)
        return True

    def _become(self, run: Run, job) -> None:
        """Make ``run`` (the scheduler holds this object) track ``job`` instead."""
        adopted = self._adopt(job)
        for attr in ("version", "run_id", "phase", "started_at", "finished_at", "message", "log", "extra", "trigger"):
            setattr(run, attr, getattr(adopted, attr))

    def poll(self, run: Run) -> Run:
        if run.phase.finished:
            return run
        from kubernetes.client.exceptions import ApiException

        jobs = self.list_jobs(run.project)  # raises on API errors; the scheduler tries again next tick
        job = next((j for j in jobs if j.metadata.name == run.run_id), None)
        if job is None:
            try:
                job = self._read(run.run_id)
            except ApiException as exc:
                if exc.status != 404:
                    raise self._error("read", exc) from None
                active = active_jobs(jobs)
                if active:  # ours lost a race (another replica deleted it): follow the Job that won
                    log.warning(
                        "project %s: Job %s is gone; following the active Job %s",
                        run.project,
                        run.run_id,
                        active[0].metadata.name,
                    )
                    self._become(run, active[0])
                    return run
                run.phase, run.finished_at = RunPhase.FAILED, time.time()
                run.message = f"Job {self.namespace}/{run.run_id} was deleted before it finished"
                return run
        if not job_finished(job) and self._resolve_race(run, jobs):
            return run
        self._update(run, job)
        return run

    def close(self) -> None:
        """Jobs keep running in the cluster (a restarted predictor adopts them); only the client is closed."""
        if self._owns_client:
            try:
                self.api_client.close()
            except Exception:  # pragma: no cover
                pass

    # --- Run <- Job ------------------------------------------------------------------------------
    def _run_from(self, job) -> Run:
        name = job.metadata.name
        project = job_project(job)
        return Run(
            project=project if project is not None else -1,
            version=job_version(job),
            run_id=name,
            phase=RunPhase.PENDING,
            started_at=timestamp(job.metadata.creation_timestamp) or time.time(),
            log=f"kubectl logs -f job/{name} -n {self.namespace}",
            extra={"namespace": self.namespace, "job": name, "uid": job.metadata.uid},
            trigger=(job.metadata.annotations or {}).get(ANNOTATION_TRIGGER, ""),
        )

    def _update(self, run: Run, job) -> None:
        phase = job_phase(job)
        run.phase = phase
        status = job.status
        if status is not None and status.start_time is not None:
            run.started_at = timestamp(status.start_time)
        if phase is RunPhase.SUCCEEDED:
            run.finished_at = (
                timestamp(status.completion_time)
                or timestamp(condition(job, "Complete").last_transition_time)
                or time.time()
            )
            run.message = ""
        elif phase is RunPhase.FAILED:
            cond = condition(job, "Failed")
            run.finished_at = timestamp(cond.last_transition_time) or time.time()
            run.message = self._failure_message(job, cond)
        elif phase is RunPhase.PENDING:
            run.message = self._pending_message(job)
            if self._pending_too_long(job):
                log.error(
                    "project %s: Job %s did not start within %ss (%s); deleting it",
                    run.project,
                    job.metadata.name,
                    int(self.pending_timeout),
                    run.message or "no reason given",
                )
                try:
                    self._delete(job.metadata.name)
                except Exception as exc:  # the run is failed either way; a later poll finds no active Job
                    log.warning("project %s: cannot delete Job %s: %s", run.project, job.metadata.name, exc)
                run.phase, run.finished_at = RunPhase.FAILED, time.time()
                run.message = timed_out(run.message, self.pending_timeout)
        else:
            run.message = ""

    def _pods(self, job_name_: str) -> list:
        for label in JOB_NAME_POD_LABELS:
            try:
                pods = self._core.list_namespaced_pod(
                    self.namespace, label_selector=f"{label}={job_name_}", _request_timeout=REQUEST_TIMEOUT
                ).items
            except Exception as exc:
                log.debug("cannot list the pods of Job %s: %s", job_name_, exc)
                return []
            if pods:
                return sorted(pods, key=lambda p: timestamp(p.metadata.creation_timestamp) or 0.0)
        return []

    def _failure_message(self, job, cond) -> str:
        parts = [f"{cond.reason or 'Failed'}: {cond.message or 'the Job failed'}"]
        pods = self._pods(job.metadata.name)
        failed = [p for p in pods if p.status is not None and p.status.phase == "Failed"] or pods
        if failed:
            pod = failed[-1]
            term = None
            for status in (pod.status.container_statuses or []) if pod.status else []:
                if status.name == CONTAINER or term is None:
                    state = status.state
                    if state is not None and state.terminated is not None:
                        term = state.terminated
            if term is not None:
                parts.append(f"exit code {term.exit_code}" + (f" ({term.reason})" if term.reason else ""))
            line = self._last_log_line(pod.metadata.name) or (last_line(term.message) if term is not None else "")
            if line:
                parts.append(line)
        return "; ".join(parts)[:MESSAGE_LIMIT]

    def _last_log_line(self, pod_name: str) -> str:
        try:
            text = self._core.read_namespaced_pod_log(
                pod_name, self.namespace, container=CONTAINER, tail_lines=20, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as exc:  # no pods/log permission, pod gone, node unreachable: the rest still helps
            log.debug("cannot read the log of pod %s: %s", pod_name, exc)
            return ""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return last_line(text if isinstance(text, str) else "")

    def _pending_message(self, job) -> str:
        """Why a Job has no running pod yet (see ``lsbert.launcher.pending`` for the reasons)."""
        pods = self._pods(job.metadata.name)
        job_events = [] if pods else self._events("Job", job.metadata.name)
        pod_events = self._events("Pod", pods[-1].metadata.name) if pods else []
        return diagnose(job, pods, job_events, pod_events)

    def _events(self, kind: str, name: str) -> list:
        """Events about one object; [] without the events permission (the reason is then less precise)."""
        try:
            return self._core.list_namespaced_event(
                self.namespace,
                field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
                _request_timeout=REQUEST_TIMEOUT,
            ).items
        except Exception as exc:
            log.debug("cannot list the events of %s %s: %s", kind, name, exc)
            return []

    def _pending_too_long(self, job, now: Optional[float] = None) -> bool:
        """Pending longer than TRAINING_PENDING_TIMEOUT since it was created or last resumed (a suspended
        Job waits in a queue and is never timed out)."""
        if not self.pending_timeout or (job.spec is not None and job.spec.suspend):
            return False
        status = job.status
        since = (timestamp(status.start_time) if status is not None else None) or timestamp(
            job.metadata.creation_timestamp
        )
        return since is not None and (now or time.time()) - since > self.pending_timeout
