"""Why a training Job has not started, from what the cluster says about it: the Job's status and events,
its pod's conditions, container states and events.

ResourceQuota, Pod Security admission, OpenShift SCCs and LimitRanges never fail the Job: they leave a
``FailedCreate`` event on it and no pod. A pod that cannot be scheduled, mount its volumes or pull its image
stays Pending with only conditions and events to say why. This module turns them into one line,
``<Reason>: <the cluster's message>``. The reasons are stable (tests and users match on them):

=================== =====================================================================================
``Suspended``       the Job is suspended (queued by Kueue, or suspended by hand); never timed out
``FailedCreate``    the Job controller cannot create the pod (quota, Pod Security, SCC, LimitRange, ...)
``ClaimPending``    the pod waits for a PersistentVolumeClaim that is not bound (no class can provision it)
``Unschedulable``   no node fits (resources such as GPUs, selectors, taints, affinity)
``MultiAttach``     the volume is attached to another node (a ReadWriteOnce claim used on two nodes)
``FailedAttachVolume`` / ``FailedMount``  the volume cannot be attached or mounted (NFS permissions, ...)
``ErrImagePull`` / ``ImagePullBackOff`` / ``InvalidImageName``  the trainer image cannot be pulled
``ErrImageNeverPull`` the image is not on the node and imagePullPolicy is Never (air-gapped clusters)
``CreateContainerConfigError`` / ``CreateContainerError``  a missing Secret or ConfigMap key, ...
``PendingTimeout``  the launcher gave up after TRAINING_PENDING_TIMEOUT seconds (the last reason follows)
=================== =====================================================================================
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from lsbert.launcher.jobspec import timestamp

SUSPENDED = "Suspended"
FAILED_CREATE = "FailedCreate"
CLAIM_PENDING = "ClaimPending"
UNSCHEDULABLE = "Unschedulable"
MULTI_ATTACH = "MultiAttach"
FAILED_ATTACH = "FailedAttachVolume"
FAILED_MOUNT = "FailedMount"
PENDING_TIMEOUT = "PendingTimeout"
WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "ImageInspectError",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)
MESSAGE_LIMIT = 600


def _one_line(text: Optional[str]) -> str:
    return " ".join((text or "").split())


def _line(reason: str, message: Optional[str]) -> str:
    text = _one_line(message)
    return (f"{reason}: {text}" if text else reason)[:MESSAGE_LIMIT]


def _when(event) -> float:
    return (
        timestamp(getattr(event, "last_timestamp", None))
        or timestamp(getattr(event, "event_time", None))
        or timestamp(getattr(event, "first_timestamp", None))
        or timestamp(getattr(getattr(event, "metadata", None), "creation_timestamp", None))
        or 0.0
    )


def latest_warning(events: Iterable[Any], *reasons: str) -> Optional[Any]:
    """The most recent Warning event with one of ``reasons`` (any reason when none are given)."""
    found = [e for e in events if (e.type or "Warning") == "Warning" and (not reasons or e.reason in reasons)]
    return max(found, key=_when) if found else None


def _scheduling(message: str) -> str:
    lowered = message.lower()
    if "unbound" in lowered and "persistentvolumeclaim" in lowered:
        return CLAIM_PENDING
    if "persistentvolumeclaim" in lowered and "not found" in lowered:
        return CLAIM_PENDING
    return UNSCHEDULABLE


def diagnose(job, pods: list, job_events: Iterable[Any], pod_events: Iterable[Any]) -> str:
    """One line saying why ``job`` has no running pod yet; "" when nothing is wrong (yet).

    ``pods``: the Job's pods, oldest first; ``pod_events``: the events of the newest pod."""
    job_events, pod_events = list(job_events), list(pod_events)
    if job.spec is not None and job.spec.suspend:
        return _line(SUSPENDED, "the Job is suspended (queued, e.g. by Kueue); it starts when admitted")
    pod = pods[-1] if pods else None
    if pod is None:
        event = latest_warning(job_events, FAILED_CREATE)
        return _line(FAILED_CREATE, event.message) if event is not None else ""
    status = pod.status
    for cond in (status.conditions if status else None) or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            event = latest_warning(pod_events, "FailedScheduling")
            message = (event.message if event is not None else None) or cond.message or ""
            return _line(_scheduling(message), message)
    event = latest_warning(pod_events, FAILED_ATTACH, FAILED_MOUNT)
    if event is not None:
        if "multi-attach" in (event.message or "").lower():
            return _line(MULTI_ATTACH, event.message)
        return _line(event.reason, event.message)
    for cstatus in ((status.init_container_statuses or []) + (status.container_statuses or [])) if status else []:
        waiting = cstatus.state.waiting if cstatus.state else None
        if waiting is not None and waiting.reason in WAITING_REASONS:
            return _line(waiting.reason, waiting.message)
    event = latest_warning(pod_events, "FailedScheduling")
    if event is not None and status is not None and status.phase == "Pending" and not status.container_statuses:
        return _line(_scheduling(event.message or ""), event.message)
    return ""


def timed_out(reason: str, seconds: float) -> str:
    """The message of a run failed by TRAINING_PENDING_TIMEOUT."""
    why = f"; {reason}" if reason else "; the cluster gave no reason"
    return _line(PENDING_TIMEOUT, f"the training pod did not start within {int(seconds)}s{why}")
