"""One way for tests to wait: poll a condition until it holds, or fail naming what never happened.

``wait_until`` for plain code, ``until`` inside a coroutine (it yields to the event loop between polls).
Both return the first truthy value of ``predicate``. Exceptions from ``predicate`` propagate, except those
listed in ``ignore`` (transient API errors, say): polling goes on through them, and the last one is named
if time runs out. A time-out raises :class:`WaitTimeout`, both an ``AssertionError`` (a failed test) and a
``TimeoutError`` (for callers that wait on something that may legitimately never happen).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional


class WaitTimeout(AssertionError, TimeoutError):
    """A condition polled by ``wait_until``/``until`` did not hold in time."""


def _timeout(what: str, timeout: float, last: Optional[BaseException]) -> WaitTimeout:
    extra = f" (last error: {last!r})" if last is not None else ""
    return WaitTimeout(f"{what} not reached within {timeout:g} s{extra}")


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "the condition",
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last, value = exc, None
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timeout(what, timeout, last)
        time.sleep(interval)


async def until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "the condition",
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last, value = exc, None
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timeout(what, timeout, last)
        await asyncio.sleep(interval)
