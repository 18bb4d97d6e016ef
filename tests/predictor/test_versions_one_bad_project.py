"""One bad project never fails ``GET /versions`` for the others (a live ``lsbert serve`` on 127.0.0.1).

The store holds a healthy project, one whose promoted checkpoint cannot load (its weights are garbage), one
whose promotion pointer is not JSON, one whose pointer is a directory (a store error on read), and one whose
pointer never answers (a FIFO nobody writes: a read blocks for ever, like a store endpoint that accepts the
connection and never replies).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from lsbert.store.local import LocalStore
from tests.conftest import fixture
from tests.support.checkpoints import save_checkpoint

CONFIG = fixture("predict-1-task.json")["body_json"]["label_config"]
LABELS = ("Positive", "Negative")
GOOD, UNLOADABLE, BAD_POINTER, POINTER_DIR, HUNG = 41, 42, 43, 44, 45


def test_versions_answers_for_every_readable_project(server_factory, tmp_path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    for project in (GOOD, UNLOADABLE, BAD_POINTER, POINTER_DIR):
        save_checkpoint(store, project, "ft-0001", LABELS, seed=project)
        store.promote(project, "ft-0001")
    for weights in store.local_path(UNLOADABLE, "ft-0001").glob("*.safetensors"):
        weights.write_bytes(b"not a checkpoint")
    (root / str(BAD_POINTER) / "PROMOTED").write_text("{not json")
    pointer = root / str(POINTER_DIR) / "PROMOTED"
    pointer.unlink()
    pointer.mkdir()
    (root / str(HUNG)).mkdir()
    fifo = root / str(HUNG) / "PROMOTED"
    os.mkfifo(fifo)
    server = server_factory(
        {"MODEL_DIR": str(root), "TRAINING_LAUNCHER": "none", "ROLLOUT_POLL_SECONDS": "0.5"}, name="versions"
    )
    # the unloadable one is asked for, so that the predictor has tried (and failed) to load it
    body = {"project": f"{UNLOADABLE}.1", "label_config": CONFIG, "tasks": [{"id": 1, "data": {"text": "fine"}}]}
    predicted = requests.post(server.url + "/predict", data=json.dumps(body), timeout=60)
    assert predicted.status_code == 200 and predicted.json()["results"][0]["model_version"].startswith("zeroshot-")
    deadline = time.monotonic() + 30
    while str(UNLOADABLE) not in requests.get(server.url + "/health", timeout=5).json().get("load_failures", {}):
        assert time.monotonic() < deadline, "the failed load is never reported"
        time.sleep(0.2)

    try:
        with ThreadPoolExecutor(1) as pool:
            listing = pool.submit(requests.get, server.url + "/versions", timeout=60)
            while not listing.done():  # the server keeps answering while /versions waits for the hung read
                started = time.perf_counter()
                assert requests.get(server.url + "/health", timeout=5).status_code == 200
                assert time.perf_counter() - started < 1.0
                time.sleep(0.2)
            response = listing.result()
        assert response.status_code == 200, response.text
        projects = response.json()["projects"]
        for project in (GOOD, UNLOADABLE):
            entry = projects[str(project)]
            assert entry["promoted"] == "ft-0001", entry
            assert [v["version"] for v in entry["versions"]] == ["ft-0001"] and entry["versions"][0]["promoted"]
        for project in (BAD_POINTER, POINTER_DIR, HUNG):
            assert "cannot read the project's checkpoints" in projects[str(project)]["error"]
            assert str(root) not in projects[str(project)]["error"]  # no paths in the answer
        assert response.json()["versions"].count("ft-0001") == 2

        # one project at a time: the bad ones answer with their error, the others as always
        one = requests.get(server.url + "/versions", params={"project": str(GOOD)}, timeout=10)
        assert one.status_code == 200 and one.json()["projects"][str(GOOD)]["promoted"] == "ft-0001"
        bad = requests.get(server.url + "/versions", params={"project": str(BAD_POINTER)}, timeout=10)
        assert bad.status_code == 200 and "error" in bad.json()["projects"][str(BAD_POINTER)]
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        for _ in range(8):  # let every hung read finish, so that the server can stop
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break
            time.sleep(0.05)
