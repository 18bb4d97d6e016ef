"""Run a real Label Studio 1.23.2 for integration tests.

Label Studio lives in its own virtualenv outside the repo (``tests/support/install-labelstudio.sh``,
default ``~/.cache/lsbert/label-studio-1.23.2``); the fixture installs it on first use.

Usage from the root conftest::

    pytest_plugins = ["tests.support.labelstudio"]

    def test_something(label_studio):           # session-scoped, already started
        ls = label_studio.client()              # label_studio_sdk.LabelStudio
        project = create_text_project(ls, "demo", ["Positive", "Negative"])
        task_ids = import_texts(ls, project.id, ["good", "bad"])
        backend = connect_backend(label_studio, project.id, "http://127.0.0.1:9090")

Standalone::

    with LabelStudio(extra_env={"ML_TIMEOUT_PREDICT": "5"}) as ls:
        print(ls.url, ls.token)

Environment knobs:

* ``LSBERT_CACHE``            — cache root used by the install script (default ``~/.cache/lsbert``).
* ``LSBERT_LABEL_STUDIO_BIN`` — use this ``label-studio`` executable instead (skips the install).
* ``LSBERT_KEEP_LS=1``        — keep the data dir and log after stopping (for debugging).
* ``LSBERT_LS_FRESH_DB=1``    — run all migrations at every start instead of copying the cached
  migrated-but-empty database (see :func:`template_db`).
* ``LSBERT_LS_STARTUP_TIMEOUT`` — seconds the fixture waits for readiness (default 300).

Start cost: a truly cold start (fresh data dir, ~400 migrations) takes 30-70 s on 2 cores, more under
load.  Most of it is the migrations, so the first start also saves the migrated, still *empty*
database (no user, no organization) under the cache dir; later starts copy it into their fresh data
dir and only create the admin user + organization, which keeps G1/G11 intact (legacy-token flag and
our random token are applied at that first user/org creation).

See the reference ``label-studio-protocol.md`` §12 for why each setting is there (G1–G3, G9, G11).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
import requests

__all__ = [
    "LS_VERSION",
    "LabelStudio",
    "LabelStudioError",
    "connect_backend",
    "create_text_project",
    "ensure_label_studio",
    "import_texts",
    "label_studio",
    "template_db",
    "text_label_config",
]

LS_VERSION = "1.23.2"
INSTALL_SCRIPT = Path(__file__).with_name("install-labelstudio.sh")

# Variables that must not leak into Label Studio's environment: un-prefixed names LS also reads (G9),
# and anything that would point it at another database/settings/interpreter.
_STRIP_ENV = (
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
    "USER_TOKEN",
    "DJANGO_DB",
    "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
)
_PORT_MOVED_MARKER = "is in use."  # LS prints "* Port N is in use.\n* Trying to start at N+1" and moves on


class LabelStudioError(RuntimeError):
    """Label Studio failed to install/start/answer; the message carries the log tail."""


def cache_dir() -> Path:
    return Path(os.environ.get("LSBERT_CACHE") or Path.home() / ".cache" / "lsbert")


def venv_dir() -> Path:
    return cache_dir() / f"label-studio-{LS_VERSION}"


def ensure_label_studio(install: bool = True) -> Path:
    """Return the path of the ``label-studio`` executable, running the (idempotent) installer if needed."""
    override = os.environ.get("LSBERT_LABEL_STUDIO_BIN")
    if override:
        return Path(override)
    venv = venv_dir()
    exe = venv / "bin" / "label-studio"
    if exe.exists() and (venv / ".lsbert-installed").exists():
        return exe
    if not install:
        raise LabelStudioError(f"Label Studio is not installed at {venv}; run {INSTALL_SCRIPT}")
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabelStudioError(
            f"{INSTALL_SCRIPT} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}{proc.stdout[-1000:]}"
        )
    python = Path(proc.stdout.strip().splitlines()[-1])
    return python.with_name("label-studio")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nobody listens on right now (and that LS, which probes ``localhost``, sees free)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if _port_is_free(host, port) and _port_is_free("localhost", port):
            return port
    raise LabelStudioError("could not find a free port")


def _ls_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (base or os.environ).items() if k not in _STRIP_ENV and not k.startswith("LABEL_STUDIO_")}
    env.update(LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false", PYTHONUNBUFFERED="1")
    return env


def template_db(executable: str | os.PathLike[str] | None = None, timeout: float = 600.0) -> Path:
    """The cached, fully migrated, empty (no user/organization) LS database; built once, under a lock.

    Built with ``label-studio version``, which applies all migrations and exits without creating a user.
    """
    target = cache_dir() / f"label-studio-{LS_VERSION}-db" / "label_studio.sqlite3"
    if target.is_file():
        return target
    exe = Path(executable) if executable else ensure_label_studio()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
        try:
            env = _ls_env()
            env["LABEL_STUDIO_BASE_DATA_DIR"] = str(tmp)
            proc = subprocess.run(
                [str(exe), "version"],
                cwd=str(tmp),
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            db = tmp / "label_studio.sqlite3"
            if proc.returncode != 0 or not db.is_file():
                raise LabelStudioError(
                    f"migrating a template database failed (rc={proc.returncode}):\n"
                    f"{(proc.stdout + proc.stderr)[-4000:]}"
                )
            with sqlite3.connect(db) as con:  # must be empty: the user/org are created per instance
                users = con.execute("select count(*) from htx_user").fetchone()[0]
                orgs = con.execute("select count(*) from organization").fetchone()[0]
            if users or orgs:
                raise LabelStudioError(f"template database unexpectedly has {users} users / {orgs} orgs")
            os.replace(db, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class LabelStudio:
    """A Label Studio server process with a fresh data dir, an admin user and a legacy API token.

    Attributes (valid after :meth:`start`): ``url``, ``token`` (legacy DRF token), ``username``,
    ``password``, ``log_path``, ``data_dir``, ``port``, ``startup_seconds`` (time to ready).
    """

    def __init__(
        self,
        *,
        extra_env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        username: str = "admin@example.com",
        password: str | None = None,
        startup_timeout: float = 300.0,
        executable: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        fresh_db: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password or "pw-" + secrets.token_hex(8)
        self.token = secrets.token_hex(20)
        self.extra_env = {k: str(v) for k, v in (extra_env or {}).items()}
        self.startup_timeout = startup_timeout
        self.executable = Path(executable) if executable else None
        self._workdir = Path(workdir) if workdir else None
        self._own_workdir = workdir is None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None
        self._pat: str | None = None
        self._failed = False
        if fresh_db is None:
            fresh_db = os.environ.get("LSBERT_LS_FRESH_DB", "") not in ("", "0", "false")
        self.fresh_db = fresh_db

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self.port is None:
            raise LabelStudioError("Label Studio is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _env(self) -> dict[str, str]:
        env = _ls_env()
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),  # G9: never ~/.local/share/label-studio
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # G1: read only when the org is created
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            LABEL_STUDIO_HOST=self.url,  # hostname LS sends to backends in /setup
            ML_BLOCK_LOCAL_IP="false",  # G2: 127.0.0.1 backends
            SSRF_PROTECTION_ENABLED="false",  # G3: /webhook registration to local backends
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudio:
        if self.running:
            return self
        exe = self.executable or ensure_label_studio()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="lsbert-labelstudio-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self._workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = self._workdir / "label-studio.log"
        atexit.register(self.stop)
        t0 = time.monotonic()
        db = self.data_dir / "label_studio.sqlite3"
        if not self.fresh_db and not db.exists():
            try:
                shutil.copyfile(template_db(exe, timeout=self.startup_timeout), db)
            except subprocess.TimeoutExpired as exc:
                raise LabelStudioError(f"migrating the template database took over {exc.timeout:.0f} s") from exc
        deadline = time.monotonic() + self.startup_timeout
        explicit_port = self.port is not None
        # A fresh DB means ~400 migrations before LS even checks its port.  If the port was taken
        # meanwhile, LS silently moves to the next one; we then restart on a new port with the same
        # (now migrated) data dir.
        for _attempt in range(3):
            if not explicit_port:
                self.port = free_port(self.host)
            elif not _port_is_free(self.host, self.port):
                raise LabelStudioError(f"port {self.port} on {self.host} is already in use")
            self._spawn(exe)
            if self._wait_ready(deadline):
                self.startup_seconds = time.monotonic() - t0
                return self
            self._terminate()
            if explicit_port:
                break
        self._fail(f"Label Studio kept moving off its port (another process took it); last port {self.port}")
        raise AssertionError("unreachable")

    def _spawn(self, exe: Path) -> None:
        self._log_fh = open(self.log_path, "ab")
        cmd = [str(exe), "start", "--no-browser", "--internal-host", self.host, "--port", str(self.port)]
        self._log_fh.write(f"\n=== lsbert: {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=str(self._workdir),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the whole group
        )

    def _port_moved(self) -> bool:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        last_run = text.rsplit("=== lsbert:", 1)[-1]
        return _PORT_MOVED_MARKER in last_run

    def _wait_ready(self, deadline: float) -> bool:
        """True once /health is UP and our token works; False if LS moved to another port."""
        health = f"{self.url}/health"
        while True:
            if self._proc.poll() is not None:
                self._fail(f"Label Studio exited with code {self._proc.returncode} before it was ready")
            if self._port_moved():
                return False
            try:
                r = requests.get(health, timeout=5)
                if r.status_code == 200:
                    if self._port_moved():  # that answer came from someone else
                        return False
                    who = requests.get(f"{self.url}/api/current-user/whoami", headers=self.auth_headers, timeout=10)
                    if who.status_code == 200:
                        return True
                    if who.status_code in (401, 403):
                        self._fail(f"/health is UP but the legacy token is refused: {who.status_code} {who.text[:500]}")
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self._fail(f"Label Studio not ready at {health} after {self.startup_timeout:.0f} s")
            time.sleep(0.5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, message: str) -> None:
        tail = self.log_tail()
        self._failed = True  # keep the work dir (log + data) for a post-mortem
        self._terminate()
        raise LabelStudioError(f"{message}\n--- {self.log_path} (tail) ---\n{tail}")

    def _terminate(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                    try:
                        os.killpg(pgid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=wait)
                    except subprocess.TimeoutExpired:
                        continue
                    # the leader is gone; make sure nothing else of the group survives
                    if not _group_alive(pgid):
                        break
            proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 20 s; remove the work dir (data + log) unless it
        failed to start or ``LSBERT_KEEP_LS=1``."""
        self._terminate()
        keep = self._failed or os.environ.get("LSBERT_KEEP_LS")
        if self._own_workdir and self._workdir is not None and not keep:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LabelStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LabelStudio {LS_VERSION} {self.url if self.port else ''} {state}>"

    # ----------------------------------------------------------------------------- API access
    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def client(self, api_key: str | None = None, **kwargs: Any):
        """``label_studio_sdk.LabelStudio`` for this server (legacy token unless ``api_key`` is given)."""
        from label_studio_sdk import LabelStudio as SDK

        return SDK(base_url=self.url, api_key=api_key or self.token, **kwargs)

    def request(
        self, method: str, path: str, *, expected: Iterable[int] | None = None, timeout: float = 60, **kwargs: Any
    ) -> requests.Response:
        """REST call with the legacy token; raises :class:`LabelStudioError` (with the body) on non-2xx."""
        headers = {**self.auth_headers, **kwargs.pop("headers", {})}
        r = requests.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)
        ok = r.status_code in set(expected) if expected is not None else 200 <= r.status_code < 300
        if not ok:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r

    def create_personal_access_token(self) -> str:
        """A Personal Access Token (JWT refresh token) of the admin user, via ``POST /api/token/``.

        LS shows a PAT once and refuses a second one (409) while it is valid, so it is cached here.
        Use it as ``label_studio_sdk.LabelStudio(base_url=url, api_key=pat)``.
        """
        if self._pat is None:
            self._pat = self.request("POST", "/api/token/").json()["token"]
        return self._pat


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------- helpers
def text_label_config(
    labels: Sequence[str],
    choice: str = "single",
    text_key: str = "text",
    *,
    from_name: str = "label",
    to_name: str = "text",
) -> str:
    """``<View><Text/><Choices/></View>`` for text classification; ``choice`` is "single" or "multiple"."""
    if choice not in ("single", "multiple"):
        raise ValueError(f"choice must be 'single' or 'multiple', got {choice!r}")
    if not labels:
        raise ValueError("labels must not be empty")
    options = "\n".join(f"    <Choice value={quoteattr(str(label))}/>" for label in labels)
    return (
        "<View>\n"
        f"  <Text name={quoteattr(to_name)} value={quoteattr('$' + text_key)}/>\n"
        f"  <Choices name={quoteattr(from_name)} toName={quoteattr(to_name)} choice={quoteattr(choice)}>\n"
        f"{options}\n"
        "  </Choices>\n"
        "</View>"
    )


def create_text_project(
    client,
    title: str,
    labels: Sequence[str],
    choice: str = "single",
    text_key: str = "text",
    *,
    from_name: str = "label",
    to_name: str = "text",
    **fields: Any,
):
    """Create a text-classification project through the SDK; returns the SDK project object.

    LS requires ``title`` to be at least 3 characters.  ``fields`` go to ``client.projects.create``.
    """
    config = text_label_config(labels, choice, text_key, from_name=from_name, to_name=to_name)
    return client.projects.create(title=title, label_config=config, **fields)


def import_texts(
    client, project_id: int, texts: Iterable[str | Mapping[str, Any]], text_key: str = "text"
) -> list[int]:
    """Import tasks (strings become ``{text_key: s}``, mappings are task data as-is); returns the task ids."""
    tasks = [dict(t) if isinstance(t, Mapping) else {text_key: t} for t in texts]
    resp = client.projects.import_tasks(id=project_id, request=tasks, return_task_ids=True)
    task_ids = getattr(resp, "task_ids", None)
    if task_ids is None:
        task_ids = (getattr(resp, "model_extra", None) or {}).get("task_ids")
    if task_ids is None or len(task_ids) != len(tasks):
        raise LabelStudioError(f"import into project {project_id} returned no/odd task ids: {resp!r}")
    return list(task_ids)


def connect_backend(
    ls: LabelStudio,
    project_id: int,
    url: str,
    *,
    title: str = "lsbert",
    is_interactive: bool = False,
    timeout: float = 120,
    **auth: Any,
) -> dict[str, Any]:
    """``POST /api/ml/`` — connect an ML backend to a project; returns the ml_backend JSON.

    ``auth`` goes into the body as-is, e.g. ``auth_method="BASIC_AUTH", basic_auth_user="u",
    basic_auth_pass="p"`` (or ``extra_params=...``).  Raises :class:`LabelStudioError` with the
    response body on a non-2xx answer (LS calls health+setup on the backend before answering).
    """
    body = {"project": project_id, "url": url, "title": title, "is_interactive": is_interactive, **auth}
    return ls.request("POST", "/api/ml/", json=body, timeout=timeout).json()


# ------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="session")
def label_studio() -> Iterator[LabelStudio]:
    """A started Label Studio for the whole session (installs it on first use; see the module doc for timings)."""
    server = LabelStudio(startup_timeout=float(os.environ.get("LSBERT_LS_STARTUP_TIMEOUT", "300")))
    try:
        server.start()
    except LabelStudioError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
