"""The InferenceService the chart renders is one every supported KServe version accepts (0.15 and later).

What KServe 0.15 understands is narrower than what 0.16+ does: 0.16 renamed the deployment modes
(RawDeployment -> Standard, Serverless -> Knative) and still accepts, then rewrites, the old names, while
0.15 refuses a deploymentStrategy unless the annotation says RawDeployment, and otherwise ignores an
annotation value it does not know, falls back to its cluster default mode (Serverless as shipped) and
refuses every later update whose annotation differs from the mode it recorded. The tests
under tests/kserve/ run the real controllers; these check the rendering offline.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.helm import FULLNAME, HelmError, render, render_error, run_helm, template_args
from tests.kserve.controller import version_dir, version_tuple, versions

pytestmark = pytest.mark.usefixtures("helm")

OLDEST = "v0.15.2"
# KServe v0.15.2, pkg/controller/v1beta1/inferenceservice/utils/utils.go GetDeploymentMode and
# pkg/constants/constants.go AutoscalerAllowedClassList: the annotation values it acts on.
OLDEST_DEPLOYMENT_MODES = {"Serverless", "RawDeployment", "ModelMesh"}
OLDEST_AUTOSCALER_CLASSES = {"hpa", "external", "keda", "none"}
# The modes the chart can run in: a Deployment + Service named <isvc>-predictor.
SUPPORTED = {"RawDeployment", "Standard"}

VARIANTS = {
    "defaults": {"kserve": {"enabled": True}},
    "autoscaling": {"kserve": {"enabled": True}, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}},
    "gpu-restart": {"kserve": {"enabled": True}, "gpu": {"enabled": True}, "rollout": {"strategy": "restart"}},
    "standard-name": {"kserve": {"enabled": True, "deploymentMode": "Standard"}},
}


def _annotations(values: dict[str, Any]) -> dict[str, str]:
    return render(values).get("InferenceService", FULLNAME)["metadata"]["annotations"]


def test_oldest_pinned_version_is_the_oldest_supported() -> None:
    """The controller tests run the version these constants describe."""
    assert min(versions(), key=version_tuple) == OLDEST


@pytest.mark.parametrize("name", ["defaults", "autoscaling", "gpu-restart"])
def test_default_annotations_are_understood_by_the_oldest_kserve(name: str) -> None:
    annotations = _annotations(VARIANTS[name])
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/deploymentMode"] in OLDEST_DEPLOYMENT_MODES
    assert annotations["serving.kserve.io/autoscalerClass"] in OLDEST_AUTOSCALER_CLASSES


def test_standard_can_be_chosen_for_kserve_016_and_later() -> None:
    assert _annotations(VARIANTS["standard-name"])["serving.kserve.io/deploymentMode"] == "Standard"


@pytest.mark.parametrize("mode", ["Serverless", "Knative", "ModelMesh", "standard"])
def test_schema_refuses_modes_the_chart_cannot_run(mode: str) -> None:
    message = render_error({"kserve": {"enabled": True, "deploymentMode": mode}})
    assert "/kserve/deploymentMode" in message
    assert "'RawDeployment', 'Standard'" in message


@pytest.mark.parametrize("mode", ["Serverless", "Knative"])
def test_template_refuses_knative_even_without_the_schema(mode: str) -> None:
    with pytest.raises(HelmError) as err:
        run_helm(
            *template_args(), "--skip-schema-validation", values={"kserve": {"enabled": True, "deploymentMode": mode}}
        )
    message = err.value.stderr
    assert f"kserve.deploymentMode={mode} is not supported" in message
    assert "Use RawDeployment (any KServe >= 0.15) or Standard (KServe >= 0.16)" in message


def test_plain_deployment_ignores_the_mode() -> None:
    m = render({"kserve": {"enabled": False, "deploymentMode": "Standard"}})
    assert not m.has("InferenceService") and m.has("Deployment")


@pytest.mark.parametrize("version", versions())
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inference_service_matches_each_versions_crd_schema(version: str, name: str) -> None:
    """Against the CRD each pinned KServe version ships (copied by tests/k8s/build-kserve.sh)."""
    import jsonschema

    from tests.chart.helm import required

    path = version_dir(version) / "crds" / "serving.kserve.io_inferenceservices.yaml"
    if not path.is_file():
        msg = f"{path} missing: run `bash tests/k8s/build-kserve.sh`"
        if required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    schema = _crd_schema(str(path))
    isvc = render(VARIANTS[name]).get("InferenceService", FULLNAME)
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(isvc), key=str)
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


_SCHEMAS: dict[str, Any] = {}


def _crd_schema(path: str) -> Any:
    import yaml

    if path not in _SCHEMAS:
        with open(path, "rb") as fh:
            crd = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
        _SCHEMAS[path] = version["schema"]["openAPIV3Schema"]
    return _SCHEMAS[path]
