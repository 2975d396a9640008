"""Read recorded events and kernel logs as one stream of event dicts, in event time.

Each file is recognised by its first lines (:func:`~fsnotifyd.kernel.logtext.detect_format`):

* an fsnotifyd JSONL journal or recording (every line a JSON object whose ``schema`` starts
  with ``fsnotifyd.event/``): events pass through unchanged, ids included;
* kernel log text (``dmesg``, ``dmesg -T``, ``journalctl -k`` …): every line goes through the
  daemon's own kmsg classifier and a real :class:`~fsnotifyd.correlator.Correlator` running
  on a virtual clock set to each line's time, so a month of log replays in seconds and the
  events are the ones the daemon would have published from kmsg alone.

Files are merged into one stream ordered by event time (``heapq.merge`` on time, then the
order within the file, then the order of the paths). Within a file, events are put in time
order with a small buffer (the correlator publishes a state event up to its window after
its time; a journal holds events in publish order, not time order), so a file whose times
jump backwards by more than the buffer comes out in its own order there.

Deterministic: the same paths and arguments give the same output, byte for byte. Replayed
text events get ids derived from where they came from (uuid5 of path, line and kind) and carry
``details.replay = {"file": path, "line": n}``; nothing of this machine leaks in: no sysfs
look-ups (a replay elsewhere must not pick up this host's loop devices), no mount table, no
error counters or ledger, and ``host`` is the one named by the log line (journalctl) or the
``host`` argument (default ``unknown``), never this machine's name.

What replay cannot know, compared with the live daemon: major/minor numbers and mount points
(events name the device only; VE attribution is by device name — a map's ``mounts`` and
``images`` are accepted but cannot match), fanotify and sysfs views (``sources`` is
``["kmsg"]``, ``count`` is 1 per line: the kernel's ``errors_count`` is not in the log), mount
refusals inferred from sysfs, and lines ext4 or printk rate-limited away.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import heapq
import io
import itertools
import os
import sys
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime, tzinfo
from typing import Any, TypedDict, Unpack

import msgspec

from .. import native as native_modules
from ..correlator import Correlator, CorrelatorSettings
from ..events import Device, Event, Observation
from ..inventory import VE, Inventory, Placement, SysBlock, validate_ve_id
from ..kernel.classify import KMSG_KINDS, classify
from ..kernel.kmsg import KmsgRecord
from ..kernel.logtext import detect_format, is_boot_marker, is_continuation, is_marker, parse_entry, to_record
from ..kernel.mountfail import MountFailureReasons
from .report import ReadReport

Paths = Iterable[str | os.PathLike[str]] | str | os.PathLike[str]  # one file, or several merged in time

__all__ = ["ReadReport", "read_events", "read_items", "read_timed_events", "REPLAY_NAMESPACE"]

# uuid5 namespace of replayed text events (a fixed random UUID: ids are stable across releases).
REPLAY_NAMESPACE = uuid.UUID("6f1c2b9e-3d4a-5e8f-9a0b-1c2d3e4f5a6b")

_KMSG_ONLY = frozenset({"kmsg"})

DETECT_LINES = 64
TEXT_SLACK = 2.0  # seconds of reordering buffer for kernel text (stamps jitter across CPUs)
JSONL_SLACK = 30.0  # a journal is in publish order: state events trail their time by ~1 s
NEW_YEAR = 180 * 86400  # a yearless stamp this far before the previous one crossed New Year
NEW_BOOT = 1.0  # a monotonic stamp this far back: a new boot (concatenated dmesg outputs)
# As KmsgSource: "mount failed" follows its reason line within this many records and µs.

_Item = tuple[float, int, dict[str, Any]]


def _kmsg_expected(kind: str, placement: Placement | None) -> frozenset[str]:
    # Only kmsg exists in a replay: every view is complete as soon as kmsg has reported it.
    return _KMSG_ONLY if kind in KMSG_KINDS else frozenset()


class _NoSysBlock(SysBlock):
    """Knows no device: a replay must not look this host's sysfs up."""

    def devnum(self, name: str) -> tuple[int, int] | None:
        return None

    def name(self, major: int, minor: int) -> str | None:
        return None

    def backing_file(self, name: str) -> str | None:
        return None


class _ReplayInventory(Inventory):
    """An inventory with no mount table, that numbers the mounts the log itself announces.

    The correlator reports a read-only state once per mount (``mount_seq``); without a mount
    table every read-only of a device would be one state forever. ``EXT4-fs (D): mounted
    filesystem …`` (and a ``re-mounted …`` that is not read-only) in the log starts a new mount
    of D.
    """

    def __post_init__(self) -> None:
        self._replay_mounts: dict[str, int] = {}
        self._replay_next = 0
        super().__post_init__()

    def mounted(self, name: str) -> None:
        self._replay_next += 1
        self._replay_mounts[name] = self._replay_next

    def place(self, device: Device | None, mount: str | None = None) -> Placement | None:
        p = super().place(device, mount)
        if p is not None and p.device.name in self._replay_mounts:
            p = replace(p, mount_seq=self._replay_mounts[p.device.name])
        return p


# --------------------------------------------------------------------------------------------
# Input


def _open_lines(path: str) -> Generator[str, None, None]:
    if path == "-":
        # typeshed calls stdin's buffer a BinaryIO; at run time it is a BufferedReader
        f: io.BufferedIOBase = sys.stdin.buffer  # type: ignore[assignment]
        close = False
    else:
        f = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        close = True
    try:
        for raw in f:
            yield raw.decode("utf-8", "replace").rstrip("\r\n")
    finally:
        if close:
            f.close()


_decode = msgspec.json.Decoder().decode  # about twice json.loads on event lines


def _fast_event_time(value: Any, minutes: dict[str, float]) -> float | None:
    """The time of an event as fsnotifyd writes it (``2026-11-25T22:51:09.791234Z``), parsing
    each minute once (``minutes``, the caller's cache): a journal holds millions of stamps from
    few minutes. Anything else goes through :func:`_event_time`."""
    if isinstance(value, str) and len(value) >= 20 and value[-1] == "Z" and value[16] == ":":
        base = minutes.get(value[:16])
        if base is None:
            full = _event_time(value[:16] + ":00Z")
            if full is None:
                return _event_time(value)
            if len(minutes) > 100_000:
                minutes.clear()
            base = minutes[value[:16]] = full
        sec = value[17:-1]
        if sec[:2].isdigit() and (len(sec) == 2 or (sec[2] == "." and sec[3:].isdigit())):
            return base + float(sec)
    return _event_time(value)


def _event_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.timestamp() if dt.tzinfo is not None else None


class _Reorder:
    """Events held until a watermark, released in (time, arrival) order.

    A journal is almost in order, so items go to a deque and only an item earlier than the
    last one held is put in its place (bisect): in-order appends cost O(1), not a heap push.
    """

    def __init__(self) -> None:
        self.items: collections.deque[_Item] = collections.deque()
        self.seq = 0

    def push(self, t: float, d: dict[str, Any]) -> None:
        self.seq += 1
        item = (t, self.seq, d)
        if self.items and t < self.items[-1][0]:
            i = bisect.bisect_right([x[0] for x in self.items], t)
            self.items.insert(i, item)
        else:
            self.items.append(item)

    def release(self, watermark: float | None) -> Iterator[_Item]:
        items = self.items
        while items and (watermark is None or items[0][0] <= watermark):
            yield items.popleft()


def _jsonl(path: str, lines: Iterable[str | bytes], report: ReadReport) -> Iterator[_Item]:
    """fsnotifyd events from JSON lines (``str`` or raw ``bytes``), in time order.

    This loop runs once per event of a journal that may hold millions, so it does only what
    each line needs: decode (msgspec takes the bytes as they are), check, stamp, hold; the
    counters are added once at the end.
    """
    buf = _Reorder()
    items = buf.items
    latest = float("-inf")
    decode, stamp, skip = _decode, _fast_event_time, report.skip
    minutes: dict[str, float] = {}
    lineno = events = ignored = 0
    try:
        for lineno, line in enumerate(lines, 1):
            try:
                obj = decode(line)
            except (ValueError, msgspec.DecodeError) as e:
                text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
                if not text.strip():
                    ignored += 1
                else:
                    skip(path, lineno, f"not JSON ({getattr(e, 'msg', e)})", text.strip())
                continue
            schema = obj.get("schema") if obj.__class__ is dict else None
            if schema.__class__ is not str or not schema.startswith("fsnotifyd.event/"):
                skip(path, lineno, "not an fsnotifyd event", _text(line))
                continue
            t = stamp(obj.get("time"), minutes)
            if t is None:
                skip(path, lineno, "event without a valid time", _text(line))
                continue
            events += 1
            if t >= latest:  # in order: the common case, no search
                latest = t
                buf.seq += 1
                items.append((t, buf.seq, obj))
            else:
                buf.push(t, obj)
            watermark = latest - JSONL_SLACK
            while items and items[0][0] <= watermark:
                yield items.popleft()
        yield from buf.release(None)
    finally:
        report.lines += lineno
        report.ignored += ignored
        report.jsonl_events += events
        report.events += events


def _text(line: str | bytes) -> str:
    return (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip()


class _TextReplay:
    """Kernel text of one file → events, through a correlator on a virtual clock."""

    def __init__(self, path: str, ves: list[VE], *, year: int | None, boot_time: float | None,
                 tz: tzinfo | None, host: str, report: ReadReport,
                 settings: CorrelatorSettings) -> None:
        self.path, self.ves, self.year, self.boot_time, self.tz = path, ves, year, boot_time, tz
        self.host, self.report, self.settings = host, report, settings
        self.max_window = max(settings.window, settings.state_window, settings.io_window)
        self.buf = _Reorder()
        # (first line, host) each time the lines' host changes (journalctl -m merges hosts)
        self.host_lines: list[int] = []
        self.host_names: list[str] = []
        self._new_correlator()

    def _new_correlator(self) -> None:
        self.now = float("-inf")  # a new boot's stamps may start over
        self.inventory = _ReplayInventory(ves=list(self.ves), mountinfo=lambda: [], sys=_NoSysBlock())
        self.corr = Correlator(inventory=self.inventory, publish=self._publish, counters=None,
                               ledger=None, expected=_kmsg_expected, settings=self.settings,
                               host=self.host, clock=lambda: self.now)
        self.reasons = MountFailureReasons()

    def _publish(self, event: Event) -> None:
        d = event.to_dict()
        where = event.details.get("replay") if isinstance(event.details, Mapping) else None
        line = where.get("line") if isinstance(where, Mapping) else None
        d["id"] = str(uuid.uuid5(REPLAY_NAMESPACE, f"{self.path}:{line}:{event.kind}"))
        d["host"] = self._host_of(line) if isinstance(line, int) else self.host
        self.report.events += 1
        self.buf.push(event.time, d)

    def _host_of(self, line: int) -> str:
        i = bisect.bisect_right(self.host_lines, line) - 1
        return self.host_names[i] if i >= 0 else self.host

    def _new_boot(self) -> Iterator[_Item]:
        self.corr.flush()
        yield from self.buf.release(None)
        self._new_correlator()

    def run(self, lines: Iterable[str]) -> Iterator[_Item]:
        report, path = self.report, self.path
        year = self.year
        last_yearless: float | None = None
        last_mono: float | None = None
        after_entry = False
        seq = 0
        for lineno, line in enumerate(lines, 1):
            report.lines += 1
            if not line.strip() or is_marker(line):
                report.ignored += 1
                after_entry = False
                if is_boot_marker(line):
                    yield from self._new_boot()
                continue
            if after_entry and is_continuation(line):
                report.ignored += 1
                continue
            entry = parse_entry(line, year=year, tz=self.tz)
            if entry is None:
                after_entry = False
                report.skip(path, lineno, "not a kernel log line", line)
                continue
            after_entry = True
            if entry.yearless:
                if last_yearless is not None and entry.time < last_yearless - NEW_YEAR:
                    year = (year if year is not None else datetime.now(self.tz).year) + 1
                    entry = parse_entry(line, year=year, tz=self.tz) or entry
                last_yearless = entry.time
            if entry.monotonic:
                if self.boot_time is None:
                    report.monotonic_without_boot_time = True
                if last_mono is not None and entry.time < last_mono - NEW_BOOT:
                    yield from self._new_boot()
                last_mono = entry.time
            report.entries += 1
            seq += 1
            rec = to_record(entry, seq)
            base = (self.boot_time or 0.0) if entry.monotonic else 0.0
            obs = classify(rec, base)
            if obs is None:
                if rec.facility == 0:
                    self._note(rec)
                continue
            if obs.kind == "fs.mount_failed":
                obs = self.reasons.explain(rec, obs)
            obs = replace(obs, details={**obs.details, "replay": {"file": path, "line": lineno}})
            host = entry.host or self.host
            if host != (self.host_names[-1] if self.host_names else self.host):
                self.host_lines.append(lineno)
                self.host_names.append(host)
            report.observations += 1
            yield from self._observe(obs)
        self.corr.flush()
        yield from self.buf.release(None)

    def _observe(self, obs: Observation) -> Iterator[_Item]:
        self.now = max(self.now, obs.time)
        self.corr.expire()
        self.corr.observe(obs)
        watermark = self.now
        deadline = self.corr.next_deadline()
        if deadline is not None:
            # An open group's event will carry its first observation's time, which is its
            # deadline minus its window.
            watermark = min(watermark, deadline - self.max_window)
        yield from self.buf.release(watermark - TEXT_SLACK)

    def _note(self, rec: KmsgRecord) -> None:
        found = self.reasons.remember(rec)
        if found is None:
            return
        dev, text = found
        # 6.18 prints "re-mounted UUID ro." for a remount read-only, "re-mounted UUID r/w."
        # for read-only → writable and "re-mounted UUID." for writable → writable.
        if text.startswith("mounted filesystem") or (text.startswith("re-mounted") and not text.endswith(" ro.")):
            self.inventory.mounted(dev)


def _jsonl_file(path: str, f: io.BufferedIOBase, report: ReadReport, scanner: Any) -> Iterator[_Item]:
    """A journal file's items: through the C scanner (``_jsonl.Scanner``) when built, which
    takes the same steps as :func:`_jsonl` and calls back here for what is rare."""
    if scanner is None:
        return _closing(_jsonl(path, f, report), f)
    minutes: dict[str, float] = {}
    ignored = 0

    def stamp(value: Any) -> float | None:
        return _fast_event_time(value, minutes)

    def bad(lineno: int, line: bytes, why: Any) -> None:
        nonlocal ignored
        text = line.decode("utf-8", "replace")
        if isinstance(why, str):
            report.skip(path, lineno, why, text.strip())
        elif not text.strip():
            ignored += 1
        else:
            report.skip(path, lineno, f"not JSON ({getattr(why, 'msg', why)})", text.strip())

    def finish(lines: int, events: int) -> None:
        report.lines += lines
        report.ignored += ignored
        report.jsonl_events += events
        report.events += events
        f.close()

    return scanner(f, _decode, stamp, bad, finish, JSONL_SLACK)


def _closing(items: Iterator[_Item], f: io.BufferedIOBase) -> Iterator[_Item]:
    try:
        yield from items
    finally:
        f.close()


def _file_events(path: str, *, ves: list[VE], year: int | None, boot_time: float | None,
                 tz: tzinfo | None, host: str, report: ReadReport,
                 settings: CorrelatorSettings, scanner: Any) -> Iterator[_Item]:
    """One file's items; the file is opened (and its format detected) now."""
    lines = _open_lines(path)
    head = list(itertools.islice(lines, DETECT_LINES))
    fmt = detect_format(head)
    report.files[path] = fmt
    everything = itertools.chain(head, lines)
    if fmt == "jsonl" and path != "-":
        lines.close()  # a journal is read again as raw bytes: no per-line text decoding
        raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        return _jsonl_file(path, raw, report, scanner)
    if fmt == "jsonl":
        return _jsonl(path, everything, report)
    return _TextReplay(path, ves, year=year, boot_time=boot_time, tz=tz, host=host,
                       report=report, settings=settings).run(everything)


JSONL_ABI = 1  # _jsonl.c's FSNOTIFYD_ABI


def _native_scanner() -> Any:
    """The C journal scanner, or None (then :func:`_jsonl` reads journals); see fsnotifyd.native."""
    module = native_modules.load("fsnotifyd.replay._jsonl", JSONL_ABI).module
    return None if module is None else module.Scanner


def _as_ves(ves: Iterable[VE] | Mapping[str, str]) -> list[VE]:
    if isinstance(ves, Mapping):
        by_ve: dict[str, list[str]] = {}
        for device, ve in ves.items():
            by_ve.setdefault(validate_ve_id(ve), []).append(device)
        return [VE(ve, devices=tuple(devs)) for ve, devs in by_ve.items()]
    return list(ves)


def read_items(
    paths: Paths,
    *,
    ves: Iterable[VE] | Mapping[str, str] = (),
    year: int | None = None,
    boot_time: float | None = None,
    report: ReadReport | None = None,
    tz: tzinfo | None = None,
    host: str | None = None,
    settings: CorrelatorSettings = CorrelatorSettings(),
    native: bool = True,
) -> Iterator[tuple[float, int, dict[str, Any]]]:
    """Events as ``(time as epoch seconds, order, event)`` items, merged in time.

    The form the replay loop takes as it is (``Engine.process_timed``): a single journal's
    items come straight from its reader, with no generator in between. Arguments as
    :func:`read_events`; ``native=False`` reads journals with the Python reference reader.
    Files are opened when this is called.
    """
    scanner = _native_scanner() if native else None
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else ReadReport()
    ve_list = _as_ves(ves)
    Inventory(ves=list(ve_list), mountinfo=lambda: [], sys=_NoSysBlock())  # duplicate ids fail now
    streams = [
        _file_events(os.fspath(p), ves=ve_list, year=year, boot_time=boot_time, tz=tz,
                     host=host or "unknown", report=report, settings=settings, scanner=scanner)
        for p in paths
    ]
    return streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_merge_key)


class ReadOptions(TypedDict, total=False):
    """The keyword arguments :func:`read_events` and :func:`read_timed_events` pass on to
    :func:`read_items` (documented at :func:`read_events`)."""

    ves: Iterable[VE] | Mapping[str, str]
    year: int | None
    boot_time: float | None
    report: ReadReport | None
    tz: tzinfo | None
    host: str | None
    settings: CorrelatorSettings


def read_events(paths: Paths, **kw: Unpack[ReadOptions]) -> Iterator[dict[str, Any]]:
    """Events (``Event.to_dict()`` form) from JSONL journals and kernel log files, merged in time.

    ``ves``: VE objects (or a ``{"loop0": "101"}`` device → VE map) for attribution of kernel
    text events. ``year``: the year of yearless ``journalctl`` stamps (default: this year).
    ``boot_time``: epoch seconds of boot, to put ``dmesg`` stamps in wall time (default: used
    as they are; relative timing still replays correctly). ``tz``: the zone of local times in
    the logs (default: this machine's). ``host``: the host of lines that do not name one
    (default ``unknown``). ``report`` is filled in while iterating: counts, and the file:line
    of the first few lines skipped. ``"-"`` reads standard input; ``.gz`` files are read
    decompressed.
    """
    for _, _, event in read_items(paths, **kw):
        yield event


def read_timed_events(paths: Paths, **kw: Unpack[ReadOptions]) -> Iterator[tuple[float, dict[str, Any]]]:
    """Like :func:`read_events`, with each event's time as epoch seconds (already parsed for
    ordering; the rules engine takes it instead of parsing the RFC 3339 string again)."""
    for t, _, event in read_items(paths, **kw):
        yield t, event


def _merge_key(item: _Item) -> tuple[float, int]:
    return item[0], item[1]
