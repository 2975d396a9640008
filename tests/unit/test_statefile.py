"""The daemon's state files: atomic writes, corrupt files moved aside, and writes the disk
refuses (kept in memory, said once, written again later)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from structlog.testing import capture_logs

from fsnotifyd import statefile
from fsnotifyd.statefile import FileHealth, JsonStateStore, StateFile


class TestJsonStateStore:
    def test_round_trip(self, tmp_path):
        """Values written and flushed are read back by a new store."""
        path = str(tmp_path / "s.json")
        s = JsonStateStore(path)
        s.set("fs-a", 7)
        s.flush()
        assert JsonStateStore(path).get("fs-a") == 7
        assert json.loads((tmp_path / "s.json").read_text()) == {"fs-a": 7}

    def test_corrupt_file_is_moved_aside_and_said(self, tmp_path):
        """A torn or foreign file does not stop the daemon; it is kept for a person to read."""
        path = tmp_path / "s.json"
        path.write_text("{not json")
        s = JsonStateStore(str(path))
        assert s.get("x") is None and s.load_error and "corrupt" in s.load_error
        assert (tmp_path / "s.json.corrupt").read_text() == "{not json"

    def test_flush_without_changes_writes_nothing(self, tmp_path):
        """No change, no write."""
        s = JsonStateStore(str(tmp_path / "s.json"))
        s.flush()
        assert not (tmp_path / "s.json").exists()


class FullDisk:
    """fsync refuses with ENOSPC while ``full`` (what a full disk does to a write that needs a
    new block: the data is in the page cache, the flush fails); statvfs-free blocks follow it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        real = os.fsync

        def fsync(fd: int) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(statefile, "_has_room", lambda path: not self.full)


@pytest.fixture
def disk(monkeypatch):
    return FullDisk(monkeypatch)


class TestRefusedWrites:
    def test_value_is_kept_said_once_and_written_when_the_disk_takes_it(self, tmp_path, disk):
        """A refused flush keeps the store dirty with its newest values, leaves the old file
        and no temp file, logs once however often it is retried, and the first flush that
        lands writes the newest value and says so."""
        path = str(tmp_path / "ledger.json")
        health = FileHealth()
        s = JsonStateStore(path, health)
        s.set("fs-a", 1)
        assert s.flush()
        disk.full = True
        with capture_logs() as logs:
            s.set("fs-a", 2)
            assert s.flush() is False
            s.set("fs-a", 3)
            assert s.flush() is False and s.flush() is False
        assert s.dirty and s.get("fs-a") == 3
        assert json.loads((tmp_path / "ledger.json").read_text()) == {"fs-a": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]  # the temp file is gone
        assert [x["event"] for x in logs] == ["state.write_failed"]
        assert logs[0]["errno"] == "ENOSPC" and logs[0]["path"] == path
        (failing,) = health.failing()
        assert failing.path == path and failing.refused == 3 and failing.since is not None

        disk.full = False
        with capture_logs() as logs:
            assert s.flush() and not s.dirty
            assert s.flush()
        assert json.loads((tmp_path / "ledger.json").read_text()) == {"fs-a": 3}
        assert [(x["event"], x["refused"]) for x in logs] == [("state.write_recovered", 3)]
        assert health.failing() == [] and [f.ok for f in health.files()] == [True]

    def test_a_write_that_lands_on_a_still_full_disk_does_not_end_the_streak(self, tmp_path, disk):
        """An append into a block the file already holds can land while the disk is full; the
        next would not. Only a write with room on the disk again says it recovered."""
        health = FileHealth()
        path = str(tmp_path / "x.json")
        health.failed(path, OSError(errno.ENOSPC, "No space left on device"))
        disk.full = True
        assert health.written(path) is None and not health.failing()[0].ok
        disk.full = False
        assert health.written(path).refused == 1 and health.failing() == []
        # Not a space problem: the write that lands ends it at once.
        health.failed(path, OSError(errno.EROFS, "Read-only file system"))
        disk.full = True
        assert health.written(path) is not None

    def test_state_file_reports_failure_and_recovery(self, tmp_path, disk):
        f = StateFile(str(tmp_path / "rules-state.json"))
        disk.full = True
        assert f.write({"a": 1}) is False and f.health.failing()[0].errno == "ENOSPC"
        disk.full = False
        assert f.write({"a": 2}) and json.loads((tmp_path / "rules-state.json").read_text()) == {"a": 2}
