"""Keeps torch off the event loop: one worker thread runs every forward pass, and requests that queue up
while it is busy are merged into one batch (opportunistic micro-batching, no added wait when idle).
Large requests are cut into chunks so that a 10,000-task request does not starve single-task ones."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

from lsbert import metrics

log = logging.getLogger(__name__)

CHUNK = 256  # texts per queued job
INTERACTIVE, BULK = 0, 1  # queue priorities


@dataclass
class _Job:
    key: Hashable
    texts: list[str]
    run: Callable[[Sequence[str]], np.ndarray]
    future: asyncio.Future = field(repr=False)


class InferenceQueue:
    def __init__(self, max_batch: int = 256):
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbert-infer")
        self._queue: asyncio.PriorityQueue[tuple[int, int, _Job]] | None = None
        self._seq = 0
        self._worker: asyncio.Task | None = None

    def _ensure_worker(self) -> asyncio.PriorityQueue:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.PriorityQueue()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="lsbert-inference")
        return self._queue

    async def run(
        self,
        key: Hashable,
        texts: Sequence[str],
        run: Callable[[Sequence[str]], np.ndarray],
        priority: Optional[int] = None,
    ) -> np.ndarray:
        """Compute ``run(texts)`` on the worker thread; jobs with the same ``key`` may share a forward pass.

        A request that fits in one chunk (what Label Studio sends when an annotator opens a task) is
        interactive and goes before the chunks of bulk requests; within a class, arrival order. ``priority``
        (``BULK``) overrides that for work nobody is waiting on interactively."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        queue = self._ensure_worker()
        loop = asyncio.get_running_loop()
        if priority is None:
            priority = INTERACTIVE if len(texts) <= CHUNK else BULK
        futures = []
        for start in range(0, len(texts), CHUNK):
            future = loop.create_future()
            self._seq += 1
            queue.put_nowait((priority, self._seq, _Job(key, list(texts[start : start + CHUNK]), run, future)))
            futures.append(future)
        parts = await asyncio.gather(*futures)
        return np.concatenate(parts, axis=0)

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None  # _ensure_worker creates the queue before the worker
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            job = first[2]
            group = [job]
            size = len(job.texts)
            # Merge what else is waiting for the same model, in priority and arrival order; the rest goes
            # back into the queue with its place kept.
            skipped = []
            while not queue.empty() and size < self.max_batch:
                item = queue.get_nowait()
                other = item[2]
                if other.key == job.key and size + len(other.texts) <= self.max_batch:
                    group.append(other)
                    size += len(other.texts)
                else:
                    skipped.append(item)
            for item in skipped:
                queue.put_nowait(item)
            group = [g for g in group if not g.future.cancelled()]
            if not group:
                continue
            await self._run_group(loop, group)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[_Job]) -> None:
        """One forward pass for the group; if it fails, each job is run alone, so that only the request
        whose input cannot be processed gets the error and every other one its answer."""
        texts = [t for g in group for t in g.texts]
        metrics.BATCH_SIZE.observe(len(texts))
        try:
            out = await loop.run_in_executor(self._executor, group[0].run, texts)
        except Exception as exc:
            if len(group) > 1:
                log.warning("a merged pass of %d requests failed (%s); running them one by one", len(group), exc)
                for g in group:
                    if not g.future.done():
                        await self._run_group(loop, [g])
                return
            if not group[0].future.done():  # surfaced to the waiting request, which decides what it means
                group[0].future.set_exception(exc)
            return
        offset = 0
        for g in group:
            if not g.future.done():
                g.future.set_result(out[offset : offset + len(g.texts)])
            offset += len(g.texts)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
