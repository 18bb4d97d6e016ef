"""``ROLLOUT_STRATEGY=restart``: KServe rolls the predictor pods to newly promoted checkpoints.

A predictor annotation on the InferenceService names every promoted version
(``lsbert.io/checkpoints: "p3=ft-0004,p5=ft-0002"``); KServe copies predictor annotations into the pod
template, so changing it makes the predictor Deployment roll, and the new pods load the promoted pointers
at start. The annotation is changed with a JSON merge patch carrying the resourceVersion it was computed
from (two writers cannot interleave: the later one gets 409 and recomputes).

Completion is judged from the predictor Deployment (``<isvc>-predictor`` in KServe's Standard mode), never
from the InferenceService's Ready condition, which stays True during a rolling update and whose
observedGeneration is the Deployment's (KServe copies it from the Deployment's status):

* ``metadata.generation == status.observedGeneration``;
* ``updatedReplicas == replicas == availableReplicas`` (and == ``spec.replicas``);
* condition ``Progressing`` with reason ``NewReplicaSetAvailable``;
* optionally the pod template carries the expected annotation value (so the old, finished rollout of the
  previous template is not mistaken for the new one before KServe has updated the Deployment);
* ``Progressing`` reason ``ProgressDeadlineExceeded`` is a failure (RolloutFailed).

RBAC in the predictor namespace: inferenceservices.serving.kserve.io get/patch and deployments.apps get
(both can be limited with resourceNames to the release's InferenceService and ``<isvc>-predictor``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping, Optional, cast

from lsbert.kubeclient import REQUEST_TIMEOUT, load_api_client, resolve_namespace
from lsbert.settings import SettingsError

log = logging.getLogger(__name__)

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
ANNOTATION = "lsbert.io/checkpoints"
MERGE_PATCH = "application/merge-patch+json"


class RolloutFailed(RuntimeError):
    """The predictor Deployment reported ProgressDeadlineExceeded (or the rollout timed out)."""


def checkpoints_id(pointers: Mapping[int, Optional[str]]) -> str:
    """``p3=ft-0004,p5=ft-0002``: every project with a promoted version, by project id."""
    return ",".join(f"p{int(p)}={v}" for p, v in sorted(pointers.items()) if v)


def predictor_deployment_name(isvc_name: str, predictor_name: Optional[str] = None) -> str:
    """KServe Standard mode: ``<isvc>-predictor``, or ``<isvc>-<name>-predictor`` with ``predictor.name``."""
    return f"{isvc_name}-{predictor_name}-predictor" if predictor_name else f"{isvc_name}-predictor"


def _client(api_client):
    if api_client is not None:
        return api_client, False
    return load_api_client(), True


def read_checkpoints(isvc_name: str, namespace: str, *, api_client=None) -> tuple[Optional[str], str]:
    """(the annotation's current value or None, the InferenceService's resourceVersion)."""
    from kubernetes import client

    api, owned = _client(api_client)
    try:
        isvc = cast(
            dict[str, Any],
            client.CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, isvc_name, _request_timeout=REQUEST_TIMEOUT
            ),
        )
    finally:
        if owned:
            api.close()
    annotations = ((isvc.get("spec") or {}).get("predictor") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION), (isvc.get("metadata") or {}).get("resourceVersion", "")


def roll(
    isvc_name: str, namespace: str, checkpoint_id: str, *, api_client=None, resource_version: Optional[str] = None
) -> bool:
    """Merge-patch ``spec.predictor.annotations["lsbert.io/checkpoints"] = checkpoint_id``.

    Returns False when the annotation already has that value (nothing to roll). With ``resource_version``
    the patch only applies to that version of the object (409 Conflict otherwise)."""
    from kubernetes import client

    api, owned = _client(api_client)
    try:
        current, rv = read_checkpoints(isvc_name, namespace, api_client=api)
        if current == checkpoint_id:
            return False
        body: dict[str, Any] = {"spec": {"predictor": {"annotations": {ANNOTATION: checkpoint_id}}}}
        body["metadata"] = {"resourceVersion": resource_version or rv}
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            isvc_name,
            body,
            _content_type=MERGE_PATCH,
            field_manager="lsbert",
            _request_timeout=REQUEST_TIMEOUT,
        )
        log.info(
            "InferenceService %s/%s: %s %r -> %r (KServe rolls the predictor)",
            namespace,
            isvc_name,
            ANNOTATION,
            current,
            checkpoint_id,
        )
        return True
    finally:
        if owned:
            api.close()


def _get(obj: Any, snake: str, camel: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(camel, obj.get(snake))
    return getattr(obj, snake, None)


def deployment_rollout(deployment: Any, checkpoint_id: Optional[str] = None) -> tuple[bool, str]:
    """(finished, why not) for a Deployment (client model or dict); RolloutFailed on a progress deadline."""
    meta = _get(deployment, "metadata", "metadata")
    spec = _get(deployment, "spec", "spec")
    status = _get(deployment, "status", "status")
    name = _get(meta, "name", "name") or "?"
    conditions = _get(status, "conditions", "conditions") or []
    progressing = next((c for c in conditions if _get(c, "type", "type") == "Progressing"), None)
    reason = _get(progressing, "reason", "reason")
    if reason == "ProgressDeadlineExceeded":
        message = _get(progressing, "message", "message") or ""
        raise RolloutFailed(f"Deployment {name}: ProgressDeadlineExceeded: {message}".rstrip(": "))
    if checkpoint_id is not None:
        template_meta = _get(_get(spec, "template", "template"), "metadata", "metadata")
        annotations = _get(template_meta, "annotations", "annotations") or {}
        if annotations.get(ANNOTATION) != checkpoint_id:
            have = annotations.get(ANNOTATION)
            return False, f"pod template has {ANNOTATION}={have!r}, waiting for {checkpoint_id!r}"
    generation = _get(meta, "generation", "generation")
    observed = _get(status, "observed_generation", "observedGeneration")
    if status is None or observed is None or generation is None or observed < generation:
        return False, f"generation {generation} not yet observed (observedGeneration {observed})"
    desired = _get(spec, "replicas", "replicas")
    desired = 1 if desired is None else desired
    replicas = _get(status, "replicas", "replicas") or 0
    updated = _get(status, "updated_replicas", "updatedReplicas") or 0
    available = _get(status, "available_replicas", "availableReplicas") or 0
    if not (updated == replicas == available == desired):
        return False, (f"replicas {replicas}, updated {updated}, available {available}, desired {desired}")
    if reason != "NewReplicaSetAvailable":
        return False, f"Progressing reason {reason!r}, waiting for NewReplicaSetAvailable"
    return True, ""


def rollout_finished(
    deployment_name: str, namespace: str, *, api_client=None, checkpoint_id: Optional[str] = None
) -> bool:
    """True when the Deployment has finished rolling out (see the module doc); False while it is in
    progress or not there yet; RolloutFailed on ProgressDeadlineExceeded."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api, owned = _client(api_client)
    try:
        deployment = client.AppsV1Api(api).read_namespaced_deployment(
            deployment_name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    finally:
        if owned:
            api.close()
    done, why = deployment_rollout(deployment, checkpoint_id)
    if not done:
        log.debug("Deployment %s/%s: %s", namespace, deployment_name, why)
    return done


def wait_for_rollout(
    deployment_name: str,
    namespace: str,
    *,
    api_client=None,
    checkpoint_id: Optional[str] = None,
    timeout: float = 900.0,
    interval: float = 5.0,
) -> None:
    """Block until ``rollout_finished``; RolloutFailed on a progress deadline or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not rollout_finished(deployment_name, namespace, api_client=api_client, checkpoint_id=checkpoint_id):
        if time.monotonic() > deadline:
            raise RolloutFailed(
                f"Deployment {namespace}/{deployment_name} did not finish rolling out in {timeout:.0f}s"
            )
        time.sleep(interval)


class RestartRollout:
    """The scheduler's ``on_finished`` callback for ROLLOUT_STRATEGY=restart.

    After every run (succeeded or not) it reads all promoted pointers from the store and, if the set changed,
    patches the InferenceService; a background task then follows the predictor Deployment and logs the end
    of the rollout (or its failure), so the scheduler is never held up by a rolling update."""

    def __init__(
        self,
        api_client,
        namespace: str,
        isvc_name: str,
        store,
        *,
        deployment_name: Optional[str] = None,
        follow: bool = True,
        poll_seconds: float = 5.0,
        timeout: float = 1800.0,
    ):
        self.api_client = api_client
        self.namespace = namespace
        self.isvc_name = isvc_name
        self.store = store
        self.deployment_name = deployment_name or predictor_deployment_name(isvc_name)
        self.follow = follow
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.last_checkpoints: Optional[str] = None
        self.last_result: Optional[str] = None  # "finished" | "failed: ..." of the last followed rollout
        self._lock = asyncio.Lock()
        self._follower: Optional[asyncio.Task] = None

    @classmethod
    def from_environment(cls, settings, store, api_client=None, **kwargs) -> RestartRollout:
        """ISVC_NAME and POD_NAMESPACE from the settings; the API client of the pod's ServiceAccount (or
        KUBECONFIG) unless one is given (e.g. the KubernetesLauncher's ``api_client``)."""
        if not settings.isvc_name:
            raise SettingsError("ROLLOUT_STRATEGY=restart needs ISVC_NAME (the InferenceService to patch)")
        return cls(
            api_client if api_client is not None else load_api_client(),
            resolve_namespace(settings.pod_namespace),
            settings.isvc_name,
            store,
            **kwargs,
        )

    def _pointers(self) -> dict[int, Optional[str]]:
        return {project: self.store.promoted(project) for project in self.store.projects()}

    def _sync(self) -> tuple[str, bool]:
        from kubernetes.client.exceptions import ApiException

        for attempt in range(5):
            # The InferenceService first, then the pointers: a writer that patched after our read makes our
            # patch fail with 409; one that patched before read older (or the same) pointers than we do.
            current, rv = read_checkpoints(self.isvc_name, self.namespace, api_client=self.api_client)
            wanted = checkpoints_id(self._pointers())
            if current == wanted or (not wanted and current is None):
                return wanted, False
            try:
                return wanted, roll(
                    self.isvc_name, self.namespace, wanted, api_client=self.api_client, resource_version=rv
                )
            except ApiException as exc:
                if exc.status != 409 or attempt == 4:
                    raise
                log.info("InferenceService %s changed while patching; retrying", self.isvc_name)
        raise AssertionError("unreachable")

    async def sync(self) -> Optional[str]:
        """Patch the InferenceService if the promoted versions differ from its annotation; returns the new
        value when it patched, None when nothing changed."""
        async with self._lock:
            wanted, changed = await asyncio.to_thread(self._sync)
        self.last_checkpoints = wanted
        if changed and self.follow:
            if self._follower is not None and not self._follower.done():
                self._follower.cancel()
            self._follower = asyncio.get_running_loop().create_task(self._follow(wanted), name="lsbert-kserve-rollout")
        return wanted if changed else None

    async def on_run_finished(self, project: int, run: Any = None) -> Optional[str]:
        return await self.sync()

    __call__ = on_run_finished

    async def run_forever(self, interval: float) -> None:
        """``sync`` now and every ``interval`` seconds: promotions made by runs this process did not follow
        (it restarted during the run, another replica launched it, ``lsbert train`` by hand) still roll."""
        while True:
            try:
                await self.sync()
            except Exception as exc:
                log.warning("cannot sync the InferenceService %s with the promoted versions: %s", self.isvc_name, exc)
            await asyncio.sleep(interval)

    async def _follow(self, checkpoint_id: str) -> None:
        try:
            await asyncio.to_thread(
                wait_for_rollout,
                self.deployment_name,
                self.namespace,
                api_client=self.api_client,
                checkpoint_id=checkpoint_id,
                timeout=self.timeout,
                interval=self.poll_seconds,
            )
        except RolloutFailed as exc:
            self.last_result = f"failed: {exc}"
            log.error("rollout of %s to %s failed: %s", self.isvc_name, checkpoint_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_result = f"unknown: {exc}"
            log.warning("cannot follow the rollout of %s (%s): %s", self.isvc_name, self.deployment_name, exc)
        else:
            self.last_result = "finished"
            log.info("rollout of %s to %s finished", self.isvc_name, checkpoint_id)

    async def wait(self) -> Optional[str]:
        """Wait for the rollout being followed (tests, shutdown); returns last_result."""
        if self._follower is not None:
            try:
                await self._follower
            except asyncio.CancelledError:
                pass
        return self.last_result

    def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
