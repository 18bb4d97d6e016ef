"""Renders that cannot see the cluster (``helm template``, which is what Argo CD and Kustomize run): nothing
the chart decides may change silently from one render to the next.

- A generated basic-auth password would be new on every render (``lookup`` answers nothing there): refused;
  ``basicAuth.existingSecret`` or ``basicAuth.password`` render the same Secret every time.
- ``kserve.enabled=auto`` must not move the URL Label Studio uses: with ``kserve.liveServing`` saying what
  the release serves as now, a render that would switch to the other form is refused, and one that keeps it
  renders the same Service and URL. (The same refusal keyed on the live Deployment, which helm install and
  upgrade look up, is tested on the control plane in test_cluster.py.)
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.helm import FULLNAME, NAMESPACE, HelmError, Manifest, render, render_error, run_helm, template_args

pytestmark = pytest.mark.usefixtures("helm")

DEPLOYMENT_URL = f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:8080"
ISVC_URL = f"http://{FULLNAME}-predictor.{NAMESPACE}.svc.cluster.local:80"


def _health_url(m: Manifest) -> str:
    """The URL the chart gives for the predictor (the helm test pod calls <url>/health)."""
    (container,) = m.test_pod()["spec"]["containers"]
    return str(container["command"][-1]).removesuffix("/health")


# ------------------------------------------------------------------------------ basic-auth password


@pytest.mark.parametrize("upgrade", [False, True], ids=["install", "upgrade"])
def test_a_generated_password_is_refused_when_the_render_cannot_see_the_cluster(upgrade: bool) -> None:
    args = [*template_args(), *(["--is-upgrade"] if upgrade else [])]
    with pytest.raises(HelmError) as err:
        run_helm(*args, values={"basicAuth": {"enabled": True}})
    message = err.value.stderr
    assert "basicAuth.existingSecret" in message and "basicAuth.password" in message
    assert "change on every render" in message


def test_a_client_side_dry_run_is_refused_too() -> None:
    from tests.chart.helm import CHART, RELEASE

    with pytest.raises(HelmError, match="change on every render"):
        run_helm(
            "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
            values={"basicAuth": {"enabled": True}},
        )  # fmt: skip


def test_an_explicit_password_renders_the_same_secret_every_time() -> None:
    values = {"basicAuth": {"enabled": True, "password": "gitops-pass-7Yq"}}
    first = run_helm(*template_args(), values=values).stdout
    second = run_helm(*template_args(), "--is-upgrade", values=values).stdout
    data = Manifest(first).secret_data()
    assert data[f"{FULLNAME}-basic-auth/password"] == "gitops-pass-7Yq"
    assert data[f"{FULLNAME}-basic-auth/username"] == "lsbert"
    assert Manifest(second).secret_data() == data


def test_an_existing_secret_needs_no_cluster_and_renders_no_secret() -> None:
    m = render({"basicAuth": {"enabled": True, "existingSecret": "lsbert-auth", "passwordKey": "pw"}})
    assert not any(o["metadata"]["name"].endswith("-basic-auth") for o in m.of_kind("Secret"))
    env = m.predictor_env()
    assert env["BASIC_AUTH_PASS"]["valueFrom"]["secretKeyRef"] == {"name": "lsbert-auth", "key": "pw"}
    assert env["BASIC_AUTH_USER"]["valueFrom"]["secretKeyRef"]["name"] == "lsbert-auth"


def test_basic_auth_off_needs_nothing() -> None:
    assert not render().has("Secret")


# -------------------------------------------------------------------- kserve.enabled=auto and the URL


def _auto(live: str) -> dict[str, Any]:
    return {"kserve": {"enabled": "auto", "liveServing": live}}


def test_auto_refuses_to_move_a_deployment_to_an_inference_service() -> None:
    """KServe was installed after the release: the render sees the API, the release serves as a Deployment."""
    message = render_error(_auto("Deployment"), kserve_api=True)
    assert "this release serves as a plain Deployment" in message
    assert DEPLOYMENT_URL in message and ISVC_URL in message
    assert "kserve.enabled=false" in message and "kserve.enabled=true" in message


def test_auto_keeps_a_deployment_while_kserve_is_absent() -> None:
    m = render(_auto("Deployment"))
    assert m.has("Deployment", FULLNAME) and not m.has("InferenceService")
    service = m.get("Service", FULLNAME)
    assert [p["port"] for p in service["spec"]["ports"]] == [8080]
    assert _health_url(m) == DEPLOYMENT_URL
    assert render().text == m.text  # the same objects as without the value


def test_auto_keeps_an_inference_service_while_kserve_is_there() -> None:
    m = render(_auto("InferenceService"), kserve_api=True)
    assert m.has("InferenceService", FULLNAME) and not m.has("Deployment")
    assert _health_url(m) == ISVC_URL
    assert render(kserve_api=True).text == m.text


def test_auto_refuses_to_move_an_inference_service_to_a_deployment() -> None:
    """A render without the KServe API (an Argo CD that lost it, helm template without --api-versions)."""
    message = render_error(_auto("InferenceService"))
    assert "this release serves as an InferenceService" in message
    assert ISVC_URL in message and DEPLOYMENT_URL in message


@pytest.mark.parametrize(
    "enabled, live, kserve_api, isvc",
    [
        (False, "Deployment", True, False),  # kept on purpose although KServe is there
        (True, "Deployment", True, True),  # switched on purpose: the user changes the URL in Label Studio
        (False, "InferenceService", True, False),
        (True, "InferenceService", False, True),
    ],
)
def test_an_explicit_choice_is_never_refused(enabled: bool, live: str, kserve_api: bool, isvc: bool) -> None:
    m = render({"kserve": {"enabled": enabled, "liveServing": live}}, kserve_api=kserve_api)
    assert m.has("InferenceService") is isvc and m.has("Deployment") is not isvc
    assert _health_url(m) == (ISVC_URL if isvc else DEPLOYMENT_URL)


def test_live_serving_accepts_only_the_two_forms() -> None:
    assert "/kserve/liveServing" in render_error({"kserve": {"liveServing": "Knative"}})
