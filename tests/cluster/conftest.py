"""Fixtures of the real-node tests: the built images in the node's containerd, a Label Studio that pods can
reach, the baseline model on the node, one namespace per test, and an S3-compatible server on the bridge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import harness
from tests.k8s.cluster import ControlPlane
from tests.k8s.node import NODE_IP


@pytest.fixture(scope="session")
def cluster_images(real_node):
    """Both images built from images/ (cached by a hash of their inputs) and loaded into the node."""
    from tests.cluster.images import ensure_images, load_into_containerd
    from tests.k8s.node import CONTAINERD_SOCKET

    t0 = time.monotonic()
    images = ensure_images()
    load_into_containerd(CONTAINERD_SOCKET, images=images)
    print(f"images ready on the node in {time.monotonic() - t0:.0f}s: {images}")
    return images


@pytest.fixture(scope="session")
def node_label_studio(real_node) -> Iterator:
    """A real Label Studio 1.23.2 on the node's bridge address: the trainer pods download annotations from it."""
    from tests.support.labelstudio import LabelStudio, LabelStudioError

    server = LabelStudio(host=NODE_IP, startup_timeout=float(os.environ.get("LSBERT_LS_STARTUP_TIMEOUT", "300")))
    try:
        server.start()
    except LabelStudioError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls_api_key(node_label_studio) -> str:
    return node_label_studio.create_personal_access_token()


@pytest.fixture(scope="session")
def node_baseline(real_node, minilm_path) -> Path:
    assert real_node.dir is not None
    return harness.copy_baseline(minilm_path, real_node.dir / "baseline")


@pytest.fixture
def namespace(control_plane: ControlPlane, request) -> Iterator[str]:
    """A fresh namespace; deleted afterwards with its PersistentVolumes and whatever the test left in it."""
    name = f"lsb-{request.node.name[5:20].replace('_', '-').strip('-').lower()}-{uuid.uuid4().hex[:5]}"
    control_plane.create_namespace(name)
    try:
        yield name
    finally:
        if os.environ.get("LSBERT_K8S_KEEP") != "1":
            control_plane.helm(
                "uninstall",
                "--ignore-not-found",
                "--wait",
                "--timeout",
                "2m",
                *_releases(control_plane, name),
                "-n",
                name,
                check=False,
                timeout=150,
            )
            control_plane.kubectl(
                "delete", "namespace", name, "--wait=true", "--timeout=120s", check=False, timeout=150
            )
            control_plane.kubectl("delete", "pv", "-l", f"lsbert.test/namespace={name}", "--wait=false", check=False)


def _releases(cp: ControlPlane, namespace: str) -> list[str]:
    out = cp.helm("list", "-n", namespace, "-q", check=False).stdout.split()
    return out or ["none"]


@pytest.fixture
def pv_for(control_plane: ControlPlane, real_node, namespace):
    """Makes a hostPath PersistentVolume for this test's claim: ``pv_for(storage_class, owner=10001)``."""
    made: list[Path] = []

    def make(storage_class: str, *, owner: int | None = harness.APP_UID) -> Path:
        path = real_node.dir / "volumes" / f"{namespace}-{storage_class}"
        harness.create_hostpath_pv(control_plane, f"{namespace}-{storage_class}", path, storage_class, owner=owner)
        control_plane.kubectl("label", "pv", f"{namespace}-{storage_class}", f"lsbert.test/namespace={namespace}")
        made.append(path)
        return path

    return make


@pytest.fixture(scope="session")
def node_s3(real_node) -> Iterator[dict]:
    """A real S3-compatible server (moto) on the bridge address, reachable from the pods."""
    import boto3

    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        port = s.getsockname()[1]
    log = open(real_node.dir / "logs" / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", NODE_IP, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://{NODE_IP}:{port}"
    creds = {"aws_access_key_id": "lsbert-test", "aws_secret_access_key": "lsbert-test-" + uuid.uuid4().hex[:8]}
    deadline = time.monotonic() + 60
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
    while True:
        try:
            s3.list_buckets()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    try:
        yield {"endpoint": endpoint, "client": s3, **creds}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
