"""Metrics under basic auth and settings that reach the predictor, offline: the ServiceMonitor / PodMonitor
sends the predictor's own credentials (secretKeyRefs to the Secret the predictor reads, in the monitor's
namespace) and validates against the Prometheus Operator's CRD schema; metrics.withoutAuth opens /metrics
for annotation scraping; settings such as HEAD_ENABLED land in the predictor's environment and mean there
what lsbert's own settings parser makes of them."""

from __future__ import annotations

import json
from typing import Any, Callable

import kubernetes_validate
import pytest

from lsbert.settings import Settings, load_settings
from tests.chart.helm import CHART, FULLNAME, NAMESPACE, RELEASE, Manifest, b64, render, run_helm

pytestmark = pytest.mark.usefixtures("helm")

K8S = "1.36.0"
MONITOR_KINDS = {"ServiceMonitor", "PodMonitor"}
MONITOR = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
OWN_SECRET = {"basicAuth": {"enabled": True, "user": "scraper", "password": "pw-Jd83kQ"}}
# A kubernetes.io/basic-auth style Secret the user manages, with keys other than the defaults.
EXISTING_SECRET = {
    "basicAuth": {"enabled": True, "existingSecret": "backend-auth", "userKey": "user", "passwordKey": "pass"}
}


def monitor(m: Manifest) -> dict[str, Any]:
    (found,) = [o for o in m if o["kind"] in MONITOR_KINDS]
    return found


def endpoint(obj: dict[str, Any]) -> dict[str, Any]:
    (ep,) = obj["spec"]["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    return ep


def predictor_settings(m: Manifest) -> Settings:
    """What lsbert's settings parser reads in a predictor pod of this release: the settings ConfigMap
    (envFrom), overridden by the container's literal env values (as Kubernetes does)."""
    container = m.predictor_container()
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        env.update(m.get("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    return load_settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})


def validate_all(m: Manifest, monitor_validator: Callable[[dict[str, Any]], list[str]]) -> None:
    for obj in m:
        if obj["kind"] in MONITOR_KINDS:
            errors = monitor_validator(obj)
            assert not errors, f"{obj['kind']} {obj['metadata']['name']}: " + "; ".join(errors)
        elif obj["kind"] != "InferenceService":  # tests/chart/test_render.py checks it against KServe's CRD
            kubernetes_validate.validate(obj, K8S, strict=True)


# ------------------------------------------------------------------------------------- 1. monitor auth


@pytest.mark.parametrize("kserve_api, kind", [(False, "ServiceMonitor"), (True, "PodMonitor")], ids=["service", "pod"])
@pytest.mark.parametrize(
    "auth, secret, keys",
    [
        (OWN_SECRET, f"{FULLNAME}-basic-auth", ("username", "password")),
        (EXISTING_SECRET, "backend-auth", ("user", "pass")),
    ],
    ids=["chart-secret", "existing-secret"],
)
def test_monitor_sends_the_predictors_credentials(
    kserve_api: bool,
    kind: str,
    auth: dict[str, Any],
    secret: str,
    keys: tuple[str, str],
    monitor_validator: Callable[[dict[str, Any]], list[str]],
) -> None:
    m = render({**MONITOR, **auth}, kserve_api=kserve_api)
    validate_all(m, monitor_validator)
    mon = monitor(m)
    assert mon["kind"] == kind and mon["metadata"]["labels"]["release"] == "prom"
    basic = endpoint(mon)["basicAuth"]
    assert basic == {"username": {"name": secret, "key": keys[0]}, "password": {"name": secret, "key": keys[1]}}

    # Exactly the Secret and keys the predictor checks requests against.
    env = m.predictor_env()
    assert env["BASIC_AUTH_USER"]["valueFrom"]["secretKeyRef"] == basic["username"]
    assert env["BASIC_AUTH_PASS"]["valueFrom"]["secretKeyRef"] == basic["password"]
    if auth is OWN_SECRET:
        data = m.secret_data()
        assert data[f"{secret}/{keys[0]}"] == "scraper" and data[f"{secret}/{keys[1]}"] == "pw-Jd83kQ"
    else:
        assert not m.has("Secret"), "an existing Secret is referenced, never created"

    # The operator resolves the refs in the monitor's namespace: the monitor must sit with the Secret (and
    # the predictor) in the release namespace, and select targets only there.
    assert mon["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    for obj in m:
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE, f"{obj['kind']} outside the release"
    assert "namespaceSelector" not in mon["spec"]
    assert "pw-Jd83kQ" not in json.dumps(mon) and b64("pw-Jd83kQ") not in json.dumps(mon)


@pytest.mark.parametrize("kserve_api", [False, True], ids=["service", "pod"])
def test_monitor_without_credentials_when_none_are_needed(
    kserve_api: bool, monitor_validator: Callable[[dict[str, Any]], list[str]]
) -> None:
    no_auth = render(MONITOR, kserve_api=kserve_api)
    validate_all(no_auth, monitor_validator)
    assert "basicAuth" not in endpoint(monitor(no_auth))
    assert endpoint(monitor(no_auth))["path"] == "/metrics"

    # /metrics served without auth: Prometheus needs no credentials (nor read access to them).
    open_metrics = render({**MONITOR, **OWN_SECRET, "metrics": {**MONITOR["metrics"], "withoutAuth": True}})
    validate_all(open_metrics, monitor_validator)
    assert "basicAuth" not in endpoint(monitor(open_metrics))
    assert predictor_settings(open_metrics).metrics_without_auth is True


def test_monitor_schema_check_catches_errors(monitor_validator: Callable[[dict[str, Any]], list[str]]) -> None:
    """Guards the validator: typos, wrong shapes and bad durations in a monitor are reported, not passed."""
    good = monitor(render({**MONITOR, **OWN_SECRET}))
    assert monitor_validator(good) == []

    def broken(change: Callable[[dict[str, Any]], None]) -> list[str]:
        obj = {**good, "spec": {**good["spec"], "endpoints": [dict(endpoint(good))]}}
        change(obj["spec"]["endpoints"][0])
        return monitor_validator(obj)

    assert any("basicauth" in e for e in broken(lambda ep: ep.update(basicauth=ep.pop("basicAuth"))))
    assert any("username" in e for e in broken(lambda ep: ep["basicAuth"].update(username="scraper")))
    assert any("interval" in e for e in broken(lambda ep: ep.update(interval="30 seconds")))
    assert any("key" in e for e in broken(lambda ep: ep["basicAuth"].update(password={"name": "s"})))
    assert monitor_validator({**good, "kind": "Probe"}) != []


# ------------------------------------------------------------------------------ 2. metrics.withoutAuth


@pytest.mark.parametrize("kserve_api", [False, True], ids=["deployment", "isvc"])
def test_metrics_without_auth_reaches_the_predictor(kserve_api: bool) -> None:
    default = render(OWN_SECRET, kserve_api=kserve_api)
    assert "METRICS_WITHOUT_AUTH" not in default.predictor_env()
    assert predictor_settings(default).metrics_without_auth is False

    opened = render({**OWN_SECRET, "metrics": {"withoutAuth": True}}, kserve_api=kserve_api)
    assert opened.predictor_env()["METRICS_WITHOUT_AUTH"] == {"name": "METRICS_WITHOUT_AUTH", "value": "true"}
    loaded = predictor_settings(opened)
    assert loaded.metrics_without_auth is True and loaded.basic_auth_enabled is False  # user/pass are refs
    # Training Jobs serve nothing and do not get it.
    trainer_env = {e["name"] for e in opened.job_values()["env"]}
    assert "METRICS_WITHOUT_AUTH" not in trainer_env
    for obj in opened:
        if obj["kind"] != "InferenceService":
            kubernetes_validate.validate(obj, K8S, strict=True)


def test_metrics_without_auth_is_a_boolean() -> None:
    with pytest.raises(Exception, match="withoutAuth"):
        run_helm("template", RELEASE, str(CHART), values={"metrics": {"withoutAuth": "yes"}})


def _notes(values: dict[str, Any]) -> str:
    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", values=values).stdout
    return " ".join(out[out.index("NOTES:") :].split())


def test_notes_say_how_prometheus_gets_past_basic_auth() -> None:
    annotations_only = _notes(OWN_SECRET)
    assert "/metrics needs the credentials too" in annotations_only
    assert "metrics.withoutAuth=true" in annotations_only and "metrics.serviceMonitor.enabled=true" in annotations_only

    with_monitor = _notes({**OWN_SECRET, **MONITOR})
    assert "metrics.withoutAuth=true" in with_monitor
    assert f"The ServiceMonitor sends them (basicAuth from Secret {FULLNAME}-basic-auth)" in with_monitor

    opened = _notes({**OWN_SECRET, "metrics": {"withoutAuth": True}})
    assert "/metrics answers without credentials" in opened and "needs the credentials" not in opened
    assert "/metrics" not in _notes({**OWN_SECRET, "metrics": {"enabled": False}})
    assert "/metrics" not in _notes({})


# ------------------------------------------------------------------------------- 3. embedding head


def test_head_settings_reach_the_predictor() -> None:
    values = {
        "settings": {"HEAD_ENABLED": False, "HEAD_MIN_LABELS": 20, "HEAD_MAX_EXAMPLES": 500},
    }
    m = render(values)
    data = m.get("ConfigMap", f"{FULLNAME}-settings")["data"]
    assert (data["HEAD_ENABLED"], data["HEAD_MIN_LABELS"], data["HEAD_MAX_EXAMPLES"]) == ("false", "20", "500")
    assert {"configMapRef": {"name": f"{FULLNAME}-settings"}} in m.predictor_container()["envFrom"]
    loaded = predictor_settings(m)
    assert (loaded.head_enabled, loaded.head_min_labels, loaded.head_max_examples) == (False, 20, 500)
    assert loaded.head_max_total_examples == Settings.model_fields["head_max_total_examples"].default
    assert predictor_settings(render()).head_enabled is True, "on unless a setting turns it off"
    # The same on the InferenceService.
    isvc = render(values, kserve_api=True)
    assert predictor_settings(isvc).head_enabled is False


def test_values_document_the_head_settings() -> None:
    text = (CHART / "values.yaml").read_text()
    settings_comment = text[: text.index("\nsettings:")]
    for name in ("HEAD_ENABLED", "HEAD_MIN_LABELS", "HEAD_MAX_EXAMPLES", "HEAD_MAX_TOTAL_EXAMPLES"):
        assert name in settings_comment and name.lower() in Settings.model_fields, name
