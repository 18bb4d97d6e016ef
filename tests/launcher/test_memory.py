"""Training is bounded across projects: 12 Start Training webhooks for 12 projects against a live
``lsbert serve`` with the local launcher keep the predictor and its training children under 3 GB of RSS.

Each run is a real ``lsbert train`` process that reads its annotations from a Label Studio URL where nothing
listens, so it fails. Two things keep the total bounded, and the test checks both: MAX_CONCURRENT_TRAINING_RUNS
(2 here) caps the children alive at once, and a run loads torch and transformers (~650 MB of RSS each) only
once it has its data, so runs that cannot get any stay small and end in about a second. RSS is read from /proc
for the server and every descendant, summed (shared pages counted once per process: an upper bound).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.conftest import free_port

PROJECTS = range(1, 13)
CONCURRENT_RUNS = 2
LIMIT_BYTES = 3 * 1024**3
HEALTH_BUDGET_S = 1.0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(RSS of ``root`` and all its descendants in bytes, number of descendants)."""
    tree, total, count, todo = _children(), 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss(pid)
        kids = tree.get(pid, [])
        count += len(kids)
        todo.extend(kids)
    return total, count


def test_twelve_projects_training_stay_under_3_gb(server_factory) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # no Label Studio: every run fails after its start-up
    server = server_factory(
        {
            "TRAINING_LAUNCHER": "local",
            "LABEL_STUDIO_URL": nowhere,
            "LABEL_STUDIO_API_KEY": "memory-test-key",
            "MAX_CONCURRENT_TRAINING_RUNS": str(CONCURRENT_RUNS),
        },
        name="memory",
    )
    pid = server.proc.pid
    idle, _ = tree_rss(pid)
    peak, peak_children, slowest_health = idle, 0, 0.0
    for project in PROJECTS:
        body = {"action": "START_TRAINING", "project": {"id": project}}
        response = requests.post(server.url + "/webhook", data=json.dumps(body), timeout=10)
        assert response.status_code == 200 and response.json()["status"] in ("started", "queued", "accepted")
    deadline = time.monotonic() + 600
    while True:
        rss, children = tree_rss(pid)
        peak, peak_children = max(peak, rss), max(peak_children, children)
        started = time.perf_counter()
        training = requests.get(server.url + "/health", timeout=10).json()["training"]
        slowest_health = max(slowest_health, time.perf_counter() - started)
        if len(training) == len(PROJECTS) and all(t["last"] and not t["active"] for t in training.values()):
            break
        assert time.monotonic() < deadline, f"runs still going after 600 s: {training}"
        time.sleep(0.2)
    print(
        f"\ntraining memory: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB (predictor + children), "
        f"at most {peak_children} child processes at once, slowest /health {slowest_health * 1000:.0f} ms"
    )
    assert all(t["runs_started"] == 1 and t["last"]["phase"] == "failed" for t in training.values())
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**30:.2f} GiB"
    assert 1 <= peak_children <= CONCURRENT_RUNS, f"{peak_children} training processes alive at once"
    assert slowest_health < HEALTH_BUDGET_S
