"""The append-only JSONL event journal, rotated by size (``events.jsonl``, ``.1`` … ``.keep``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..events import Event


@dataclass
class JournalSink:
    path: str
    max_bytes: int = 64 << 20
    keep: int = 5
    name: str = "journal"
    _fd: int = field(default=-1, init=False)
    _size: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._open()

    def _open(self) -> None:
        # O_APPEND: one write per event lands whole even if another writer shares the file.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def publish(self, event: Event) -> None:
        self.write_line(event.to_json())

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def rotate(self) -> None:
        os.close(self._fd)
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
