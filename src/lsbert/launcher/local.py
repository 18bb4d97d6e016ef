"""Runs ``lsbert train`` as a child process of the predictor, its output kept in a log file."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from lsbert.launcher.base import Launcher, LaunchError, Run, RunPhase

log = logging.getLogger(__name__)


class LocalLauncher(Launcher):
    def __init__(self, log_dir: Path, env: Optional[dict[str, str]] = None, command: Optional[list[str]] = None):
        self.log_dir = Path(log_dir)
        self.env = env
        # The trainer command; ``--project P --version V`` and the run's arguments are appended.
        self.command = list(command or [sys.executable, "-m", "lsbert", "train"])
        self._procs: dict[str, subprocess.Popen] = {}

    def launch(self, project: int, version: str, args: list[str]) -> Run:
        run_id = f"local-{project}-{version}"
        path = self.log_dir / str(project) / f"{version}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [*self.command, "--project", str(project), "--version", version, *args]
        env = dict(self.env if self.env is not None else os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            with open(path, "ab") as out:
                proc = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(f"cannot start the training process: {exc}") from None
        self._procs[run_id] = proc
        log.info("project %s: training run %s started (pid %s), log %s", project, version, proc.pid, path)
        return Run(project, version, run_id, RunPhase.RUNNING, started_at=time.time(), log=str(path))

    def poll(self, run: Run) -> Run:
        proc = self._procs.get(run.run_id)
        if proc is None or run.phase.finished:
            return run
        code = proc.poll()
        if code is None:
            return run
        self._procs.pop(run.run_id, None)
        run.finished_at = time.time()
        if code == 0:
            run.phase = RunPhase.SUCCEEDED
        else:
            run.phase = RunPhase.FAILED
            run.message = f"exit code {code}: {_last_error(run.log)}"
        return run

    def close(self) -> None:
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in list(self._procs.values()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self._procs.clear()


def _last_error(path: Optional[str]) -> str:
    """The last non-empty line of the run's log: the trainer ends a failed run with a one-line reason."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
