"""The daemon's own files: small JSON state written atomically, and what to do when the disk
refuses them.

A state file is written whole to a temporary file, fsynced, renamed over the old one and the
directory fsynced, so a crash leaves either the old or the new state, never a torn file. A
corrupt file is moved aside (and said so) instead of stopping the daemon: its loss costs a
repeated report, not a missed one.

A full disk under the state directory is what a host whose filesystems fail often has, so a
write the disk refuses (ENOSPC, EDQUOT, EROFS, EIO, any OSError) must not stop the daemon: the
value stays in memory, the file is marked failing in :class:`FileHealth` (status, metrics)
with one log line, and the write is tried again, at the next change and by the daemon's
periodic flush, until it lands; then one more line says so.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import threading
import time
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("fsnotifyd")


@dataclass
class FileState:
    """One of the daemon's own files: written fine, or refused since ``since`` and why."""

    path: str
    errno: str | None = None  # "ENOSPC" while failing
    error: str | None = None
    since: float | None = None  # wall time of the first refused write of this streak
    refused: int = 0  # writes (or journal events) refused in this streak

    @property
    def ok(self) -> bool:
        return self.errno is None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "errno": self.errno, "error": self.error,
                "since": self.since, "refused": self.refused}


class FileHealth:
    """Which of the daemon's own files the disk refuses now. Written from the event loop, read
    by status and by metric scrapes (another thread), hence the lock."""

    def __init__(self) -> None:
        self._files: dict[str, FileState] = {}
        self._lock = threading.Lock()

    def watch(self, path: str) -> None:
        with self._lock:
            self._files.setdefault(path, FileState(path))

    def failed(self, path: str, err: OSError) -> FileState | None:
        """Note a refused write; the file's state when this starts a failing streak (log it),
        else None (already said)."""
        with self._lock:
            st = self._files.setdefault(path, FileState(path))
            st.refused += 1
            if not st.ok:
                return None
            st.errno = _errno.errorcode.get(err.errno or 0, str(err.errno))
            st.error, st.since = err.strerror or str(err), time.time()
            return FileState(**vars(st))

    def written(self, path: str) -> FileState | None:
        """Note a write that landed; the ended streak when the file was failing (log it)."""
        with self._lock:
            st = self._files.setdefault(path, FileState(path))
            if st.ok:
                return None
            if st.errno == "ENOSPC" and not _has_room(path):
                # An append into the unused end of a block the file already holds lands on a
                # full disk too; the next one will not. Over only once there is room again.
                return None
            ended = FileState(**vars(st))
            self._files[path] = FileState(path)
            return ended

    def files(self) -> list[FileState]:
        with self._lock:
            return [FileState(**vars(st)) for st in self._files.values()]

    def failing(self) -> list[FileState]:
        return [st for st in self.files() if not st.ok]


def _has_room(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return True  # cannot tell: the write that just landed is the best evidence
    return st.f_bfree > 0  # the daemon is root: the blocks reserved for root are room too


@dataclass
class StateFile:
    """One JSON state file whose writes may be refused: :meth:`write` says whether it landed."""

    path: str
    health: FileHealth = field(default_factory=FileHealth)

    def __post_init__(self) -> None:
        self.health.watch(self.path)

    def write(self, obj: object) -> bool:
        try:
            write_json_atomic(self.path, obj)
        except OSError as e:
            started = self.health.failed(self.path, e)
            if started is not None:
                log.error("state.write_failed", path=self.path, errno=started.errno, error=started.error,
                          hint="the value is kept in memory and written again once the disk takes it")
            return False
        ended = self.health.written(self.path)
        if ended is not None:
            log.info("state.write_recovered", path=self.path, refused=ended.refused,
                     failed_for_s=round(time.time() - (ended.since or time.time()), 1))
        return True


@dataclass
class JsonStateStore:
    """A small JSON key → integer store (the error ledger) that survives restarts and crashes."""

    path: str
    health: FileHealth = field(default_factory=FileHealth)
    _data: dict[str, int] = field(default_factory=dict)
    _dirty: bool = False
    load_error: str | None = None

    def __post_init__(self) -> None:
        self._file = StateFile(self.path, self.health)
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            if not isinstance(raw, dict):
                raise ValueError("top level is not an object")
            self._data = {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            self.load_error = f"{self.path}: {e}; moved aside to {self.path}.corrupt"
            os.replace(self.path, self.path + ".corrupt")

    @property
    def dirty(self) -> bool:
        return self._dirty

    def get(self, key: str) -> int | None:
        return self._data.get(key)

    def set(self, key: str, value: int) -> None:
        if self._data.get(key) != value:
            self._data[key] = value
            self._dirty = True

    def flush(self) -> bool:
        """Write the store if it changed; False when the disk refused it (still dirty: the next
        flush tries again, with whatever the values are by then)."""
        if not self._dirty:
            return True
        if not self._file.write(self._data):
            return False
        self._dirty = False
        return True


def write_json_atomic(path: str, obj: object) -> None:
    """Write temp, fsync, rename over, fsync the directory: old or new, never torn."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A half-written temp file holds the very blocks a full disk lacks.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str) -> tuple[object | None, str | None]:
    """The JSON in ``path`` (None if absent), or an error moved aside like a corrupt ledger."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        os.replace(path, path + ".corrupt")
        return None, f"{path}: {e}; moved aside to {path}.corrupt"
