"""A full disk under the state directory: the daemon runs on, delivers events, and catches up.

The daemon's state directory and its JSONL journal are on a 512 KiB tmpfs that the test fills
up; 3,000 real ext4 errors on a loop-mounted filesystem arrive, the first half while the
tmpfs is full, the second after the space is given back. A host whose disk fills up is exactly
one whose filesystems fail, so the daemon must not die of its own bookkeeping: the events go
to the control socket all along, the state files keep their values in memory and are written
once the disk takes them (the error ledger then holds the exact count: nothing lost, nothing
counted twice), and the journal says once that it fails and once that it recovered. A webhook
(a real HTTP receiver on 127.0.0.1) whose spool is on that disk too gets every event all along,
from memory while the spool cannot be written: in the end each exactly once, in order.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4, run
from tests.rigs.net import WebhookReceiver, free_port

pytestmark = pytest.mark.kernel

TOTAL = 3000
# Fires on the storm's first event, while the disk is full: its job's records are refused.
RULES = """version: 1
rules:
  - name: note-errors
    match:
      kind: fs.error
      where: {{kernel.message: {message}, device.name: {device}}}
    cooldown: 1h
    actions: [notify]
"""
MESSAGE = "full state disk"
WEBHOOK = """sinks:
  webhooks:
    - {{name: ops, url: '{url}', retry_initial_s: 0.05, retry_max_s: 0.3, timeout_s: 5}}
"""


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "512k") -> Iterator[Path]:
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path))
    try:
        yield path
    finally:
        if run("umount", str(path), check=False).returncode != 0:
            run("umount", "-l", str(path), check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem under ``directory``."""
    filler = directory / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def storm(fs, n: int, message: str = MESSAGE) -> None:
    fd = os.open(fs.sysfs / "trigger_fs_error", os.O_WRONLY)
    try:
        for _ in range(n):
            os.pwrite(fd, message.encode(), 0)
    finally:
        os.close(fd)


def records(d: RunningDaemon) -> list[dict]:
    return [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]


def logged(d: RunningDaemon, event: str, **fields: str) -> list[dict]:
    return [r for r in records(d) if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]


def wait(what: str, check: Callable[[], object], timeout: float = 20.0, d: RunningDaemon | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log tail:\n{d.log()[-3000:]}" if d else ""))


def metric(port: int, name: str, **labels: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def ledger_value(state: Path, image: Path) -> int | None:
    try:
        data = json.loads((state / "error-ledger.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return next((v for k, v in data.items() if k.endswith(f"@{image}")), None)


def test_daemon_runs_on_and_catches_up_when_its_disk_is_full(kernel, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    port = free_port()
    (tmp_path / "fs").mkdir()
    with tiny_tmpfs(tmp_path / "disk") as disk, loop_ext4(32, workdir=tmp_path / "fs") as fs, \
            WebhookReceiver() as hook:
        rules.write_text(RULES.format(message=json.dumps(MESSAGE), device=fs.name))
        state, journal = disk / "state", disk / "events.jsonl"
        ledger, jobs_file = str(state / "error-ledger.json"), str(state / "actions" / "journal.jsonl")
        spool = str(state / "spool" / "webhook-ops")
        d = RunningDaemon(tmp_path / "d", state_dir=state, journal=journal, metrics_port=port,
                          extra_config=f"rules: [{rules}]\n" + WEBHOOK.format(url=hook.url))
        d.start()
        try:
            d.wait_marked(fs)
            stream = d.stream(["fs.error", "notification"])

            def counted() -> int:
                return sum(e["count"] for e in stream.events
                           if e["kind"] == "fs.error" and (e.get("device") or {}).get("name") == fs.name)

            def hooked() -> bool:
                """Every event the socket had so far has reached the webhook receiver."""
                return {e["id"] for e in stream.events} <= set(hook.delivered_ids())

            storm(fs, 1, "before the fill")  # the ledger knows the filesystem, on disk
            wait("the ledger to know the filesystem", lambda: ledger_value(state, fs.image) == 1, d=d)
            assert counted() == 1

            # -- the disk is full: events still flow, each failing file says so once ----------
            filler = fill(disk)
            storm(fs, TOTAL // 2)
            wait("the first half on the socket", lambda: counted() == 1 + TOTAL // 2, d=d)
            wait("the ledger's refused write", lambda: logged(d, "state.write_failed", path=ledger), d=d)
            stream.settle(quiet=1.5)
            assert d.proc.poll() is None, d.log()[-3000:]
            assert counted() == 1 + TOTAL // 2
            assert any(e["kind"] == "notification" and e["details"]["trigger"]["device"]["name"] == fs.name
                       for e in stream.events), "the action ran although its journal could not be written"
            assert len(logged(d, "sink.journal_failing", sink="journal")) == 1
            assert logged(d, "sink.journal_failing", sink="journal")[0]["errno"] == "ENOSPC"
            assert len(logged(d, "state.write_failed", path=ledger)) == 1
            assert len(logged(d, "state.write_failed", path=jobs_file)) == 1
            assert not logged(d, "sink.failed"), "a traceback per event"
            # The webhook's spool is refused too: the events still reach the endpoint, from memory.
            wait("the first half at the webhook", hooked, d=d)
            assert [r["errno"] for r in logged(d, "webhook.spool_failing", path=spool)] == ["ENOSPC"], d.log()[-3000:]
            assert not logged(d, "webhook.spool_error") and not logged(d, "webhook.spool_recovered")
            webhook = d.status()["sinks"]["webhook:ops"]
            assert webhook["spool_failing"] and webhook["spool_errno"] == "ENOSPC" and webhook["lost"] == {}, webhook
            assert ledger_value(state, fs.image) == 1  # on disk: the value before the storm

            files = d.status()["files"]
            assert files[ledger]["ok"] is False and files[ledger]["errno"] == "ENOSPC", files
            assert files[str(journal)]["ok"] is False and files[str(journal)]["refused"] > 0, files
            assert files[spool]["ok"] is False and files[spool]["errno"] == "ENOSPC", files
            text = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "status", "--socket", d.socket],
                                  capture_output=True, text=True, timeout=30).stdout
            assert "cannot be written" in text and f"{ledger}: ENOSPC" in text, text
            assert "held in memory (spool cannot be written: ENOSPC)" in text, text
            assert metric(port, "fsnotifyd_state_write_failing", file=ledger) == 1
            assert metric(port, "fsnotifyd_journal_write_failures_total", sink="journal") > 0

            # -- space is given back: written again without waiting for the next event -------
            filler.unlink()
            wait("the ledger written again", lambda: ledger_value(state, fs.image) == 1 + TOTAL // 2, d=d)
            assert len(logged(d, "state.write_recovered", path=ledger)) == 1
            wait("the held job records written", lambda: logged(d, "state.write_recovered", path=jobs_file), d=d)
            storm(fs, TOTAL - TOTAL // 2)
            wait("the second half on the socket", lambda: counted() == 1 + TOTAL, d=d)
            wait("the ledger at the total", lambda: ledger_value(state, fs.image) == 1 + TOTAL, d=d)
            stream.settle(quiet=2.5)  # longer than the sysfs period: the last reconcile is in
            assert counted() == 1 + TOTAL == fs.errors_count()  # not one lost, none counted twice
            out = [json.loads(x) for x in d.events_out.read_text().splitlines()]
            assert sum(e["count"] for e in out
                       if e["kind"] == "fs.error" and e["device"]["name"] == fs.name) == 1 + TOTAL
            assert len(logged(d, "sink.journal_recovered", sink="journal")) == 1
            assert len(logged(d, "sink.journal_failing", sink="journal")) == 1
            # Every event at the webhook exactly once, in publication order (the order events-out,
            # on another disk, has them in): none lost while the spool could not be written.
            def published() -> list[str]:
                return [json.loads(x)["id"] for x in d.events_out.read_text().splitlines()]

            wait("the second half at the webhook", lambda: hook.delivered_ids() == published(), d=d)
            assert len(logged(d, "webhook.spool_failing", path=spool)) == 1
            assert len(logged(d, "webhook.spool_recovered", path=spool)) == 1
            webhook = d.status()["sinks"]["webhook:ops"]
            assert not webhook["spool_failing"] and webhook["memory_events"] == 0 and webhook["lost"] == {}, webhook
            assert metric(port, "fsnotifyd_events_lost_total", source="webhook:ops", reason="spool_error") is None
            written = [e for e in d.journal_events() if e["kind"] == "fs.error"
                       and e["device"]["name"] == fs.name and e["details"].get("errors_total", 0) > 1 + TOTAL // 2]
            assert written, "the journal takes events again"
            files = d.status()["files"]
            assert all(f["ok"] for f in files.values()), files
            assert metric(port, "fsnotifyd_state_write_failing", file=ledger) == 0
            jobs = [json.loads(x) for x in Path(jobs_file).read_text().splitlines()]
            assert any(j["rule"] == "note-errors" and j["state"] == "succeeded"
                       and j["trigger"]["device"]["name"] == fs.name for j in jobs), jobs
            cooldowns = json.loads((state / "rules-state.json").read_text())["cooldowns"]
            assert ["note-errors", f"dev:{fs.name}"] in [c[:2] for c in cooldowns]
            stream.close()

            # -- stopped and started while the disk is full: no crash, no second traceback ----
            filler = fill(disk)
            storm(fs, 1)
            wait("the ledger's refused write", lambda: len(logged(d, "state.write_failed", path=ledger)) == 2, d=d)
        finally:
            rc = d.stop()
        assert rc == 0, d.log()[-3000:]
        assert logged(d, "state.not_saved", path=ledger)
        assert "Traceback" not in d.log(), d.log()[-3000:]
        with d:  # started on the full disk
            assert d.proc.poll() is None and d.status()["ok"]
        assert "Traceback" not in d.log(), d.log()[-3000:]
