"""Helpers of the real-node tests: chart values for this node, releases, PVs, Label Studio and process checks.

Everything a test creates lives in its own namespace (deleted at the end) plus cluster-scoped
PersistentVolumes named after that namespace (deleted with it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.k8s.cluster import ControlPlane, wait_until
from tests.k8s.node import NODE_IP, NODE_NAME, TOLERATIONS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
APP_UID = 10001
# Every lsbert pod of these tests runs on the real node: the kwok nodes would only pretend to run it.
NODE_SELECTOR = {"lsbert.test/pool": "real"}
BASELINE_MOUNT = "/opt/lsbert/baseline"
AUTH_USER = "ls"
AUTH_PASSWORD = "pw-" + uuid.uuid4().hex[:12]
PROGRESS = re.compile(r"epoch \d+/\d+|step \d+", re.IGNORECASE)


def chart_values(
    images: Any,
    *,
    ls_url: str,
    api_key: str,
    baseline_dir: Path,
    storage: dict[str, Any],
    settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Values for a plain-Deployment release whose pods and training Jobs run on the real node."""
    volume = {"name": "baseline", "hostPath": {"path": str(baseline_dir), "type": "Directory"}}
    mount = {"name": "baseline", "mountPath": BASELINE_MOUNT, "readOnly": True}
    pred_repo, pred_tag = images.predictor.rsplit(":", 1)
    train_repo, train_tag = images.trainer.rsplit(":", 1)
    values: dict[str, Any] = {
        "kserve": {"enabled": False},
        "image": {"repository": pred_repo, "tag": pred_tag, "pullPolicy": "Never"},
        "model": {"baseline": BASELINE_MOUNT},
        "nodeSelector": NODE_SELECTOR,
        "tolerations": TOLERATIONS,
        "extraVolumes": [volume],
        "extraVolumeMounts": [mount],
        # Two shared cores: small requests so the predictor and a trainer fit side by side.
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "4Gi"}},
        "probes": {"startup": {"periodSeconds": 2, "failureThreshold": 150}, "readiness": {"periodSeconds": 3}},
        "labelStudio": {"url": ls_url, "apiKey": api_key},
        "basicAuth": {"enabled": True, "user": AUTH_USER, "password": AUTH_PASSWORD},
        "rollout": {"pollSeconds": 2},
        "settings": {
            "LOG_LEVEL": "INFO",
            "START_TRAINING_EACH_N_UPDATES": 0,
            "THREADS": 4,
            "NUM_TRAIN_EPOCHS": 4,
            "LEARNING_RATE": "1e-4",
            **(settings or {}),
        },
        "storage": storage,
        "trainer": {
            "image": {"repository": train_repo, "tag": train_tag, "pullPolicy": "Never"},
            # The GPU request is real (the node advertises nvidia.com/gpu); the container trains on the CPU.
            "gpu": {"enabled": True, "nodeSelector": NODE_SELECTOR, "requireCuda": False},
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "volumes": [volume],
            "volumeMounts": [mount],
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "6Gi"}},
        },
    }
    return _merge(values, extra or {})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def basic_auth() -> tuple[str, str]:
    return AUTH_USER, AUTH_PASSWORD


def basic_header() -> str:
    return "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()


@dataclass
class Release:
    cp: ControlPlane
    namespace: str
    name: str
    values: dict[str, Any]
    workdir: Path
    install_output: str = ""
    pvs: list[str] = field(default_factory=list)
    # The predictor Service when it is not the chart's plain one (KServe makes "<fullname>-predictor").
    service: str = ""

    @property
    def fullname(self) -> str:
        return self.name if "lsbert" in self.name else f"{self.name}-lsbert"

    def service_url(self) -> str:
        """The predictor Service's ClusterIP URL (reachable from this host through kube-proxy)."""
        svc = self.cp.kubectl("get", "svc", self.service or self.fullname, "-n", self.namespace, "-o", "json").stdout
        spec = json.loads(svc)["spec"]
        return f"http://{spec['clusterIP']}:{spec['ports'][0]['port']}"

    def notes_url(self) -> str:
        """The in-cluster URL that NOTES.txt tells the user to paste into Label Studio."""
        notes = self.cp.helm("get", "notes", self.name, "-n", self.namespace).stdout
        m = re.search(r"paste this URL:\s*\n\s*(\S+)", notes)
        assert m, f"no URL in the release notes:\n{notes}"
        return m.group(1)

    def predictor_pods(self) -> list[dict[str, Any]]:
        out = self.cp.kubectl(
            "get", "pods", "-n", self.namespace, "-l", "app.kubernetes.io/component=predictor", "-o", "json"
        ).stdout
        return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self.cp.kubectl("get", "jobs", "-n", self.namespace, "-o", "json").stdout)["items"]

    def pods(self, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", "pods", "-n", self.namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.cp.kubectl(*args).stdout)["items"]

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.service_url() + path, auth=basic_auth(), timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.service_url() + path, auth=basic_auth(), timeout=kw.pop("timeout", 30), **kw)


def create_hostpath_pv(
    cp: ControlPlane, name: str, path: Path, storage_class: str, *, owner: int | None = APP_UID, size: str = "2Gi"
) -> None:
    """A PersistentVolume backed by a directory of this host, on the real node (what a local provisioner makes)."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, owner, owner)
    path.chmod(0o775)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"lsbert.test/pv": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            "hostPath": {"path": str(path), "type": "Directory"},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                            ]
                        }
                    ]
                }
            },
        },
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(pv))


def install(
    cp: ControlPlane,
    namespace: str,
    name: str,
    values: dict[str, Any],
    workdir: Path,
    *,
    wait: bool = True,
    timeout: str = "6m",
) -> Release:
    workdir.mkdir(parents=True, exist_ok=True)
    values_file = workdir / f"{name}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    args = ["install", name, str(CHART), "-n", namespace, "-f", str(values_file)]
    if wait:
        args += ["--wait", "--timeout", timeout]
    res = cp.helm(*args, timeout=420, check=False)
    release = Release(cp, namespace, name, values, workdir, install_output=res.stdout)
    if res.returncode != 0:
        raise AssertionError(f"helm install failed:\n{res.stdout}\n{res.stderr}\n{describe(release)}")
    return release


def describe(release: Release) -> str:
    """Pods, events and container logs of a namespace: what a failing test prints."""
    cp, ns = release.cp, release.namespace
    parts = [cp.kubectl("get", "all,pvc,events", "-n", ns, "-o", "wide", check=False).stdout]
    for pod in release.pods():
        name = pod["metadata"]["name"]
        parts.append(f"--- logs of {name}")
        parts.append(cp.kubectl("logs", name, "-n", ns, "--all-containers", "--tail=60", check=False).stdout)
    return "\n".join(parts)


def wait_ready_predictor(release: Release, timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        for pod in release.predictor_pods():
            conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conds.get("Ready") == "True":
                return pod
        return None

    try:
        return wait_until(ready, timeout, "a Ready predictor pod", interval=1)
    except TimeoutError:
        raise AssertionError(describe(release)) from None


def processes_under_shim(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` and that descend from a containerd shim (run in a container)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle not in cmd:
            continue
        pid = int(d.name)
        for _ in range(10):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid <= 1:
                break
            try:
                comm = Path(f"/proc/{ppid}/comm").read_text().strip()
            except OSError:
                break
            if comm.startswith("containerd-shim"):
                found.append(int(d.name))
                break
            pid = ppid
    return found


class LogFollower:
    """`kubectl logs -f job/<name>` in the background, as a user would run it."""

    def __init__(self, cp: ControlPlane, namespace: str, target: str, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb")
        self.proc = subprocess.Popen(
            [str(cp.binary("kubectl")), "logs", "-f", target, "-n", namespace, "--pod-running-timeout=3m"],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=cp.env(),
            start_new_session=True,
        )

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


def copy_baseline(src: Path, dst: Path) -> Path:
    """The baseline model in a directory the pods mount read-only (hostPath)."""
    if not (dst / "config.json").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        for p in [dst, *dst.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def wait_for(pred: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
    return wait_until(pred, timeout, what, interval=interval)


def now() -> float:
    return time.monotonic()


__all__ = ["NODE_IP", "NODE_NAME"]
