"""Errors while the daemon is down are reported once at start-up; metrics are scraped for real."""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4
from tests.rigs.net import free_port

pytestmark = pytest.mark.kernel



def test_errors_while_down_are_reported_once(kernel, tmp_path):
    """Three errors while stopped: one fs.error (count 3, sources [sysfs]) at start, none on the next start."""
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=tmp_path))) as fs:
        d = RunningDaemon(tmp_path / "daemon")
        d.start()
        (fs.sysfs / "trigger_fs_error").write_text("while up")
        stream = d.stream(["fs.error"])
        stream.wait_for(lambda e: e["device"]["name"] == fs.name)
        stream.close()
        assert d.stop() == 0
        for i in range(3):
            (fs.sysfs / "trigger_fs_error").write_text(f"while down {i}")
        d.start()
        stream = d.stream(["fs.error"])
        stream.settle(quiet=2.5)
        stream.close()
        assert d.stop() == 0
        d.start()
        stream = d.stream(["fs.error"])
        stream.settle(quiet=2.5)
        stream.close()
        assert d.stop() == 0
    mine = [e for e in d.journal_events() if e["kind"] == "fs.error" and e["device"]["name"] == fs.name]
    assert [e["count"] for e in mine] == [1, 3], mine
    recorded = mine[1]
    assert recorded["sources"] == ["sysfs"] and recorded["details"]["recorded"] is True
    assert recorded["kernel"]["function"] == "trigger_test_error"
    assert recorded["details"]["errors_total"] == 4
    assert recorded["details"]["first_error"]["function"] == "trigger_test_error"


def test_metrics_endpoint_counts_sources_and_errors(kernel, tmp_path):
    """The Prometheus endpoint shows sources up and the kernel errors accounted per device."""
    port = free_port()
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=tmp_path))) as fs, \
            RunningDaemon(tmp_path / "daemon", metrics_port=port) as d:
        stream = d.stream(["fs.error"])
        (fs.sysfs / "trigger_fs_error").write_text("metrics")
        event = stream.wait_for(lambda e: e["device"]["name"] == fs.name)[0]
        stream.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for source in ("kmsg", "fanotify", "sysfs", "mountinfo", "udev"):
        assert f'fsnotifyd_source_up{{source="{source}"}} 1.0' in text
    assert f'fsnotifyd_kernel_errors_total{{device="{fs.name}",ve=""}} 1.0' in text
    # No source label on events_total (each event once); the sources in their own metric. Not
    # exact values: the daemon watches the whole host, where other tests make ext4 errors too.
    assert 'fsnotifyd_events_total{kind="fs.error",severity="error",ve=""}' in text
    for source in event["sources"]:
        assert f'fsnotifyd_source_events_total{{kind="fs.error",source="{source}"}}' in text
    assert "fsnotifyd_event_latency_seconds_bucket" in text
    assert "fsnotifyd_correlator_merged_total" in text
