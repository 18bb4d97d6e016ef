"""Fit events → training runs: at most one run per project, triggers during a run collapse into exactly one
follow-up. Runs are real child processes (tests/launcher/gate.py) started by the real LocalLauncher."""

import asyncio
import sys
from pathlib import Path

from lsbert.launcher.base import RunPhase
from lsbert.launcher.local import LocalLauncher
from lsbert.launcher.scheduler import TrainingScheduler
from lsbert.store.local import LocalStore
from tests.support.polling import until

GATE = Path(__file__).with_name("gate.py")


def make(tmp_path: Path, every: int = 10, fail: bool = False, finished=None) -> TrainingScheduler:
    command = [sys.executable, str(GATE), str(tmp_path)]
    launcher = LocalLauncher(tmp_path / "logs", command=command)
    store = LocalStore(tmp_path / "store")
    return TrainingScheduler(
        launcher,
        store,
        every_n_updates=every,
        version_name="ft",
        poll_seconds=0.05,
        train_args=["--fail"] if fail else [],
        on_finished=finished,
    )


def started(tmp_path: Path) -> list[str]:
    return sorted(p.name.removeprefix("started-").rsplit("-p", 1)[0] for p in tmp_path.glob("started-*"))


def release(tmp_path: Path, version: str) -> None:
    (tmp_path / f"release-{version}").write_text("")


def annotation(project=3):
    return {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": project}}


def test_fifty_events_and_five_presses_during_a_run_give_one_follow_up(tmp_path):
    finished = []

    async def on_finished(project, run):
        finished.append((project, run.version, run.phase))

    async def scenario():
        scheduler = make(tmp_path, every=10, finished=on_finished)
        answers = await asyncio.gather(
            *(scheduler.handle_event("ANNOTATION_CREATED", 3, annotation()) for _ in range(50))
        )
        await until(lambda: len(started(tmp_path)) == 1)
        assert sum(1 for a in answers if a.get("status") == "started") == 1
        assert sum(1 for a in answers if a.get("status") == "queued") == 4  # the other 4 multiples of 10
        presses = await asyncio.gather(
            *(scheduler.handle_event("START_TRAINING", 3, {"project": {"id": 3}}) for _ in range(5))
        )
        assert all(p["status"] == "queued" and p["job"] == "local-3-ft-0001" for p in presses)
        await asyncio.sleep(0.5)
        assert started(tmp_path) == ["ft-0001"]
        release(tmp_path, "ft-0001")
        await until(lambda: len(started(tmp_path)) == 2)
        assert started(tmp_path) == ["ft-0001", "ft-0002"]
        release(tmp_path, "ft-0002")
        await until(lambda: len(finished) == 2)
        await asyncio.sleep(0.5)
        assert started(tmp_path) == ["ft-0001", "ft-0002"]  # nothing more
        assert [f[1] for f in finished] == ["ft-0001", "ft-0002"]
        status = scheduler.status()["3"]
        assert status["runs_started"] == 2 and status["active"] is None and not status["follow_up_pending"]
        assert status["last"]["phase"] == "succeeded"
        await scheduler.close()

    asyncio.run(scenario())


def test_updates_below_the_threshold_do_not_train_and_deletes_count(tmp_path):
    async def scenario():
        scheduler = make(tmp_path, every=5)
        for _ in range(3):
            assert (await scheduler.handle_event("ANNOTATION_UPDATED", 4, annotation(4)))["status"] == "ok"
        await asyncio.sleep(0.3)
        assert started(tmp_path) == []
        answer = await scheduler.handle_event(
            "ANNOTATIONS_DELETED", 4, {"annotations": [{"id": 1}, {"id": 2}], "project": {"id": 4}}
        )
        assert answer["status"] == "started"
        await until(lambda: started(tmp_path) == ["ft-0001"])
        release(tmp_path, "ft-0001")
        await scheduler.close()

    asyncio.run(scenario())


def test_projects_train_independently_and_unknown_events_are_ignored(tmp_path):
    async def scenario():
        scheduler = make(tmp_path, every=0)
        assert (await scheduler.handle_event("TASKS_CREATED", 1, {}))["status"] == "ignored"
        assert (await scheduler.handle_event("ANNOTATION_CREATED", 1, annotation(1)))[
            "status"
        ] == "ok"  # every=0: never
        a = await scheduler.handle_event("START_TRAINING", 1, {})
        b = await scheduler.handle_event("START_TRAINING", 2, {})
        assert a["status"] == b["status"] == "started"
        await until(lambda: len(started(tmp_path)) == 2)
        assert sorted(p.read_text() for p in tmp_path.glob("started-*")) == ["1", "2"]
        for version in started(tmp_path):
            release(tmp_path, version)
        await scheduler.close()

    asyncio.run(scenario())


def test_a_failed_run_is_reported_with_its_reason(tmp_path):
    async def scenario():
        scheduler = make(tmp_path, fail=True)
        await scheduler.handle_event("START_TRAINING", 5, {})
        await until(lambda: started(tmp_path) == ["ft-0001"])
        release(tmp_path, "ft-0001")
        await until(lambda: scheduler.status()["5"]["last"] is not None)
        last = scheduler.status()["5"]["last"]
        assert last["phase"] == RunPhase.FAILED.value
        assert "exit code 1" in last["message"] and "no labelled tasks" in last["message"]
        await scheduler.close()

    asyncio.run(scenario())


def test_close_stops_running_children(tmp_path):
    async def scenario():
        scheduler = make(tmp_path)
        await scheduler.handle_event("START_TRAINING", 6, {})
        await until(lambda: started(tmp_path) == ["ft-0001"])
        proc = next(iter(scheduler.launcher._procs.values()))
        await scheduler.close()
        assert proc.poll() is not None

    asyncio.run(scenario())
