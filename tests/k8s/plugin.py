"""Pytest plugin (loaded once by tests/conftest.py): a real Kubernetes control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok) on 127.0.0.1. Builds nothing: the binaries come from ``bash tests/k8s/build.sh``.

When the session collected a test marked ``cluster``, the control plane also gets a real node (kubelet,
containerd, kube-proxy, CoreDNS: tests/k8s/node.py) and binds the node's bridge address instead of
127.0.0.1; the ``real_node`` fixture hands it out. ``LSBERT_REAL_NODE=0`` turns it off.

Missing binaries -> the k8s tests are skipped with a loud message, except when ``CI`` is set (to
anything but "", "0", "false") or ``LSBERT_REQUIRE_K8S=1``: then they fail.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import pytest

from tests.k8s.cluster import ControlPlane, default_bin_dir, missing_binaries

_STARTUP: list[str] = []
_WANT_REAL_NODE: list[bool] = [False]
_REAL_NODE_SKIPPED: list[str] = []


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a deselected cluster test needs no real node
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _WANT_REAL_NODE[0] = any(item.get_closest_marker("cluster") for item in items)


def _k8s_required() -> bool:
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("LSBERT_REQUIRE_K8S") == "1"


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    missing = missing_binaries()
    if missing:
        msg = (
            "\n" + "=" * 78 + "\n"
            "KUBERNETES CONTROL-PLANE TESTS NOT RUN: binaries missing in "
            f"{default_bin_dir()}:\n    {', '.join(missing)}\n"
            "Build them once (15-30 min cold, cached afterwards) with:\n"
            "    bash tests/k8s/build.sh\n" + "=" * 78
        )
        if _k8s_required():
            pytest.fail(msg + "\n(CI / LSBERT_REQUIRE_K8S=1 is set, so this is an error)", pytrace=False)
        warnings.warn(msg, stacklevel=1)
        pytest.skip(msg)
    real_node = _WANT_REAL_NODE[0] and os.environ.get("LSBERT_REAL_NODE", "1") != "0"
    if real_node:
        from tests.k8s.node import unmet_requirements

        why = unmet_requirements()
        if why:
            msg = "REAL-NODE (cluster) TESTS NOT RUN: " + "; ".join(why)
            if _k8s_required():
                pytest.fail(msg + "\n(CI / LSBERT_REQUIRE_K8S=1 is set, so this is an error)", pytrace=False)
            warnings.warn(msg, stacklevel=1)
            _REAL_NODE_SKIPPED.append(msg)
            real_node = False
    cp = ControlPlane(real_node=real_node)
    cp.start(timeout=300.0 if real_node else 90.0)
    _STARTUP.append(
        f"k8s control plane {cp.versions['K8S_VERSION']} started in {cp.startup_seconds:.1f}s "
        f"(milestones: {cp.timings}) at {cp.server}"
    )
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def real_node(control_plane: ControlPlane):
    """The control plane's real kubelet node (tests/k8s/node.py); skips (fails under CI) without one."""
    if control_plane.node is None:
        msg = _REAL_NODE_SKIPPED[0] if _REAL_NODE_SKIPPED else "the control plane was started without a real node"
        if _k8s_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return control_plane.node


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _STARTUP:
        terminalreporter.write_line(line)
