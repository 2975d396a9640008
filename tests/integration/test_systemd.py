"""The daemon as systemd runs it: the unit file, the notify protocol, the capability set.

PID 1 on this machine is not systemd, so the unit cannot be started by systemd here. What can
be checked for real is checked for real: ``systemd-analyze verify`` on the unit; the daemon
with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) pointing at a datagram socket this test listens
on, speaking the same protocol systemd would read; and the daemon started under exactly the
unit's ``CapabilityBoundingSet``, ``NoNewPrivileges`` and limits (via setpriv/prlimit), bringing
every source up and reporting a real ext4 error.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from fsnotifyd.app.daemon import _children
from tests.conftest import kernel_missing
from tests.integration.test_ve_lifecycle import fuse, state  # noqa: F401 - fixtures, shared
from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "fsnotifyd.service"
VENV_FSNOTIFYD = REPO / ".venv" / "bin" / "fsnotifyd"


def unit_service() -> dict[str, str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case sensitive
    cp.read(UNIT)
    return dict(cp["Service"])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        kernel_missing("systemd-analyze not installed (Debian package systemd)")
    # verify insists that ExecStart exists: point it at this checkout's fsnotifyd instead of
    # the installed /opt/fsnotifyd one; nothing else is changed.
    text = UNIT.read_text()
    assert "ExecStart=/opt/fsnotifyd/bin/fsnotifyd run --config /etc/fsnotifyd/config.yaml" in text
    unit = tmp_path / "fsnotifyd.service"
    unit.write_text(text.replace("/opt/fsnotifyd/bin/fsnotifyd", str(VENV_FSNOTIFYD)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # systemd only warns about unknown keys and bad values: any output at all is a mistake.
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    svc = unit_service()
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"].rstrip("s")) >= 10
    assert svc["Restart"] == "on-failure"
    # systemctl reload waits for the CLI, which waits for the daemon's answer (not kill -HUP).
    assert svc["ExecReload"] == "/opt/fsnotifyd/bin/fsnotifyd rules reload --config /etc/fsnotifyd/config.yaml"


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket collecting (time, fields)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait(self, key: str, value: str | None = None, timeout: float = 30.0) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if key in m and (value is None or m[key] == value):
                    return t, m
            time.sleep(0.02)
        raise TimeoutError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path):
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


def test_ready_only_after_sources_then_watchdog_pings(bpf_ready, tmp_path: Path, listener: NotifyListener) -> None:
    d = RunningDaemon(tmp_path / "d", env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000"})
    d.start()
    try:
        t_ready, ready = listener.wait("READY", "1")
        # Nothing said READY before: the first message is READY itself.
        assert listener.messages[0][1].get("READY") == "1"
        assert ready["MAINPID"] == str(d.proc.pid)
        st = d.status()
        # At READY every source had settled: up, or down with its reason; none still starting.
        assert st["sources"] and all(s["up"] or (s["reason"] and s["reason"] != "starting")
                                     for s in st["sources"].values()), st["sources"]
        up = sum(1 for s in st["sources"].values() if s["up"])
        assert ready["STATUS"].startswith(f"{up}/{len(st['sources'])} sources up"), ready["STATUS"]
        # The daemon logged every source's fate before it said ready.
        records = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
        ready_at = next(i for i, r in enumerate(records) if r["event"] == "daemon.ready")
        settled = {r["source"] for r in records[:ready_at] if r["event"] in ("source.up", "source.down")}
        assert settled == set(st["sources"]), (settled, ready_at)
        # WATCHDOG_USEC=2 s: a ping every second, for as long as the daemon lives.
        time.sleep(4.5)
        pings = [t for t, m in listener.messages if m.get("WATCHDOG") == "1" and t > t_ready]
        assert len(pings) >= 3, listener.messages
        assert max(b - a for a, b in pairwise([t_ready, *pings])) < 2.0, pings
    finally:
        d.stop()
    listener.wait("STOPPING", "1", timeout=5)


def test_watchdog_stops_when_the_daemon_is_wedged(bpf_ready, tmp_path: Path, listener: NotifyListener) -> None:
    """A stopped (wedged) daemon sends nothing, so systemd's WatchdogSec fires; after it resumes
    the pings come back. SIGSTOP is the honest stand-in for a hang: no code path is faked."""
    d = RunningDaemon(tmp_path / "d", env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"})
    d.start()
    try:
        listener.wait("READY", "1")
        time.sleep(1.2)
        os.kill(d.proc.pid, 19)  # SIGSTOP
        time.sleep(0.3)
        t_stop = time.monotonic()
        time.sleep(2.0)
        assert not [t for t, m in listener.messages if m.get("WATCHDOG") and t > t_stop]
        os.kill(d.proc.pid, 18)  # SIGCONT
        time.sleep(1.5)
        assert [t for t, m in listener.messages if m.get("WATCHDOG") and t > t_stop + 2.0]
    finally:
        os.kill(d.proc.pid, 18)
        d.stop()


RULES_ONE = """version: 1
rules:
  - name: note-errors
    match: {kind: fs.error}
    actions: [notify]
"""
RULES_TWO = RULES_ONE + """  - name: note-readonly
    match: {kind: fs.readonly}
    actions: [notify]
"""
RULES_BAD = RULES_TWO + """  - name: broken
    match: {kind: fs.eror}
    actions: [notify]
"""


def _reload_cli(*args: str, wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(wrapper or []), sys.executable, "-m", "fsnotifyd.cli", "rules", "reload", *args],
                          capture_output=True, text=True, timeout=90, cwd="/")


def _reload_pair(listener: NotifyListener, after: int, timeout: float = 10.0) -> tuple[dict[str, str], dict[str, str]]:
    """The RELOADING=1 and the READY=1 after it among the messages from index ``after`` on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = [m for _, m in listener.messages[after:]]
        start = next((i for i, m in enumerate(msgs) if m.get("RELOADING") == "1"), None)
        if start is not None:
            done = next((m for m in msgs[start + 1:] if m.get("READY") == "1"), None)
            if done is not None:
                assert not any(m.get("READY") for m in msgs[:start]), msgs  # READY never before RELOADING
                return msgs[start], done
        time.sleep(0.02)
    raise AssertionError(f"no RELOADING=1 then READY=1: {listener.messages[after:]}")


def test_reload_is_synchronous_and_told_to_systemd(kernel, tmp_path: Path, listener: NotifyListener) -> None:
    """``fsnotifyd rules reload`` (the unit's ExecReload) returns once the reload is done: exit 0
    with the new rules in force, exit 1 with file:line when they are refused (the old ones
    stay); the daemon sends RELOADING=1 (with MONOTONIC_USEC) before and READY=1 after, for a
    refused reload and for SIGHUP too. A peer the socket does not allow gets exit 2 and
    reloads nothing."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_ONE)
    d = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n", env={"NOTIFY_SOCKET": listener.path})
    d.start()
    try:
        listener.wait("READY", "1")
        assert d.status()["rules"]["rules"] == 1

        rules.write_text(RULES_TWO)
        seen = len(listener.messages)
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        r = _reload_cli("--config", str(d.config))
        t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert r.returncode == 0 and "2 rules in force" in r.stdout, r.stdout + r.stderr
        assert d.status()["rules"]["rules"] == 2  # in force when the command returned: no polling
        reloading, ready = _reload_pair(listener, seen)
        assert t0 <= int(reloading["MONOTONIC_USEC"]) <= t1, (t0, reloading, t1)
        assert ready["MAINPID"] == str(d.proc.pid) and "reload failed" not in ready["STATUS"]

        rules.write_text(RULES_BAD)
        seen = len(listener.messages)
        r = _reload_cli("--config", str(d.config))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "old rules stay in force" in r.stderr and f"{rules}:10:" in r.stderr and "fs.eror" in r.stderr
        st = d.status()["rules"]
        assert st["rules"] == 2 and "fs.eror" in st["last_reload_error"][0]
        _, ready = _reload_pair(listener, seen)  # READY=1 after a refused reload too: still running
        assert "rules reload failed, old rules kept" in ready["STATUS"]

        rules.write_text(RULES_ONE)
        seen = len(listener.messages)
        d.proc.send_signal(signal.SIGHUP)
        _reload_pair(listener, seen)
        assert d.status()["rules"] == {**d.status()["rules"], "rules": 1, "last_reload_error": None}

        # The socket's permission model: uid 65534 outside the control group. Without a way
        # past the file mode the connect fails; with CAP_DAC_OVERRIDE the daemon refuses the
        # peer by its credentials. Either way exit 2, and nothing was reloaded.
        if shutil.which("setpriv") is None:
            kernel_missing("setpriv not installed (util-linux)")
        rules.write_text(RULES_TWO)
        seen = len(listener.messages)
        nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        r = _reload_cli("--socket", d.socket, wrapper=nobody)
        assert r.returncode == 2 and "not allowed" in r.stderr, r.stdout + r.stderr
        r = _reload_cli("--socket", d.socket, wrapper=[*nobody, "--inh-caps", "+dac_override",
                                                       "--ambient-caps", "+dac_override"])
        assert r.returncode == 2 and "permission denied" in r.stderr, r.stdout + r.stderr
        time.sleep(0.3)
        assert d.status()["rules"]["rules"] == 1
        assert not any(m.get("RELOADING") for _, m in listener.messages[seen:]), listener.messages[seen:]
    finally:
        d.stop()
    r = _reload_cli("--socket", d.socket)  # no daemon: it could not be asked
    assert r.returncode == 2 and "cannot reach the daemon" in r.stderr, r.stderr


def _capability_wrapper() -> list[str]:
    """setpriv with the unit's CapabilityBoundingSet and NoNewPrivileges.

    The unit's LimitMEMLOCK/LimitNOFILE raise limits, which this sandbox's root cannot do (it
    lacks CAP_SYS_RESOURCE in the sandbox); the daemon runs here with the lower limits it
    inherits (memlock 8 MiB: BPF maps are charged to the memory cgroup on this kernel anyway)."""
    svc = unit_service()
    caps = svc["CapabilityBoundingSet"].split()
    assert svc["NoNewPrivileges"] == "yes"
    names = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return ["setpriv", "--bounding-set", f"-all,{names}", "--inh-caps", "-all", "--no-new-privs", "--"]


def test_every_source_runs_with_only_the_units_capabilities(bpf_ready, tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        kernel_missing("setpriv not installed (util-linux)")
    (tmp_path / "fs").mkdir()
    with loop_ext4(32, workdir=tmp_path / "fs") as fs:
        d = RunningDaemon(tmp_path / "d", wrapper=_capability_wrapper(),
                          extra_config=f"ves:\n  - id: ve-caps\n    mount: {fs.mountpoint}\n")
        with d:
            status = Path(f"/proc/{d.proc.pid}/status").read_text()
            bounding = int(status.split("CapBnd:")[1].split()[0], 16)
            assert bounding & (1 << 21) and not bounding & (1 << 16)  # SYS_ADMIN kept, SYS_MODULE gone
            assert "NoNewPrivs:\t1" in status
            down = {n: s["reason"] for n, s in d.status()["sources"].items() if not s["up"]}
            assert not down, down
            d.wait_marked(fs)
            stream = d.stream(["fs.error"])
            try:
                fs.sysfs.joinpath("trigger_fs_error").write_text("under the unit's capabilities\n")
                stream.wait_for(lambda e: e["ve"] == "ve-caps", timeout=10)
                stream.settle(1.0)
                sources = set().union(*(e["sources"] for e in stream.events if e["ve"] == "ve-caps"))
            finally:
                stream.close()
            assert sources == {"bpf", "kmsg", "fanotify", "sysfs"}, sources


def test_stopping_ends_what_running_jobs_started(kernel, tmp_path: Path) -> None:
    """The unit's KillMode=process leaves the daemon's children alone (exporters must outlive
    it), so the daemon itself stops its jobs' programs at exit; the job stays unfinished in the
    journal and runs again at the next start, never twice at once."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: slow\n    match: {kind: fs.error}\n"
                     "    actions:\n      - exec: {command: [sleep, '300'], timeout: 600}\n")
    (tmp_path / "fs").mkdir()
    with loop_ext4(32, workdir=tmp_path / "fs") as fs:
        d = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n"
                          f"ves:\n  - id: ve-slow\n    mount: {fs.mountpoint}\n")

        def sleeps() -> list[int]:
            return [pid for pid in _children(d.proc.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"]

        def wait_sleep() -> int:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if found := sleeps():
                    return found[0]
                time.sleep(0.05)
            raise AssertionError("the exec job never started: " + d.log()[-2000:])

        d.start()
        try:
            d.wait_marked(fs)
            fs.sysfs.joinpath("trigger_fs_error").write_text("start a slow job\n")
            first = wait_sleep()
            t0 = time.monotonic()
        finally:
            rc = d.stop()
        assert rc == 0 and time.monotonic() - t0 < 10
        assert not Path(f"/proc/{first}").exists(), "the job's program outlived the daemon"
        journal = [json.loads(x) for x in (tmp_path / "d/state/actions/journal.jsonl").read_text().splitlines()]
        assert journal[-1]["action"] == "exec" and journal[-1]["state"] == "running"
        with d:  # the next start resumes the job: one program again
            second = wait_sleep()
            assert second != first and len(sleeps()) == 1
        assert not Path(f"/proc/{second}").exists()


def test_image_operations_run_with_only_the_units_capabilities(state, tmp_path: Path) -> None:
    """What actions do to image VEs (start: FUSE exporter, loop, mount; snapshot: freeze; the
    balloon: fallocate, chattr +i, discard; stop), under the unit's bounding set: a capability
    missing from the unit fails here, not on an operator's host during an incident."""
    import sys

    wrapper = _capability_wrapper()

    def fsnd(*argv: str) -> str:
        r = subprocess.run([*wrapper, sys.executable, "-m", "fsnotifyd.cli", *argv, "--state-dir", str(state)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"fsnotifyd {' '.join(argv)}: {r.stdout}\n{r.stderr}"
        return r.stdout

    mnt = tmp_path / "root-caps"
    fsnd("ve", "create", "caps", "--size", "256M", "--mountpoint", str(mnt))
    fsnd("ve", "start", "caps")
    image = json.loads((state / "ves" / "caps.json").read_text())["image"]
    (mnt / "data").write_bytes(os.urandom(1 << 20))
    os.sync()
    fsnd("image", "snapshot", image, "--name", "before")
    assert "balloon" in fsnd("image", "shrink", image, "--online", "64M")
    with pytest.raises(OSError):
        (mnt / ".fsnotifyd-balloon").unlink()  # immutable: chattr +i worked
    fsnd("image", "shrink", image, "--online", "0")
    fsnd("ve", "stop", "caps")
    assert not os.path.ismount(mnt)
