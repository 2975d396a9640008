"""A durable, bounded, append-only FIFO of JSON lines on disk: what a webhook has yet to deliver.

Why on disk: an endpoint can be down for hours and the daemon can be restarted meanwhile; the
events of that time must still arrive, in order, once. Why bounded: a dead endpoint must not
fill the disk of a host whose filesystems are what fsnotifyd watches, so past ``max_bytes`` the
OLDEST undelivered events are dropped and counted (never the newest: they describe the present).

Layout of the directory::

    00000001.jsonl  00000002.jsonl ...   segments: one JSON value per line, appended only
    cursor                               {"segment": N, "offset": BYTES}: the next line to deliver

Segments rotate at ``segment_bytes`` (default ``min(1 MiB, max_bytes / 8)``) so that the bound is
enforced by deleting whole segments (an eighth of the spool at most at a time) and a delivered
segment is reclaimed by one unlink. Every line is written with ONE ``os.write`` on an
``O_APPEND`` descriptor, so a crash can only tear the very end of the last segment; at open, a
torn tail (bytes after the last newline) is truncated away and counted (``spool_corrupt``). A
line that is not JSON is skipped and counted the same way rather than blocking the queue.

The cursor is rewritten (temp file + rename, no fsync) after every acknowledged line, and
fsynced at :meth:`Spool.close`. A missing or unreadable cursor restarts at the oldest segment:
a receiver sees duplicates (which it can recognise) rather than missing events (which it
cannot). Segments older than the cursor's are fully delivered and are deleted at open.

Thread-safety: every public method takes one lock; the appender (the event loop) and the
reader (the sender thread) can share a spool. Callbacks (``on_lost``) run under that lock and
must not call back into the spool.
"""

from __future__ import annotations

import builtins  # `bytes` in the class bodies below is their size attribute; builtins.bytes is the type
import contextlib
import errno
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("fsnotifyd")

SEGMENT_RE = re.compile(r"(\d{8,})\.jsonl")
CURSOR = "cursor"
MAX_SEGMENT_BYTES = 1 << 20
_READ_CHUNK = 256 << 10

LostCallback = Callable[[str, int], None]


class SpoolClosed(RuntimeError):
    """The spool was closed; nothing more can be appended."""


@dataclass(frozen=True, slots=True)
class Record:
    """One line handed out by :meth:`Spool.peek`; ``data`` is the line without its newline."""

    segment: int
    offset: int
    end: int
    data: bytes
    value: Any


@dataclass(slots=True)
class _Segment:
    number: int
    size: int  # bytes on disk, all complete lines
    lines: int  # complete lines in the file, delivered or not


def segment_name(number: int) -> str:
    return f"{number:08d}.jsonl"


class Spool:
    """See the module docstring. Opening reads every segment once (to count its lines and find
    a torn tail); then nothing is kept in memory but the per-segment sizes and line counts and
    a read-ahead buffer of the head segment."""

    def __init__(self, directory: str, max_bytes: int, *, segment_bytes: int | None = None,
                 on_lost: LostCallback | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be positive, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(1, segment_bytes or min(MAX_SEGMENT_BYTES, max_bytes // 8))
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # [0] is the head: the cursor's segment
        self._offset = 0  # the cursor's offset in the head segment
        self._consumed = 0  # lines of the head segment before the cursor
        self._events = 0
        self._bytes = 0
        self._wfd = -1
        self._rfd = -1
        self._rfd_segment = -1
        self._rbuf = b""
        self._rbuf_start = 0
        self._closed = False
        self._cursor_failing = False
        self._open()

    # -- public ------------------------------------------------------------------------------
    @property
    def events(self) -> int:
        """Complete lines not yet acknowledged (garbage ones included until they are skipped)."""
        with self._lock:
            return self._events

    @property
    def bytes(self) -> int:
        """Bytes of all segments on disk (the delivered start of the head segment included)."""
        with self._lock:
            return self._bytes

    @property
    def cursor(self) -> tuple[int, int]:
        with self._lock:
            return self._head().number, self._offset

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, data: builtins.bytes) -> bool:
        """Append one line (``data`` without newline). False if the line alone is larger than
        the bound (it is counted lost). Raises :class:`SpoolClosed`, or OSError when the disk
        refuses the write (the segment is left as it was)."""
        if b"\n" in data:
            raise ValueError("a spool line must not contain a newline")
        line = data + b"\n"
        with self._lock:
            if self._closed:
                raise SpoolClosed(f"spool {self.directory} is closed")
            if len(line) > self.max_bytes:
                self._lost("spool_full", 1)
                return False
            self._make_room(len(line))
            active = self._segments[-1]
            if active.size and active.size + len(line) > self.segment_bytes:
                self._rotate()
            self._write(line)
            return True

    def peek(self) -> Record | None:
        """The oldest unacknowledged line, or None when there is none (or the spool is closed).

        Lines that are not JSON are skipped (and counted) here; fully read segments other than
        the one being appended to are deleted here.
        """
        with self._lock:
            while not self._closed:
                head = self._head()
                if self._offset < head.size:
                    data = self._read_line(head, self._offset)
                    if data is None:
                        # Bytes without a newline: only a foreign hand can put them in a segment we
                        # no longer append to (open truncates torn tails). Skip them.
                        if head is self._segments[-1]:
                            return None
                        self._lost("spool_corrupt", 1)
                        self._offset = head.size
                        self._save_cursor()
                        continue
                    end = self._offset + len(data) + 1
                    try:
                        value = json.loads(data)
                    except ValueError:
                        log.warning("spool.garbage_line", spool=self.directory, segment=head.number,
                                    offset=self._offset, length=len(data))
                        self._consume(end)
                        self._lost("spool_corrupt", 1)
                        continue
                    return Record(head.number, self._offset, end, data, value)
                if len(self._segments) == 1:
                    return None
                self._drop_head()
            return None

    def is_head(self, record: Record) -> bool:
        """Whether ``record`` is still the next line to deliver (the bound may have dropped it)."""
        with self._lock:
            return not self._closed and self._at(record)

    def ack(self, record: Record) -> bool:
        """Mark ``record`` delivered and persist the cursor (no fsync). False, and nothing done,
        if it is no longer the head (dropped by the bound meanwhile) or the spool is closed."""
        with self._lock:
            if self._closed or not self._at(record):
                return False
            self._consume(record.end)
            if self._offset >= self._head().size and len(self._segments) > 1:
                self._drop_head()
            return True

    def close(self) -> None:
        """Flush the segments and the cursor to disk (fsync) and release the descriptors."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._wfd >= 0:
                    try:
                        os.fdatasync(self._wfd)
                    except OSError as e:
                        log.error("spool.sync_failed", spool=self.directory, error=str(e))
                self._save_cursor(sync=True)
            finally:
                for fd in (self._wfd, self._rfd):
                    if fd >= 0:
                        os.close(fd)
                self._wfd = self._rfd = -1
                self._rbuf = b""

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        numbers = sorted(int(m.group(1)) for name in os.listdir(self.directory)
                         if (m := SEGMENT_RE.fullmatch(name)))
        segments = [self._scan(n) for n in numbers]
        if not segments:
            segments = [_Segment(1, 0, 0)]
            self._create(1)
        self._segments = segments
        start = self._resume_point(segments)
        for seg in list(self._segments):
            if seg.number >= start[0]:
                break
            # Older than the cursor: delivered, the unlink was lost in a crash.
            self._segments.remove(seg)
            self._unlink(seg.number)
        self._offset = start[1]
        self._consumed = self._count_lines(self._head().number, self._offset)
        self._events = sum(s.lines for s in self._segments) - self._consumed
        self._bytes = sum(s.size for s in self._segments)
        self._open_writer()
        self._save_cursor()

    def _scan(self, number: int) -> _Segment:
        """Size and lines of a segment, its torn tail (if any) truncated away and counted."""
        path = self._path(number)
        lines, last_nl, size = 0, -1, 0
        with open(path, "rb") as f:
            while chunk := f.read(MAX_SEGMENT_BYTES):
                lines += chunk.count(b"\n")
                i = chunk.rfind(b"\n")
                if i >= 0:
                    last_nl = size + i
                size += len(chunk)
        if last_nl + 1 < size:
            log.warning("spool.torn_tail", spool=self.directory, segment=number, bytes=size - last_nl - 1,
                        hint="a crash in the middle of a write; that one event is lost")
            os.truncate(path, last_nl + 1)
            self._lost("spool_corrupt", 1)
            size = last_nl + 1
        return _Segment(number, size, lines)

    def _resume_point(self, segments: list[_Segment]) -> tuple[int, int]:
        """Where the cursor file says to resume, or the oldest segment when it cannot be trusted."""
        oldest = (segments[0].number, 0)
        path = os.path.join(self.directory, CURSOR)
        anything = any(s.size for s in segments)
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
            seg, off = raw["segment"], raw["offset"]
            if type(seg) is not int or type(off) is not int or seg < 0 or off < 0:
                raise ValueError(f"not a cursor: {raw!r}")
        except FileNotFoundError:
            if anything:
                log.warning("spool.cursor_missing", spool=self.directory, resume="oldest segment",
                            hint="events may be delivered twice")
            return oldest
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("spool.cursor_corrupt", spool=self.directory, error=str(e), resume="oldest segment",
                        hint="events may be delivered twice")
            return oldest
        if seg < segments[0].number:
            return oldest  # its segment was delivered or dropped and is gone: the oldest is next
        by_number = {s.number: s for s in segments}
        target = by_number.get(seg)
        if target is None or off > target.size or not self._at_line_start(seg, off):
            if anything:
                log.warning("spool.cursor_corrupt", spool=self.directory, cursor={"segment": seg, "offset": off},
                            error="does not point at the start of a line of a segment here",
                            resume="oldest segment", hint="events may be delivered twice")
            return oldest
        return seg, off

    def _at_line_start(self, number: int, offset: int) -> bool:
        if offset == 0:
            return True
        fd = os.open(self._path(number), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, 1, offset - 1) == b"\n"
        finally:
            os.close(fd)

    def _count_lines(self, number: int, upto: int) -> int:
        count, pos = 0, 0
        with open(self._path(number), "rb") as f:
            while pos < upto and (chunk := f.read(min(MAX_SEGMENT_BYTES, upto - pos))):
                count += chunk.count(b"\n")
                pos += len(chunk)
        return count

    # -- writing -----------------------------------------------------------------------------
    def _make_room(self, need: int) -> None:
        while self._bytes + need > self.max_bytes:
            if len(self._segments) == 1:
                self._rotate()  # the bound is kept by whole segments: make the old one droppable
            self._drop_head()

    def _rotate(self) -> None:
        number = self._segments[-1].number + 1
        self._create(number)
        self._segments.append(_Segment(number, 0, 0))
        self._open_writer()

    def _write(self, line: builtins.bytes) -> None:
        active = self._segments[-1]
        try:
            written = os.write(self._wfd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write to the spool ({written} of {len(line)} bytes)")
        except OSError:
            # Never leave a torn line for the reader: it would glue onto the next one.
            os.ftruncate(self._wfd, active.size)
            raise
        active.size += len(line)
        active.lines += 1
        self._bytes += len(line)
        self._events += 1

    def _create(self, number: int) -> None:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _open_writer(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd = os.open(self._path(self._segments[-1].number), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # -- reading -----------------------------------------------------------------------------
    def _head(self) -> _Segment:
        return self._segments[0]

    def _at(self, record: Record) -> bool:
        return self._head().number == record.segment and self._offset == record.offset

    def _read_line(self, seg: _Segment, offset: int) -> builtins.bytes | None:
        """The line at ``offset`` without its newline, None if it has no newline (yet)."""
        if self._rfd_segment == seg.number and self._rbuf_start <= offset:
            rel = offset - self._rbuf_start
            i = self._rbuf.find(b"\n", rel)
            if i >= 0:
                return self._rbuf[rel:i]
        if self._rfd_segment != seg.number:
            if self._rfd >= 0:
                os.close(self._rfd)
            self._rfd = os.open(self._path(seg.number), os.O_RDONLY | os.O_CLOEXEC)
            self._rfd_segment = seg.number
        size = _READ_CHUNK
        while True:
            buf = os.pread(self._rfd, size, offset)
            i = buf.find(b"\n")
            if i >= 0 or len(buf) < size:
                break
            size *= 2  # one line longer than the buffer
        self._rbuf, self._rbuf_start = buf, offset
        return buf[:i] if i >= 0 else None

    def _consume(self, end: int) -> None:
        self._offset = end
        self._consumed += 1
        self._events -= 1
        self._save_cursor()

    def _drop_head(self) -> None:
        """Delete the head segment; what it held undelivered is lost (the bound) or nothing
        (it was fully read). The cursor moves to the start of the next segment."""
        seg = self._segments.pop(0)
        undelivered = seg.lines - self._consumed
        self._events -= undelivered
        self._bytes -= seg.size
        self._offset = self._consumed = 0
        if self._rfd_segment == seg.number:
            os.close(self._rfd)
            self._rfd, self._rfd_segment, self._rbuf = -1, -1, b""
        self._save_cursor()  # before the unlink: a crash in between leaves an old file, deleted at open
        self._unlink(seg.number)
        if undelivered:
            self._lost("spool_full", undelivered)

    # -- files -------------------------------------------------------------------------------
    def _path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))

    def _unlink(self, number: int) -> None:
        try:
            os.unlink(self._path(number))
        except FileNotFoundError:
            pass

    def _save_cursor(self, sync: bool = False) -> None:
        """Temp file + rename: old or new cursor after a crash, never a torn one. Not fsynced per
        event (that would cap delivery at the disk's flush rate); a cursor a crash rolls back
        only means events delivered again.

        A failed write (a full disk) is logged, not raised: the cursor in memory is right and
        the next write brings the file up to date; until then a restart would resend."""
        path = os.path.join(self.directory, CURSOR)
        tmp = path + ".tmp"
        data = json.dumps({"segment": self._head().number, "offset": self._offset}).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if sync:
                dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # give back the space it took
            if not self._cursor_failing:
                log.warning("spool.cursor_write_failed", spool=self.directory, error=str(e),
                            hint="events delivered since may be sent again after a restart")
            self._cursor_failing = True
            return
        if self._cursor_failing:
            log.info("spool.cursor_write_ok", spool=self.directory)
            self._cursor_failing = False

    def _lost(self, reason: str, count: int) -> None:
        if self._on_lost is not None:
            self._on_lost(reason, count)
