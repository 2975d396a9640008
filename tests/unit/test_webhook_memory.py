"""A webhook whose spool the disk refuses: events held in memory, delivered in order, spilled
back, bounded, and counted when a stop loses them.

The disk is made to refuse the spool by an ``os.write`` (and, for a read-only start,
``os.open``) that fails for descriptors and paths under the spool directory only, as a full or
read-only state disk would; everything else (the HTTP connection, the test's own files) is
untouched. The endpoint is a real HTTP server on 127.0.0.1 (:class:`tests.rigs.net.
WebhookReceiver`). The sender's spill interval is cut to 50 ms so recovery is quick.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fsnotifyd import statefile
from fsnotifyd.config import WebhookConfig
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.metrics import Metrics
from fsnotifyd.sinks import webhook
from fsnotifyd.sinks.backlog import Backlog, Held
from fsnotifyd.sinks.spool import Record
from fsnotifyd.sinks.webhook import WebhookSink
from tests.rigs.net import WebhookReceiver

HOST = "vm7"
FAST = dict(retry_initial_s=0.02, retry_max_s=0.1, timeout_s=5.0)


class RefusingDisk:
    """The disk under ``directory``: ``full`` makes its writes fail with ENOSPC, ``readonly``
    its opens for writing with EROFS. Also what FileHealth asks (is there room again?)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = str(directory)
        self.full = False
        self.readonly = False
        real_write, real_open = os.write, os.open

        def under(path: str) -> bool:
            return path == self.directory or path.startswith(self.directory + os.sep)

        def write(fd: int, data) -> int:
            if self.full:
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    target = ""
                if under(target):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if self.readonly and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(os.path.abspath(path)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(statefile, "_has_room", lambda path: not self.full)


class Lost:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, count: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count


def event(i: int) -> Event:
    return Event(
        kind="fs.error", time=1_795_680_000.5 + i, host=HOST, severity="error", device=Device(7, 3, "loop3"),
        fs="ext4", mount="/vz/101", ve="101",
        kernel=Kernel(errno=-5, function="ext4_lookup", line=1855, inode=2, comm="ls", pid=4242,
                      message=f"EXT4-fs error (device loop3): ext4_lookup:1855: event {i}"),
        sources=("kmsg",), count=1, details={"n": i},
    )


def wait_until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def spooled_ids(directory: Path) -> list[str]:
    """Every CloudEvent id in the spool's segments, in file order (delivered or not)."""
    return [json.loads(x)["id"] for seg in sorted(directory.glob("*.jsonl")) if seg.name != "rejected.jsonl"
            for x in seg.read_text().splitlines()]


def named(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "webhook-test"


@pytest.fixture
def disk(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> RefusingDisk:
    return RefusingDisk(spool_dir, monkeypatch)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def make_sink(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., WebhookSink]]:
    """Started sinks, closed at the end (before the receiver stops: fixtures tear down LIFO)."""
    monkeypatch.setattr(webhook, "SPILL_INTERVAL_S", 0.05)
    before = set(threading.enumerate())
    sinks: list[WebhookSink] = []

    def make(url: str, metrics: Metrics | None = None, health: statefile.FileHealth | None = None,
             **kw) -> WebhookSink:
        cfg = WebhookConfig(name="test", url=url, **{**FAST, **kw})
        sink = WebhookSink(cfg, str(spool_dir), metrics or Metrics(), host=HOST, health=health)
        sinks.append(sink)
        sink.start()
        return sink

    yield make
    for sink in sinks:
        sink.close()
    left = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("fsnotifyd-")]
    assert not left, f"sender threads left running: {left}"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- the sink, against a real endpoint -------------------------------------------------------------


def test_order_kept_across_disk_memory_disk(disk, receiver, make_sink):
    """5 events spooled, 5 held in memory while the disk is full, delivered in that order
    while it is still full (memory drained straight to the endpoint), one more held and
    delivered, then the disk takes writes again and 4 more go to the spool: all 15 arrive
    exactly once, in publication order. The disk refusing is said once, its end once."""
    receiver.accept = False
    metrics = Metrics()
    health = statefile.FileHealth()
    sink = make_sink(receiver.url, metrics=metrics, health=health)
    events = [event(i) for i in range(15)]
    with capture_logs() as logs:
        for ev in events[:5]:
            sink.publish(ev)
        disk.full = True
        for ev in events[5:10]:
            sink.publish(ev)
        st = sink.status()
        assert (st["spooled_events"], st["memory_events"], st["spool_failing"], st["spool_errno"]) == \
            (5, 5, True, "ENOSPC")
        assert st["memory_bytes"] > 5 * 500 and st["lost"] == {}
        assert sample(metrics, "fsnotifyd_webhook_memory_events", sink="webhook:test") == 5
        assert sample(metrics, "fsnotifyd_webhook_spool_events", sink="webhook:test") == 5
        assert sample(metrics, "fsnotifyd_webhook_memory_bytes", sink="webhook:test") == st["memory_bytes"]
        assert health.failing()[0].path == sink.spool_dir

        receiver.accept = True  # the disk still full: memory goes straight to the endpoint
        assert receiver.wait_delivered(10) == [e.id for e in events[:10]]
        wait_until(lambda: sink.status()["memory_events"] == 0, "memory drained")
        sink.publish(events[10])  # memory is empty, the disk still refuses: held again
        assert receiver.wait_delivered(11)[-1] == events[10].id
        wait_until(lambda: sink.status()["memory_events"] == 0, "memory drained again")
        assert sink.status()["spool_failing"]

        disk.full = False
        for ev in events[11:]:
            sink.publish(ev)
        assert receiver.wait_delivered(15) == [e.id for e in events]
        wait_until(lambda: sink.status()["delivered"] == 15, "the sink to count its deliveries")
    time.sleep(0.2)  # a late duplicate would show up in this time
    assert receiver.delivered_ids() == [e.id for e in events]
    st = sink.status()
    assert (st["spooled_events"], st["memory_events"], st["spool_failing"], st["lost"]) == (0, 0, False, {})
    failing = named(logs, "webhook.spool_failing")
    assert [(e["errno"], e["path"], e["log_level"]) for e in failing] == [("ENOSPC", sink.spool_dir, "error")]
    recovered = named(logs, "webhook.spool_recovered")
    assert len(recovered) == 1 and recovered[0]["path"] == sink.spool_dir
    assert (recovered[0]["held"], recovered[0]["spilled"], recovered[0]["delivered_from_memory"]) == (6, 0, 6)
    assert not named(logs, "webhook.sender_error")
    assert health.failing() == []


def test_disk_back_spills_memory_to_the_spool_in_order(disk, spool_dir, receiver, make_sink):
    """The endpoint fails throughout. 3 events spooled, 7 held while the disk is full; the disk
    takes writes again: the 7 are written after the 3, and 3 published meanwhile after them,
    so the spool on disk holds all 13 in publication order. A new sink on the same spool (a
    restart) delivers them all, in order, once."""
    receiver.accept = False
    sink = make_sink(receiver.url)
    events = [event(i) for i in range(13)]
    with capture_logs() as logs:
        for ev in events[:3]:
            sink.publish(ev)
        disk.full = True
        for ev in events[3:10]:
            sink.publish(ev)
        assert sink.status()["memory_events"] == 7
        time.sleep(0.2)  # spill attempts that the full disk refuses: nothing moves, nothing is said
        assert sink.status()["memory_events"] == 7 and len(named(logs, "webhook.spool_failing")) == 1
        disk.full = False
        for ev in events[10:]:
            sink.publish(ev)
        wait_until(lambda: sink.status()["memory_events"] == 0, "the spill")
    assert sink.status()["spooled_events"] == 13 and not sink.status()["spool_failing"]
    assert spooled_ids(spool_dir) == [e.id for e in events]
    recovered = named(logs, "webhook.spool_recovered")
    assert len(recovered) == 1 and recovered[0]["delivered_from_memory"] == 0
    # The 3 published after the disk came back went to memory (order) or, if the spill was
    # done by then, straight to the spool: either way 7 or more were spilled, all were held or spooled.
    assert recovered[0]["spilled"] == recovered[0]["held"] >= 7
    with capture_logs() as logs:
        sink.close()
    assert not named(logs, "webhook.unsaved")

    receiver.accept = True
    again = make_sink(receiver.url)
    assert again.status()["spooled_events"] == 13
    assert receiver.wait_delivered(13) == [e.id for e in events]
    wait_until(lambda: again.status()["spooled_events"] == 0, "the spool emptied")


def test_memory_bound_drops_the_oldest_and_counts_them(disk, receiver, make_sink):
    """The disk full from the start and the endpoint failing: memory keeps a quarter of
    spool_max_bytes, the newest events; the oldest are dropped and counted (memory_full),
    said once; the kept ones arrive, in order."""
    receiver.accept = False
    metrics = Metrics()
    sink = make_sink(receiver.url, metrics=metrics, spool_max_bytes=64 << 10)
    assert sink.memory_max_bytes == 16 << 10
    disk.full = True
    events = [event(i) for i in range(60)]  # ~1.1 KB each: ~66 KB into 16 KB of memory
    with capture_logs() as logs:
        for ev in events:
            sink.publish(ev)
            assert sink.status()["memory_bytes"] <= 16 << 10
    # Two more failed attempts: the second began after the last drop, so the sender holds an
    # event that is still held (not one the bound dropped while it was being POSTed).
    retried = sink.status()["retried"]
    wait_until(lambda: sink.status()["retried"] >= retried + 2, "attempts after the last drop")
    st = sink.status()
    lost = sample(metrics, "fsnotifyd_events_lost_total", source="webhook:test", reason="memory_full")
    kept = st["memory_events"]
    assert lost > 30 and kept > 5 and kept + lost == 60
    assert st["lost"] == {"memory_full": lost} and st["spooled_events"] == 0
    full = named(logs, "webhook.memory_full")
    assert len(full) == 1 and full[0]["max_bytes"] == 16 << 10  # rate-limited: not one per drop

    receiver.accept = True
    assert receiver.wait_delivered(kept) == [e.id for e in events[-kept:]]
    wait_until(lambda: sink.status()["memory_events"] == 0, "memory drained")


def test_close_counts_what_is_only_in_memory(disk, spool_dir, receiver, make_sink):
    """A stop while the disk still refuses the spool: the events held in memory are lost,
    counted (not_saved) and said once, with their number. What was spooled before stays."""
    receiver.accept = False
    metrics = Metrics()
    sink = make_sink(receiver.url, metrics=metrics)
    events = [event(i) for i in range(6)]
    sink.publish(events[0])
    disk.full = True
    for ev in events[1:]:
        sink.publish(ev)
    with capture_logs() as logs:
        sink.close()
    unsaved = named(logs, "webhook.unsaved")
    assert [(e["count"], e["errno"], e["log_level"]) for e in unsaved] == [(5, "ENOSPC", "error")]
    assert sample(metrics, "fsnotifyd_events_lost_total", source="webhook:test", reason="not_saved") == 5
    st = sink.status()
    assert st["lost"] == {"not_saved": 5} and st["memory_events"] == 0 and not st["running"]
    assert spooled_ids(spool_dir) == [events[0].id]


def test_close_saves_memory_when_the_disk_takes_it_again(disk, spool_dir, receiver, make_sink):
    """The disk came back but no spill has happened yet: close() spills, nothing is lost."""
    receiver.accept = False
    sink = make_sink(receiver.url)
    disk.full = True
    events = [event(i) for i in range(4)]
    for ev in events:
        sink.publish(ev)
    webhook.SPILL_INTERVAL_S = 3600.0  # (undone by monkeypatch) no spill but the one at close
    disk.full = False
    with capture_logs() as logs:
        sink.close()
    assert not named(logs, "webhook.unsaved") and sink.status()["lost"] == {}
    assert spooled_ids(spool_dir) == [e.id for e in events]


def test_a_spool_that_cannot_be_opened_does_not_stop_the_start(disk, spool_dir, receiver, make_sink):
    """A state disk read-only at start: the sink starts, says so, delivers from memory, and
    opens the spool once the disk takes writes; later events are spooled again."""
    disk.readonly = True
    with capture_logs() as logs:
        sink = make_sink(receiver.url)
        events = [event(i) for i in range(6)]
        for ev in events[:3]:
            sink.publish(ev)
        assert receiver.wait_delivered(3) == [e.id for e in events[:3]]
        st = sink.status()
        assert st["running"] and st["spool_failing"] and st["spool_errno"] == "EROFS"
        disk.readonly = False
        wait_until(lambda: not sink.status()["spool_failing"], "the spool opened")
        receiver.accept = False  # so what follows stays on disk to be seen
        for ev in events[3:]:
            sink.publish(ev)
        assert sink.status()["spooled_events"] == 3 and sink.status()["memory_events"] == 0
    assert [(e["errno"]) for e in named(logs, "webhook.spool_failing")] == ["EROFS"]
    assert len(named(logs, "webhook.spool_recovered")) == 1
    assert spooled_ids(spool_dir) == [e.id for e in events[3:]]
    receiver.accept = True
    assert receiver.wait_delivered(6) == [e.id for e in events]


# -- the backlog alone --------------------------------------------------------------------------


def line(i: int) -> bytes:
    return json.dumps({"n": i, "id": f"e{i}", "pad": "x" * 20}, separators=(",", ":")).encode()


def test_an_event_spilled_while_in_flight_is_acknowledged_once(disk, spool_dir):
    """The sender holds memory's head (its POST in flight) when a spill moves it to the
    spool: its acknowledgement lands on the spool's head, which it now is; nothing is handed
    out twice and the order holds."""
    lost = Lost()
    b = Backlog(str(spool_dir), 1 << 20, 1 << 18, on_lost=lost)
    try:
        disk.full = True
        for i in range(4):
            b.append(line(i))
        head = b.peek()
        assert isinstance(head, Held) and head.value["n"] == 0 and b.memory_events == 4
        disk.full = False
        assert b.spill() and b.memory_events == 0 and b.spool_events == 4
        assert b.is_head(head) and b.ack(head)
        assert not b.ack(head)  # once
        out = []
        while (item := b.peek()) is not None:
            assert isinstance(item, Record)
            out.append(item.value["n"])
            assert b.ack(item)
        assert out == [1, 2, 3] and lost.counts == {}
    finally:
        b.close()


def test_a_spill_the_disk_refuses_midway_keeps_the_rest_in_memory(disk, spool_dir, monkeypatch):
    """The disk takes two lines of a spill and refuses the third: the two are spooled, the
    rest stays in memory in order, later appends queue behind it, and the next spill goes on."""
    refused: list[OSError] = []
    b = Backlog(str(spool_dir), 1 << 20, 1 << 18, on_lost=Lost(), on_refused=refused.append)
    try:
        disk.full = True
        for i in range(5):
            b.append(line(i))
        assert len(refused) == 1
        disk.full = False
        real = os.write
        takes = {"n": 2}

        def write(fd: int, data) -> int:  # the disk fills up again after two lines
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
                    return real(fd, data)
            if takes["n"] == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            takes["n"] -= 1
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)
        assert not b.spill()
        assert (b.spool_events, b.memory_events, b.spilled) == (2, 3, 2)
        b.append(line(5))  # behind memory, not on the disk before it
        assert (b.spool_events, b.memory_events) == (2, 4)
        takes["n"] = 100
        assert b.spill()
        out = []
        while (item := b.peek()) is not None:
            out.append(item.value["n"])
            assert b.ack(item)
        assert out == [0, 1, 2, 3, 4, 5]
    finally:
        b.close()
