"""Replay against the real daemon: the kernel text of an incident, replayed, gives the events the
daemon published for it (root, loop devices, ext4, kernel 6.18).

One incident on two fresh loop filesystems: three ``trigger_fs_error`` writes ~0.3 s apart with
distinct messages on one mounted ``errors=continue``, then one on another mounted
``errors=remount-ro`` (which aborts the journal and remounts read-only: a plain
``mount -o remount,ro`` prints only an unclassified ``re-mounted … ro.`` line). The daemon's JSONL
journal is recorded; the kernel text of the same span is read from ``/dev/kmsg`` (a position taken
before the incident) and rendered as ``dmesg`` prints it. Both go through ``read_events``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsnotifyd.inventory import VE
from fsnotifyd.kernel.kmsg import RECORD_MAX, parse_record
from fsnotifyd.replay import ReadReport, read_events
from fsnotifyd.sources.kmsg import boot_wallclock
from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4

pytestmark = pytest.mark.kernel

KINDS = ("fs.error", "fs.readonly")


def read_kmsg(fd: int) -> list:
    records = []
    while True:
        try:
            raw = os.read(fd, RECORD_MAX)
        except BlockingIOError:
            return records
        except BrokenPipeError:  # overrun by other work on the machine: keep what is left
            continue
        except InterruptedError:
            continue
        rec = parse_record(raw)
        if rec is not None:
            records.append(rec)


def key(e: dict) -> tuple:
    k = e["kernel"]
    return (e["kind"], e["device"]["name"], e["ve"], k["function"], k["message"])


def canonical(events: list[dict]) -> list[tuple]:
    # Per device, in time order, errors before the read-only state they caused. The live
    # event's time is its first view's, and fanotify is read before kmsg (whose reader is
    # woken a tick late), so the daemon may stamp an error a hair after the journal abort
    # that followed it; the replay, kmsg only, always has the error first.
    ordered = sorted(events, key=lambda e: (e["device"]["name"], e["kind"] == "fs.readonly", e["time"]))
    return [key(e) for e in ordered]


def test_replayed_kernel_text_matches_the_daemon(kernel, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with loop_ext4(workdir=tmp_path / "a") as a, \
            loop_ext4(mount_options="errors=remount-ro", workdir=tmp_path / "b") as b:
        a.quiet_ratelimits()
        b.quiet_ratelimits()
        ves = (VE("201", devices=(a.name,)), VE("202", devices=(b.name,)))
        # No rules: they decide on events, they do not make them (and this test is about events).
        config = ("rules: []\n"
                  f"ves:\n  - id: '201'\n    device: [{a.name}]\n"
                  f"  - id: '202'\n    device: [{b.name}]\n")
        daemon = RunningDaemon(tmp_path / "daemon", extra_config=config)
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with daemon:
                daemon.wait_marked(a)
                daemon.wait_marked(b)
                stream = daemon.stream(list(KINDS))
                try:
                    os.lseek(fd, 0, os.SEEK_END)
                    start = time.time()
                    for i in range(3):
                        (a.sysfs / "trigger_fs_error").write_text(f"replay incident {i + 1}")
                        time.sleep(0.3)
                    (b.sysfs / "trigger_fs_error").write_text("replay incident read-only")
                    on = lambda fs: lambda e: e["device"] and e["device"]["name"] == fs.name  # noqa: E731
                    stream.wait_for(lambda e: on(a)(e) and e["kind"] == "fs.error", count=3)
                    stream.wait_for(lambda e: on(b)(e) and e["kind"] == "fs.readonly")
                    stream.settle(quiet=1.5)
                    end = time.time()
                    records = read_kmsg(fd)
                finally:
                    stream.close()
        finally:
            os.close(fd)
        names = {a.name, b.name}
        boot = boot_wallclock()

    # The daemon's journal, replayed (JSONL passes through).
    live_report = ReadReport()
    live = [e for e in read_events([daemon.journal], report=live_report)
            if e["kind"] in KINDS and e["device"] and e["device"]["name"] in names
            and start - 0.05 <= _t(e) <= end]
    assert live_report.skipped == 0 and live_report.files == {str(daemon.journal): "jsonl"}

    # The kernel text of the same span, as dmesg prints it, replayed.
    text = tmp_path / "kmsg.txt"
    text.write_text("".join(f"[{r.ts_usec / 1e6:12.6f}] {r.message}\n" for r in records))
    text_report = ReadReport()
    replayed_all = list(read_events([text], ves=ves, boot_time=boot, report=text_report))
    replayed = [e for e in replayed_all
                if e["kind"] in KINDS and e["device"] and e["device"]["name"] in names and _t(e) <= end]
    assert text_report.skipped == 0 and text_report.files == {str(text): "dmesg"}, text_report.summary()

    expected = [("fs.error", a.name, "201", "trigger_test_error", f"replay incident {i}") for i in (1, 2, 3)] + [
        ("fs.error", b.name, "202", "trigger_test_error", "replay incident read-only"),
        ("fs.readonly", b.name, "202", None, f"Aborting journal on device {b.name}-8."),
    ]
    assert canonical(live) == sorted(expected, key=lambda k: (k[1], k[0] == "fs.readonly")), \
        (live, daemon.log()[-3000:])
    assert canonical(replayed) == canonical(live)
    # The replay is in time order and places the kernel's facts where the daemon did.
    times = [_t(e) for e in replayed_all]
    assert times == sorted(times)
    by_key = {key(e): _t(e) for e in live}
    for e in replayed:
        assert _t(e) == pytest.approx(by_key[key(e)], abs=0.1)
    # Same input, same output.
    assert list(read_events([text], ves=ves, boot_time=boot)) == replayed_all


def _t(e: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()


def test_replayed_kernel_text_decides_like_the_daemon(kernel, tmp_path: Path) -> None:
    """The same incident, as the daemon's JSONL and as dmesg text, gives the same decisions."""
    from fsnotifyd.rules.engine import Engine
    from fsnotifyd.rules.loader import load_rules

    rules = str(Path(__file__).resolve().parents[2] / "rules" / "examples" / "escalation" / "rules.yaml")
    (tmp_path / "a").mkdir()
    with loop_ext4(workdir=tmp_path / "a") as a:
        ves = (VE("201", devices=(a.name,)),)
        daemon = RunningDaemon(tmp_path / "daemon",
                               extra_config=f"rules: [{rules}]\nves:\n  - id: '201'\n    device: [{a.name}]\n")
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with daemon:
                daemon.wait_marked(a)
                stream = daemon.stream(["fs.error"])
                try:
                    os.lseek(fd, 0, os.SEEK_END)
                    for i in range(4):
                        (a.sysfs / "trigger_fs_error").write_text(f"decide {i}")
                        time.sleep(0.3)
                    stream.wait_for(lambda e: e["device"]["name"] == a.name, count=4)
                    stream.settle(quiet=1.2)
                    records = read_kmsg(fd)
                finally:
                    stream.close()
        finally:
            os.close(fd)
        text = tmp_path / "kmsg.txt"
        text.write_text("".join(f"[{r.ts_usec / 1e6:12.6f}] {r.message}\n" for r in records))

    def decide(events):
        engine = Engine(load_rules([rules]))
        return [(d.rule, d.outcome, d.ve, d.device, tuple(a.name for a in d.actions), d.total)
                for e in events if e["device"] and e["device"]["name"] == a.name
                for d in engine.process(e)]

    live = decide(read_events([daemon.journal]))
    replayed = decide(read_events([text], ves=ves, boot_time=boot_wallclock()))
    assert live == replayed
    assert [d[:2] for d in live] == [
        ("first-error", "fired"), ("three-in-ten-minutes", "threshold"),
        ("first-error", "cooldown"), ("three-in-ten-minutes", "threshold"),
        ("first-error", "cooldown"), ("three-in-ten-minutes", "fired"),
        ("first-error", "cooldown"), ("three-in-ten-minutes", "threshold"),
    ]
    # The daemon published the fired decisions as rule.matched events.
    matched = [e for e in daemon.journal_events() if e["kind"] == "rule.matched"]
    assert [e["details"]["rule"] for e in matched] == ["first-error", "three-in-ten-minutes"]
    assert all(e["ve"] == "201" for e in matched)
