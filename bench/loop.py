"""The labelling loop's latency: from Start Training to predictions served by the new version.

A real Label Studio and a real `lsbert serve` (MiniLM, local training process) on 127.0.0.1; N tasks are
annotated through the Label Studio API with their true labels, then the timer runs from
`POST /api/ml/{id}/train` until Label Studio has stored predictions of the new version for the held-out tasks.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure_loop(annotations: int = 500, held_out: int = 100, seed: int = 11) -> dict:
    from tests.conftest import start_server
    from tests.support.datasets import rotten_tomatoes
    from tests.support.labelstudio import LabelStudio, connect_backend, create_text_project, import_texts

    data = rotten_tomatoes(limit=annotations + held_out, seed=seed)
    with tempfile.TemporaryDirectory() as tmp, LabelStudio() as ls:
        client = ls.client()
        project = create_text_project(client, "lsbert loop bench", ("fresh", "rotten"), from_name="verdict")
        task_ids = import_texts(client, project.id, [text for text, _ in data])
        truth = dict(zip(task_ids, (label for _, label in data)))
        server = start_server(
            Path(tmp),
            {
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "TRAINING_LAUNCHER": "local",
                "START_TRAINING_EACH_N_UPDATES": "0",
                "ROLLOUT_POLL_SECONDS": "5",
                "LOG_LEVEL": "WARNING",
            },
        )
        try:
            backend = connect_backend(ls, project.id, server.url)
            setup = {"project": f"{project.id}.0", "schema": project.label_config}
            before = requests.post(server.url + "/setup", json=setup).json()["model_version"]
            for task_id in task_ids[:annotations]:
                ls.request(
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
            held = task_ids[annotations:]
            started = time.perf_counter()
            ls.request("POST", f"/api/ml/{backend['id']}/train", json={"use_ground_truth": False})
            version = before
            while version == before:
                if time.perf_counter() - started > 900:
                    raise SystemExit("no new version after 900 s:\n" + server.log()[-3000:])
                time.sleep(0.5)
                version = requests.post(server.url + "/setup", json=setup).json()["model_version"]
            promoted_at = time.perf_counter() - started
            ls.request(
                "POST",
                f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
                json={"selectedItems": {"all": False, "included": held}},
                timeout=300,
            )
            correct = 0
            for task_id in held:
                predictions = [
                    p
                    for p in ls.request("GET", f"/api/predictions/?task={task_id}").json()
                    if p["model_version"] == version
                ]
                assert predictions, f"task {task_id} has no prediction of {version}"
                correct += predictions[0]["result"][0]["value"]["choices"][0] == truth[task_id]
            loop = time.perf_counter() - started
        finally:
            server.stop()
    return {
        "loop_seconds": loop,
        "new_version_seconds": promoted_at,
        "held_out_accuracy": correct / len(held),
        "annotations": annotations,
    }


if __name__ == "__main__":
    result = measure_loop()
    print(
        f"# {result['annotations']} annotations; new version served after {result['new_version_seconds']:.1f}s; "
        f"held-out accuracy {result['held_out_accuracy']:.3f}"
    )
    print(f"loop_seconds={result['loop_seconds']:.1f}")
