"""The whole loop with a real Label Studio: label a few hundred tasks through the API, press Train, lsbert
fine-tunes in a separate process, rolls to the new version, and Label Studio re-predicts with it."""

import time

import pytest
import requests

from tests.support.datasets import rotten_tomatoes
from tests.support.labelstudio import connect_backend, create_text_project, import_texts

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

LABELS = ("fresh", "rotten")
N_TRAIN, N_HELD_OUT = 300, 200


def finetuned(version: str) -> bool:
    """A fine-tuned checkpoint, not what serves before one (zero-shot, or the embedding head or label prior that
    the annotations alone bring)."""
    return not version.startswith(("zeroshot-", "head-", "prior-"))


def accuracy_of(label_studio, task_ids, truth, version=None):
    correct = counted = 0
    for task_id in task_ids:
        predictions = label_studio.request("GET", f"/api/predictions/?task={task_id}").json()
        if version:
            predictions = [p for p in predictions if p["model_version"] == version]
        assert predictions, f"task {task_id} has no prediction (version {version})"
        chosen = predictions[-1]["result"][0]["value"]["choices"][0]
        correct += chosen == truth[task_id]
        counted += 1
    return correct / counted


def test_train_button_to_better_predictions(label_studio, server_factory):
    data = rotten_tomatoes(limit=N_TRAIN + N_HELD_OUT, seed=7)
    client = label_studio.client()
    project = create_text_project(client, "lsbert e2e training", LABELS, from_name="verdict")
    task_ids = import_texts(client, project.id, [text for text, _ in data])
    truth = {task_id: label for task_id, (_, label) in zip(task_ids, data)}
    train_ids, held_out = task_ids[:N_TRAIN], task_ids[N_TRAIN:]

    lsbert = server_factory(
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.create_personal_access_token(),
            "TRAINING_LAUNCHER": "local",
            "START_TRAINING_EACH_N_UPDATES": "0",
            "NUM_TRAIN_EPOCHS": "5",
            "LEARNING_RATE": "1e-4",
            "ROLLOUT_POLL_SECONDS": "2",
        },
        name="e2e-train",
    )
    backend = connect_backend(label_studio, project.id, lsbert.url, title="lsbert")
    setup = {"project": f"{project.id}.0", "schema": project.label_config}
    before_version = requests.post(lsbert.url + "/setup", json=setup).json()["model_version"]
    retrieve = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}"
    label_studio.request("POST", retrieve, json={"selectedItems": {"all": False, "included": held_out}}, timeout=120)
    before = accuracy_of(label_studio, held_out, truth, before_version)

    for task_id in train_ids:
        label_studio.request(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            json={
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "text",
                        "type": "choices",
                        "value": {"choices": [truth[task_id]]},
                    }
                ]
            },
        )
    started = time.time()
    label_studio.request("POST", f"/api/ml/{backend['id']}/train", json={"use_ground_truth": False})

    new_version, deadline = before_version, time.time() + 600
    while time.time() < deadline and not finetuned(new_version):
        time.sleep(2)
        new_version = requests.post(lsbert.url + "/setup", json=setup).json()["model_version"]
        last = (requests.get(lsbert.url + "/health").json()["training"].get(str(project.id)) or {}).get("last") or {}
        if last.get("phase") == "failed":
            log = open(last["log"]).read()[-3000:] if last.get("log") else ""
            pytest.fail(f"training failed: {last['message']}\n{log}")
        if last.get("phase") == "succeeded" and not finetuned(new_version):
            # the run finished without promoting: say why
            versions = requests.get(lsbert.url + "/versions", params={"project": project.id}).json()
            entry = versions["projects"][str(project.id)]["versions"][0]
            assert entry["promotion"]["promoted"], entry
    assert finetuned(new_version), f"no fine-tuned version within 10 minutes (serving {new_version})"
    loop_seconds = time.time() - started

    label_studio.request("POST", retrieve, json={"selectedItems": {"all": False, "included": held_out}}, timeout=120)
    after = accuracy_of(label_studio, held_out, truth, new_version)
    print(
        f"held-out accuracy before {before:.3f} ({before_version}), after {after:.3f} ({new_version}); "
        f"train button to new version {loop_seconds:.0f}s"
    )
    assert after >= 0.65, f"accuracy {after:.3f} is not clearly above chance"
    assert after > before, f"accuracy did not improve: {before:.3f} -> {after:.3f}"

    versions = label_studio.request("GET", f"/api/ml/{backend['id']}/versions").json()
    assert new_version in versions["versions"]
    state = label_studio.request("GET", f"/api/ml/{backend['id']}").json()
    assert state["state"] == "CO" and not state.get("error_message")
