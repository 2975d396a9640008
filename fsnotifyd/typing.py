"""The small interfaces the daemon's parts meet at (documented aliases and Protocols).

The Protocols are runtime-checkable so tests can hold the fakes of :mod:`fsnotifyd.testing`
to them (``isinstance`` sees the names; tests/unit/test_fakes.py also compares signatures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .events import Event, Kernel, Observation

Send = Callable[[Observation], None]
"""A source hands an observation to the daemon; never blocks (overflow is counted as lost)."""

Ready = Callable[[], None]
"""A source calls this once its kernel handle is open, so start-up can report readiness."""


@runtime_checkable
class Source(Protocol):
    name: str

    async def run(self, send: Send, ready: Ready) -> None:
        """Open the kernel handle, call ``ready()``, then observe until cancelled.

        Raises ``SourceUnavailable`` (before ``ready``) when the host cannot offer the interface.
        """


@runtime_checkable
class Sink(Protocol):
    name: str

    def publish(self, event: Event) -> None:
        """Take one event; must not block the event loop."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ErrorCounter:
    """A filesystem's own cumulative error counter and its latest recorded error."""

    fs_key: str
    errors_total: int
    last_error: Kernel
    last_error_time: float | None


@runtime_checkable
class ErrorCounters(Protocol):
    def read(self, device_name: str) -> ErrorCounter | None:
        """Read the counter of the filesystem on ``device_name`` now, or None if it has none."""


@runtime_checkable
class StateStore(Protocol):
    def get(self, key: str) -> int | None: ...

    def set(self, key: str, value: int) -> None: ...

    def flush(self) -> bool:
        """Write what changed; False when the disk refused it (kept, tried again next time)."""
