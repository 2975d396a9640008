"""The exporter: one process per attached image, serving its virtual disk as a FUSE file.

    python -m fsnotifyd.app.exporter --image DIR --fuse-dir MOUNTDIR --control SOCKET
                                     [--readonly] [--upto GUID]

(the process's entry point, :mod:`fsnotifyd.app.exporter`, sets up logging and calls :func:`serve`)

It opens the image's :class:`~.stack.Stack` and mounts a FUSE filesystem (libfuse3 through
mfusepy, single-threaded, 1 MiB requests) at ``MOUNTDIR`` holding one regular file, ``disk``,
of the disk's virtual size; :mod:`.attach` puts a loop device on that file. Requests map to the
stack one to one: read, write, ``fallocate`` (PUNCH_HOLE or ZERO_RANGE with KEEP_SIZE: a
discard; fstrim in the VE frees clusters), fsync and flush (the data, then the BAT, durable
before the answer). A failure of the stack answers EIO (ENOSPC when the host is full) and is
counted; the process stays up. Reads and writes inside clusters the top delta maps are answered
in C when the module is built (:mod:`.fastio`); the rest, and all of it without the module,
here.

A control socket (unix stream, JSON lines, one request → one response line) runs in threads
beside the FUSE loop; every access to the stack, from either side, holds one lock, so a
snapshot or a merge never lands in the middle of a write. ``status`` takes no lock: it answers
while a long operation holds the stack, and not answering means the process itself is stuck
(see :func:`.attach.watchdog_check`). Requests::

    {"op":"status"}                      pid, readonly, size, healthy, stats, deltas, errors
    {"op":"flush"}
    {"op":"readonly","value":bool}       live switch; writes then fail with EROFS
    {"op":"snapshot","name":str|null}    → {"guid":...}
    {"op":"resize","size":bytes}         grow the disk (the FUSE file grows)
    {"op":"merge","guid":...}            merge a snapshot into its child
    {"op":"compact","progress":bool}     compact the top delta (I/O waits meanwhile); with
                                         progress, {"progress":[stage,done,total]} lines first
    {"op":"stop"}                        clean exit (the FUSE mount goes away)

While writable, the top delta's in-use marker is set; a clean exit clears it (an image found
marked was not closed cleanly). A writable exporter holds ``flock`` on the image directory so
two cannot write one image.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import structlog

from ..errors import FsnotifydError, ImageError
from . import fastio, ops
from .progress import ProgressFn
from .stack import Stack

DISK = "disk"
MAX_WRITE = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # libfuse3 fuse_common.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
WRITE_BEHIND = 4  # large writes in flight to the top delta (see writebehind.py)
BUSY_UNHEALTHY_S = 30.0  # a FUSE request running longer than this makes status say unhealthy

log = structlog.get_logger("fsnotifyd.image.exporter")


class Exporter:
    """The stack, the lock around it, and what status reports. FUSE-independent: the FUSE
    operations and the control requests both call the methods here."""

    def __init__(self, image: str, *, readonly: bool = False, upto: str | None = None) -> None:
        self.image = os.path.abspath(image)
        self.upto = upto
        # The C data path (fastio.py) serves mapped reads and writes itself; its mutex is then
        # the lock around the stack, so that it never runs beside a change made here.
        self.fast = fastio.load()
        self.lock: Any = self.fast.lock if self.fast is not None else threading.Lock()
        self.readonly = readonly or upto is not None
        self.errors = 0
        self.last_error: str | None = None
        self.busy_since: float | None = None  # start of the FUSE request in progress
        self.started = time.time()
        self._dir_fd: int | None = None
        self.was_in_use = False
        writable = not self.readonly
        if writable:
            self._lock_image()
        try:
            self.stack = Stack.open(self.image, writable=writable, upto=upto)
        except BaseException:
            self._unlock_image()
            raise
        if writable:
            self._mark_in_use()
        with self.lock:
            self._use_stack()

    def _use_stack(self) -> None:
        """Direct I/O, and the C data path on the top delta; again after the stack changed
        (snapshot, merge, grow, compaction, reopen). Holds the lock."""
        if self.fast is None:
            self.direct_io = self.stack.use_direct_io(WRITE_BEHIND, read_ahead=True)
            return
        # Writes the C side makes are not ordered with Python's write-behind thread, and would
        # make a read-ahead window of the top stale: Python's access to the top is plain then.
        self.direct_io = self.stack.use_direct_io(0, read_ahead=True, top_read_ahead=False)
        self.fast.serve(self.stack.top, self.stack.size, self.readonly)

    # -- image ownership ---------------------------------------------------------------------
    def _lock_image(self) -> None:
        fd = os.open(self.image, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ImageError("the image is open for writing by another process", file=self.image) from None
        self._dir_fd = fd

    def _unlock_image(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # drops the flock
            self._dir_fd = None

    def _mark_in_use(self) -> None:
        self.was_in_use = self.stack.top.header.in_use
        if self.was_in_use:
            log.warning("image.was_in_use", image=self.image, delta=self.stack.top.path,
                        hint="the last writer did not close it cleanly; the filesystem may need fsck")
        self.stack.top.set_in_use(True)

    # -- the data path (called from the FUSE loop) ----------------------------------------
    def _io(self, what: str, fn: Callable[[], Any], *, write: bool = False) -> Any:
        with self.lock:
            if write and self.readonly:  # checked under the lock: a switch is never half seen
                raise OSError(errno.EROFS, "read-only")
            self.busy_since = time.monotonic()
            try:
                return fn()
            except ImageError as e:
                self._failed(what, e)
                raise OSError(errno.EROFS if "read-only" in str(e) else errno.EIO, str(e)) from e
            except OSError as e:
                self._failed(what, e)
                raise OSError(errno.ENOSPC if e.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO, str(e)) from e
            finally:
                self.busy_since = None

    def _failed(self, what: str, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {e}"
        if self.errors <= 20 or self.errors % 1000 == 0:
            log.error("exporter.io_error", op=what, error=str(e), errors=self.errors, image=self.image)

    def read_into(self, view: memoryview, offset: int) -> int:
        return self._io("read", lambda: self.stack.read_into(offset, view))

    def write(self, offset: int, data: bytes | memoryview) -> int:
        return self._io("write", lambda: self.stack.write(offset, data), write=True)

    def discard(self, offset: int, length: int) -> None:
        self._io("discard", lambda: self.stack.discard(offset, length), write=True)

    def flush(self) -> None:
        self._io("flush", self.stack.flush)

    # -- control requests ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        busy = self.busy_since
        busy_s = 0.0 if busy is None else time.monotonic() - busy
        stats = dataclasses.asdict(self.stack.stats)
        fast: dict[str, Any] | None = None  # what the C data path served (None: not in use)
        if self.fast is not None:
            c = self.fast.stats
            since = c.busy_since_ns
            if since:
                busy_s = max(busy_s, time.monotonic() - since / 1e9)
            for k in ("reads", "writes", "read_bytes", "written_bytes"):
                stats[k] += getattr(c, k)
            fast = {"reads": c.reads, "writes": c.writes, "fallbacks": c.fallbacks}
            ahead_hits, behind_waits = c.ahead_hits, c.write_waits
        else:
            ahead_hits = behind_waits = 0
        return {"ok": True, "pid": os.getpid(), "image": self.image, "upto": self.upto,
                "readonly": self.readonly, "size": self.stack.size, "direct_io": self.direct_io,
                "healthy": busy_s < BUSY_UNHEALTHY_S, "busy_s": round(busy_s, 3),
                "stats": stats, "fast_path": fast, "deltas": len(self.stack.deltas),
                "read_ahead_hits": ahead_hits + sum(d.read_ahead_hits for d in self.stack.deltas),
                "write_behind_waits": behind_waits + sum(d.write_behind_waits for d in self.stack.deltas),
                "errors": self.errors, "last_error": self.last_error, "was_in_use": self.was_in_use,
                "uptime_s": round(time.time() - self.started, 3)}

    def set_readonly(self, value: bool) -> None:
        with self.lock:
            if value == self.readonly:
                return
            if value:
                self.stack.flush()
                self.readonly = True
                if self.fast is not None:
                    self.fast.set_readonly(True)
                return
            if self.upto is not None:
                raise ImageError("a snapshot view is read-only", file=self.image)
            if not self.stack.writable:  # started read-only: reopen the stack for writing
                self._lock_image()
                try:
                    new = Stack.open(self.image, writable=True)
                except BaseException:
                    self._unlock_image()
                    raise
                old, self.stack = self.stack, new
                new.stats = old.stats
                old.close()
                self._mark_in_use()
            self.readonly = False
            self._use_stack()

    def _need_writable(self) -> None:
        if self.readonly or not self.stack.writable:
            raise ImageError("the image is attached read-only", file=self.image)

    def _need_writable_stack(self) -> None:
        # Snapshots and merges leave the disk's data as it is: a read-only switch (an
        # isolated VE) does not stop them, only a stack opened read-only does.
        if not self.stack.writable:
            raise ImageError("the image is attached read-only", file=self.image)

    def snapshot(self, name: str | None) -> str:
        with self.lock:
            self._need_writable_stack()
            self.stack.flush()
            self.stack.top.set_in_use(False)  # the old top becomes a read-only snapshot: clean
            try:
                guid = ops.snapshot(self.stack, self.image, name=name)
            finally:
                self.stack.top.set_in_use(True)  # the new top (or the old one if it failed)
                self._use_stack()
            return guid

    def resize(self, size: int) -> int:
        with self.lock:
            self._need_writable()
            try:
                ops.grow_stack(self.stack, self.image, size)
            finally:
                self._use_stack()
            return self.stack.size

    def merge(self, guid: str) -> None:
        with self.lock:
            self._need_writable_stack()
            try:
                ops.merge(self.image, guid, stack=self.stack)
            finally:
                self._use_stack()

    def compact(self, progress: ProgressFn | None = None) -> ops.CompactResult:
        """Compact the top delta online. The VE's I/O waits meanwhile (the stack's lock): about
        a second per 500 clusters moved here (docs/metrics.md)."""
        with self.lock:
            self._need_writable_stack()
            try:
                return ops.compact(self.stack.top, progress=progress)
            finally:
                self._use_stack()

    def close(self) -> None:
        with self.lock:
            try:
                if self.fast is not None:
                    self.fast.off()
                    self.fast.raise_error()  # a lost write: no clean close (the in-use mark stays)
                if self.stack.writable:
                    self.stack.flush()
                    self.stack.top.set_in_use(False)
            finally:
                self.stack.close()
                self._unlock_image()

    def handle(self, req: Any, stop: Callable[[], None],
               send: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The answer to one control request; ``send`` writes a line before it (progress)."""
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "a request is a JSON object with a string 'op'"}
        op = req["op"]
        try:
            if op == "status":
                return self.status()
            if op == "flush":
                with self.lock:
                    self.stack.flush()
                return {"ok": True}
            if op == "readonly":
                value = req.get("value")
                if not isinstance(value, bool):
                    return {"ok": False, "error": "'value' must be true or false"}
                self.set_readonly(value)
                log.info("exporter.readonly", value=value, image=self.image)
                return {"ok": True, "readonly": self.readonly}
            if op == "snapshot":
                name = req.get("name")
                if name is not None and not isinstance(name, str):
                    return {"ok": False, "error": "'name' must be a string or null"}
                guid = self.snapshot(name)
                log.info("exporter.snapshot", guid=guid, name=name, image=self.image)
                return {"ok": True, "guid": guid}
            if op == "resize":
                size = req.get("size")
                if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                    return {"ok": False, "error": "'size' must be a positive integer (bytes)"}
                new = self.resize(size)
                log.info("exporter.resize", size=new, image=self.image)
                return {"ok": True, "size": new}
            if op == "merge":
                merged = req.get("guid")
                if not isinstance(merged, str):
                    return {"ok": False, "error": "'guid' must be a string"}
                self.merge(merged)
                log.info("exporter.merge", guid=merged, image=self.image)
                return {"ok": True, "deltas": len(self.stack.deltas)}
            if op == "compact":
                r = self.compact(_progress_lines(send) if send is not None and req.get("progress") is True else None)
                log.info("exporter.compacted", moved=r.moved, released=r.released, image=self.image)
                return {"ok": True, "moved": r.moved, "released": r.released}
            if op == "stop":
                log.info("exporter.stop_requested", image=self.image)
                stop()
                return {"ok": True, "stopping": True}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (FsnotifydError, OSError, ValueError) as e:
            log.warning("exporter.control_failed", op=op, error=str(e), image=self.image)
            return {"ok": False, "error": str(e)}


# -- control socket ----------------------------------------------------------------------------

class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


def _write(f: _Writable, line: dict[str, Any]) -> None:
    f.write(json.dumps(line).encode() + b"\n")
    f.flush()


def _progress_lines(send: Callable[[dict[str, Any]], None], every: float = 0.2) -> ProgressFn:
    """A progress callback that sends a line at most every ``every`` seconds (and the last):
    a client that has gone away must not fail the compaction, so send errors are dropped."""
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < every and done < total:
            return
        last[0] = now
        with contextlib.suppress(OSError):
            send({"progress": [stage, done, total]})

    return progress


class ControlServer:
    """JSON lines on a unix stream socket, a thread per connection."""

    def __init__(self, path: str, exporter: Exporter, stop: Callable[[], None]) -> None:
        self.path, self.exporter, self.stop = path, exporter, stop
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
            self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    req = json.loads(line)
                except ValueError as e:
                    resp: dict[str, Any] = {"ok": False, "error": f"not JSON: {e}"}
                else:
                    resp = self.exporter.handle(req, self.stop, send=lambda line: _write(f, line))
                try:
                    _write(f, resp)
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# -- FUSE ----------------------------------------------------------------------------------------

def make_operations(exporter: Exporter, on_init: Callable[[], None]) -> tuple[type[Any], Any]:
    """The FUSE class and the operations object for ``exporter`` (mfusepy is untyped: Any)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy
    from mfusepy import FuseOSError

    path_disk = "/" + DISK
    uid, gid = os.getuid(), os.getgid()

    def disk_only(path: str | None) -> None:
        if path not in (path_disk, None):
            raise FuseOSError(errno.ENOENT)

    class DiskOperations(mfusepy.Operations):
        use_ns = True

        def init_with_config(self, conn_info: Any, config: Any) -> None:
            if conn_info is not None:
                conn_info.max_write = MAX_WRITE
                conn_info.max_readahead = MAX_WRITE
                # With attr_timeout 0, auto_inval_data makes every read ask for the attributes
                # first (a GETATTR round trip, reads one at a time); the loop device is the
                # only user of the file, nothing else changes its data behind the kernel.
                conn_info.want &= ~FUSE_CAP_AUTO_INVAL_DATA
            if config is not None:
                # The size changes on resize: the kernel must ask again (stat before LOOP_SET_CAPACITY).
                config.attr_timeout = 0.0
                config.entry_timeout = 0.0
                config.negative_timeout = 0.0
            on_init()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            t = int(exporter.started * 1e9)
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, "st_ino": 1, "st_uid": uid,
                        "st_gid": gid, "st_atime": t, "st_mtime": t, "st_ctime": t}
            disk_only(path)
            mode = 0o400 if exporter.readonly else 0o600
            blocks = 0
            with exporter.lock:
                for d in exporter.stack.deltas:
                    try:
                        blocks += os.fstat(d.fd).st_blocks
                    except OSError:
                        pass
            return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_ino": 2, "st_uid": uid, "st_gid": gid,
                    "st_size": exporter.stack.size, "st_blocks": blocks, "st_blksize": MAX_WRITE,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}

        def readdir(self, path: str, fh: int) -> list[str]:
            if path != "/":
                raise FuseOSError(errno.ENOTDIR)
            return [".", "..", DISK]

        def open(self, path: str, flags: int) -> int:
            disk_only(path)
            if (flags & os.O_ACCMODE) != os.O_RDONLY and exporter.readonly:
                raise FuseOSError(errno.EROFS)
            return 0

        # read and write are here so that mfusepy registers them; DiskFUSE serves both, on
        # libfuse's own buffers.
        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            raise FuseOSError(errno.ENOSYS)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            raise FuseOSError(errno.ENOSYS)

        def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
            if mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                exporter.discard(offset, size)
                return 0
            raise FuseOSError(errno.EOPNOTSUPP)

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            exporter.flush()
            return 0

        def flush(self, path: str, fh: int) -> int:
            if not exporter.readonly:
                exporter.flush()
            return 0

        def release(self, path: str, fh: int) -> int:
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            return 0

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            disk_only(path)
            if length == exporter.stack.size:
                return 0
            raise FuseOSError(errno.EPERM)  # the size changes only by a resize request

        def chmod(self, path: str, mode: int) -> int:
            raise FuseOSError(errno.EPERM)

        def chown(self, path: str, uid: int, gid: int) -> int:
            raise FuseOSError(errno.EPERM)

        def statfs(self, path: str) -> dict[str, int]:
            bs = 4096
            try:
                host = os.statvfs(exporter.image)
                free = host.f_bavail * host.f_frsize // bs
            except OSError:
                free = 0
            return {"f_bsize": bs, "f_frsize": bs, "f_blocks": exporter.stack.size // bs, "f_bfree": free,
                    "f_bavail": free, "f_files": 2, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    class DiskFUSE(mfusepy.FUSE):
        """mfusepy's FUSE with the data path over libfuse's own buffers: its read and write
        copy each request into a new bytes object (a 1 MiB copy per request)."""

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            return exporter.read_into(_view(buf, size), offset)

        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            return exporter.write(offset, _view(buf, size))

    return DiskFUSE, DiskOperations()


def _view(buf: Any, size: int) -> memoryview:
    """A byte view of ``size`` bytes at a ctypes pointer (no copy)."""
    return memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")


def _keep_request_buffers() -> None:
    """Let malloc reuse 1 MiB buffers instead of mapping and unmapping one per request:
    libfuse allocates each read's reply buffer, and the page faults of a fresh mapping cost
    more than the disk read (seq reads went from 0.55 to 1.2 GB/s)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 4 * MAX_WRITE)
    libc.mallopt(M_TRIM_THRESHOLD, 16 * MAX_WRITE)


@contextlib.contextmanager
def _fast_callbacks(fast: fastio.FastIO | None) -> Iterator[None]:
    """Put the C read and write in front of mfusepy's. mfusepy builds its ``fuse_operations``
    and hands it to libfuse inside one call (``FUSE.__init__``); its module-level
    ``fuse_main_real`` is the one place between the two, so it is wrapped for that call."""
    if fast is None:
        yield
        return
    import mfusepy

    real = mfusepy.fuse_main_real
    prototypes = {f[0]: f[1] for f in mfusepy.fuse_operations._fields_}

    # ctypes values, as mfusepy passes them on
    def main_real(argc: Any, argv: Any, ops_p: Any, size: Any, ctx: Any) -> Any:
        fast.install(ops_p.contents, prototypes)
        return real(argc, argv, ops_p, size, ctx)

    mfusepy.fuse_main_real = main_real
    try:
        yield
    finally:
        mfusepy.fuse_main_real = real


def serve(image: str, fuse_dir: str, control: str, *, readonly: bool = False, upto: str | None = None) -> int:
    _keep_request_buffers()
    exporter = Exporter(image, readonly=readonly, upto=upto)
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def stop() -> None:
        # libfuse's SIGTERM handler ends the loop; aimed at the main thread so its read() on
        # /dev/fuse is interrupted (a signal caught by another thread would wait for a request).
        signal.pthread_kill(main_thread, signal.SIGTERM)

    server = ControlServer(control, exporter, stop)
    rc = 0
    try:
        os.makedirs(fuse_dir, exist_ok=True)

        def on_init() -> None:
            server.start()
            log.info("exporter.mounted", image=exporter.image, fuse_dir=fuse_dir, readonly=exporter.readonly,
                     size=exporter.stack.size, deltas=len(exporter.stack.deltas), pid=os.getpid())

        fuse_class, operations = make_operations(exporter, on_init)
        import logging
        logging.getLogger("mfusepy").setLevel(logging.ERROR)
        with _fast_callbacks(exporter.fast):
            fuse_class(operations, fuse_dir, foreground=True, nothreads=True,
                       fsname="fsnotifyd:" + exporter.image.replace(",", "_"), subtype="fsnotifyd")
    except RuntimeError as e:
        if str(e) != "8":  # fuse_main's 8: the loop was ended by a signal (SIGTERM, a stop request)
            log.error("exporter.fuse_failed", error=str(e), fuse_dir=fuse_dir, image=exporter.image)
            rc = 1
    finally:
        server.close()
        try:
            exporter.close()
        except (FsnotifydError, OSError) as e:
            log.error("exporter.close_failed", error=str(e), image=exporter.image)
            rc = rc or 1
    log.info("exporter.exit", image=exporter.image, rc=rc, errors=exporter.errors)
    return rc
