"""lsbert on a real node, as a user runs it: `helm install` with the images built from images/, Label Studio
connecting through the Service, Start Training making a GPU Job whose container trains and writes a checkpoint,
`kubectl logs -f` showing it, and the predictor swapping to it. Pods run for real (containerd + runc); the GPU
is an extended resource the node advertises, so the Job's container trains on the CPU."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.cluster import harness, loop
from tests.k8s.node import NODE_NAME, TOLERATIONS

pytestmark = [pytest.mark.cluster, pytest.mark.k8s, pytest.mark.labelstudio, pytest.mark.slow]


@pytest.fixture(scope="module")
def pvc_release(
    control_plane, real_node, cluster_images, node_label_studio, ls_api_key, node_baseline, tmp_path_factory
):
    """One release in plain-Deployment mode with checkpoints on a PVC bound to a real local volume."""
    ns = f"lsb-pvc-{uuid.uuid4().hex[:6]}"
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
    )
    work = tmp_path_factory.mktemp("pvc-release")
    release = harness.install(control_plane, ns, "lsbert", values, work)
    release.pvs.append(ns)
    release.volume = volume  # type: ignore[attr-defined]
    try:
        yield release
    finally:
        if os.environ.get("LSBERT_K8S_KEEP") != "1":
            control_plane.helm("uninstall", "lsbert", "-n", ns, "--wait", "--timeout", "2m", check=False, timeout=150)
            control_plane.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s", check=False, timeout=150)
            control_plane.kubectl("delete", "pv", ns, "--wait=false", check=False)


def test_helm_install_runs_real_pods_as_the_chart_says(pvc_release):
    cp, ns = pvc_release.cp, pvc_release.namespace
    pod = harness.wait_ready_predictor(pvc_release)
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == NODE_NAME
    # Ready means the chart's startup and readiness probes passed against the real server.
    probes = pod["spec"]["containers"][0]
    assert (
        probes["startupProbe"]["httpGet"]["path"] == probes["readinessProbe"]["httpGet"]["path"] == "/v1/models/lsbert"
    )
    uid = cp.kubectl("exec", name, "-n", ns, "--", "id", "-u").stdout.strip()
    assert uid == str(harness.APP_UID)
    write = cp.kubectl("exec", name, "-n", ns, "--", "python", "-c", "open('/opt/lsbert-probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in (write.stderr + write.stdout)
    assert harness.processes_under_shim("lsbert serve"), "no `lsbert serve` process runs under a containerd shim"
    # `helm test` runs its pod on the node (the predictor's scheduling values) and GETs /health through DNS.
    res = cp.helm("test", "lsbert", "-n", ns, "--logs", "--timeout", "3m", check=False, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr + harness.describe(pvc_release)
    assert " 200 " in res.stdout and "svc.cluster.local" in res.stdout, res.stdout


def test_notes_url_answers_from_inside_the_cluster(pvc_release, cluster_images):
    """The exact URL NOTES.txt prints (a DNS name) answers /health from a pod: CoreDNS + kube-proxy for real."""
    cp, ns = pvc_release.cp, pvc_release.namespace
    url = pvc_release.notes_url()
    assert url.startswith(f"http://{pvc_release.fullname}.{ns}.svc.cluster.local"), url
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "notes-url-check"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": harness.NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": harness.APP_UID},
            "containers": [
                {
                    "name": "check",
                    "image": cluster_images.predictor,
                    "imagePullPolicy": "Never",
                    "command": [
                        "python",
                        "-c",
                        "import sys, urllib.request; r = urllib.request.urlopen(sys.argv[1], "
                        "timeout=10); print(r.status, r.read().decode())",
                        url + "/health",
                    ],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))

    def finished() -> str | None:
        phase = json.loads(cp.kubectl("get", "pod", "notes-url-check", "-n", ns, "-o", "json").stdout)["status"].get(
            "phase"
        )
        return phase if phase in ("Succeeded", "Failed") else None

    phase = harness.wait_for(finished, 120, "the URL check pod to finish")
    logs = cp.kubectl("logs", "notes-url-check", "-n", ns).stdout
    assert phase == "Succeeded" and logs.startswith("200 "), logs
    assert json.loads(logs.split(" ", 1)[1])["status"] == "UP"


def test_label_studio_connects_through_the_service_with_basic_auth(pvc_release, node_label_studio):
    ls = node_label_studio
    ctx = loop.connect(ls, pvc_release, "cluster predictions", 12)
    version = loop.served_version(pvc_release, ctx["project"])
    loop.retrieve_predictions(ls, ctx["project"].id, ctx["task_ids"])
    for task_id in ctx["task_ids"]:
        predictions = ls.request("GET", f"/api/predictions/?task={task_id}").json()
        assert [p["model_version"] for p in predictions] == [version]
        assert predictions[0]["result"][0]["value"]["choices"][0] in loop.LABELS
    # Without credentials the Label Studio routes refuse, /health stays open for probes.
    url = pvc_release.service_url()
    import requests

    assert requests.post(url + "/predict", json={"tasks": []}, timeout=10).status_code == 401
    assert requests.get(url + "/health", timeout=10).status_code == 200


def test_start_training_runs_a_gpu_job_that_writes_the_pvc_and_the_predictor_swaps(
    pvc_release, node_label_studio, tmp_path
):
    figures = loop.full_loop(node_label_studio, pvc_release, tmp_path, title="cluster training pvc")
    # The checkpoint is on the local volume, written by the trainer as uid 10001.
    files = [p for p in pvc_release.volume.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files), [str(p) for p in files][:20]
    owners = {p.stat().st_uid for p in files}
    assert owners == {harness.APP_UID}, owners
    print(
        f"cluster loop (PVC): Start Training -> new version served in {figures['loop_seconds']:.0f}s "
        f"({figures['before']} -> {figures['after']})"
    )


def test_start_training_with_checkpoints_in_s3(
    control_plane, real_node, cluster_images, node_label_studio, ls_api_key, node_baseline, node_s3, namespace, tmp_path
):
    bucket = f"lsbert-{uuid.uuid4().hex[:8]}"
    node_s3["client"].create_bucket(Bucket=bucket)
    values = harness.chart_values(
        cluster_images,
        ls_url=node_label_studio.url,
        api_key=ls_api_key,
        baseline_dir=node_baseline,
        storage={
            "type": "s3",
            "s3": {
                "uri": f"s3://{bucket}/models",
                "endpoint": node_s3["endpoint"],
                "region": "us-east-1",
                "addressingStyle": "path",
                "accessKeyId": node_s3["aws_access_key_id"],
                "secretAccessKey": node_s3["aws_secret_access_key"],
            },
        },
    )
    release = harness.install(control_plane, namespace, "lsbert-s3", values, tmp_path)
    harness.wait_ready_predictor(release)
    figures = loop.full_loop(node_label_studio, release, tmp_path, title="cluster training s3")
    keys = [o["Key"] for o in node_s3["client"].list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    print(f"cluster loop (S3): Start Training -> new version served in {figures['loop_seconds']:.0f}s")
