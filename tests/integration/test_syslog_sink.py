"""The syslog/journald sink against real unix sockets.

No journald or syslogd runs on the test machines (PID 1 is not systemd, there is no /dev/log
and no /run/systemd/journal/socket), so most tests bind a SOCK_DGRAM socket in a temp dir that
stands in for the logger and parse what arrives: journald's native protocol (both field forms,
and the sealed memfd passed with SCM_RIGHTS for oversized entries), RFC 5424 and RFC 3164.

The last test runs the real ``systemd-journald`` as a journald namespace instance inside a
private mount namespace whose /run and /var/log are temp dirs (the host's /run/systemd,
/run/log, /var/log/journal and /dev/log are never touched), points the sink at its socket and
reads the entries back with ``journalctl --directory``. It skips where that cannot run.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from fsnotifyd.config import SyslogConfig
from fsnotifyd.events import Device, Event, Kernel, rfc3339
from fsnotifyd.metrics import Metrics
from fsnotifyd.sinks.syslog import MAX_SYSLOG_BYTES, SD_ID, TRUNCATED, SyslogSink, summary

KMSG = (
    "EXT4-fs error (device loop3): ext4_lookup:1855: inode #2: comm ls: deleted inode referenced: 12\n"
    "EXT4-fs (loop3): Remounting filesystem read-only"
)


def fs_error(**kw) -> Event:
    base = dict(
        kind="fs.error", time=1_700_000_000.25, host="vm7", severity="error",
        device=Device(7, 3, "loop3"), fs="ext4", mount="/vz/101", ve="101",
        kernel=Kernel(errno=-5, function="ext4_lookup", line=1855, inode=2, block=None, comm="ls", pid=4242,
                      message=KMSG),
        sources=("kmsg", "fanotify", "sysfs"), count=3, details={"errors_count": 7},
    )
    base.update(kw)
    return Event(**base)


def bare(kind: str = "dev.add", severity: str = "info", **kw) -> Event:
    return Event(kind=kind, time=1_700_000_001.0, host="vm7", severity=severity, device=None, fs=None,
                 mount=None, ve=None, kernel=Kernel(), sources=("udev",), **kw)


def lost(metrics: Metrics, reason: str) -> float:
    v = metrics.registry.get_sample_value("fsnotifyd_events_lost_total", {"source": "syslog", "reason": reason})
    return v or 0.0


# -- a stand-in logger ---------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not tmp_path: sun_path holds 108 bytes and pytest's per-test dirs can be longer.
    d = tempfile.mkdtemp(prefix="fsnd-sl-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def receiver(path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(str(path))
        s.settimeout(5)
        yield s
    finally:
        s.close()


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native format: ``NAME=value\\n`` or ``NAME\\n<le64 size><value>\\n``."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n", "binary field not followed by a newline"
            i = start + size + 1
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", name), name
        assert name.decode() not in fields, f"field {name!r} twice"
        fields[name.decode()] = value.decode()
    return fields


def recv_journal(s: socket.socket) -> tuple[dict[str, str], bytes, bool]:
    """(fields, raw payload, came as a memfd) for the next datagram."""
    msg, fds, _flags, _addr = socket.recv_fds(s, 1 << 20, 4)
    if not fds:
        return parse_native(msg), msg, False
    try:
        assert msg == b"" and len(fds) == 1, "a memfd comes alone, in an empty datagram"
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        assert seals & want == want, f"memfd seals {seals:#x}: journald only trusts a fully sealed one"
        size = os.fstat(fds[0]).st_size
        payload = os.pread(fds[0], size, 0)
        assert len(payload) == size
    finally:
        for fd in fds:
            os.close(fd)
    return parse_native(payload), payload, True


def expected_journal(e: Event, facility: int = 3) -> dict[str, str]:
    """Every field a full fs.error must carry, spelled out (not computed by the module)."""
    return {
        "MESSAGE": summary(e),
        "PRIORITY": "3",
        "SYSLOG_IDENTIFIER": "fsnotifyd",
        "SYSLOG_FACILITY": str(facility),
        "ERRNO": "5",
        "FSNOTIFYD_EVENT_ID": e.id,
        "FSNOTIFYD_KIND": "fs.error",
        "FSNOTIFYD_SEVERITY": "error",
        "FSNOTIFYD_VE": "101",
        "FSNOTIFYD_DEVICE": "loop3",
        "FSNOTIFYD_MOUNT": "/vz/101",
        "FSNOTIFYD_FS": "ext4",
        "FSNOTIFYD_ERRNO": "EIO",
        "FSNOTIFYD_FUNCTION": "ext4_lookup",
        "FSNOTIFYD_LINE": "1855",
        "FSNOTIFYD_INODE": "2",
        "FSNOTIFYD_COMM": "ls",
        "FSNOTIFYD_PID": "4242",
        "FSNOTIFYD_COUNT": "3",
        "FSNOTIFYD_SOURCES": "kmsg,fanotify,sysfs",
        "FSNOTIFYD_KERNEL_MESSAGE": e.kernel.message or "",
        "FSNOTIFYD_JSON": e.to_json(),
    }


# -- 1. journald native protocol -----------------------------------------------------------------


def test_journal_fields_text_and_binary_forms(sockdir):
    """Every field arrives; the multi-line kernel text uses the binary form; None fields are left out."""
    path = sockdir / "journal" / "socket"
    path.parent.mkdir()
    sink = SyslogSink(SyslogConfig(enabled=True, path=str(path), min_severity="debug"))  # auto + .../journal/socket
    assert sink.target == "journal"
    full, minimal = fs_error(), bare(severity="debug", count=1)
    try:
        with receiver(path) as r:
            sink.publish(full)
            sink.publish(minimal)
            fields, raw, memfd = recv_journal(r)
            fields2, raw2, _ = recv_journal(r)
    finally:
        sink.close()
    assert not memfd
    assert fields == expected_journal(full)
    assert fields["MESSAGE"] == (
        "fs.error on loop3 (VE 101, /vz/101): EXT4-fs error (device loop3): ext4_lookup:1855: inode #2: "
        "comm ls: deleted inode referenced: 12 | EXT4-fs (loop3): Remounting filesystem read-only "
        "(count 3) [kmsg,fanotify,sysfs]"
    )
    assert "\n" not in fields["MESSAGE"]
    msg = KMSG.encode()
    assert b"FSNOTIFYD_KERNEL_MESSAGE\n" + struct.pack("<Q", len(msg)) + msg + b"\n" in raw
    assert b"MESSAGE=fs.error on loop3" in raw  # one-line values keep the text form
    assert json.loads(fields["FSNOTIFYD_JSON"]) == full.to_dict()

    assert raw2.count(b"\n") == len(fields2)  # nothing multi-line: every field in the text form
    assert fields2 == {
        "MESSAGE": "dev.add [udev]",
        "PRIORITY": "7",
        "SYSLOG_IDENTIFIER": "fsnotifyd",
        "SYSLOG_FACILITY": "3",
        "FSNOTIFYD_EVENT_ID": minimal.id,
        "FSNOTIFYD_KIND": "dev.add",
        "FSNOTIFYD_SEVERITY": "debug",
        "FSNOTIFYD_COUNT": "1",
        "FSNOTIFYD_SOURCES": "udev",
        "FSNOTIFYD_JSON": minimal.to_json(),
    }
    assert sink.stats.sent == 2 and sink.stats.lost == {}


@pytest.mark.parametrize("severity,priority", [("critical", "2"), ("error", "3"), ("warning", "4"),
                                               ("info", "6"), ("debug", "7")])
def test_journal_priority_and_facility(sockdir, severity, priority):
    path = sockdir / "j.sock"
    sink = SyslogSink(SyslogConfig(target="journal", path=str(path), facility="local3", ident="fsnd-test",
                                   min_severity="debug"))
    try:
        with receiver(path) as r:
            sink.publish(bare(severity=severity))
            fields, _, _ = recv_journal(r)
    finally:
        sink.close()
    assert (fields["PRIORITY"], fields["SYSLOG_FACILITY"], fields["SYSLOG_IDENTIFIER"]) == (priority, "19", "fsnd-test")


# -- 2. oversized entries: the sealed memfd --------------------------------------------------------


def test_journal_oversized_entry_goes_by_sealed_memfd(sockdir):
    """An entry larger than any datagram the socket may send arrives as a sealed memfd."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sndbuf = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # the sink's socket gets the same default
    probe.close()
    blob = "x" * max(300 * 1024, sndbuf + 64 * 1024)
    path = sockdir / "j.sock"
    sink = SyslogSink(SyslogConfig(target="journal", path=str(path)))
    big = fs_error(details={"blob": blob})
    try:
        with receiver(path) as r:
            sink.publish(big)
            sink.publish(fs_error())  # and the next, small one goes the ordinary way again
            fields, raw, memfd = recv_journal(r)
            fields2, _, memfd2 = recv_journal(r)
    finally:
        sink.close()
    assert memfd and not memfd2
    assert len(raw) > sndbuf
    assert fields == expected_journal(big)
    assert json.loads(fields["FSNOTIFYD_JSON"])["details"]["blob"] == blob
    assert fields2["FSNOTIFYD_KIND"] == "fs.error"
    assert sink.stats.via_memfd == 1 and sink.stats.sent == 2 and sink.stats.lost == {}


# -- 3. syslog -----------------------------------------------------------------------------------

RFC5424 = re.compile(r"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\[.*?(?<!\\)\]) (.*)", re.S)


def parse_sd(sd: str) -> tuple[str, dict[str, str]]:
    """One SD-ELEMENT: ``[id name="value" ...]`` with ``\\"``, ``\\\\`` and ``\\]`` unescaped."""
    assert sd[0] == "[" and sd[-1] == "]"
    m = re.match(r"\[(\S+)", sd)
    assert m
    i, params = m.end(), {}
    while sd[i] == " ":
        eq = sd.index("=", i)
        name = sd[i + 1:eq]
        assert sd[eq + 1] == '"', sd[eq:]
        j, value = eq + 2, []
        while sd[j] != '"':
            if sd[j] == "\\":
                assert sd[j + 1] in '"\\]', f"bad escape at {sd[j:j + 5]!r}"
                j += 1
            else:
                assert sd[j] != "]", "an unescaped ] inside a value"
            value.append(sd[j])
            j += 1
        params[name] = "".join(value)
        i = j + 1
    assert sd[i:] == "]"
    return m.group(1), params


TRICKY_MOUNT = '/vz/we"ird]\\dir with space'


def expected_params(e: Event) -> dict[str, str]:
    return {"id": e.id, "kind": "fs.error", "severity": "error", "ve": "101", "device": "loop3",
            "mount": e.mount or "", "fs": "ext4", "errno": "EIO", "function": "ext4_lookup", "line": "1855",
            "inode": "2", "comm": "ls", "pid": "4242", "count": "3", "sources": "kmsg,fanotify,sysfs"}


def test_syslog_rfc5424(sockdir):
    path = sockdir / "log"
    sink = SyslogSink(SyslogConfig(path=str(path), format="rfc5424", facility="local0", ident="fsnd"))
    assert sink.target == "syslog"  # auto + a path not shaped like journald's
    e = fs_error(mount=TRICKY_MOUNT, severity="critical")
    try:
        with receiver(path) as r:
            sink.publish(e)
            data = r.recv(65536)
    finally:
        sink.close()
    m = RFC5424.fullmatch(data.decode())
    assert m, data
    pri, ts, host, app, procid, msgid, sd, msg = m.groups()
    assert int(pri) == 16 * 8 + 2  # local0, crit
    assert (ts, host, app, procid, msgid) == (rfc3339(e.time), "vm7", "fsnd", str(os.getpid()), "fs.error")
    sd_id, params = parse_sd(sd)
    assert sd_id == SD_ID
    assert params == {**expected_params(e), "severity": "critical"}
    assert params["mount"] == TRICKY_MOUNT
    assert '\\"ird\\]\\\\dir' in sd  # escaped on the wire, not just round-tripped
    assert msg == summary(e) and "\n" not in msg


RFC3164 = re.compile(r"<(\d+)>([A-Z][a-z]{2}) ([ \d]\d) (\d\d):(\d\d):(\d\d) ([^\[\s]+)\[(\d+)\]: (.*)", re.S)


def test_syslog_rfc3164(sockdir):
    path = sockdir / "log"
    sink = SyslogSink(SyslogConfig(target="syslog", path=str(path), format="rfc3164"))
    e = fs_error(mount=TRICKY_MOUNT)
    try:
        with receiver(path) as r:
            sink.publish(e)
            data = r.recv(65536).decode()
    finally:
        sink.close()
    m = RFC3164.fullmatch(data)
    assert m, data
    pri, mon, day, hh, mm, ss, tag, pid, rest = m.groups()
    t = time.localtime(e.time)
    assert int(pri) == 3 * 8 + 3  # daemon, err
    assert (mon, int(day), int(hh), int(mm), int(ss)) == (
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[t.tm_mon - 1],
        t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    assert (tag, pid) == ("fsnotifyd", str(os.getpid()))
    text = summary(e)
    assert rest.startswith(text + " ")
    pairs = dict(tok.split("=", 1) for tok in shlex.split(rest[len(text) + 1:]))
    assert pairs == expected_params(e)
    assert 'mount="/vz/we\\"ird]\\\\dir with space"' in rest


@pytest.mark.parametrize("fmt", ["rfc5424", "rfc3164"])
def test_syslog_long_message_is_cut_with_marker(sockdir, fmt):
    """A huge kernel text is shortened to fit one datagram; the fields stay whole."""
    path = sockdir / "log"
    sink = SyslogSink(SyslogConfig(target="syslog", path=str(path), format=fmt))
    e = fs_error(kernel=Kernel(errno=-5, function="ext4_lookup", message="é" + "y" * 50_000))
    try:
        with receiver(path) as r:
            sink.publish(e)
            data = r.recv(1 << 20)
    finally:
        sink.close()
    assert len(data) <= MAX_SYSLOG_BYTES
    text = data.decode()  # still valid UTF-8: cut on a character boundary
    assert TRUNCATED in text
    if fmt == "rfc5424":
        m = RFC5424.fullmatch(text)
        assert m and m.group(8).endswith(TRUNCATED)
        assert parse_sd(m.group(7))[1]["id"] == e.id
    else:
        assert text.endswith("sources=kmsg,fanotify,sysfs")
        assert f"id={e.id}" in text


# -- 4. no logger, a dead logger, a busy logger ---------------------------------------------------


@pytest.mark.parametrize("target", ["journal", "syslog"])
def test_unreachable_counts_warns_once_and_recovers(sockdir, target):
    path = sockdir / "sock"
    metrics = Metrics()
    sink = SyslogSink(SyslogConfig(target=target, path=str(path)), metrics)
    try:
        with structlog.testing.capture_logs() as logs:
            t0 = time.monotonic()
            for _ in range(5):
                sink.publish(fs_error())  # ENOENT: nothing at the path
            assert time.monotonic() - t0 < 1.0
        assert lost(metrics, "unreachable") == 5
        warnings = [x for x in logs if x["event"] == "syslog.unreachable"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning", logs
        assert warnings[0]["errno"] == "ENOENT" and warnings[0]["path"] == str(path)

        with receiver(path) as r, structlog.testing.capture_logs() as logs:
            e = fs_error()
            sink.publish(e)  # the logger came up: the very next event gets there
            got = r.recv(1 << 20)
        assert e.id.encode() in got
        assert [x["event"] for x in logs] == ["syslog.reachable"]

        # The receiver is gone but its socket file is left: ECONNREFUSED, also unreachable.
        assert path.exists()
        with structlog.testing.capture_logs() as logs:
            sink.publish(fs_error())
        assert lost(metrics, "unreachable") == 6
        assert logs == []  # still within the minute since the last warning
        assert metrics.registry.get_sample_value("fsnotifyd_sink_failures_total", {"sink": "syslog"}) is None
    finally:
        sink.close()


def test_busy_receiver_drops_and_counts_without_blocking(sockdir):
    """A logger that does not read fills its queue; further events are counted, never waited for."""
    path = sockdir / "log"
    metrics = Metrics()
    sink = SyslogSink(SyslogConfig(target="syslog", path=str(path)), metrics)
    n = 1000  # past both the receiver's queue length and the sender's buffer, whichever is smaller
    try:
        with receiver(path) as r:
            t0 = time.monotonic()
            for _ in range(n):
                sink.publish(fs_error())
            assert time.monotonic() - t0 < 2.0
            busy = lost(metrics, "busy")
            assert busy > 0 and sink.stats.sent + busy == n
            r.setblocking(False)
            received = 0
            while True:
                try:
                    r.recv(1 << 20)
                except BlockingIOError:
                    break
                received += 1
            assert received == sink.stats.sent
            sink.publish(fs_error())  # drained: accepted again
            assert r.recv(1 << 20)
    finally:
        sink.close()


def test_auto_moves_to_a_journald_that_starts_later(sockdir, monkeypatch):
    """auto without a path: nothing there yet means syslog (unreachable); once journald's socket
    appears the next event goes to it in the native protocol."""
    import fsnotifyd.sinks.syslog as mod

    journal, devlog = sockdir / "journal" / "socket", sockdir / "log"
    journal.parent.mkdir()
    monkeypatch.setattr(mod, "JOURNAL_SOCKET", str(journal))
    monkeypatch.setattr(mod, "SYSLOG_SOCKET", str(devlog))
    metrics = Metrics()
    sink = SyslogSink(SyslogConfig(enabled=True), metrics)
    try:
        assert (sink.target, sink.path) == ("syslog", str(devlog))
        sink.publish(fs_error())
        assert lost(metrics, "unreachable") == 1
        with receiver(journal) as r:
            e = fs_error()
            sink.publish(e)
            fields, _, _ = recv_journal(r)
        assert (sink.target, sink.path) == ("journal", str(journal))
        assert fields["FSNOTIFYD_EVENT_ID"] == e.id
    finally:
        sink.close()


# -- 5. filters ---------------------------------------------------------------------------------


def test_filters_by_kind_and_min_severity(sockdir):
    path = sockdir / "log"
    sink = SyslogSink(SyslogConfig(target="syslog", path=str(path), format="rfc5424", kinds=("fs.*", "action.failed"),
                                   min_severity="warning"))
    events = [
        (fs_error(), True),
        (bare("fs.writable", "info"), False),  # kind matches, severity too low
        (bare("dev.add", "info"), False),
        (bare("action.failed", "error"), True),
        (bare("action.started", "info"), False),
        (bare("fs.warning", "warning"), True),
        (bare("notification", "critical"), False),  # severe, but not a kind asked for
        (bare("fs.readonly", "critical"), True),
    ]
    try:
        with receiver(path) as r:
            for e, _ in events:
                sink.publish(e)
            r.setblocking(False)
            got = []
            while True:
                try:
                    got.append(parse_sd(RFC5424.fullmatch(r.recv(65536).decode()).group(7))[1]["id"])
                except BlockingIOError:
                    break
    finally:
        sink.close()
    assert got == [e.id for e, wanted in events if wanted]
    assert sink.stats.filtered == 4


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown syslog facility 'daemons'; expected one of kern, user"):
        SyslogSink(SyslogConfig(facility="daemons"))
    with pytest.raises(ValueError, match="unknown event kind 'fs.eror'"):
        SyslogSink(SyslogConfig(kinds=("fs.eror",)))
    with pytest.raises(ValueError, match="too long"):
        SyslogSink(SyslogConfig(target="syslog", path="/tmp/" + "x" * 120))


# -- 6. the real systemd-journald -----------------------------------------------------------------

JOURNALD = "/lib/systemd/systemd-journald"
NAMESPACE = "fsndtest"


@pytest.fixture
def real_journald() -> Iterator[tuple[Path, Path]]:
    """(socket, state dir) of a journald namespace instance whose /run and /var/log are private.

    ``unshare --mount --propagation private`` gives it its own mount table; in it a temp dir is
    bind-mounted over /run and another over /var/log, so everything journald creates (its
    sockets under /run/systemd/journal.<ns>/, its files under /var/log/journal/<machine>.<ns>/)
    lands in temp dirs the test can reach from outside, and the host's own paths stay as they
    are. A namespace instance reads neither /dev/kmsg nor audit. ``unshare`` and ``sh`` exec,
    so the pid we hold is journald's, and the mount namespace dies with it.
    """
    missing = [p for p in (JOURNALD,) if not os.access(p, os.X_OK)]
    missing += [b for b in ("unshare", "journalctl") if shutil.which(b) is None]
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces)")
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if not os.path.exists("/etc/machine-id"):
        pytest.skip("no /etc/machine-id: journald will not start without one")
    root = Path(tempfile.mkdtemp(prefix="fsnd-jd-"))
    run, varlog = root / "run", root / "varlog"
    run.mkdir()
    varlog.mkdir()
    script = (f"mount --bind {shlex.quote(str(run))} /run && mount --bind {shlex.quote(str(varlog))} /var/log"
              f" && exec {JOURNALD} {NAMESPACE}")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "SYSTEMD_LOG_TARGET": "console",
           "SYSTEMD_LOG_LEVEL": "info"}  # and no NOTIFY_SOCKET: it must not talk to a manager
    out = open(root / "journald.log", "wb")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    sock = run / "systemd" / f"journal.{NAMESPACE}" / "socket"
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not sock.exists():
            proc.poll()
            pytest.skip(f"systemd-journald did not come up (exit {proc.returncode}): "
                        f"{(root / 'journald.log').read_text(errors='replace')[-500:]}")
        yield sock, root
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()
        shutil.rmtree(root, ignore_errors=True)


def read_back(root: Path, event_id: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        dirs = [d for d in glob.glob(str(root / "*" / "*journal" / f"*.{NAMESPACE}")) if os.listdir(d)]
        dirs += [d for d in glob.glob(str(root / "*" / "log" / "journal" / f"*.{NAMESPACE}")) if os.listdir(d)]
        for d in dirs:
            r = subprocess.run(["journalctl", f"--directory={d}", "-o", "json", "--all", "--no-pager",
                                f"FSNOTIFYD_EVENT_ID={event_id}"], capture_output=True, text=True, timeout=30)
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
            if lines:
                assert len(lines) == 1, lines
                return lines[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id} not in the journal under {root} ({dirs})")
        time.sleep(0.1)


def test_real_journald_stores_every_field(real_journald):
    sock, root = real_journald
    sink = SyslogSink(SyslogConfig(enabled=True, path=str(sock)))  # auto: .../journal.<ns>/socket
    assert sink.target == "journal"
    small = fs_error()
    big = fs_error(details={"blob": "z" * (600 * 1024)})  # > any default send buffer: memfd
    try:
        sink.publish(small)
        sink.publish(big)
    finally:
        sink.close()
    assert sink.stats.sent == 2 and sink.stats.via_memfd == 1 and sink.stats.lost == {}
    for e in (small, big):
        entry = read_back(root, e.id)
        for name, value in expected_journal(e).items():
            assert entry.get(name) == value, name
        assert json.loads(str(entry["FSNOTIFYD_JSON"])) == e.to_dict()
        # journald's own trusted fields: it took the sender from the socket's credentials.
        assert entry["_TRANSPORT"] == "journal"
        assert entry["_PID"] == str(os.getpid())
        assert entry["_NAMESPACE"] == NAMESPACE
    # Everything journald made is in the temp dirs; the host's paths did not get any of it.
    assert not glob.glob(f"/run/systemd/journal.{NAMESPACE}") and not glob.glob(f"/var/log/journal/*.{NAMESPACE}")
