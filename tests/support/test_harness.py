"""Self-test of the Label Studio harness against a real server (the offline parts: test_offline.py)."""

from __future__ import annotations

import pytest
import requests

from tests.support.labelstudio import LabelStudio, create_text_project, import_texts

pytestmark = pytest.mark.labelstudio


def test_label_studio_project_tasks_and_pat(label_studio: LabelStudio) -> None:
    from label_studio_sdk import LabelStudio as SDK

    assert label_studio.running
    assert requests.get(f"{label_studio.url}/health", timeout=10).json().get("status") == "UP"

    client = label_studio.client()
    assert client.users.whoami().email == label_studio.username

    project = create_text_project(client, "harness", ["Positive", "Negative", "Neutral"])
    assert 'name="label"' in project.label_config and 'value="$text"' in project.label_config
    texts = ["great movie", "terrible plot", "it was fine"]
    task_ids = import_texts(client, project.id, texts)
    assert len(task_ids) == 3

    tasks = list(client.tasks.list(project=project.id))
    assert sorted(t.id for t in tasks) == sorted(task_ids)
    assert sorted(t.data["text"] for t in tasks) == sorted(texts)

    pat = label_studio.create_personal_access_token()
    assert pat != label_studio.token and pat.count(".") == 2  # a JWT
    assert label_studio.create_personal_access_token() == pat  # shown once by LS, cached here
    assert SDK(base_url=label_studio.url, api_key=pat).users.whoami().email == label_studio.username
