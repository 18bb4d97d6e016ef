"""The user's whole loop on the real node: Label Studio → Start Training → a Job → kubectl logs → swap → re-predict."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

import requests

from tests.cluster import harness
from tests.k8s.node import NODE_NAME
from tests.support.datasets import rotten_tomatoes
from tests.support.labelstudio import connect_backend, create_text_project, import_texts

LABELS = ("fresh", "rotten")


def connect(ls, release: harness.Release, title: str, n_tasks: int, seed: int = 3) -> dict[str, Any]:
    """A project with ``n_tasks`` texts connected to the release through its Service, with basic auth."""
    data = rotten_tomatoes(limit=n_tasks, seed=seed)
    client = ls.client()
    project = create_text_project(client, title, LABELS, from_name="verdict")
    task_ids = import_texts(client, project.id, [text for text, _ in data])
    user, password = harness.basic_auth()
    backend = connect_backend(
        ls,
        project.id,
        release.service_url(),
        title="lsbert",
        auth_method="BASIC_AUTH",
        basic_auth_user=user,
        basic_auth_pass=password,
    )
    assert backend["state"] == "CO", backend
    # Label Studio sends no credentials on event webhooks: give the one it registered the header (NOTES step 3).
    for hook in ls.request("GET", f"/api/webhooks/?project={project.id}").json():
        ls.request("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {"Authorization": harness.basic_header()}})
    truth = {task_id: label for task_id, (_, label) in zip(task_ids, data)}
    return {"project": project, "task_ids": task_ids, "truth": truth, "backend": backend}


def is_finetuned(version: str) -> bool:
    """A fine-tuned checkpoint's version, not what serves before one (zero-shot, the embedding head or the
    label prior, which annotating alone may switch between)."""
    return not version.startswith(("zeroshot-", "head-", "prior-"))


def served_version(release: harness.Release, project) -> str:
    setup = {"project": f"{project.id}.0", "schema": project.label_config}
    resp = release.post("/setup", json=setup)
    assert resp.status_code == 200, resp.text
    return resp.json()["model_version"]


def retrieve_predictions(ls, project_id: int, task_ids: list[int]) -> None:
    ls.request(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=180,
    )


def stored_versions(ls, task_ids: list[int]) -> set[str]:
    out: set[str] = set()
    for task_id in task_ids:
        out.update(p["model_version"] for p in ls.request("GET", f"/api/predictions/?task={task_id}").json())
    return out


def annotate(ls, task_ids: list[int], truth: dict[int, str]) -> None:
    for task_id in task_ids:
        ls.request(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            json={
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "text",
                        "type": "choices",
                        "value": {"choices": [truth[task_id]]},
                    }
                ]
            },
        )


def wait_job(release: harness.Release, project_id: int, timeout: float = 120) -> dict[str, Any]:
    def job() -> dict[str, Any] | None:
        jobs = [
            j for j in release.jobs() if j["metadata"].get("labels", {}).get("lsbert.io/project") == str(project_id)
        ]
        return jobs[0] if jobs else None

    try:
        return harness.wait_for(job, timeout, f"a training Job for project {project_id}")
    except TimeoutError:
        health = release.get("/health").json()
        raise AssertionError(f"no Job; /health: {health}\n{harness.describe(release)}") from None


def wait_trainer_pod(release: harness.Release, job_name: str, timeout: float = 180) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        for pod in release.pods(f"job-name={job_name}"):
            if pod["status"].get("phase") in ("Running", "Succeeded"):
                return pod
        return None

    try:
        return harness.wait_for(running, timeout, f"the pod of Job {job_name} running")
    except TimeoutError:
        raise AssertionError(harness.describe(release)) from None


def full_loop(
    ls,
    release: harness.Release,
    workdir,
    *,
    title: str,
    n_train: int = 200,
    n_check: int = 30,
    swap_timeout: float = 120,
    settle: Optional[Callable[[Any, str], None]] = None,
) -> dict:
    """Annotate, press Start Training, follow the Job's logs, wait for the swap, re-predict. Returns figures.

    ``settle(project, new_version)`` runs after the first answer with the new version and before Label Studio
    re-predicts: e.g. waiting for a rolling update, while old pods could still answer with the old version."""
    ctx = connect(ls, release, title, n_train + n_check)
    project, task_ids, truth = ctx["project"], ctx["task_ids"], ctx["truth"]
    train_ids, check_ids = task_ids[:n_train], task_ids[n_train:]
    before = served_version(release, project)
    retrieve_predictions(ls, project.id, check_ids)
    assert stored_versions(ls, check_ids) == {before}

    annotate(ls, train_ids, truth)
    t0 = time.monotonic()
    ls.request("POST", f"/api/ml/{ctx['backend']['id']}/train", json={"use_ground_truth": False})
    job = wait_job(release, project.id)
    job_name = job["metadata"]["name"]
    pod = wait_trainer_pod(release, job_name)
    # The GPU request was scheduled for real, onto the only node that offers one.
    assert pod["spec"]["nodeName"] == NODE_NAME
    limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
    assert limits.get("nvidia.com/gpu") == "1", limits
    follower = harness.LogFollower(release.cp, release.namespace, f"job/{job_name}", workdir / f"{job_name}.log")
    in_container: list[int] = []
    deadline = time.monotonic() + 600
    try:
        while follower.proc.poll() is None and time.monotonic() < deadline:
            in_container = in_container or harness.processes_under_shim("lsbert train")
            time.sleep(0.5)
    finally:
        follower.close()
    logs = follower.text()
    assert "download:" in logs and "save: version" in logs, f"kubectl logs -f showed:\n{logs[-3000:]}"
    assert in_container, "no `lsbert train` process ran under a containerd shim"

    def swapped() -> str | None:
        version = served_version(release, project)
        return version if is_finetuned(version) else None

    try:
        after = harness.wait_for(swapped, swap_timeout, "the predictor to serve the new version", interval=2)
    except TimeoutError:
        raise AssertionError(
            f"no swap. /health: {release.get('/health').json()}\nlogs:\n{logs[-3000:]}\n{harness.describe(release)}"
        ) from None
    if settle is not None:
        settle(project, after)
    loop_seconds = time.monotonic() - t0
    retrieve_predictions(ls, project.id, check_ids)
    assert after in stored_versions(ls, check_ids), "Label Studio did not store predictions of the new version"
    state = ls.request("GET", f"/api/ml/{ctx['backend']['id']}").json()
    assert state["state"] == "CO" and not state.get("error_message"), state
    return {
        "before": before,
        "after": after,
        "job": job_name,
        "logs": logs,
        "loop_seconds": loop_seconds,
        "project": project,
    }


def health(release: harness.Release) -> dict[str, Any]:
    resp = requests.get(release.service_url() + "/health", auth=harness.basic_auth(), timeout=5)
    return resp.json()


# How long a run's state (a refusal, a pending reason, the end of a run) may take to reach /health.
REPORT_WITHIN_S = 120


def training_report(release: harness.Release, project_id: int) -> dict[str, Any]:
    """The project's entry under "training" in the predictor's /health."""
    return health(release).get("training", {}).get(str(project_id), {})


def reported(
    release: harness.Release, project_id: int, needles: tuple[str, ...], what: str, within: float = REPORT_WITHIN_S
) -> str:
    """Wait until the project's training report mentions one of ``needles``; its JSON text."""

    def seen() -> str | None:
        text = json.dumps(training_report(release, project_id))
        return text if any(n in text for n in needles) else None

    try:
        return harness.wait_for(seen, within, what, interval=2)
    except TimeoutError:
        raise AssertionError(
            f"{what}: /health says {json.dumps(training_report(release, project_id))}\n{harness.describe(release)}"
        ) from None


def status_in_pod(release: harness.Release) -> str:
    """``lsbert status --kubernetes`` run inside a Ready predictor pod (stdout and stderr)."""
    pod = harness.wait_ready_predictor(release)["metadata"]["name"]
    res = release.cp.kubectl(
        "exec",
        pod,
        "-n",
        release.namespace,
        "--",
        "lsbert",
        "status",
        "--url",
        "http://127.0.0.1:8080",
        "--kubernetes",
        check=False,
        timeout=60,
    )
    return res.stdout + res.stderr
