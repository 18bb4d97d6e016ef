"""Fixtures of the chart tests: the helm binary, the KServe and Prometheus Operator CRD schemas, and (k8s
tests) the control plane."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest

from tests.chart.helm import helm_binary, required
from tests.k8s.cluster import shared_dir

ISVC_CRD = "serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary; skipped when absent locally, a failure under CI / LSBERT_REQUIRE_K8S=1."""
    path = helm_binary()
    if not path.is_file():
        msg = (
            f"helm not found at {path}: run `bash tests/k8s/build.sh` (or set LSBERT_HELM); "
            "the chart tests need the real helm binary"
        )
        if required():
            pytest.fail(msg, pytrace=False)
        warnings.warn(msg, stacklevel=1)
        pytest.skip(msg)
    return str(path)


@pytest.fixture(scope="session")
def isvc_validator() -> Any:
    """jsonschema Draft4Validator on the InferenceService CRD's openAPIV3Schema (loaded once, C loader)."""
    import jsonschema
    import yaml

    path = shared_dir() / "kserve-crds" / ISVC_CRD
    if not path.is_file():
        msg = f"KServe CRD not found: {path} (set LSBERT_SHARED_DIR)"
        if required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    with open(path, "rb") as fh:
        crd = yaml.load(fh, Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="session")
def monitor_validator() -> Callable[[dict[str, Any]], list[str]]:
    """Checks a rendered ServiceMonitor / PodMonitor against the Prometheus Operator's CRD schema, as the
    PyPI package cloudcoil-models-prometheus-operator carries it (pydantic models generated from the
    operator's CRDs: types, required fields, enums and patterns). Returns the errors, [] when valid.

    The models ignore fields they do not know, so the object is also dumped back and compared: a field the
    schema lacks (a typo such as ``basicauth``) or a value the model had to convert is an error too, as
    strict as kubernetes-validate is for built-in kinds."""
    try:
        import pydantic
        from cloudcoil.models.prometheus_operator import v1
    except ImportError as exc:
        msg = f"cloudcoil-models-prometheus-operator is not installed ({exc}): pip install -e '.[test]'"
        if required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    models = {"ServiceMonitor": v1.ServiceMonitor, "PodMonitor": v1.PodMonitor}

    def validate(obj: dict[str, Any]) -> list[str]:
        if obj.get("apiVersion") != "monitoring.coreos.com/v1" or obj.get("kind") not in models:
            return [f"not a monitoring.coreos.com/v1 monitor: {obj.get('apiVersion')} {obj.get('kind')}"]
        try:
            parsed = models[obj["kind"]].model_validate(obj)
        except pydantic.ValidationError as exc:
            return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return _differences(obj, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"), "")

    return validate


def _differences(given: Any, kept: Any, path: str) -> list[str]:
    """Where the object the schema kept differs from the one given (paths like spec.endpoints.0.port)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = [f"{path}{key}: not in the schema" for key in given if key not in kept]
        for key in given.keys() & kept.keys():
            out += _differences(given[key], kept[key], f"{path}{key}.")
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [d for i, (g, k) in enumerate(zip(given, kept)) for d in _differences(g, k, f"{path}{i}.")]
    if given != kept or type(given) is not type(kept):
        return [f"{path.rstrip('.')}: {given!r} read as {kept!r}"]
    return []


@pytest.fixture(scope="session", autouse=True)
def _cache_kubernetes_validate_schemas() -> Any:
    """kubernetes-validate re-reads its JSON schemas (a 1-2 MB _definitions.json) on every call; cache the
    parsed files for the session. Validation itself is unchanged."""
    import functools

    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    utils.schema_contents = original
