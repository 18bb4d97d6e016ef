"""The chart's InferenceService path on the real node, reconciled by the real KServe controller.

`helm install` with ``kserve.enabled=true`` and ``rollout.strategy=restart``: KServe's controller (built from
source, ``tests/kserve/``) turns the InferenceService into the Deployment and Service ``<fullname>-predictor``,
whose pod runs the predictor image on the real kubelet node. A real Label Studio connects through that Service
(ClusterIP, port 80, basic auth), Start Training runs a Job, and the new checkpoint reaches Label Studio only
by KServe rolling the predictor pods: the release's ``rollout.pollSeconds`` is far longer than a test, so a
running pod never swaps in-process; only pods started after the InferenceService patch load the new version.

While KServe rolls the pods (the chart's RollingUpdate with maxSurge 1 / maxUnavailable 0, one replica), a
steady stream of ``/predict`` calls to the Service and Label Studio's "retrieve predictions" action must not see
a single failure. ``helm upgrade`` afterwards rolls again and keeps serving the promoted versions.

Runs once per pinned KServe version (``LSBERT_KSERVE_VERSIONS`` narrows them); the figures are printed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import requests
from kubernetes import client

from lsbert.rollout.kserve import (
    ANNOTATION,
    checkpoints_id,
    predictor_deployment_name,
    rollout_finished,
)
from tests.cluster import harness, loop
from tests.k8s.cluster import ControlPlane
from tests.k8s.node import NODE_NAME
from tests.kserve.controller import KServeController, standard_mode_name
from tests.support.labelstudio import import_texts

pytestmark = [pytest.mark.cluster, pytest.mark.kserve, pytest.mark.k8s, pytest.mark.labelstudio, pytest.mark.slow]

RELEASE = "lsbert"  # the fullname is the release name: it contains "lsbert"
PREDICTOR = predictor_deployment_name(RELEASE)  # KServe's Deployment and Service
ISVC = ("serving.kserve.io", "v1beta1")
# Longer than the module runs: a pod never picks up a promotion by itself, only the rollout delivers it.
POLL_SECONDS = 3600
ROLL_TIMEOUT = 420.0
# The stream: one task per call, a call every STREAM_INTERVAL seconds, none may take longer than CALL_TIMEOUT.
STREAM_INTERVAL = 0.25
CALL_TIMEOUT = 30.0
LS_RETRIEVE_INTERVAL = 3.0


def _isvc(cp: ControlPlane, ns: str) -> dict[str, Any]:
    with cp.api_client() as api:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(*ISVC, ns, "inferenceservices", RELEASE)


def _isvc_checkpoints(cp: ControlPlane, ns: str) -> str | None:
    return ((_isvc(cp, ns)["spec"]["predictor"].get("annotations")) or {}).get(ANNOTATION)


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def _deployment(cp: ControlPlane, ns: str) -> Any:
    with cp.api_client() as api:
        return client.AppsV1Api(api).read_namespaced_deployment(PREDICTOR, ns)


def _replica_sets(cp: ControlPlane, ns: str) -> dict[str, Any]:
    with cp.api_client() as api:
        apps = client.AppsV1Api(api)
        uid = apps.read_namespaced_deployment(PREDICTOR, ns).metadata.uid
        return {
            rs.metadata.name: rs
            for rs in apps.list_namespaced_replica_set(ns).items
            if any(ref.uid == uid for ref in rs.metadata.owner_references or [])
        }


def _wait_rolled(release: harness.Release, checkpoint_id: str | None, what: str) -> float:
    """Waits until the predictor Deployment has finished rolling out (judged as the predictor's restart rollout
    judges it, from the Deployment status) and no old pod is left; returns the seconds it took."""
    t0 = time.monotonic()
    with release.cp.api_client() as api:

        def done() -> bool:
            if not rollout_finished(PREDICTOR, release.namespace, api_client=api, checkpoint_id=checkpoint_id):
                return False
            return len(release.pods("app.kubernetes.io/component=predictor")) == 1  # terminating ones included

        try:
            harness.wait_for(done, ROLL_TIMEOUT, what, interval=1)
        except TimeoutError:
            raise AssertionError(f"{what}: not finished\n{harness.describe(release)}") from None
    return time.monotonic() - t0


def _live_predictor_pods(release: harness.Release) -> list[dict[str, Any]]:
    return release.predictor_pods()


@pytest.fixture(scope="module")
def kserve_release(
    kserve_controller: KServeController,
    control_plane: ControlPlane,
    real_node,
    cluster_images,
    node_label_studio,
    ls_api_key,
    node_baseline,
    tmp_path_factory,
) -> Iterator[harness.Release]:
    """The chart with kserve.enabled=true and the restart rollout; checkpoints on a PVC bound to a local volume."""
    ns = f"lsb-kserve-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    storage_class = f"{ns}-local"
    volume = real_node.dir / "volumes" / ns
    harness.create_hostpath_pv(control_plane, ns, volume, storage_class)
    values = harness.chart_values(
        cluster_images,
        ls_url=node_label_studio.url,
        api_key=ls_api_key,
        baseline_dir=node_baseline,
        storage={"type": "pvc", "pvc": {"storageClassName": storage_class, "size": "2Gi", "keep": False}},
        extra={"kserve": {"enabled": True}, "rollout": {"strategy": "restart", "pollSeconds": POLL_SECONDS}},
        # These tests are about how KServe rolls a new checkpoint in, not whether it beats the embedding head
        # the annotations already serve (the promotion gate's own tests cover that): every fine-tune promotes.
        settings={"PROMOTION_MARGIN": 1.0},
    )
    work = tmp_path_factory.mktemp("kserve-release")
    t0 = time.monotonic()
    release = harness.install(control_plane, ns, RELEASE, values, work, wait=False)
    release.service = PREDICTOR
    release.pvs.append(ns)
    release.volume = volume  # type: ignore[attr-defined]
    release.controller = kserve_controller  # type: ignore[attr-defined]
    try:
        _wait_rolled(release, None, "the first predictor pod Ready")
        release.ready_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        yield release
    finally:
        if os.environ.get("LSBERT_K8S_KEEP") != "1":
            # While the controller still runs: its finalizer removes the Deployment and the Service.
            control_plane.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "2m", check=False, timeout=150)
            control_plane.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s", check=False, timeout=150)
            control_plane.kubectl("delete", "pv", ns, "--wait=false", check=False)


@dataclass
class PredictStream:
    """Steady traffic through the predictor Service while something rolls: direct ``/predict`` calls (one task
    each, every STREAM_INTERVAL s) and Label Studio's "retrieve predictions" action (every LS_RETRIEVE_INTERVAL s).
    Every call is recorded; a call fails on an exception, a non-200 status, a result count other than one or
    taking longer than CALL_TIMEOUT."""

    release: harness.Release
    ls: Any
    project: Any
    task_ids: list[int]
    texts: list[str]
    calls: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, model_version)
    failures: list[str] = field(default_factory=list)
    ls_calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> PredictStream:
        self._threads = [
            threading.Thread(target=self._predict, daemon=True),
            threading.Thread(target=self._retrieve, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CALL_TIMEOUT + 200)

    def _predict(self) -> None:
        url = self.release.service_url() + "/predict"
        i = 0
        with requests.Session() as session:
            session.auth = harness.basic_auth()
            while not self._stop.is_set():
                task_id, text = self.task_ids[i % len(self.task_ids)], self.texts[i % len(self.texts)]
                body = {
                    "tasks": [{"id": task_id, "data": {"text": text}}],
                    "project": f"{self.project.id}.0",
                    "label_config": self.project.label_config,
                }
                t0 = time.monotonic()
                try:
                    resp = session.post(url, json=body, timeout=CALL_TIMEOUT)
                    results = resp.json().get("results") if resp.status_code == 200 else None
                    if resp.status_code != 200 or not results or len(results) != 1:
                        self.failures.append(f"/predict {resp.status_code}: {resp.text[:200]}")
                    else:
                        self.calls.append((time.monotonic(), results[0]["model_version"]))
                except Exception as exc:  # connection refused or reset, timeout: what the roll must not cause
                    self.failures.append(f"/predict after {time.monotonic() - t0:.1f}s: {exc!r}")
                i += 1
                self._stop.wait(STREAM_INTERVAL)

    def _retrieve(self) -> None:
        while not self._stop.wait(LS_RETRIEVE_INTERVAL):
            try:
                resp = self.ls.request(
                    "POST",
                    f"/api/dm/actions?id=retrieve_tasks_predictions&project={self.project.id}",
                    json={"selectedItems": {"all": False, "included": self.task_ids[:3]}},
                    timeout=CALL_TIMEOUT,
                )
                if resp.status_code != 200:
                    self.failures.append(f"Label Studio retrieve {resp.status_code}: {resp.text[:200]}")
                self.ls_calls += 1
            except Exception as exc:
                self.failures.append(f"Label Studio retrieve: {exc!r}")

    def versions_after(self, t: float) -> set[str]:
        return {v for when, v in self.calls if when >= t}

    def summary(self) -> str:
        seen: list[str] = []
        for _, v in self.calls:
            if not seen or seen[-1] != v:
                seen.append(v)
        return (
            f"{len(self.calls)} /predict calls ok, {self.ls_calls} Label Studio retrieves, "
            f"{len(self.failures)} failures; versions in order: {' -> '.join(seen)}"
        )


def _ls_backend_ok(ls, backend_id: int) -> None:
    state = ls.request("GET", f"/api/ml/{backend_id}").json()
    assert state["state"] == "CO" and not state.get("error_message"), state


# ------------------------------------------------------------------------------------------ tests


def test_inference_service_serves_label_studio_from_the_real_node_and_trains(
    kserve_release, node_label_studio, tmp_path
):
    """KServe makes the predictor Deployment + Service; its pod runs on the real node; Label Studio connects through
    that Service; Start Training's Job writes the PVC and the new version arrives by KServe rolling the pod."""
    rel, ls = kserve_release, node_label_studio
    cp, ns = rel.cp, rel.namespace
    controller: KServeController = rel.controller

    def ready() -> dict[str, Any] | None:
        obj = _isvc(cp, ns)
        return obj if _condition(obj, "Ready").get("status") == "True" else None

    isvc = harness.wait_for(ready, 120, "InferenceService Ready")
    assert isvc["status"]["deploymentMode"] == standard_mode_name(controller.version)
    with cp.api_client() as api:
        deployment = client.AppsV1Api(api).read_namespaced_deployment(PREDICTOR, ns)
        service = client.CoreV1Api(api).read_namespaced_service(PREDICTOR, ns)
    for obj in (deployment, service):
        assert any(
            ref.kind == "InferenceService" and ref.uid == isvc["metadata"]["uid"] and ref.controller
            for ref in obj.metadata.owner_references or []
        ), obj.metadata
    strategy = deployment.spec.strategy
    assert strategy.type == "RollingUpdate"
    assert (strategy.rolling_update.max_surge, strategy.rolling_update.max_unavailable) == (1, 0)
    (port,) = service.spec.ports
    assert port.port == 80 and service.spec.type == "ClusterIP"
    # The chart's preStop drain reached the pod template (KServe's CRD schema keeps `lifecycle`).
    rendered = json.loads(cp.kubectl("get", "deployment", PREDICTOR, "-n", ns, "-o", "json").stdout)
    (container,) = [c for c in rendered["spec"]["template"]["spec"]["containers"] if c["name"] == "kserve-container"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"], container.get("lifecycle")
    # No plain-Deployment objects of the chart beside KServe's.
    assert not cp.kubectl("get", "deployment", RELEASE, "-n", ns, "--ignore-not-found", "-o", "name").stdout.strip()

    pod = harness.wait_ready_predictor(rel)
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["metadata"]["labels"].get("serving.kserve.io/inferenceservice") == RELEASE
    assert harness.processes_under_shim("lsbert serve"), "no `lsbert serve` process runs under a containerd shim"
    assert rel.service_url() == f"http://{service.spec.cluster_ip}:80"
    assert rel.notes_url().startswith(f"http://{PREDICTOR}.{ns}.svc.cluster.local"), rel.notes_url()
    first_pod = pod["metadata"]["name"]
    sets_before = set(_replica_sets(cp, ns))
    roll: dict[str, float] = {}

    def settle(project, after: str) -> None:
        roll["seconds"] = _wait_rolled(rel, f"p{project.id}={after}", "KServe rolling to the new checkpoint")

    figures = loop.full_loop(ls, rel, tmp_path, title="kserve training pvc", swap_timeout=ROLL_TIMEOUT, settle=settle)
    project, after = figures["project"], figures["after"]
    wanted = f"p{project.id}={after}"
    # The predictor patched its InferenceService; KServe carried the annotation into a new ReplicaSet.
    assert _isvc_checkpoints(cp, ns) == wanted
    assert _deployment(cp, ns).spec.template.metadata.annotations[ANNOTATION] == wanted
    new_sets = set(_replica_sets(cp, ns)) - sets_before
    assert len(new_sets) == 1, new_sets
    pods = _live_predictor_pods(rel)
    assert [p["metadata"]["annotations"].get(ANNOTATION) for p in pods] == [wanted]
    assert pods[0]["metadata"]["name"] != first_pod and pods[0]["spec"]["nodeName"] == NODE_NAME
    files = [p for p in rel.volume.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files), [str(p) for p in files][:20]
    rel.first = {"project": project, "version": after}  # type: ignore[attr-defined]
    print(
        f"\nkserve {controller.version}: helm install -> predictor Ready in {rel.ready_seconds:.0f}s; "
        f"Start Training -> new version served in {figures['loop_seconds']:.0f}s, of which the roll "
        f"(first new answer -> rollout complete) {roll['seconds']:.0f}s ({figures['before']} -> {after})"
    )


def test_restart_rollout_rolls_a_new_replica_set_and_no_predict_call_fails(kserve_release, node_label_studio):
    """A second project's promoted checkpoint: the predictor patches the InferenceService, KServe rolls a new
    ReplicaSet, completion is read from the Deployment, and a steady stream of predict calls through the
    Service and through Label Studio sees no failure; Label Studio then stores the new version."""
    rel, ls = kserve_release, node_label_studio
    cp, ns = rel.cp, rel.namespace
    first = getattr(rel, "first", None)
    if first is None:
        pytest.fail("needs the first test's trained project (run the module in order)", pytrace=False)
    controller: KServeController = rel.controller

    n_train, n_check = 160, 20
    ctx = loop.connect(ls, rel, "kserve restart rollout", n_train + n_check, seed=11)
    project, task_ids, truth = ctx["project"], ctx["task_ids"], ctx["truth"]
    train_ids, check_ids = task_ids[:n_train], task_ids[n_train:]
    before = loop.served_version(rel, project)
    loop.retrieve_predictions(ls, project.id, check_ids)
    assert loop.stored_versions(ls, check_ids) == {before}
    old_sets = set(_replica_sets(cp, ns))
    old_pods = {p["metadata"]["name"] for p in _live_predictor_pods(rel)}
    loop.annotate(ls, train_ids, truth)

    texts = [t["data"]["text"] for t in (ls.request("GET", f"/api/tasks/{i}").json() for i in check_ids[:5])]
    stream = PredictStream(rel, ls, project, check_ids[:5], texts).start()
    try:
        t_train = time.monotonic()
        ls.request("POST", f"/api/ml/{ctx['backend']['id']}/train", json={"use_ground_truth": False})
        job = loop.wait_job(rel, project.id)["metadata"]["name"]

        def patched() -> str | None:
            value = _isvc_checkpoints(cp, ns) or ""
            return value if f"p{project.id}=" in value else None

        try:
            wanted = harness.wait_for(patched, 600, "the predictor to patch the InferenceService", interval=1)
        except TimeoutError:
            raise AssertionError(f"no patch; /health {loop.health(rel)}\n{harness.describe(rel)}") from None
        t_patch = time.monotonic()
        after = wanted.split(f"p{project.id}=", 1)[1].split(",", 1)[0]
        # Both projects' promoted versions are in the annotation: the new pods load both.
        assert wanted == checkpoints_id({first["project"].id: first["version"], project.id: after})
        roll_seconds = _wait_rolled(rel, wanted, "KServe rolling to the second project's checkpoint")
        t_rolled = time.monotonic()
        time.sleep(5)  # a little traffic after the old pod is gone
    finally:
        stream.stop()
    print(
        f"\nkserve {controller.version} restart rollout: Start Training -> patch {t_patch - t_train:.0f}s "
        f"(Job {job}), patch -> rollout complete {roll_seconds:.0f}s; stream: {stream.summary()}"
    )
    assert not stream.failures, stream.failures[:10]
    assert len(stream.calls) >= 100 and stream.ls_calls >= 10, stream.summary()
    # answered before the roll (zero-shot, or the head the annotations fitted) and after it, by the new version
    seen = {v for _, v in stream.calls}
    assert after in seen and any(not loop.is_finetuned(v) for v in seen), stream.summary()
    assert stream.versions_after(t_rolled) == {after}, stream.summary()
    # Before the patch only the old pod answered, never with the new checkpoint (it does not swap by itself).
    assert all(not loop.is_finetuned(v) for w, v in stream.calls if w < t_patch), stream.summary()

    # A new ReplicaSet with the annotation took over; the old one is scaled to zero; no old pod is left.
    sets = _replica_sets(cp, ns)
    new = [rs for name, rs in sets.items() if name not in old_sets]
    assert len(new) == 1 and new[0].spec.template.metadata.annotations[ANNOTATION] == wanted
    assert new[0].status.ready_replicas == 1
    assert all(sets[name].spec.replicas == 0 for name in old_sets if name in sets)
    pods = _live_predictor_pods(rel)
    assert len(pods) == 1 and pods[0]["metadata"]["name"] not in old_pods
    assert pods[0]["metadata"]["annotations"][ANNOTATION] == wanted and pods[0]["spec"]["nodeName"] == NODE_NAME

    # Label Studio stores predictions of the new version; the first project kept its own.
    loop.retrieve_predictions(ls, project.id, check_ids)
    assert after in loop.stored_versions(ls, check_ids)
    _ls_backend_ok(ls, ctx["backend"]["id"])
    assert loop.served_version(rel, first["project"]) == first["version"]
    rel.second = {"project": project, "version": after, "backend": ctx["backend"]}  # type: ignore[attr-defined]


def test_helm_upgrade_after_the_restart_rollout_keeps_the_promoted_versions(kserve_release, node_label_studio):
    """`helm upgrade --reuse-values` with a changed setting rolls the pods again (new settings checksum) and keeps
    the InferenceService's checkpoint annotation: the new pods serve the promoted versions, no call fails."""
    rel, ls = kserve_release, node_label_studio
    cp, ns = rel.cp, rel.namespace
    first, second = getattr(rel, "first", None), getattr(rel, "second", None)
    if first is None or second is None:
        pytest.fail("needs the two trained projects of the tests before (run the module in order)", pytrace=False)
    controller: KServeController = rel.controller
    wanted = _isvc_checkpoints(cp, ns)
    assert wanted == checkpoints_id({first["project"].id: first["version"], second["project"].id: second["version"]})
    template_before = _deployment(cp, ns).spec.template.metadata.annotations
    old_sets = set(_replica_sets(cp, ns))
    old_pods = {p["metadata"]["name"] for p in _live_predictor_pods(rel)}
    project = second["project"]
    task_ids = import_texts(ls.client(), project.id, ["A warm, funny and moving film.", "Dull, long and badly acted."])

    texts = [t["data"]["text"] for t in (ls.request("GET", f"/api/tasks/{i}").json() for i in task_ids)]
    stream = PredictStream(rel, ls, project, task_ids, texts).start()
    try:
        time.sleep(3)
        t0 = time.monotonic()
        res = cp.helm(
            "upgrade",
            RELEASE,
            str(harness.CHART),
            "-n",
            ns,
            "--reuse-values",
            "--set",
            "settings.LOG_LEVEL=DEBUG",
            timeout=180,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert _isvc_checkpoints(cp, ns) == wanted
        harness.wait_for(
            lambda: (
                _deployment(cp, ns).spec.template.metadata.annotations.get("checksum/settings")
                != template_before.get("checksum/settings")
            ),
            60,
            "KServe to take the new settings checksum",
        )
        roll_seconds = _wait_rolled(rel, wanted, "the upgrade's rollout")
        elapsed = time.monotonic() - t0
        time.sleep(3)
    finally:
        stream.stop()
    print(
        f"\nkserve {controller.version} helm upgrade: rollout complete {elapsed:.0f}s after the upgrade started "
        f"(waited {roll_seconds:.0f}s for it); stream: {stream.summary()}"
    )
    assert not stream.failures, stream.failures[:10]
    assert {v for _, v in stream.calls} == {second["version"]}, stream.summary()
    assert len(stream.calls) >= 20, stream.summary()

    template = _deployment(cp, ns).spec.template.metadata.annotations
    assert template[ANNOTATION] == wanted
    new_sets = set(_replica_sets(cp, ns)) - old_sets
    assert len(new_sets) == 1, new_sets
    pods = _live_predictor_pods(rel)
    assert len(pods) == 1 and pods[0]["metadata"]["name"] not in old_pods
    # The new pod serves both promoted versions, and Label Studio stores them for a task it had never predicted.
    assert loop.served_version(rel, first["project"]) == first["version"]
    assert loop.served_version(rel, project) == second["version"]
    loop.retrieve_predictions(ls, project.id, task_ids)
    assert loop.stored_versions(ls, task_ids) == {second["version"]}
    _ls_backend_ok(ls, second["backend"]["id"])
    # The changed setting reached the new pod.
    level = cp.kubectl("exec", pods[0]["metadata"]["name"], "-n", ns, "--", "printenv", "LOG_LEVEL").stdout.strip()
    assert level == "DEBUG"
