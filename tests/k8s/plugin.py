"""Pytest plugin (loaded once by tests/conftest.py): a real Kubernetes control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok) on 127.0.0.1. Builds nothing: the binaries come from ``bash tests/k8s/build.sh``.

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
    cp = ControlPlane()
    cp.start()
    _STARTUP.append(
        f"k8s control plane {cp.versions['K8S_VERSION']} started in {cp.startup_seconds:.1f}s "
        f"(milestones: {cp.timings}) at {cp.server}"
    )
    try:
        yield cp
    finally:
        cp.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _STARTUP:
        terminalreporter.write_line(line)
