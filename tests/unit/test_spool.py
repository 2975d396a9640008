"""The webhook spool on a real directory: order, restarts, crashes, the bound, damaged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fsnotifyd.sinks.spool import CURSOR, Spool, SpoolClosed, segment_name


class Lost:
    """Collects the spool's on_lost calls, by reason."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, count: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count


def line(i: int, pad: int = 0) -> bytes:
    return json.dumps({"n": i, "pad": "x" * pad}, separators=(",", ":")).encode()


def fixed(i: int) -> bytes:
    """40 bytes with its newline, whatever ``i`` (< 10**9)."""
    return line(i, pad=24 - len(str(i)))


def drain(spool: Spool, limit: int = 100_000) -> list[int]:
    """Peek and ack everything; the ``n`` of each line, in order."""
    out = []
    for _ in range(limit):
        rec = spool.peek()
        if rec is None:
            return out
        out.append(rec.value["n"])
        assert spool.ack(rec)
    raise AssertionError("spool never ran dry")


def segments(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".jsonl"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_fifo_order_peek_does_not_consume(spool_dir):
    """Lines come out in append order; peek alone hands out the same line again."""
    s = Spool(str(spool_dir), 1 << 20)
    try:
        for i in range(5):
            assert s.append(line(i))
        assert s.events == 5
        first = s.peek()
        assert first is not None and first.value == {"n": 0, "pad": ""}
        assert first.data == line(0)
        assert s.peek() == first
        assert drain(s) == [0, 1, 2, 3, 4]
        assert s.events == 0 and s.peek() is None
    finally:
        s.close()


def test_cursor_survives_reopen(spool_dir):
    """Acked lines are not handed out again after a close and reopen; the rest are, in order."""
    s = Spool(str(spool_dir), 1 << 20)
    for i in range(10):
        s.append(line(i))
    for _ in range(4):
        rec = s.peek()
        assert rec is not None and s.ack(rec)
    s.close()
    assert json.loads((spool_dir / CURSOR).read_text())["offset"] == sum(len(line(i)) + 1 for i in range(4))

    s2 = Spool(str(spool_dir), 1 << 20)
    try:
        assert s2.events == 6
        assert drain(s2) == [4, 5, 6, 7, 8, 9]
        s2.append(line(10))
        assert drain(s2) == [10]
    finally:
        s2.close()


def test_cursor_written_per_ack_without_close(spool_dir):
    """A hard kill (no close) loses no acknowledgement: the cursor is on disk after each ack."""
    s = Spool(str(spool_dir), 1 << 20)
    for i in range(3):
        s.append(line(i))
    rec = s.peek()
    assert rec is not None and s.ack(rec)
    # Simulate the kill: a new spool opens the same directory while the old one is never closed.
    s2 = Spool(str(spool_dir), 1 << 20)
    try:
        assert drain(s2) == [1, 2]
    finally:
        s2.close()
        s.close()


def test_crash_truncated_tail_is_cut_and_counted(spool_dir):
    """A torn last line (a crash mid-write) is truncated away at open and counted; the complete
    lines before it survive and new appends are whole lines again."""
    s = Spool(str(spool_dir), 1 << 20)
    for i in range(3):
        s.append(line(i))
    s.close()
    seg = spool_dir / segment_name(1)
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b'{"n":3,"pad":"tor')
    lost = Lost()
    with capture_logs() as logs:
        s2 = Spool(str(spool_dir), 1 << 20, on_lost=lost)
    try:
        assert lost.counts == {"spool_corrupt": 1}
        assert seg.stat().st_size == good_size
        assert any(e["event"] == "spool.torn_tail" for e in logs)
        s2.append(line(4))
        assert drain(s2) == [0, 1, 2, 4]
    finally:
        s2.close()


def test_rotation_and_delivered_segments_deleted(spool_dir):
    """Segments rotate at segment_bytes; a segment is deleted once every line in it is acked,
    the one being appended to is kept."""
    s = Spool(str(spool_dir), 1 << 20, segment_bytes=200)
    try:
        for i in range(30):
            s.append(fixed(i))  # 40 bytes: 5 a segment
        names = segments(spool_dir)
        assert len(names) == 6
        assert all((spool_dir / n).stat().st_size <= 200 for n in names)
        assert s.bytes == sum((spool_dir / n).stat().st_size for n in names)
        got = []
        for _ in range(13):
            rec = s.peek()
            assert rec is not None
            got.append(rec.value["n"])
            s.ack(rec)
        assert got == list(range(13))
        assert segments(spool_dir) == names[2:]  # 13 lines: two whole segments gone
        assert drain(s) == list(range(13, 30))
        assert segments(spool_dir) == names[-1:]
        assert s.events == 0
    finally:
        s.close()


def test_rotation_cursor_across_reopen(spool_dir):
    """The cursor names the segment: a reopen in the middle of the third segment resumes there,
    and segments older than the cursor's (an unlink lost in a crash) are deleted."""
    s = Spool(str(spool_dir), 1 << 20, segment_bytes=100)
    for i in range(12):
        s.append(line(i, pad=10))  # 27..28 bytes: 3 a segment
    for _ in range(9):
        rec = s.peek()
        assert rec is not None and s.ack(rec)
    s.close()
    # Put back a delivered segment as a crash between the cursor write and the unlink would leave it.
    (spool_dir / segment_name(1)).write_bytes(line(0, pad=10) + b"\n")
    s2 = Spool(str(spool_dir), 1 << 20, segment_bytes=100)
    try:
        assert not (spool_dir / segment_name(1)).exists()
        assert s2.events == 3
        assert drain(s2) == [9, 10, 11]
    finally:
        s2.close()


@pytest.mark.parametrize("content", [
    b"not json at all",
    b'{"segment": "x", "offset": 0}',
    b'{"segment": 1}',
    b'{"segment": 99, "offset": 0}',  # a segment that is not there
    b'{"segment": 1, "offset": 5}',  # not the start of a line
    b'{"segment": 1, "offset": 100000}',  # past the end
    b'{"segment": 1, "offset": -1}',
    b"",
])
def test_corrupt_cursor_restarts_at_oldest(spool_dir, content):
    """A cursor that cannot be trusted resumes at the oldest segment, and says so: duplicates
    (which a receiver can recognise) rather than losses."""
    s = Spool(str(spool_dir), 1 << 20)
    for i in range(4):
        s.append(line(i))
    rec = s.peek()
    assert rec is not None and s.ack(rec)
    s.close()
    (spool_dir / CURSOR).write_bytes(content)
    with capture_logs() as logs:
        s2 = Spool(str(spool_dir), 1 << 20)
    try:
        assert [e["event"] for e in logs if e["event"].startswith("spool.cursor")] == ["spool.cursor_corrupt"]
        assert drain(s2) == [0, 1, 2, 3]
    finally:
        s2.close()


def test_missing_cursor_restarts_at_oldest(spool_dir):
    s = Spool(str(spool_dir), 1 << 20)
    for i in range(3):
        s.append(line(i))
    rec = s.peek()
    assert rec is not None and s.ack(rec)
    s.close()
    (spool_dir / CURSOR).unlink()
    with capture_logs() as logs:
        s2 = Spool(str(spool_dir), 1 << 20)
    try:
        assert any(e["event"] == "spool.cursor_missing" for e in logs)
        assert drain(s2) == [0, 1, 2]
    finally:
        s2.close()


def test_fresh_spool_logs_nothing(spool_dir):
    """No cursor and no segments is a first start, not a problem worth a warning."""
    with capture_logs() as logs:
        s = Spool(str(spool_dir), 1 << 20)
    s.close()
    assert logs == []
    assert segments(spool_dir) == [segment_name(1)]


def test_bound_drops_oldest_segments_and_counts(spool_dir):
    """Past max_bytes the oldest undelivered lines go (whole segments), counted as spool_full;
    the disk use never passes the bound and the newest lines are all kept, in order."""
    lost = Lost()
    max_bytes = 4000
    s = Spool(str(spool_dir), max_bytes, on_lost=lost)  # segments of 500 bytes
    try:
        n = 1000
        for i in range(n):
            s.append(line(i, pad=40))  # 57..59 bytes a line
            assert s.bytes <= max_bytes
            on_disk = sum((spool_dir / x).stat().st_size for x in segments(spool_dir))
            assert on_disk == s.bytes
        kept = drain(s)
        assert kept == list(range(n - len(kept), n))  # a contiguous run of the newest
        assert lost.counts == {"spool_full": n - len(kept)}
        assert len(kept) * 59 >= max_bytes * 0.75  # dropping by eighths keeps most of the bound
    finally:
        s.close()


def test_bound_counts_only_undelivered(spool_dir):
    """A dropped head segment whose first lines were already acked counts only the rest."""
    lost = Lost()
    s = Spool(str(spool_dir), 800, segment_bytes=200, on_lost=lost)
    try:
        for i in range(4):
            s.append(line(i, pad=10))  # 27 bytes: 7 fit segment 1
        for _ in range(3):
            rec = s.peek()
            assert rec is not None and s.ack(rec)
        for i in range(4, 40):
            s.append(line(i, pad=10))
        kept = drain(s)
        assert kept == list(range(40 - len(kept), 40))
        assert lost.counts["spool_full"] == 40 - 3 - len(kept)
    finally:
        s.close()


def test_line_larger_than_bound_is_refused_and_counted(spool_dir):
    lost = Lost()
    s = Spool(str(spool_dir), 1000, on_lost=lost)
    try:
        s.append(line(0))
        assert s.append(line(1, pad=2000)) is False
        assert lost.counts == {"spool_full": 1}
        assert drain(s) == [0]
    finally:
        s.close()


def test_ack_of_a_dropped_record_is_ignored(spool_dir):
    """The bound dropped the line being delivered: its late ack must not move the cursor."""
    lost = Lost()
    s = Spool(str(spool_dir), 400, segment_bytes=50, on_lost=lost)
    try:
        s.append(line(0, pad=10))
        rec = s.peek()
        assert rec is not None
        for i in range(1, 40):
            s.append(line(i, pad=10))
        assert not s.is_head(rec)
        assert s.ack(rec) is False
        kept = drain(s)
        assert kept == list(range(40 - len(kept), 40)) and 0 not in kept
        assert lost.counts["spool_full"] == 40 - len(kept)
    finally:
        s.close()


def test_garbage_lines_are_skipped_and_counted(spool_dir):
    """A line that is not JSON (a foreign hand, a disk fault) is skipped, counted, and the lines
    after it are delivered; the skip is remembered by the cursor."""
    s = Spool(str(spool_dir), 1 << 20)
    s.append(line(0))
    s.close()
    seg = spool_dir / segment_name(1)
    with open(seg, "ab") as f:
        f.write(b"\x00\x01garbage{{{\n\n" + line(1) + b"\n")
    lost = Lost()
    s2 = Spool(str(spool_dir), 1 << 20, on_lost=lost)
    try:
        assert s2.events == 4
        with capture_logs() as logs:
            assert drain(s2) == [0, 1]
        assert lost.counts == {"spool_corrupt": 2}
        assert sum(e["event"] == "spool.garbage_line" for e in logs) == 2
        assert s2.events == 0
    finally:
        s2.close()
    s3 = Spool(str(spool_dir), 1 << 20, on_lost=lost)
    try:
        assert s3.peek() is None
        assert lost.counts == {"spool_corrupt": 2}
    finally:
        s3.close()


def test_closed_spool_refuses_appends(spool_dir):
    s = Spool(str(spool_dir), 1 << 20)
    s.append(line(0))
    rec = s.peek()
    s.close()
    s.close()  # idempotent
    with pytest.raises(SpoolClosed):
        s.append(line(1))
    assert rec is not None and s.ack(rec) is False
    assert s.peek() is None


def test_newline_in_a_line_is_refused(spool_dir):
    s = Spool(str(spool_dir), 1 << 20)
    try:
        with pytest.raises(ValueError):
            s.append(b'{"a":\n1}')
        assert s.events == 0
    finally:
        s.close()


def test_long_line_larger_than_the_read_buffer(spool_dir):
    """A line longer than the reader's buffer is still read whole."""
    s = Spool(str(spool_dir), 16 << 20)
    try:
        s.append(line(0, pad=1 << 20))
        s.append(line(1))
        rec = s.peek()
        assert rec is not None and len(rec.value["pad"]) == 1 << 20
        assert s.ack(rec)
        assert drain(s) == [1]
    finally:
        s.close()


def test_files_are_private(spool_dir):
    """Events can name paths and processes: the spool is root's alone."""
    s = Spool(str(spool_dir), 1 << 20)
    s.append(line(0))
    s.close()
    assert os.stat(spool_dir).st_mode & 0o077 == 0
    assert (spool_dir / segment_name(1)).stat().st_mode & 0o077 == 0
    assert (spool_dir / CURSOR).stat().st_mode & 0o077 == 0


def test_cursor_write_failure_is_logged_not_raised(spool_dir):
    """A cursor that cannot be written (here: its temp name is taken by a directory, as a full
    disk would refuse it) does not stop delivery; it is said once, and caught up afterwards."""
    s = Spool(str(spool_dir), 1 << 20)
    try:
        for i in range(4):
            s.append(line(i))
        (spool_dir / (CURSOR + ".tmp")).mkdir()
        with capture_logs() as logs:
            for _ in range(2):
                rec = s.peek()
                assert rec is not None and s.ack(rec)
        assert [e["event"] for e in logs] == ["spool.cursor_write_failed"]
        assert json.loads((spool_dir / CURSOR).read_text())["offset"] == 0  # stale, not torn
        (spool_dir / (CURSOR + ".tmp")).rmdir()
        with capture_logs() as logs:
            rec = s.peek()
            assert rec is not None and rec.value["n"] == 2 and s.ack(rec)
        assert [e["event"] for e in logs] == ["spool.cursor_write_ok"]
        assert json.loads((spool_dir / CURSOR).read_text())["offset"] == rec.end
    finally:
        s.close()
