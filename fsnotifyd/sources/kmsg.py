"""The kernel log (``/dev/kmsg``): the only source that carries ext4's own words.

Two layers:

* Pure parsing, no I/O. :func:`parse_record` turns one ``/dev/kmsg`` record
  (``PRI,SEQ,TS_USEC,FLAGS[,KEY=VAL...];MESSAGE\\n`` plus `` KEY=VALUE\\n`` continuation lines)
  into a :class:`KmsgRecord`; :func:`classify` turns a record into an :class:`Observation` or
  ``None``. Neither ever raises, whatever the bytes.
* :class:`KmsgSource`, which reads records as they are written and handles overruns.

Formats recognised (kernel 6.18; strings from the kernel source, checked against records
captured on this kernel):

=====================================================================  ========================
``EXT4-fs error (device D): FUNC:LINE: [inode #I: [block B: ]]comm C: [path P: ]MSG``
  (fs/ext4/super.c ``__ext4_error``, ``__ext4_error_inode``, ``__ext4_error_file``)  fs.error
``EXT4-fs error (device D): FUNC:LINE: group G, [inode I: ][block B:]MSG``
  (``__ext4_grp_locked_error``)                                                     fs.error
``EXT4-fs error (device D) in FUNC:LINE: ERRSTR`` (``__ext4_std_error``)            fs.error
``EXT4-fs warning (device D): FUNC:LINE: [inode #I: comm C: ]MSG``                  fs.warning
``EXT4-fs (D): Remounting filesystem read-only`` (``ext4_handle_error``)            fs.readonly
``Aborting journal on device D-INO.`` (fs/jbd2/journal.c)                           fs.readonly
``EXT4-fs (D): shut down requested (FLAGS)`` (fs/ext4/ioctl.c)                      fs.shutdown
``EXT4-fs (D): mount failed`` (``__ext4_fill_super``, label ``failed_mount4``)      fs.mount_failed
``STATUS error, dev D, sector S op 0xN:(OP) flags ...`` (block/blk-core.c)          blk.io_error
``Buffer I/O error on dev D, logical block N[, CONTEXT]`` (fs/buffer.c) and
``Buffer I/O error on device D, logical block N`` (fs/ext4/page-io.c)               blk.io_error
=====================================================================  ========================

Anything else, including the other ``EXT4-fs (D): ...`` lines (mounted, unmounting, quota
notes), is ``None``.

Mount failures: ext4 prints ``mount failed`` only for failures late in ``__ext4_fill_super``
and the reason on the line before it (``get root inode failed``). The pure :func:`classify`
reports ``kernel.message = "mount failed"``; :class:`KmsgSource` keeps, per device, the last
unclassified ``EXT4-fs (D): ...`` line and, when it came at most a few records and one second
before ``mount failed``, puts its text in ``kernel.message`` and ``details["reason"]``. Early
refusals (``VFS: Can't find ext4 filesystem``, unsupported features) are not followed by
``mount failed`` on 6.18 and produce no observation.

Trust: records written from user space into ``/dev/kmsg`` always carry a non-zero facility (the
kernel forces ``LOG_USER`` when the writer gives none), so by default :func:`classify` ignores
every record whose facility is not 0 (kernel): a program that logs a copy of an ext4 line does
not make a false event.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import re
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

from ..errors import SourceFailed, SourceUnavailable
from ..events import Device, Kernel, Observation
from ..typing import Ready, Send

__all__ = [
    "KmsgRecord",
    "KmsgReader",
    "KmsgSource",
    "classify",
    "ext4_message",
    "journal_device",
    "parse_record",
    "open_kmsg",
    "boot_wallclock",
]

SOURCE = "kmsg"
RECORD_MAX = 8192  # CONSOLE_EXT_LOG_MAX: one read of this size always returns one whole record

_EMPTY: Mapping[str, str] = MappingProxyType({})


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One ``/dev/kmsg`` record, its message and property values unescaped."""

    seq: int
    ts_usec: int
    level: int
    facility: int
    message: str
    props: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    caller: str | None = None  # ``T<pid>`` or ``C<cpu>`` with CONFIG_PRINTK_CALLER


_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape_sub(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def _text(raw: bytes) -> str:
    # The kernel escapes bytes < 0x20, >= 0x7f and the backslash itself as \xNN
    # (kernel/printk/printk.c msg_add_ext_text), so one left-to-right pass is exact.
    if b"\\" in raw:
        raw = _ESCAPE.sub(_unescape_sub, raw)
    return raw.decode("utf-8", "replace")


def _uint(raw: bytes) -> int | None:
    # bytes.isdigit() is ASCII only; int() alone would accept " 1", "+1" and "1_0".
    if 0 < len(raw) <= 20 and raw.isdigit():
        return int(raw)
    return None


def parse_record(raw: bytes) -> KmsgRecord | None:
    """Parse one record as read from ``/dev/kmsg``; ``None`` if it is malformed. Never raises."""
    try:
        return _parse_record(raw)
    except Exception:  # noqa: BLE001 - the contract is "never raises, whatever the bytes"
        return None


def _parse_record(raw: bytes) -> KmsgRecord | None:
    if not isinstance(raw, bytes):
        if not isinstance(raw, (bytearray, memoryview)):
            return None
        raw = bytes(raw)
    semi = raw.find(b";")
    if semi < 0:
        return None
    header = raw[:semi].split(b",")
    if len(header) < 4:
        return None
    pri, seq, ts = _uint(header[0]), _uint(header[1]), _uint(header[2])
    if pri is None or seq is None or ts is None or not header[3]:
        return None
    caller = None
    for extra in header[4:]:
        key, eq, value = extra.partition(b"=")
        if not eq or not key:
            return None
        if key == b"caller":
            caller = value.decode("ascii", "replace")

    body = raw[semi + 1 :]
    if body.endswith(b"\n"):
        body = body[:-1]
    if b"\n" not in body:
        return KmsgRecord(seq, ts, pri & 7, pri >> 3, _text(body), _EMPTY, caller)
    lines = body.split(b"\n")
    props: dict[str, str] = {}
    for line in lines[1:]:
        # Dictionary lines are " KEY=VALUE"; the message itself cannot hold a raw newline.
        if not line.startswith(b" "):
            return None
        key, eq, value = line[1:].partition(b"=")
        if not eq or not key:
            return None
        props[_text(key)] = _text(value)
    return KmsgRecord(seq, ts, pri & 7, pri >> 3, _text(lines[0]), MappingProxyType(props), caller)


# --------------------------------------------------------------------------------------------
# Classification

# ext4_decode_error() (fs/ext4/super.c); "error %d" is its fallback for other codes.
EXT4_ERRSTR: Mapping[str, int] = MappingProxyType(
    {
        "IO failure": _errno.EIO,
        "Out of memory": _errno.ENOMEM,
        "Corrupt filesystem": _errno.EUCLEAN,  # EFSCORRUPTED
        "Filesystem failed CRC": _errno.EBADMSG,  # EFSBADCRC
        "Readonly filesystem": _errno.EROFS,
        "Journal has aborted": _errno.EROFS,
    }
)

# blk_errors[] (block/blk-core.c): the status name printed by blk_print_req_error() → errno.
BLK_STATUS_ERRNO: Mapping[str, int] = MappingProxyType(
    {
        "operation not supported": _errno.EOPNOTSUPP,
        "timeout": _errno.ETIMEDOUT,
        "critical space allocation": _errno.ENOSPC,
        "recoverable transport": _errno.ENOLINK,
        "critical target": _errno.EREMOTEIO,
        "reservation conflict": _errno.EBADE,
        "critical medium": _errno.ENODATA,
        "protection": _errno.EILSEQ,
        "kernel resource": _errno.ENOMEM,
        "device resource": _errno.EBUSY,
        "nonblocking retry": _errno.EAGAIN,
        "device offline": _errno.ENODEV,
        "dm internal retry": _errno.EREMCHG,
        "open zones exceeded": _errno.ETOOMANYREFS,
        "active zones exceeded": _errno.EOVERFLOW,
        "duration limit exceeded": _errno.ETIME,
        "invalid": _errno.EINVAL,
        "I/O": _errno.EIO,
    }
)

# blk_status_t numbers (include/linux/blk_types.h), printed raw by ext4_end_bio. Only the
# values that have been stable for years; 18/19 moved between releases.
_BLK_STS_ERRNO: Mapping[int, int] = MappingProxyType(
    {
        1: _errno.EOPNOTSUPP,
        2: _errno.ETIMEDOUT,
        3: _errno.ENOSPC,
        4: _errno.ENOLINK,
        5: _errno.EREMOTEIO,
        6: _errno.EBADE,
        7: _errno.ENODATA,
        8: _errno.EILSEQ,
        9: _errno.ENOMEM,
        10: _errno.EIO,
        12: _errno.EAGAIN,
        13: _errno.EBUSY,
        16: _errno.ENODEV,
    }
)

_SHUTDOWN_MODES = {0: "default", 1: "logflush", 2: "nologflush"}  # EXT4_GOING_FLAGS_*

_EXT4_REPORT = re.compile(
    r"EXT4-fs (?P<sev>error|warning)(?: \(device (?P<dev>[^)\s]*)\))?"
    r"(?P<form>:| in) (?P<func>[^\s:]+):(?P<line>\d+): ?(?P<rest>.*)",
    re.DOTALL,
)
# What __ext4_error{,_inode,_file} and __ext4_warning_inode put between FUNC:LINE and the text.
_EXT4_FIELDS = re.compile(
    r"(?:inode #(?P<ino>\d+): )?(?:block (?P<blk>\d+): )?(?:comm (?P<comm>.{1,16}?): )?"
    r"(?:path (?P<path>.*?): )?(?P<msg>.*)",
    re.DOTALL,
)
_EXT4_GROUP = re.compile(
    r"group (?P<grp>\d+), (?:inode (?P<ino>\d+): )?(?:block (?P<blk>\d+):)?(?P<msg>.*)", re.DOTALL
)
_EXT4_END_BIO = re.compile(
    r"I/O error (?P<sts>\d+) writing to inode (?P<ino>\d+) starting block (?P<blk>\d+)\)?"
)
_EXT4_MSG = re.compile(r"EXT4-fs \((?P<dev>[^)\s]*)\): (?P<text>.*)", re.DOTALL)
_SHUTDOWN = re.compile(r"shut down requested \((?P<flags>\d+)\)")
_JOURNAL_ABORT = re.compile(r"Aborting journal on device (?P<dev>\S+?)\.?")
_BLK_REQ = re.compile(
    r"(?:blk_update_request: )?(?P<status>[^,]+?) error, dev (?P<dev>[^,\s]+), sector (?P<sector>\d+)"
    r"(?: op 0x(?P<opc>[0-9a-fA-F]+):\((?P<op>[^)]*)\))?(?P<tail>.*)",
    re.DOTALL,
)
_BLK_FLAGS = re.compile(r" flags 0x(?P<flags>[0-9a-fA-F]+)")
_BUFFER = re.compile(
    r"Buffer I/O error on dev(?:ice)? (?P<dev>[^,\s]+), logical block (?P<blk>\d+)(?:, (?P<ctx>.*))?",
    re.DOTALL,
)
_ERROR_N = re.compile(r"error (-?\d+)")
_JOURNAL_SUFFIX = re.compile(r"(?P<dev>.+)-\d+")
_DM_NAME = re.compile(r"dm-\d+")

# The cheap test every record goes through before any regex (the kmsg path is latency bound).
_PREFIXES = ("EXT4-fs", "Aborting journal on device ", "Buffer I/O error on dev")
_BLK_MARK = " error, dev "


def classify(rec: KmsgRecord, boot_wallclock: float, *, kernel_only: bool = True) -> Observation | None:
    """Map a record to an :class:`Observation` (``source="kmsg"``), or ``None``. Never raises.

    ``time`` is ``boot_wallclock + ts_usec / 1e6``. With ``kernel_only`` (the default) records
    that user space wrote into ``/dev/kmsg`` (facility != 0) are ignored.
    """
    try:
        msg = rec.message
        if not (msg.startswith(_PREFIXES) or _BLK_MARK in msg):
            return None
        if kernel_only and rec.facility != 0:
            return None
        return _classify(rec, msg, boot_wallclock + rec.ts_usec / 1e6)
    except Exception:  # noqa: BLE001 - never raises
        return None


def _device(name: str | None, props: Mapping[str, str]) -> Device | None:
    major = minor = None
    dev = props.get("DEVICE") if props else None
    if dev and dev.startswith("b"):  # "b7:3"; c/n/+ are char, net and other devices
        maj, colon, mnr = dev[1:].partition(":")
        if colon and maj.isdigit() and mnr.isdigit():
            major, minor = int(maj), int(mnr)
    if name in ("", "?"):
        name = None
    if name is None and major is None:
        return None
    return Device(major=major, minor=minor, name=name)


def _pid(caller: str | None) -> int | None:
    if caller and caller[0] == "T" and caller[1:].isdigit():
        return int(caller[1:])
    return None


def _classify(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    if msg.startswith("EXT4-fs"):
        if msg.startswith(("EXT4-fs error", "EXT4-fs warning")):
            return _ext4_report(rec, msg, when)
        if msg.startswith("EXT4-fs ("):
            return _ext4_msg(rec, msg, when)
        return None
    if msg.startswith("Aborting journal on device "):
        m = _JOURNAL_ABORT.fullmatch(msg)
        if m is None:
            return None
        journal = m.group("dev")
        return Observation(
            source=SOURCE,
            kind="fs.readonly",
            time=when,
            device=_device(journal_device(journal), rec.props),
            kernel=Kernel(pid=_pid(rec.caller), message=msg),
            details={"reason": "journal_aborted", "journal": journal},
        )
    if msg.startswith("Buffer I/O error on dev"):
        m = _BUFFER.fullmatch(msg)
        if m is None:
            return None
        block = int(m.group("blk"))
        details: dict[str, Any] = {"logical_block": block, "buffer": True}
        if m.group("ctx"):
            details["context"] = m.group("ctx")
        return Observation(
            source=SOURCE,
            kind="blk.io_error",
            time=when,
            device=_device(m.group("dev"), rec.props),
            kernel=Kernel(errno=_errno.EIO, block=block, pid=_pid(rec.caller), message=msg),
            details=details,
        )
    m = _BLK_REQ.fullmatch(msg)
    if m is None:
        return None
    status = m.group("status")
    sector = int(m.group("sector"))
    details = {"sector": sector, "op": m.group("op"), "error": status}
    flags = _BLK_FLAGS.match(m.group("tail") or "")
    if flags is not None:
        details["flags"] = int(flags.group("flags"), 16)
    return Observation(
        source=SOURCE,
        kind="blk.io_error",
        time=when,
        device=_device(m.group("dev"), rec.props),
        kernel=Kernel(
            errno=BLK_STATUS_ERRNO.get(status, _errno.EIO),
            block=sector,
            pid=_pid(rec.caller),
            message=msg,
        ),
        details=details,
    )


def journal_device(journal: str) -> str:
    """The block device of a jbd2 journal name: ``loop0-8`` (internal journal, inode 8) → ``loop0``.

    jbd2 names an internal journal ``<bdev>-<inode>`` and an external one ``<bdev>``; a bare
    ``dm-N`` is therefore an external journal on device-mapper, not ``dm`` with inode N.
    """
    if _DM_NAME.fullmatch(journal):
        return journal
    m = _JOURNAL_SUFFIX.fullmatch(journal)
    return m.group("dev") if m else journal


def _ext4_report(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    m = _EXT4_REPORT.fullmatch(msg)
    if m is None:
        return None
    kind = "fs.error" if m.group("sev") == "error" else "fs.warning"
    rest = m.group("rest")
    errno_: int | None = None
    ino = blk = None
    comm = None
    details: dict[str, Any] = {}
    if m.group("form") == " in":
        # __ext4_std_error: "in FUNC:LINE: ERRSTR"
        text = rest
        errno_ = EXT4_ERRSTR.get(rest)
        if errno_ is None:
            n = _ERROR_N.fullmatch(rest)
            if n is not None:
                errno_ = abs(int(n.group(1))) or None
    elif rest.startswith("group "):
        g = _EXT4_GROUP.fullmatch(rest)
        if g is None:
            return None
        details["group"] = int(g.group("grp"))
        ino = int(g.group("ino")) if g.group("ino") else None
        blk = int(g.group("blk")) if g.group("blk") else None
        text = g.group("msg").lstrip(" ")
    else:
        f = _EXT4_FIELDS.fullmatch(rest)
        if f is None:  # pragma: no cover - the pattern matches every string
            return None
        ino = int(f.group("ino")) if f.group("ino") else None
        blk = int(f.group("blk")) if f.group("blk") else None
        comm = f.group("comm")
        if f.group("path") is not None:
            details["path"] = f.group("path")
        text = f.group("msg")
        if kind == "fs.warning" and m.group("func") == "ext4_end_bio":
            # "I/O error 3 writing to inode 12 starting block 21761)": the number is a blk_status_t.
            b = _EXT4_END_BIO.match(text)
            if b is not None:
                status = int(b.group("sts"))
                details["blk_status"] = status
                errno_ = _BLK_STS_ERRNO.get(status, _errno.EIO)
                ino = ino if ino is not None else int(b.group("ino"))
                blk = blk if blk is not None else int(b.group("blk"))
    return Observation(
        source=SOURCE,
        kind=kind,
        time=when,
        device=_device(m.group("dev"), rec.props),
        kernel=Kernel(
            errno=errno_,
            function=m.group("func"),
            line=int(m.group("line")),
            inode=ino,
            block=blk,
            comm=comm,
            pid=_pid(rec.caller),
            message=text,
        ),
        fs="ext4",
        details=details,
    )


def ext4_message(rec: KmsgRecord) -> tuple[str, str] | None:
    """``(device, text)`` of an ``EXT4-fs (D): text`` line, else ``None``."""
    if not rec.message.startswith("EXT4-fs ("):
        return None
    m = _EXT4_MSG.fullmatch(rec.message)
    return None if m is None else (m.group("dev"), m.group("text"))


def _ext4_msg(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    m = _EXT4_MSG.fullmatch(msg)
    if m is None:
        return None
    text = m.group("text")
    details: dict[str, Any]
    if text == "Remounting filesystem read-only":
        kind, details = "fs.readonly", {"reason": "errors_remount_ro"}
    elif text == "mount failed":
        kind, details = "fs.mount_failed", {}
    elif text.startswith("shut down requested"):
        s = _SHUTDOWN.fullmatch(text)
        if s is None:
            return None
        flags = int(s.group("flags"))
        kind, details = "fs.shutdown", {"flags": flags}
        if flags in _SHUTDOWN_MODES:
            details["mode"] = _SHUTDOWN_MODES[flags]
    else:
        return None
    return Observation(
        source=SOURCE,
        kind=kind,
        time=when,
        device=_device(m.group("dev"), rec.props),
        kernel=Kernel(pid=_pid(rec.caller), message=text),
        fs="ext4",
        details=details,
    )


# --------------------------------------------------------------------------------------------
# The source


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


_REASON_RECORDS = 8  # "mount failed" follows its reason within this many records ...
_REASON_USEC = 1_000_000  # ... and this many microseconds
_REASON_DEVICES = 64  # bound of the per-device memory


class MountFailureReasons:
    """Per device, the last ``EXT4-fs (D): ...`` line nothing else claimed, so that a following
    ``mount failed`` can say why (ext4 prints the reason on the line before). Pure: the live
    source and the replay of kernel text share it."""

    def __init__(self, limit: int = _REASON_DEVICES) -> None:
        self.limit = limit
        self._reasons: dict[str, tuple[int, int, str]] = {}

    def remember(self, rec: KmsgRecord) -> tuple[str, str] | None:
        """Keep the line if it is an ext4 message; returns its (device, text)."""
        found = ext4_message(rec)
        if found is None:
            return None
        dev, text = found
        if dev not in self._reasons and len(self._reasons) >= self.limit:
            self._reasons.pop(next(iter(self._reasons)))
        self._reasons[dev] = (rec.seq, rec.ts_usec, text)
        return found

    def explain(self, rec: KmsgRecord, obs: Observation) -> Observation:
        """``obs`` (a ``mount failed``) with the remembered reason, when it came just before."""
        name = obs.device.name if obs.device is not None else None
        found = self._reasons.pop(name, None) if name is not None else None
        if found is None:
            return obs
        seq, ts, text = found
        if not (0 < rec.seq - seq <= _REASON_RECORDS and 0 <= rec.ts_usec - ts <= _REASON_USEC):
            return obs
        return replace(obs, kernel=replace(obs.kernel, message=text), details={**obs.details, "reason": text})


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

        def tick() -> None:
            nonlocal timer
            self._on_readable(reader, send, done)
            if not done.done():
                timer = loop.call_later(self.poll_interval, tick)

        self._poke = lambda: self._on_readable(reader, send, done)
        self._send_later = lambda delay, fn: loop.call_later(delay, fn, send)
        try:
            ready()
            loop.add_reader(fd, self._on_readable, reader, send, done)
            registered = True
            if self.poll_interval:
                timer = loop.call_later(self.poll_interval, tick)
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
        if len(self._refusals) >= _REASON_DEVICES:
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
        text = ext4_message(rec)[1]  # type: ignore[index]
        self.sent += 1
        send(Observation(
            source=SOURCE, kind="fs.mount_failed", time=bw + rec.ts_usec / 1e6,
            device=_device(dev, rec.props), kernel=Kernel(message=text), fs="ext4",
            details={"reason": text, "inferred": "no mount followed an error-level ext4 message"},
        ))


def _open_hint(e: OSError) -> str | None:
    if e.errno in (_errno.EACCES, _errno.EPERM):
        return "run as root (CAP_SYSLOG), or check kernel.dmesg_restrict and the LSM policy"
    if e.errno == _errno.ENOENT:
        return "no /dev/kmsg: mount devtmpfs on /dev (containers often hide it)"
    return None
