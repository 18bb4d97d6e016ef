"""The training Job template, JOB_VALUES and the Deployment rollout judgement, offline (no cluster).

Rendered Jobs are validated with kubernetes-validate (strict: unknown fields are errors) against the
bundled Kubernetes 1.36/1.37 schemas; the same bodies go to the real API server in test_launcher.py."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from lsbert.launcher import jobspec
from lsbert.launcher.base import LaunchError, RunPhase
from lsbert.launcher.kubernetes import KubernetesLauncher
from lsbert.rollout import kserve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate")  # a test extra (pyproject: kubernetes-validate==1.37.0)


FULL_VALUES = {
    "image": "registry.example.com/lsbert/trainer:0.1.0",
    "imagePullPolicy": "IfNotPresent",
    "imagePullSecrets": ["regcred", {"name": "other"}],
    "serviceAccountName": "lsbert-trainer",
    "resources": {"requests": {"cpu": 4, "memory": "16Gi", "nvidia.com/gpu": 1}, "limits": {"memory": "24Gi"}},
    "nodeSelector": {"nvidia.com/gpu.present": True, "pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
    "env": [
        {"name": "MODEL_DIR", "value": "/models"},
        {"name": "NUM_TRAIN_EPOCHS", "value": 3},
        {"name": "LABEL_STUDIO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "ls", "key": "token"}}},
        {"name": "PYTHONUNBUFFERED", "value": "0"},
    ],
    "envFrom": [{"configMapRef": {"name": "lsbert-env"}}, {"secretRef": {"name": "lsbert-s3", "optional": True}}],
    "volumes": [
        {"name": "models", "persistentVolumeClaim": {"claimName": "lsbert-models"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
    ],
    "volumeMounts": [{"name": "models", "mountPath": "/models"}, {"name": "cache", "mountPath": "/cache"}],
    "podLabels": {"team": "ml", "app.kubernetes.io/name": "not-allowed-to-win"},
    "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": False},
    "backoffLimit": 0,
    "activeDeadlineSeconds": 3600,
    "ttlSecondsAfterFinished": 600,
    "securityContext": {"readOnlyRootFilesystem": True},
    "podSecurityContext": {"fsGroup": 2000},
}


def render(values=None, *, release="lsbert", project=3, version="ft-0004", args=()):
    vals = jobspec.parse_job_values(values or {"image": "img:1"})
    return jobspec.render_job(
        jobspec.load_template(), vals, release=release, namespace="ml", project=project, version=version, args=args
    )


@pytest.mark.parametrize("kube", ["1.36.0", "1.37.0"])
def test_rendered_jobs_pass_strict_schema_validation(kube, kubernetes_validate):
    for values in ({"image": "img:1"}, FULL_VALUES):
        body = render(values, args=["--epochs", "1"])
        kubernetes_validate.validate(body, kube, strict=True)
        jobspec.to_v1_job(body)


def test_schema_validation_catches_what_the_launcher_must_not_send(kubernetes_validate):
    body = render()
    body["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, "1.36.0", strict=True)
    with pytest.raises(LaunchError, match=r"unknown field.*bogusField"):
        jobspec.to_v1_job(body)


def test_the_default_template_is_package_data_and_job_template_replaces_it(tmp_path):
    packaged = REPO / "src" / "lsbert" / "launcher" / jobspec.TEMPLATE_RESOURCE
    assert jobspec.load_template() == jobspec.load_template(None) == yaml.safe_load(packaged.read_text())
    custom = yaml.safe_load(packaged.read_text())
    custom["spec"]["backoffLimit"] = 4
    path = tmp_path / "custom-job.yaml"
    path.write_text(yaml.safe_dump(custom))
    assert jobspec.load_template(str(path))["spec"]["backoffLimit"] == 4
    path.write_text("kind: Deployment\nspec: {}\n")
    from lsbert.settings import SettingsError

    with pytest.raises(SettingsError, match="not a batch/v1 Job"):
        jobspec.load_template(str(path))


def test_default_job_shape():
    job = render(args=["--epochs", "2"])
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == "lsbert-train-p3-0004" and meta["namespace"] == "ml"
    want = {
        "app.kubernetes.io/name": "lsbert",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/instance": "lsbert",
        "lsbert.io/release": "lsbert",
        "lsbert.io/project": "3",
        "lsbert.io/version": "ft-0004",
    }
    assert want.items() <= meta["labels"].items()
    assert want.items() <= spec["template"]["metadata"]["labels"].items()
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (2, 21600, 86400)
    # Disruptions (preemption, drain) are retried without counting; the trainer's own failure is final.
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0]},
    }
    assert spec["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert "ownerReferences" not in meta
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # uid, gid and fsGroup come from the image or the values, so a platform that assigns them can leave them out
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & pod["securityContext"].keys()
    (container,) = pod["containers"]
    assert container["command"] == ["lsbert", "train"]
    assert container["args"] == ["--project", "3", "--version", "ft-0004", "--epochs", "2"]
    assert container["image"] == "img:1"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "resources" not in container  # no GPU unless configured


def test_values_are_merged():
    job = render(FULL_VALUES)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (0, 3600, 600)
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert c["resources"]["limits"] == {"memory": "24Gi", "nvidia.com/gpu": "1"}  # GPU limit added
    assert pod["tolerations"] == FULL_VALUES["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "gpu"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert pod["serviceAccountName"] == "lsbert-trainer"
    env = {e["name"]: e for e in c["env"]}
    assert env["NUM_TRAIN_EPOCHS"]["value"] == "3"
    assert env["PYTHONUNBUFFERED"]["value"] == "0"  # values override the template's entry
    assert [e["name"] for e in c["env"]].count("PYTHONUNBUFFERED") == 1
    assert env["LABEL_STUDIO_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "ls", "key": "token"}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert c["volumeMounts"][0]["mountPath"] == "/models"
    labels = spec["template"]["metadata"]["labels"]
    assert labels["team"] == "ml" and labels["app.kubernetes.io/name"] == "lsbert"  # selection labels win
    assert spec["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    # securityContexts are merged key by key over the template's
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["fsGroup"] == 2000 and pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    "release,project,version,expected",
    [
        ("lsbert", 3, "ft-0004", "lsbert-train-p3-0004"),
        ("My_Release", 12, "finetuned_model-0123", "my-release-train-p12-0123"),
        ("x" * 80, 123456789, "ft-12345", "x" * (63 - len("-train-p123456789-12345")) + "-train-p123456789-12345"),
    ],
)
def test_job_names_are_deterministic_dns_labels(release, project, version, expected):
    name = jobspec.job_name(release, project, version)
    assert name == expected
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert jobspec.job_name(release, project, version) == name


def test_long_versions_keep_a_valid_label_and_the_exact_annotation(kubernetes_validate):
    version = "a" * 70 + "-0001"
    job = render({"image": "i"}, version=version)
    label = job["metadata"]["labels"]["lsbert.io/version"]
    assert len(label) <= 63 and label != version
    assert job["metadata"]["annotations"]["lsbert.io/version"] == version
    assert job["metadata"]["name"] == "lsbert-train-p3-0001"
    kubernetes_validate.validate(job, "1.36.0", strict=True)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({}, "'image'"),
        ({"image": "i", "tolerations": {"key": "x"}}, "tolerations must be a list"),
        ({"image": "i", "imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
        ({"image": "i", "backoffLimit": "1"}, "backoffLimit must be an integer"),
        ({"image": "i", "activeDeadlineSeconds": 0}, "activeDeadlineSeconds"),
        ({"image": "i", "resource": {}}, "unknown key"),
        ({"image": "i", "env": [{"value": "x"}]}, "needs a name"),
        ([], "mapping"),
    ],
)
def test_bad_values_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        jobspec.parse_job_values(raw)


def test_nulls_mean_unset():
    values = jobspec.parse_job_values({"image": "i", "resources": None, "tolerations": None, "backoffLimit": None})
    assert values == {"image": "i"}
    assert render(values)["spec"]["backoffLimit"] == 2


def test_job_level_values_priority_and_failure_policy(kubernetes_validate):
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    job = render(
        {
            "image": "i",
            "jobLabels": {
                "kueue.x-k8s.io/queue-name": "gpu",
                "app.kubernetes.io/instance": "rel",
                "lsbert.io/release": "someone-else",
            },
            "jobAnnotations": {"team": "ml"},
            "priorityClassName": "training-low",
            "podFailurePolicy": policy,
            "podLabels": {"app.kubernetes.io/instance": "rel", "lsbert.io/project": "99"},
        }
    )
    meta, spec = job["metadata"], job["spec"]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert meta["annotations"]["team"] == "ml" and meta["annotations"]["lsbert.io/version"] == "ft-0004"
    assert spec["podFailurePolicy"] == policy
    assert spec["template"]["spec"]["priorityClassName"] == "training-low"
    # The installer's instance label is kept; the selection labels always win.
    for labels in (meta["labels"], spec["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["lsbert.io/release"] == "lsbert" and labels["lsbert.io/project"] == "3"
    kubernetes_validate.validate(jobspec.to_v1_job(job).to_dict() and job, "1.36.0", strict=True)
    assert "podFailurePolicy" not in render({"image": "i", "podFailurePolicy": {}})["spec"]


def test_owner_reference_is_set_when_given():
    owner = jobspec.owner_reference("ConfigMap", "rel-lsbert-job-values", "uid-1")
    job = jobspec.render_job(
        jobspec.load_template(),
        jobspec.parse_job_values({"image": "i"}),
        release="lsbert",
        namespace="ml",
        project=3,
        version="ft-0004",
        owner=owner,
    )
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "rel-lsbert-job-values", "uid": "uid-1"}
    ]
    jobspec.to_v1_job(job)


def test_selection_is_by_lsbert_release_label():
    assert jobspec.selection_labels("rel-lsbert", 4) == {
        "lsbert.io/release": "rel-lsbert",
        "app.kubernetes.io/name": "lsbert",
        "app.kubernetes.io/component": "trainer",
        "lsbert.io/project": "4",
    }


def test_wrong_types_and_typos_deep_in_values_fail_before_the_api_server():
    with pytest.raises(LaunchError, match="runAsUser"):
        jobspec.to_v1_job(render({"image": "i", "podSecurityContext": {"runAsUser": "1000"}}))
    with pytest.raises(LaunchError, match=r"tolerations\[0\]\.efect"):
        jobspec.to_v1_job(render({"image": "i", "tolerations": [{"key": "k", "efect": "NoSchedule"}]}))


def test_launcher_refuses_bad_values_at_construction():
    from lsbert.settings import SettingsError

    with pytest.raises(LaunchError, match="unknown field"):
        KubernetesLauncher(
            client.ApiClient(), "ml", values={"image": "i", "volumes": [{"name": "v", "pvc": {"claimName": "x"}}]}
        )
    with pytest.raises(SettingsError, match="RELEASE_NAME"):
        KubernetesLauncher(client.ApiClient(), "ml", values={"image": "i"}, release="bad release")


def test_unknown_template_placeholder_is_an_error():
    template = jobspec.load_template()
    template["metadata"]["annotations"]["x"] = "${nope}"
    with pytest.raises(LaunchError, match=r"unknown placeholder \$\{nope\}"):
        jobspec.render_job(template, {"image": "i"}, release="r", namespace="n", project=1, version="ft-0001")


def test_values_file_and_settings_errors(tmp_path):
    from lsbert.settings import SettingsError

    with pytest.raises(SettingsError, match="JOB_VALUES"):
        jobspec.load_job_values(None)
    path = tmp_path / "values.yaml"
    path.write_text("image: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        jobspec.load_job_values(str(path))
    path.write_text(yaml.safe_dump(FULL_VALUES))
    assert jobspec.load_job_values(str(path))["resources"]["limits"]["nvidia.com/gpu"] == "1"
    with pytest.raises(SettingsError, match="not found"):
        jobspec.load_template(str(tmp_path / "missing.yaml"))


def test_readme_documents_exactly_the_value_keys():
    readme = (REPO / "jobs" / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z]+)` \|", readme, re.M))
    assert documented == set(jobspec.VALUE_KEYS)


# ------------------------------------------------------------------------------------------ Job status


def job(conditions=(), ready=0, active=1):
    now = datetime.now(timezone.utc)
    return client.V1Job(
        metadata=client.V1ObjectMeta(
            name="j",
            labels={"lsbert.io/project": "3"},
            annotations={"lsbert.io/version": "ft-0001"},
            creation_timestamp=now,
        ),
        status=client.V1JobStatus(
            active=active,
            ready=ready,
            conditions=[
                client.V1JobCondition(type=t, status="True", reason=r, message=m, last_transition_time=now)
                for t, r, m in conditions
            ],
        ),
    )


def test_job_phase():
    assert jobspec.job_phase(job()) is RunPhase.PENDING
    assert jobspec.job_phase(job(ready=1)) is RunPhase.RUNNING
    done = job([("SuccessCriteriaMet", "CompletionsReached", ""), ("Complete", "", "")])
    assert jobspec.job_phase(done) is RunPhase.SUCCEEDED
    assert jobspec.job_phase(job([("FailureTarget", "BackoffLimitExceeded", "x")], ready=0)) is RunPhase.PENDING
    assert jobspec.job_phase(job([("Failed", "DeadlineExceeded", "too long")])) is RunPhase.FAILED
    assert jobspec.job_version(job()) == "ft-0001" and jobspec.job_project(job()) == 3


# ------------------------------------------------------------------------------------------ rollout


def deployment(
    *,
    generation=2,
    observed=2,
    replicas=1,
    updated=1,
    available=1,
    total=1,
    reason="NewReplicaSetAvailable",
    annotation="p3=ft-0004",
):
    return {
        "metadata": {"name": "lsbert-predictor", "generation": generation},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"annotations": {kserve.ANNOTATION: annotation}}},
        },
        "status": {
            "observedGeneration": observed,
            "replicas": total,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": [
                {"type": "Available", "status": "True"},
                {"type": "Progressing", "status": "True", "reason": reason, "message": "m"},
            ],
        },
    }


def test_deployment_rollout_judgement():
    assert kserve.deployment_rollout(deployment()) == (True, "")
    assert kserve.deployment_rollout(deployment(), "p3=ft-0004")[0]
    assert not kserve.deployment_rollout(deployment(), "p3=ft-0005")[0]  # KServe has not updated it yet
    assert not kserve.deployment_rollout(deployment(observed=1))[0]
    assert not kserve.deployment_rollout(deployment(total=2))[0]  # an old pod still there
    assert not kserve.deployment_rollout(deployment(available=0))[0]
    assert not kserve.deployment_rollout(deployment(updated=0))[0]
    assert not kserve.deployment_rollout(deployment(reason="ReplicaSetUpdated"))[0]
    with pytest.raises(kserve.RolloutFailed, match="ProgressDeadlineExceeded"):
        kserve.deployment_rollout(deployment(reason="ProgressDeadlineExceeded", available=0))
    # the same on a client model
    model = client.V1Deployment.from_dict(deployment())
    assert kserve.deployment_rollout(model, "p3=ft-0004") == (True, "")


def test_checkpoints_id():
    assert kserve.checkpoints_id({5: "ft-0002", 3: "ft-0004", 7: None}) == "p3=ft-0004,p5=ft-0002"
    assert kserve.checkpoints_id({}) == ""
    assert kserve.predictor_deployment_name("lsbert") == "lsbert-predictor"
