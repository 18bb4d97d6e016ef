"""Rollout: the predictor notices a newly promoted checkpoint and swaps to it under continuous load with
zero failed requests and no response that mixes two versions."""

import threading

import requests

from lsbert.store.local import LocalStore
from tests.conftest import fixture
from tests.support.checkpoints import save_checkpoint
from tests.support.polling import wait_until

BODY = fixture("predict-20-tasks.json")["body_json"]
PROJECT = int(BODY["project"].split(".")[0])


def test_swap_under_continuous_predict_load(server_factory, tmp_path):
    store = LocalStore(tmp_path / "store")
    labels = ("Positive", "Negative")
    save_checkpoint(store, PROJECT, "ft-0001", labels, seed=1)
    store.promote(PROJECT, "ft-0001")
    server = server_factory(
        {"MODEL_DIR": str(store.root), "TRAINING_LAUNCHER": "none", "ROLLOUT_POLL_SECONDS": "0.5"}, name="rollout"
    )
    setup = {"project": BODY["project"], "schema": BODY["label_config"]}
    assert requests.post(server.url + "/setup", json=setup, timeout=5).json()["model_version"] == "ft-0001"

    seen: list[list[str]] = [[] for _ in range(4)]
    errors: list[str] = []
    stop = threading.Event()

    def load(worker: int):
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(server.url + "/predict", json=BODY, timeout=30)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                versions = {item["model_version"] for item in response.json()["results"]}
                if len(versions) != 1 or not all(item["result"] for item in response.json()["results"]):
                    errors.append(f"mixed or empty response: {versions}")
                seen[worker].append(versions.pop())
            except requests.RequestException as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(s) >= 2 for s in seen) or errors, 60, "every worker answered twice by ft-0001")
    save_checkpoint(store, PROJECT, "ft-0002", labels, seed=2)
    store.promote(PROJECT, "ft-0002")
    wait_until(
        lambda: requests.post(server.url + "/setup", json=setup, timeout=5).json()["model_version"] == "ft-0002",
        60,
        "the predictor to serve ft-0002",
        interval=0.2,
    )
    wait_until(
        lambda: all(s[-2:] == ["ft-0002", "ft-0002"] for s in seen) or errors,
        60,
        "every worker answered twice by ft-0002",
    )
    stop.set()
    for t in threads:
        t.join()

    assert not errors, errors[:5]
    assert requests.post(server.url + "/setup", json=setup, timeout=5).json()["model_version"] == "ft-0002"
    for versions in seen:
        assert versions, "a load thread got no answer"
        # each client sees the old version, then the new one, never back
        switch = versions.index("ft-0002") if "ft-0002" in versions else len(versions)
        assert set(versions[:switch]) <= {"ft-0001"} and set(versions[switch:]) == {"ft-0002"}
    assert any("ft-0001" in v for v in seen) and all(v[-1] == "ft-0002" for v in seen)
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    assert "lsbert_model_swaps_total 1.0" in metrics
    serving = [line for line in metrics.splitlines() if line.startswith("lsbert_serving_model_info{")]
    assert f'lsbert_serving_model_info{{kind="finetuned",project="{PROJECT}",version="ft-0001"}} 0.0' in serving, (
        serving
    )
    assert f'lsbert_serving_model_info{{kind="finetuned",project="{PROJECT}",version="ft-0002"}} 1.0' in serving
    assert "swapped ft-0001 -> ft-0002" in server.log()


def test_predictors_sharing_a_store_converge(server_factory, tmp_path):
    store = LocalStore(tmp_path / "store")
    save_checkpoint(store, PROJECT, "ft-0001", ("Positive", "Negative"), seed=3)
    store.promote(PROJECT, "ft-0001")
    env = {"MODEL_DIR": str(store.root), "TRAINING_LAUNCHER": "none", "ROLLOUT_POLL_SECONDS": "0.5"}
    servers = [server_factory(env, name=f"replica{i}") for i in range(2)]
    setup = {"project": BODY["project"], "schema": BODY["label_config"]}
    save_checkpoint(store, PROJECT, "ft-0002", ("Positive", "Negative"), seed=4)
    store.promote(PROJECT, "ft-0002")

    def versions() -> list[str]:
        return [requests.post(s.url + "/setup", json=setup, timeout=5).json()["model_version"] for s in servers]

    wait_until(lambda: versions() == ["ft-0002", "ft-0002"], 60, "both replicas to serve ft-0002", interval=0.3)
    answers = [requests.post(s.url + "/predict", json=BODY, timeout=30).json()["results"] for s in servers]
    assert [r["result"][0]["value"] for r in answers[0]] == [r["result"][0]["value"] for r in answers[1]]


def test_a_checkpoint_whose_labels_left_the_config_is_not_served(server_factory, tmp_path):
    store = LocalStore(tmp_path / "store")
    save_checkpoint(store, PROJECT, "ft-0001", ("Spam", "Ham"), seed=5)
    store.promote(PROJECT, "ft-0001")
    server = server_factory({"MODEL_DIR": str(store.root), "TRAINING_LAUNCHER": "none"}, name="drift")
    response = requests.post(server.url + "/predict", json=BODY, timeout=30).json()
    assert all(item["model_version"].startswith("zeroshot-") for item in response["results"])
    assert all(item["result"][0]["value"]["choices"][0] in ("Positive", "Negative") for item in response["results"])
