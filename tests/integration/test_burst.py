"""A storm of 10,000 errors on one filesystem, with a daemon restart in the middle.

kmsg is rate limited and fanotify coalesces, so most errors reach the daemon only as a rise of
the superblock's error counter; the published counts must still add up to that rise exactly.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4

pytestmark = pytest.mark.kernel

TOTAL = 10_000


def _storm(path: Path, n: int, progress: list[int]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(n):
            os.pwrite(fd, b"storm", 0)
            progress[0] = i + 1
    finally:
        os.close(fd)


def test_burst_counts_add_up_across_a_restart(kernel, tmp_path):
    """Sum of fs.error counts == errors_count delta, with a restart at the half."""
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=tmp_path))) as fs:
        before = fs.errors_count()
        d = RunningDaemon(tmp_path / "daemon")
        d.start()
        try:
            progress = [0]
            storm = threading.Thread(target=_storm, args=(fs.sysfs / "trigger_fs_error", TOTAL, progress))
            storm.start()
            while progress[0] < TOTAL // 2 and storm.is_alive():
                time.sleep(0.01)
            assert d.stop() == 0, d.log()[-2000:]
            d.start()
            storm.join()
            after = fs.errors_count()
            stream = d.stream(["fs.error"])
            stream.settle(quiet=2.5)  # longer than the sysfs period: the last reconcile is in
            stream.close()
        finally:
            rc = d.stop()
            print(f"burst: {len(d.journal_events())} journal events")
        assert rc == 0
        assert after - before == TOTAL
        events = [e for e in d.journal_events()
                  if e["kind"] == "fs.error" and e["device"]["name"] == fs.name]
        assert sum(e["count"] for e in events) == after - before, [e["count"] for e in events][:50]
        assert len(events) < TOTAL / 10  # aggregated, not one event per error
        assert all(e["mount"] == str(fs.mountpoint) for e in events)
