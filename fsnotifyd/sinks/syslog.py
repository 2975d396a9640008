"""Events to the system log: journald's native protocol (structured fields) or syslog.

Why both: where journald runs, its native protocol keeps every field of an event queryable
(``journalctl FSNOTIFYD_VE=101 FSNOTIFYD_KIND=fs.error``) and the whole event rides along as
``FSNOTIFYD_JSON``; elsewhere a syslog daemon on ``/dev/log`` gets RFC 5424 (fields as
structured data) or RFC 3164 (fields as ``key=value`` after the text), whichever it parses.

Transport, for both: one ``AF_UNIX``/``SOCK_DGRAM`` datagram per event, sent with ``sendto``
to the socket's path from a non-blocking socket. Nothing here may hold up the event loop, so
a full receive queue (``EAGAIN``) drops the event and counts it (``lost{source="syslog",
reason="busy"}``) rather than waiting. Because the socket is never ``connect()``-ed, every send
resolves the path afresh: a logger that is missing (``ENOENT``) or dead (``ECONNREFUSED``)
costs the event (``reason="unreachable"``, warned at most once a minute), and one that starts
or restarts later is reached by the next event with no reconnect logic to get wrong.

journald (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): ``NAME=value\\n`` per field, or, for a
value holding a newline, ``NAME\\n`` + 64-bit little-endian length + value + ``\\n``. A datagram
larger than the socket's send buffer fails with ``EMSGSIZE``; it is then written to a sealed
memfd that is passed with ``SCM_RIGHTS`` in an empty datagram, as ``sd_journal_send`` does
(journald only trusts a memfd sealed against writes and size changes, so all seals are set).

Target ``auto``: without ``path``, journald if ``/run/systemd/journal/socket`` exists, else
syslog on ``/dev/log`` (re-checked while nothing is reachable, so a journald that comes up
after the daemon is used). With ``path``, the path's shape decides: a file named ``socket`` in
a directory named ``journal`` (or ``journal.<namespace>``, a journald namespace) is journald,
anything else is a syslog socket.

Syslog datagrams are cut at :data:`MAX_SYSLOG_BYTES` (rsyslog's default message limit) with a
marker; the human text is shortened, never the structured part. Note for operators: rsyslog's
``imuxsock`` reads RFC 5424 on ``/dev/log`` only with ``SysSock.UseSpecialParser="off"``, and
syslog-ng's ``unix-dgram()`` only with ``flags(syslog-protocol)``; RFC 3164 works everywhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from ..config import SyslogConfig
from ..events import SEVERITIES, SEVERITY_PRIORITY, Event, KindFilter, errno_name, rfc3339
from ..metrics import Metrics
from ..sinkvalues import FACILITIES, facility_code  # noqa: F401 - FACILITIES is part of this module's API

log = structlog.get_logger("fsnotifyd")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"

# syslog(3) levels of the event severities (events.SEVERITY_PRIORITY); "notice" (5) has no
# event severity and is used only for unknown ones.
PRIORITIES: Mapping[str, int] = SEVERITY_PRIORITY
UNKNOWN_PRIORITY = 5

# 32473 is the enterprise number RFC 5612 reserves for documentation: fine until fsnotifyd
# has one of its own, and RFC 5424 receivers only need the SD-ID to be well-formed.
SD_ID = "fsnotifyd@32473"
MAX_SYSLOG_BYTES = 8192
TRUNCATED = "...(truncated)"  # no "]": it would need escaping inside SD values
# Each structured value is capped so that the structured part fits a syslog datagram with room
# for the text: only six values are free text (ve, device, mount, fs, function, comm), and even
# escaped to twice their size they take 6 x 512 bytes, well under MAX_SYSLOG_BYTES.
MAX_PARAM_BYTES = 256
WARN_INTERVAL_S = 60.0

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# errno -> the lost-event reason it means. Anything not here is a fault of this sink ("error").
_REASONS: Mapping[int, str] = {
    errno.EAGAIN: "busy",  # the receiver's queue is full (EWOULDBLOCK is the same number)
    errno.ENOBUFS: "busy",
    errno.ETOOMANYREFS: "busy",  # too many fds in flight to a receiver that is not reading
    errno.ENOENT: "unreachable",  # no socket: the logger is not installed or not started
    errno.ECONNREFUSED: "unreachable",  # a socket file nobody listens on: the logger died
    errno.ENOTDIR: "unreachable",
}

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def resolve_target(cfg: SyslogConfig, exists: Callable[[str], bool] = os.path.exists) -> tuple[str, str]:
    """``("journal" | "syslog", socket path)`` for a configuration (see the module docstring)."""
    if cfg.target == "journal":
        return "journal", cfg.path or JOURNAL_SOCKET
    if cfg.target == "syslog":
        return "syslog", cfg.path or SYSLOG_SOCKET
    if cfg.target != "auto":
        raise ValueError(f"unknown syslog target {cfg.target!r}; expected auto, journal or syslog")
    if cfg.path:
        parent = os.path.basename(os.path.dirname(os.path.normpath(cfg.path)))
        looks_journal = os.path.basename(cfg.path) == "socket" and (
            parent == "journal" or parent.startswith("journal.")
        )
        return ("journal" if looks_journal else "syslog"), cfg.path
    return ("journal", JOURNAL_SOCKET) if exists(JOURNAL_SOCKET) else ("syslog", SYSLOG_SOCKET)


# -- what an event says ----------------------------------------------------------------------


def summary(event: Event) -> str:
    """One line for a human: what, where, the kernel's words (or the best stand-in), who saw it.

    e.g. ``fs.error on loop3 (VE 101, /vz/101): EXT4-fs error (device loop3): ... [kmsg,sysfs]``
    """
    head = event.kind
    dev = _device(event)
    if dev:
        head += f" on {dev}"
    where = [p for p in (f"VE {event.ve}" if event.ve else None, event.mount) if p]
    if where:
        head += f" ({', '.join(where)})"
    text = _text(event)
    line = f"{head}: {text}" if text else head
    if event.count > 1:
        line += f" (count {event.count})"
    if event.sources:
        line += f" [{','.join(event.sources)}]"
    return line


def _text(event: Event) -> str:
    k = event.kernel
    if k.message:
        # A multi-line kernel text stays whole in FSNOTIFYD_KERNEL_MESSAGE; here one line.
        return " | ".join(s.strip() for s in k.message.splitlines() if s.strip())
    d = event.details
    for key in ("message", "error"):
        if isinstance(d.get(key), str) and d[key]:
            return " | ".join(s.strip() for s in d[key].splitlines() if s.strip())
    parts: list[str] = []
    if k.function:
        parts.append(k.function if k.line is None else f"{k.function}:{k.line}")
    if k.errno is not None:
        parts.append(errno_name(k.errno) or f"errno {abs(k.errno)}")
    if isinstance(d.get("rule"), str):
        parts.append(f"rule {d['rule']}")
    if isinstance(d.get("action"), str):
        parts.append(f"action {d['action']}")
    return ", ".join(parts)


def _device(event: Event) -> str | None:
    dev = event.device
    if dev is None:
        return None
    if dev.name:
        return dev.name
    return None if dev.devnum is None else f"{dev.major}:{dev.minor}"


def params(event: Event) -> list[tuple[str, str]]:
    """The event's fields as (lower-case name, text), None values left out.

    One list for all three formats, so journald fields, SD-PARAMs and key=value pairs agree.
    """
    k = event.kernel
    raw: list[tuple[str, object]] = [
        ("id", event.id),
        ("kind", event.kind),
        ("severity", event.severity),
        ("ve", event.ve),
        ("device", _device(event)),
        ("mount", event.mount),
        ("fs", event.fs),
        ("errno", None if k.errno is None else (errno_name(k.errno) or str(abs(k.errno)))),
        ("function", k.function),
        ("line", k.line),
        ("inode", k.inode),
        ("block", k.block),
        ("comm", k.comm),
        ("pid", k.pid),
        ("count", event.count),
        ("sources", ",".join(event.sources) or None),
    ]
    return [(name, str(value)) for name, value in raw if value is not None]


def journal_fields(event: Event, ident: str, facility: int) -> list[tuple[str, str]]:
    """The native-protocol fields of one event, in the order they are sent."""
    fields = [
        ("MESSAGE", summary(event)),
        ("PRIORITY", str(PRIORITIES.get(event.severity, UNKNOWN_PRIORITY))),
        ("SYSLOG_IDENTIFIER", ident),
        ("SYSLOG_FACILITY", str(facility)),
    ]
    if event.kernel.errno is not None:
        # journald's well-known ERRNO= (decimal), so `journalctl ERRNO=5` works as elsewhere.
        fields.append(("ERRNO", str(abs(event.kernel.errno))))
    for name, value in params(event):
        fields.append(("FSNOTIFYD_EVENT_ID" if name == "id" else f"FSNOTIFYD_{name.upper()}", value))
    if event.kernel.message is not None:
        fields.append(("FSNOTIFYD_KERNEL_MESSAGE", event.kernel.message))  # verbatim, newlines kept
    fields.append(("FSNOTIFYD_JSON", event.to_json()))
    return fields


def encode_journal(fields: Iterable[tuple[str, str]]) -> bytes:
    """Serialise fields in journald's native format (text form, or binary when needed)."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def _pri(event: Event, facility: int) -> int:
    return facility * 8 + PRIORITIES.get(event.severity, UNKNOWN_PRIORITY)


def _token(text: str | None, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or the NILVALUE."""
    if not text:
        return "-"
    return "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _cap(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked if cut."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    keep = max(limit - len(TRUNCATED), 0)
    return data[:keep].decode("utf-8", "ignore") + TRUNCATED


def sd_escape(value: str) -> str:
    """An RFC 5424 PARAM-VALUE: ``"``, ``\\`` and ``]`` escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _kv_value(value: str) -> str:
    if value and not any(c.isspace() or c in '"=\\' for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _assemble(head: str, text: str, tail: str, limit: int) -> bytes:
    """head + text + tail within ``limit`` bytes, shortening only the text."""
    room = limit - len(head.encode("utf-8", "backslashreplace")) - len(tail.encode("utf-8", "backslashreplace"))
    return (head + _cap(text, max(room, len(TRUNCATED))) + tail).encode("utf-8", "backslashreplace")


def format_rfc5424(event: Event, ident: str, facility: int, pid: int, limit: int = MAX_SYSLOG_BYTES) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [fsnotifyd@32473 ...] MSG``."""
    sd = " ".join(f'{name}="{sd_escape(_one_line(_cap(value, MAX_PARAM_BYTES)))}"' for name, value in params(event))
    head = (
        f"<{_pri(event, facility)}>1 {rfc3339(event.time)} {_token(event.host, 255)} {_token(ident, 48)} "
        f"{pid} {_token(event.kind, 32)} [{SD_ID} {sd}] "
    )
    # No UTF-8 BOM before MSG: RFC 5424 allows MSG-ANY, and receivers that do not strip the
    # BOM would show it as garbage at the start of every line.
    return _assemble(head, _one_line(summary(event)), "", limit)


def format_rfc3164(event: Event, ident: str, facility: int, pid: int, limit: int = MAX_SYSLOG_BYTES) -> bytes:
    """``<PRI>Mmm dd hh:mm:ss ident[pid]: MESSAGE key=value ...`` as glibc's syslog(3) sends it
    on ``/dev/log``: local time, no hostname (the local daemon adds its own)."""
    t = time.localtime(event.time)
    # Month names from a table, not strftime("%b"), which follows the locale.
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    tag = "".join(c for c in ident if 33 <= ord(c) <= 126 and c not in "[]:") or "fsnotifyd"
    kv = " ".join(f"{name}={_kv_value(_one_line(_cap(value, MAX_PARAM_BYTES)))}" for name, value in params(event))
    head = f"<{_pri(event, facility)}>{stamp} {tag}[{pid}]: "
    return _assemble(head, _one_line(summary(event)), f" {kv}", limit)


# -- the sink --------------------------------------------------------------------------------


@dataclass
class SyslogStats:
    """What this sink did, for status output and tests (the metrics hold the same losses)."""

    sent: int = 0
    via_memfd: int = 0
    filtered: int = 0
    lost: dict[str, int] = field(default_factory=dict)


@dataclass
class _Throttle:
    """At most one warning per key per interval; the ones held back are counted into the next."""

    interval: float = WARN_INTERVAL_S
    last: dict[str, float] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)

    def due(self, key: str, now: float) -> int | None:
        """None while quiet; else the number of occurrences held back since the last warning."""
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.held[key] = self.held.get(key, 0) + 1
            return None
        self.last[key] = now
        return self.held.pop(key, 0)


class SyslogSink:
    """Publishes events to journald or a syslog daemon without ever blocking the caller."""

    name = "syslog"
    max_syslog_bytes = MAX_SYSLOG_BYTES

    def __init__(self, cfg: SyslogConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.facility = facility_code(cfg.facility)
        if cfg.format not in ("rfc5424", "rfc3164"):
            raise ValueError(f"unknown syslog format {cfg.format!r}; expected rfc5424 or rfc3164")
        if cfg.min_severity not in SEVERITIES:
            raise ValueError(f"unknown min_severity {cfg.min_severity!r}; expected one of {', '.join(SEVERITIES)}")
        if not cfg.ident or any(c.isspace() for c in cfg.ident):
            raise ValueError(f"syslog ident {cfg.ident!r} must be non-empty and without spaces")
        try:
            self._kinds = KindFilter.parse(cfg.kinds)
        except ValueError as e:
            raise ValueError(f"syslog kinds: {e}") from None
        self._min_rank = SEVERITIES.index(cfg.min_severity)
        self.target, self.path = resolve_target(cfg)
        if len(os.fsencode(self.path)) >= 108:  # sun_path; sendto would fail on every event
            raise ValueError(f"syslog socket path is too long for a unix socket: {self.path}")
        # Only "auto" with no path may change its mind later (journald may start after us).
        self._reresolve = cfg.target == "auto" and not cfg.path
        self.stats = SyslogStats()
        self._sock: socket.socket | None = None
        self._unreachable = False
        self._throttle = _Throttle()

    # -- filtering ---------------------------------------------------------------------------
    def wants(self, event: Event) -> bool:
        if not self._kinds(event.kind):
            return False
        # An unknown severity passes: better a line too many than an event silently missing.
        rank = SEVERITIES.index(event.severity) if event.severity in SEVERITIES else len(SEVERITIES)
        return rank >= self._min_rank

    # -- publishing --------------------------------------------------------------------------
    def publish(self, event: Event) -> None:
        if not self.wants(event):
            self.stats.filtered += 1
            return
        if self._unreachable and self._reresolve:
            self.target, self.path = resolve_target(self.cfg)
        if self.target == "journal":
            self._send(encode_journal(journal_fields(event, self.cfg.ident, self.facility)), journal=True)
        else:
            fmt = format_rfc5424 if self.cfg.format == "rfc5424" else format_rfc3164
            self._send(fmt(event, self.cfg.ident, self.facility, os.getpid(), self.max_syslog_bytes), journal=False)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        return self._sock

    def _send(self, data: bytes, *, journal: bool) -> None:
        try:
            self._socket().sendto(data, socket.MSG_DONTWAIT, self.path)
        except OSError as e:
            if e.errno == errno.EMSGSIZE and journal:
                self._send_memfd(data)
            else:
                self._failed(e)
            return
        self._delivered()

    def _send_memfd(self, data: bytes) -> None:
        """The documented route for a datagram too large to send: a sealed memfd, by fd.

        The memfd lives in memory (no disk, no blocking); our copy is closed at once, the
        kernel keeps it alive in flight until journald has read it.
        """
        try:
            fd = os.memfd_create("fsnotifyd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            self._failed(e)
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._socket().sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))], socket.MSG_DONTWAIT, self.path
            )
        except OSError as e:
            self._failed(e)
            return
        finally:
            os.close(fd)
        self.stats.via_memfd += 1
        self._delivered()

    def _delivered(self) -> None:
        self.stats.sent += 1
        if self._unreachable:
            self._unreachable = False
            log.info("syslog.reachable", target=self.target, path=self.path)

    def _failed(self, e: OSError) -> None:
        reason = _REASONS.get(e.errno or 0, "too_large" if e.errno == errno.EMSGSIZE else "error")
        self.stats.lost[reason] = self.stats.lost.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.lost.labels("syslog", reason).inc()
            if reason == "error":
                self.metrics.sink_failures.labels(self.name).inc()
        if reason == "unreachable":
            self._unreachable = True
        held = self._throttle.due(reason, time.monotonic())
        if held is not None:
            log.warning(f"syslog.{reason}", target=self.target, path=self.path, error=e.strerror or str(e),
                        errno=errno_name(e.errno), lost_since_last_warning=held + 1,
                        lost_total=self.stats.lost[reason])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
