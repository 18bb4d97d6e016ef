"""The embedding-head keeper with the real MiniLM baseline, a real checkpoint store, and annotation events
shaped exactly like the ones Label Studio 1.23.2 sends (the captured fixtures, with other texts and labels)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lsbert.labelconfig import parse_label_config
from lsbert.model import ModelKind
from lsbert.model.headstate import HeadState, assessment_steps, step_of
from lsbert.model.runtime import select_runtime
from lsbert.predictor.heads import HeadKeeper, changes_from_event
from lsbert.predictor.registry import ModelRegistry
from lsbert.predictor.service import PredictorService
from lsbert.store.local import LocalStore
from tests.conftest import MINILM, fixture
from tests.support.datasets import rotten_tomatoes_with_plot

LABELS = ("fresh", "rotten", "plot")
PROJECT = 5
PER_CLASS, HELD_OUT_PER_CLASS = 20, 20


def config(choice: str = "single", labels=LABELS) -> str:
    return (
        f'<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="{choice}">'
        + "".join(f'<Choice value="{label}"/>' for label in labels)
        + "</Choices></View>"
    )


def annotation_event(
    task_id: int,
    text: str,
    labels,
    *,
    annotation_id=None,
    action="ANNOTATION_CREATED",
    cancelled=False,
    label_config=None,
) -> dict:
    body = copy.deepcopy(fixture("webhook-ANNOTATION_CREATED.json")["body_json"])
    body["action"] = action
    annotation, task, project = body["annotation"], body["task"], body["project"]
    annotation.update(id=annotation_id or 1000 + task_id, task=task_id, project=PROJECT, was_cancelled=cancelled)
    annotation["result"] = [] if cancelled else [dict(annotation["result"][0], value={"choices": list(labels)})]
    annotation["updated_at"] = f"2026-11-28T13:{task_id // 60 % 60:02d}:{task_id % 60:02d}.000000Z"
    task.update(id=task_id, data={"text": text}, project=PROJECT)
    project.update(id=PROJECT, label_config=label_config or config())
    return body


def deleted_event(*annotation_ids: int) -> dict:
    body = copy.deepcopy(fixture("webhook-ANNOTATIONS_DELETED.json")["body_json"])
    body["annotations"] = [{"id": a} for a in annotation_ids]
    body["project"].update(id=PROJECT, label_config=config())
    return body


@pytest.fixture(scope="module")
def data():
    by_label = defaultdict(list)
    for text, label in rotten_tomatoes_with_plot(seed=11):
        by_label[label].append(text)
    train = [(by_label[label][i], label) for i in range(PER_CLASS) for label in LABELS]
    held_out = [(by_label[label][PER_CLASS + i], label) for i in range(HELD_OUT_PER_CLASS) for label in LABELS]
    return train, held_out


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    registry = ModelRegistry(LocalStore(tmp_path_factory.mktemp("unused")), select_runtime("fp32", 0), MINILM)
    svc = PredictorService(registry)
    svc.load()
    yield svc
    svc.close()


def keeper_on(service: PredictorService, root: Path, **kwargs) -> HeadKeeper:
    store = LocalStore(root)
    service.registry.store = store
    keeper = HeadKeeper(service, store, baseline=MINILM, **kwargs)
    service.attach_heads(keeper)
    return keeper


async def feed(keeper: HeadKeeper, service: PredictorService, events: list[dict]) -> None:
    for event in events:
        service.registry.remember(PROJECT, service.spec_from_config(event["project"]["label_config"]))
        keeper.on_event(event["action"], PROJECT, event)
    assert await keeper.wait_idle(PROJECT, timeout=300)


def accuracy(service: PredictorService, spec, served, rows) -> float:
    async def run():
        raw = await service.registry.predict(served, spec, [t for t, _ in rows], service.queue)
        return raw

    proba = asyncio.run(run())
    chosen = [served.labels[i] for i in proba.argmax(axis=1)]
    return float(np.mean([c == label for c, (_, label) in zip(chosen, rows)]))


def test_steps_are_spaced_and_counted():
    steps = assessment_steps(10)
    assert steps[:9] == [10, 15, 20, 30, 40, 60, 80, 120, 160]
    assert all(1.3 <= b / a <= 1.5 for a, b in itertools.pairwise(steps))
    assert step_of(9, steps) == 0 and step_of(10, steps) == 1 and step_of(61, steps) == step_of(79, steps) == 6


def test_fixture_events_become_changes():
    spec = parse_label_config(fixture("webhook-ANNOTATION_CREATED.json")["body_json"]["project"]["label_config"])
    created = changes_from_event(
        "ANNOTATION_CREATED", fixture("webhook-ANNOTATION_CREATED.json")["body_json"], spec, 0.0
    )
    assert [(c.kind, c.task_id, c.annotation_id, c.labels) for c in created] == [("put", 4, 2, ("Positive",))]
    assert created[0].task == {"id": 4, "data": {"text": "I love this product, it works great."}}
    updated = changes_from_event(
        "ANNOTATION_UPDATED", fixture("webhook-ANNOTATION_UPDATED.json")["body_json"], spec, 0.0
    )
    assert [(c.kind, c.task_id, c.labels) for c in updated] == [("put", 4, ("Negative",))]
    assert updated[0].changed_at > created[0].changed_at  # the annotation's updated_at
    deleted = changes_from_event(
        "ANNOTATIONS_DELETED", fixture("webhook-ANNOTATIONS_DELETED.json")["body_json"], spec, 7.0
    )
    assert [(c.kind, c.annotation_id, c.changed_at) for c in deleted] == [("delete", 6, 7.0)]
    skipped = copy.deepcopy(fixture("webhook-ANNOTATION_CREATED.json")["body_json"])
    skipped["annotation"].update(was_cancelled=True, result=[])
    assert changes_from_event("ANNOTATION_CREATED", skipped, spec, 0.0) == []
    emptied = copy.deepcopy(fixture("webhook-ANNOTATION_UPDATED.json")["body_json"])
    emptied["annotation"]["result"] = []
    assert [c.kind for c in changes_from_event("ANNOTATION_UPDATED", emptied, spec, 0.0)] == ["drop"]
    bulk = fixture("webhook-ANNOTATION_CREATED.json")["body_json"]
    bulk = dict(bulk, annotation=[bulk["annotation"]], task=[bulk["task"]])
    assert [c.task_id for c in changes_from_event("ANNOTATIONS_CREATED", bulk, spec, 0.0)] == [4]
    for name in ("webhook-PROJECT_UPDATED.json", "webhook-TASKS_CREATED.json", "webhook-START_TRAINING.json"):
        body = fixture(name)["body_json"]
        assert changes_from_event(body["action"], body, spec, 0.0) == []


def test_head_learns_from_events_serves_in_steps_and_survives_a_restart(service, data, tmp_path):
    train, held_out = data
    keeper = keeper_on(service, tmp_path / "models")
    events = [annotation_event(100 + i, text, [label]) for i, (text, label) in enumerate(train)]

    async def first_nine():
        await feed(keeper, service, events[:9])
        spec = service.registry.spec(PROJECT)
        return keeper.status(PROJECT), await service.registry.acquire(PROJECT, spec)

    status, served = asyncio.run(first_nine())
    assert status["examples"] == 9 and status["version"] is None and not status["serves"]
    assert served.kind is ModelKind.ZEROSHOT

    async def all_of_them():
        await feed(keeper, service, events[9:])
        spec = service.registry.spec(PROJECT)
        return keeper.status(PROJECT), await service.registry.acquire(PROJECT, spec)

    status, served = asyncio.run(all_of_them())
    n = len(train)
    assert status["examples"] == n and status["serves"], status
    assert served.kind is ModelKind.HEAD and served.version == status["version"]
    assert served.version.startswith(f"head-{n}-")
    scores = status["assessment"]
    assert scores["head_macro_f1"] > max(scores["zero_shot_macro_f1"], scores["prior_macro_f1"]), scores
    spec = service.registry.spec(PROJECT)
    assert service.registry.version_for(PROJECT, spec) == served.version

    head_accuracy = accuracy(service, spec, served, held_out)
    zero_shot_accuracy = accuracy(service, spec, service.registry.zero_shot_served(spec), held_out)
    print(f"held-out accuracy: head {head_accuracy:.3f}, zero-shot {zero_shot_accuracy:.3f}")
    assert head_accuracy >= zero_shot_accuracy + 0.1, (head_accuracy, zero_shot_accuracy)

    # between steps the version stays: one more label, a relabel, a skip and a deletion change nothing served
    more = annotation_event(900, held_out[0][0], [held_out[0][1]])
    relabel = annotation_event(100, train[0][0], ["plot"], action="ANNOTATION_UPDATED")
    relabel["annotation"]["updated_at"] = "2026-11-29T00:00:00.000000Z"
    skip = annotation_event(901, held_out[1][0], [], cancelled=True)
    asyncio.run(feed(keeper, service, [more, relabel, skip, deleted_event(1000 + 101)]))
    status = keeper.status(PROJECT)
    assert status["examples"] == n and status["version"] == served.version
    stored = HeadState.from_bytes((tmp_path / "models" / str(PROJECT) / ".head" / "state.npz").read_bytes())
    assert len(stored.examples) == n and 101 not in stored.examples and 901 not in stored.examples
    assert stored.examples[100].labels == ("plot",) and stored.version == served.version
    assert 101 in stored.tombstones

    # a new process on the same store serves the same head at once, without a single event
    restarted = keeper_on(service, tmp_path / "models")

    async def after_restart():
        return await service.registry.acquire(PROJECT, spec)

    again = asyncio.run(after_restart())
    assert again.kind is ModelKind.HEAD and again.version == served.version
    assert restarted.status(PROJECT)["examples"] == n
    # the store never lists the head as a version, and pruning leaves it alone
    assert LocalStore(tmp_path / "models").versions(PROJECT) == []
    LocalStore(tmp_path / "models").prune(PROJECT, 1)
    assert (tmp_path / "models" / str(PROJECT) / ".head" / "state.npz").exists()


def test_a_new_label_set_restricts_the_examples(service, data, tmp_path):
    train, _ = data
    keeper = keeper_on(service, tmp_path / "models")
    events = [annotation_event(100 + i, text, [label]) for i, (text, label) in enumerate(train[:30])]
    asyncio.run(feed(keeper, service, events))
    assert keeper.status(PROJECT)["examples"] == 30
    two = ("fresh", "rotten")
    service.registry.remember(PROJECT, service.spec_from_config(config(labels=two)))

    async def follow():
        spec = service.registry.spec(PROJECT)
        keeper.serving(PROJECT, spec)  # notices the change
        assert await keeper.wait_idle(PROJECT, timeout=120)
        return keeper.status(PROJECT), service.registry.version_for(PROJECT, spec)

    status, version = asyncio.run(follow())
    assert status["labels"] == list(two) and status["examples"] == sum(1 for _, label in train[:30] if label in two)
    if status["serves"]:
        assert version == status["version"]
    else:
        assert version.startswith("zeroshot-")


def test_multi_label_heads(service, data, tmp_path):
    train, _ = data
    keeper = keeper_on(service, tmp_path / "models")
    multi = config("multiple")
    events = []
    for i, (text, label) in enumerate(train[:30]):
        labels = [label, "fresh"] if label == "plot" and i % 2 else [label]
        events.append(annotation_event(100 + i, text, labels, label_config=multi))
    asyncio.run(feed(keeper, service, events))
    status = keeper.status(PROJECT)
    assert status["examples"] == 30 and status["version"].startswith("head-30-")
    assert status["assessment"]["head_macro_f1"] is not None


def test_replicas_sharing_a_store_merge_their_examples(service, data, tmp_path):
    train, _ = data
    root = tmp_path / "models"
    events = [annotation_event(100 + i, text, [label]) for i, (text, label) in enumerate(train[:20])]
    first = keeper_on(service, root)
    asyncio.run(feed(first, service, events[:10]))
    second = keeper_on(service, root)

    async def second_replica():
        await second.prepare(PROJECT)
        await feed(second, service, events[10:])

    asyncio.run(second_replica())
    assert second.status(PROJECT)["examples"] == 20  # read the first replica's 10, added its own 10

    async def first_catches_up():
        await first.check(PROJECT)
        assert await first.wait_idle(PROJECT, timeout=120)

    asyncio.run(first_catches_up())
    assert first.status(PROJECT)["examples"] == 20
    assert first.status(PROJECT)["version"] == second.status(PROJECT)["version"]


def test_the_webhook_feeds_the_head_of_a_running_server(server_factory):
    """The captured Label Studio requests, replayed byte for byte against ``lsbert serve``."""
    import time

    import requests

    server = server_factory({"TRAINING_LAUNCHER": "none"}, name="heads-webhook")
    state_file = Path(server.env["MODEL_DIR"]) / "2" / ".head" / "state.npz"

    def replay(name: str, body: bytes | None = None) -> dict:
        captured = fixture(name)
        answer = requests.post(
            server.url + "/webhook",
            data=body if body is not None else captured["body_raw"].encode(),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def stored(expect) -> HeadState:
        deadline = time.time() + 60
        while time.time() < deadline:
            if state_file.exists():
                state = HeadState.from_bytes(state_file.read_bytes())
                if expect(state):
                    return state
            time.sleep(0.2)
        raise AssertionError(f"the head state never matched; server log:\n{server.log()[-3000:]}")

    replay("webhook-ANNOTATION_CREATED.json")
    state = stored(lambda s: 4 in s.examples)
    assert state.labels == ("Positive", "Negative") and state.examples[4].labels == ("Positive",)
    assert state.examples[4].annotation_id == 2 and state.examples[4].embedding.shape == (384,)
    replay("webhook-ANNOTATION_UPDATED.json")
    state = stored(lambda s: s.examples.get(4) is not None and s.examples[4].labels == ("Negative",))
    replay("webhook-ANNOTATIONS_DELETED.json")  # annotation 6: not the one the example came from
    replay("webhook-PROJECT_UPDATED.json")
    body = fixture("webhook-ANNOTATIONS_DELETED.json")["body_json"]
    body["annotations"] = [{"id": 2}]
    replay("webhook-ANNOTATIONS_DELETED.json", json.dumps(body).encode())
    state = stored(lambda s: 4 not in s.examples)
    assert 4 in state.tombstones
    versions = requests.get(server.url + "/versions", params={"project": 2}, timeout=10).json()
    serving = versions["projects"]["2"]["serving"]
    assert serving["kind"] == "zeroshot" and serving["head"]["examples"] == 0 and not serving["head"]["serves"]
