"""Pytest plugin (loaded by tests/conftest.py): the real KServe controller on the test control plane.

``kserve_controller`` is a session fixture parametrised over the pinned KServe versions (newest first; narrow
them with ``LSBERT_KSERVE_VERSIONS=v0.20.0``): every test that uses it runs once per version, and pytest
stops one version's controller before it starts the next. It needs ``control_plane`` and builds nothing:
the binaries come from ``bash tests/k8s/build-kserve.sh``.

Missing files -> the tests are skipped with a loud message, except when ``CI`` is set (to anything but "",
"0", "false") or ``LSBERT_REQUIRE_K8S=1``: then they fail (the rule of tests/k8s/plugin.py).

The controller reconciles every InferenceService in the cluster and its webhooks see every one, so tests
marked ``kserve`` are moved after all others: the control plane is shared by the whole session, and the
tests written for a cluster without a KServe controller must not meet one.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import pytest

from tests.k8s.cluster import ControlPlane
from tests.kserve.controller import KServeController, missing_files, version_dir, versions

_STARTUP: list[str] = []


def _required() -> bool:
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("LSBERT_REQUIRE_K8S") == "1"


@pytest.fixture(scope="session", params=versions(), ids=lambda v: f"kserve-{v}")
def kserve_controller(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Iterator[KServeController]:
    version: str = request.param
    missing = missing_files(version)
    if missing:
        msg = (
            "\n" + "=" * 78 + "\n"
            f"KSERVE CONTROLLER TESTS NOT RUN for {version}: files missing in {version_dir(version)}:\n"
            f"    {', '.join(missing)}\n"
            "Build them once (about 12 min per version cold, cached afterwards) with:\n"
            "    bash tests/k8s/build-kserve.sh\n" + "=" * 78
        )
        if _required():
            pytest.fail(msg + "\n(CI / LSBERT_REQUIRE_K8S=1 is set, so this is an error)", pytrace=False)
        warnings.warn(msg, stacklevel=1)
        pytest.skip(msg)
    controller = KServeController(control_plane, version)
    controller.start()
    _STARTUP.append(
        f"kserve-controller {version} started in {controller.startup_seconds:.1f}s "
        f"(pid {controller.pid}, webhooks on 127.0.0.1:{controller.ports['webhook']})"
    )
    try:
        yield controller
    finally:
        controller.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``kserve`` last, in the order pytest chose for them (grouped by controller version);
    among them first those that start a controller of their own, before the session's starts."""
    others = [i for i in items if i.get_closest_marker("kserve") is None]
    if len(others) == len(items):
        return
    kserve = [i for i in items if i.get_closest_marker("kserve") is not None]
    own = [i for i in kserve if "kserve_controller" not in getattr(i, "fixturenames", ())]
    items[:] = others + own + [i for i in kserve if i not in own]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _STARTUP:
        terminalreporter.write_line(line)
