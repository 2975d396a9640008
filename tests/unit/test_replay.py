"""Replay: kernel log text and JSONL journals → one deterministic, time-ordered event stream.

The fixtures in tests/fixtures/logs/ are one incident captured on kernel 6.18 (loop0 mounted
errors=continue; two ``trigger_fs_error`` writes 2 s apart; ``mount -o remount,errors=remount-ro``;
a third error, which aborts the journal and remounts read-only), as ``dmesg``, ``dmesg -T`` and
``dmesg -x`` printed it (dmesg.txt and dmesg-T.txt are the tools' own output) and as
``journalctl -k`` [``-o short-precise``] would print it (no journald on the capture machine: those
two are rendered from the same records, boot time 1795636547.250536, zone UTC, host ``vm``).
"""

from __future__ import annotations

import errno
import gzip
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsnotifyd.errors import ConfigError
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.inventory import VE
from fsnotifyd.kernel.logtext import observe
from fsnotifyd.replay import ReadReport, detect_format, load_ve_map, parse_entry, parse_line, read_events

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "logs"
BOOT = 1795636547.250536  # boot wall clock of the fixture incident
UTC = UTC
FIXTURES = ["dmesg.txt", "dmesg-T.txt", "dmesg-x.txt", "journalctl-k.txt", "journalctl-short-precise.txt"]

# Lines in the kernel's own words (the first from trigger_fs_error, the others from the format
# strings in fs/ext4, fs/jbd2, block/blk-core.c and fs/buffer.c).
TRIGGER = "EXT4-fs error (device loop0): trigger_test_error:129: comm bash: hello"
REMOUNT_RO = "EXT4-fs (loop0): Remounting filesystem read-only"
ABORT = "Aborting journal on device loop0-8."
SHUTDOWN = "EXT4-fs (loop0): shut down requested (2)"
IO_ERROR = "I/O error, dev loop3, sector 16784 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0"
BUFFER = "Buffer I/O error on dev loop3, logical block 4113, lost async page write"
MOUNT_FAILED = "EXT4-fs (loop0): mount failed"
MOUNTED = ("EXT4-fs (loop0): mounted filesystem 6a1f0c55-0e0e-4c1e-9d43-3b1f5d0f2a10 r/w with ordered data mode. "
           "Quota mode: none.")

T0 = datetime(2026, 11, 25, 21, 58, 41, 301002, tzinfo=UTC).timestamp()


def render(fmt: str, entries: list[tuple[float, str]], *, boot: float = T0 - 6776.0) -> str:
    """``entries`` (epoch seconds, message) as the tool ``fmt`` prints them (zone UTC, host vm)."""
    out = []
    for t, msg in entries:
        dt = datetime.fromtimestamp(t, tz=UTC)
        mono = t - boot
        if fmt == "dmesg":
            out.append(f"[{mono:12.6f}] {msg}")
        elif fmt == "dmesg-x":
            out.append(f"kern  :err   : [{mono:12.6f}] {msg}")
        elif fmt == "dmesg-T":
            out.append(f"[{dt.strftime('%a %b %e %H:%M:%S %Y')}] {msg}")
        elif fmt == "journalctl":
            out.append(f"{dt.strftime('%b %d %H:%M:%S')} vm kernel: {msg}")
        elif fmt == "journalctl-precise":
            out.append(f"{dt.strftime('%b %d %H:%M:%S')}.{dt.microsecond:06d} vm kernel: {msg}")
        else:
            raise AssertionError(fmt)
    return "\n".join(out) + "\n"


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def replay(paths, report: ReadReport | None = None, **kw) -> list[dict]:
    kw.setdefault("tz", UTC)
    kw.setdefault("year", 2026)
    kw.setdefault("boot_time", T0 - 6776.0)
    return list(read_events(paths, report=report, **kw))


def summary(e: dict) -> tuple:
    k = e["kernel"]
    return (e["kind"], e["device"]["name"] if e["device"] else None, e["ve"], k["function"], k["line"],
            k["comm"], k["message"])


def ts(e: dict) -> float:
    return datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------------------------
# Parsing lines


class TestParseLine:
    def test_dmesg(self):
        assert parse_line(f"[ 6776.576606] {TRIGGER}") == (6776.576606, True, TRIGGER)
        assert parse_line("[    0.000000] Linux version 6.18.0") == (0.0, True, "Linux version 6.18.0")

    def test_dmesg_caller_id(self):
        e = parse_entry(f"[ 6776.576606] [  T4711] {TRIGGER}")
        assert (e.time, e.message, e.caller) == (6776.576606, TRIGGER, "T4711")
        assert observe(e, 1).kernel.pid == 4711  # the classifier reads the caller as kmsg's

    def test_dmesg_T_local_time(self):
        assert parse_line(f"[Wed Nov 25 21:58:41 2026] {ABORT}", tz=UTC) == (T0 - 0.301002, False, ABORT)
        # %e pads the day with a space
        got = parse_line("[Thu Nov  5 01:02:03 2026] x", tz=UTC)
        assert got == (datetime(2026, 11, 5, 1, 2, 3, tzinfo=UTC).timestamp(), False, "x")

    def test_dmesg_T_reads_this_machines_zone_by_default(self):
        t, _, _ = parse_line("[Wed Nov 25 21:58:41 2026] x")
        assert t == datetime(2026, 11, 25, 21, 58, 41).timestamp()

    def test_journalctl(self):
        assert parse_line(f"Nov 25 21:58:41 vm kernel: {REMOUNT_RO}", year=2026, tz=UTC) == \
            (T0 - 0.301002, False, REMOUNT_RO)
        e = parse_entry(f"Nov 25 21:58:41 vm kernel: {REMOUNT_RO}", year=2026, tz=UTC)
        assert (e.host, e.facility, e.yearless, e.format) == ("vm", 0, True, "journalctl")

    def test_journalctl_year_defaults_to_this_year(self):
        t, _, _ = parse_line("Jan 01 00:00:00 vm kernel: x", tz=UTC)
        assert datetime.fromtimestamp(t, tz=UTC).year == datetime.now(UTC).year

    def test_journalctl_short_precise(self):
        got = parse_line(f"Nov 25 21:58:41.301002 vm kernel: {SHUTDOWN}", year=2026, tz=UTC)
        assert got is not None and got[1:] == (False, SHUTDOWN) and got[0] == pytest.approx(T0, abs=1e-6)

    def test_syslog_file_keeps_its_own_time_and_drops_the_kernel_stamp(self):
        e = parse_entry(f"Nov  5 21:58:41 vm kernel: [ 6776.576606] {BUFFER}", year=2026, tz=UTC)
        assert (e.message, e.monotonic) == (BUFFER, False)
        assert e.time == datetime(2026, 11, 5, 21, 58, 41, tzinfo=UTC).timestamp()

    def test_dmesg_x_carries_level_and_facility(self):
        e = parse_entry(f"kern  :crit  : [ 6776.576606] {TRIGGER}")
        assert (e.time, e.monotonic, e.message, e.level, e.facility) == (6776.576606, True, TRIGGER, 2, 0)
        e = parse_entry(f"kern  :err   : [Wed Nov 25 21:58:41 2026] {ABORT}", tz=UTC)
        assert (e.message, e.level, e.format) == (ABORT, 3, "dmesg-T")
        # A user-space write into /dev/kmsg: the classifier ignores it, as the daemon does.
        e = parse_entry(f"user  :err   : [ 6776.576606] {TRIGGER}")
        assert e.facility == 1 and observe(e, 1) is None

    def test_non_kernel_journal_lines_are_not_kernel_facts(self):
        e = parse_entry(f"Nov 25 21:58:41 vm myprog[812]: {TRIGGER}", year=2026)
        assert e is not None and e.facility == 1 and observe(e, 1) is None

    def test_iso_forms(self):
        e = parse_entry(f"2026-11-25T21:58:41,301002+00:00 {TRIGGER}")  # dmesg --time-format=iso
        assert (e.format, e.message) == ("dmesg-iso", TRIGGER) and e.time == pytest.approx(T0, abs=1e-6)
        e = parse_entry(f"2026-11-25T21:58:41.301002+0000 vm kernel: {TRIGGER}")  # short-iso-precise
        assert (e.format, e.message, e.host) == ("journalctl-iso", TRIGGER, "vm")
        e = parse_entry(f"2026-11-25T23:58:41+0200 vm kernel: {TRIGGER}")  # short-iso
        assert e.time == int(T0)

    def test_short_monotonic(self):
        e = parse_entry(f"[ 6776.576606] vm kernel: {TRIGGER}")
        assert (e.format, e.time, e.monotonic, e.message) == ("journalctl-monotonic", 6776.576606, True, TRIGGER)

    @pytest.mark.parametrize("line", [
        "", "garbage", "[ 12] x", "[abc] x", "Nov 25 21:58:41", "Foo 25 21:58:41 vm kernel: x",
        "-- Boot 3e2f --", "  indented", "kern  :err   : garbage", "2026-13-45T99:99:99 x",
        "[Wed Nov 31 21:58:41 2026] no such day", "\x00\x01\x02",
    ])
    def test_not_an_entry(self, line):
        assert parse_line(line) is None

    def test_detect_format(self):
        for name, fmt in [("dmesg.txt", "dmesg"), ("dmesg-T.txt", "dmesg-T"), ("dmesg-x.txt", "dmesg"),
                          ("journalctl-k.txt", "journalctl"),
                          ("journalctl-short-precise.txt", "journalctl-precise")]:
            assert detect_format((LOGS / name).read_text().splitlines()) == fmt, name
        event = Event("fs.error", T0, "h", "error", None, None, None, None, Kernel(), ("kmsg",))
        assert detect_format(["", event.to_json(), "oops"]) == "jsonl"
        assert detect_format(["no", "kernel", "here"]) == "unknown"
        assert detect_format(["-- No entries --"]) == "unknown"

    @given(st.text())
    def test_never_raises(self, line):
        parse_line(line)
        parse_entry(line, year=2026, tz=UTC)


# --------------------------------------------------------------------------------------------
# Events from kernel text

SAMPLE = [  # (seconds after T0, message)
    (0.0, MOUNTED),
    (1.0, TRIGGER),
    (2.0, ABORT),
    (2.001, REMOUNT_RO),  # the same transition as the abort: one fs.readonly
    (3.0, SHUTDOWN),
    (4.0, IO_ERROR),
    (5.0, BUFFER),
    (6.0, "EXT4-fs (loop0): unmounting filesystem 6a1f0c55-0e0e-4c1e-9d43-3b1f5d0f2a10."),
    (7.0, "EXT4-fs (loop0): get root inode failed"),
    (7.0005, MOUNT_FAILED),
    (8.0, MOUNTED),
    (9.0, REMOUNT_RO),  # a new mount: a new read-only state
]
EXPECTED = [
    ("fs.error", "loop0", "101", "trigger_test_error", 129, "bash", "hello"),
    ("fs.readonly", "loop0", "101", None, None, None, ABORT),
    ("fs.shutdown", "loop0", "101", None, None, None, "shut down requested (2)"),
    ("blk.io_error", "loop3", "102", None, None, None, IO_ERROR),
    ("blk.io_error", "loop3", "102", None, None, None, BUFFER),
    ("fs.mount_failed", "loop0", "101", None, None, None, "get root inode failed"),
    ("fs.readonly", "loop0", "101", None, None, None, "Remounting filesystem read-only"),
]


@pytest.fixture
def ve_map(tmp_path) -> tuple[VE, ...]:
    return load_ve_map(write(tmp_path, "ves.json", '{"loop0": "101", "loop3": "102"}'))


class TestKernelText:
    @pytest.mark.parametrize("fmt", ["dmesg", "dmesg-x", "dmesg-T", "journalctl", "journalctl-precise"])
    def test_each_format_gives_the_events(self, tmp_path, ve_map, fmt):
        path = write(tmp_path, f"{fmt}.log", render(fmt, [(T0 + dt, m) for dt, m in SAMPLE]))
        report = ReadReport()
        events = replay([path], report, ves=ve_map)
        assert [summary(e) for e in events] == EXPECTED
        assert report.skipped == 0 and report.entries == len(SAMPLE)
        exact = fmt not in ("dmesg-T", "journalctl")  # those print whole seconds
        for e, want in zip(events, [1.0, 2.0, 3.0, 4.0, 5.0, 7.0005, 9.0], strict=True):
            assert ts(e) == pytest.approx(int(T0 + want) if not exact else T0 + want, abs=1e-6)
        by_kind: dict[str, dict] = {}
        for e in events:
            by_kind.setdefault(e["kind"], e)  # the first of each kind
        err = by_kind["fs.error"]
        assert err["schema"] == "fsnotifyd.event/1" and err["severity"] == "error" and err["fs"] == "ext4"
        assert err["kernel"]["errno"] is None and err["sources"] == ["kmsg"] and err["count"] == 1
        assert err["device"] == {"major": None, "minor": None, "name": "loop0"}  # no host sysfs look-up
        assert err["mount"] is None
        assert by_kind["fs.readonly"]["details"]["reason"] == "journal_aborted"
        assert by_kind["fs.readonly"]["severity"] == "critical"
        assert by_kind["fs.shutdown"]["details"]["mode"] == "nologflush"
        io = [e for e in events if e["kind"] == "blk.io_error"]
        assert io[0]["kernel"]["block"] == 16784 and io[0]["details"]["op"] == "READ"
        assert io[0]["kernel"]["errno"] == {"name": "EIO", "number": errno.EIO}
        assert io[1]["kernel"]["block"] == 4113 and io[1]["details"]["context"] == "lost async page write"
        assert by_kind["fs.mount_failed"]["details"]["reason"] == "get root inode failed"
        assert err["details"]["replay"] == {"file": path, "line": 2}
        assert err["host"] == ("vm" if fmt.startswith("journalctl") else "unknown")
        json.dumps(events)  # plain JSON data

    def test_no_map_no_ve(self, tmp_path):
        events = replay([write(tmp_path, "d.log", render("dmesg", [(T0, TRIGGER)]))])
        assert [e["ve"] for e in events] == [None]

    def test_ves_as_device_map(self, tmp_path):
        events = replay([write(tmp_path, "d.log", render("dmesg", [(T0, TRIGGER), (T0 + 1, IO_ERROR)]))],
                        ves={"loop0": "101", "loop3": "102"})
        assert [e["ve"] for e in events] == ["101", "102"]

    def test_fixture_incident_in_every_format(self):
        want = [("fs.error", "loop0", "101", "trigger_test_error", 129, "python", f"disk full of surprises {i}")
                for i in (1, 2, 3)] + [("fs.readonly", "loop0", "101", None, None, None, ABORT)]
        times = None
        for name in FIXTURES:
            report = ReadReport()
            events = replay([str(LOGS / name)], report, ves={"loop0": "101"}, boot_time=BOOT)
            assert [summary(e) for e in events] == want, name
            assert report.skipped == 0 and report.observations == 5, (name, report.summary())
            got = [ts(e) for e in events]
            times = times or got
            assert got == pytest.approx(times, abs=1.0), name  # dmesg -T, journalctl: whole seconds
            assert got[1] - got[0] == pytest.approx(2.1, abs=1.0)
        assert times == pytest.approx([BOOT + 9833.409470, BOOT + 9835.511019, BOOT + 9837.621001,
                                       BOOT + 9837.622162], abs=1e-6)

    def test_dmesg_without_boot_time_is_relative(self):
        report = ReadReport()
        events = list(read_events([str(LOGS / "dmesg.txt")], report=report))
        assert [ts(e) for e in events] == pytest.approx([9833.409470, 9835.511019, 9837.621001, 9837.622162])
        assert report.monotonic_without_boot_time
        assert any("relative" in line for line in report.summary())

    def test_deterministic(self, tmp_path, ve_map):
        path = write(tmp_path, "d.log", render("dmesg", [(T0 + dt, m) for dt, m in SAMPLE]))
        first = [json.dumps(e, sort_keys=True) for e in replay([path], ves=ve_map)]
        second = [json.dumps(e, sort_keys=True) for e in replay([path], ves=ve_map)]
        assert first == second
        ids = [json.loads(e)["id"] for e in first]
        assert len(set(ids)) == len(ids)
        assert ids[0] == str(uuid.uuid5(uuid.UUID("6f1c2b9e-3d4a-5e8f-9a0b-1c2d3e4f5a6b"), f"{path}:2:fs.error"))
        # ids name where an event came from: another file, other ids
        other = write(tmp_path, "copy.log", Path(path).read_text())
        assert {e["id"] for e in replay([other], ves=ve_map)}.isdisjoint(ids)

    def test_each_error_line_is_one_event(self, tmp_path):
        lines = [(T0 + i * 0.001, TRIGGER.replace("hello", f"e{i}")) for i in range(25)]
        events = replay([write(tmp_path, "d.log", render("dmesg", lines))])
        assert [e["kernel"]["message"] for e in events] == [f"e{i}" for i in range(25)]

    def test_read_only_once_per_mount(self, tmp_path):
        same_mount = [(T0, REMOUNT_RO), (T0 + 10, ABORT), (T0 + 20, REMOUNT_RO)]
        assert len(replay([write(tmp_path, "a.log", render("dmesg", same_mount))])) == 1
        remounted = [(T0, REMOUNT_RO),
                     (T0 + 5, "EXT4-fs (loop0): re-mounted 6a1f0c55-0e0e-4c1e-9d43-3b1f5d0f2a10 r/w."),
                     (T0 + 10, REMOUNT_RO), (T0 + 15, "EXT4-fs (loop0): re-mounted 6a1f0c55 ro."),
                     (T0 + 20, REMOUNT_RO)]
        assert len(replay([write(tmp_path, "b.log", render("dmesg", remounted))])) == 2

    def test_a_new_boot_starts_afresh(self, tmp_path):
        text = (render("dmesg", [(T0, REMOUNT_RO)], boot=T0 - 500)
                + render("dmesg", [(T0 + 100, REMOUNT_RO)], boot=T0 + 90))
        report = ReadReport()
        events = replay([write(tmp_path, "two-boots.log", text)], report)
        assert len(events) == 2 and report.skipped == 0
        journal = "-- Boot aaa --\n" + render("journalctl", [(T0, REMOUNT_RO)]) + \
                  "-- Boot bbb --\n" + render("journalctl", [(T0 + 100, REMOUNT_RO)])
        assert len(replay([write(tmp_path, "j.log", journal)])) == 2

    def test_journalctl_across_new_year(self, tmp_path):
        text = f"Dec 31 23:59:59 vm kernel: {TRIGGER}\nJan 01 00:00:01 vm kernel: {IO_ERROR}\n"
        events = replay([write(tmp_path, "j.log", text)], year=2025)
        assert [e["time"] for e in events] == ["2025-12-31T23:59:59.000000Z", "2026-01-01T00:00:01.000000Z"]

    def test_markers_blank_and_continuation_lines_are_not_garbage(self, tmp_path):
        text = ("-- Journal begins at Wed 2026-11-25 19:12:03 UTC, ends at Wed 2026-11-25 22:39:44 UTC. --\n\n"
                "Nov 25 21:58:41 vm kernel: amd_pstate: The CPPC feature is supported but disabled.\n"
                "                           Please enable it if your BIOS has the CPPC option.\n"
                + render("journalctl", [(T0, TRIGGER)]) + "-- No entries --\n")
        report = ReadReport()
        events = replay([write(tmp_path, "j.log", text)], report)
        assert len(events) == 1 and report.skipped == 0 and report.ignored == 4 and report.entries == 2

    def test_host_is_the_lines_own(self, tmp_path):
        text = (render("journalctl", [(T0, TRIGGER)])
                + render("journalctl", [(T0 + 1, IO_ERROR)]).replace(" vm ", " node2 ")
                + render("dmesg", [(T0 + 2, BUFFER)]))
        events = replay([write(tmp_path, "m.log", text)], host="fallback")
        assert [e["host"] for e in events] == ["vm", "node2", "fallback"]

    def test_gzip(self, tmp_path):
        p = tmp_path / "dmesg.txt.gz"
        p.write_bytes(gzip.compress((LOGS / "dmesg.txt").read_bytes()))
        assert len(replay([str(p)], boot_time=BOOT)) == 4

    def test_missing_file_raises(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            replay([str(tmp_path / "nope.log")])


# --------------------------------------------------------------------------------------------
# Garbage


class TestGarbage:
    def test_counted_with_file_and_line(self, tmp_path):
        text = ("\x00\xff binary junk\n" + render("dmesg", [(T0, TRIGGER)]) + "not a log line\n"
                + "[ 12] short stamp\n" + render("dmesg", [(T0 + 1, IO_ERROR)]) + "x\n" * 10)
        report = ReadReport()
        path = write(tmp_path, "g.log", text)
        events = replay([path], report)
        assert [e["kind"] for e in events] == ["fs.error", "blk.io_error"]
        assert report.skipped == 13 and report.entries == 2 and report.lines == 15
        assert len(report.examples) == report.max_examples
        assert report.examples[0].startswith(f"{path}:1: not a kernel log line")
        assert report.examples[1].startswith(f"{path}:3: ")
        assert any("skipped lines" in line and f"{path}:4" in line for line in report.summary())

    def test_invalid_utf8_is_replaced_not_raised(self, tmp_path):
        p = tmp_path / "b.log"
        p.write_bytes(b"[ 6776.576606] EXT4-fs error (device loop0): trigger_test_error:129: comm b\xffsh: hi\n")
        [e] = replay([str(p)])
        assert e["kernel"]["comm"] == "b\ufffdsh"

    lines = st.lists(
        st.one_of(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=120),
            st.builds(lambda p, s: p + s,
                      st.sampled_from(["[ 6776.576606] ", "kern  :err   : [ 1.000001] ", "Nov 25 21:58:41 vm kernel: ",
                                       "[Wed Nov 25 21:58:41 2026] ", "-- ", "  ", "{", "EXT4-fs error (device ",
                                       "[ 6776.576606] EXT4-fs (loop0): ", "[ 1.5] I/O error, dev loop3, sector ",
                                       '{"schema": "fsnotifyd.event/1", "time": "2026-11-25T21:58:41Z"']),
                      st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                              max_size=80)),
        ),
        max_size=40,
    )

    @given(lines)
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    def test_fuzz_never_raises_and_counts_every_line(self, tmp_path, lines):
        p = tmp_path / "fuzz.log"
        p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        report = ReadReport()
        events = list(read_events([str(p)], report=report, year=2026, tz=UTC))
        assert report.lines == len(lines)
        assert report.lines == report.entries + report.jsonl_events + report.ignored + report.skipped
        assert report.events == len(events)
        json.dumps(events)
        assert list(read_events([str(p)], year=2026, tz=UTC)) == events  # deterministic


# --------------------------------------------------------------------------------------------
# JSONL


def recorded(kind: str, t: float, device: str, **kw) -> dict:
    return Event(kind=kind, time=t, host="node1", severity="error", device=Device(7, 0, device), fs="ext4",
                 mount="/vz/root/101", ve="101", kernel=Kernel(function="f", message=kw.pop("message", "m")),
                 sources=("kmsg", "fanotify", "sysfs"), **kw).to_dict()


class TestJsonl:
    def test_pass_through_unchanged_and_in_time_order(self, tmp_path):
        a = recorded("fs.error", T0, "loop0", message="first")
        b = recorded("fs.error", T0 + 0.5, "loop0", message="second")
        ro = recorded("fs.readonly", T0 + 0.2, "loop0", message="ro")  # published a window after its time
        text = "\n".join(json.dumps(e) for e in (a, b, ro)) + "\n"
        report = ReadReport()
        events = replay([write(tmp_path, "events.jsonl", text)], report, ves={"loop0": "999"})
        assert events == [a, ro, b]  # ids, VE, sources: as recorded
        assert report.jsonl_events == 3 and report.files[str(tmp_path / "events.jsonl")] == "jsonl"

    def test_bad_lines_counted(self, tmp_path):
        good = recorded("fs.error", T0, "loop0")
        lines = [json.dumps(good), "{not json", json.dumps({"schema": "other/1", "time": "x"}), "[1, 2]",
                 json.dumps(recorded("fs.error", T0, "loop1") | {"time": "yesterday"}), "", f"[ 1.0] {TRIGGER}",
                 json.dumps(recorded("fs.readonly", T0 + 1, "loop0"))]
        path = write(tmp_path, "j.jsonl", "\n".join(lines) + "\n")
        report = ReadReport()
        events = replay([path], report)
        assert [e["kind"] for e in events] == ["fs.error", "fs.readonly"]
        assert report.skipped == 5 and report.ignored == 1 and report.jsonl_events == 2
        assert [x.split(": ")[0] for x in report.examples] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7)]
        assert "not JSON" in report.examples[0] and "without a valid time" in report.examples[3]

    def test_journal_of_a_real_run_shape(self, tmp_path):
        # What the daemon writes: compact JSON, one per line, from Event.to_json().
        ev = Event("fs.error", T0, "vm", "error", Device(7, 0, "loop0"), "ext4", "/m", "101",
                   Kernel(function="trigger_test_error", line=129), ("kmsg",))
        [got] = replay([write(tmp_path, "events.jsonl", ev.to_json() + "\n")])
        assert got == json.loads(ev.to_json())


# --------------------------------------------------------------------------------------------
# Merging


class TestMerge:
    def test_two_text_files_by_time(self, tmp_path, ve_map):
        a = write(tmp_path, "a.log", render("dmesg", [(T0, TRIGGER), (T0 + 2, ABORT), (T0 + 4, SHUTDOWN)]))
        b = write(tmp_path, "b.log", render("journalctl-precise", [(T0 + 1, IO_ERROR), (T0 + 3, BUFFER)]))
        events = replay([a, b], ves=ve_map)
        assert [e["kind"] for e in events] == ["fs.error", "blk.io_error", "fs.readonly", "blk.io_error", "fs.shutdown"]
        assert [e["host"] for e in events] == ["unknown", "vm", "unknown", "vm", "unknown"]
        assert [ts(e) for e in events] == pytest.approx([T0 + i for i in range(5)], abs=1e-6)
        assert [summary(e) for e in events] == [summary(e) for e in replay([b, a], ves=ve_map)]

    def test_equal_times_keep_path_order(self, tmp_path):
        a = write(tmp_path, "a.log", render("dmesg", [(T0, TRIGGER)]))
        b = write(tmp_path, "b.log", render("dmesg", [(T0, IO_ERROR)]))
        assert [e["kind"] for e in replay([a, b])] == ["fs.error", "blk.io_error"]
        assert [e["kind"] for e in replay([b, a])] == ["blk.io_error", "fs.error"]

    def test_jsonl_and_text(self, tmp_path):
        j = write(tmp_path, "e.jsonl", json.dumps(recorded("fs.error", T0 + 1.5, "loop9")) + "\n")
        t = write(tmp_path, "d.log", render("dmesg", [(T0 + 1, TRIGGER), (T0 + 2, IO_ERROR)]))
        report = ReadReport()
        events = replay([t, j], report)
        assert [(e["kind"], e["device"]["name"]) for e in events] == \
            [("fs.error", "loop0"), ("fs.error", "loop9"), ("blk.io_error", "loop3")]
        assert report.events == 3 and report.files == {t: "dmesg", j: "jsonl"}

    def test_a_single_path_string(self):
        assert len(list(read_events(str(LOGS / "dmesg.txt")))) == 4


# --------------------------------------------------------------------------------------------
# VE maps


class TestVeMap:
    def test_full_form_json(self, tmp_path):
        p = write(tmp_path, "m.json", json.dumps({
            "101": {"devices": ["loop0", "loop1"], "mounts": ["/vz/root/101/"], "images": ["/vz/101.img"],
                    "labels": {"tier": "gold"}},
            "102": {"device": "loop3"},
        }))
        ves = load_ve_map(p)
        assert ves == (VE("101", mounts=("/vz/root/101",), devices=("loop0", "loop1"), images=("/vz/101.img",),
                          labels=(("tier", "gold"),)),
                       VE("102", devices=("loop3",)))

    def test_simple_form_yaml_and_mixed(self, tmp_path):
        p = write(tmp_path, "m.yaml", "loop0: 101\nloop1: '101'\nloop3: ve-b\n102:\n  devices: [loop7]\n")
        assert load_ve_map(p) == (VE("101", devices=("loop0", "loop1")), VE("ve-b", devices=("loop3",)),
                                  VE("102", devices=("loop7",)))

    def test_empty(self, tmp_path):
        assert load_ve_map(write(tmp_path, "e.yaml", "")) == ()
        assert load_ve_map(write(tmp_path, "e.json", "{}")) == ()

    def test_json_that_yaml_refuses(self, tmp_path):
        p = write(tmp_path, "t.json", '{\t"loop0":\t"1\\/01"}')
        with pytest.raises(ConfigError, match="invalid VE id '1/01'"):
            load_ve_map(p)
        assert load_ve_map(write(tmp_path, "ok.json", '{\t"loop0":\t"101"}')) == (VE("101", devices=("loop0",)),)

    @pytest.mark.parametrize("text, line, match", [
        ('{"loop0": "101",\n "loop1": "../etc"}', 2, "invalid VE id '../etc'"),
        ("101:\n  devices: [loop0]\n'bad id':\n  devices: [loop1]\n", 3, "invalid VE id 'bad id'"),
        ("101:\n  devices: [loop0]\n  disks: [loop1]\n", 3, "unknown field 'disks'"),
        ("loop0: 101\nloop0: 102\n", 2, "duplicate key 'loop0'"),
        ("loop0: 101\n102:\n  devices:\n    - loop0\n", 4, "device 'loop0' is given to VE '101' and to VE '102'"),
        ("- loop0\n- loop1\n", 1, "a VE map is a mapping"),
        ("101:\n  devices: [loop0, [x]]\n", 2, "expected a non-empty string"),
        ("101:\n  labels: [a]\n", 2, "labels: expected a mapping"),
        ("loop0: [101]\n", 1, "expected a VE id"),
        ("{\"loop0\": \"101\",\n\n  \"loop1\" \"102\"}", 3, "neither YAML nor JSON"),
    ])
    def test_errors_name_file_and_line(self, tmp_path, text, line, match):
        p = write(tmp_path, "bad.yaml", text)
        with pytest.raises(ConfigError, match=match) as ei:
            load_ve_map(p)
        assert (ei.value.file, ei.value.line) == (p, line)
        assert str(ei.value).startswith(f"{p}:{line}: ")

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="cannot read VE map"):
            load_ve_map(tmp_path / "none.yaml")

    def test_duplicate_ve_ids_in_read_events(self, tmp_path):
        with pytest.raises(ConfigError, match="duplicate VE id"):
            list(read_events([str(LOGS / "dmesg.txt")], ves=[VE("1"), VE("1")]))


class TestFastEventTime:
    from hypothesis import given as _given
    from hypothesis import settings as _settings
    from hypothesis import strategies as _st

    @_settings(max_examples=300, deadline=None)
    @_given(_st.datetimes(min_value=__import__("datetime").datetime(1971, 1, 1),
                          max_value=__import__("datetime").datetime(2100, 1, 1)), _st.booleans())
    def test_same_as_the_full_parser(self, dt, micro):
        """The per-minute cache gives exactly what datetime.fromisoformat gives."""
        from fsnotifyd.replay.reader import _event_time, _fast_event_time

        stamp = dt.strftime("%Y-%m-%dT%H:%M:%S") + (dt.strftime(".%f") if micro else "") + "Z"
        assert _fast_event_time(stamp, {}) == _event_time(stamp)

    def test_odd_seconds_fall_back(self):
        """Anything but digits in the seconds goes to the full parser (and fails like it)."""
        from fsnotifyd.replay.reader import _event_time, _fast_event_time

        for stamp in ("2026-11-25T22:51:+9.5Z", "2026-11-25T22:51:1e1Z", "2026-11-25T22:51: 9Z",
                      "2026-11-25T22:51:09.Z"):
            assert _fast_event_time(stamp, {}) == _event_time(stamp)
