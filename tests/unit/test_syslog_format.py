"""The syslog sink's pure parts: target choice, facilities, the summary line, escaping, cutting."""

from __future__ import annotations

import struct

import pytest

from fsnotifyd.config import SyslogConfig
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.sinks.syslog import (
    FACILITIES,
    JOURNAL_SOCKET,
    SYSLOG_SOCKET,
    TRUNCATED,
    _cap,
    _Throttle,
    encode_journal,
    facility_code,
    format_rfc3164,
    format_rfc5424,
    resolve_target,
    sd_escape,
    summary,
)


def ev(**kw) -> Event:
    base = dict(kind="fs.error", time=1.0, host="h", severity="error", device=Device(7, 3, "loop3"), fs="ext4",
                mount="/vz/101", ve="101", kernel=Kernel(), sources=("kmsg",))
    base.update(kw)
    return Event(**base)


@pytest.mark.parametrize("cfg,exists,want", [
    (SyslogConfig(), True, ("journal", JOURNAL_SOCKET)),
    (SyslogConfig(), False, ("syslog", SYSLOG_SOCKET)),
    (SyslogConfig(path="/x/journal/socket"), False, ("journal", "/x/journal/socket")),
    (SyslogConfig(path="/run/systemd/journal.ns1/socket"), False, ("journal", "/run/systemd/journal.ns1/socket")),
    (SyslogConfig(path="/x/journal/dev-log"), True, ("syslog", "/x/journal/dev-log")),
    (SyslogConfig(path="/x/socket"), True, ("syslog", "/x/socket")),
    (SyslogConfig(target="journal"), False, ("journal", JOURNAL_SOCKET)),
    (SyslogConfig(target="syslog"), True, ("syslog", SYSLOG_SOCKET)),
    (SyslogConfig(target="syslog", path="/x/journal/socket"), True, ("syslog", "/x/journal/socket")),
])
def test_resolve_target(cfg, exists, want):
    assert resolve_target(cfg, exists=lambda p: exists) == want


def test_resolve_target_rejects_unknown():
    with pytest.raises(ValueError, match="unknown syslog target 'kmsg'"):
        resolve_target(SyslogConfig(target="kmsg"))


def test_facilities():
    assert facility_code("kern") == 0 and facility_code("daemon") == 3 and facility_code("authpriv") == 10
    assert [facility_code(f"local{i}") for i in range(8)] == list(range(16, 24))
    assert len(FACILITIES) == 20
    with pytest.raises(ValueError, match=r"unknown syslog facility 'local8'; expected one of .*local7"):
        facility_code("local8")


@pytest.mark.parametrize("event,want", [
    (ev(kernel=Kernel(message="EXT4-fs error (device loop3): x")),
     "fs.error on loop3 (VE 101, /vz/101): EXT4-fs error (device loop3): x [kmsg]"),
    (ev(device=Device(7, 3, None), ve=None, kernel=Kernel(function="ext4_lookup", line=12, errno=-117)),
     "fs.error on 7:3 (/vz/101): ext4_lookup:12, EUCLEAN [kmsg]"),
    (ev(kind="notification", device=None, mount=None, details={"message": "disk\\nfailing"}, sources=()),
     "notification (VE 101): disk\\nfailing"),
    (ev(kind="action.failed", details={"error": "fsck: exit 8\nmore", "action": "fsck"}, count=2),
     "action.failed on loop3 (VE 101, /vz/101): fsck: exit 8 | more (count 2) [kmsg]"),
    (ev(kind="rule.matched", device=None, ve=None, mount=None, details={"rule": "ro"}, sources=("rules",)),
     "rule.matched: rule ro [rules]"),
])
def test_summary(event, want):
    assert summary(event) == want


def test_sd_escape():
    assert sd_escape('a"b]c\\d') == 'a\\"b\\]c\\\\d'


def test_encode_journal_forms():
    assert encode_journal([("A", "x=y"), ("B", "")]) == b"A=x=y\nB=\n"
    assert encode_journal([("C", "1\n2")]) == b"C\n" + struct.pack("<Q", 3) + b"1\n2\n"


def test_cap_keeps_utf8_whole():
    text = "é" * 100
    cut = _cap(text, 51)
    assert cut.endswith(TRUNCATED) and len(cut.encode()) <= 51
    assert _cap("short", 51) == "short"


def test_long_fields_are_capped_and_datagram_bounded():
    e = ev(mount="/m" * 5000, kernel=Kernel(message="m" * 20000))
    for fmt in (format_rfc5424, format_rfc3164):
        data = fmt(e, "fsnotifyd", 3, 1, 8192)
        assert len(data) <= 8192
        assert data.count(TRUNCATED.encode()) == 2  # the mount value and the text


def test_throttle_once_per_interval_and_counts_held():
    t = _Throttle(interval=60)
    assert t.due("unreachable", 100.0) == 0
    assert t.due("unreachable", 130.0) is None
    assert t.due("unreachable", 159.0) is None
    assert t.due("busy", 159.0) == 0  # another reason has its own minute
    assert t.due("unreachable", 160.5) == 2
    assert t.due("unreachable", 161.0) is None
