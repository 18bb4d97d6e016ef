"""Fixtures for the checkpoint store tests: a real S3-compatible server (moto_server as a subprocess) and
parametrization of every behaviour test over both stores."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from lsbert.store import CheckpointStore, open_store

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_child.py"
BUCKET = "lsbert-test"
# A distinctive secret, so the tests can check no error message ever carries it.
SECRET = "sEcReT-never-print-me-0123456789"
ACCESS_KEY = "AKIALSBERTTESTKEY"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen

    def env(self, access_key: str = ACCESS_KEY, secret: str = SECRET) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def start_moto(tmp_dir: Path, extra_env: Optional[dict[str, str]] = None) -> MotoServer:
    port = _free_port()
    env = dict(os.environ, **(extra_env or {}))
    log = open(tmp_dir / f"moto-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with {proc.returncode}: {(tmp_dir / f'moto-{port}.log').read_text()}"
            )
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_moto(proc)
                raise RuntimeError("moto_server did not come up in 30 s") from None
            time.sleep(0.1)
    return MotoServer(endpoint=endpoint, proc=proc)


def stop_moto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        import boto3

        env = server.env()
        boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        stop_moto(server.proc)


class ForkServer:
    """tests/store/_child.py serve: forks one child per request (see its docstring)."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "serve"],
            env=dict(os.environ, **env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, spec: dict[str, Any]) -> int:
        """Run one spec in a forked child; its exit code, or -signal if it was killed."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died ({self.proc.poll()})")
        return os.waitstatus_to_exitcode(json.loads(line)["status"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


class ForkServers:
    def __init__(self) -> None:
        self._servers: dict[str, ForkServer] = {}
        self._clients: dict[str, Any] = {}

    def get(self, kind: str, env: dict[str, str]) -> ForkServer:
        if kind not in self._servers:
            self._servers[kind] = ForkServer(env)
        return self._servers[kind]

    def s3_client(self, env: dict[str, str]) -> Any:
        """One boto3 client for the in-process S3 stores of the session (creating one costs ~0.4 s)."""
        if "s3" not in self._clients:
            from lsbert.store.s3util import make_client as _make_client

            self._clients["s3"] = _make_client()
        return self._clients["s3"]

    def close(self) -> None:
        for server in self._servers.values():
            server.close()


@pytest.fixture(scope="session")
def fork_servers() -> Iterator[ForkServers]:
    servers = ForkServers()
    yield servers
    servers.close()


@dataclass
class Backend:
    """One store location plus what a child process needs to open the same store."""

    kind: str
    uri: str
    cache_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    servers: Optional[ForkServers] = None

    def at(self, suffix: str) -> Backend:
        """Another, empty store location of the same kind."""
        return Backend(self.kind, f"{self.uri}-{suffix}", self.cache_dir / suffix, self.env, self.servers)

    def open(self, fresh: bool = False) -> CheckpointStore:
        """A new store instance on this location (for S3 on the session's shared client unless ``fresh``)."""
        if self.kind == "s3" and not fresh and self.servers is not None:
            from lsbert.store.s3 import S3Store

            return S3Store(self.uri, cache_dir=self.cache_dir, client=self.servers.s3_client(self.env))
        return open_store(self.uri, cache_dir=self.cache_dir)

    def forked(self, op: str, **args: Any) -> int:
        """Run ``op`` in a forked child of the fork server; its exit code or -signal."""
        assert self.servers is not None
        spec = {"uri": self.uri, "cache_dir": str(self.cache_dir), "op": op, **args}
        return self.servers.get(self.kind, self.env).run(spec)

    def popen(self, op: str, **args: Any) -> subprocess.Popen:
        """Start ``op`` in a fresh interpreter (python tests/store/_child.py '<spec>'); prints JSON."""
        spec = {"uri": self.uri, "cache_dir": str(self.cache_dir), "op": op, **args}
        env = dict(os.environ, **self.env)
        return subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(spec)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_SESSION_TOKEN", "S3_ADDRESSING_STYLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork_servers: ForkServers
) -> Backend:
    server: MotoServer = request.getfixturevalue("moto")
    env = server.env()
    _s3_env(monkeypatch, env)
    return Backend("s3", f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}/models", tmp_path / "cache", env, fork_servers)


@pytest.fixture
def local_backend(tmp_path: Path, fork_servers: ForkServers) -> Backend:
    return Backend("local", str(tmp_path / "pvc" / "models"), tmp_path / "cache", {}, fork_servers)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A small save_pretrained-like directory: nested files, a binary blob, an empty file."""
    src = tmp_path / "checkpoint"
    (src / "tokenizer").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    (src / "model.safetensors").write_bytes(os.urandom(150_000))
    (src / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (src / "empty.txt").write_bytes(b"")
    return src


def tree_bytes(path: Path) -> dict[str, bytes]:
    """relpath → bytes of every regular file under ``path`` except lsbert.json and hidden temp files."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "lsbert.json" and not p.name.startswith(".")
    }
