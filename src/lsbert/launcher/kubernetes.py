"""Training runs as Kubernetes Jobs (``TRAINING_LAUNCHER=kubernetes``).

The Job is rendered from a template (``JOB_TEMPLATE``, default ``jobs/training-job.yaml``) and the
cluster-specific values (``JOB_VALUES``, a YAML file the Helm chart mounts from a ConfigMap); both are
described in ``jobs/README.md``. The cluster, not this process, is the record of what runs:

* a Job's name is deterministic, ``<release>-train-p<project>-<seq>`` (``seq`` from the version id), so a
  duplicate launch of the same run gets 409 AlreadyExists and adopts the Job instead of making a second;
* ``active_run`` lists the release's Jobs of the project by label, so a restarted predictor (or another
  replica) adopts an unfinished Job;
* when two replicas race and both create a Job for the same project, the older Job wins (by creation time,
  then sequence number, then name): the launcher that tracks the newer one deletes it and adopts the older,
  right after creating it and again on every ``poll``, so the cluster converges to one active Job per project.

Only the ``kubernetes`` Python client is used (no ``kubectl``): RBAC needed in the Job namespace is
jobs.batch create/get/list/watch/delete, pods get/list and pods/log get (see jobs/README.md).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import string
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

import yaml

from lsbert.launcher.base import Launcher, LaunchError, Run, RunPhase
from lsbert.store.base import version_seq

log = logging.getLogger(__name__)

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_PROJECT = "lsbert.io/project"
LABEL_VERSION = "lsbert.io/version"
ANNOTATION_VERSION = "lsbert.io/version"  # the exact version id (the label may be shortened to 63 chars)
APP_NAME = "lsbert"
COMPONENT = "trainer"
CONTAINER = "trainer"
JOB_NAME_POD_LABELS = ("batch.kubernetes.io/job-name", "job-name")
DEFAULT_TEMPLATE = "jobs/training-job.yaml"
FIELD_MANAGER = "lsbert"
REQUEST_TIMEOUT = (5, 30)  # connect, read (seconds) for every API call
MESSAGE_LIMIT = 1000
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

DEFAULTS = {"backoffLimit": 1, "activeDeadlineSeconds": 21600, "ttlSecondsAfterFinished": 86400}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage"}


class KubernetesLaunchError(LaunchError):
    """A launch the API server refused; ``status`` is the HTTP status (403 forbidden, 422 invalid, ...)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def _settings_error(message: str) -> Exception:
    from lsbert.settings import SettingsError

    return SettingsError(message)


# ------------------------------------------------------------------------------------------ names / labels


def dns_label(text: str) -> str:
    """``text`` lower-cased with every run of other characters turned into one '-', trimmed."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def job_name(release: str, project: int, version: str) -> str:
    """``<release>-train-p<project>-<seq>``: a DNS-1123 label of at most 63 characters.

    ``seq`` is the version's sequence number (``ft-0004`` -> ``0004``); a version without one gets a short
    hash instead. A long release name is shortened, never the part that identifies the run."""
    seq = version_seq(version)
    tail = f"{seq:04d}" if seq is not None else hashlib.sha1(version.encode()).hexdigest()[:8]
    suffix = f"-train-p{int(project)}-{tail}"
    prefix = (dns_label(release) or APP_NAME)[: max(1, 63 - len(suffix))].rstrip("-") or "l"
    name = prefix + suffix
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise LaunchError(f"cannot build a valid Job name for project {project} version {version!r}")
    return name


def label_value(text: str) -> str:
    """``text`` if it is a valid label value, else a valid shortened form with a hash of the original."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:54].strip("-_.")
    return f"{head}-{digest}" if head else digest


def selection_labels(release: str, project: Optional[int] = None) -> dict[str, str]:
    labels = {LABEL_NAME: APP_NAME, LABEL_COMPONENT: COMPONENT, LABEL_INSTANCE: release}
    if project is not None:
        labels[LABEL_PROJECT] = str(int(project))
    return labels


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


# ------------------------------------------------------------------------------------------ JOB_VALUES


_MAPS = ("resources", "nodeSelector", "affinity", "podLabels", "podAnnotations", "securityContext",
         "podSecurityContext")
_LISTS = ("imagePullSecrets", "tolerations", "env", "envFrom", "volumes", "volumeMounts")
_INTS = {"backoffLimit": 0, "activeDeadlineSeconds": 1, "ttlSecondsAfterFinished": 0}  # key -> minimum
_STRS = ("image", "imagePullPolicy", "serviceAccountName")
VALUE_KEYS = frozenset((*_MAPS, *_LISTS, *_INTS, *_STRS))


def _scalar_str(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def parse_job_values(raw: Any, source: str = "JOB_VALUES") -> dict[str, Any]:
    """Check and normalise the cluster-specific Job values (see jobs/README.md).

    Unknown keys are errors (a typo would otherwise be silently ignored); ``null`` means "not set";
    quantities, label/annotation/nodeSelector values and env values may be YAML numbers or booleans and
    become strings; an extended resource (``nvidia.com/gpu``) given only in requests is also set as limit."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - VALUE_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(VALUE_KEYS))}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in _STRS:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}: {key} must be a non-empty string")
            if key == "imagePullPolicy" and value not in _PULL_POLICIES:
                raise ValueError(f"{source}: imagePullPolicy must be one of {', '.join(_PULL_POLICIES)}")
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
                raise ValueError(f"{source}: {key} must be an integer >= {_INTS[key]}")
        elif key in _MAPS:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a mapping")
            value = copy.deepcopy(value)
        elif key in _LISTS:
            if not isinstance(value, list):
                raise ValueError(f"{source}: {key} must be a list")
            value = copy.deepcopy(value)
        values[key] = value
    if "image" not in values:
        raise ValueError(f"{source}: 'image' (the trainer image) is required")
    for key in ("nodeSelector", "podLabels", "podAnnotations"):
        if key in values:
            values[key] = {str(k): _scalar_str(v) for k, v in values[key].items()}
    if "imagePullSecrets" in values:
        secrets = []
        for item in values["imagePullSecrets"]:
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not item.get("name"):
                raise ValueError(f"{source}: imagePullSecrets entries are names or {{name: ...}}")
            secrets.append(item)
        values["imagePullSecrets"] = secrets
    for key in ("tolerations", "env", "envFrom", "volumes", "volumeMounts"):
        for item in values.get(key, []):
            if not isinstance(item, dict):
                raise ValueError(f"{source}: every {key} entry must be a mapping")
    for item in values.get("env", []):
        if not item.get("name"):
            raise ValueError(f"{source}: every env entry needs a name")
        if "value" in item:
            item["value"] = _scalar_str(item["value"])
    if "resources" in values:
        values["resources"] = _normalise_resources(values["resources"], source)
    return values


def _normalise_resources(resources: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(resources)
    for part in ("requests", "limits"):
        if out.get(part) is None:
            out.pop(part, None)
            continue
        if not isinstance(out[part], dict):
            raise ValueError(f"{source}: resources.{part} must be a mapping")
        out[part] = {str(k): _scalar_str(v) for k, v in out[part].items()}
    for name, quantity in (out.get("requests") or {}).items():
        if "/" in name and name not in _STANDARD_RESOURCES and name not in (out.get("limits") or {}):
            out.setdefault("limits", {})[name] = quantity  # extended resources need limit == request
    return out


def load_job_values(path: Optional[str]) -> dict[str, Any]:
    if not path:
        raise _settings_error(
            "TRAINING_LAUNCHER=kubernetes needs JOB_VALUES: a YAML file with at least `image` "
            "(the Helm chart mounts it from a ConfigMap; see jobs/README.md)")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise _settings_error(f"JOB_VALUES: cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise _settings_error(f"JOB_VALUES: {path} is not valid YAML: {exc}") from None
    try:
        return parse_job_values(raw, f"JOB_VALUES {path}")
    except ValueError as exc:
        raise _settings_error(str(exc)) from None


def load_template(path: Optional[str] = None) -> dict[str, Any]:
    """The Job template: ``path`` (JOB_TEMPLATE) as given, else relative to a source checkout; for the
    default path only, the copy built into this module (BUILTIN_TEMPLATE, kept identical to
    jobs/training-job.yaml by a test) when the file is not there (an installed package)."""
    path = path or DEFAULT_TEMPLATE
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(Path(__file__).resolve().parents[3] / path)
    for candidate in candidates:
        if candidate.is_file():
            try:
                text = candidate.read_text()
            except OSError as exc:
                raise _settings_error(f"JOB_TEMPLATE: cannot read {candidate}: {exc}") from None
            return parse_template(text, str(candidate))
    if path == DEFAULT_TEMPLATE:
        return parse_template(BUILTIN_TEMPLATE, "the built-in Job template")
    raise _settings_error(f"JOB_TEMPLATE: {path} not found (looked in {', '.join(str(c) for c in candidates)})")


def parse_template(text: str, source: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _settings_error(f"JOB_TEMPLATE: {source} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Job" or not isinstance(doc.get("spec"), dict):
        raise _settings_error(f"JOB_TEMPLATE: {source} is not a batch/v1 Job")
    return doc


# A copy of jobs/training-job.yaml (tests/kubernetes/test_job_template.py keeps the two identical).
BUILTIN_TEMPLATE = """\
# The lsbert training Job: one `lsbert train --project P --version V` run (see jobs/README.md).
#
# A plain batch/v1 Job skeleton. The launcher (src/lsbert/launcher/kubernetes.py):
#   1. parses this YAML, then substitutes ${name} ${namespace} ${release} ${project} ${version}
#      ${versionLabel} ${image} inside string values only (never as raw text, so values cannot inject YAML);
#   2. merges the cluster-specific parts from the JOB_VALUES file (image, resources, tolerations, env, ...);
#   3. appends the run's extra arguments to the trainer container's args;
#   4. forces the five selection labels below on the Job and its pod template.
# The numbers below are the defaults; JOB_VALUES may override each of them.
apiVersion: batch/v1
kind: Job
metadata:
  name: ${name}
  namespace: ${namespace}
  labels:
    app.kubernetes.io/name: lsbert
    app.kubernetes.io/component: trainer
    app.kubernetes.io/instance: ${release}
    app.kubernetes.io/managed-by: lsbert
    lsbert.io/project: "${project}"
    lsbert.io/version: "${versionLabel}"
  annotations:
    lsbert.io/version: "${version}"
spec:
  backoffLimit: 1
  activeDeadlineSeconds: 21600
  ttlSecondsAfterFinished: 86400
  template:
    metadata:
      labels:
        app.kubernetes.io/name: lsbert
        app.kubernetes.io/component: trainer
        app.kubernetes.io/instance: ${release}
        lsbert.io/project: "${project}"
        lsbert.io/version: "${versionLabel}"
      annotations:
        lsbert.io/version: "${version}"
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: 60
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: trainer
          image: ${image}
          command: ["lsbert", "train"]
          args: ["--project", "${project}", "--version", "${version}"]
          terminationMessagePolicy: FallbackToLogsOnError
          env:
            - name: PYTHONUNBUFFERED
              value: "1"
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
          securityContext:
            allowPrivilegeEscalation: false
            capabilities:
              drop: ["ALL"]
"""


# ------------------------------------------------------------------------------------------ rendering


def _substitute(node: Any, params: dict[str, str], where: str = "") -> Any:
    """Replace ``${placeholder}`` in every string value (keys are left alone)."""
    if isinstance(node, dict):
        return {k: _substitute(v, params, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, params, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:
        try:
            return string.Template(node).substitute(params)
        except KeyError as exc:
            raise LaunchError(f"Job template: unknown placeholder ${{{exc.args[0]}}} at {where.lstrip('.')}; "
                              f"known: {', '.join(sorted(params))}") from None
        except ValueError as exc:
            raise LaunchError(f"Job template: bad placeholder at {where.lstrip('.')}: {exc}") from None
    return node


def _merge_env(base: list[dict], extra: list[dict]) -> list[dict]:
    names = {item.get("name") for item in extra}
    return [item for item in base if item.get("name") not in names] + list(extra)


def render_job(template: dict[str, Any], values: dict[str, Any], *, release: str, namespace: str, project: int,
               version: str, args: Iterable[str] = ()) -> dict[str, Any]:
    """The Job body (a plain dict, camelCase like the YAML) for one run."""
    name = job_name(release, project, version)
    params = {"name": name, "namespace": namespace, "release": release, "project": str(int(project)),
              "version": version, "versionLabel": label_value(version), "image": values["image"]}
    job = _substitute(copy.deepcopy(template), params)
    labels = {**selection_labels(release, project), LABEL_VERSION: label_value(version)}

    meta = job.setdefault("metadata", {}) or {}
    job["metadata"] = meta
    meta["name"], meta["namespace"] = name, namespace
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    meta["annotations"] = {**(meta.get("annotations") or {}), ANNOTATION_VERSION: version}

    spec = job["spec"]
    for key, default in DEFAULTS.items():
        if key in values:
            spec[key] = values[key]
        else:
            spec.setdefault(key, default)
    pod_template = spec.setdefault("template", {})
    pod_meta = pod_template.get("metadata") or {}
    pod_template["metadata"] = pod_meta
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **values.get("podLabels", {}), **labels}
    pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **values.get("podAnnotations", {}),
                               ANNOTATION_VERSION: version}

    pod = pod_template.setdefault("spec", {})
    pod["restartPolicy"] = "Never"
    if "serviceAccountName" in values:
        pod["serviceAccountName"] = values["serviceAccountName"]
    if "imagePullSecrets" in values:
        pod["imagePullSecrets"] = values["imagePullSecrets"]
    if "nodeSelector" in values:
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **values["nodeSelector"]}
    if "tolerations" in values:
        pod["tolerations"] = list(pod.get("tolerations") or []) + values["tolerations"]
    if "affinity" in values:
        pod["affinity"] = values["affinity"]
    if "volumes" in values:
        pod["volumes"] = list(pod.get("volumes") or []) + values["volumes"]
    if "podSecurityContext" in values:
        pod["securityContext"] = {**(pod.get("securityContext") or {}), **values["podSecurityContext"]}

    containers = pod.get("containers") or []
    if not containers:
        raise LaunchError("Job template: the pod has no container")
    container = next((c for c in containers if c.get("name") == CONTAINER), containers[0])
    container["image"] = values["image"]
    if "imagePullPolicy" in values:
        container["imagePullPolicy"] = values["imagePullPolicy"]
    if "resources" in values:
        container["resources"] = values["resources"]
    if "env" in values:
        container["env"] = _merge_env(list(container.get("env") or []), values["env"])
    if "envFrom" in values:
        container["envFrom"] = list(container.get("envFrom") or []) + values["envFrom"]
    if "volumeMounts" in values:
        container["volumeMounts"] = list(container.get("volumeMounts") or []) + values["volumeMounts"]
    if "securityContext" in values:
        container["securityContext"] = {**(container.get("securityContext") or {}), **values["securityContext"]}
    container["args"] = [str(a) for a in (container.get("args") or [])] + [str(a) for a in args]
    return job


def _dropped_fields(original: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in ``original`` but missing after a round trip through the client models."""
    out: list[str] = []
    if isinstance(original, dict):
        kept = kept if isinstance(kept, dict) else {}
        for key, value in original.items():
            sub = f"{path}.{key}" if path else str(key)
            if value is None or value == {} or value == []:
                continue
            if key not in kept:
                out.append(sub)
            else:
                out += _dropped_fields(value, kept[key], sub)
    elif isinstance(original, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(original, kept)):
            out += _dropped_fields(a, b, f"{path}[{i}]")
    return out


_SERIALIZER = None


def _serializer():
    global _SERIALIZER
    if _SERIALIZER is None:
        from kubernetes import client

        _SERIALIZER = client.ApiClient()
    return _SERIALIZER


def to_v1_job(body: dict[str, Any]):
    """A ``V1Job`` for the client; LaunchError naming the field for a wrong type or an unknown field."""
    from kubernetes import client
    from pydantic import ValidationError

    try:
        job = client.V1Job.from_dict(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise LaunchError(f"invalid training Job: {where}: {first.get('msg')} "
                          f"(got {first.get('input')!r}; {exc.error_count()} error(s))") from None
    dropped = _dropped_fields(body, _serializer().sanitize_for_serialization(job))
    if dropped:
        raise LaunchError(f"invalid training Job: unknown field(s) {', '.join(dropped[:10])}")
    return job


# ------------------------------------------------------------------------------------------ reading Jobs


def _ts(value: Optional[datetime]) -> Optional[float]:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _condition(job, kind: str):
    for cond in (job.status.conditions if job.status else None) or []:
        if cond.type == kind and cond.status == "True":
            return cond
    return None


def job_phase(job) -> RunPhase:
    if _condition(job, "Complete") is not None:
        return RunPhase.SUCCEEDED
    if _condition(job, "Failed") is not None:
        return RunPhase.FAILED
    status = job.status
    if status is not None and (status.ready or 0) > 0:
        return RunPhase.RUNNING
    return RunPhase.PENDING


def job_finished(job) -> bool:
    return job_phase(job).finished


def job_version(job) -> str:
    meta = job.metadata
    return (meta.annotations or {}).get(ANNOTATION_VERSION) or (meta.labels or {}).get(LABEL_VERSION) or ""


def job_project(job) -> Optional[int]:
    try:
        return int((job.metadata.labels or {}).get(LABEL_PROJECT, ""))
    except ValueError:
        return None


def _age_key(job) -> tuple:
    """Winner order among active Jobs of one project: oldest first (then sequence number, then name)."""
    created = _ts(job.metadata.creation_timestamp) or float("inf")
    seq = version_seq(job_version(job))
    return (created, seq if seq is not None else sys.maxsize, job.metadata.name)


def _active(jobs: Iterable) -> list:
    return sorted((j for j in jobs if j.metadata.deletion_timestamp is None and not job_finished(j)), key=_age_key)


def _api_message(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        import json

        detail = ""
        try:
            detail = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            detail = (exc.body or "")[:300] if isinstance(exc.body, str) else ""
        return f"{exc.status} {exc.reason or ''}: {detail}".strip().rstrip(":")
    return f"{exc.__class__.__name__}: {exc}"


def _last_line(text: Optional[str]) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# ------------------------------------------------------------------------------------------ configuration


def load_api_client():
    """An ApiClient from the in-cluster ServiceAccount, else from KUBECONFIG (or ~/.kube/config)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except ConfigException as in_cluster:
        path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=path, client_configuration=cfg)
        except (ConfigException, OSError, TypeError) as exc:
            raise _settings_error(
                f"no Kubernetes API configuration: not in a cluster ({in_cluster}) and {path} is unusable ({exc})"
            ) from None
    return client.ApiClient(cfg)


def resolve_namespace(explicit: Optional[str] = None) -> str:
    """explicit > POD_NAMESPACE > the pod's ServiceAccount namespace > the kubeconfig context's > default."""
    if explicit:
        return explicit
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        ns = (SA_DIR / "namespace").read_text().strip()
        if ns:
            return ns
    except OSError:
        pass
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(os.environ.get("KUBECONFIG") or "~/.kube/config")
        ns = (active or {}).get("context", {}).get("namespace")
        if ns:
            return ns
    except Exception:  # no kubeconfig: the default namespace
        pass
    return "default"


# ------------------------------------------------------------------------------------------ the launcher


class KubernetesLauncher(Launcher):
    def __init__(self, api_client, namespace: str, *, values: dict[str, Any], template: Optional[dict] = None,
                 release: str = "lsbert", owns_client: bool = False):
        from kubernetes import client

        if not _LABEL_VALUE.match(release) or not release or len(release) > 63:
            raise _settings_error(f"RELEASE_NAME {release!r} is not a valid label value")
        self.api_client = api_client
        self.namespace = namespace
        self.release = release
        self.template = template if template is not None else load_template()
        self.values = parse_job_values(values)
        self._owns_client = owns_client
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        to_v1_job(self.render(0, "check-0001", []))  # a bad template or values file fails at start

    @classmethod
    def from_environment(cls, settings) -> "KubernetesLauncher":
        """In-cluster ServiceAccount (else KUBECONFIG); namespace POD_NAMESPACE; JOB_TEMPLATE, JOB_VALUES,
        RELEASE_NAME from the settings. Configuration errors stop the process with a message."""
        values = load_job_values(settings.job_values)
        template = load_template(settings.job_template)
        api_client = load_api_client()
        namespace = resolve_namespace(settings.pod_namespace)
        try:
            launcher = cls(api_client, namespace, values=values, template=template, release=settings.release_name,
                           owns_client=True)
        except LaunchError as exc:
            raise _settings_error(f"JOB_TEMPLATE/JOB_VALUES: {exc}") from None
        log.info("training runs are Kubernetes Jobs in namespace %s (release %s, image %s)", namespace,
                 settings.release_name, values["image"])
        return launcher

    # --- rendering ---------------------------------------------------------------------------------
    def render(self, project: int, version: str, args: Iterable[str] = ()) -> dict[str, Any]:
        return render_job(self.template, self.values, release=self.release, namespace=self.namespace,
                          project=project, version=version, args=args)

    def job_name(self, project: int, version: str) -> str:
        return job_name(self.release, project, version)

    def dry_run(self, project: int, version: str, args: Iterable[str] = ()):
        """Server-side validation (admission, defaulting, strict fields) of the Job without creating it."""
        try:
            return self._batch.create_namespaced_job(self.namespace, to_v1_job(self.render(project, version, args)),
                                                     dry_run="All", field_validation="Strict",
                                                     field_manager=FIELD_MANAGER, _request_timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            raise self._error("validate", exc) from None

    # --- the cluster -------------------------------------------------------------------------------
    def _error(self, what: str, exc: Exception) -> LaunchError:
        from kubernetes.client.exceptions import ApiException

        status = exc.status if isinstance(exc, ApiException) else None
        hint = ""
        if status == 403:
            hint = (f" (the predictor's ServiceAccount lacks a permission in namespace {self.namespace}; "
                    "see jobs/README.md for the Role it needs)")
        return KubernetesLaunchError(f"cannot {what} training Jobs: {_api_message(exc)}{hint}", status)

    def list_jobs(self, project: Optional[int] = None) -> list:
        """The release's training Jobs (of one project), as the API server has them now."""
        try:
            return self._batch.list_namespaced_job(
                self.namespace, label_selector=label_selector(selection_labels(self.release, project)),
                _request_timeout=REQUEST_TIMEOUT).items
        except Exception as exc:
            raise self._error("list", exc) from None

    def _read(self, name: str):
        return self._batch.read_namespaced_job(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)

    def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background",
                                              _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise self._error("delete", exc) from None

    def active_run(self, project: int) -> Optional[Run]:
        """The project's unfinished Job (the oldest, should there be several), decided from the cluster."""
        active = _active(self.list_jobs(project))
        if not active:
            return None
        run = self._run_from(active[0])
        self._update(run, active[0])
        return run

    def active_runs(self) -> list[Run]:
        """One Run per project with an unfinished Job of this release (for adopting them all at start)."""
        by_project: dict[int, Any] = {}
        for job in _active(self.list_jobs()):
            project = job_project(job)
            if project is not None and project not in by_project:
                by_project[project] = job
        return [self._adopt(job) for _, job in sorted(by_project.items())]

    def launch(self, project: int, version: str, args: list[str]) -> Run:
        active = _active(self.list_jobs(project))
        if active:  # another replica (or an earlier life of this one) already trains this project
            log.info("project %s: Job %s is already active; adopting it instead of launching %s", project,
                     active[0].metadata.name, version)
            return self._adopt(active[0])
        from kubernetes.client.exceptions import ApiException

        body = to_v1_job(self.render(project, version, args))
        name = body.metadata.name
        try:
            job = self._batch.create_namespaced_job(self.namespace, body, field_validation="Strict",
                                                    field_manager=FIELD_MANAGER, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 409:
                raise self._error("create", exc) from None
            try:
                job = self._read(name)
            except Exception as read_exc:
                raise self._error("read", read_exc) from None
            if job_project(job) != project or job_version(job) != version:
                raise KubernetesLaunchError(
                    f"a Job named {name} already exists for project {job_project(job)} version "
                    f"{job_version(job)!r}, not for project {project} version {version!r}", 409) from None
            log.info("project %s: Job %s already exists; adopting it", project, name)
            return self._adopt(job)
        except Exception as exc:
            raise self._error("create", exc) from None
        log.info("project %s: created Job %s/%s for %s", project, self.namespace, name, version)
        run = self._run_from(job)
        self._resolve_race(run)
        return run

    def _adopt(self, job) -> Run:
        run = self._run_from(job)
        self._update(run, job)
        return run

    def _resolve_race(self, run: Run, jobs: Optional[list] = None) -> bool:
        """If another active Job of the project is older than ours, delete ours and track that one.

        Every replica applies the same order to the same Jobs, so they all keep the same one."""
        try:
            active = _active(jobs if jobs is not None else self.list_jobs(run.project))
        except LaunchError as exc:
            log.warning("project %s: cannot check for concurrent Jobs: %s", run.project, exc)
            return False
        if not active or active[0].metadata.name == run.run_id:
            return False
        if not any(j.metadata.name == run.run_id for j in active):
            return False  # ours has finished or is gone: nothing to resolve
        winner = active[0]
        log.warning("project %s: Jobs %s and %s raced; keeping the older %s and deleting %s", run.project,
                    winner.metadata.name, run.run_id, winner.metadata.name, run.run_id)
        self._delete(run.run_id)
        self._become(run, winner)
        return True

    def _become(self, run: Run, job) -> None:
        """Make ``run`` (the scheduler holds this object) track ``job`` instead."""
        adopted = self._adopt(job)
        for attr in ("version", "run_id", "phase", "started_at", "finished_at", "message", "log", "extra"):
            setattr(run, attr, getattr(adopted, attr))

    def poll(self, run: Run) -> Run:
        if run.phase.finished:
            return run
        from kubernetes.client.exceptions import ApiException

        jobs = self.list_jobs(run.project)  # raises on API errors; the scheduler tries again next tick
        job = next((j for j in jobs if j.metadata.name == run.run_id), None)
        if job is None:
            try:
                job = self._read(run.run_id)
            except ApiException as exc:
                if exc.status != 404:
                    raise self._error("read", exc) from None
                active = _active(jobs)
                if active:  # ours lost a race (another replica deleted it): follow the Job that won
                    log.warning("project %s: Job %s is gone; following the active Job %s", run.project, run.run_id,
                                active[0].metadata.name)
                    self._become(run, active[0])
                    return run
                run.phase, run.finished_at = RunPhase.FAILED, time.time()
                run.message = f"Job {self.namespace}/{run.run_id} was deleted before it finished"
                return run
        if not job_finished(job) and self._resolve_race(run, jobs):
            return run
        self._update(run, job)
        return run

    def close(self) -> None:
        """Jobs keep running in the cluster (a restarted predictor adopts them); only the client is closed."""
        if self._owns_client:
            try:
                self.api_client.close()
            except Exception:  # pragma: no cover
                pass

    # --- Run <- Job ------------------------------------------------------------------------------
    def _run_from(self, job) -> Run:
        name = job.metadata.name
        project = job_project(job)
        return Run(
            project=project if project is not None else -1,
            version=job_version(job),
            run_id=name,
            phase=RunPhase.PENDING,
            started_at=_ts(job.metadata.creation_timestamp) or time.time(),
            log=f"kubectl logs -f job/{name} -n {self.namespace}",
            extra={"namespace": self.namespace, "job": name, "uid": job.metadata.uid},
        )

    def _update(self, run: Run, job) -> None:
        phase = job_phase(job)
        run.phase = phase
        status = job.status
        if status is not None and status.start_time is not None:
            run.started_at = _ts(status.start_time)
        if phase is RunPhase.SUCCEEDED:
            run.finished_at = _ts(status.completion_time) or _ts(_condition(job, "Complete").last_transition_time) \
                or time.time()
            run.message = ""
        elif phase is RunPhase.FAILED:
            cond = _condition(job, "Failed")
            run.finished_at = _ts(cond.last_transition_time) or time.time()
            run.message = self._failure_message(job, cond)
        else:
            run.message = self._pending_message(job) if phase is RunPhase.PENDING else ""

    def _pods(self, job_name_: str) -> list:
        for label in JOB_NAME_POD_LABELS:
            try:
                pods = self._core.list_namespaced_pod(self.namespace, label_selector=f"{label}={job_name_}",
                                                      _request_timeout=REQUEST_TIMEOUT).items
            except Exception as exc:
                log.debug("cannot list the pods of Job %s: %s", job_name_, exc)
                return []
            if pods:
                return sorted(pods, key=lambda p: _ts(p.metadata.creation_timestamp) or 0.0)
        return []

    def _failure_message(self, job, cond) -> str:
        parts = [f"{cond.reason or 'Failed'}: {cond.message or 'the Job failed'}"]
        pods = self._pods(job.metadata.name)
        failed = [p for p in pods if p.status is not None and p.status.phase == "Failed"] or pods
        if failed:
            pod = failed[-1]
            term = None
            for status in (pod.status.container_statuses or []) if pod.status else []:
                if status.name == CONTAINER or term is None:
                    state = status.state
                    if state is not None and state.terminated is not None:
                        term = state.terminated
            if term is not None:
                parts.append(f"exit code {term.exit_code}" + (f" ({term.reason})" if term.reason else ""))
            line = self._last_log_line(pod.metadata.name) or (_last_line(term.message) if term is not None else "")
            if line:
                parts.append(line)
        return "; ".join(parts)[:MESSAGE_LIMIT]

    def _last_log_line(self, pod_name: str) -> str:
        try:
            text = self._core.read_namespaced_pod_log(pod_name, self.namespace, container=CONTAINER, tail_lines=20,
                                                      _request_timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # no pods/log permission, pod gone, node unreachable: the rest still helps
            log.debug("cannot read the log of pod %s: %s", pod_name, exc)
            return ""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return _last_line(text if isinstance(text, str) else "")

    def _pending_message(self, job) -> str:
        """Why a Job has no running pod yet: unschedulable, image pull, missing Secret, ..."""
        for pod in reversed(self._pods(job.metadata.name)):
            status = pod.status
            if status is None:
                continue
            for cond in status.conditions or []:
                if cond.type == "PodScheduled" and cond.status == "False":
                    return f"{cond.reason or 'Unschedulable'}: {cond.message or ''}".strip()[:MESSAGE_LIMIT]
            for cstatus in status.container_statuses or []:
                waiting = cstatus.state.waiting if cstatus.state else None
                if waiting is not None and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
                    return f"{waiting.reason}: {waiting.message or ''}".strip()[:MESSAGE_LIMIT]
            break
        return ""


# ------------------------------------------------------------------------------------------ lsbert status


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def print_jobs(namespace: Optional[str] = None, *, api_client=None, out: Optional[TextIO] = None) -> int:
    """``lsbert status --kubernetes``: every lsbert training Job in the namespace, oldest first."""
    from kubernetes import client

    out = out or sys.stdout
    ns = namespace or "?"
    owns = api_client is None
    try:
        ns = resolve_namespace(namespace)
        if api_client is None:
            api_client = load_api_client()
        jobs = client.BatchV1Api(api_client).list_namespaced_job(
            ns, label_selector=label_selector({LABEL_NAME: APP_NAME, LABEL_COMPONENT: COMPONENT}),
            _request_timeout=REQUEST_TIMEOUT).items
    except (Exception, SystemExit) as exc:
        why = _api_message(exc) if isinstance(exc, Exception) else str(exc)
        print(f"training Jobs in namespace {ns}: cannot list them ({why})", file=sys.stderr)
        return 1
    finally:
        if owns and api_client is not None:
            api_client.close()
    if not jobs:
        print(f"no lsbert training Jobs in namespace {ns}", file=out)
        return 0
    now = time.time()
    rows = [("JOB", "PROJECT", "VERSION", "PHASE", "AGE", "MESSAGE")]
    for job in sorted(jobs, key=_age_key):
        phase = job_phase(job)
        message = ""
        if phase is RunPhase.FAILED:
            cond = _condition(job, "Failed")
            message = f"{cond.reason}: {cond.message}"[:120]
        labels = job.metadata.labels or {}
        rows.append((job.metadata.name, labels.get(LABEL_PROJECT, "?"), job_version(job), phase.value,
                     _age(now - (_ts(job.metadata.creation_timestamp) or now)), message))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"training Jobs in namespace {ns}:", file=out)
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5]))
        print(f"  {line}  {row[5]}" if row[5] else f"  {line}".rstrip(), file=out)
    return 0
