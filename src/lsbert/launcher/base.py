"""Launchers start one training run (``lsbert train``) somewhere else than the predictor process: a local
subprocess, or a Kubernetes Job on a GPU node. The scheduler decides when; a launcher decides where."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional


class RunPhase(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunPhase.SUCCEEDED, RunPhase.FAILED)


@dataclass
class Run:
    """One training run of one project; ``run_id`` is what Label Studio gets back as ``job``."""

    project: int
    version: str
    run_id: str
    phase: RunPhase = RunPhase.PENDING
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    message: str = ""  # why it failed, in a line
    log: Optional[str] = None  # where to read its log (a path, or `kubectl logs job/<name>`)
    extra: dict = field(default_factory=dict)
    # What asked for the run, when it can be told apart from a later request: "annotations=<n>" for a run
    # started when Label Studio's annotation count of the project reached n. Kept with the run (pid file,
    # Job annotation), so that another replica seeing the same count knows the run is already there.
    trigger: str = ""

    def as_dict(self) -> dict:
        return {
            "project": self.project,
            "version": self.version,
            "job": self.run_id,
            "phase": self.phase.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "message": self.message,
            "log": self.log,
        }


class LaunchError(RuntimeError):
    pass


class Launcher(ABC):
    @abstractmethod
    def launch(self, project: int, version: str, args: list[str], *, trigger: str = "") -> Run:
        """Start ``lsbert train --project P --version V *args``; return at once. ``trigger`` is kept with
        the run (see ``Run.trigger``)."""

    @abstractmethod
    def poll(self, run: Run) -> Run:
        """Refresh the run's phase (and message on failure)."""

    def active_run(self, project: int) -> Optional[Run]:
        """A run of this project still pending or running, as the launcher's backend knows it (so a
        restarted predictor adopts it instead of starting a duplicate). Default: none known."""
        return None

    def close(self) -> None:
        """Stop watching; a local launcher also stops its children."""
