"""What only a real cluster shows, reported to the user: runs whose pod is never created or never starts, a trainer
pod deleted mid-run, and `helm uninstall` during a run."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster import harness, loop

pytestmark = [pytest.mark.cluster, pytest.mark.k8s, pytest.mark.labelstudio, pytest.mark.slow]


def _install(control_plane, namespace, name, images, ls, api_key, baseline, tmp_path, pv_for, **extra):
    storage_class = f"{name}-sc"
    pv_for(storage_class)
    values = harness.chart_values(
        images,
        ls_url=ls.url,
        api_key=api_key,
        baseline_dir=baseline,
        storage={"type": "pvc", "pvc": {"storageClassName": storage_class, "size": "1Gi", "keep": False}},
        extra=extra,
    )
    release = harness.install(control_plane, namespace, name, values, tmp_path)
    harness.wait_ready_predictor(release)
    return release


def test_runs_that_never_start_are_reported_within_minutes(
    control_plane, cluster_images, node_label_studio, ls_api_key, node_baseline, namespace, pv_for, tmp_path
):
    release = _install(
        control_plane,
        namespace,
        "lsbert-nostart",
        cluster_images,
        node_label_studio,
        ls_api_key,
        node_baseline,
        tmp_path,
        pv_for,
        trainer={"image": {"tag": "no-such-tag"}},
    )
    ctx = loop.connect(node_label_studio, release, "cluster never starts", 6)
    project = ctx["project"]
    loop.annotate(node_label_studio, ctx["task_ids"], ctx["truth"])

    # 1. A GPU quota of zero: the Job controller cannot create the pod (only FailedCreate events say so).
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}},
    }
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    t0 = time.monotonic()
    node_label_studio.request("POST", f"/api/ml/{ctx['backend']['id']}/train", json={"use_ground_truth": False})
    text = loop.reported(release, project.id, ("FailedCreate", "exceeded quota"), "the quota refusal in /health")
    print(f"quota refusal reported after {time.monotonic() - t0:.0f}s: {text[:300]}")
    assert "exceeded quota" in loop.status_in_pod(release) or "FailedCreate" in loop.status_in_pod(release)

    # 2. The quota goes, the pod is created, and its image does not exist on the node.
    control_plane.kubectl("delete", "resourcequota", "no-gpus", "-n", namespace)
    t0 = time.monotonic()
    text = loop.reported(
        release, project.id, ("ErrImageNeverPull", "ImagePullBackOff", "ErrImagePull"), "the missing image in /health"
    )
    print(f"missing image reported after {time.monotonic() - t0:.0f}s: {text[:300]}")


def test_trainer_pod_deleted_mid_run_fails_the_run_and_keeps_serving(
    control_plane, cluster_images, node_label_studio, ls_api_key, node_baseline, namespace, pv_for, tmp_path
):
    release = _install(
        control_plane,
        namespace,
        "lsbert-kill",
        cluster_images,
        node_label_studio,
        ls_api_key,
        node_baseline,
        tmp_path,
        pv_for,
    )
    ctx = loop.connect(node_label_studio, release, "cluster pod deleted", 120)
    project = ctx["project"]
    loop.annotate(node_label_studio, ctx["task_ids"], ctx["truth"])
    node_label_studio.request("POST", f"/api/ml/{ctx['backend']['id']}/train", json={"use_ground_truth": False})
    job = loop.wait_job(release, project.id)["metadata"]["name"]
    pod = loop.wait_trainer_pod(release, job)["metadata"]["name"]

    def training() -> bool:
        logs = control_plane.kubectl("logs", pod, "-n", namespace, check=False).stdout
        return "model:" in logs or "train" in logs.split("data:", 1)[-1]

    harness.wait_for(training, 180, "the trainer to start training")
    before = loop.served_version(release, project)  # the annotations' embedding head, by now
    control_plane.kubectl("delete", "pod", pod, "-n", namespace, "--wait=false")
    text = loop.reported(release, project.id, ('"failed"',), "the failed run in /health")
    after = loop.served_version(release, project)
    assert after == before and not loop.is_finetuned(after), (before, after)
    print(f"deleted trainer pod reported: {text[:300]}")


def test_helm_uninstall_during_a_run_leaves_nothing_running(
    control_plane, cluster_images, node_label_studio, ls_api_key, node_baseline, namespace, pv_for, tmp_path
):
    release = _install(
        control_plane,
        namespace,
        "lsbert-bye",
        cluster_images,
        node_label_studio,
        ls_api_key,
        node_baseline,
        tmp_path,
        pv_for,
    )
    ctx = loop.connect(node_label_studio, release, "cluster uninstall", 120)
    loop.annotate(node_label_studio, ctx["task_ids"], ctx["truth"])
    node_label_studio.request("POST", f"/api/ml/{ctx['backend']['id']}/train", json={"use_ground_truth": False})
    job = loop.wait_job(release, ctx["project"].id)["metadata"]["name"]
    loop.wait_trainer_pod(release, job)
    res = control_plane.helm("uninstall", release.name, "-n", namespace, "--wait", "--timeout", "2m", timeout=180)
    assert res.returncode == 0, res.stderr

    def gone() -> bool:
        return not release.jobs() and not [
            p for p in release.pods() if p["status"].get("phase") in ("Pending", "Running")
        ]

    try:
        harness.wait_for(gone, 90, "no Job and no running pod after helm uninstall", interval=2)
    except TimeoutError:
        raise AssertionError(harness.describe(release)) from None
