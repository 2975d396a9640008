"""The append-only JSONL event journal, rotated by size (``events.jsonl``, ``.1`` … ``.keep``).

When the disk refuses a write (full, read-only, failing), the event is not written and is
counted, and the journal says so once (``sink.journal_failing``, with the reason) rather than
once per event; the other sinks still get every event. The next write that lands ends it
(``sink.journal_recovered``, with the number of events missing from the file). A write the
disk took only in part is cut off again, so the file never holds a torn line.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..events import Event
from ..statefile import FileHealth

log = structlog.get_logger("fsnotifyd")


@dataclass
class JournalSink:
    path: str
    max_bytes: int = 64 << 20
    keep: int = 5
    name: str = "journal"
    health: FileHealth = field(default_factory=FileHealth)
    count_refused: Callable[[], None] = lambda: None  # one event the disk did not take
    _fd: int = field(default=-1, init=False)
    _size: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.health.watch(self.path)
        try:
            self._open()
        except OSError as e:  # e.g. a read-only state disk at start: the daemon still starts
            self._failing(e)  # and the first event tries again

    def _open(self) -> None:
        # O_APPEND: one write per event lands whole even if another writer shares the file.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def publish(self, event: Event) -> None:
        self.write_line(event.to_json())

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        try:
            if self._fd < 0:
                self._open()  # a rotation that could not make the new file
            if self._size and self._size + len(data) > self.max_bytes:
                self.rotate()
            self._append(data)
        except OSError as e:
            self._refused(e)
            return
        ended = self.health.written(self.path)
        if ended is not None:
            log.info("sink.journal_recovered", sink=self.name, path=self.path, dropped=ended.refused,
                     failed_for_s=round(time.time() - (ended.since or time.time()), 1))

    def _append(self, data: bytes) -> None:
        done = 0
        try:
            while done < len(data):  # a nearly full disk can take part of a write
                done += os.write(self._fd, data[done:])
        except OSError:
            if done:  # cut the part off: no torn line for the next write to follow
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - done)
            raise
        self._size += done

    def _refused(self, e: OSError) -> None:
        self.count_refused()
        self._failing(e)

    def _failing(self, e: OSError) -> None:
        started = self.health.failed(self.path, e)
        if started is not None:
            log.error("sink.journal_failing", sink=self.name, path=self.path, errno=started.errno,
                      error=started.error,
                      hint="events still reach the other sinks; those this journal misses are counted "
                           "in fsnotifyd_journal_write_failures_total")

    def rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
