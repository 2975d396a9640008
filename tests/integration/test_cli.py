"""The CLI against a running daemon: status, events tail, record, config check."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.rigs.loop import loop_ext4

pytestmark = pytest.mark.kernel


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsnotifyd.cli", *args], capture_output=True, text=True, **kw)


def test_status_lists_sources_and_ves(daemon):
    """status shows every source up or down with a reason, and the configured VEs."""
    res = cli("status", "--config", str(daemon.config))
    assert res.returncode == 0, res.stderr
    for name in ("kmsg", "fanotify", "sysfs", "mountinfo", "udev"):
        assert name in res.stdout
    assert "101:" in res.stdout
    st = json.loads(cli("status", "--json", "--config", str(daemon.config)).stdout)
    assert st["ok"] and all(s["up"] for s in st["sources"].values()), st["sources"]


def test_tail_and_record_see_a_live_error(daemon, workdir):
    """events tail (filtered by kind) and record --duration both get the live fs.error."""
    out = workdir / "recorded.jsonl"
    tail = subprocess.Popen([sys.executable, "-m", "fsnotifyd.cli", "events", "tail", "--kind", "fs.error",
                             "--socket", daemon.socket], stdout=subprocess.PIPE, text=True)
    rec = subprocess.Popen([sys.executable, "-m", "fsnotifyd.cli", "record", "--out", str(out),
                            "--duration", "4", "--socket", daemon.socket])
    try:
        with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
            time.sleep(1.0)  # both clients subscribed (they print nothing until an event)
            (fs.sysfs / "trigger_fs_error").write_text("cli test")
            line = tail.stdout.readline()
            assert rec.wait(15) == 0
    finally:
        tail.terminate()
        tail.wait()
        if rec.poll() is None:
            rec.terminate()
    ev = json.loads(line)
    assert ev["kind"] == "fs.error" and ev["kernel"]["message"] == "cli test"
    recorded = [json.loads(x) for x in out.read_text().splitlines()]
    assert any(e["id"] == ev["id"] for e in recorded)


def test_status_without_daemon_says_so(tmp_path):
    """A client with no daemon behind the socket gets a clear message, not a traceback."""
    res = cli("status", "--socket", str(tmp_path / "nope.sock"))
    assert res.returncode == 1 and "cannot reach the daemon" in res.stderr


def test_config_check_reports_file_and_line(tmp_path):
    """config check names file, line and field of a mistake and exits 2."""
    bad = tmp_path / "c.yaml"
    bad.write_text("sources:\n  kmsg:\n    enabld: true\n")
    res = cli("config", "check", "--config", str(bad))
    assert res.returncode == 2
    assert f"{bad}:3:" in res.stderr and "sources.kmsg.enabld" in res.stderr
