"""KServeController itself: it starts the real manager and leaves the control plane as it found it.

Runs before test_controller.py (file order) and only while no session controller runs: two managers would
share the webhook configuration names.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.chart.helm import required
from tests.k8s.cluster import ControlPlane
from tests.kserve.controller import NAMESPACE, KServeController, missing_files, versions

pytestmark = [pytest.mark.k8s, pytest.mark.kserve]

LABEL = "lsbert.test/kserve"


def _state(cp: ControlPlane) -> dict[str, object]:
    def names(*args: str) -> list[str]:
        return sorted(cp.kubectl("get", *args, "-o", "name").stdout.split())

    isvc_crd = json.loads(cp.kubectl("get", "crd", "inferenceservices.serving.kserve.io", "-o", "json").stdout)
    return {
        "crds": [n for n in names("crd") if n.endswith(".serving.kserve.io")],
        "isvc-crd-schema": json.dumps(isvc_crd["spec"]["versions"], sort_keys=True),
        "webhooks": names("mutatingwebhookconfigurations") + names("validatingwebhookconfigurations"),
        "namespace": cp.kubectl("get", "namespace", NAMESPACE, "--ignore-not-found", "-o", "name").stdout.strip(),
    }


def test_start_and_stop_leave_the_control_plane_as_found(control_plane: ControlPlane) -> None:
    version = versions()[-1]  # the oldest: its CRDs replace the control plane's newer ones while it runs
    if missing_files(version):
        msg = f"KServe {version} not built: run `bash tests/k8s/build-kserve.sh`"
        if required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    cp = control_plane
    if cp.kubectl("get", "validatingwebhookconfigurations", "-l", LABEL, "-o", "name").stdout.strip():
        pytest.skip("a KServe controller of the session is running")
    before = _state(cp)
    controller = KServeController(cp, version)
    try:
        controller.start()
        running = _state(cp)
        assert running["namespace"] == f"namespace/{NAMESPACE}"
        assert {
            "customresourcedefinition.apiextensions.k8s.io/trainedmodels.serving.kserve.io",
            "customresourcedefinition.apiextensions.k8s.io/inferencegraphs.serving.kserve.io",
        } <= set(running["crds"])  # type: ignore[arg-type]
        assert running["isvc-crd-schema"] != before["isvc-crd-schema"]  # the version's own schema
        assert (
            "validatingwebhookconfiguration.admissionregistration.k8s.io/inferenceservice.serving.kserve.io"
            in running["webhooks"]
        )  # type: ignore[operator]
        pid = controller.pid
        assert pid is not None
    finally:
        controller.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _state(cp) == before
