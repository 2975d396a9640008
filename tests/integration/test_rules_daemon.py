"""The daemon with rules: refusing bad rules, reloading (socket and SIGHUP), keeping state."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4

pytestmark = pytest.mark.kernel

GOOD = """version: 1
rules:
  - name: note-errors
    match: {kind: fs.error}
    cooldown: 1h
    actions: [notify]
"""
TWO = GOOD + """  - name: note-readonly
    match: {kind: fs.readonly}
    actions: [notify]
"""
BAD = GOOD + """  - name: broken
    match: {kind: fs.eror}
    actions: [notify]
"""


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fsnotifyd.cli", *args], capture_output=True, text=True)


def test_invalid_rules_refuse_start(kernel, tmp_path):
    """A daemon whose rules have an error exits 2 naming file:line:column, and never runs."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(BAD)
    d = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n")
    with pytest.raises(RuntimeError, match="exited 2"):
        d.start()
    assert f"{rules}:8:" in d.log() and "fs.eror" in d.log()


def test_reload_keeps_old_rules_on_error_and_takes_good_ones(kernel, tmp_path):
    """rules reload with an error keeps the rules in force and says why; SIGHUP loads good ones."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(GOOD)
    with RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n") as d:
        assert d.status()["rules"]["rules"] == 1
        rules.write_text(BAD)
        res = cli("rules", "reload", "--socket", d.socket)
        assert res.returncode == 1 and "old rules stay in force" in res.stderr and f"{rules}:8:" in res.stderr
        st = d.status()["rules"]
        assert st["rules"] == 1 and st["last_reload_error"] and "fs.eror" in st["last_reload_error"][0]
        rules.write_text(TWO)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while d.status()["rules"]["rules"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.status()["rules"] == {**d.status()["rules"], "rules": 2, "last_reload_error": None}
        res = cli("rules", "reload", "--socket", d.socket)
        assert res.returncode == 0 and "2 rules in force" in res.stdout


def test_cooldown_survives_a_restart(kernel, tmp_path):
    """A rule that fired stays cooling down across a daemon restart (state is persisted)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(GOOD)
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=tmp_path))) as fs:
        d = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n")
        for message in ("before restart", "after restart"):
            with d:
                d.wait_marked(fs)
                stream = d.stream(["fs.error"])
                (fs.sysfs / "trigger_fs_error").write_text(message)
                stream.wait_for(lambda e, want=message: e["kernel"]["message"] == want)
                stream.settle(quiet=0.5)
                stream.close()
        state = json.loads((tmp_path / "d" / "state" / "rules-state.json").read_text())
        assert [c[:2] for c in state["cooldowns"]] == [["note-errors", f"dev:{fs.name}"]]
    matched = [e for e in d.journal_events() if e["kind"] == "rule.matched"]
    assert len(matched) == 1 and matched[0]["details"]["rule"] == "note-errors"
