"""Deployment defects that only a real cluster shows, proved on the real node: a ReadWriteOnce claim (Recreate,
training kept on the predictor's node, a `helm upgrade` that does not deadlock, the refusals), a root-owned
volume (the clear reason without `volumePermissions`, a trainer writing as uid 10001 with it), the training
log command the install notes print, volumes that cannot bind or mount reported in `/health` and
`lsbert status`, and a GPU trainer without CUDA that stops with a clear message and fails the run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness, loop
from tests.support.labelstudio import LabelStudioError

pytestmark = [pytest.mark.cluster, pytest.mark.k8s, pytest.mark.labelstudio, pytest.mark.slow]


def _values(images, ls, api_key, baseline, storage_class: str, **extra: Any) -> dict[str, Any]:
    storage = {"type": "pvc", "pvc": {"storageClassName": storage_class, "size": "2Gi", "keep": False}}
    return harness.chart_values(
        images,
        ls_url=ls.url,
        api_key=api_key,
        baseline_dir=baseline,
        storage=storage,
        settings={"NUM_TRAIN_EPOCHS": 2},
        extra=extra,
    )


def _message(text: str) -> str:
    """The message of the active run, else of the last one, from the /health JSON of a project."""
    state = json.loads(text)
    return (state.get("active") or {}).get("message") or (state.get("last") or {}).get("message") or ""


def _start_training(ls, backend_id: int) -> None:
    """Start Training as the Label Studio UI does; a backend that refuses still answers Label Studio."""
    try:
        ls.request("POST", f"/api/ml/{backend_id}/train", json={"use_ground_truth": False})
    except LabelStudioError as exc:
        print(f"Label Studio answered Start Training with an error: {str(exc)[:300]}")


def _helm_template(cp, values: dict[str, Any], workdir: Path, name: str):
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return cp.helm("template", "lsbert-x", str(harness.CHART), "-f", str(path), check=False)


def _notes_commands(release: harness.Release) -> dict[str, list[str]]:
    """The `kubectl ... get jobs -l` and `kubectl ... logs -l` lines of the release notes, as argv lists."""
    notes = release.cp.helm("get", "notes", release.name, "-n", release.namespace).stdout
    found = {}
    for line in notes.splitlines():
        argv = shlex.split(line.strip()) if line.strip().startswith("kubectl ") else []
        if "logs" in argv and "-l" in argv:
            found["logs"] = argv
        elif "get" in argv and "jobs" in argv and "-l" in argv:
            found["jobs"] = argv
    assert set(found) == {"logs", "jobs"}, f"the notes print no training commands:\n{notes}"
    return found


def _run_printed(release: harness.Release, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A command exactly as the notes print it, with this cluster's kubeconfig (KUBECONFIG)."""
    assert argv[0] == "kubectl"
    return subprocess.run(
        [str(release.cp.binary("kubectl")), *argv[1:]],
        capture_output=True,
        text=True,
        check=False,
        env=release.cp.env(),
        timeout=timeout,
    )


def _tree_owners(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_uid for p in root.rglob("*")}


def test_rwo_claim_root_owned_volume_and_notes_log_command(
    control_plane, real_node, cluster_images, node_label_studio, ls_api_key, node_baseline, namespace, pv_for, tmp_path
):
    """A ReadWriteOnce claim on a root-owned volume: refused combinations, Recreate and co-location, the clear
    reason without volumePermissions, a `helm upgrade` that enables it (and does not deadlock), then a GPU
    training run on the predictor's node followed with the notes' `kubectl logs -l ... -f --prefix`."""
    t_test = time.monotonic()
    cp, ls = control_plane, node_label_studio
    storage_class = "rwo"
    volume = pv_for(storage_class, owner=None)
    volume.chmod(0o755)
    assert (volume.stat().st_uid, volume.stat().st_mode & 0o777) == (0, 0o755)
    rwo = {"storage": {"pvc": {"accessModes": ["ReadWriteOnce"]}}}
    values = _values(cluster_images, ls, ls_api_key, node_baseline, storage_class, **rwo)

    # 1a. What can never work is refused at render time, before anything reaches the cluster.
    refused = _helm_template(
        cp, harness._merge(values, {"storage": {"pvc": {"colocateTrainer": False}}}), tmp_path, "rwo-apart"
    )
    assert refused.returncode != 0 and "Multi-Attach" in refused.stderr, refused.stderr
    refused = _helm_template(
        cp, harness._merge(values, {"storage": {"pvc": {"accessModes": ["ReadWriteOncePod"]}}}), tmp_path, "rwop"
    )
    assert refused.returncode != 0 and "ReadWriteOncePod" in refused.stderr, refused.stderr

    t0 = time.monotonic()
    release = harness.install(cp, namespace, "lsbert-rwo", values, tmp_path)
    predictor = harness.wait_ready_predictor(release)
    install_s = time.monotonic() - t0
    ns, full = namespace, release.fullname
    deployment = json.loads(cp.kubectl("get", "deployment", full, "-n", ns, "-o", "json").stdout)
    assert deployment["spec"]["strategy"]["type"] == "Recreate", deployment["spec"]["strategy"]
    claim = json.loads(cp.kubectl("get", "pvc", f"{full}-checkpoints", "-n", ns, "-o", "json").stdout)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["status"]["phase"] == "Bound", claim["status"]
    assert "ReadWriteOnce: only one node can mount it" in cp.helm("get", "notes", release.name, "-n", ns).stdout

    ctx = loop.connect(ls, release, "cluster rwo root volume", 40)
    project, backend = ctx["project"], ctx["backend"]
    loop.annotate(ls, ctx["task_ids"], ctx["truth"])

    # 2a. Root-owned 0755 volume, no volumePermissions: uid 10001 cannot write, and /health says so.
    t0 = time.monotonic()
    _start_training(ls, backend["id"])
    text = loop.reported(release, project.id, ("permission denied",), "the permission error in /health", within=60)
    denied_s = time.monotonic() - t0
    assert "is owned by uid 0 gid 0 with mode 0755" in text and "volumePermissions.enabled=true" in text, text
    assert not release.jobs(), "a Job was created although the run could not reserve its version"
    assert not any(volume.iterdir()), "something was written to the root-owned volume"
    print(f"root-owned volume, no volumePermissions: reported after {denied_s:.0f}s: {_message(text)}")

    # 1b + 2b. helm upgrade with volumePermissions: Recreate rolls the predictor onto the RWO claim (no second
    # pod waits for it), the init container hands the directory to uid 10001.
    t0 = time.monotonic()
    values = harness._merge(values, {"volumePermissions": {"enabled": True}})
    values_file = tmp_path / "upgrade-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    res = cp.helm(
        "upgrade",
        release.name,
        str(harness.CHART),
        "-n",
        ns,
        "-f",
        str(values_file),
        "--wait",
        "--timeout",
        "4m",
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr + harness.describe(release)
    new_pod = harness.wait_ready_predictor(release)
    upgrade_s = time.monotonic() - t0
    assert new_pod["metadata"]["name"] != predictor["metadata"]["name"]
    init_log = cp.kubectl("logs", new_pod["metadata"]["name"], "-n", ns, "-c", "volume-permissions").stdout
    assert "prepared /volume for uid 10001 gid 10001" in init_log, init_log
    assert volume.stat().st_uid == harness.APP_UID, volume.stat()

    # 1c. The GPU training run lands on the predictor's node (required pod affinity) and writes the claim.
    t0 = time.monotonic()
    _start_training(ls, backend["id"])
    job = loop.wait_job(release, project.id)["metadata"]["name"]
    pod = loop.wait_trainer_pod(release, job, timeout=240)
    start_s = time.monotonic() - t0
    assert pod["spec"]["nodeName"] == new_pod["spec"]["nodeName"] == harness.NODE_NAME
    terms = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and t["labelSelector"]["matchLabels"].get("app.kubernetes.io/component") == "predictor"
        for t in terms
    ), terms
    assert pod["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == "1"
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == release.name and labels["lsbert.io/release"] == full, labels

    # 5. The commands the notes print, run as printed: the Job is listed, its progress lines follow.
    commands = _notes_commands(release)
    assert {"-f", "--prefix"} <= set(commands["logs"]), commands["logs"]
    listed = _run_printed(release, commands["jobs"], 60)
    assert listed.returncode == 0 and job in listed.stdout, listed.stdout + listed.stderr
    t0 = time.monotonic()
    followed = _run_printed(release, commands["logs"], 600)
    follow_s = time.monotonic() - t0
    lines = followed.stdout.splitlines()
    prefix = f"[pod/{pod['metadata']['name']}/trainer] "
    progress = [ln for ln in lines if ln.startswith(prefix) and harness.PROGRESS.search(ln)]
    assert followed.returncode == 0, followed.stderr
    assert progress, f"{shlex.join(commands['logs'])} showed no progress lines:\n{followed.stdout[-3000:]}"
    assert any(ln.startswith(prefix) and "save: version" in ln for ln in lines), followed.stdout[-3000:]

    text = loop.reported(release, project.id, ('"succeeded"',), "the finished run in /health")
    owners = _tree_owners(volume)
    assert any(name.endswith("config.json") for name in owners), sorted(owners)[:20]
    assert set(owners.values()) == {harness.APP_UID}, {k: v for k, v in owners.items() if v != harness.APP_UID}
    print(
        f"RWO figures: install {install_s:.0f}s, upgrade with volumePermissions (Recreate) {upgrade_s:.0f}s, "
        f"Start Training -> trainer Running {start_s:.0f}s, notes' logs -f ran {follow_s:.0f}s "
        f"({len(progress)} progress lines, e.g. {progress[0]!r}); {len(owners)} files on the volume, all uid "
        f"{harness.APP_UID}; test {time.monotonic() - t_test:.0f}s"
    )


def test_volumes_that_cannot_bind_or_mount_then_no_cuda(
    control_plane, real_node, cluster_images, node_label_studio, ls_api_key, node_baseline, namespace, pv_for, tmp_path
):
    """One training run that meets each obstacle in turn: a claim no PV can bind (ClaimPending), then a hostPath
    directory that does not exist (FailedMount, also in `lsbert status` inside the predictor pod), then, once
    the directory exists, a container given a GPU that has no CUDA: it stops with the message and the run fails."""
    t_test = time.monotonic()
    cp, ls, ns = control_plane, node_label_studio, namespace
    pv_for("main")
    scratch_class = f"{ns}-scratch"
    missing = real_node.dir / "volumes" / f"{ns}-missing"
    assert not missing.exists()
    values = _values(cluster_images, ls, ls_api_key, node_baseline, "main")
    trainer = values["trainer"]
    trainer["volumes"] = trainer["volumes"] + [
        {"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}},
        {"name": "missing", "hostPath": {"path": str(missing), "type": "Directory"}},
    ]
    trainer["volumeMounts"] = trainer["volumeMounts"] + [
        {"name": "scratch", "mountPath": "/mnt/scratch"},
        {"name": "missing", "mountPath": "/mnt/missing"},
    ]
    # The chart's default: a GPU trainer must see CUDA (the node's GPU is advertised, not real).
    del trainer["gpu"]["requireCuda"]
    assert yaml.safe_load((harness.CHART / "values.yaml").read_text())["trainer"]["gpu"]["requireCuda"] is True
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "scratch"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": scratch_class,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(claim))

    t0 = time.monotonic()
    release = harness.install(cp, ns, "lsbert-mount", values, tmp_path)
    harness.wait_ready_predictor(release)
    install_s = time.monotonic() - t0
    ctx = loop.connect(ls, release, "cluster mount and cuda", 8)
    project = ctx["project"]
    loop.annotate(ls, ctx["task_ids"], ctx["truth"])

    # 1. The claim cannot bind (no PV of its class): ClaimPending in /health and /versions.
    t0 = time.monotonic()
    _start_training(ls, ctx["backend"]["id"])
    text = loop.reported(release, project.id, ("ClaimPending",), "the unbound claim in /health")
    pending_s = time.monotonic() - t0
    versions = release.get("/versions", params={"project": project.id})
    assert "ClaimPending" in versions.text, versions.text
    print(f"unbound claim reported after {pending_s:.0f}s: {_message(text)}")

    # 2. A PV appears, the pod is scheduled, and its hostPath directory does not exist: FailedMount.
    t0 = time.monotonic()
    pv_for(scratch_class)
    text = loop.reported(release, project.id, ("FailedMount",), "the failed mount in /health")
    mount_s = time.monotonic() - t0
    assert str(missing) in text, text
    status = loop.status_in_pod(release)
    assert "FailedMount" in status, status
    status_s = time.monotonic() - t0
    print(
        f"failed mount reported after {mount_s:.0f}s (lsbert status in the pod after {status_s:.0f}s): "
        f"{_message(text)}\nlsbert status:\n{status[-1200:]}"
    )

    # 3. The directory appears, the container starts with a GPU it cannot use: it stops, the run fails.
    t0 = time.monotonic()
    missing.mkdir(parents=True)
    text = loop.reported(release, project.id, ('"failed"',), "the failed run in /health", within=300)
    cuda_s = time.monotonic() - t0
    assert "CUDA is not usable" in text, text
    job = next(j for j in release.jobs() if j["metadata"]["labels"].get("lsbert.io/project") == str(project.id))
    assert any(c["type"] == "Failed" and c["status"] == "True" for c in job["status"].get("conditions", [])), job
    pods = release.pods(f"job-name={job['metadata']['name']}")
    assert pods, harness.describe(release)
    container = pods[0]["spec"]["containers"][0]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == "1"
    assert {"name": "REQUIRE_CUDA", "value": "true"} in container["env"], container["env"]
    state = pods[0]["status"]["containerStatuses"][0]["state"]
    assert state.get("terminated", {}).get("exitCode", 0) != 0, state
    logs = cp.kubectl("logs", pods[0]["metadata"]["name"], "-n", ns).stdout
    assert "CUDA is not usable" in logs and "REQUIRE_CUDA=false" in logs, logs[-2000:]
    assert not re.search(r"epoch \d+/\d+", logs), "the trainer trained on the CPU while holding the GPU"
    print(f"no-CUDA run failed {cuda_s:.0f}s after the directory appeared: {_message(text)}")
    print(
        f"mount/CUDA figures: install {install_s:.0f}s, ClaimPending {pending_s:.0f}s, FailedMount {mount_s:.0f}s, "
        f"failed run {cuda_s:.0f}s; test {time.monotonic() - t_test:.0f}s"
    )
