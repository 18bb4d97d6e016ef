"""Bad input gets a clear 4xx or an empty result for that task; the server never dies."""

import base64

import pytest
import requests

from tests.conftest import fixture

CONFIG = fixture("predict-1-task.json")["body_json"]["label_config"]


def predict(server, body, **kwargs):
    return requests.post(server.url + "/predict", json=body, timeout=120, **kwargs)


def task(text, i=1):
    return {"id": i, "data": {"text": text}}


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"project": "2.1795871144"}', 400, "'tasks'"),
        (b'{"tasks": {"id": 1}, "project": "2.1"}', 400, "'tasks'"),
        (b'{"tasks": [], "project": "abc"}', 400, "project"),
    ],
)
def test_malformed_requests(lsbert, raw, status, message):
    response = requests.post(
        lsbert.url + "/predict", data=raw, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_bad_tasks_get_empty_results_and_never_fail_the_batch(lsbert):
    tasks = [
        task("A wonderful film.", 1),
        {"id": 2, "data": {"other": "x"}},
        task(42, 3),
        task("", 4),
        task(None, 5),
        {"id": 6},
        "not a task",
        task("A dreadful film.", 8),
    ]
    response = predict(lsbert, {"tasks": tasks, "project": "7.1", "label_config": CONFIG})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    assert [bool(r["result"]) for r in results] == [True, False, False, False, False, False, False, True]
    assert all(r["model_version"] for r in results)


def test_a_one_megabyte_text(lsbert):
    response = predict(
        lsbert, {"tasks": [task("word " * 200_000), task("fine")], "project": "7.1", "label_config": CONFIG}
    )
    assert response.status_code == 200 and all(r["result"] for r in response.json()["results"])


def test_ten_thousand_tasks_in_one_call(lsbert):
    tasks = [task(f"review number {i}: {'great' if i % 2 else 'poor'} value", i) for i in range(10_000)]
    response = predict(lsbert, {"tasks": tasks, "project": "7.1", "label_config": CONFIG})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 10_000 and all(r["result"] for r in results)


def test_unknown_project_without_config(lsbert):
    response = predict(lsbert, {"tasks": [task("hello")], "project": "987654.1"})
    assert response.status_code == 404 and "987654" in response.json()["detail"]
    setup = requests.post(lsbert.url + "/setup", json={"project": "987655.1"}, timeout=5)
    assert setup.status_code == 404


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='X'/></Labels></View>",
            "no <Choices>",
        ),
        ("<View><Text", "not valid XML"),
    ],
)
def test_configs_without_choices_get_422(lsbert, config, message):
    for path, body in (
        ("/predict", {"tasks": [task("x")], "project": "8.1", "label_config": config}),
        ("/setup", {"project": "8.1", "schema": config}),
    ):
        response = requests.post(lsbert.url + path, json=body, timeout=10)
        assert response.status_code == 422 and message in response.json()["detail"]
        assert "Traceback" not in response.text


def test_webhook_without_action(lsbert):
    response = requests.post(lsbert.url + "/webhook", json={"project": {"id": 1}}, timeout=5)
    assert response.status_code == 400 and "action" in response.json()["detail"]


def test_server_still_healthy_after_all_that(lsbert):
    assert requests.get(lsbert.url + "/health", timeout=2).json()["ready"] is True
    assert lsbert.proc.poll() is None


def test_basic_auth(server_factory):
    server = server_factory(
        {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret-pass", "TRAINING_LAUNCHER": "none"}, name="auth"
    )
    good = "Basic " + base64.b64encode(b"ls:s3cret-pass").decode()
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    body = {"tasks": [task("nice")], "project": "1.1", "label_config": CONFIG}
    assert requests.get(server.url + "/health", timeout=2).status_code == 200  # health stays open
    for headers in ({}, {"Authorization": bad}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
        response = predict(server, body, headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    assert predict(server, body, headers={"Authorization": good}).status_code == 200
    captured = fixture("predict-3-tasks-basic-auth.json")
    assert (
        requests.post(
            server.url + "/setup", json={"project": "1.1", "schema": CONFIG}, headers={"Authorization": good}
        ).status_code
        == 200
    )
    # an annotation event as Label Studio sends it (no credentials) is refused, with a hint in the log
    event = fixture("webhook-ANNOTATION_CREATED.json")["body_raw"]
    assert requests.post(server.url + "/webhook", data=event, timeout=5).status_code == 401
    assert "add the header to the project's webhook" in server.log()
    # ... and accepted once the Label Studio webhook carries the header (PATCH /api/webhooks/<id>/)
    with_header = fixture("webhook-ANNOTATION_CREATED-custom-auth-header.json")["body_raw"]
    accepted = requests.post(server.url + "/webhook", data=with_header, headers={"Authorization": good}, timeout=5)
    assert accepted.status_code == 200 and accepted.json()["action"] == "ANNOTATION_CREATED"
    # Start Training arrives with the credentials Label Studio stores for the backend
    start = fixture("webhook-START_TRAINING-basic-auth.json")["body_raw"]
    assert (
        requests.post(server.url + "/webhook", data=start, headers={"Authorization": good}, timeout=5).status_code
        == 200
    )
    # secrets never reach the log
    assert "s3cret-pass" not in server.log() and good.split()[1] not in server.log()
    assert captured["method"] == "POST"
