"""The kernel log (``/dev/kmsg``): the only source that carries ext4's own words.

:class:`KmsgSource` reads records as they are written and handles overruns; the parsing is
pure and lives in :mod:`fsnotifyd.kernel` (:func:`~fsnotifyd.kernel.kmsg.parse_record` for the
record format, :func:`~fsnotifyd.kernel.classify.classify` for the messages it recognises, one
module per subsystem), which the replay of ``dmesg``/``journalctl`` text shares.

Mount failures: the pure :class:`~fsnotifyd.kernel.mountfail.MountFailureReasons` puts the
reason line ext4 prints before ``mount failed`` into the observation. Early refusals (``VFS:
Can't find ext4 filesystem``, unsupported features, ``no journal found``) print no ``mount
failed``; this source infers them: an error-level ``EXT4-fs (D): ...`` line while D has no
mounted ext4 in sysfs, not followed shortly by a mount of D.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import SourceFailed, SourceUnavailable
from ..events import Kernel, Observation
from ..kernel.classify import classify
from ..kernel.ext4 import ext4_message
from ..kernel.kmsg import RECORD_MAX, SOURCE, KmsgRecord, parse_record, record_device
from ..kernel.mountfail import REASON_DEVICES, MountFailureReasons
from ..typing import Ready, Send

__all__ = ["KmsgReader", "KmsgSource", "RECORD_MAX", "open_kmsg", "boot_wallclock"]


class KmsgReader(Protocol):
    """A non-blocking record reader (the test seam in front of ``/dev/kmsg``)."""

    def fileno(self) -> int: ...

    def read(self) -> bytes:
        """One whole record. Raises ``BlockingIOError`` when none is ready and
        ``BrokenPipeError`` when records were overwritten before they were read."""

    def close(self) -> None: ...


class _DevKmsg:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.lseek(self._fd, 0, os.SEEK_END)  # only records written from now on
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes:
        return os.read(self._fd, RECORD_MAX)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def open_kmsg(path: str) -> KmsgReader:
    """Open ``path`` non-blocking, positioned after the last record already in the buffer."""
    return _DevKmsg(path)


def boot_wallclock() -> float:
    """Wall-clock time of the zero of kmsg timestamps.

    printk stamps records with ``local_clock()`` (sched_clock), which like ``CLOCK_MONOTONIC``
    stops during suspend; ``CLOCK_BOOTTIME`` keeps counting, so after a suspend it would put
    every record late by the time slept. CLOCK_MONOTONIC is the better match (measured here:
    record stamps trail CLOCK_MONOTONIC by ~0.2 ms).
    """
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


class KmsgSource:
    """Reads ``/dev/kmsg`` from the end and sends one observation per recognised record.

    Error handling: ``EAGAIN`` waits for the next readiness; ``EPIPE`` (the reader was overrun
    and the kernel skipped records) is counted and reading goes on, and the hole in sequence
    numbers becomes one ``events.lost`` observation; ``EINTR`` retries; end of file or any
    other read error ends :meth:`run` with :class:`SourceFailed`. Failing to open raises
    :class:`SourceUnavailable` before ``ready``.

    ``boot_wallclock=None`` recomputes :func:`boot_wallclock` on every wake-up, so a step of the
    wall clock (NTP) is followed; a number pins it (tests).

    Latency: printk wakes ``/dev/kmsg`` readers through a *lazy* irq_work, which runs on the
    next timer tick, so readiness comes up to one tick (4 ms at HZ=250) after the record is
    stored. Measured on the 6.18 test machine (HZ=250), record stamp to read: epoll p50 2.9 ms,
    p99 4.3 ms; reading without waiting for readiness, p50 0.25 ms. ``poll_interval`` (seconds)
    adds a timer that also drains the buffer every so often, trading wake-ups for latency;
    ``None`` (default) relies on readiness alone.
    """

    name = SOURCE

    def __init__(
        self,
        path: str = "/dev/kmsg",
        *,
        boot_wallclock: float | None = None,
        opener: Callable[[str], KmsgReader] = open_kmsg,
        kernel_only: bool = True,
        batch: int = 256,
        poll_interval: float | None = None,
    ) -> None:
        self.path = path
        self.boot_wallclock = boot_wallclock
        self.kernel_only = kernel_only
        self._opener = opener
        self._batch = batch
        self.poll_interval = poll_interval
        self.records_read = 0  # well-formed records parsed
        self.malformed = 0  # reads that were not a record
        self.overruns = 0  # EPIPE returns
        self.lost_total = 0  # records the kernel overwrote before we read them
        self.sent = 0
        self._last_seq: int | None = None
        self._overrun_pending = False
        self._reasons = MountFailureReasons()
        self._poke: Callable[[], None] | None = None
        # device -> the error-level ext4 line seen while no filesystem of it was mounted
        self._refusals: dict[str, tuple[KmsgRecord, float]] = {}
        self.refusal_delay = 0.3
        self.ext4_sysfs = "/sys/fs/ext4"

    def status(self) -> dict[str, int]:
        return {
            "records_read": self.records_read,
            "malformed": self.malformed,
            "overruns": self.overruns,
            "lost_total": self.lost_total,
            "sent": self.sent,
        }

    async def run(self, send: Send, ready: Ready) -> None:
        try:
            reader = self._opener(self.path)
        except OSError as e:
            raise SourceUnavailable(f"cannot open {self.path}: {e.strerror or e}", _open_hint(e)) from e
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fd = reader.fileno()
        registered = False
        timer: asyncio.TimerHandle | None = None

        def tick(interval: float) -> None:
            nonlocal timer
            self._on_readable(reader, send, done)
            if not done.done():
                timer = loop.call_later(interval, tick, interval)

        self._poke = lambda: self._on_readable(reader, send, done)
        self._send_later = lambda delay, fn: loop.call_later(delay, fn, send)
        try:
            ready()
            loop.add_reader(fd, self._on_readable, reader, send, done)
            registered = True
            if self.poll_interval:
                timer = loop.call_later(self.poll_interval, tick, self.poll_interval)
            await done
        finally:
            self._poke = None
            if timer is not None:
                timer.cancel()
            if registered:
                loop.remove_reader(fd)
            reader.close()

    def read_now(self) -> None:
        """Read what the ring buffer already holds, without waiting for readiness.

        The record is stored before ext4 notifies fanotify, but the reader's wake-up comes up
        to a tick later; the daemon calls this when it is waiting for a kmsg line.
        """
        if self._poke is not None:
            self._poke()

    # The reader callback: synchronous, drains up to `batch` records per wake-up.
    def _on_readable(self, reader: KmsgReader, send: Send, done: asyncio.Future[None]) -> None:
        if done.done():
            return
        try:
            bw = self.boot_wallclock if self.boot_wallclock is not None else boot_wallclock()
            for _ in range(self._batch):
                try:
                    raw = reader.read()
                except BlockingIOError:
                    return
                except BrokenPipeError:
                    self.overruns += 1
                    self._overrun_pending = True
                    continue
                except InterruptedError:
                    continue
                except OSError as e:
                    raise SourceFailed(f"reading {self.path}: {e}") from e
                if not raw:
                    raise SourceFailed(f"{self.path}: unexpected end of file")
                self._handle(raw, bw, send)
        except Exception as e:  # noqa: BLE001 - surface it through run(), not the loop's log
            done.set_exception(e)

    def _handle(self, raw: bytes, bw: float, send: Send) -> None:
        rec = parse_record(raw)
        if rec is None:
            self.malformed += 1
            return
        self.records_read += 1
        self._account(rec, bw, send)
        obs = classify(rec, bw, kernel_only=self.kernel_only)
        if obs is None:
            if rec.facility == 0 or not self.kernel_only:
                self._reasons.remember(rec)
                self._watch_refusal(rec, bw)
            return
        if obs.kind == "fs.mount_failed":
            obs = self._reasons.explain(rec, obs)
            if obs.device is not None and obs.device.name:
                self._refusals.pop(obs.device.name, None)
        self.sent += 1
        send(obs)

    def _account(self, rec: KmsgRecord, bw: float, send: Send) -> None:
        last, self._last_seq = self._last_seq, rec.seq
        pending, self._overrun_pending = self._overrun_pending, False
        if last is not None and rec.seq > last + 1:
            lost = rec.seq - last - 1
            details: dict[str, Any] = {"reason": "kmsg_overrun", "first_seq": last + 1, "last_seq": rec.seq - 1}
        elif pending and last is None:
            # Overrun before the first record: the size of the hole is unknown.
            lost, details = 1, {"reason": "kmsg_overrun", "exact": False}
        else:
            return
        self.lost_total += lost
        self.sent += 1
        send(
            Observation(
                source=SOURCE, kind="events.lost", time=bw + rec.ts_usec / 1e6, count=lost, details=details
            )
        )

    def _watch_refusal(self, rec: KmsgRecord, bw: float) -> None:
        """Early mount refusals (``no journal found``, ``VFS: Can't find ext4 filesystem``) print
        their reason at error level and no ``mount failed`` after it. An error-level
        ``EXT4-fs (D): ...`` line while D has no mounted ext4, not followed shortly by a mount
        of D, is a refused mount."""
        found = ext4_message(rec)
        if found is None:
            return
        dev, text = found
        if text.startswith("mounted filesystem"):
            self._refusals.pop(dev, None)
            return
        if rec.level > 3 or dev in self._refusals or os.path.exists(f"{self.ext4_sysfs}/{dev}"):
            return
        if len(self._refusals) >= REASON_DEVICES:
            return
        self._refusals[dev] = (rec, bw)
        later = getattr(self, "_send_later", None)
        if later is not None:
            later(self.refusal_delay, lambda send, dev=dev: self._check_refusal(dev, send))

    def _check_refusal(self, dev: str, send: Send) -> None:
        found = self._refusals.pop(dev, None)
        if found is None or os.path.exists(f"{self.ext4_sysfs}/{dev}"):
            return
        rec, bw = found
        text = ext4_message(rec)[1]  # type: ignore[index]  # _watch_refusal keeps only records it parsed
        self.sent += 1
        send(Observation(
            source=SOURCE, kind="fs.mount_failed", time=bw + rec.ts_usec / 1e6,
            device=record_device(dev, rec.props), kernel=Kernel(message=text), fs="ext4",
            details={"reason": text, "inferred": "no mount followed an error-level ext4 message"},
        ))


def _open_hint(e: OSError) -> str | None:
    if e.errno in (_errno.EACCES, _errno.EPERM):
        return "run as root (CAP_SYSLOG), or check kernel.dmesg_restrict and the LSM policy"
    if e.errno == _errno.ENOENT:
        return "no /dev/kmsg: mount devtmpfs on /dev (containers often hide it)"
    return None
