"""The test control plane is real: scheduling, Job controller, RBAC, CRD validation, logs, helm."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s.cluster import (
    ANNOTATION_DURATION,
    CPU_NODE,
    GPU_NODE,
    GPU_RESOURCE,
    LABEL_FAIL,
    ControlPlane,
    wait_until,
)
from tests.k8s.node import NODE_IP, NODE_NAME

pytestmark = pytest.mark.k8s

TIMEOUT = 60.0
IMAGE = "registry.invalid/lsbert/never-pulled:0"  # kwok never pulls or runs it


def _ns(cp: ControlPlane, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(name)
    return name


@pytest.fixture()
def api(control_plane: ControlPlane):
    with control_plane.api_client() as a:
        yield a


def _job(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    gpus: int = 0,
    tolerate_gpu: bool = False,
    backoff_limit: int = 0,
) -> client.V1Job:
    resources = None
    if gpus:
        resources = client.V1ResourceRequirements(
            requests={GPU_RESOURCE: str(gpus), "cpu": "100m"}, limits={GPU_RESOURCE: str(gpus)}
        )
    tolerations = None
    if tolerate_gpu:
        tolerations = [client.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels, annotations=annotations),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[
                        client.V1Container(
                            name="main", image=IMAGE, command=["python", "-m", "train"], resources=resources
                        )
                    ],
                    tolerations=tolerations,
                ),
            ),
        ),
    )


def _job_condition(batch: client.BatchV1Api, ns: str, name: str) -> tuple[str, Any] | None:
    job = batch.read_namespaced_job_status(name, ns)
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type, job
    return None


def _job_pods(core: client.CoreV1Api, ns: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items


def test_version_is_stamped(control_plane: ControlPlane, api) -> None:
    info = client.VersionApi(api).get_code()
    assert info.git_version == control_plane.versions["K8S_VERSION"]
    assert info.major == "1"
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == control_plane.versions["K8S_VERSION"]


def test_nodes_registered(control_plane: ControlPlane, api) -> None:
    nodes = {n.metadata.name: n for n in client.CoreV1Api(api).list_node().items}
    # A session that runs `cluster` tests also has the real kubelet node (tests/k8s/node.py).
    real = {NODE_NAME} if control_plane.node is not None else set()
    assert set(nodes) == {CPU_NODE, GPU_NODE} | real
    gpu = nodes[GPU_NODE]
    assert gpu.status.allocatable[GPU_RESOURCE] == str(control_plane.gpus_per_node)
    assert [(t.key, t.value, t.effect) for t in gpu.spec.taints] == [(GPU_RESOURCE, "present", "NoSchedule")]
    for name, n in nodes.items():
        ready = {c.type: c.status for c in n.status.conditions}["Ready"]
        assert ready == "True"
        addresses = [a.address for a in n.status.addresses if a.type == "InternalIP"]
        # kwok's fake kubelet endpoint must be loopback; the real kubelet serves on the bridge address
        assert addresses == ([NODE_IP] if name == NODE_NAME else ["127.0.0.1"])
    if real:
        node = nodes[NODE_NAME]
        assert node.status.allocatable[GPU_RESOURCE] == "1"
        taints = {(t.key, t.effect) for t in node.spec.taints}
        assert {(GPU_RESOURCE, "NoSchedule"), ("lsbert.test/real-node", "NoSchedule")} <= taints


def test_deployment_pods_run_on_cpu_node(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "deploy")
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        ns,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(
                        containers=[
                            client.V1Container(
                                name="web",
                                image=IMAGE,
                                resources=client.V1ResourceRequirements(requests={"cpu": "250m", "memory": "64Mi"}),
                            )
                        ]
                    ),
                ),
            ),
        ),
    )

    def available() -> bool:
        d = apps.read_namespaced_deployment_status("web", ns)
        return (d.status.available_replicas or 0) == 2

    wait_until(available, TIMEOUT, "deployment web to have 2 available replicas")
    pods = core.list_namespaced_pod(ns, label_selector="app=web").items
    assert len(pods) == 2
    for p in pods:
        assert p.status.phase == "Running"
        assert p.spec.node_name == CPU_NODE  # the GPU node is tainted
        assert {c.type: c.status for c in p.status.conditions}["Ready"] == "True"
        assert p.status.container_statuses[0].state.running is not None


def test_gpu_job_lands_on_gpu_node_and_completes(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "gpujob")
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(ns, _job("train", gpus=1, tolerate_gpu=True))
    kind, job = wait_until(lambda: _job_condition(batch, ns, "train"), TIMEOUT, "job train to finish")
    assert kind == "Complete"
    assert job.status.succeeded == 1
    pods = _job_pods(core, ns, "train")
    assert len(pods) == 1
    assert pods[0].spec.node_name == GPU_NODE
    assert pods[0].status.phase == "Succeeded"
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 0


def test_gpu_pod_without_toleration_is_unschedulable(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "notol")
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(ns, _job("stuck", gpus=1, tolerate_gpu=False))

    def unschedulable() -> client.V1Pod | None:
        for p in _job_pods(core, ns, "stuck"):
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                    return p
        return None

    pod = wait_until(unschedulable, TIMEOUT, "the GPU pod without toleration to be Unschedulable")
    assert pod.spec.node_name is None
    assert pod.status.phase == "Pending"


def test_job_with_fail_label_fails_after_backoff(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "failjob")
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(ns, _job("doomed", labels={LABEL_FAIL: "true"}, backoff_limit=1))
    kind, job = wait_until(lambda: _job_condition(batch, ns, "doomed"), TIMEOUT, "job doomed to finish")
    assert kind == "Failed"
    failed = [c for c in job.status.conditions if c.type == "Failed"][0]
    assert failed.reason == "BackoffLimitExceeded"
    assert job.status.failed == 2  # first try + 1 retry
    assert not job.status.succeeded
    pods = _job_pods(core, ns, "doomed")
    assert len(pods) == 2
    for p in pods:
        assert p.status.phase == "Failed"
        assert p.status.container_statuses[0].state.terminated.exit_code == 1


def test_narrow_service_account_is_refused(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "rbac")
    other = _ns(control_plane, "rbac-other")
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="narrow")))
    rbac.create_namespaced_role(
        ns,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        ns,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="narrow-pod-reader"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="narrow", namespace=ns)],
        ),
    )

    with control_plane.service_account_client(ns, "narrow") as sa:
        sa_core, sa_batch = client.CoreV1Api(sa), client.BatchV1Api(sa)
        # allowed (RBAC caches are immediate for bindings created before the request, but poll anyway)
        wait_until(lambda: sa_core.list_namespaced_pod(ns) is not None, 10, "SA may list pods")

        with pytest.raises(ApiException) as e:
            sa_batch.create_namespaced_job(ns, _job("sneaky"))
        assert e.value.status == 403
        assert "system:serviceaccount:%s:narrow" % ns in (e.value.body or "")

        with pytest.raises(ApiException) as e:
            sa_core.list_namespaced_secret(ns)
        assert e.value.status == 403

        with pytest.raises(ApiException) as e:
            sa_core.list_namespaced_pod(other)
        assert e.value.status == 403

    # the same via kubectl with a token kubeconfig
    kc = control_plane.service_account_kubeconfig(ns, "narrow")
    res = control_plane.kubectl("auth", "can-i", "create", "jobs.batch", "-n", ns, kubeconfig=kc, check=False)
    assert res.stdout.strip() == "no"
    res = control_plane.kubectl("auth", "can-i", "list", "pods", "-n", ns, kubeconfig=kc, check=False)
    assert res.stdout.strip() == "yes"


def _isvc(name: str, min_replicas: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "predictor": {
                "minReplicas": min_replicas,
                "model": {
                    "modelFormat": {"name": "huggingface"},
                    "storageUri": "pvc://models/bert",
                    "resources": {"limits": {GPU_RESOURCE: "1"}},
                },
            }
        },
    }


def test_inferenceservice_schema_enforced(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "isvc")
    co = client.CustomObjectsApi(api)
    created = co.create_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", ns, "inferenceservices", _isvc("bert", 1)
    )
    assert created["metadata"]["uid"]
    got = co.get_namespaced_custom_object("serving.kserve.io", "v1beta1", ns, "inferenceservices", "bert")
    assert got["spec"]["predictor"]["minReplicas"] == 1
    assert got["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/bert"

    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("serving.kserve.io", "v1beta1", ns, "inferenceservices", _isvc("bad", "one"))
    assert e.value.status == 422
    body = json.loads(e.value.body)
    assert body["reason"] == "Invalid"
    assert "minReplicas" in body["message"]

    # a patch is validated as well
    with pytest.raises(ApiException) as e:
        co.patch_namespaced_custom_object(
            "serving.kserve.io",
            "v1beta1",
            ns,
            "inferenceservices",
            "bert",
            {"spec": {"predictor": {"minReplicas": "two"}}},
        )
    assert e.value.status == 422


def test_kubectl_logs_of_completed_job_pod(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "logs")
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    # the pod "runs" for 3 s, long enough to register its log before it completes
    batch.create_namespaced_job(ns, _job("talker", annotations={ANNOTATION_DURATION: "3s"}))
    pod = wait_until(lambda: (_job_pods(core, ns, "talker") or [None])[0], TIMEOUT, "the talker pod")
    text = "epoch 1 loss 0.42\nepoch 2 loss 0.17\ndone: model saved to pvc://models/bert\n"
    control_plane.set_pod_log(ns, pod.metadata.name, text)
    kind, _ = wait_until(lambda: _job_condition(batch, ns, "talker"), TIMEOUT, "job talker to finish")
    assert kind == "Complete"

    def logs() -> str | None:
        res = control_plane.kubectl("logs", "-n", ns, "job/talker", check=False)
        return res.stdout if res.returncode == 0 and res.stdout == text else None

    assert wait_until(logs, 15, "kubectl logs job/talker to return the text") == text
    assert core.read_namespaced_pod_log(pod.metadata.name, ns) == text
    tail = control_plane.kubectl("logs", "-n", ns, pod.metadata.name, "--tail=1").stdout
    assert tail == "done: model saved to pvc://models/bert\n"


def test_default_log_for_other_pods(control_plane: ControlPlane, api) -> None:
    ns = _ns(control_plane, "dlogs")
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    control_plane.set_default_log("hello from kwok\n")
    batch.create_namespaced_job(ns, _job("quiet"))
    wait_until(lambda: _job_condition(batch, ns, "quiet"), TIMEOUT, "job quiet to finish")
    pod = _job_pods(core, ns, "quiet")[0]
    assert core.read_namespaced_pod_log(pod.metadata.name, ns) == "hello from kwok\n"


def test_helm_install_reaches_ready(control_plane: ControlPlane, tmp_path: Path) -> None:
    chart = tmp_path / "mini"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: mini\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n")
    (chart / "values.yaml").write_text("replicas: 1\n")
    (chart / "templates" / "deploy.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {{{{ .Release.Name }}}}
        spec:
          replicas: {{{{ .Values.replicas }}}}
          selector:
            matchLabels: {{app: {{{{ .Release.Name }}}}}}
          template:
            metadata:
              labels: {{app: {{{{ .Release.Name }}}}}}
            spec:
              containers:
              - name: app
                image: {IMAGE}
        """)
    )
    ns = f"helm-{uuid.uuid4().hex[:6]}"
    control_plane.helm("install", "mini", str(chart), "-n", ns, "--create-namespace", "--wait", "--timeout", "60s")
    st = json.loads(control_plane.helm("status", "mini", "-n", ns, "-o", "json").stdout)
    assert st["info"]["status"] == "deployed"
    out = control_plane.kubectl("get", "deploy", "mini", "-n", ns, "-o", "jsonpath={.status.readyReplicas}")
    assert out.stdout == "1"
    control_plane.helm("uninstall", "mini", "-n", ns, "--wait", "--timeout", "60s")
