"""Running one source alone on the real kernel, for the per-source live tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from fsnotifyd.errors import SourceUnavailable
from fsnotifyd.events import Observation
from fsnotifyd.typing import Source
from tests.conftest import kernel_missing


@contextlib.asynccontextmanager
async def running(src: Source, what: str) -> AsyncIterator[list[Observation]]:
    """Run ``src`` until ready and yield the list its observations land in; cancel it after.

    A source that is unavailable here skips the test (fails it under FSNOTIFYD_REQUIRE_KERNEL).
    """
    got: list[Observation] = []
    ready = asyncio.Event()
    task = asyncio.create_task(src.run(got.append, ready.set))
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            exc = task.exception()
            if isinstance(exc, SourceUnavailable):
                kernel_missing(f"{what} unavailable: {exc}")
            raise AssertionError(f"source ended before ready: {exc!r}")
        assert ready.is_set(), "source did not become ready"
        yield got
    finally:
        waiter.cancel()
        task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)


async def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.005)
