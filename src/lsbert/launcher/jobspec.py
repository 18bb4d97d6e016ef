"""The training Job as data: names, labels, the template, the JOB_VALUES file, rendering and reading.

Pure functions (no API calls): the launcher (``lsbert.launcher.kubernetes``) creates and follows the Jobs
they describe, ``lsbert status`` prints them. The template ships inside this package
(``training-job.yaml``); ``JOB_TEMPLATE`` may name another file. Both files are described in
``jobs/README.md``.
"""

from __future__ import annotations

import copy
import hashlib
import re
import string
import sys
from datetime import datetime, timezone
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from lsbert.launcher.base import LaunchError, RunPhase
from lsbert.settings import SettingsError
from lsbert.store.base import version_seq

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_RELEASE = "lsbert.io/release"  # RELEASE_NAME: what the launcher selects its Jobs by
LABEL_PROJECT = "lsbert.io/project"
LABEL_VERSION = "lsbert.io/version"
ANNOTATION_VERSION = "lsbert.io/version"  # the exact version id (the label may be shortened to 63 chars)
ANNOTATION_TRIGGER = "lsbert.io/trigger"  # what asked for the run (Run.trigger), when known
APP_NAME = "lsbert"
COMPONENT = "trainer"
CONTAINER = "trainer"
TEMPLATE_RESOURCE = "training-job.yaml"  # package data of lsbert.launcher

DEFAULTS = {"backoffLimit": 2, "activeDeadlineSeconds": 21600, "ttlSecondsAfterFinished": 86400}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage"}


def valid_label_value(text: str) -> bool:
    return bool(text) and len(text) <= 63 and bool(_LABEL_VALUE.match(text))


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
    """The labels the launcher finds its Jobs (and their pods) by. lsbert's own ``lsbert.io/release``, not
    ``app.kubernetes.io/instance``: the instance label belongs to whoever installs lsbert (the Helm chart
    sets it to the Helm release on every object, training pods included)."""
    labels = {LABEL_RELEASE: release, LABEL_NAME: APP_NAME, LABEL_COMPONENT: COMPONENT}
    if project is not None:
        labels[LABEL_PROJECT] = str(int(project))
    return labels


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


# ------------------------------------------------------------------------------------------ JOB_VALUES


_MAPS = (
    "resources",
    "nodeSelector",
    "affinity",
    "podLabels",
    "podAnnotations",
    "securityContext",
    "podSecurityContext",
    "jobLabels",
    "jobAnnotations",
    "podFailurePolicy",
)
_LISTS = ("imagePullSecrets", "tolerations", "env", "envFrom", "volumes", "volumeMounts")
_INTS = {"backoffLimit": 0, "activeDeadlineSeconds": 1, "ttlSecondsAfterFinished": 0}  # key -> minimum
_STRS = ("image", "imagePullPolicy", "serviceAccountName", "priorityClassName")
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
    for key in ("nodeSelector", "podLabels", "podAnnotations", "jobLabels", "jobAnnotations"):
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
        raise SettingsError(
            "TRAINING_LAUNCHER=kubernetes needs JOB_VALUES: a YAML file with at least `image` "
            "(the Helm chart mounts it from a ConfigMap; see jobs/README.md)"
        )
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"JOB_VALUES: cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"JOB_VALUES: {path} is not valid YAML: {exc}") from None
    try:
        return parse_job_values(raw, f"JOB_VALUES {path}")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def load_template(path: Optional[str] = None) -> dict[str, Any]:
    """The Job template: the file ``path`` (JOB_TEMPLATE) if given, else the one shipped in this package."""
    if not path:
        text = importlib_resources.files("lsbert.launcher").joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")
        return parse_template(text, f"the built-in Job template ({TEMPLATE_RESOURCE})")
    candidate = Path(path)
    if not candidate.is_file():
        raise SettingsError(f"JOB_TEMPLATE: {path} not found")
    try:
        text = candidate.read_text()
    except OSError as exc:
        raise SettingsError(f"JOB_TEMPLATE: cannot read {candidate}: {exc}") from None
    return parse_template(text, str(candidate))


def parse_template(text: str, source: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"JOB_TEMPLATE: {source} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Job" or not isinstance(doc.get("spec"), dict):
        raise SettingsError(f"JOB_TEMPLATE: {source} is not a batch/v1 Job")
    return doc


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
            raise LaunchError(
                f"Job template: unknown placeholder ${{{exc.args[0]}}} at {where.lstrip('.')}; "
                f"known: {', '.join(sorted(params))}"
            ) from None
        except ValueError as exc:
            raise LaunchError(f"Job template: bad placeholder at {where.lstrip('.')}: {exc}") from None
    return node


def _merge_env(base: list[dict], extra: list[dict]) -> list[dict]:
    names = {item.get("name") for item in extra}
    return [item for item in base if item.get("name") not in names] + list(extra)


def owner_reference(kind: str, name: str, uid: str, api_version: str = "v1") -> dict[str, Any]:
    """An ownerReference that makes the garbage collector delete the Job (and its pods) with its owner.

    Not a controller and no blockOwnerDeletion: setting either needs rights on the owner the launcher does
    not have (and does not need)."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}


def render_job(
    template: dict[str, Any],
    values: dict[str, Any],
    *,
    release: str,
    namespace: str,
    project: int,
    version: str,
    args: Iterable[str] = (),
    owner: Optional[dict[str, Any]] = None,
    trigger: str = "",
) -> dict[str, Any]:
    """The Job body (a plain dict, camelCase like the YAML) for one run.

    Labels, lowest precedence first: the template's, JOB_VALUES jobLabels (Job) / podLabels (pod), then the
    selection labels, which always win. ``owner``: an ownerReference (see ``owner_reference``)."""
    name = job_name(release, project, version)
    params = {
        "name": name,
        "namespace": namespace,
        "release": release,
        "project": str(int(project)),
        "version": version,
        "versionLabel": label_value(version),
        "image": values["image"],
    }
    job = _substitute(copy.deepcopy(template), params)
    labels = {**selection_labels(release, project), LABEL_VERSION: label_value(version)}

    meta = job.setdefault("metadata", {}) or {}
    job["metadata"] = meta
    meta["name"], meta["namespace"] = name, namespace
    meta["labels"] = {**(meta.get("labels") or {}), **values.get("jobLabels", {}), **labels}
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        **values.get("jobAnnotations", {}),
        ANNOTATION_VERSION: version,
        **({ANNOTATION_TRIGGER: trigger} if trigger else {}),
    }
    if owner is not None:
        meta["ownerReferences"] = [owner]

    spec = job["spec"]
    for key, default in DEFAULTS.items():
        if key in values:
            spec[key] = values[key]
        else:
            spec.setdefault(key, default)
    if "podFailurePolicy" in values:  # {} removes the template's policy
        if values["podFailurePolicy"]:
            spec["podFailurePolicy"] = values["podFailurePolicy"]
        else:
            spec.pop("podFailurePolicy", None)
    pod_template = spec.setdefault("template", {})
    pod_meta = pod_template.get("metadata") or {}
    pod_template["metadata"] = pod_meta
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **values.get("podLabels", {}), **labels}
    pod_meta["annotations"] = {
        **(pod_meta.get("annotations") or {}),
        **values.get("podAnnotations", {}),
        ANNOTATION_VERSION: version,
    }

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
    if "priorityClassName" in values:
        pod["priorityClassName"] = values["priorityClassName"]
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
        raise LaunchError(
            f"invalid training Job: {where}: {first.get('msg')} "
            f"(got {first.get('input')!r}; {exc.error_count()} error(s))"
        ) from None
    dropped = _dropped_fields(body, _serializer().sanitize_for_serialization(job))
    if dropped:
        raise LaunchError(f"invalid training Job: unknown field(s) {', '.join(dropped[:10])}")
    return job


# ------------------------------------------------------------------------------------------ reading Jobs


def timestamp(value: Optional[datetime]) -> Optional[float]:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def condition(job, kind: str):
    for cond in (job.status.conditions if job.status else None) or []:
        if cond.type == kind and cond.status == "True":
            return cond
    return None


def job_phase(job) -> RunPhase:
    if condition(job, "Complete") is not None:
        return RunPhase.SUCCEEDED
    if condition(job, "Failed") is not None:
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


def age_key(job) -> tuple:
    """Winner order among active Jobs of one project: oldest first (then sequence number, then name)."""
    created = timestamp(job.metadata.creation_timestamp) or float("inf")
    seq = version_seq(job_version(job))
    return (created, seq if seq is not None else sys.maxsize, job.metadata.name)


def active_jobs(jobs: Iterable) -> list:
    """The unfinished Jobs that are not being deleted, in winner order (``age_key``)."""
    return sorted((j for j in jobs if j.metadata.deletion_timestamp is None and not job_finished(j)), key=age_key)


def last_line(text: Optional[str]) -> str:
    """The last non-empty line of ``text``, at most 500 characters."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
