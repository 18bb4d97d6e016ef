"""Fixtures of the chart tests: the helm binary, the KServe CRD schema, and (k8s tests) the control plane."""

from __future__ import annotations

import warnings
from typing import Any

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
