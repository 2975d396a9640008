"""Pure fakes for tests (shipped so downstream rule authors can use them too): no kernel, no I/O.

Each stands in for one Protocol of :mod:`fsnotifyd.typing` (tests/unit/test_fakes.py checks
it does). The rigs with real parts (loop devices, the daemon as a subprocess, an HTTP
endpoint) are in the source tree's ``tests/rigs/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .errors import SourceUnavailable
from .events import Event, Observation
from .typing import Ready, Send


class FakeClock:
    """Virtual monotonic time for correlator tests: advance it instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryStateStore:
    """An in-memory :class:`fsnotifyd.typing.StateStore`; tests read and seed it by key."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        return self.values.get(key)

    def set(self, key: str, value: int) -> None:
        self.values[key] = value

    def flush(self) -> bool:
        return True  # nothing to write: always "on disk"

    def __getitem__(self, key: str) -> int:
        return self.values[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.values[key] = value


class CapturingSink:
    """A :class:`fsnotifyd.typing.Sink` that keeps every event it is given, in order."""

    name = "capture"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class FakeSource:
    """A scripted :class:`fsnotifyd.typing.Source`: raises ``unavailable`` before ready, fails
    ``fail_times`` times, then sends ``observations`` and idles until cancelled."""

    def __init__(self, name: str, observations: Iterable[Observation] = (), *, unavailable: str | None = None,
                 fail_times: int = 0) -> None:
        self.name = name
        self.observations = list(observations)
        self.unavailable = unavailable
        self.fail_times = fail_times
        self.runs = 0

    async def run(self, send: Send, ready: Ready) -> None:
        self.runs += 1
        if self.unavailable:
            raise SourceUnavailable(self.unavailable, hint="scripted")
        if self.runs <= self.fail_times:
            raise RuntimeError(f"scripted failure {self.runs}")
        ready()
        for obs in self.observations:
            send(obs)
        await asyncio.Event().wait()
