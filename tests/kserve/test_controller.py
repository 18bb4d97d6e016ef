"""The chart's InferenceService, reconciled by the real KServe controller (every pinned version).

The control plane's kwok nodes make pods Running and Ready without running containers, so these tests
prove what KServe does with the chart's objects (admission, the predictor Deployment and Service, the
restart rollout), not what the predictor process does. Each test runs once per version in
``KSERVE_VERSIONS`` (the ``kserve_controller`` fixture's parameter): the newest and the oldest the chart
supports.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lsbert.rollout.kserve import ANNOTATION, RestartRollout, predictor_deployment_name, rollout_finished
from tests.chart.helm import CHART
from tests.k8s.cluster import CPU_NODE, ControlPlane, ControlPlaneError, wait_until
from tests.kserve.controller import KServeController, standard_mode_name

pytestmark = [pytest.mark.k8s, pytest.mark.kserve]

TIMEOUT = 60.0
RELEASE = "rel"
FULLNAME = "rel-lsbert"
PREDICTOR = predictor_deployment_name(FULLNAME)  # <isvc>-predictor: Deployment and Service
ISVC = ("serving.kserve.io", "v1beta1")
IMAGE = {"repository": "registry.invalid/lsbert-predictor", "tag": "test"}


class Release:
    """One helm release of the chart in its own namespace, with a static volume for its claim."""

    def __init__(self, cp: ControlPlane, values: dict[str, Any], tmp: Path) -> None:
        self.cp = cp
        self.namespace = f"kserve-chart-{uuid.uuid4().hex[:5]}"
        self.values_file = tmp / "values.json"
        self.values_file.write_text(json.dumps(values))
        self.storage_class = f"lsbert-test-{self.namespace}"
        self.pv = f"ckpt-{self.namespace}"

    def helm(self, *args: str, check: bool = True) -> Any:
        return self.cp.helm(*args, "--namespace", self.namespace, check=check)

    def install(self) -> None:
        self.cp.create_namespace(self.namespace)
        # kwok has no storage provisioner: a static volume for the chart's claim (never mounted).
        with self.cp.api_client() as api:
            client.CoreV1Api(api).create_persistent_volume(
                client.V1PersistentVolume(
                    metadata=client.V1ObjectMeta(name=self.pv),
                    spec=client.V1PersistentVolumeSpec(
                        storage_class_name=self.storage_class,
                        capacity={"storage": "1Gi"},
                        access_modes=["ReadWriteMany"],
                        persistent_volume_reclaim_policy="Retain",
                        host_path=client.V1HostPathVolumeSource(path="/nonexistent/lsbert-test", type=""),
                    ),
                )
            )
        self.helm(
            "install",
            RELEASE,
            str(CHART),
            "-f",
            str(self.values_file),
            "--set",
            f"storage.pvc.storageClassName={self.storage_class}",
        )

    def remove(self) -> None:
        self.helm("uninstall", RELEASE, "--wait", "--timeout", "60s", check=False)
        with self.cp.api_client() as api:
            core = client.CoreV1Api(api)
            for call in (lambda: core.delete_namespace(self.namespace), lambda: core.delete_persistent_volume(self.pv)):
                try:
                    call()
                except ApiException as exc:
                    if exc.status != 404:
                        raise


@pytest.fixture(scope="module")
def release(kserve_controller: KServeController, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart with kserve.enabled=true and the restart rollout, installed while the controller runs."""
    values = {
        "image": IMAGE,
        "trainer": {"image": {"repository": "registry.invalid/lsbert-trainer", "tag": "test"}},
        "kserve": {"enabled": True},
        "rollout": {"strategy": "restart"},
        "labelStudio": {"url": "http://label-studio.ls.svc.cluster.local:8080", "apiKey": "kserve-test-key"},
        "storage": {"type": "pvc", "pvc": {"size": "1Gi"}},
        "replicaCount": 2,
    }
    rel = Release(kserve_controller.cp, values, tmp_path_factory.mktemp("kserve-release"))
    rel.install()
    try:
        yield rel
    finally:
        rel.remove()


def _isvc(cp: ControlPlane, ns: str, name: str = FULLNAME) -> dict[str, Any]:
    with cp.api_client() as api:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(*ISVC, ns, "inferenceservices", name)


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def _owned_by(obj: Any, owner: dict[str, Any]) -> bool:
    return any(
        ref.uid == owner["metadata"]["uid"] and ref.kind == "InferenceService" and ref.controller
        for ref in obj.metadata.owner_references or []
    )


def _replica_sets(apps: client.AppsV1Api, ns: str, deployment: Any) -> list[Any]:
    return [
        rs
        for rs in apps.list_namespaced_replica_set(ns).items
        if any(ref.uid == deployment.metadata.uid for ref in rs.metadata.owner_references or [])
    ]


# ------------------------------------------------------------------------------------------ tests


def test_inference_service_becomes_predictor_deployment_and_service(
    kserve_controller: KServeController, release: Release
) -> None:
    cp, ns = release.cp, release.namespace
    rendered = _isvc(cp, ns)
    (chart_container,) = rendered["spec"]["predictor"]["containers"]
    with cp.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        def available() -> Any:
            try:
                d = apps.read_namespaced_deployment(PREDICTOR, ns)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return d if (d.status.available_replicas or 0) == 2 else None

        deployment = wait_until(available, TIMEOUT, f"KServe to create {PREDICTOR} and kwok to make 2 pods Ready")
        service = core.read_namespaced_service(PREDICTOR, ns)

        def ready() -> Any:
            isvc = _isvc(cp, ns)
            return isvc if _condition(isvc, "Ready").get("status") == "True" else None

        isvc = wait_until(ready, TIMEOUT, "InferenceService Ready")

        # Made by the controller from the InferenceService, and owned by it.
        assert _owned_by(deployment, isvc) and _owned_by(service, isvc)
        assert isvc["status"]["deploymentMode"] == standard_mode_name(kserve_controller.version)
        # autoscalerClass none: exactly replicaCount pods, no HPA.
        assert deployment.spec.replicas == 2
        assert not client.AutoscalingV2Api(api).list_namespaced_horizontal_pod_autoscaler(ns).items
        # The chart's strategy (no GPU: surge one, never below capacity).
        assert deployment.spec.strategy.rolling_update.max_surge == 1
        assert deployment.spec.strategy.rolling_update.max_unavailable == 0

        # The chart's pod carried through: probes, env, mounts, volumes, identity, security.
        pod_spec = deployment.spec.template.spec
        (container,) = [c for c in pod_spec.containers if c.name == "kserve-container"]
        assert container.image == f"{IMAGE['repository']}:{IMAGE['tag']}"
        for probe, path in (
            ("startup_probe", "/v1/models/lsbert"),
            ("readiness_probe", "/v1/models/lsbert"),
            ("liveness_probe", "/"),
        ):
            assert getattr(container, probe).http_get.path == path, probe
        env = {e.name: e for e in container.env}
        assert {e["name"] for e in chart_container["env"]} <= set(env)
        assert env["ROLLOUT_STRATEGY"].value == "restart" and env["ISVC_NAME"].value == FULLNAME
        assert env["POD_NAMESPACE"].value_from.field_ref.field_path == "metadata.namespace"
        assert env["LABEL_STUDIO_API_KEY"].value_from.secret_key_ref.name == f"{FULLNAME}-label-studio"
        assert container.env_from[0].config_map_ref.name == f"{FULLNAME}-settings"
        mounts = {m.name: m.mount_path for m in container.volume_mounts}
        assert {"tmp": "/tmp", "checkpoints": "/var/lib/lsbert/models"}.items() <= mounts.items()
        volumes = {v.name: v for v in pod_spec.volumes}
        assert volumes["checkpoints"].persistent_volume_claim.claim_name == f"{FULLNAME}-checkpoints"
        assert volumes["tmp"].empty_dir is not None and volumes["cache"].empty_dir is not None
        assert container.security_context.read_only_root_filesystem is True
        assert container.lifecycle.pre_stop._exec.command == ["sleep", "5"]  # the chart's drain before SIGTERM
        assert pod_spec.service_account_name == FULLNAME and pod_spec.security_context.run_as_non_root

        # Service: port 80 -> the container's 8080, selecting exactly the predictor pods.
        (port,) = service.spec.ports
        assert port.port == 80 and port.target_port in (8080, "http1")
        pods = core.list_namespaced_pod(
            ns, label_selector=",".join(f"{k}={v}" for k, v in service.spec.selector.items())
        ).items
        assert len(pods) == 2
        for pod in pods:
            assert pod.status.phase == "Running" and pod.spec.node_name == CPU_NODE
            assert pod.metadata.labels["app.kubernetes.io/component"] == "predictor"
    kserve_controller.check_alive()


def test_webhooks_default_and_refuse(kserve_controller: KServeController, release: Release) -> None:
    cp, ns = release.cp, release.namespace

    def isvc(name: str, **annotations: str) -> dict[str, Any]:
        return {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": name,
                "namespace": ns,
                "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment", **annotations},
            },
            "spec": {"predictor": {"containers": [{"name": "kserve-container", "image": "registry.invalid/x"}]}},
        }

    # Mutating webhook: a container without resources gets KServe's defaults.
    created = json.loads(
        cp.kubectl(
            "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(isvc("defaults-probe"))
        ).stdout
    )
    (container,) = created["spec"]["predictor"]["containers"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]

    # Validating webhook: a name the API server accepts (a DNS subdomain) but KServe does not.
    res = cp.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(isvc("9-starts-with-a-digit")), check=False
    )
    assert res.returncode != 0 and "denied the request" in res.stderr, res.stderr
    assert "9-starts-with-a-digit" in res.stderr

    # The release's deployment mode is recorded and cannot be switched to Knative afterwards.
    patch = json.dumps({"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Serverless"}}})
    with pytest.raises(ControlPlaneError, match="denied the request"):
        cp.kubectl("patch", "inferenceservice", FULLNAME, "-n", ns, "--type=merge", "-p", patch)
    assert _isvc(cp, ns)["status"]["deploymentMode"] == standard_mode_name(kserve_controller.version)


def test_restart_rollout_rolls_a_new_replica_set(
    kserve_controller: KServeController, release: Release, tmp_path: Path
) -> None:
    """The predictor's own rollout code, with the chart's ServiceAccount: patch the InferenceService, KServe
    rolls the Deployment, completion is judged from the Deployment status."""
    from lsbert.store.local import LocalStore

    cp, ns = release.cp, release.namespace
    with cp.api_client() as api:
        apps = client.AppsV1Api(api)
        wait_until(lambda: rollout_finished(PREDICTOR, ns, api_client=api), TIMEOUT, "the first rollout finished")
        before = apps.read_namespaced_deployment(PREDICTOR, ns)
        old_sets = {rs.metadata.name for rs in _replica_sets(apps, ns, before)}
        assert len(old_sets) == 1

    store = LocalStore(tmp_path / "store")
    version = store.next_version(1, "finetuned_model")
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    store.save(1, version, src, {"metrics": {"accuracy": 0.9}})
    store.promote(1, version)
    wanted = f"p1={version}"

    async def roll(sa: client.ApiClient) -> tuple[Any, Any]:
        rollout = RestartRollout(sa, ns, FULLNAME, store, poll_seconds=0.2, timeout=TIMEOUT)
        try:
            patched = await rollout.sync()
            return patched, await asyncio.wait_for(rollout.wait(), TIMEOUT + 10)
        finally:
            rollout.close()

    with cp.service_account_client(ns, FULLNAME) as sa:  # the chart's Role, nothing more
        patched, result = asyncio.run(roll(sa))
    assert patched == wanted and result == "finished"

    with cp.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        after = apps.read_namespaced_deployment(PREDICTOR, ns)
        # The controller (nobody else touches the Deployment) carried the annotation into the pod template.
        assert after.spec.template.metadata.annotations[ANNOTATION] == wanted
        assert after.metadata.generation > before.metadata.generation
        sets = _replica_sets(apps, ns, after)
        new = [rs for rs in sets if rs.metadata.name not in old_sets]
        assert len(new) == 1, [rs.metadata.name for rs in sets]
        assert new[0].spec.template.metadata.annotations[ANNOTATION] == wanted
        assert new[0].status.ready_replicas == 2
        assert all(rs.spec.replicas == 0 for rs in sets if rs.metadata.name in old_sets)
        pods = core.list_namespaced_pod(
            ns, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=predictor"
        ).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        assert len(live) == 2 and all(p.metadata.annotations[ANNOTATION] == wanted for p in live)
        # Pods are admitted through KServe's pod mutator as well (failurePolicy Fail): they exist, so it answered.

    # helm upgrade after the rollout keeps the rolled-to version in the InferenceService and the pods.
    release.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "settings.LOG_LEVEL=DEBUG")
    assert _isvc(cp, ns)["spec"]["predictor"]["annotations"][ANNOTATION] == wanted
    with cp.api_client() as api:
        wait_until(
            lambda: rollout_finished(PREDICTOR, ns, api_client=api, checkpoint_id=wanted),
            TIMEOUT,
            "the upgrade's rollout (new settings checksum) finished on the same checkpoints",
        )
        template = client.AppsV1Api(api).read_namespaced_deployment(PREDICTOR, ns).spec.template
        assert template.metadata.annotations[ANNOTATION] == wanted
    kserve_controller.check_alive()


def test_mode_names_each_version_accepts(kserve_controller: KServeController, release: Release) -> None:
    """Why the chart renders RawDeployment: KServe 0.16+ rewrites it to Standard, while 0.15 does not know
    Standard, records its cluster default instead and then refuses every update (the restart rollout's
    patch, and the removal of its own finalizer on delete) because the annotation no longer matches the
    recorded mode."""
    cp, ns = release.cp, release.namespace
    old = standard_mode_name(kserve_controller.version) == "RawDeployment"
    name = f"mode-{uuid.uuid4().hex[:5]}"
    mode = "Standard" if old else "RawDeployment"
    body = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": {"serving.kserve.io/deploymentMode": mode, "serving.kserve.io/autoscalerClass": "none"},
        },
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "maxReplicas": 1,
                "containers": [{"name": "kserve-container", "image": "registry.invalid/x"}],
            }
        },
    }
    recorded_name = standard_mode_name(kserve_controller.version)
    cp.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        recorded = wait_until(
            lambda: (_isvc(cp, ns, name).get("status") or {}).get("deploymentMode"),
            TIMEOUT,
            f"KServe to record the deployment mode of {name}",
        )
        assert recorded == recorded_name
        stored = _isvc(cp, ns, name)["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        patch = json.dumps({"spec": {"predictor": {"annotations": {ANNOTATION: "p1=x"}}}})
        res = cp.kubectl("patch", "inferenceservice", name, "-n", ns, "--type=merge", "-p", patch, check=False)
        if old:
            assert stored == "Standard"
            assert res.returncode != 0 and "deploymentMode cannot be changed" in res.stderr, res.stderr
            # Not even deletable: removing KServe's finalizer is an update the webhook refuses as well.
            cp.kubectl("delete", "inferenceservice", name, "-n", ns, "--wait=false")
            time.sleep(5)
            assert _isvc(cp, ns, name)["metadata"].get("deletionTimestamp")
        else:
            assert stored == "Standard"  # rewritten by the mutating webhook
            assert res.returncode == 0, res.stderr
    finally:
        # The recorded mode's own name lets KServe finish (or the test clean up) on every version.
        fix = json.dumps({"metadata": {"annotations": {"serving.kserve.io/deploymentMode": recorded_name}}})
        cp.kubectl("patch", "inferenceservice", name, "-n", ns, "--type=merge", "-p", fix, check=False)
        cp.kubectl(
            "delete",
            "inferenceservice",
            name,
            "-n",
            ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
            timeout=90,
        )


def test_uninstall_lets_kserve_clean_up(kserve_controller: KServeController, release: Release) -> None:
    cp, ns = release.cp, release.namespace
    release.helm("uninstall", RELEASE, "--wait", "--timeout", "60s")
    with cp.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        def gone() -> bool:
            try:
                _isvc(cp, ns)
                return False
            except ApiException as exc:
                if exc.status != 404:
                    raise
            names = [d.metadata.name for d in apps.list_namespaced_deployment(ns).items]
            services = [s.metadata.name for s in core.list_namespaced_service(ns).items]
            return PREDICTOR not in names and PREDICTOR not in services

        wait_until(gone, TIMEOUT, "the InferenceService (KServe finalizer) and its Deployment and Service gone")
