"""Replays the requests Label Studio 1.23.2 really sent (shared/fixtures) against a running lsbert and checks
the answers are what Label Studio accepts."""

import pytest
import requests

from lsbert.labelconfig import parse_label_config
from tests.conftest import fixture

PREDICT_FIXTURES = [
    "predict-1-task.json",
    "predict-20-tasks.json",
    "predict-3-tasks-basic-auth.json",
    "predict-2-tasks-non-ascii.json",
    "predict-test-request.json",
    "predict-interactive.json",
]


def replay(server, name, **kwargs):
    captured = fixture(name)
    headers = {k: v for k, v in captured["headers"] if k.lower() in {"content-type", "user-agent"}}
    return requests.request(
        captured["method"],
        server.url + captured["path"],
        data=captured["body_raw"] or None,
        headers=headers,
        timeout=60,
        **kwargs,
    )


def assert_valid_for_label_studio(request_body, response_body):
    spec = parse_label_config(request_body["label_config"])
    results = response_body["results"]
    assert isinstance(results, list) and len(results) == len(request_body["tasks"])
    for item in results:
        assert isinstance(item["model_version"], str) and item["model_version"]
        assert isinstance(item["score"], float)
        assert len(item["result"]) == 1
        region = item["result"][0]
        assert (region["from_name"], region["to_name"], region["type"]) == (spec.from_name, spec.to_name, "choices")
        assert len(region["value"]["choices"]) == 1 and region["value"]["choices"][0] in spec.labels
    assert len({item["model_version"] for item in results}) == 1


def test_health_and_root(lsbert):
    for path in ("/health", "/"):
        response = requests.get(lsbert.url + path, timeout=2)
        assert response.status_code == 200 and response.json()["status"] == "UP"
    assert replay(lsbert, "health.json").json()["status"] == "UP"


def test_setup_returns_the_version_predictions_carry(lsbert):
    setup = replay(lsbert, "setup.json")
    assert setup.status_code == 200
    version = setup.json()["model_version"]
    assert version.startswith("zeroshot-")
    predict = replay(lsbert, "predict-1-task.json")
    assert {item["model_version"] for item in predict.json()["results"]} == {version}
    again = replay(lsbert, "setup-hostname-from-env.json").json()["model_version"]
    assert again == version


@pytest.mark.parametrize("name", PREDICT_FIXTURES)
def test_predict_fixtures(lsbert, name):
    response = replay(lsbert, name)
    assert response.status_code == 200, response.text
    assert_valid_for_label_studio(fixture(name)["body_json"], response.json())


def test_predictions_keep_task_order(lsbert):
    body = fixture("predict-20-tasks.json")["body_json"]
    forward = requests.post(lsbert.url + "/predict", json=body, timeout=60).json()["results"]
    body["tasks"] = list(reversed(body["tasks"]))
    backward = requests.post(lsbert.url + "/predict", json=body, timeout=60).json()["results"]
    assert [r["result"][0]["value"] for r in forward] == [r["result"][0]["value"] for r in reversed(backward)]
    assert [r["score"] for r in forward] == pytest.approx([r["score"] for r in reversed(backward)], abs=1e-4)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in __import__("tests.conftest", fromlist=["FIXTURES"]).FIXTURES.glob("webhook-*.json"))
)
def test_every_webhook_event_is_acknowledged_fast(lsbert, name):
    response = replay(lsbert, name)
    assert response.status_code == 200, response.text
    assert response.elapsed.total_seconds() < 1.0
    assert isinstance(response.json(), dict)


def test_versions_and_legacy_train(lsbert):
    versions = replay(lsbert, "versions.json")
    assert versions.status_code == 200 and isinstance(versions.json()["versions"], list)
    train = replay(lsbert, "train-legacy.json")
    # this server runs with TRAINING_LAUNCHER=none: a clear refusal, not a crash
    assert train.status_code == 409 and "disabled" in train.json()["detail"]


def test_label_config_drift_is_followed(lsbert):
    body = fixture("predict-1-task.json")["body_json"]
    body["label_config"] = body["label_config"].replace(
        '<Choice value="Negative"/>', '<Choice value="Negative"/><Choice value="Neutral"/>'
    )
    first = requests.post(lsbert.url + "/predict", json=body, timeout=30).json()["results"][0]
    assert first["result"][0]["value"]["choices"][0] in {"Positive", "Negative", "Neutral"}
    setup = requests.post(
        lsbert.url + "/setup", json={"project": body["project"], "schema": body["label_config"]}
    ).json()
    assert setup["model_version"] == first["model_version"]
