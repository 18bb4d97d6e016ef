"""The same process is a standard KServe predictor: V1, Open Inference Protocol V2, readiness, metrics."""

import requests

from tests.conftest import fixture


def test_readiness_endpoints(lsbert):
    assert requests.get(lsbert.url + "/v1/models/lsbert", timeout=2).json()["ready"] is True
    assert requests.get(lsbert.url + "/v2/models/lsbert/ready", timeout=2).status_code == 200
    assert requests.get(lsbert.url + "/v1/models/nope", timeout=2).status_code == 404


def test_v1_zero_shot_over_given_labels(lsbert):
    response = requests.post(
        lsbert.url + "/v1/models/lsbert:predict",
        json={
            "instances": ["The striker scored twice.", {"text": "Parliament passed the bill."}],
            "labels": ["sport", "politics"],
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["labels"] == ["sport", "politics"] and body["model_version"].startswith("zeroshot-")
    assert [p["label"] for p in body["predictions"]] == ["sport", "politics"]
    for p in body["predictions"]:
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-3


def test_v1_and_v2_for_a_label_studio_project(lsbert):
    setup = fixture("setup.json")["body_json"]
    version = requests.post(lsbert.url + "/setup", json=setup, timeout=5).json()["model_version"]
    v1 = requests.post(
        lsbert.url + "/v1/models/lsbert:predict", json={"instances": ["lovely", "awful"], "project": 1}, timeout=30
    ).json()
    assert v1["model_version"] == version and v1["labels"] == ["Positive", "Negative"]
    v2 = requests.post(
        lsbert.url + "/v2/models/lsbert/infer",
        json={
            "id": "r1",
            "parameters": {"project": "1"},
            "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["lovely", "awful"]}],
        },
        timeout=30,
    )
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert body["model_version"] == version and body["id"] == "r1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == [p["label"] for p in v1["predictions"]]
    assert outputs["probabilities"]["shape"] == [2, 2]


def test_v1_bad_input(lsbert):
    for body in ({"instances": [1, 2]}, {"instances": "text"}, {"instances": ["x"], "project": 424242}):
        response = requests.post(lsbert.url + "/v1/models/lsbert:predict", json=body, timeout=10)
        assert response.status_code == 400, response.text


def test_metrics(lsbert):
    requests.post(lsbert.url + "/predict", json=fixture("predict-20-tasks.json")["body_json"], timeout=60)
    text = requests.get(lsbert.url + "/metrics", timeout=5).text
    for name in (
        "lsbert_request_seconds_bucket",
        "lsbert_batch_size_bucket",
        "lsbert_tasks_predicted_total",
        "request_predict_seconds",
    ):
        assert name in text, name
    assert 'lsbert_serving_model_info{kind="zeroshot",project="2",version="zeroshot-' in text
