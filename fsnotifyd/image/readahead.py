"""Read-ahead for one delta file: during a sequential run of direct reads, the next window is
read on a thread while the exporter answers, so the disk and the FUSE round trip overlap.

The exporter is single-threaded: without this it sends one read to the disk at a time, and a
sequential reader (``dd``, a backup, ext4's own read-ahead inside the VE) waits for every one.
Two windows of a cluster each: the reader takes from one while the other is filled (a request
that straddles two clusters arrives as two pieces, so one window would be refilled under the
second piece). The delta drops both before anything changes the file, so a window never holds
data older than what a read would see.
"""

from __future__ import annotations

import mmap
import os
import threading


class ReadAhead:
    def __init__(self, fd: int, window: int, name: str) -> None:
        self._fd = fd
        self._size = window
        self._maps = [mmap.mmap(-1, window) for _ in range(2)]  # page-aligned, as O_DIRECT wants
        self._bufs = [memoryview(m) for m in self._maps]
        self._held: list[tuple[int, int] | None] = [None, None]  # (file position, bytes) per buffer
        self._filling: int | None = None  # the buffer being read into
        self._want = -1  # ... from this position
        self._cv = threading.Condition(threading.Lock())
        self._closing = False
        self.hits = 0  # requests served from a window
        self._thread = threading.Thread(target=self._run, name=f"read-ahead {name}", daemon=True)
        self._thread.start()

    def _covering(self, pos: int, end: int) -> tuple[int, int, int] | None:
        """(buffer, its file position, its bytes) of the window holding ``[pos, end)``."""
        for i, held in enumerate(self._held):
            if held is not None and held[0] <= pos and end <= held[0] + held[1]:
                return i, held[0], held[1]
        return None

    def take(self, pos: int, view: memoryview) -> bool:
        """Fill ``view`` from a window holding ``[pos, pos + len(view))``, waiting for the read
        in flight when it is the one that will hold it."""
        end = pos + len(view)
        with self._cv:
            while True:
                window = self._covering(pos, end)
                if window is not None:
                    i, wpos, _ = window
                    start = pos - wpos
                    view[:] = self._bufs[i][start:start + len(view)]
                    self.hits += 1
                    return True
                if self._filling is None or not (self._want <= pos and end <= self._want + self._size):
                    return False
                self._cv.wait()

    def advance(self, end: int) -> None:
        """A sequential reader got up to ``end``: read the window after what is held."""
        with self._cv:
            if self._filling is not None or self._closing:
                return
            window = self._covering(end, end + 1)
            current = None
            frontier = end
            if window is not None:
                current, pos, got = window
                if got < self._size:  # the end of the file
                    return
                frontier = pos + got
            if any(h is not None and h[0] == frontier for h in self._held):
                return
            i = 1 - current if current is not None else 0
            self._held[i] = None
            self._filling, self._want = i, frontier
            self._cv.notify_all()

    def drop(self) -> None:
        """Forget both windows (the file is about to change); waits for a read in flight."""
        with self._cv:
            while self._filling is not None:
                self._cv.wait()
            self._held = [None, None]

    def close(self) -> None:
        with self._cv:
            while self._filling is not None:
                self._cv.wait()
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        for b in self._bufs:
            b.release()
        for m in self._maps:
            m.close()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._filling is None and not self._closing:
                    self._cv.wait()
                i, pos = self._filling, self._want
                if self._closing or i is None:  # not closing means the loop saw a buffer to fill
                    return
            try:
                got = os.preadv(self._fd, [self._bufs[i]], pos)
            except OSError:
                got = -1  # the reader that wants it reads it itself and sees the error
            with self._cv:
                self._held[i] = (pos, got) if got > 0 else None
                self._filling = None
                self._cv.notify_all()
