"""The error ledger's file: atomic writes, corrupt files moved aside."""

from __future__ import annotations

import json

from fsnotifyd.statefile import JsonStateStore


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
