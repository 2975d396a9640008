"""Write-behind for one delta file: large direct writes handed to a thread, so the exporter
takes the next FUSE request while the disk writes the last one.

The single-threaded exporter otherwise waits for every direct write before it reads the next
request from ``/dev/fuse``: the disk and the FUSE round trip take turns. Handing the write to
a thread overlaps them. The contract is the one of a disk's volatile write cache (and of the
host page cache the exporter used before): a write is acknowledged before it is durable, a
flush makes everything acknowledged durable, and a crash of the exporter loses only what no
flush covered. At most ``depth`` writes are in flight (their buffers are the memory bound), on
``threads`` threads (the disk takes more than one at a time); a write that overlaps one in
flight waits for it at submission, so the writes in flight never overlap and their order
cannot matter. Anything else that touches the file (reads, other
writes, hole punching, the BAT commit) calls :meth:`drain` first, so it sees every earlier
write. A failed write is raised, as the OSError it was, by the next :meth:`drain`; the delta
then fails its next commit with it too, whatever request drained first.
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Callable
from os import pwrite  # a module name: tests slow it down to widen the races


class WriteBehind:
    def __init__(self, fd: int, depth: int, name: str, threads: int = 2) -> None:
        self._fd = fd
        self._depth = depth
        self._queue: collections.deque[tuple[memoryview, int, Callable[[], None]]] = collections.deque()
        self._ranges: list[tuple[int, int]] = []  # [pos, end) of each write queued or in flight
        self._cv = threading.Condition(threading.Lock())
        self._inflight = 0  # queued or being written
        self._error: OSError | None = None
        self._closing = False
        self.waits = 0  # submits that found `depth` writes in flight (the disk is the bottleneck)
        self._threads = [threading.Thread(target=self._run, name=f"write-behind {name}", daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, data: memoryview, pos: int, done: Callable[[], None]) -> None:
        """Write ``data`` at ``pos`` soon; ``done()`` is called (from the writer thread) once
        ``data`` is no longer needed. Waits while ``depth`` writes are in flight, or one
        that overlaps this one."""
        end = pos + len(data)
        with self._cv:
            if self._inflight >= self._depth:
                self.waits += 1
            while self._inflight >= self._depth or any(a < end and pos < b for a, b in self._ranges):
                self._cv.wait()
            if self._closing:
                raise OSError(errno.EBADF, "write-behind closed")
            self._queue.append((data, pos, done))
            self._ranges.append((pos, end))
            self._inflight += 1
            self._cv.notify_all()

    def drain(self) -> None:
        """Return once every submitted write is done; raise the first that failed."""
        if self._inflight == 0 and self._error is None:
            return
        with self._cv:
            while self._inflight:
                self._cv.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the queued writes and stop the thread (errors are left to the last drain)."""
        with self._cv:
            while self._inflight:
                self._cv.wait()
            self._closing = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                data, pos, done = self._queue.popleft()
            error: OSError | None = None
            try:
                n = pwrite(self._fd, data, pos)
                if n != len(data):
                    error = OSError(errno.EIO, f"short write: {n} of {len(data)} bytes at {pos}")
            except OSError as e:
                error = e
            finally:
                done()
            with self._cv:
                self._ranges.remove((pos, pos + len(data)))
                self._inflight -= 1
                if error is not None and self._error is None:
                    self._error = error
                self._cv.notify_all()
