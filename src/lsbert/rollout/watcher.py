"""Rolls the predictor to newly promoted checkpoints: a periodic check of each project's pointer, and an
immediate one when a run this process launched finishes. The new model is loaded and warmed up in the
background, then swapped in with one assignment, so no request fails or sees a mix."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Protocol

from lsbert.store import CheckpointStore

log = logging.getLogger(__name__)


class LoadedModel(Protocol):
    @property
    def version(self) -> str: ...


class ServingModels(Protocol):
    """What the watcher needs of the predictor's model registry (``lsbert.predictor.registry.ModelRegistry``)."""

    @property
    def max_loaded(self) -> int: ...

    def set_pointer(self, project: int, version: Optional[str]) -> None: ...

    def loaded(self, project: int) -> Optional[LoadedModel]: ...

    def spec(self, project: int) -> Optional[Any]: ...

    def known_projects(self) -> list[int]: ...

    async def ensure_loaded(self, project: int, version: str) -> Any: ...

    def load_due(self, project: int, version: str) -> bool: ...


class RolloutWatcher:
    def __init__(self, registry: ServingModels, store: CheckpointStore, interval: float):
        self.registry = registry
        self.store = store
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    async def check(self, project: int, preload: bool = False) -> Optional[str]:
        """Read the project's pointer; load and swap if the project is in use here (or ``preload``)."""
        try:
            version = await asyncio.to_thread(self.store.promoted, project)
        except Exception as exc:
            log.warning("project %s: cannot read the promoted version: %s", project, exc)
            return None
        self.registry.set_pointer(project, version)
        loaded = self.registry.loaded(project)
        in_use = preload or loaded is not None or self.registry.spec(project) is not None
        due = version is not None and self.registry.load_due(project, version)
        if version and due and in_use and (loaded is None or loaded.version != version):
            try:
                await self.registry.ensure_loaded(project, version)
            except Exception as exc:
                log.warning(
                    "project %s: cannot roll to %s: %s; still serving %s",
                    project,
                    version,
                    exc,
                    loaded.version if loaded else "the zero-shot baseline",
                )
        return version

    async def check_all(self, preload: bool = False) -> None:
        try:
            stored = await asyncio.to_thread(self.store.projects)
        except Exception as exc:
            log.warning("cannot list the checkpoint store: %s", exc)
            stored = []
        projects = sorted(set(stored) | set(self.registry.known_projects()))
        budget = self.registry.max_loaded
        for project in projects:
            wants_preload = preload and budget > 0
            await self.check(project, preload=wants_preload)
            if wants_preload and self.registry.loaded(project) is not None:
                budget -= 1

    async def notify(self, project: int, *_args) -> None:
        await self.check(project)

    async def run_forever(self, preload: bool = True) -> None:
        await self.check_all(preload=preload)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.check_all()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run_forever(), name="lsbert-rollout")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
