"""Why a training Job has not started: the reasons the launcher reads from the Job, its pod and their events
(offline, on the Kubernetes client's own models), and the pending timeout that fails such a run."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from kubernetes import client

from lsbert.launcher import pending
from lsbert.launcher.base import Run, RunPhase
from lsbert.launcher.kubernetes import KubernetesLauncher

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def job(*, suspend=False, age_s=60.0, started=True):
    created = NOW - timedelta(seconds=age_s)
    return client.V1Job(
        metadata=client.V1ObjectMeta(
            name="rel-lsbert-train-p3-0004",
            creation_timestamp=created,
            labels={"lsbert.io/project": "3"},
            annotations={"lsbert.io/version": "ft-0004"},
        ),
        spec=client.V1JobSpec(suspend=suspend, template=client.V1PodTemplateSpec()),
        status=client.V1JobStatus(start_time=created if started else None),
    )


def pod(*, scheduled=True, scheduling_message="", waiting=None, init_waiting=None):
    conditions = [
        client.V1PodCondition(
            type="PodScheduled",
            status="True" if scheduled else "False",
            reason=None if scheduled else "Unschedulable",
            message=scheduling_message or None,
        )
    ]

    def statuses(reason, name):
        if reason is None:
            return None
        return [
            client.V1ContainerStatus(
                name=name,
                image="i",
                image_id="",
                ready=False,
                restart_count=0,
                state=client.V1ContainerState(
                    waiting=client.V1ContainerStateWaiting(reason=reason, message=f"{reason} detail")
                ),
            )
        ]

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="rel-lsbert-train-p3-0004-abcde", creation_timestamp=NOW),
        status=client.V1PodStatus(
            phase="Pending",
            conditions=conditions,
            container_statuses=statuses(waiting, "trainer"),
            init_container_statuses=statuses(init_waiting, "init"),
        ),
    )


def event(reason, message, *, kind="Pod", type_="Warning", age_s=5.0):
    return client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"e-{reason}"),
        reason=reason,
        message=message,
        type=type_,
        involved_object=client.V1ObjectReference(kind=kind, name="x"),
        last_timestamp=NOW - timedelta(seconds=age_s),
    )


QUOTA = (
    'pods "rel-lsbert-train-p3-0004-x" is forbidden: exceeded quota: gpu, requested: '
    "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1, limited: requests.nvidia.com/gpu=1"
)
PSA = (
    'Error creating: pods "rel-lsbert-train-p3-0004-x" is forbidden: violates PodSecurity "restricted:latest": '
    "runAsNonRoot != true"
)


@pytest.mark.parametrize(
    "what, args, expected",
    [
        ("quota", {"pods": [], "job_events": [event("FailedCreate", QUOTA, kind="Job")]}, f"FailedCreate: {QUOTA}"),
        (
            "pod security, newest event wins",
            {
                "pods": [],
                "job_events": [
                    event("FailedCreate", "old", kind="Job", age_s=50),
                    event("FailedCreate", PSA, kind="Job", age_s=1),
                ],
            },
            f"FailedCreate: {PSA}",
        ),
        (
            "no pod, no event",
            {"pods": [], "job_events": [event("SuccessfulCreate", "ok", kind="Job", type_="Normal")]},
            "",
        ),
        (
            "no GPU node",
            {
                "pods": [
                    pod(scheduled=False, scheduling_message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
                ],
                "pod_events": [event("FailedScheduling", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")],
            },
            "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
        (
            "claim never bound",
            {
                "pods": [pod(scheduled=False)],
                "pod_events": [
                    event(
                        "FailedScheduling", "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims."
                    )
                ],
            },
            "ClaimPending: 0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
        ),
        (
            "RWO claim on another node",
            {
                "pods": [pod()],
                "pod_events": [
                    event(
                        "FailedAttachVolume",
                        'Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) rel-lsbert-5d9',
                    )
                ],
            },
            'MultiAttach: Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) rel-lsbert-5d9',
        ),
        (
            "NFS mount refused",
            {
                "pods": [pod()],
                "pod_events": [event("FailedMount", "MountVolume.SetUp failed: mount.nfs: access denied")],
            },
            "FailedMount: MountVolume.SetUp failed: mount.nfs: access denied",
        ),
        ("image", {"pods": [pod(waiting="ImagePullBackOff")]}, "ImagePullBackOff: ImagePullBackOff detail"),
        (
            "image not on an air-gapped node",
            {"pods": [pod(waiting="ErrImageNeverPull")]},
            "ErrImageNeverPull: ErrImageNeverPull detail",
        ),
        (
            "init container secret",
            {"pods": [pod(init_waiting="CreateContainerConfigError")]},
            "CreateContainerConfigError: CreateContainerConfigError detail",
        ),
        ("still creating", {"pods": [pod(waiting="ContainerCreating")]}, ""),
    ],
)
def test_reasons(what, args, expected):
    got = pending.diagnose(job(), args.get("pods", []), args.get("job_events", []), args.get("pod_events", []))
    assert got == expected, what


def test_suspended_jobs_are_queued_not_broken():
    assert pending.diagnose(job(suspend=True), [], [event("FailedCreate", QUOTA, kind="Job")], []).startswith(
        "Suspended: "
    )


def test_messages_are_one_bounded_line():
    got = pending.diagnose(job(), [], [event("FailedCreate", "a\nb  " + "x" * 2000, kind="Job")], [])
    assert "\n" not in got and got.startswith("FailedCreate: a b x") and len(got) <= pending.MESSAGE_LIMIT


# ------------------------------------------------------------------------- the launcher's timeout


@pytest.fixture()
def unreachable_launcher():
    """A launcher whose API server refuses connections: events, pods and the delete all fail, as they may in
    a real cluster; the run must still be failed by the timeout."""
    config = client.Configuration()
    config.host = "http://127.0.0.1:9"
    api = client.ApiClient(config)
    launcher = KubernetesLauncher(api, "ml", values={"image": "i"}, release="rel-lsbert", pending_timeout=600)
    yield launcher
    api.close()


def test_pending_timeout_fails_the_run(unreachable_launcher):
    launcher = unreachable_launcher
    run = Run(project=3, version="ft-0004", run_id="rel-lsbert-train-p3-0004")
    young, old = job(age_s=30), job(age_s=601)
    assert not launcher._pending_too_long(young, now=NOW.timestamp())
    assert launcher._pending_too_long(old, now=NOW.timestamp())
    assert not launcher._pending_too_long(job(age_s=601, suspend=True), now=NOW.timestamp())
    old.metadata.creation_timestamp = datetime.now(timezone.utc) - timedelta(seconds=700)
    old.status.start_time = old.metadata.creation_timestamp
    launcher._update(run, old)
    assert run.phase is RunPhase.FAILED
    assert run.message == "PendingTimeout: the training pod did not start within 600s; the cluster gave no reason"
    launcher.pending_timeout = 0
    assert not launcher._pending_too_long(old)


def test_timeout_starts_when_a_queued_job_is_admitted(unreachable_launcher):
    resumed = job(age_s=3600)
    resumed.status.start_time = NOW - timedelta(seconds=60)  # Kueue admitted it a minute ago
    assert not unreachable_launcher._pending_too_long(resumed, now=NOW.timestamp())


def test_owner_lookup_failure_launches_without_owner(unreachable_launcher, caplog):
    unreachable_launcher.owner_configmap = "rel-lsbert-job-values"
    assert unreachable_launcher.owner() is None
    assert "rel-lsbert-job-values" in caplog.text
    body = unreachable_launcher.render(3, "ft-0004", owner=unreachable_launcher.owner())
    assert "ownerReferences" not in body["metadata"]
