"""Rendering the chart with the real helm binary (the one tests/k8s/build.sh caches) and parsing the output."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import yaml

from tests.k8s.cluster import REPO_ROOT, default_bin_dir

__all__ = ["REPO_ROOT"]

CHART = REPO_ROOT / "chart"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KSERVE_API = "serving.kserve.io/v1beta1"
RELEASE = "rel"
NAMESPACE = "lsbert"
FULLNAME = "rel-lsbert"


class HelmError(RuntimeError):
    def __init__(self, cmd: list[str], result: subprocess.CompletedProcess[str]) -> None:
        self.stdout, self.stderr = result.stdout, result.stderr
        super().__init__(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr}{result.stdout}")


def helm_binary() -> Path:
    return Path(os.environ.get("LSBERT_HELM") or default_bin_dir() / "helm")


def required() -> bool:
    """CI or LSBERT_REQUIRE_K8S=1: missing tools are failures, not skips (same rule as tests/k8s)."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("LSBERT_REQUIRE_K8S") == "1"


def run_helm(
    *args: str,
    values: Optional[dict[str, Any]] = None,
    env: Optional[dict[str, str]] = None,
    binary: Optional[Path] = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run helm; ``values`` go in through a temporary -f file (JSON is YAML). Raises HelmError on failure."""
    cmd = [str(binary or helm_binary()), *args]
    with tempfile.TemporaryDirectory(prefix="lsbert-helm-") as tmp:
        if values is not None:
            path = Path(tmp) / "values.json"
            path.write_text(json.dumps(values))
            cmd += ["-f", str(path)]
        run_env = dict(env or os.environ)
        # Never let helm read the developer's kubeconfig or repositories.
        run_env.setdefault("HELM_CACHE_HOME", str(Path(tmp) / "cache"))
        run_env.setdefault("HELM_CONFIG_HOME", str(Path(tmp) / "config"))
        run_env.setdefault("HELM_DATA_HOME", str(Path(tmp) / "data"))
        if env is None:
            run_env["KUBECONFIG"] = str(Path(tmp) / "no-kubeconfig")
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=run_env, stdin=subprocess.DEVNULL
        )
    if result.returncode != 0:
        raise HelmError(cmd, result)
    return result


def template_args(api_versions: Iterable[str] = (), kube_version: Optional[str] = None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for api in api_versions:
        args += ["--api-versions", api]
    if kube_version:
        args += ["--kube-version", kube_version]
    return args


@functools.lru_cache(maxsize=128)
def _render_cached(values_json: str, api_versions: tuple[str, ...], kube_version: Optional[str]) -> Manifest:
    return Manifest(run_helm(*template_args(api_versions, kube_version), values=json.loads(values_json)).stdout)


def render(
    values: Optional[dict[str, Any]] = None, *, kserve_api: bool = False, kube_version: Optional[str] = None
) -> Manifest:
    """``helm template`` → parsed objects. Cached: the same values render once per session, so callers must
    not modify what they get (deep-copy first)."""
    apis = (KSERVE_API,) if kserve_api else ()
    return _render_cached(json.dumps(values or {}, sort_keys=True), apis, kube_version)


def render_error(values: dict[str, Any], *, kserve_api: bool = False) -> str:
    """The error message of a render that must fail."""
    try:
        run_helm(*template_args((KSERVE_API,) if kserve_api else ()), values=values)
    except HelmError as exc:
        return exc.stderr + exc.stdout
    raise AssertionError(f"helm template succeeded but should have failed for values {values}")


class Manifest:
    """The objects of one rendered release."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.objects: list[dict[str, Any]] = [d for d in yaml.load_all(text, Loader=_LOADER) if d]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.objects)

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: Optional[str] = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def has(self, kind: str, name: Optional[str] = None) -> bool:
        return any(name is None or o["metadata"]["name"] == name for o in self.of_kind(kind))

    # ---- the predictor pod, whichever form carries it ----------------------------------------------

    def predictor_pod_spec(self) -> dict[str, Any]:
        """The pod-level fields of the predictor (InferenceService predictor, or the Deployment's pod spec)."""
        if self.has("InferenceService"):
            return self.get("InferenceService")["spec"]["predictor"]
        return self.get("Deployment")["spec"]["template"]["spec"]

    def predictor_container(self) -> dict[str, Any]:
        (container,) = self.predictor_pod_spec()["containers"]
        return container

    def predictor_env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.predictor_container().get("env", [])}

    def job_values(self) -> dict[str, Any]:
        return yaml.safe_load(self.get("ConfigMap", f"{FULLNAME}-job-values")["data"]["values.yaml"])

    def test_pod(self) -> dict[str, Any]:
        return self.get("Pod", f"{FULLNAME}-test-health")

    def secret_data(self) -> dict[str, str]:
        """Every key of every rendered Secret, decoded: {"<secret>/<key>": value}."""
        out = {}
        for s in self.of_kind("Secret"):
            for k, v in (s.get("data") or {}).items():
                out[f"{s['metadata']['name']}/{k}"] = base64.b64decode(v).decode()
            for k, v in (s.get("stringData") or {}).items():
                out[f"{s['metadata']['name']}/{k}"] = v
        return out


def trainer_job(values: dict[str, Any], *, name: str, namespace: str, project: int = 1) -> dict[str, Any]:
    """A training Job assembled from the chart's JOB_VALUES the way the launcher's template uses them.

    Only for validating that every piece the chart hands the launcher is a well-formed Kubernetes field;
    the real template ships in the lsbert package (src/lsbert/launcher/training-job.yaml).
    """
    container = {
        "name": "trainer",
        "image": values["image"],
        "imagePullPolicy": values["imagePullPolicy"],
        "args": ["--project", str(project)],
        "env": values["env"],
        "envFrom": values["envFrom"],
        "resources": values["resources"],
        "securityContext": values["securityContext"],
        "volumeMounts": values["volumeMounts"],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": values["serviceAccountName"],
        "imagePullSecrets": values["imagePullSecrets"],
        "securityContext": values["podSecurityContext"],
        "nodeSelector": values["nodeSelector"],
        "tolerations": values["tolerations"],
        "affinity": values["affinity"],
        **({"priorityClassName": values["priorityClassName"]} if "priorityClassName" in values else {}),
        "volumes": values["volumes"],
        "containers": [container],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(values["jobLabels"]),
            "annotations": dict(values["jobAnnotations"]),
        },
        "spec": {
            "backoffLimit": values["backoffLimit"],
            **({"podFailurePolicy": values["podFailurePolicy"]} if values["podFailurePolicy"] else {}),
            "activeDeadlineSeconds": values["activeDeadlineSeconds"],
            "ttlSecondsAfterFinished": values["ttlSecondsAfterFinished"],
            "template": {
                "metadata": {"labels": dict(values["podLabels"]), "annotations": dict(values["podAnnotations"])},
                "spec": pod_spec,
            },
        },
    }


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
