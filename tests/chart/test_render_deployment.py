"""The chart against real clusters, offline: storage that can never work is refused at install, a
single-node claim rolls with Recreate and keeps training on the predictor's node, volumePermissions and
subPath, training Jobs that survive disruptions and queues, standard labels and the NOTES commands that
find them, a tighter Role, Jobs owned by a release object, resource fit, and the optional operations
objects. Every object is validated (kubernetes-validate, strict) where a schema exists."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.chart.helm import CHART, FULLNAME, NAMESPACE, RELEASE, render, render_error, run_helm, trainer_job

pytestmark = pytest.mark.usefixtures("helm")

K8S = "1.36.0"
RWO = {"storage": {"pvc": {"accessModes": ["ReadWriteOnce"]}}}
GPU_TRAINER = {"trainer": {"gpu": {"enabled": True}}}
PREDICTOR_SELECTOR = {
    "app.kubernetes.io/name": "lsbert",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "predictor",
}
NO_SCHEMA = {"ServiceMonitor", "PodMonitor", "HTTPRoute", "InferenceService"}


def validate_all(m) -> None:
    for obj in m:
        if obj["kind"] not in NO_SCHEMA:
            kubernetes_validate.validate(obj, K8S, strict=True)
    if m.has("ConfigMap", f"{FULLNAME}-job-values"):
        kubernetes_validate.validate(trainer_job(m.job_values(), name="t", namespace=NAMESPACE), K8S, strict=True)


def notes(values: dict[str, Any]) -> str:
    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", values=values).stdout
    return out[out.index("NOTES:") :]


def strategy(m) -> dict[str, Any]:
    if m.has("InferenceService"):
        return m.get("InferenceService")["spec"]["predictor"]["deploymentStrategy"]
    return m.get("Deployment")["spec"]["strategy"]


# ------------------------------------------------------------------------------------------ 1. storage


@pytest.mark.parametrize(
    "values, message",
    [
        ({"storage": {"pvc": {"accessModes": ["ReadWriteOncePod"]}}}, "ReadWriteOncePod"),
        ({"storage": {"pvc": {"accessModes": ["ReadWriteMany", "ReadWriteOncePod"]}}}, "ReadWriteOncePod"),
        ({"storage": {"pvc": {"accessModes": ["ReadOnlyMany"]}}}, "training writes checkpoints"),
        (
            {**RWO, **GPU_TRAINER, "storage": {"pvc": {"accessModes": ["ReadWriteOnce"], "colocateTrainer": False}}},
            "Multi-Attach",
        ),
        (
            {
                "storage": {
                    "pvc": {"existingClaim": "ebs", "accessModes": ["ReadWriteOnce"], "colocateTrainer": "false"}
                },
                **GPU_TRAINER,
            },
            "a GPU trainer on another node",
        ),
        ({"storage": {"pvc": {"colocateTrainer": "sometimes"}}}, "colocateTrainer"),
        ({"storage": {"pvc": {"subPath": "/abs"}}}, "subPath"),
        ({"storage": {"pvc": {"subPath": "a/../b"}}}, "subPath"),
    ],
    ids=[
        "rwop",
        "rwx-and-rwop",
        "rox",
        "rwo-gpu-trainer-elsewhere",
        "existing-rwo-gpu",
        "bad-colocate",
        "abs-subpath",
        "dotdot-subpath",
    ],
)
def test_storage_that_can_never_work_is_refused(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


def test_rwx_default_rolls_and_trains_anywhere() -> None:
    m = render()
    assert strategy(m) == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert m.job_values()["affinity"] == {}


@pytest.mark.parametrize("kserve_api", [False, True], ids=["deployment", "isvc"])
def test_single_node_claim_recreates_and_colocates_the_trainer(kserve_api: bool) -> None:
    m = render({**RWO, **GPU_TRAINER}, kserve_api=kserve_api)
    assert strategy(m) == {"type": "Recreate"}, "a surged pod on another node could never mount the claim"
    (term,) = m.job_values()["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": PREDICTOR_SELECTOR}}
    validate_all(m)
    # an explicit strategy still wins; a user's own affinity is kept next to the co-location term
    own = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "zone", "labelSelector": {"matchLabels": {"a": "b"}}}}
            ]
        }
    }
    m = render({**RWO, "deploymentStrategy": {"type": "RollingUpdate"}, "trainer": {"affinity": own}})
    assert strategy(m) == {"type": "RollingUpdate"}
    affinity = m.job_values()["affinity"]
    assert affinity["podAntiAffinity"] == own["podAntiAffinity"] and "podAffinity" in affinity
    # S3 has no claim: nothing to co-locate
    s3 = render({"storage": {"type": "s3", "s3": {"uri": "s3://b/p"}}, **GPU_TRAINER})
    assert s3.job_values()["affinity"] == {} and strategy(s3)["type"] == "RollingUpdate"


def test_notes_say_what_the_default_claim_needs() -> None:
    text = notes({})
    assert "DEFAULT storage class" in text and "ReadWriteMany" in text and "storageClassName" in text
    assert f"get pvc {FULLNAME}-checkpoints" in text
    assert "DEFAULT storage class" not in notes({"storage": {"pvc": {"storageClassName": "efs-sc"}}})
    rwo = notes(RWO)
    assert "ReadWriteOnce" in rwo and "Recreate" in rwo and "run on a node that runs a predictor pod" in rwo


# ------------------------------------------------------------------------- 2. write permission


def test_volume_permissions_init_container_and_sub_path() -> None:
    values = {
        "volumePermissions": {"enabled": True},
        "storage": {"pvc": {"subPath": "teams/nlp"}},
        "cache": {"huggingfaceOnClaim": True},
    }
    for kserve_api in (False, True):
        m = render(values, kserve_api=kserve_api)
        (init,) = m.predictor_pod_spec()["initContainers"]
        assert init["name"] == "volume-permissions"
        assert init["command"][-2:] == ["/volume/teams/nlp", "/volume/teams/nlp/.huggingface"]
        assert "chown 10001:10001" in init["command"][2]
        sc = init["securityContext"]
        assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE"]}
        assert init["volumeMounts"] == [{"name": "checkpoints", "mountPath": "/volume"}]
        mount = next(v for v in m.predictor_container()["volumeMounts"] if v["name"] == "checkpoints")
        assert mount == {"name": "checkpoints", "mountPath": "/var/lib/lsbert/models", "subPath": "teams/nlp"}
        trainer_mount = next(v for v in m.job_values()["volumeMounts"] if v["name"] == "checkpoints")
        assert trainer_mount["subPath"] == "teams/nlp"
        if not kserve_api:
            validate_all(m)
    assert "initContainers" not in render().predictor_pod_spec(), "opt-in"
    assert "storage.type=pvc" in render_error(
        {"volumePermissions": {"enabled": True}, "storage": {"type": "s3", "s3": {"uri": "s3://b/p"}}}
    )


def test_ids_can_be_removed_for_platforms_that_assign_them() -> None:
    """OpenShift assigns uid and fsGroup itself: null removes them from predictor and trainer pods."""
    values = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    m = render(values)
    for pod in (m.predictor_pod_spec(), {"securityContext": m.job_values()["podSecurityContext"]}):
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & pod["securityContext"].keys()
        assert pod["securityContext"]["runAsNonRoot"] is True


# --------------------------------------------------------------------------------- 4. training Jobs


def test_job_values_for_real_clusters() -> None:
    m = render(
        {
            "trainer": {
                "jobLabels": {"kueue.x-k8s.io/queue-name": "gpu-queue"},
                "jobAnnotations": {"team": "nlp"},
                "priorityClassName": "training-low",
                "backoffLimit": 1,
            }
        }
    )
    v = m.job_values()
    assert v["jobLabels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue" and v["jobAnnotations"] == {"team": "nlp"}
    assert v["priorityClassName"] == "training-low" and v["backoffLimit"] == 1
    validate_all(m)
    defaults = render().job_values()
    assert 0 < defaults["backoffLimit"] <= 3
    rules = defaults["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0]},
    } in rules
    assert defaults["podAnnotations"]["sidecar.istio.io/inject"] == "false"
    assert "priorityClassName" not in defaults
    # the defaults stay when a user adds an annotation (Helm merges maps)
    assert render({"trainer": {"podAnnotations": {"x": "y"}}}).job_values()["podAnnotations"] == {
        "sidecar.istio.io/inject": "false",
        "x": "y",
    }
    assert render({"trainer": {"podFailurePolicy": None}}).job_values()["podFailurePolicy"] == {}


# ----------------------------------------------------------------------------------------- 5. labels


def test_trainer_pods_carry_the_release_labels_and_pod_labels() -> None:
    jobspec = pytest.importorskip("lsbert.launcher.jobspec")
    m = render({"podLabels": {"cost-center": "ml"}, "trainer": {"podLabels": {"gpu": "a100"}}})
    values = jobspec.parse_job_values(m.job_values())
    job = jobspec.render_job(
        jobspec.load_template(),
        values,
        release=FULLNAME,
        namespace=NAMESPACE,
        project=3,
        version="finetuned_model-0004",
    )
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    deployment_labels = m.get("Deployment")["spec"]["template"]["metadata"]["labels"]
    for key in (
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/version",
    ):
        assert pod_labels[key] == deployment_labels[key], key
    assert pod_labels["app.kubernetes.io/instance"] == RELEASE
    assert pod_labels["cost-center"] == "ml" and pod_labels["gpu"] == "a100"
    assert pod_labels["lsbert.io/release"] == job["metadata"]["labels"]["lsbert.io/release"] == FULLNAME
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert jobspec.selection_labels(FULLNAME).items() <= pod_labels.items()


def test_notes_print_the_commands_that_show_training() -> None:
    text = notes({})
    assert f"kubectl -n {NAMESPACE} get jobs -l lsbert.io/release={FULLNAME}" in text
    assert f"kubectl -n {NAMESPACE} logs -l lsbert.io/release={FULLNAME} -f --prefix" in text
    assert "get jobs -l" not in notes({"trainer": {"launcher": "local"}})


# ------------------------------------------------------------------------------ 6. least privilege


def test_isvc_patch_only_with_the_restart_rollout() -> None:
    hot = render(kserve_api=True).get("Role")
    assert not [r for r in hot["rules"] if "inferenceservices" in r["resources"]]
    restart = render({"rollout": {"strategy": "restart"}}, kserve_api=True).get("Role")
    (rule,) = [r for r in restart["rules"] if "inferenceservices" in r["resources"]]
    assert rule["resourceNames"] == [FULLNAME] and sorted(rule["verbs"]) == ["get", "patch"]
    (events,) = [r for r in hot["rules"] if "events" in r["resources"]]
    assert events["resources"] == ["events"] and sorted(events["verbs"]) == ["get", "list"]


def test_inference_service_is_cluster_local_by_default() -> None:
    isvc = render(kserve_api=True).get("InferenceService")
    assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    exposed = render({"kserve": {"labels": {"networking.kserve.io/visibility": "exposed"}}}, kserve_api=True).get(
        "InferenceService"
    )
    assert exposed["metadata"]["labels"]["networking.kserve.io/visibility"] == "exposed"


def test_network_policy_admits_only_label_studio() -> None:
    assert not render().has("NetworkPolicy")
    m = render(
        {
            "networkPolicy": {
                "enabled": True,
                "labelStudioNamespace": "label-studio",
                "labelStudioPodLabels": {"app.kubernetes.io/name": "ls-app"},
                "extraFrom": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
            }
        }
    )
    policy = m.get("NetworkPolicy", FULLNAME)
    assert policy["spec"]["podSelector"] == {"matchLabels": PREDICTOR_SELECTOR}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert rule["from"][0] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "label-studio"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ls-app"}},
    }
    assert rule["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    assert rule["from"][2] == {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}
    validate_all(m)
    assert "labelStudioNamespace" in render_error({"networkPolicy": {"enabled": True}})


def test_admission_policy_pins_jobs_of_the_predictor() -> None:
    values = {"admissionPolicy": {"enabled": True}}
    m = render(values, kube_version="1.30.0")
    policy = m.get("ValidatingAdmissionPolicy")
    binding = m.get("ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
    }
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:{FULLNAME}'"
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert f"serviceAccountName == '{FULLNAME}-trainer'" in expressions
    assert "c.image == 'lsbert-trainer:0.1.0'" in expressions
    assert "hostPath" in expressions and "privileged" in expressions and "automountServiceAccountToken" in expressions
    rule = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert rule["apiGroups"] == ["batch"] and rule["resources"] == ["jobs"]
    for obj in (policy, binding):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
        kubernetes_validate.validate(obj, K8S, strict=True)
    with pytest.raises(Exception, match=r"Kubernetes >= 1\.30"):
        run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.29.5", values=values)
    assert "trainer.launcher=kubernetes" in render_error({**values, "trainer": {"launcher": "local"}})


# ------------------------------------------------------------------------------------- 8. uninstall


def test_training_jobs_are_owned_by_a_release_object() -> None:
    m = render()
    env = m.predictor_env()
    owner = env["JOB_OWNER_CONFIGMAP"]["value"]
    cm = m.get("ConfigMap", owner)
    assert "helm.sh/resource-policy" not in (cm["metadata"].get("annotations") or {}), "helm uninstall deletes it"
    (rule,) = [r for r in m.get("Role")["rules"] if "configmaps" in r["resources"]]
    assert rule == {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [owner], "verbs": ["get"]}


# ------------------------------------------------------------------------------------ 9. resource fit


def test_torch_threads_follow_the_cpu_request() -> None:
    m = render()
    ref = {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}
    assert m.predictor_env()["TORCH_THREADS"]["valueFrom"] == ref
    trainer_env = {e["name"]: e for e in m.job_values()["env"]}
    assert trainer_env["TORCH_THREADS"]["valueFrom"] == ref
    pinned = render({"settings": {"TORCH_THREADS": 3}})
    assert "TORCH_THREADS" not in pinned.predictor_env(), "an explicit setting (envFrom) is not overridden"


def test_require_cuda_follows_the_gpu_values() -> None:
    m = render({"gpu": {"enabled": True}, "trainer": {"gpu": {"enabled": True, "requireCuda": False}}})
    assert m.predictor_env()["REQUIRE_CUDA"]["value"] == "true"
    assert {e["name"]: e for e in m.job_values()["env"]}["REQUIRE_CUDA"]["value"] == "false"
    assert "REQUIRE_CUDA" not in render().predictor_env()


def test_hugging_face_cache_on_the_claim() -> None:
    m = render({"cache": {"huggingfaceOnClaim": True}})
    assert m.predictor_env()["HF_HOME"]["value"] == "/var/lib/lsbert/models/.huggingface"
    assert {e["name"]: e for e in m.job_values()["env"]}["HF_HOME"]["value"] == "/var/lib/lsbert/models/.huggingface"
    assert render().predictor_env()["HF_HOME"]["value"] == "/var/cache/lsbert/huggingface"
    assert "storage.type=pvc" in render_error(
        {"cache": {"huggingfaceOnClaim": True}, "storage": {"type": "s3", "s3": {"uri": "s3://b/p"}}}
    )


# ----------------------------------------------------------------------------------- 10. operations


def test_pod_disruption_budget() -> None:
    pdb = render().get("PodDisruptionBudget", FULLNAME)
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": PREDICTOR_SELECTOR}}
    kubernetes_validate.validate(pdb, K8S, strict=True)
    assert (
        render({"podDisruptionBudget": {"minAvailable": "50%"}}).get("PodDisruptionBudget")["spec"]["minAvailable"]
        == "50%"
    )
    assert not render({"podDisruptionBudget": {"enabled": False}}).has("PodDisruptionBudget")


def test_service_monitor_or_pod_monitor() -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    sm = render(values).get("ServiceMonitor", FULLNAME)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"] == {"matchLabels": PREDICTOR_SELECTOR}
    assert sm["spec"]["endpoints"][0]["port"] == render().get("Service")["spec"]["ports"][0]["name"]
    pm = render(values, kserve_api=True).get("PodMonitor", FULLNAME)
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http1"
    assert not render().has("ServiceMonitor")


@pytest.mark.parametrize("kserve_api, service, port", [(False, FULLNAME, 8080), (True, f"{FULLNAME}-predictor", 80)])
def test_ingress_and_http_route(kserve_api: bool, service: str, port: int) -> None:
    values = {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": ["lsbert.example.com"],
            "tls": [{"hosts": ["lsbert.example.com"], "secretName": "lsbert-tls"}],
        },
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "gw", "namespace": "gateways"}],
            "hostnames": ["lsbert.example.com"],
        },
    }
    m = render(values, kserve_api=kserve_api)
    ingress = m.get("Ingress", FULLNAME)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service, "port": {"number": port}}
    kubernetes_validate.validate(ingress, K8S, strict=True)
    route = m.get("HTTPRoute", FULLNAME)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": service, "port": port}]
    assert route["spec"]["parentRefs"] == [{"name": "gw", "namespace": "gateways"}]
    assert "ingress.hosts" in render_error({"ingress": {"enabled": True}})
    assert "parentRefs" in render_error({"httpRoute": {"enabled": True}})


def test_topology_spread_selects_the_predictor_pods() -> None:
    spread = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        {
            "maxSkew": 2,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"own": "x"}},
        },
    ]
    for kserve_api in (False, True):
        got = render({"topologySpreadConstraints": spread}, kserve_api=kserve_api).predictor_pod_spec()[
            "topologySpreadConstraints"
        ]
        assert got[0] == {**spread[0], "labelSelector": {"matchLabels": PREDICTOR_SELECTOR}}
        assert got[1] == spread[1]
    validate_all(render({"topologySpreadConstraints": spread}))


# ------------------------------------------------------------------------------------------ preStop drain


@pytest.mark.parametrize("kserve", [False, True], ids=["deployment", "inferenceservice"])
def test_predictor_keeps_serving_until_the_service_forgets_it(kserve: bool) -> None:
    """A stopping predictor sleeps in preStop before SIGTERM (the server then closes its listener), so a
    rolling update never sends a new connection to a closed port; 0 turns it off."""
    values = {"kserve": {"enabled": kserve}}
    m = render(values)
    assert m.predictor_container()["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert m.predictor_pod_spec()["terminationGracePeriodSeconds"] > 5
    validate_all(m)
    assert "lifecycle" not in render({**values, "preStopSleepSeconds": 0}).predictor_container()
    assert "preStopSleepSeconds" in render_error({**values, "preStopSleepSeconds": -1})
