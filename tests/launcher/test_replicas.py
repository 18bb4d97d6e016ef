"""Every-N-annotations training with several predictor replicas: Label Studio's own annotation count decides.

Two schedulers stand for two replicas: each has its own LocalLauncher on one shared run directory (two
processes on one host with a shared volume) and both use one checkpoint store. Events are Label Studio
1.23.2's captured annotation webhooks, with ``project.total_annotations_number`` set to the count each event
would carry. Runs are real child processes (tests/launcher/gate.py).
"""

from __future__ import annotations

import asyncio
import copy
import sys
from pathlib import Path
from typing import Any

from lsbert.launcher.local import LocalLauncher
from lsbert.launcher.scheduler import TrainingScheduler, annotation_count, crosses_multiple
from lsbert.store.local import LocalStore
from tests.conftest import fixture
from tests.launcher.test_scheduler import release, started
from tests.support.polling import until

GATE = Path(__file__).with_name("gate.py")
PROJECT = 2  # the project of the captured events


def replica(tmp_path: Path, every: int) -> TrainingScheduler:
    launcher = LocalLauncher(tmp_path / "runs", command=[sys.executable, str(GATE), str(tmp_path)])
    return TrainingScheduler(
        launcher, LocalStore(tmp_path / "store"), every_n_updates=every, version_name="ft", poll_seconds=0.05
    )


def event(name: str, total: int) -> dict[str, Any]:
    """A captured webhook body with Label Studio's annotation count after the change set to ``total``."""
    body = copy.deepcopy(fixture(f"webhook-{name}.json")["body_json"])
    assert body["project"]["id"] == PROJECT
    body["project"]["total_annotations_number"] = total
    return body


async def send(scheduler: TrainingScheduler, body: dict[str, Any]) -> dict[str, Any]:
    return await scheduler.handle_event(body["action"], body["project"]["id"], body)


def test_the_captured_events_carry_label_studios_count() -> None:
    assert annotation_count(fixture("webhook-ANNOTATION_CREATED.json")["body_json"]) == 1
    assert annotation_count(fixture("webhook-ANNOTATIONS_DELETED.json")["body_json"]) == 4
    assert annotation_count({"project": {"id": 1}}) is None
    assert annotation_count({"project": {"id": 1, "total_annotations_number": True}}) is None
    assert crosses_multiple(9, 10, 5) and crosses_multiple(10, 9, 5) and crosses_multiple(8, 13, 5)
    assert not crosses_multiple(10, 11, 5) and not crosses_multiple(11, 14, 5)


def test_the_replica_that_gets_the_crossing_event_starts_the_run_exactly_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = replica(tmp_path, every=3), replica(tmp_path, every=3)
        answers = []
        for total in range(1, 10):  # round robin, as a Service spreads Label Studio's events
            answers.append(await send((a, b)[total % 2], event("ANNOTATION_CREATED", total)))
            if total % 3 == 0:
                await until(lambda n=total // 3: len(started(tmp_path)) == n)
                release(tmp_path, f"ft-{total // 3:04d}")
                owner = (a, b)[total % 2]
                await until(lambda s=owner: s.status()[str(PROJECT)]["active"] is None)
        assert [a_["status"] for a_ in answers] == ["ok", "ok", "started"] * 3
        assert [a_.get("annotations") for a_ in answers if a_["status"] == "ok"] == [1, 2, 4, 5, 7, 8]
        assert started(tmp_path) == ["ft-0001", "ft-0002", "ft-0003"]
        # 3 and 9 reached replica b (odd), 6 replica a: each started the run for the count it saw
        assert a.status()[str(PROJECT)]["runs_started"] == 1 and b.status()[str(PROJECT)]["runs_started"] == 2
        assert b.status()[str(PROJECT)]["label_studio_annotations"] == 9
        # a deletion that goes back below a multiple is a change of the labels too
        answer = await send(a, event("ANNOTATIONS_DELETED", 8))
        assert answer["status"] == "started"
        await until(lambda: len(started(tmp_path)) == 4)
        release(tmp_path, "ft-0004")
        await asyncio.sleep(0.3)
        assert len(started(tmp_path)) == 4
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_second_replica_seeing_the_same_count_starts_nothing(tmp_path: Path) -> None:
    """Label Studio saving two annotations at once can report the same count to both replicas."""

    async def scenario() -> None:
        a, b = replica(tmp_path, every=5), replica(tmp_path, every=5)
        first = await send(a, event("ANNOTATION_CREATED", 5))
        assert first["status"] == "started"
        await until(lambda: started(tmp_path) == ["ft-0001"])
        without_count = event("ANNOTATION_CREATED", 0)
        del without_count["project"]["total_annotations_number"]
        second = await send(b, without_count)
        assert second == {"status": "ok", "action": "ANNOTATION_CREATED", "updates": 1}  # b's own counter
        duplicate = await send(b, event("ANNOTATION_CREATED", 5))
        assert duplicate == {"status": "queued", "project": PROJECT, "job": first["job"]}
        state = b.status()[str(PROJECT)]
        assert state["active"]["job"] == first["job"] and not state["follow_up_pending"]
        await asyncio.sleep(0.5)
        assert started(tmp_path) == ["ft-0001"], "one process for the project"
        # a later crossing while the run is active is new work: exactly one follow-up
        later = await send(b, event("ANNOTATION_CREATED", 10))
        assert later["status"] == "queued" and b.status()[str(PROJECT)]["follow_up_pending"]
        release(tmp_path, "ft-0001")
        await until(lambda: started(tmp_path) == ["ft-0001", "ft-0002"])
        release(tmp_path, "ft-0002")
        await until(lambda: all(s.status()[str(PROJECT)]["active"] is None for s in (a, b)))
        await asyncio.sleep(0.3)
        assert started(tmp_path) == ["ft-0001", "ft-0002"]
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_updates_leave_the_count_alone_and_are_counted_by_their_replica(tmp_path: Path) -> None:
    async def scenario() -> None:
        a = replica(tmp_path, every=2)
        assert (await send(a, event("ANNOTATION_UPDATED", 5)))["status"] == "ok"
        assert (await send(a, event("ANNOTATION_UPDATED", 5)))["status"] == "started"
        await until(lambda: started(tmp_path) == ["ft-0001"])
        release(tmp_path, "ft-0001")
        await a.close()

    asyncio.run(scenario())
