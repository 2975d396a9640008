"""Sinks: journal rotation and a disk that refuses it, socket subscriptions with filters, slow
subscribers."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest
from structlog.testing import capture_logs

from fsnotifyd import statefile
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.metrics import Metrics
from fsnotifyd.sinks.journal import JournalSink
from fsnotifyd.sinks.prometheus import MetricsSink
from fsnotifyd.sinks.socket import SocketSink
from fsnotifyd.version import __version__


def ev(kind="fs.error", ve=None) -> Event:
    return Event(kind=kind, time=1.0, host="h", severity="error", device=Device(7, 0, "loop0"), fs="ext4",
                 mount="/m", ve=ve, kernel=Kernel(function="f"), sources=("kmsg",))


class TestJournal:
    def test_rotates_by_size_and_keeps_n(self, tmp_path):
        """Past max_bytes the file rotates to .1, .2 … and no more than keep are kept."""
        j = JournalSink(str(tmp_path / "e.jsonl"), max_bytes=2000, keep=2)
        for _ in range(40):
            j.publish(ev())
        j.close()
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
        lines = (tmp_path / "e.jsonl").read_text().splitlines()
        assert all(json.loads(x)["kind"] == "fs.error" for x in lines)
        assert (tmp_path / "e.jsonl").stat().st_size <= 2000


class RefusingWrites:
    """os.write on the journal's descriptor as a full disk does it: ENOSPC, after taking the
    first ``take`` bytes of the write if set (a nearly full disk fills the rest of a block)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.take: int | None = None
        real = os.write

        def write(fd: int, data) -> int:
            if not self.full:
                return real(fd, data)
            if self.take:
                n, self.take = real(fd, bytes(data[:self.take])), None
                return n
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(statefile, "_has_room", lambda path: not self.full)


class TestJournalOnAFullDisk:
    def test_refused_events_are_counted_and_said_once_then_recovery_once(self, tmp_path, monkeypatch):
        """One sink.journal_failing with the reason for a streak of refused events (each
        counted), no exception to the daemon, and one sink.journal_recovered when a write lands."""
        disk = RefusingWrites(monkeypatch)
        counted = []
        health = statefile.FileHealth()
        path = tmp_path / "e.jsonl"
        j = JournalSink(str(path), health=health, count_refused=lambda: counted.append(1))
        j.publish(ev("dev.add"))
        disk.full = True
        with capture_logs() as logs:
            for _ in range(50):
                j.publish(ev())
        assert len(counted) == 50
        assert [(x["event"], x["errno"], x["sink"]) for x in logs] == [("sink.journal_failing", "ENOSPC", "journal")]
        assert health.failing()[0].path == str(path) and health.failing()[0].refused == 50
        disk.full = False
        with capture_logs() as logs:
            j.publish(ev("fs.readonly"))
            j.publish(ev("fs.readonly"))
        j.close()
        assert [(x["event"], x["dropped"]) for x in logs] == [("sink.journal_recovered", 50)]
        kinds = [json.loads(x)["kind"] for x in path.read_text().splitlines()]
        assert kinds == ["dev.add", "fs.readonly", "fs.readonly"]
        assert health.failing() == []

    def test_a_partly_written_event_is_cut_off(self, tmp_path, monkeypatch):
        """The disk takes part of a line, then refuses: that part is removed again, so the next
        event does not follow a torn line (which would cost both)."""
        disk = RefusingWrites(monkeypatch)
        path = tmp_path / "e.jsonl"
        j = JournalSink(str(path))
        j.publish(ev("dev.add"))
        size = path.stat().st_size
        disk.full, disk.take = True, 40
        j.publish(ev())
        assert path.stat().st_size == size
        disk.full = False
        j.publish(ev("fs.readonly"))
        j.close()
        assert [json.loads(x)["kind"] for x in path.read_text().splitlines()] == ["dev.add", "fs.readonly"]


    def test_a_journal_that_cannot_be_opened_does_not_stop_the_start(self, tmp_path, monkeypatch):
        """A state disk read-only at start: the sink is made, says why, and opens later."""
        real = os.open
        refuse = {"on": True}

        def opener(path, flags, mode=0o777, **kw):
            if refuse["on"] and str(path).endswith("e.jsonl"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(path, flags, mode, **kw)

        monkeypatch.setattr(os, "open", opener)
        with capture_logs() as logs:
            j = JournalSink(str(tmp_path / "e.jsonl"))
        assert [(x["event"], x["errno"]) for x in logs] == [("sink.journal_failing", "EROFS")]
        refuse["on"] = False
        j.publish(ev())
        j.close()
        assert j.health.failing() == [] and len((tmp_path / "e.jsonl").read_text().splitlines()) == 1


class TestSocket:
    def test_filters_by_kind_prefix_and_ve(self, tmp_path):
        """A subscriber gets only the kinds and VEs it asked for, after its ack."""
        async def main():
            sink = SocketSink(str(tmp_path / "s.sock"))
            await sink.start()
            r, w = await asyncio.open_unix_connection(sink.path)
            w.write(b'{"op":"tail","kinds":["fs.*"],"ves":["101"]}\n')
            assert json.loads(await r.readline()) == {"ok": True, "version": __version__}
            for e in (ev("fs.error", "101"), ev("dev.add", "101"), ev("fs.readonly", "102"), ev("fs.readonly", "101")):
                sink.publish(e)
            got = [json.loads(await r.readline())["kind"] for _ in range(2)]
            w.close()
            sink.close()
            return got

        assert asyncio.run(main()) == ["fs.error", "fs.readonly"]

    def test_bad_request_gets_an_error_line(self, tmp_path):
        """Garbage or an unknown op is answered with ok=false and a reason."""
        async def main():
            sink = SocketSink(str(tmp_path / "s.sock"))
            await sink.start()
            out = []
            for req in (b"not json\n", b'{"op":"explode"}\n', b"[1,2]\n"):
                r, w = await asyncio.open_unix_connection(sink.path)
                w.write(req)
                out.append(json.loads(await r.readline()))
                w.close()
            sink.close()
            return out

        for reply in asyncio.run(main()):
            assert reply["ok"] is False and reply["error"]

    def test_slow_subscriber_is_cut_off_not_waited_for(self, tmp_path):
        """A subscriber that never reads is dropped once its buffer is full; publish never blocks."""
        async def main():
            sink = SocketSink(str(tmp_path / "s.sock"), max_buffer=64 << 10)
            await sink.start()
            r, w = await asyncio.open_unix_connection(sink.path)
            w.write(b'{"op":"tail"}\n')
            await r.readline()
            for _ in range(20000):
                sink.publish(ev())
            dropped = sink.dropped_subscribers
            sink.close()
            return dropped

        assert asyncio.run(main()) == 1


def test_kind_filter_exact_prefix_and_unknown() -> None:
    from fsnotifyd.events import KindFilter

    f = KindFilter.parse(["fs.*", "rule.matched"])
    assert f("fs.error") and f("fs.enospc") and f("rule.matched")
    assert not f("dev.add") and not f("rule")
    assert KindFilter()("anything")  # empty: every kind
    with pytest.raises(ValueError, match="unknown event kind 'fs.eror'"):
        KindFilter.parse(["fs.eror"])
    with pytest.raises(ValueError, match="unknown event kind 'zz.\\*'"):
        KindFilter.parse(["zz.*"])


class TestMetricsSink:
    @staticmethod
    def alloc(dev: str, ve: str, live: int, swelling: float) -> Event:
        return Event(kind="fs.alloc", time=1.0, host="h", severity="info", device=Device(7, 0, dev), fs="ext4",
                     mount="/m", ve=ve, kernel=Kernel(), sources=("bpf",),
                     details={"regions_live": live, "swelling": swelling})

    def test_swelling_is_exported_only_while_its_ve_has_the_filesystem_mounted(self) -> None:
        """The last swelling figure of a stopped VE, or of a loop device the next VE reuses, is
        not exported (it would keep the swelling alert firing for the daemon's lifetime); one
        forgotten stays forgotten until its filesystem reports again."""
        m = Metrics()
        sink = MetricsSink(m)
        sink.publish(self.alloc("loop1", "ve1", 300, 2.5))
        sink.publish(self.alloc("loop2", "ve2", 120, 1.2))
        swelling = lambda dev, ve: m.registry.get_sample_value(  # noqa: E731
            "fsnotifyd_fs_swelling_ratio", {"device": dev, "ve": ve})
        live = lambda dev, ve: m.registry.get_sample_value(  # noqa: E731
            "fsnotifyd_alloc_regions_live", {"device": dev, "ve": ve})
        # Not bound to a mount table (replay, a bare registry): every figure is kept.
        assert (swelling("loop1", "ve1"), live("loop1", "ve1"), swelling("loop2", "ve2")) == (2.5, 300, 1.2)
        mounted = [("loop1", "ve1"), ("loop2", "ve2")]
        m.bind_mounted(lambda: mounted)
        assert swelling("loop1", "ve1") == 2.5 and swelling("loop2", "ve2") == 1.2
        mounted = [("loop2", "ve2")]  # ve1 stopped
        assert swelling("loop1", "ve1") is None and live("loop1", "ve1") is None
        assert swelling("loop2", "ve2") == 1.2
        mounted = [("loop2", "ve2"), ("loop1", "ve1")]  # started again: no stale figure
        assert swelling("loop1", "ve1") is None
        sink.publish(self.alloc("loop1", "ve1", 10, 1.0))
        assert swelling("loop1", "ve1") == 1.0
        mounted = [("loop1", "ve1"), ("loop2", "ve3")]  # ve2 removed, its loop device reused by ve3
        sink.publish(self.alloc("loop2", "ve3", 5, 1.1))
        assert swelling("loop2", "ve2") is None and swelling("loop2", "ve3") == 1.1

    def test_an_event_counts_once_however_many_sources_saw_it(self) -> None:
        """One kernel error seen by four sources is one event in fsnotifyd_events_total (a
        sum() over it must not be multiplied by the number of sources); the per-source view is
        fsnotifyd_source_events_total, one for each source. An aggregated event (count 3) is
        still one event: its kernel errors are in fsnotifyd_kernel_errors_total."""
        m = Metrics()
        sink = MetricsSink(m)
        sources = ("bpf", "kmsg", "fanotify", "sysfs")
        sink.publish(Event(kind="fs.error", time=1.0, host="h", severity="error", device=Device(7, 3, "loop3"),
                           fs="ext4", mount="/m", ve="101", kernel=Kernel(function="f"), sources=sources, count=3))

        def samples(name: str) -> dict[frozenset, float]:
            return {frozenset(s.labels.items()): s.value for f in m.registry.collect() for s in f.samples
                    if s.name == name}

        assert samples("fsnotifyd_events_total") == {
            frozenset({"kind": "fs.error", "severity": "error", "ve": "101"}.items()): 1.0}
        assert samples("fsnotifyd_source_events_total") == {
            frozenset({"source": s, "kind": "fs.error"}.items()): 1.0 for s in sources}
        assert samples("fsnotifyd_kernel_errors_total") == {
            frozenset({"device": "loop3", "ve": "101"}.items()): 3.0}

    def test_an_unknown_severity_is_one_series_not_one_per_spelling(self) -> None:
        m = Metrics()
        sink = MetricsSink(m)
        for severity in ("urgent", "URGENT"):  # a rule's notify: params, not checked against the five
            sink.publish(Event(kind="notification", time=1.0, host="h", severity=severity, device=None, fs=None,
                               mount=None, ve=None, kernel=Kernel(), sources=("actions",)))
        assert m.registry.get_sample_value(
            "fsnotifyd_events_total", {"kind": "notification", "severity": "unknown", "ve": ""}) == 2.0
