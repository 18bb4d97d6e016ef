"""End to end with a real Label Studio 1.23.2: a project connected to lsbert gets predictions with scores
that Label Studio stores and shows."""

import pytest
import requests

from tests.support.labelstudio import connect_backend, create_text_project, import_texts

pytestmark = pytest.mark.labelstudio

LABELS = ("Positive", "Negative", "Neutral")
TEXTS = [
    "I love this product, it works great.",
    "Terrible, broke after a day.",
    "It arrived on Tuesday.",
    "Absolutely wonderful service!",
    "The worst purchase I have made.",
    "The box was blue.",
    "Great value for money.",
    "Awful customer support, never again.",
    "It is a phone case.",
    "Fantastic quality, highly recommend.",
    "Disappointing and overpriced.",
    "The manual has ten pages.",
    "Superb, exceeded my expectations.",
    "Cheap plastic that cracked immediately.",
    "Shipping took five days.",
    "Delightful little gadget.",
    "Useless, returned it.",
    "Comes in three colours.",
    "awful café ☕ – naïve",
    "Best thing I bought this year.",
]


def test_label_studio_stores_and_shows_lsbert_predictions(label_studio, server_factory):
    lsbert = server_factory({"TRAINING_LAUNCHER": "none"}, name="e2e-predict")
    client = label_studio.client()
    project = create_text_project(client, "lsbert e2e predictions", LABELS, from_name="sentiment")
    task_ids = import_texts(client, project.id, TEXTS)
    assert len(task_ids) == 20

    backend = connect_backend(label_studio, project.id, lsbert.url, title="lsbert")
    assert backend["state"] == "CO", backend
    version = requests.post(
        lsbert.url + "/setup", json={"project": f"{project.id}.0", "schema": project.label_config}
    ).json()["model_version"]
    assert backend["model_version"] == version
    hooks = label_studio.request("GET", f"/api/webhooks/?project={project.id}").json()
    assert [h["url"] for h in hooks] == [lsbert.url + "/webhook"]

    label_studio.request(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=120,
    )
    for task_id in task_ids:
        predictions = label_studio.request("GET", f"/api/predictions/?task={task_id}").json()
        assert len(predictions) == 1, (task_id, predictions)
        prediction = predictions[0]
        assert prediction["model_version"] == version
        assert isinstance(prediction["score"], float) and 0 < prediction["score"] <= 1
        (region,) = prediction["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == ("sentiment", "text", "choices")
        assert region["value"]["choices"][0] in LABELS
    shown = label_studio.request("GET", f"/api/tasks/{task_ids[0]}/").json()
    assert shown["predictions"] and shown["predictions"][0]["model_version"] == version
    # A second retrieve sends no /predict: the versions match, nothing is re-predicted or duplicated.
    label_studio.request(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=120,
    )
    assert len(label_studio.request("GET", f"/api/predictions/?task={task_ids[0]}").json()) == 1
    # the Label Studio side still sees a healthy backend after all of it
    state = label_studio.request("GET", f"/api/ml/{backend['id']}").json()
    assert state["state"] == "CO" and not state.get("error_message")


def test_basic_auth_backend_through_label_studio(label_studio, server_factory):
    lsbert = server_factory(
        {"TRAINING_LAUNCHER": "none", "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw-123456"}, name="e2e-auth"
    )
    client = label_studio.client()
    project = create_text_project(client, "lsbert e2e auth", LABELS, from_name="sentiment")
    task_ids = import_texts(client, project.id, TEXTS[:3])
    with pytest.raises(Exception, match="401 Client Error: Unauthorized"):  # /health is open, /setup is not
        connect_backend(label_studio, project.id, lsbert.url, title="no creds")
    backend = connect_backend(
        label_studio,
        project.id,
        lsbert.url,
        title="lsbert-auth",
        auth_method="BASIC_AUTH",
        basic_auth_user="ls",
        basic_auth_pass="pw-123456",
    )
    assert backend["state"] == "CO"
    label_studio.request(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=120,
    )
    for task_id in task_ids:
        assert len(label_studio.request("GET", f"/api/predictions/?task={task_id}").json()) == 1
