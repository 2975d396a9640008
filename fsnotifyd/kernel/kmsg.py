"""The ``/dev/kmsg`` record format. Pure, no I/O; never raises, whatever the bytes.

A record is ``PRI,SEQ,TS_USEC,FLAGS[,KEY=VAL...];MESSAGE\\n`` plus `` KEY=VALUE\\n``
continuation lines (Documentation/ABI/testing/dev-kmsg). :func:`parse_record` turns one into a
:class:`KmsgRecord`; :func:`record_device` and :func:`caller_pid` read the two things every
message parser wants from it (the ``DEVICE=`` property and the ``caller=`` field).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..events import Device, Kernel, Observation

__all__ = ["KmsgRecord", "RECORD_MAX", "SOURCE", "caller_pid", "observation", "parse_record", "record_device"]

SOURCE = "kmsg"  # every observation made from a kernel message says it came from kmsg
RECORD_MAX = 8192  # CONSOLE_EXT_LOG_MAX: one read of this size always returns one whole record

_EMPTY: Mapping[str, str] = MappingProxyType({})


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


def record_device(name: str | None, props: Mapping[str, str]) -> Device | None:
    """The device a message names (``name``), with major:minor from the record's ``DEVICE=``."""
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


def caller_pid(caller: str | None) -> int | None:
    """The pid of ``caller=T<pid>`` (CONFIG_PRINTK_CALLER); ``None`` for ``C<cpu>`` or none."""
    if caller and caller[0] == "T" and caller[1:].isdigit():
        return int(caller[1:])
    return None


def observation(rec: KmsgRecord, when: float, kind: str, device: str | None, fs: str, text: str,
                details: Mapping[str, Any], **kernel: Any) -> Observation:
    """The observation a filesystem's kernel line makes: its device (with the record's
    major:minor), the caller's pid, the line's text, and what the parser read from it."""
    return Observation(
        source=SOURCE,
        kind=kind,
        time=when,
        device=record_device(device, rec.props),
        kernel=Kernel(pid=caller_pid(rec.caller), message=text, **kernel),
        fs=fs,
        details=details,
    )
