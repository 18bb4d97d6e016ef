"""The chart, offline: helm lint --strict, helm template over a matrix of values, every object validated
(built-in kinds with kubernetes-validate, strict; the InferenceService against the KServe CRD schema), and
the properties the deployment relies on: secrets only in Secrets, probes on the real endpoints, a GPU
rollout that cannot deadlock, least-privilege RBAC, locked-down pods, and the launcher contract."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import kubernetes_validate
import pytest

from tests.chart.helm import (
    CHART,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    Manifest,
    b64,
    render,
    render_error,
    run_helm,
    trainer_job,
)

pytestmark = pytest.mark.usefixtures("helm")

# Kubernetes versions built-in objects are validated against: the test control plane's minor for every
# case, and also the chart's kubeVersion floor for the cases in FLOOR_CASES.
K8S_VERSION = "1.36.0"
K8S_FLOOR = "1.29.0"
FLOOR_CASES = {"defaults-auto-no-kserve", "rollout-restart-gpu-s3", "autoscaling-plain", "existing-secrets-plain"}

# Distinctive secret values: none may appear (plain or base64) outside a Secret object.
SECRET_VALUES = {
    "ls": "ls-api-key-Q7w2xR9",
    "pass": "basic-pass-M4n8Vb1",
    "hf": "hf_token_Z3c6Yt0",
    "ak": "AKIA-ACCESS-K9j5Hg2",
    "sk": "s3-secret-key-P1l0Ok7",
}
SECRET_ENV = {
    "LABEL_STUDIO_API_KEY",
    "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS",
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
}

S3 = {
    "type": "s3",
    "s3": {
        "uri": "s3://lsbert-ckpt/prod",
        "endpoint": "http://minio.minio.svc:9000",
        "region": "eu-west-1",
        "addressingStyle": "path",
    },
}
INLINE_SECRETS = {
    "labelStudio": {"url": "http://label-studio.ls.svc.cluster.local:8080", "apiKey": SECRET_VALUES["ls"]},
    "basicAuth": {"enabled": True, "user": "lsbert", "password": SECRET_VALUES["pass"]},
    "huggingface": {"token": SECRET_VALUES["hf"]},
    "storage": {**S3, "s3": {**S3["s3"], "accessKeyId": SECRET_VALUES["ak"], "secretAccessKey": SECRET_VALUES["sk"]}},
}
EXISTING_SECRETS = {
    "labelStudio": {
        "url": "http://label-studio.ls.svc:8080",
        "existingSecret": "ls-token",
        "existingSecretKey": "token",
    },
    "basicAuth": {"enabled": True, "existingSecret": "backend-auth"},
    "huggingface": {"existingSecret": "hf", "existingSecretKey": "HF_TOKEN"},
    "storage": {**S3, "s3": {**S3["s3"], "existingSecret": "minio-creds"}},
}
GPU = {
    "gpu": {"enabled": True, "count": 1, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
    "image": {"repository": "lsbert-predictor", "tag": "dev-gpu"},
}

# Role rules by id; a case lists the ids it must have, and nothing else.
RULES = {
    "jobs": {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete", "get", "list", "watch"]},
    "pods": {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
    "events": {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]},
    "owner": {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [f"{FULLNAME}-job-values"],
        "verbs": ["get"],
    },
    "isvc": {
        "apiGroups": ["serving.kserve.io"],
        "resources": ["inferenceservices"],
        "resourceNames": [FULLNAME],
        "verbs": ["get", "patch"],
    },
    "deployments": {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "resourceNames": [f"{FULLNAME}-predictor"],
        "verbs": ["get", "list", "watch"],
    },
}


@dataclass(frozen=True)
class Case:
    values: dict[str, Any] = field(default_factory=dict)
    kserve_api: bool = False  # helm template --api-versions serving.kserve.io/v1beta1
    isvc: bool = False  # expected: an InferenceService (else a Deployment + Service)
    rules: tuple[str, ...] = ("jobs", "pods", "events", "owner")  # expected Role rules (empty: no Role at all)

    def manifest(self) -> Manifest:
        return render(self.values, kserve_api=self.kserve_api)


CASES: dict[str, Case] = {
    "defaults-auto-no-kserve": Case(),
    "auto-with-kserve-api": Case(kserve_api=True, isvc=True),
    "kserve-true-without-api": Case({"kserve": {"enabled": True}}, isvc=True),
    "kserve-false-with-api": Case({"kserve": {"enabled": False}}, kserve_api=True),
    "kserve-string-false": Case({"kserve": {"enabled": "false"}}, kserve_api=True),
    "pvc-existing-claim-isvc": Case(
        {"storage": {"pvc": {"existingClaim": "shared-ckpts"}}}, kserve_api=True, isvc=True
    ),
    "pvc-rwo-no-class": Case(
        {"storage": {"pvc": {"accessModes": ["ReadWriteOnce"], "storageClassName": "-", "keep": False}}}
    ),
    "s3-inline-secrets-isvc": Case(INLINE_SECRETS, kserve_api=True, isvc=True),
    "s3-inline-secrets-plain": Case(INLINE_SECRETS),
    "s3-pod-identity": Case(
        {"storage": S3, "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}}},
        kserve_api=True,
        isvc=True,
    ),
    "existing-secrets-isvc": Case(EXISTING_SECRETS, kserve_api=True, isvc=True),
    "existing-secrets-plain": Case(EXISTING_SECRETS),
    "gpu-isvc": Case(GPU, kserve_api=True, isvc=True),
    "gpu-plain": Case(GPU),
    "gpu-trainer": Case({"trainer": {"gpu": {"enabled": True, "count": 2}}}, kserve_api=True, isvc=True),
    "gpu-recreate": Case({**GPU, "deploymentStrategy": {"type": "Recreate"}}, kserve_api=True, isvc=True),
    "rollout-restart": Case(
        {"rollout": {"strategy": "restart"}},
        kserve_api=True,
        isvc=True,
        rules=("jobs", "pods", "events", "owner", "isvc", "deployments"),
    ),
    "rollout-restart-gpu-s3": Case(
        {**GPU, **INLINE_SECRETS, "rollout": {"strategy": "restart"}},
        kserve_api=True,
        isvc=True,
        rules=("jobs", "pods", "events", "owner", "isvc", "deployments"),
    ),
    "rollout-restart-local-launcher": Case(
        {"rollout": {"strategy": "restart"}, "trainer": {"launcher": "local"}},
        kserve_api=True,
        isvc=True,
        rules=("isvc", "deployments"),
    ),
    "launcher-local": Case({"trainer": {"launcher": "local"}}, rules=()),
    "launcher-none-isvc": Case({"trainer": {"launcher": "none"}}, kserve_api=True, isvc=True, rules=()),
    "autoscaling-plain": Case({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}),
    "autoscaling-isvc": Case(
        {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}, kserve_api=True, isvc=True
    ),
    # The Prometheus Operator monitor with basic auth: it carries secretKeyRefs, never the credentials.
    "monitor-inline-secrets-plain": Case({**INLINE_SECRETS, "metrics": {"serviceMonitor": {"enabled": True}}}),
    "monitor-existing-secrets-isvc": Case(
        {**EXISTING_SECRETS, "metrics": {"serviceMonitor": {"enabled": True}, "withoutAuth": True}},
        kserve_api=True,
        isvc=True,
    ),
    "custom-names": Case(
        {
            "model": {"name": "sentiment"},
            "service": {"port": 9090},
            "settings": {"LEARNING_RATE": 3e-5, "KEEP_VERSIONS": 3, "LOG_LEVEL": "DEBUG"},
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "tests": {"enabled": True},
        }
    ),
}


def cases() -> list[Any]:
    return [pytest.param(case, id=name) for name, case in CASES.items()]


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def _pod_specs(m: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the release runs: predictor, helm test pod, and a training Job from JOB_VALUES."""
    yield "predictor", m.predictor_pod_spec()
    if m.has("Pod"):
        yield "test", m.test_pod()["spec"]
    if m.has("ConfigMap", f"{FULLNAME}-job-values"):
        yield "trainer", trainer_job(m.job_values(), name="t", namespace=NAMESPACE)["spec"]["template"]["spec"]


# ----------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"kserve": {"enabled": True}, **GPU, "rollout": {"strategy": "restart"}},
        INLINE_SECRETS,
        EXISTING_SECRETS,
    ],
    ids=["defaults", "kserve-gpu-restart", "inline-secrets", "existing-secrets"],
)
def test_helm_lint_strict(values: dict[str, Any]) -> None:
    out = run_helm("lint", "--strict", str(CHART), values=values).stdout
    assert "0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


# ------------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("case", cases())
def test_every_object_is_valid(case: Case, isvc_validator: Any, request: pytest.FixtureRequest) -> None:
    m = case.manifest()
    versions = (K8S_VERSION, K8S_FLOOR) if request.node.callspec.id in FLOOR_CASES else (K8S_VERSION,)
    assert m.objects, "nothing rendered"
    for obj in m:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "InferenceService":
            errors = sorted(isvc_validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            assert not errors, f"InferenceService {name}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
            continue
        if kind in ("ServiceMonitor", "PodMonitor"):  # the Prometheus Operator's CRD schema
            monitor_errors = request.getfixturevalue("monitor_validator")(obj)
            assert not monitor_errors, f"{kind} {name}: " + "; ".join(monitor_errors)
            continue
        for version in versions:
            # strict: unknown fields fail; a kind without a schema raises SchemaNotFoundError (never a warning).
            kubernetes_validate.validate(obj, version, strict=True)
    if m.has("ConfigMap", f"{FULLNAME}-job-values"):
        job = trainer_job(m.job_values(), name=f"{FULLNAME}-train-1", namespace=NAMESPACE)
        for version in versions:
            kubernetes_validate.validate(job, version, strict=True)


def test_unknown_kind_is_a_failure_not_a_warning() -> None:
    """Guards the routing above: kubernetes-validate must refuse, not pass, a kind it has no schema for."""
    isvc = render({"kserve": {"enabled": True}}).get("InferenceService")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(isvc, "1.36.0", strict=True)


def test_isvc_schema_check_catches_errors(isvc_validator: Any) -> None:
    isvc = copy.deepcopy(render({"kserve": {"enabled": True}}).get("InferenceService"))
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    isvc["spec"]["predictor"]["containers"][0]["image"] = 5
    messages = {e.message for e in isvc_validator.iter_errors(isvc)}
    assert "'one' is not of type 'integer'" in messages
    assert "5 is not of type 'string'" in messages


# ----------------------------------------------------------------------------- KServe or Deployment


@pytest.mark.parametrize("case", cases())
def test_kserve_or_plain_deployment(case: Case) -> None:
    m = case.manifest()
    if case.isvc:
        isvc = m.get("InferenceService", FULLNAME)
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        (container,) = isvc["spec"]["predictor"]["containers"]
        assert container["name"] == "kserve-container"
        assert not m.has("Deployment") and not m.has("Service") and not m.has("HorizontalPodAutoscaler")
    else:
        assert not m.has("InferenceService")
        deployment, service = m.get("Deployment", FULLNAME), m.get("Service", FULLNAME)
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert service["spec"]["selector"] == selector
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    container = m.predictor_container()
    assert container["ports"] == [{"name": container["ports"][0]["name"], "containerPort": 8080, "protocol": "TCP"}]


def test_replicas_and_autoscaling() -> None:
    plain = CASES["autoscaling-plain"].manifest()
    assert "replicas" not in plain.get("Deployment")["spec"]
    hpa = plain.get("HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}

    isvc = CASES["autoscaling-isvc"].manifest().get("InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (2, 4)
    assert isvc["spec"]["predictor"]["scaleMetric"] == "cpu"

    fixed = render({"replicaCount": 2}, kserve_api=True).get("InferenceService")
    assert fixed["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "none"
    assert (fixed["spec"]["predictor"]["minReplicas"], fixed["spec"]["predictor"]["maxReplicas"]) == (2, 2)
    assert render({"replicaCount": 2}).get("Deployment")["spec"]["replicas"] == 2


def test_prometheus_scraping() -> None:
    m = CASES["auto-with-kserve-api"].manifest()
    isvc = m.get("InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    pod_annotations = isvc["spec"]["predictor"]["annotations"]
    assert pod_annotations["prometheus.io/scrape"] == "true"
    assert pod_annotations["prometheus.io/port"] == pod_annotations["prometheus.kserve.io/port"] == "8080"
    assert pod_annotations["prometheus.io/path"] == pod_annotations["prometheus.kserve.io/path"] == "/metrics"
    plain = render().get("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert plain["prometheus.io/scrape"] == "true"
    off = render({"metrics": {"enabled": False}}, kserve_api=True).get("InferenceService")
    assert "serving.kserve.io/enable-prometheus-scraping" not in off["metadata"]["annotations"]
    assert not any(k.startswith("prometheus") for k in off["spec"]["predictor"]["annotations"])


# ------------------------------------------------------------------------------------------ probes


@pytest.mark.parametrize("case", cases())
def test_probes_hit_the_real_endpoints(case: Case) -> None:
    m = case.manifest()
    container = m.predictor_container()
    model = case.values.get("model", {}).get("name", "lsbert")
    port = container["ports"][0]["name"]
    assert m.predictor_env()["MODEL_NAME"]["value"] == model
    # Readiness and startup: the model's KServe readiness route (503 until loaded), never /v2/health/ready.
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": f"/v1/models/{model}", "port": port}, probe
    # Liveness: the process answers at all.
    assert container["livenessProbe"]["httpGet"] == {"path": "/", "port": port}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model download + load needs minutes"


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("name", ["gpu-isvc", "gpu-plain", "rollout-restart-gpu-s3"])
def test_gpu_rollout_cannot_deadlock(name: str) -> None:
    m = CASES[name].manifest()
    if m.has("InferenceService"):
        strategy = m.get("InferenceService")["spec"]["predictor"]["deploymentStrategy"]
    else:
        strategy = m.get("Deployment")["spec"]["strategy"]
    # A new pod never needs a second free GPU: the old one goes first.
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    container, pod = m.predictor_container(), m.predictor_pod_spec()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "6Gi", "GPU limit is added, not substituted"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_cpu_rollout_keeps_capacity_and_strategy_is_configurable() -> None:
    assert render().get("Deployment")["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    isvc = CASES["gpu-recreate"].manifest().get("InferenceService")
    assert isvc["spec"]["predictor"]["deploymentStrategy"] == {"type": "Recreate"}
    container = CASES["defaults-auto-no-kserve"].manifest().predictor_container()
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "tolerations" not in CASES["defaults-auto-no-kserve"].manifest().predictor_pod_spec()


def test_trainer_gpu() -> None:
    values = CASES["gpu-trainer"].manifest().job_values()
    assert values["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in values["tolerations"]
    cpu = CASES["defaults-auto-no-kserve"].manifest().job_values()
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"]) and cpu["tolerations"] == []


# -------------------------------------------------------------------------------------------- RBAC


def _normalise(rule: dict[str, Any]) -> str:
    return json.dumps({k: sorted(v) for k, v in rule.items()}, sort_keys=True)


@pytest.mark.parametrize("case", cases())
def test_role_is_exactly_least_privilege(case: Case) -> None:
    m = case.manifest()
    if not case.rules:
        assert not m.has("Role") and not m.has("RoleBinding")
        assert m.predictor_pod_spec()["automountServiceAccountToken"] is False
        return
    role = m.get("Role", f"{FULLNAME}-launcher")
    assert sorted(map(_normalise, role["rules"])) == sorted(_normalise(RULES[r]) for r in case.rules)
    binding = m.get("RoleBinding", f"{FULLNAME}-launcher")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert m.predictor_pod_spec()["serviceAccountName"] == FULLNAME
    assert m.predictor_pod_spec()["automountServiceAccountToken"] is True
    assert not m.has("ClusterRole") and not m.has("ClusterRoleBinding")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "secrets" not in rule["resources"]


def test_trainer_service_account_has_no_token_and_no_role() -> None:
    m = render()
    sa = m.get("ServiceAccount", f"{FULLNAME}-trainer")
    assert sa["automountServiceAccountToken"] is False
    assert m.job_values()["serviceAccountName"] == f"{FULLNAME}-trainer"
    for binding in m.of_kind("RoleBinding"):
        assert all(s["name"] != f"{FULLNAME}-trainer" for s in binding["subjects"])


# ----------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "name",
    ["s3-inline-secrets-isvc", "s3-inline-secrets-plain", "rollout-restart-gpu-s3", "monitor-inline-secrets-plain"],
)
def test_secret_values_only_in_secrets(name: str) -> None:
    m = CASES[name].manifest()
    data = m.secret_data()
    assert data == {
        f"{FULLNAME}-label-studio/api-key": SECRET_VALUES["ls"],
        f"{FULLNAME}-basic-auth/username": "lsbert",
        f"{FULLNAME}-basic-auth/password": SECRET_VALUES["pass"],
        f"{FULLNAME}-huggingface/token": SECRET_VALUES["hf"],
        f"{FULLNAME}-s3/AWS_ACCESS_KEY_ID": SECRET_VALUES["ak"],
        f"{FULLNAME}-s3/AWS_SECRET_ACCESS_KEY": SECRET_VALUES["sk"],
    }
    for obj in m:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)  # ConfigMaps (settings, JOB_VALUES), pods, the test hook, ...
        for secret in SECRET_VALUES.values():
            assert secret not in text and b64(secret) not in text, f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("case", cases())
def test_secret_env_only_through_secret_key_refs(case: Case) -> None:
    m = case.manifest()
    secrets = {s["metadata"]["name"] for s in m.of_kind("Secret")}
    existing = {"ls-token", "backend-auth", "hf", "minio-creds"}
    for where, pod in _pod_specs(m):
        for container in _containers(pod):
            for env in container.get("env", []):
                if env["name"] in SECRET_ENV:
                    assert "value" not in env, f"{where}: {env['name']} is a literal"
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] in secrets | existing, f"{where}: {env['name']} -> unknown Secret {ref['name']}"


def test_existing_secrets_are_referenced_not_created() -> None:
    m = CASES["existing-secrets-isvc"].manifest()
    assert not m.has("Secret")
    env = m.predictor_env()
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in SECRET_ENV if name in env}
    assert refs == {
        "LABEL_STUDIO_API_KEY": {"name": "ls-token", "key": "token"},
        "BASIC_AUTH_USER": {"name": "backend-auth", "key": "username"},
        "BASIC_AUTH_PASS": {"name": "backend-auth", "key": "password"},
        "HF_TOKEN": {"name": "hf", "key": "HF_TOKEN"},
        "AWS_ACCESS_KEY_ID": {"name": "minio-creds", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "minio-creds", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    trainer_env = {e["name"]: e for e in m.job_values()["env"]}
    assert trainer_env["LABEL_STUDIO_API_KEY"]["valueFrom"]["secretKeyRef"] == refs["LABEL_STUDIO_API_KEY"]
    assert trainer_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == refs["AWS_SECRET_ACCESS_KEY"]
    assert "BASIC_AUTH_PASS" not in trainer_env, "the trainer serves nothing"


def test_s3_with_pod_identity_has_no_credentials() -> None:
    m = CASES["s3-pod-identity"].manifest()
    env = m.predictor_env()
    assert env["MODEL_DIR"]["value"] == "s3://lsbert-ckpt/prod"
    assert "AWS_ACCESS_KEY_ID" not in env and not m.has("Secret")
    assert m.get("ServiceAccount", FULLNAME)["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"settings": {"HF_TOKEN": "x"}}, "invalid propertyName 'HF_TOKEN'"),
        ({"settings": {"MODEL_DIR": "/x"}}, "invalid propertyName 'MODEL_DIR'"),
        ({"extraEnv": [{"name": "BASIC_AUTH_PASS", "value": "x"}]}, "/extraEnv/0"),
        ({"trainer": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}}, "/trainer/env/0"),
        ({"kserve": {"enabled": "maybe"}}, "/kserve/enabled"),
        ({"rollout": {"strategy": "bluegreen"}}, "/rollout/strategy"),
        ({"storage": {"type": "nfs"}}, "/storage/type"),
        ({"trainer": {"launcher": "slurm"}}, "/trainer/launcher"),
        ({"labelStudio": {"url": "label-studio:8080"}}, "/labelStudio/url"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"serviceAccount": {"create": False}}, "refusing to grant the launcher Role"),
        ({"rollout": {"strategy": "restart"}, "kserve": {"enabled": False}}, "rollout.strategy=restart"),
        ({"storage": {"type": "s3"}}, "storage.s3.uri"),
        ({"storage": {**S3, "s3": {**S3["s3"], "accessKeyId": "a"}}}, "must be set together"),
        (
            {"storage": {**S3, "s3": {**S3["s3"], "accessKeyId": "a", "secretAccessKey": "b", "existingSecret": "c"}}},
            "not both",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_values_are_refused(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


def test_existing_service_account() -> None:
    m = render({"serviceAccount": {"create": False, "name": "lsbert-runner"}})
    assert not m.has("ServiceAccount", FULLNAME)
    assert m.predictor_pod_spec()["serviceAccountName"] == "lsbert-runner"
    assert m.get("RoleBinding")["subjects"][0]["name"] == "lsbert-runner"
    # Without API needs nothing is bound, so the namespace default is acceptable.
    plain = render({"serviceAccount": {"create": False}, "trainer": {"launcher": "none"}})
    assert plain.predictor_pod_spec()["serviceAccountName"] == "default" and not plain.has("Role")


def test_restart_without_kserve_api_in_auto_mode_is_refused() -> None:
    assert "rollout.strategy=restart" in render_error({"rollout": {"strategy": "restart"}})


# -------------------------------------------------------------------------------- pod security


@pytest.mark.parametrize("case", cases())
def test_pods_are_locked_down(case: Case) -> None:
    m = case.manifest()
    for where, pod in _pod_specs(m):
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in _containers(pod):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert sc.get("privileged") in (None, False), where
            mounts = {vm["mountPath"]: vm["name"] for vm in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be a writable emptyDir"
            if where != "test":
                assert "emptyDir" in volumes[mounts["/var/cache/lsbert"]], f"{where}: cache must be an emptyDir"
        for v in volumes.values():
            assert "hostPath" not in v, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where


def test_cache_environment_points_at_writable_volumes() -> None:
    env = render().predictor_env()
    assert env["CACHE_DIR"]["value"] == "/var/cache/lsbert"
    assert env["HF_HOME"]["value"] == "/var/cache/lsbert/huggingface"


# ----------------------------------------------------------------------------------------- storage


def test_pvc_storage() -> None:
    m = render()
    pvc = m.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "storageClassName" not in pvc["spec"], "empty = the cluster's default class"
    assert m.predictor_env()["MODEL_DIR"]["value"] == "/var/lib/lsbert/models"
    for where, pod in _pod_specs(m):
        if where == "test":
            continue
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert [c["persistentVolumeClaim"]["claimName"] for c in claims] == [f"{FULLNAME}-checkpoints"], where
        (container,) = pod["containers"]
        assert {"name": claims[0]["name"], "mountPath": "/var/lib/lsbert/models"} in container["volumeMounts"], where


def test_pvc_variants() -> None:
    rwo = CASES["pvc-rwo-no-class"].manifest().get("PersistentVolumeClaim")
    assert rwo["spec"]["storageClassName"] == "" and rwo["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "annotations" not in rwo["metadata"]
    existing = CASES["pvc-existing-claim-isvc"].manifest()
    assert not existing.has("PersistentVolumeClaim")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in existing.predictor_pod_spec()["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["shared-ckpts"]


def test_s3_storage() -> None:
    m = CASES["s3-inline-secrets-isvc"].manifest()
    assert not m.has("PersistentVolumeClaim")
    env = m.predictor_env()
    assert env["MODEL_DIR"]["value"] == "s3://lsbert-ckpt/prod"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio.svc:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["S3_ADDRESSING_STYLE"]["value"] == "path"
    assert not any("persistentVolumeClaim" in v for v in m.predictor_pod_spec()["volumes"])
    trainer = {e["name"]: e for e in m.job_values()["env"]}
    assert trainer["MODEL_DIR"] == env["MODEL_DIR"] and trainer["AWS_ENDPOINT_URL_S3"] == env["AWS_ENDPOINT_URL_S3"]


# ---------------------------------------------------------------------- the launcher contract


JOB_VALUE_KEYS = {
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "serviceAccountName",
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "env",
    "envFrom",
    "volumes",
    "volumeMounts",
    "podLabels",
    "podAnnotations",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "securityContext",
    "podSecurityContext",
    "jobLabels",
    "jobAnnotations",
    "podFailurePolicy",
}


@pytest.mark.parametrize("name", ["defaults-auto-no-kserve", "rollout-restart", "s3-inline-secrets-isvc"])
def test_launcher_contract(name: str) -> None:
    case = CASES[name]
    m = case.manifest()
    env = m.predictor_env()
    assert env["TRAINING_LAUNCHER"]["value"] == "kubernetes"
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["RELEASE_NAME"]["value"] == FULLNAME
    assert "JOB_TEMPLATE" not in env, "the template ships in the lsbert package"
    assert env["JOB_OWNER_CONFIGMAP"]["value"] == f"{FULLNAME}-job-values"
    assert env["TRAINING_PENDING_TIMEOUT"]["value"] == "900"
    assert env["JOB_VALUES"]["value"] == "/etc/lsbert/job/values.yaml"
    assert env["ROLLOUT_STRATEGY"]["value"] == case.values.get("rollout", {}).get("strategy", "hot")
    if case.isvc:
        assert env["ISVC_NAME"]["value"] == m.get("InferenceService")["metadata"]["name"]
    else:
        assert "ISVC_NAME" not in env
    # JOB_VALUES is the chart's ConfigMap, mounted read-only.
    mount = next(vm for vm in m.predictor_container()["volumeMounts"] if vm["mountPath"] == "/etc/lsbert/job")
    assert mount["readOnly"] is True
    volume = next(v for v in m.predictor_pod_spec()["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == f"{FULLNAME}-job-values"

    values = m.job_values()
    assert set(values) == JOB_VALUE_KEYS
    assert values["image"] == "lsbert-trainer:0.1.0"
    assert values["podLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert values["podLabels"]["app.kubernetes.io/component"] == "trainer"
    assert {"configMapRef": {"name": f"{FULLNAME}-settings"}} in values["envFrom"]
    assert (values["backoffLimit"], values["activeDeadlineSeconds"], values["ttlSecondsAfterFinished"]) == (
        2,
        21600,
        86400,
    )
    trainer_env = {e["name"]: e for e in values["env"]}
    for shared in ("MODEL_DIR", "BASELINE_MODEL_NAME", "CACHE_DIR", "HF_HOME"):
        assert trainer_env[shared] == env[shared], shared


@pytest.mark.parametrize("case", [c for c in cases() if "launcher" not in c.id])
def test_job_values_fit_the_real_launcher(case: Case) -> None:
    """The chart's JOB_VALUES through the predictor's own launcher code and the Job template it bakes in:
    parsed (unknown keys are errors), merged into the packaged Job template, round-tripped through the client
    models (unknown fields are errors), and the result is a valid, locked-down Job."""
    launcher = pytest.importorskip("lsbert.launcher.jobspec")
    m = case.manifest()
    template = launcher.load_template()
    values = launcher.parse_job_values(m.job_values())
    job = launcher.render_job(
        template,
        values,
        release=FULLNAME,
        namespace=NAMESPACE,
        project=3,
        version="finetuned_model-0004",
        owner=launcher.owner_reference("ConfigMap", f"{FULLNAME}-job-values", "u-1"),
    )
    launcher.to_v1_job(job)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "lsbert-trainer:0.1.0"
    assert pod["serviceAccountName"] == f"{FULLNAME}-trainer" and pod["automountServiceAccountToken"] is False
    # The chart's security contexts win over the template's defaults (uid 10001 = the images' user).
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MODEL_DIR"] == m.predictor_env()["MODEL_DIR"]
    for name in SECRET_ENV & env.keys():
        assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"], name
    mounts = {vm["mountPath"] for vm in container["volumeMounts"]}
    assert {"/tmp", "/var/cache/lsbert"} <= mounts
    if case.values.get("storage", {}).get("type", "pvc") == "pvc":
        assert "/var/lib/lsbert/models" in mounts


def test_launcher_modes_without_jobs() -> None:
    for name, launcher in (("launcher-local", "local"), ("launcher-none-isvc", "none")):
        m = CASES[name].manifest()
        env = m.predictor_env()
        assert env["TRAINING_LAUNCHER"]["value"] == launcher
        assert "JOB_VALUES" not in env and "JOB_TEMPLATE" not in env
        assert not m.has("ConfigMap", f"{FULLNAME}-job-values")
        assert not m.has("ServiceAccount", f"{FULLNAME}-trainer")


def test_settings_configmap_carries_only_plain_settings() -> None:
    m = CASES["custom-names"].manifest()
    data = m.get("ConfigMap", f"{FULLNAME}-settings")["data"]
    assert data == {
        "LEARNING_RATE": "3e-05",
        "KEEP_VERSIONS": "3",
        "LOG_LEVEL": "DEBUG",
        "START_TRAINING_EACH_N_UPDATES": "10",
        "THREADS": "8",
        "PRECISION": "auto",
    }
    assert {"configMapRef": {"name": f"{FULLNAME}-settings"}} in m.predictor_container()["envFrom"]
    assert m.predictor_env()["EXTRA"] == {"name": "EXTRA", "value": "1"}


def test_config_changes_roll_the_pods() -> None:
    before = render().get("Deployment")["spec"]["template"]["metadata"]["annotations"]
    after = render({"settings": {"LOG_LEVEL": "DEBUG"}}).get("Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert before["checksum/settings"] != after["checksum/settings"]


# ---------------------------------------------------------------------------- helm test and NOTES


@pytest.mark.parametrize(
    "name, url",
    [
        ("defaults-auto-no-kserve", f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:8080/health"),
        ("custom-names", f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:9090/health"),
        ("auto-with-kserve-api", f"http://{FULLNAME}-predictor.{NAMESPACE}.svc.cluster.local:80/health"),
    ],
)
def test_helm_test_pod_gets_health(name: str, url: str) -> None:
    pod = CASES[name].manifest().test_pod()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"] and container["command"][-1] == url
    assert "urllib.request.urlopen" in container["command"][2]
    assert container["image"] == "lsbert-predictor:0.1.0"
    assert not render({"tests": {"enabled": False}}).has("Pod")


def _notes(values: dict[str, Any]) -> str:
    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", values=values).stdout
    return out[out.index("NOTES:") :]


def test_notes_tell_how_to_connect_label_studio() -> None:
    notes = _notes({})
    assert f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:8080" in notes
    assert "ML_BLOCK_LOCAL_IP=false" in notes and "SSRF_PROTECTION_ENABLED=false" in notes
    assert "1.23.1" in notes and "USER_ADDITIONAL_BANNED_SUBNETS" in notes
    assert "Basic auth" not in notes

    kserve = _notes({"kserve": {"enabled": True}, "basicAuth": {"enabled": True, "password": "p"}})
    assert f"http://{FULLNAME}-predictor.{NAMESPACE}.svc.cluster.local:80" in kserve
    assert "Basic auth is ON" in kserve and "/api/webhooks/<id>/" in kserve and "Authorization" in kserve


def test_kube_version_floor() -> None:
    assert render(kube_version="1.29.0").has("Deployment")
    assert render(kube_version="1.36.0", kserve_api=True).has("InferenceService")
    with pytest.raises(Exception, match="kubeVersion"):
        run_helm(*["template", RELEASE, str(CHART), "--kube-version", "1.28.0"])
