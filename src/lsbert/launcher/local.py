"""Runs ``lsbert train`` as a child process of the predictor, its output kept in a log file.

Each run leaves ``<log_dir>/<project>/<version>.pid`` while it runs, so that a predictor restarted after a
crash (``kill -9``) adopts the run it left behind instead of starting a second one for the same project.
"""

from __future__ import annotations

import json
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
        self._adopted: dict[str, int] = {}  # run id -> pid of a run an earlier predictor process started

    def launch(self, project: int, version: str, args: list[str], *, trigger: str = "") -> Run:
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
        started = time.time()
        record = {"pid": proc.pid, "project": project, "version": version, "started_at": started, "log": str(path)}
        if trigger:
            record["trigger"] = trigger
        _pid_file(path).write_text(json.dumps(record))
        log.info("project %s: training run %s started (pid %s), log %s", project, version, proc.pid, path)
        return Run(project, version, run_id, RunPhase.RUNNING, started_at=started, log=str(path), trigger=trigger)

    def active_run(self, project: int) -> Optional[Run]:
        """This project's run still running, started by this process or adopted from an earlier one."""
        for run_id, proc in self._procs.items():
            if run_id.startswith(f"local-{project}-") and proc.poll() is None:
                return None  # the scheduler already follows its own child
        runs = self.active_runs(project)
        return runs[0] if runs else None

    def active_runs(self, project: Optional[int] = None) -> list[Run]:
        """Runs an earlier predictor process left running (found through their pid files); stale pid files
        are removed."""
        runs = []
        for pid_path in sorted(self.log_dir.glob(f"{'*' if project is None else project}/*.pid")):
            try:
                record = json.loads(pid_path.read_text())
                pid, owner, version = int(record["pid"]), int(record["project"]), str(record["version"])
            except (OSError, ValueError, KeyError, TypeError):
                pid_path.unlink(missing_ok=True)
                continue
            run_id = f"local-{owner}-{version}"
            if run_id in self._procs:
                continue
            if not _is_run(pid, owner, version):
                pid_path.unlink(missing_ok=True)
                continue
            if run_id not in self._adopted:
                log.info("project %s: adopting training run %s left running (pid %s)", owner, version, pid)
            self._adopted[run_id] = pid
            started = float(record.get("started_at") or time.time())
            trigger = record.get("trigger")
            runs.append(
                Run(
                    owner,
                    version,
                    run_id,
                    RunPhase.RUNNING,
                    started_at=started,
                    log=record.get("log"),
                    trigger=trigger if isinstance(trigger, str) else "",
                )
            )
        return runs

    def poll(self, run: Run) -> Run:
        if run.run_id in self._adopted and not run.phase.finished:
            pid = self._adopted[run.run_id]
            if _is_run(pid, run.project, run.version):
                return run
            # not this process's child: its exit code is unknown; the trainer ends a failed run with its reason
            self._adopted.pop(run.run_id, None)
            if run.log:
                _pid_file(Path(run.log)).unlink(missing_ok=True)
            run.finished_at = time.time()
            reason = _last_error(run.log)
            failed = any(word in reason.lower() for word in ("error", "failed", "traceback"))
            run.phase = RunPhase.FAILED if failed else RunPhase.SUCCEEDED
            run.message = f"adopted run ended: {reason}" if failed else ""
            return run
        proc = self._procs.get(run.run_id)
        if proc is None or run.phase.finished:
            return run
        code = proc.poll()
        if code is None:
            return run
        self._procs.pop(run.run_id, None)
        if run.log:
            _pid_file(Path(run.log)).unlink(missing_ok=True)
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
        for path in self.log_dir.glob("*/*.pid"):
            try:
                if int(json.loads(path.read_text())["pid"]) in {p.pid for p in self._procs.values()}:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self._procs.clear()


def _pid_file(log_path: Path) -> Path:
    return log_path.with_suffix(".pid")


def _is_run(pid: int, project: int, version: str) -> bool:
    """Whether ``pid`` is alive and is this run's trainer (not another process that reused the pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie has finished
            return False
    except (OSError, IndexError):
        pass
    args = [a.decode(errors="replace") for a in cmdline]
    return _after(args, "--project") == str(project) and _after(args, "--version") == version


def _after(args: list[str], flag: str) -> Optional[str]:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


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
