"""One way for tests to wait: poll a condition until it holds, or fail naming what never happened.

``wait_until`` for plain code, ``until`` inside a coroutine (it yields to the event loop between polls).
Both return the first truthy value of ``predicate``; exceptions from ``predicate`` propagate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


async def until(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await asyncio.sleep(interval)
