"""With a real Label Studio: annotating alone (no Start Training, no fine-tune) changes the model that
serves to the project's embedding head, and the predictions Label Studio stores for the tasks nobody
labelled get clearly better than zero-shot's."""

import time
from collections import defaultdict

import pytest
import requests

from tests.support.datasets import rotten_tomatoes_with_plot
from tests.support.labelstudio import connect_backend, create_text_project, import_texts

pytestmark = [pytest.mark.labelstudio]

LABELS = ("fresh", "rotten", "plot")
PER_CLASS, HELD_OUT_PER_CLASS = 30, 40


def accuracy_of(label_studio, task_ids, truth, version):
    correct = 0
    for task_id in task_ids:
        predictions = label_studio.request("GET", f"/api/predictions/?task={task_id}").json()
        predictions = [p for p in predictions if p["model_version"] == version]
        assert predictions, f"task {task_id} has no prediction of {version}"
        correct += predictions[-1]["result"][0]["value"]["choices"][0] == truth[task_id]
    return correct / len(task_ids)


def head_serving(server, project_id, examples, timeout=120.0):
    """Wait until ``server`` serves the project's head fitted on ``examples`` labels; its /versions entry."""
    deadline, serving = time.time() + timeout, {}
    while time.time() < deadline:
        answer = requests.get(server.url + "/versions", params={"project": project_id}, timeout=30).json()
        serving = answer["projects"][str(project_id)]["serving"]
        if serving["kind"] == "head" and serving["head"]["examples"] == examples:
            return serving
        time.sleep(1)
    raise AssertionError(f"no head on {examples} labels serves: {serving}\n{server.log()[-3000:]}")


def test_annotating_alone_serves_a_head_that_beats_zero_shot(label_studio, server_factory):
    by_label = defaultdict(list)
    for text, label in rotten_tomatoes_with_plot(seed=23):
        by_label[label].append(text)
    train = [(by_label[label][i], label) for i in range(PER_CLASS) for label in LABELS]
    held = [(by_label[label][PER_CLASS + i], label) for i in range(HELD_OUT_PER_CLASS) for label in LABELS]
    client = label_studio.client()
    project = create_text_project(client, "lsbert e2e head", LABELS, from_name="sentiment")
    task_ids = import_texts(client, project.id, [text for text, _ in train + held])
    truth = {task_id: label for task_id, (_, label) in zip(task_ids, train + held)}
    train_ids, held_out = task_ids[: len(train)], task_ids[len(train) :]

    lsbert = server_factory(
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.create_personal_access_token(),
            "TRAINING_LAUNCHER": "none",  # nothing but the annotations themselves
        },
        name="e2e-head",
    )
    connect_backend(label_studio, project.id, lsbert.url, title="lsbert")
    setup = {"project": f"{project.id}.0", "schema": project.label_config}
    zero_shot_version = requests.post(lsbert.url + "/setup", json=setup, timeout=30).json()["model_version"]
    assert zero_shot_version.startswith("zeroshot-")
    retrieve = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}"
    selected = {"selectedItems": {"all": False, "included": held_out}}
    label_studio.request("POST", retrieve, json=selected, timeout=300)
    before = accuracy_of(label_studio, held_out, truth, zero_shot_version)

    started = time.time()
    for task_id in train_ids:
        result = {
            "from_name": "sentiment",
            "to_name": "text",
            "type": "choices",
            "value": {"choices": [truth[task_id]]},
        }
        label_studio.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": [result]})
    annotated = time.time()

    serving = head_serving(lsbert, project.id, len(train))
    head_version = requests.post(lsbert.url + "/setup", json=setup, timeout=30).json()["model_version"]
    assert head_version == serving["version"] and head_version.startswith("head-")
    learnt = time.time()

    label_studio.request("POST", retrieve, json=selected, timeout=300)
    after = accuracy_of(label_studio, held_out, truth, head_version)
    print(
        f"held-out accuracy: zero-shot {before:.3f} ({zero_shot_version}), head {after:.3f} ({head_version}); "
        f"{len(train)} annotations in {annotated - started:.0f}s, head serving {learnt - annotated:.1f}s later; "
        f"held-out macro-F1 at the last step {serving['head']['assessment']}"
    )
    assert after >= before + 0.15, f"the head ({after:.3f}) does not beat zero-shot ({before:.3f}) by 0.15"

    # A predictor that starts on an empty store (a new replica, a lost volume) rebuilds the head from Label
    # Studio's API on its first request for the project, with no new annotation.
    rebuilt = server_factory(
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.create_personal_access_token(),
            "TRAINING_LAUNCHER": "none",
        },
        name="e2e-head-rebuilt",
    )
    assert requests.post(rebuilt.url + "/setup", json=setup, timeout=30).status_code == 200
    again = head_serving(rebuilt, project.id, len(train))
    assert requests.post(rebuilt.url + "/setup", json=setup, timeout=30).status_code == 200
    deadline, again = time.time() + 120, {}
    while time.time() < deadline:
        again = requests.get(rebuilt.url + "/versions", params={"project": project.id}, timeout=30).json()
        again = again["projects"][str(project.id)]["serving"]
        if again["kind"] == "head" and again["head"]["examples"] == len(train):
            break
        time.sleep(1)
    assert again.get("kind") == "head" and again["head"]["examples"] == len(train), f"{again}\n{rebuilt.log()[-3000:]}"
    assert requests.post(rebuilt.url + "/setup", json=setup, timeout=30).json()["model_version"] == again["version"]
