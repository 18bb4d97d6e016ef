"""Hostile input, faults and load against a real ``lsbert serve`` on 127.0.0.1 (bounded request loops).

Each test attacks one class of problem in general, with several payloads, and checks that the server stays
bounded and truthful: 4xx (never 5xx) for bad requests, ``/health`` always fast, one bad task never failing
anyone else's predictions, and no route but the probes open without credentials when basic auth is on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from lsbert.predictor.inference import InferenceQueue
from tests.conftest import fixture

CONFIG = fixture("predict-1-task.json")["body_json"]["label_config"]
LIMIT = 1024 * 1024  # MAX_REQUEST_BYTES of the attacked server
HEALTH_BUDGET_S = 1.0  # Label Studio's timeout for /health


@pytest.fixture(scope="module")
def target(server_factory):
    return server_factory(
        {"TRAINING_LAUNCHER": "none", "MAX_REQUEST_BYTES": str(LIMIT)},
        name="attacks",
    )


@pytest.fixture(scope="module")
def guarded(server_factory):
    return server_factory(
        {"TRAINING_LAUNCHER": "none", "BASIC_AUTH_USER": "alice", "BASIC_AUTH_PASS": "s3cret-pass"},
        name="attacks-auth",
    )


def post(server, path, raw: bytes, **kwargs):
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    kwargs.setdefault("timeout", 60)
    return requests.post(server.url + path, data=raw, headers=headers, **kwargs)


def timed_health(server, **kwargs) -> tuple[int, float]:
    started = time.perf_counter()
    response = requests.get(server.url + "/health", timeout=10, **kwargs)
    return response.status_code, time.perf_counter() - started


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def predict_body(text: str, i: int = 1, project: str = "7.1") -> bytes:
    return json.dumps(
        {"project": project, "label_config": CONFIG, "tasks": [{"id": i, "data": {"text": text}}]}
    ).encode()


# --- /health never fails and never waits ---------------------------------------------------------------
BAD_PROJECT_IDS = [
    str(2**64),
    f"{2**70}.1795871144",
    2**63,
    -3,
    0,
    "9" * 400,
    "1e9",
    " ",
    [1],
    {"id": 1},
    True,
    1.5,
]


@pytest.mark.parametrize("project", BAD_PROJECT_IDS, ids=lambda p: repr(p)[:24])
def test_project_ids_label_studio_cannot_have_get_4xx_and_health_stays_up(target, project):
    bodies = {
        "/setup": {"project": project, "schema": CONFIG},
        "/predict": {"project": project, "label_config": CONFIG, "tasks": [{"id": 1, "data": {"text": "hi"}}]},
        "/webhook": {"action": "ANNOTATION_CREATED", "project": {"id": project, "label_config": CONFIG}},
        "/train": {"project": project},
    }
    for path, body in bodies.items():
        response = post(target, path, json.dumps(body).encode())
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
    if not isinstance(project, float):  # "1.5" in a query string is the valid "<id>.<timestamp>" form
        response = requests.get(target.url + "/versions", params={"project": str(project)}, timeout=10)
        assert 400 <= response.status_code < 500, response.text
    status, seconds = timed_health(target)
    assert status == 200 and seconds < HEALTH_BUDGET_S


def test_health_answers_fast_while_the_model_is_busy(target):
    """/health comes from memory: under a stream of large predictions it stays far below Label Studio's 1 s."""
    texts = [f"a long review number {i} " * 30 for i in range(200)]
    body = json.dumps(
        {
            "project": "8.1",
            "label_config": CONFIG,
            "tasks": [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)],
        }
    ).encode()
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(post, target, "/predict", body) for _ in range(3)]
        timings = []
        while not all(f.done() for f in busy) and len(timings) < 200:
            status, seconds = timed_health(target)
            assert status == 200
            timings.append(seconds)
            time.sleep(0.05)
        assert all(f.result().status_code == 200 for f in busy)
    assert timings and max(timings) < HEALTH_BUDGET_S, max(timings)


# --- one bad task never fails anyone else ----------------------------------------------------------------
UNTOKENIZABLE = ["\ud800", "before \udfff after", "\udc00\ud800\udbff", "nul\x00in the middle", "\ud83d"]


@pytest.mark.parametrize("text", UNTOKENIZABLE, ids=range(len(UNTOKENIZABLE)))
def test_text_the_tokenizer_cannot_take_is_cleaned(target, text):
    response = post(target, "/predict", predict_body(text))
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["result"], "the cleaned text still gets a prediction"


def test_a_bad_task_among_concurrent_requests_fails_no_one(target):
    innocent = [predict_body(f"innocent request {i}: the product works well", i) for i in range(10)]
    hostile = [predict_body(text, 100 + i) for i, text in enumerate(UNTOKENIZABLE)]
    bodies = innocent + hostile
    for _round in range(2):
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda raw: post(target, "/predict", raw), bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies), [
            r.text for r in responses if r.status_code != 200
        ]
        assert all(r.json()["results"][0]["result"] for r in responses[: len(innocent)])


def test_a_failing_merged_pass_is_split_so_the_others_get_answers():
    """The inference queue runs requests merged into one forward pass alone when the pass fails."""

    def run(texts):
        if "poison" in texts:
            raise RuntimeError("the model cannot take this input")
        return np.ones((len(texts), 2), dtype=np.float32)

    async def scenario():
        queue = InferenceQueue(max_batch=64)
        try:
            # the first job occupies the worker, so the next ones queue up and are merged into one pass
            first = asyncio.ensure_future(queue.run("k", ["warm"] * 4, run))
            await asyncio.sleep(0)
            jobs = [queue.run("k", [f"text {i}"], run) for i in range(8)]
            jobs.insert(4, queue.run("k", ["poison"], run))
            return await asyncio.gather(first, *jobs, return_exceptions=True)
        finally:
            queue.close()

    results = asyncio.run(scenario())
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) == 1 and "cannot take" in str(failures[0])
    assert sum(isinstance(r, np.ndarray) for r in results) == 9


# --- 4xx, not 500, for wrong JSON types; one log line each ------------------------------------------
DEEP = 5000
MALFORMED = [
    ("/predict", {"project": "1.1", "label_config": ["<View/>"], "tasks": []}),
    ("/predict", {"project": "1.1", "label_config": {"xml": CONFIG}, "tasks": [{"data": {"text": "x"}}]}),
    ("/predict", {"project": "1.1", "label_config": 42, "tasks": [{"data": {"text": "x"}}]}),
    ("/predict", {"project": ["1"], "label_config": CONFIG, "tasks": []}),
    ("/predict", {"project": "1.1", "label_config": CONFIG, "tasks": "all"}),
    ("/setup", {"project": "1.1", "schema": ["<View/>"]}),
    ("/setup", {"project": "1.1", "schema": {"a": 1}}),
    ("/setup", {"project": {"id": 1}, "schema": CONFIG}),
    ("/webhook", {"action": ["START_TRAINING"], "project": 1}),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": "x"}}),
    ("/train", {"project": None}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "parameters": ["labels", "x"]}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "parameters": "labels=x,y"}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "labels": 5}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "labels": [{"x": 1}, ["y"]]}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "labels": [f"label {i}" for i in range(5000)]}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "project": [1]}),
    ("/v1/models/lsbert:predict", {"instances": ["a"], "project": 2**80}),
    ("/v1/models/lsbert:predict", {"instances": {"text": "a"}}),
    ("/v1/models/lsbert:predict", [1, 2]),
    (
        "/v2/models/lsbert/infer",
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "parameters": ["x"]},
    ),
]


def _raw_corpus() -> list[tuple[str, bytes]]:
    corpus = [(path, json.dumps(body).encode()) for path, body in MALFORMED]
    for path in ("/predict", "/setup", "/webhook", "/train", "/v1/models/lsbert:predict", "/v2/models/lsbert/infer"):
        corpus.append((path, b'{"project": "1.1", "tasks": ' + nested(DEEP) + b"}"))
        corpus.append((path, nested(DEEP)))
        corpus.append((path, b'{"a":' * DEEP + b"1" + b"}" * DEEP))
    return corpus


def test_malformed_corpus_gets_4xx_with_one_log_line_each(target):
    before = len(target.log().splitlines())
    corpus = _raw_corpus()
    for path, raw in corpus:
        response = post(target, path, raw)
        assert 400 <= response.status_code < 500, (path, raw[:80], response.status_code, response.text[:200])
        status, seconds = timed_health(target)
        assert status == 200 and seconds < HEALTH_BUDGET_S
    time.sleep(0.5)
    new = target.log().splitlines()[before:]
    assert not [line for line in new if "Traceback" in line], "\n".join(new[-60:])
    # one line per client error (plus one access-log line per request), not a traceback each
    assert len(new) <= 3 * (2 * len(corpus)) + 5, len(new)
    assert "Deprecat" not in target.log()


# --- bounded requests and state ---------------------------------------------------------------------------
def test_a_body_over_the_limit_gets_413_before_it_is_read(target):
    big = b'{"project": "1.1", "tasks": [' + b'{"data": {"text": "x"}},' * (LIMIT // 10) + b"{}]}"
    assert len(big) > LIMIT
    for path in ("/predict", "/setup", "/webhook", "/v1/models/lsbert:predict", "/v2/models/lsbert/infer"):
        response = post(target, path, big)
        assert response.status_code == 413, (path, response.text)

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(LIMIT // 4096 + 8):
            yield b" " * 4096

    response = requests.post(target.url + "/predict", data=chunks(), timeout=60)
    assert response.status_code == 413
    response = post(target, "/predict", predict_body("still serving"))
    assert response.status_code == 200


def test_invented_webhook_actions_do_not_grow_metrics(target):
    for i in range(300):
        response = post(target, "/webhook", json.dumps({"action": f"INVENTED_{i}_" + "x" * 50, "project": 3}).encode())
        assert response.status_code == 200
    text = requests.get(target.url + "/metrics", timeout=10).text
    assert "INVENTED_" not in text
    assert 'lsbert_webhook_events_total{action="other"} 300.0' in text


def test_zero_shot_label_sets_are_bounded(target):
    for count in (1001, 8000):
        labels = [f"label {i}" for i in range(count)]
        response = post(
            target, "/v1/models/lsbert:predict", json.dumps({"instances": ["a"], "labels": labels}).encode()
        )
        assert response.status_code == 400
    choices = "".join(f'<Choice value="c{i}"/>' for i in range(1500))
    config = f'<View><Text name="text" value="$text"/><Choices name="s" toName="text">{choices}</Choices></View>'
    response = post(target, "/setup", json.dumps({"project": "9.1", "schema": config}).encode())
    assert 400 <= response.status_code < 500


# --- no unauthenticated control -----------------------------------------------------------------------
AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret-pass").decode()}
PROTECTED = [
    ("POST", "/v2/repository/models/lsbert/unload", b""),
    ("POST", "/v2/repository/models/lsbert/load", b""),
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v1/models/lsbert:predict", b'{"instances": ["a"], "labels": ["x", "y"]}'),
    (
        "POST",
        "/v2/models/lsbert/infer",
        b'{"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}],'
        b' "parameters": {"labels": "x,y"}}',
    ),
    ("GET", "/v1/models", b""),
    ("GET", "/v2/models/lsbert", b""),
    ("GET", "/v2", b""),
    ("GET", "/metrics", b""),
    ("GET", "/docs", b""),
    ("GET", "/openapi.json", b""),
    ("GET", "/versions", b""),
    ("POST", "/predict", predict_body("hello")),
    ("POST", "/setup", b'{"project": 1}'),
    ("POST", "/webhook", b'{"action": "START_TRAINING", "project": 1}'),
]
PROBES = ["/", "/health", "/v1/models/lsbert", "/v2/health/live", "/v2/health/ready", "/v2/models/lsbert/ready"]


def test_every_route_but_the_probes_needs_credentials(guarded):
    for method, path, raw in PROTECTED:
        for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}):
            response = requests.request(method, guarded.url + path, data=raw, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
    for path in PROBES:
        assert requests.get(guarded.url + path, timeout=10).status_code == 200, path
    # the unload attempt above changed nothing: the model is still ready and answers
    response = requests.post(
        guarded.url + "/v1/models/lsbert:predict",
        json={"instances": ["a"], "labels": ["x", "y"]},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 200
    assert requests.get(guarded.url + "/metrics", headers=AUTH, timeout=10).status_code == 200


def test_health_without_credentials_says_only_up_and_ready(guarded):
    setup = requests.post(guarded.url + "/setup", json={"project": "5.1", "schema": CONFIG}, headers=AUTH, timeout=30)
    assert setup.status_code == 200
    for path in ("/", "/health"):
        anonymous = requests.get(guarded.url + path, timeout=10).json()
        assert set(anonymous) <= {"status", "ready", "model_class"}, anonymous
        assert anonymous["status"] == "UP" and anonymous["ready"] is True
        full = requests.get(guarded.url + path, headers=AUTH, timeout=10).json()
        assert full["serving"].get("5", "").startswith("zeroshot-"), full


# --- predict while loading ---------------------------------------------------------------------------------
def test_predict_sent_while_the_model_loads_waits_for_it(server_factory):
    server = server_factory({"TRAINING_LAUNCHER": "none"}, wait_ready=False, name="attacks-loading")
    health = requests.get(server.url + "/health", timeout=10).json()
    response = post(server, "/predict", predict_body("sent as soon as the server answers"), timeout=100)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"]
    if health["ready"] is False:  # the request really was sent during the load
        assert "503" not in server.log()


# --- truthful versions when a promoted checkpoint cannot load ---------------------------------------------
def test_a_checkpoint_that_cannot_load_is_reported_truthfully_and_retried_with_backoff(server_factory, tmp_path):
    from lsbert.store.local import LocalStore
    from tests.support.checkpoints import save_checkpoint
    from tests.support.polling import wait_until

    store = LocalStore(tmp_path / "store")
    labels = ("Positive", "Negative")
    save_checkpoint(store, 11, "ft-0001", labels, seed=1)
    for weights in store.local_path(11, "ft-0001").glob("*.safetensors"):
        weights.write_bytes(b"not a checkpoint")
    store.promote(11, "ft-0001")
    server = server_factory(
        {"MODEL_DIR": str(store.root), "TRAINING_LAUNCHER": "none", "ROLLOUT_POLL_SECONDS": "0.5"}, name="broken"
    )
    setup = {"project": "11.1", "schema": CONFIG}
    body = predict_body("the promoted checkpoint is broken", project="11.1")
    for _ in range(15):
        response = post(server, "/predict", body)
        assert response.status_code == 200
        served = response.json()["results"][0]["model_version"]
        assert served.startswith("zeroshot-")
        assert post(server, "/setup", json.dumps(setup).encode()).json()["model_version"] == served
        time.sleep(0.2)
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["serving"]["11"] == served
    assert health["load_failures"]["11"]["version"] == "ft-0001"
    # retried with backoff (5 s, then 10 s, ...), not on every request or every 0.5 s poll
    errors = [line for line in server.log().splitlines() if " ERROR " in line and "cannot load ft-0001" in line]
    assert 1 <= len(errors) <= 2, errors
    # a new promoted version is tried at once
    save_checkpoint(store, 11, "ft-0002", labels, seed=2)
    store.promote(11, "ft-0002")
    wait_until(
        lambda: post(server, "/setup", json.dumps(setup).encode()).json()["model_version"] == "ft-0002",
        60,
        "the predictor to serve ft-0002",
        interval=0.3,
    )
    assert post(server, "/predict", body).json()["results"][0]["model_version"] == "ft-0002"
    assert "load_failures" not in requests.get(server.url + "/health", timeout=5).json()


def test_an_unloaded_model_fails_liveness_instead_of_staying_never_ready(server_factory):
    server = server_factory(
        {"TRAINING_LAUNCHER": "none", "BASIC_AUTH_USER": "alice", "BASIC_AUTH_PASS": "s3cret-pass"}, name="unload"
    )
    assert requests.post(server.url + "/v2/repository/models/lsbert/unload", timeout=10).status_code == 401
    assert requests.get(server.url + "/", timeout=5).status_code == 200
    response = requests.post(server.url + "/v2/repository/models/lsbert/unload", headers=AUTH, timeout=10)
    assert response.status_code == 200
    live = requests.get(server.url + "/", timeout=5)
    assert live.status_code == 503 and live.json() == {"status": "DOWN", "model_class": "lsbert", "ready": False}
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["ready"] is False


# --- small requests are not starved ----------------------------------------------------------------------
def single_tasks_during(target, path: str, big: bytes) -> tuple[list[float], float, requests.Response]:
    """Send ``big`` and, while it runs, single-task predictions for another project one after the other:
    their latencies, how long ``big`` took and its response."""
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        future = pool.submit(post, target, path, big, timeout=600)
        time.sleep(1.0)  # the big request's chunks are queued
        singles = []
        while not future.done() and len(singles) < 10:
            t0 = time.perf_counter()
            response = post(target, "/predict", predict_body("an annotator opens one task", project="13.1"))
            assert response.status_code == 200
            singles.append(time.perf_counter() - t0)
        answer = future.result()
        return singles, time.perf_counter() - started, answer


def test_a_single_task_is_not_starved_by_a_bulk_request(target):
    bulk_tasks = [
        {"id": i, "data": {"text": f"bulk review {i}: " + "quite a long sentence here " * 6}} for i in range(4000)
    ]
    bulk = json.dumps({"project": "12.1", "label_config": CONFIG, "tasks": bulk_tasks}).encode()
    singles, bulk_seconds, answer = single_tasks_during(target, "/predict", bulk)
    assert answer.status_code == 200
    assert singles, "the bulk request finished before any single-task request was sent"
    assert max(singles) < max(2.0, bulk_seconds / 4), (singles, bulk_seconds)


def test_a_new_large_zero_shot_label_set_does_not_hold_up_other_projects(target):
    # 1,000 labels never seen before: 4,000 label prompts to embed before the first answer over them
    labels = [f"topic number {i} of a long list of categories" for i in range(1000)]
    big = json.dumps({"instances": ["one text"], "labels": labels}).encode()
    singles, big_seconds, answer = single_tasks_during(target, "/v1/models/lsbert:predict", big)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 1
    assert singles, "the new label set was embedded before any other request was sent"
    assert max(singles) < max(2.0, big_seconds / 4), (singles, big_seconds)


# --- no blocking I/O on the event loop -----------------------------------------------------------------
def test_a_store_that_never_answers_blocks_no_one(server_factory, tmp_path):
    """The promotion pointer of one project is a FIFO nobody writes: reading it hangs for ever."""
    import os

    root = tmp_path / "store"
    (root / "21").mkdir(parents=True)
    fifo = root / "21" / "PROMOTED"
    os.mkfifo(fifo)
    server = server_factory({"MODEL_DIR": str(root), "TRAINING_LAUNCHER": "none"}, name="hung-store")
    try:
        with ThreadPoolExecutor(6) as pool:
            setups = [
                pool.submit(post, server, "/setup", json.dumps({"project": "21.1", "schema": CONFIG}).encode())
                for _ in range(3)
            ]
            predicts = [
                pool.submit(post, server, "/predict", predict_body("hung store", project="21.1")) for _ in range(3)
            ]
            timings = []
            while not all(f.done() for f in setups + predicts):
                status, seconds = timed_health(server)
                assert status == 200
                timings.append(seconds)
                # another project, with a readable store, is not held up
                other = post(server, "/predict", predict_body("another project", project="22.1"), timeout=10)
                assert other.status_code == 200
                time.sleep(0.2)
            for future in setups:
                assert future.result().json()["model_version"].startswith("zeroshot-")
            for future in predicts:
                assert future.result().status_code == 200
        assert max(timings) < HEALTH_BUDGET_S
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # lets the hung read finish so the server can stop
        os.close(fd)


# --- training is bounded across projects -----------------------------------------------------------------
def test_start_training_that_cannot_succeed_is_refused_early(server_factory):
    """Without a Label Studio URL and key no run can read its annotations: none is started, whatever comes."""
    server = server_factory({"TRAINING_LAUNCHER": "local"}, name="no-label-studio")
    for project in range(1, 13):
        body = {"action": "START_TRAINING", "project": {"id": project}}
        response = post(server, "/webhook", json.dumps(body).encode())
        assert response.status_code == 200 and response.json()["status"] == "error"
        assert "LABEL_STUDIO_URL" in response.json()["message"]
        status, seconds = timed_health(server)
        assert status == 200 and seconds < HEALTH_BUDGET_S
    training = requests.get(server.url + "/health", timeout=5).json()["training"]
    assert len(training) == 12
    assert all(t["active"] is None and "LABEL_STUDIO_URL" in t["last"]["message"] for t in training.values())
    runs = Path(server.env["CACHE_DIR"]) / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "no training process was started"


def test_concurrent_runs_are_bounded_and_waiting_projects_take_turns(tmp_path):
    """Real child processes (the scheduler tests' gate command) under a global limit of 2."""
    import sys

    from lsbert.launcher.local import LocalLauncher
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.store.local import LocalStore
    from tests.support.polling import until

    gate = Path(__file__).parent.parent / "launcher" / "gate.py"

    def started() -> list[int]:
        files = sorted(tmp_path.glob("started-*"), key=lambda p: p.stat().st_mtime_ns)
        return [int(p.read_text()) for p in files]

    async def scenario():
        scheduler = TrainingScheduler(
            LocalLauncher(tmp_path / "logs", command=[sys.executable, str(gate), str(tmp_path)]),
            LocalStore(tmp_path / "store"),
            every_n_updates=0,
            version_name="ft",
            poll_seconds=0.05,
            max_concurrent=2,
        )
        answers = []
        for project in range(1, 7):
            answers.append(await scheduler.handle_event("START_TRAINING", project, {}))
            await asyncio.sleep(0.05)
        # pressing again while waiting keeps one pending request per project
        for _ in range(5):
            assert (await scheduler.handle_event("START_TRAINING", 3, {}))["status"] == "queued"
        await until(lambda: len(started()) == 2)
        await asyncio.sleep(0.5)
        assert sorted(started()) == [1, 2]
        assert [a["status"] for a in answers[2:]] == ["queued"] * 4
        assert scheduler.status()["3"]["waiting_for_slot"] is True
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, sum(1 for s in scheduler.status().values() if s["active"]))
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        (tmp_path / "release-ft-0001").write_text("")  # every run now finishes as soon as it starts
        await until(lambda: all(s["last"] and not s["active"] for s in scheduler.status().values()), timeout=60)
        watcher.cancel()
        assert peak <= 2
        assert sorted(started()[:2]) == [1, 2] and sorted(started()[2:]) == [3, 4, 5, 6]
        assert {p: s["runs_started"] for p, s in scheduler.status().items()} == {str(p): 1 for p in range(1, 7)}
        await scheduler.close()

    asyncio.run(scenario())


# --- <Text valueType="url"> works, safely ------------------------------------------------------------------
def _http_server(routes: dict, seen: list):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.server.server_port, self.path, self.headers.get("Authorization")))
            route = routes.get(self.path)
            if route is None:
                self.send_response(404)
                self.end_headers()
                return
            status, headers, body = route()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_url_texts_are_fetched_from_label_studio_only_with_limits(server_factory):
    seen: list = []
    storage_routes = {"/bucket/review.txt": lambda: (200, {}, b"a wonderful, delightful product")}
    storage = _http_server(storage_routes, seen)
    storage_url = f"http://127.0.0.1:{storage.server_port}"
    big = b"x" * (5 * 1024 * 1024)
    ls_routes = {
        "/data/upload/1/review.txt": lambda: (200, {"Content-Type": "text/plain"}, b"terrible, it broke at once"),
        "/data/upload/1/big.txt": lambda: (200, {}, big),
        "/storage/presign": lambda: (302, {"Location": storage_url + "/bucket/review.txt"}, b""),
    }
    label_studio = _http_server(ls_routes, seen)
    ls_url = f"http://127.0.0.1:{label_studio.server_port}"
    try:
        server = server_factory(
            {"TRAINING_LAUNCHER": "none", "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": "ls-key-123"},
            name="url-texts",
        )
        config = CONFIG.replace('value="$text"', 'value="$text" valueType="url"')
        assert 'valueType="url"' in config
        links = [
            ls_url + "/data/upload/1/review.txt",  # on Label Studio's host
            "/data/upload/1/review.txt",  # relative to it
            ls_url + "/storage/presign",  # a storage redirect issued by Label Studio
            storage_url + "/bucket/review.txt",  # another host: refused
            ls_url + "/data/upload/1/big.txt",  # over the size limit
            "file:///etc/passwd",
            "http://169.254.169.254/latest/meta-data/",
        ]
        tasks = [{"id": i, "data": {"text": link}} for i, link in enumerate(links)]
        body = json.dumps({"project": "31.1", "label_config": config, "tasks": tasks}).encode()
        response = post(server, "/predict", body)
        assert response.status_code == 200, response.text
        filled = [bool(r["result"]) for r in response.json()["results"]]
        assert filled == [True, True, True, False, False, False, False]
        # the key went to Label Studio only; the storage host was reached only through the redirect
        to_storage = [s for s in seen if s[0] == storage.server_port]
        assert len(to_storage) == 1 and to_storage[0][2] is None
        assert all(s[2] == "Token ls-key-123" for s in seen if s[0] == label_studio.server_port)
        # cached: the same links again reach no server
        before = len(seen)
        assert post(server, "/predict", body).status_code == 200
        assert [s[1] for s in seen[before:]] == ["/data/upload/1/big.txt"]  # only the refused one is retried
    finally:
        storage.shutdown()
        label_studio.shutdown()


# --- crash recovery of the local launcher ----------------------------------------------------------------
def test_a_restarted_predictor_adopts_the_run_it_left_behind(tmp_path):
    """A first launcher starts a run and is abandoned (as by ``kill -9`` of the predictor); a second one, on
    the same run directory, adopts the still running child: Start Training starts no second run."""
    import sys

    from lsbert.launcher.local import LocalLauncher
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.store.local import LocalStore
    from tests.support.polling import until

    gate = Path(__file__).parent.parent / "launcher" / "gate.py"
    command = [sys.executable, str(gate), str(tmp_path)]
    store = LocalStore(tmp_path / "store")
    crashed = LocalLauncher(tmp_path / "runs", command=command)
    first = crashed.launch(3, store.next_version(3, "ft"), [])
    assert first.phase.value == "running"

    async def scenario():
        finished = []

        async def on_finished(project, run):
            finished.append((project, run.version, run.phase.value))

        scheduler = TrainingScheduler(
            LocalLauncher(tmp_path / "runs", command=command),
            store,
            every_n_updates=0,
            version_name="ft",
            poll_seconds=0.05,
            on_finished=on_finished,
        )
        await scheduler.adopt_active_runs()
        assert scheduler.status()["3"]["active"]["version"] == first.version
        for _ in range(3):
            answer = await scheduler.handle_event("START_TRAINING", 3, {})
            assert answer["status"] == "queued" and answer["job"] == first.run_id
        await asyncio.sleep(0.5)
        assert len(list(tmp_path.glob("started-*"))) == 1  # no duplicate run
        (tmp_path / f"release-{first.version}").write_text("")
        await until(lambda: finished, timeout=30)
        assert finished[0] == (3, first.version, "succeeded")
        await scheduler.close()

    try:
        asyncio.run(scenario())
    finally:
        crashed.close()
