"""Plain kernel log text (``dmesg``, ``journalctl -k``) → kmsg records → observations. Pure.

The replay (:mod:`fsnotifyd.replay`) reads logs with it; the formats are the ones the tools print,
not fsnotifyd's, so they live with the other kernel text parsers.

Formats recognised, one line each (what the tools print on Debian 12, util-linux 2.38,
systemd 252):

=========================================================  ==============================  =========
``[ 6776.576606] MSG``                                     ``dmesg``                       monotonic
``[ 6776.576606] [  T4711] MSG`` (CONFIG_PRINTK_CALLER)    ``dmesg``                       monotonic
``[Wed Nov 25 21:58:41 2026] MSG``                         ``dmesg -T``                    local
``2026-11-25T21:58:41,301002+00:00 MSG``                   ``dmesg --time-format=iso``     zoned
``kern  :err   : [ 6776.576606] MSG``                      ``dmesg -x`` (any of the above)  level
``Nov 25 21:58:41 vm kernel: MSG``                         ``journalctl -k``, syslog       local, no year
``Nov 25 21:58:41.301002 vm kernel: MSG``                  ``-o short-precise``            local, no year
``2026-11-25T21:58:41.301002+0000 vm kernel: MSG``         ``-o short-iso[-precise]``      zoned
``[ 6776.576606] vm kernel: MSG``                          ``-o short-monotonic``          monotonic
``-- Boot 3e2f… --``, ``-- No entries --``, blank lines     markers                         ignored
=========================================================  ==============================  =========

A syslog file that kept the kernel's own stamp (``... vm kernel: [ 6776.576606] MSG``) is read
with the syslog time and the inner stamp dropped. A line indented by white space right after
an entry is a continuation (``dmesg`` and ``journalctl`` indent the further lines of a
multi-line message); it is not garbage, and it does not matter to classification (none of the
messages fsnotifyd recognises spans lines).

Things about these formats that matter:

* ``dmesg`` stamps are seconds since boot; ``dmesg -T`` is boot time + that stamp, computed by
  ``dmesg`` at the moment it ran, in local time and to the second only (and wrong after a
  suspend); ``journalctl`` prints local time without a year (``year`` argument; a file that
  crosses New Year is handled by the reader). All local times are read in ``tz`` (default:
  this machine's zone), so pass the zone of the machine that wrote the log.
* Only ``dmesg -x`` carries the level and facility; otherwise the level is taken as 3 (error)
  and the facility as 0 (kernel). In journal output, a line whose identifier is not
  ``kernel`` is a user-space message (``journalctl`` without ``-k``, or a program that wrote
  into ``/dev/kmsg``): it gets facility 1 (user), which :func:`~fsnotifyd.kernel.classify.classify`
  ignores, just as the daemon ignores such records.
* Nothing here raises on any input: :func:`parse_entry` returns ``None`` for a line it does not
  understand, and the reader counts it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from ..events import Observation
from .classify import classify
from .kmsg import KmsgRecord

__all__ = [
    "KernelLine",
    "detect_format",
    "is_marker",
    "is_continuation",
    "parse_entry",
    "parse_line",
    "to_record",
    "observe",
]

# syslog(3) names as dmesg -x prints them (util-linux lib: facility_names, level_names).
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "res0": 12, "res1": 13, "res2": 14, "res3": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}
LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warn": 4, "notice": 5, "info": 6, "debug": 7}
DEFAULT_LEVEL = 3

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_MON = r"(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"

# dmesg -x: "kern  :err   : " (names padded to a column).
_DECORATION = re.compile(
    r"(?P<fac>[a-z]+[0-7]?)\s*:(?P<lvl>emerg|alert|crit|err|warn|notice|info|debug)\s*: ?"
)
_MONO = re.compile(r"\[\s*(?P<sec>\d{1,12})\.(?P<frac>\d{1,9})\]")
_CALLER = re.compile(r" ?\[\s*(?P<caller>[TC]\d{1,10})\]")
_CTIME = re.compile(
    r"\[(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) " + _MON
    + r" {1,2}(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d) (?P<year>\d{4})\]"
)
_ISO = re.compile(
    r"(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)"
)
_SYSLOG_TIME = re.compile(
    _MON + r" {1,2}(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?:\.(?P<frac>\d{1,9}))?"
)
# After a journal/syslog time: "HOST IDENT[PID]: MSG" (the message may be empty).
_ORIGIN = re.compile(r" (?P<host>\S+) (?P<ident>[^\s\[\]:]+)(?:\[(?P<pid>\d+)\])?:(?: (?P<msg>.*)|$)", re.DOTALL)
_INNER_STAMP = re.compile(r"\[\s*\d{1,12}\.\d{1,9}\] ?")
_MARKER = re.compile(r"-- .*--")


@dataclass(frozen=True, slots=True)
class KernelLine:
    """One understood line of kernel log text."""

    time: float  # seconds since boot when ``monotonic``, else seconds since the epoch
    monotonic: bool
    message: str
    format: str  # dmesg, dmesg-T, dmesg-iso, journalctl, journalctl-precise, journalctl-iso, journalctl-monotonic
    level: int = DEFAULT_LEVEL
    facility: int = 0
    host: str | None = None
    caller: str | None = None
    yearless: bool = False  # the line had no year: ``time`` used the ``year`` given


def is_marker(line: str) -> bool:
    """``journalctl``'s ``-- Boot … --``, ``-- No entries --``, ``-- Logs begin at … --``."""
    return _MARKER.fullmatch(line.strip()) is not None


def is_boot_marker(line: str) -> bool:
    s = line.strip()
    return (s.startswith("-- Boot ") or s == "-- Reboot --") and is_marker(s)


def is_continuation(line: str) -> bool:
    """An indented further line of a multi-line message (valid only right after an entry)."""
    return line[:1] in (" ", "\t") and line.strip() != ""


def _local(dt: datetime, tz: tzinfo | None) -> float:
    # A naive datetime's timestamp() is read in this machine's zone (fold=0 in the DST overlap).
    return (dt if tz is None else dt.replace(tzinfo=tz)).timestamp()


def _frac(digits: str | None) -> float:
    return int(digits) / 10 ** len(digits) if digits else 0.0


def _iso_time(text: str, tz: tzinfo | None) -> float | None:
    text = text.replace(",", ".")
    if len(text) >= 5 and text[-5] in "+-" and text[-4:].isdigit():  # "+0000" → "+00:00"
        text = f"{text[:-2]}:{text[-2:]}"
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.timestamp() if dt.tzinfo is not None else _local(dt, tz)


def _current_year(tz: tzinfo | None) -> int:
    return datetime.now(tz).year


def parse_entry(line: str, *, year: int | None = None, tz: tzinfo | None = None) -> KernelLine | None:
    """Parse one line of kernel log text; ``None`` if it is not an entry. Never raises."""
    try:
        return _parse_entry(line, year, tz)
    except Exception:  # noqa: BLE001 - the contract is "never raises, whatever the text"
        return None


def _parse_entry(line: str, year: int | None, tz: tzinfo | None) -> KernelLine | None:
    if not isinstance(line, str):
        return None
    line = line.rstrip("\r\n")
    if not line or line[0] in " \t":
        return None
    level, facility = DEFAULT_LEVEL, 0
    decorated = False
    d = _DECORATION.match(line)
    if d is not None and d.group("fac") in FACILITIES:
        level, facility = LEVELS[d.group("lvl")], FACILITIES[d.group("fac")]
        line = line[d.end():]
        decorated = True
    first = line[:1]
    if first == "[":
        m = _MONO.match(line)
        if m is not None:
            rest = line[m.end():]
            t = int(m.group("sec")) + _frac(m.group("frac"))
            if not decorated:
                # journalctl -o short-monotonic: "[ 6776.576606] vm kernel: MSG"
                o = _ORIGIN.match(rest)
                if o is not None and o.group("ident") == "kernel" and o.group("pid") is None:
                    return KernelLine(t, True, o.group("msg") or "", "journalctl-monotonic",
                                      host=o.group("host"))
            return _dmesg(rest, t, True, "dmesg", level, facility)
        m = _CTIME.match(line)
        if m is not None:
            h, mi, s = (int(x) for x in m.group("hms").split(":"))
            dt = datetime(int(m.group("year")), _MONTHS[m.group("mon")], int(m.group("day")), h, mi, s)
            return _dmesg(line[m.end():], _local(dt, tz), False, "dmesg-T", level, facility)
        return None
    if first.isdigit():
        m = _ISO.match(line)
        if m is None:
            return None
        stamp = _iso_time(m.group("iso"), tz)
        if stamp is None:
            return None
        rest = line[m.end():]
        # dmesg writes "2026-11-25T21:58:41,301002+00:00" (comma); journalctl's short-iso and
        # rsyslog's RFC 3339 stamps use a dot, and are followed by "HOST IDENT: ".
        if not decorated and "," not in m.group("iso"):
            o = _ORIGIN.match(rest)
            if o is not None:
                return _journal(o, stamp, "journalctl-iso", False)
        if rest[:1] != " " and rest:
            return None
        return _dmesg(rest, stamp, False, "dmesg-iso", level, facility)
    if decorated:
        return None
    m = _SYSLOG_TIME.match(line)
    if m is None:
        return None
    o = _ORIGIN.match(line, m.end())
    if o is None:
        return None
    h, mi, s = (int(x) for x in m.group("hms").split(":"))
    y = year if year is not None else _current_year(tz)
    dt = datetime(y, _MONTHS[m.group("mon")], int(m.group("day")), h, mi, s)
    t = _local(dt, tz) + _frac(m.group("frac"))
    return _journal(o, t, "journalctl-precise" if m.group("frac") else "journalctl", True)


def _dmesg(rest: str, t: float, monotonic: bool, fmt: str, level: int, facility: int) -> KernelLine:
    caller = None
    c = _CALLER.match(rest)
    if c is not None:
        caller, rest = c.group("caller"), rest[c.end():]
    if rest.startswith(" "):
        rest = rest[1:]
    return KernelLine(t, monotonic, rest, fmt, level=level, facility=facility, caller=caller)


def _journal(o: re.Match[str], t: float, fmt: str, yearless: bool) -> KernelLine:
    msg = o.group("msg") or ""
    kernel = o.group("ident") == "kernel" and o.group("pid") is None
    if kernel:
        inner = _INNER_STAMP.match(msg)  # rsyslog's kern.log keeps the kernel's stamp
        if inner is not None:
            msg = msg[inner.end():]
    return KernelLine(t, False, msg, fmt, facility=0 if kernel else 1, host=o.group("host"),
                      yearless=yearless)


def parse_line(line: str, *, year: int | None = None, tz: tzinfo | None = None
               ) -> tuple[float, bool, str] | None:
    """``(timestamp_seconds, is_monotonic, message)`` of one line, or ``None``. Never raises.

    ``timestamp_seconds`` is seconds since boot when ``is_monotonic`` (``dmesg``), else seconds
    since the epoch; local times (``dmesg -T``, ``journalctl``) are read in ``tz`` (default:
    this machine's zone), and yearless ones (``journalctl``) in ``year`` (default: this year).
    """
    e = parse_entry(line, year=year, tz=tz)
    return None if e is None else (e.time, e.monotonic, e.message)


def detect_format(lines: Iterable[str], *, sample: int = 64) -> str:
    """The format of a log from its first lines: ``jsonl``, one of :class:`KernelLine`'s
    formats (the most common among the lines that parse), or ``unknown``."""
    seen: Counter[str] = Counter()
    order: dict[str, int] = {}
    json_objects = other = 0
    for line in lines:
        line = line.strip() if isinstance(line, str) else ""
        if not line or is_marker(line):
            continue
        if sample <= 0:
            break
        sample -= 1
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and str(obj.get("schema", "")).startswith("fsnotifyd.event/"):
                json_objects += 1
                continue
        e = parse_entry(line)
        if e is None:
            other += 1
            continue
        order.setdefault(e.format, len(order))
        seen[e.format] += 1
    if json_objects and json_objects >= sum(seen.values()):
        return "jsonl"
    if not seen:
        return "unknown"
    return max(seen, key=lambda f: (seen[f], -order[f]))


def to_record(entry: KernelLine, seq: int) -> KmsgRecord:
    """The ``/dev/kmsg`` record the line was printed from, as far as the text tells.

    ``ts_usec`` is the stamp in microseconds: since boot for monotonic lines (pair it with
    ``boot_time or 0`` as ``classify``'s ``boot_wallclock``), since the epoch otherwise (pair it
    with 0). :func:`observe` does that pairing.
    """
    return KmsgRecord(seq=seq, ts_usec=round(entry.time * 1e6), level=entry.level,
                      facility=entry.facility, message=entry.message, caller=entry.caller)


def observe(entry: KernelLine, seq: int, *, boot_time: float | None = None,
            kernel_only: bool = True) -> Observation | None:
    """Classify one parsed line with the daemon's own kmsg classifier."""
    base = (boot_time or 0.0) if entry.monotonic else 0.0
    return classify(to_record(entry, seq), base, kernel_only=kernel_only)
