"""The chart on a real control plane (kube-apiserver + controllers + scheduler, kwok as the kubelet).

Two releases, two namespaces: the plain Deployment path (kserve.enabled=false, PVC storage, generated basic
auth password) and the InferenceService path (KServe CRDs installed, no KServe controller; S3 storage,
rollout=restart). Real admission, RBAC and schema validation; kwok runs no containers, so images are never
pulled and probes never fire.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.chart.helm import CHART
from tests.k8s.cluster import CPU_NODE, LABEL_FAIL, ControlPlane, wait_until

pytestmark = pytest.mark.k8s

TIMEOUT = 60.0
RELEASE = "rel"
FULLNAME = "rel-lsbert"
IMAGES = {
    "image": {"repository": "registry.invalid/lsbert-predictor", "tag": "test"},
    "trainer": {"image": {"repository": "registry.invalid/lsbert-trainer", "tag": "test"}},
}
LS_KEY = "k8s-test-ls-key-4f9d"
S3_SECRET = "k8s-test-s3-secret-8c2e"
# Kinds that controllers (not the release) leave in every namespace.
BACKGROUND = {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}
IGNORED_KINDS = {"Event", "Logs"}  # events; kwok's per-pod log objects


# ------------------------------------------------------------------------------------------ helpers


class Release:
    def __init__(self, cp: ControlPlane, namespace: str, values: dict[str, Any], tmp: Path) -> None:
        self.cp, self.namespace, self.values = cp, namespace, values
        self.values_file = tmp / f"{namespace}-values.json"
        self.values_file.write_text(json.dumps(values))
        self.installed = False

    def helm(self, *args: str, check: bool = True, timeout: float = 120.0) -> Any:
        return self.cp.helm(*args, "--namespace", self.namespace, check=check, timeout=timeout)

    def install(self) -> None:
        self.helm("install", RELEASE, str(CHART), "-f", str(self.values_file))
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.helm("uninstall", RELEASE, "--wait", "--timeout", "60s")
            self.installed = False


def _api(cp: ControlPlane) -> client.ApiClient:
    return cp.api_client()


def _status(call: Callable[[], Any]) -> int:
    """HTTP status of an API call: 200/201 when it works, else the ApiException status."""
    try:
        call()
    except ApiException as exc:
        return exc.status
    return 200


def _leftovers(cp: ControlPlane, namespace: str) -> list[tuple[str, str]]:
    """Every listable namespaced object left in ``namespace`` (kind, name), minus controller defaults."""
    names = cp.kubectl("api-resources", "--namespaced=true", "--verbs=list", "-o", "name").stdout.split()
    out = cp.kubectl("get", ",".join(names), "--namespace", namespace, "-o", "json", "--ignore-not-found").stdout
    items = json.loads(out)["items"] if out.strip() else []
    found = {(o["kind"], o["metadata"]["name"]) for o in items}
    return sorted(k for k in found - BACKGROUND if k[0] not in IGNORED_KINDS)


def _job_values(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    with _api(cp) as api:
        cm = client.CoreV1Api(api).read_namespaced_config_map(f"{FULLNAME}-job-values", namespace)
    return yaml.safe_load(cm.data["values.yaml"])


def _sa_can_launch_training(cp: ControlPlane, namespace: str) -> None:
    """The predictor's real launcher, with the chart's ServiceAccount token, JOB_VALUES from the chart's
    ConfigMap and the Job template the lsbert package ships: launch a run owned by the job-values ConfigMap,
    follow it to success."""
    from lsbert.launcher.base import RunPhase
    from lsbert.launcher.kubernetes import KubernetesLauncher, load_template

    template = load_template()
    with cp.service_account_client(namespace, FULLNAME) as sa:
        launcher = KubernetesLauncher(
            sa,
            namespace,
            values=_job_values(cp, namespace),
            template=template,
            release=FULLNAME,
            owner_configmap=f"{FULLNAME}-job-values",
        )
        launcher.dry_run(1, "finetuned_model-0001")  # server-side: admission, strict fields
        run = launcher.launch(1, "finetuned_model-0001", [])
        wait_until(
            lambda: launcher.poll(run).phase.finished,
            TIMEOUT,
            f"training Job {run.run_id} finished (kwok completes Job pods)",
        )
        assert run.phase is RunPhase.SUCCEEDED, run.as_dict()
        (job,) = launcher.list_jobs(1)
        assert job.metadata.name == run.run_id
        (owner,) = job.metadata.owner_references
        assert (owner.kind, owner.name) == ("ConfigMap", f"{FULLNAME}-job-values") and owner.uid
        assert job.metadata.labels["app.kubernetes.io/instance"] == RELEASE
        core = client.CoreV1Api(sa)
        (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={run.run_id}").items
        assert pod.status.phase == "Succeeded"
        assert pod.spec.service_account_name == f"{FULLNAME}-trainer"
        assert pod.spec.security_context.run_as_user == 10001
        # The trainer mounts no token: no kube-api-access volume was injected.
        assert not [v for v in pod.spec.volumes or [] if v.name.startswith("kube-api-access")]
        client.BatchV1Api(sa).delete_namespaced_job(run.run_id, namespace, propagation_policy="Background")


def _sa_refused(cp: ControlPlane, namespace: str) -> dict[str, int]:
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="intruder"),
        spec=client.V1DeploymentSpec(
            selector=client.V1LabelSelector(match_labels={"app": "intruder"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "intruder"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="registry.invalid/x")]),
            ),
        ),
    )
    with cp.service_account_client(namespace, FULLNAME) as sa:
        core, apps = client.CoreV1Api(sa), client.AppsV1Api(sa)
        return {
            "list secrets": _status(lambda: core.list_namespaced_secret(namespace)),
            "get secret": _status(lambda: core.read_namespaced_secret(f"{FULLNAME}-label-studio", namespace)),
            "create deployment": _status(lambda: apps.create_namespaced_deployment(namespace, deployment)),
            "list configmaps": _status(lambda: core.list_namespaced_config_map(namespace)),
            "create pod": _status(
                lambda: core.create_namespaced_pod(
                    namespace,
                    client.V1Pod(metadata=client.V1ObjectMeta(name="intruder"), spec=deployment.spec.template.spec),
                )
            ),
            "list jobs elsewhere": _status(lambda: client.BatchV1Api(sa).list_namespaced_job("default")),
        }


# ----------------------------------------------------------------------------------- plain Deployment


@pytest.fixture(scope="module")
def plain(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    cp = control_plane
    ns = f"chart-plain-{uuid.uuid4().hex[:5]}"
    storage_class = f"lsbert-test-{ns}"
    cp.create_namespace(ns)
    # kwok has no storage provisioner: a static RWX volume for the chart's claim (never mounted).
    pv = client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name=f"ckpt-{ns}"),
        spec=client.V1PersistentVolumeSpec(
            storage_class_name=storage_class,
            capacity={"storage": "1Gi"},
            access_modes=["ReadWriteMany"],
            persistent_volume_reclaim_policy="Retain",
            host_path=client.V1HostPathVolumeSource(path="/nonexistent/lsbert-test", type=""),
        ),
    )
    with _api(cp) as api:
        client.CoreV1Api(api).create_persistent_volume(pv)
    values = {
        **IMAGES,
        "kserve": {"enabled": False},  # forced off although the cluster serves the KServe API
        "labelStudio": {"url": "http://label-studio.ls.svc.cluster.local:8080", "apiKey": LS_KEY},
        "basicAuth": {"enabled": True},  # password generated at install, kept on upgrade
        "storage": {"type": "pvc", "pvc": {"storageClassName": storage_class, "size": "1Gi"}},
    }
    release = Release(cp, ns, values, tmp_path_factory.mktemp("plain"))
    release.install()
    yield release
    release.uninstall()
    with _api(cp) as api:
        core = client.CoreV1Api(api)
        core.delete_namespace(ns)
        core.delete_persistent_volume(pv.metadata.name)


def test_plain_release_runs_predictor_pods(plain: Release) -> None:
    cp, ns = plain.cp, plain.namespace
    with _api(cp) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        def available() -> bool:
            d = apps.read_namespaced_deployment_status(FULLNAME, ns)
            return d.status.available_replicas == 1 and d.status.updated_replicas == 1

        wait_until(available, TIMEOUT, "predictor Deployment available (PVC bound, pod scheduled, kwok Ready)")
        (pod,) = core.list_namespaced_pod(
            ns, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=predictor"
        ).items
        assert pod.status.phase == "Running" and pod.spec.node_name == CPU_NODE
        assert pod.spec.service_account_name == FULLNAME
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert env["POD_NAMESPACE"].value_from.field_ref.field_path == "metadata.namespace"
        assert env["BASIC_AUTH_PASS"].value_from.secret_key_ref.name == f"{FULLNAME}-basic-auth"
        pvc = core.read_namespaced_persistent_volume_claim(f"{FULLNAME}-checkpoints", ns)
        assert pvc.status.phase == "Bound"
        assert not cp.kubectl("get", "inferenceservices", "-n", ns, "-o", "name").stdout.strip()
        service = core.read_namespaced_service(FULLNAME, ns)
        assert service.spec.ports[0].port == 8080


def _finish_test_pod(cp: ControlPlane, namespace: str, name: str) -> None:
    """Stand in for the kubelet: kwok makes the hook pod Running but only completes Job pods."""
    with _api(cp) as api:
        core = client.CoreV1Api(api)
        wait_until(
            lambda: core.read_namespaced_pod(name, namespace).status.phase == "Running",
            TIMEOUT,
            f"helm test pod {name} Running",
        )
        pod = core.read_namespaced_pod(name, namespace)
        container = pod.spec.containers[0]
        assert container.command[:2] == ["python", "-c"]
        assert container.command[-1] == f"http://{FULLNAME}.{namespace}.svc.cluster.local:8080/health"
        now = pod.status.start_time.isoformat()
        core.patch_namespaced_pod_status(
            name,
            namespace,
            {
                "status": {
                    "phase": "Succeeded",
                    "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                    "containerStatuses": [
                        {
                            "name": container.name,
                            "image": container.image,
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "terminated": {
                                    "exitCode": 0,
                                    "reason": "Completed",
                                    "startedAt": now,
                                    "finishedAt": now,
                                }
                            },
                        }
                    ],
                }
            },
        )


def test_helm_test_pod(plain: Release) -> None:
    cp, ns = plain.cp, plain.namespace
    name = f"{FULLNAME}-test-health"
    finisher_error: list[BaseException] = []

    def finish() -> None:
        try:
            _finish_test_pod(cp, ns, name)
        except BaseException as exc:  # reported below
            finisher_error.append(exc)

    finisher = threading.Thread(target=finish, daemon=True)
    finisher.start()
    result = plain.helm("test", RELEASE, "--timeout", "90s", check=False)
    finisher.join(TIMEOUT)
    assert not finisher_error, finisher_error
    assert result.returncode == 0, result.stdout + result.stderr
    assert name in result.stdout and "Succeeded" in result.stdout
    with _api(cp) as api:
        core = client.CoreV1Api(api)
        wait_until(
            lambda: _status(lambda: core.read_namespaced_pod(name, ns)) == 404,
            TIMEOUT,
            "passed test pod deleted (hook-succeeded)",
        )


def test_helm_test_reports_a_failing_pod_after_upgrade(plain: Release) -> None:
    cp, ns = plain.cp, plain.namespace
    secret = f"{FULLNAME}-basic-auth"
    with _api(cp) as api:
        before = client.CoreV1Api(api).read_namespaced_secret(secret, ns).data["password"]
    # kwok's pod-fail stage ends pods with this label as Failed.
    plain.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "--reuse-values",
        "--set-string",
        f"tests.podLabels.{LABEL_FAIL.replace('.', chr(92) + '.')}=true",
    )
    result = plain.helm("test", RELEASE, "--timeout", "60s", check=False)
    assert result.returncode != 0
    assert "Failed" in result.stdout + result.stderr
    with _api(cp) as api:
        core = client.CoreV1Api(api)
        pod = core.read_namespaced_pod(f"{FULLNAME}-test-health", ns)  # kept for `kubectl logs`
        assert pod.status.phase == "Failed"
        after = core.read_namespaced_secret(secret, ns).data["password"]
    assert after == before, "the generated basic-auth password must survive upgrades"
    assert len(base64.b64decode(after)) == 32
    plain.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "tests.podLabels=null")
    with _api(cp) as api:
        client.CoreV1Api(api).delete_namespaced_pod(f"{FULLNAME}-test-health", ns, grace_period_seconds=0)


def test_plain_service_account_is_least_privilege(plain: Release) -> None:
    cp, ns = plain.cp, plain.namespace
    _sa_can_launch_training(cp, ns)
    refused = _sa_refused(cp, ns)
    assert refused == dict.fromkeys(refused, 403), refused
    with cp.service_account_client(ns, FULLNAME) as sa:
        custom = client.CustomObjectsApi(sa)
        # No InferenceService in this release: no rule for it either.
        assert (
            _status(
                lambda: custom.get_namespaced_custom_object(
                    "serving.kserve.io", "v1beta1", ns, "inferenceservices", FULLNAME
                )
            )
            == 403
        )
        assert _status(lambda: client.AppsV1Api(sa).list_namespaced_deployment(ns)) == 403  # hot rollout


def test_auto_never_moves_the_plain_release_to_kserve(plain: Release) -> None:
    """The control plane serves the KServe API and this release runs as a Deployment: an upgrade to
    kserve.enabled=auto finds the Deployment (helm's lookup) and is refused; nothing changes."""
    cp, ns = plain.cp, plain.namespace
    result = plain.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "kserve.enabled=auto", check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "this release serves as a plain Deployment" in message
    assert f"http://{FULLNAME}.{ns}.svc.cluster.local:8080" in message
    with _api(cp) as api:
        assert client.AppsV1Api(api).read_namespaced_deployment(FULLNAME, ns).metadata.name == FULLNAME
    assert _status(lambda: _isvc(cp, ns)) == 404
    # the generated password came from helm install, which sees the cluster; an upgrade keeps it
    plain.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "kserve.enabled=false")


def test_plain_uninstall_leaves_only_the_checkpoints_claim(plain: Release) -> None:
    cp, ns = plain.cp, plain.namespace
    wait_until(lambda: not any(k == "Job" for k, _ in _leftovers(cp, ns)), TIMEOUT, "test Jobs gone")
    plain.uninstall()
    expected = [("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")]
    wait_until(
        lambda: _leftovers(cp, ns) == expected, TIMEOUT, f"only the checkpoints claim left (have {_leftovers(cp, ns)})"
    )
    with _api(cp) as api:
        pvc = client.CoreV1Api(api).read_namespaced_persistent_volume_claim(f"{FULLNAME}-checkpoints", ns)
    assert pvc.metadata.annotations["helm.sh/resource-policy"] == "keep"
    assert pvc.status.phase == "Bound"


# ------------------------------------------------------------------------------- InferenceService


@pytest.fixture(scope="module")
def kserve(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    cp = control_plane
    ns = f"chart-kserve-{uuid.uuid4().hex[:5]}"
    cp.create_namespace(ns)
    values = {
        **IMAGES,  # kserve.enabled stays "auto": the API server serves serving.kserve.io/v1beta1
        "rollout": {"strategy": "restart"},
        "gpu": {"enabled": True},
        "labelStudio": {"url": "http://label-studio.ls.svc.cluster.local:8080", "apiKey": LS_KEY},
        "storage": {
            "type": "s3",
            "s3": {
                "uri": "s3://ckpt/lsbert",
                "endpoint": "http://minio.minio.svc:9000",
                "accessKeyId": "k8s-test",
                "secretAccessKey": S3_SECRET,
            },
        },
    }
    release = Release(cp, ns, values, tmp_path_factory.mktemp("kserve"))
    release.install()
    yield release
    release.uninstall()
    with _api(cp) as api:
        client.CoreV1Api(api).delete_namespace(ns)


def _isvc(cp: ControlPlane, ns: str, name: str = FULLNAME) -> dict[str, Any]:
    with _api(cp) as api:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", ns, "inferenceservices", name
        )


def test_kserve_release_creates_the_inference_service(kserve: Release) -> None:
    cp, ns = kserve.cp, kserve.namespace
    isvc = _isvc(cp, ns)  # accepted by the API server against the real CRD schema
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert predictor["deploymentStrategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/lsbert"
    env = {e["name"]: e for e in container["env"]}
    assert env["ISVC_NAME"]["value"] == FULLNAME and env["ROLLOUT_STRATEGY"]["value"] == "restart"
    with _api(cp) as api:
        # No KServe controller here: the chart itself renders no Deployment, Service or PVC on this path.
        assert not client.AppsV1Api(api).list_namespaced_deployment(ns).items
        assert not client.CoreV1Api(api).list_namespaced_persistent_volume_claim(ns).items
        for cm in client.CoreV1Api(api).list_namespaced_config_map(ns).items:
            assert S3_SECRET not in json.dumps(cm.data or {}) and LS_KEY not in json.dumps(cm.data or {})


def test_kserve_service_account_is_least_privilege(kserve: Release) -> None:
    from lsbert.rollout.kserve import ANNOTATION, predictor_deployment_name, roll, rollout_finished

    cp, ns = kserve.cp, kserve.namespace
    _sa_can_launch_training(cp, ns)
    refused = _sa_refused(cp, ns)
    assert refused == dict.fromkeys(refused, 403), refused
    group = ("serving.kserve.io", "v1beta1", ns, "inferenceservices")
    with cp.service_account_client(ns, FULLNAME) as sa:
        custom, apps = client.CustomObjectsApi(sa), client.AppsV1Api(sa)
        # The restart rollout, with the predictor's own code: patch its InferenceService ...
        assert roll(FULLNAME, ns, "p1=finetuned_model-0001", api_client=sa) is True
        # ... and judge completion from <isvc>-predictor (absent here: no KServe controller; allowed, 404).
        assert rollout_finished(predictor_deployment_name(FULLNAME), ns, api_client=sa) is False
        patch = {"spec": {"predictor": {"annotations": {ANNOTATION: "x"}}}}
        assert _status(lambda: custom.patch_namespaced_custom_object(*group, "someone-else", patch)) == 403
        assert _status(lambda: custom.list_namespaced_custom_object(*group)) == 403
        assert _status(lambda: custom.delete_namespaced_custom_object(*group, FULLNAME)) == 403
        assert _status(lambda: apps.read_namespaced_deployment("someone-else", ns)) == 403
        assert _status(lambda: apps.list_namespaced_deployment(ns)) == 403
        assert _status(lambda: apps.patch_namespaced_deployment(predictor_deployment_name(FULLNAME), ns, {})) == 403
    assert _isvc(cp, ns)["spec"]["predictor"]["annotations"][ANNOTATION] == "p1=finetuned_model-0001"
    # A later helm upgrade neither conflicts with nor drops the rollout annotation.
    kserve.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "settings.LOG_LEVEL=DEBUG")
    annotations = _isvc(cp, ns)["spec"]["predictor"]["annotations"]
    assert annotations[ANNOTATION] == "p1=finetuned_model-0001"
    assert "checksum/settings" in annotations


def test_kserve_uninstall_leaves_nothing(kserve: Release) -> None:
    cp, ns = kserve.cp, kserve.namespace
    wait_until(lambda: not any(k == "Job" for k, _ in _leftovers(cp, ns)), TIMEOUT, "test Jobs gone")
    kserve.uninstall()
    wait_until(lambda: _leftovers(cp, ns) == [], TIMEOUT, f"namespace empty (have {_leftovers(cp, ns)})")
