"""The daemon's log in a real journald: ``journalctl -p err`` finds its errors.

A service's stderr under systemd is a connection to journald's stdout socket, opened with the
header ``sd_journal_stream_fd`` writes (identifier, unit, default priority, level prefix on,
no forwarding), and ``JOURNAL_STREAM`` names it. This test opens that connection itself to the
namespaced journald of ``test_syslog_sink`` (private /run and /var/log, the host's journal
never touched), hands it to a process logging through ``configure_logging`` as its stderr, and
asks ``journalctl --directory`` what arrived at which priority. Without ``JOURNAL_STREAM`` the
same lines all land at the stream's default priority (info): the bug this guards against.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_syslog_sink import NAMESPACE, real_journald  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]

LOGGER = """
import structlog
from fsnotifyd.app.logging import configure_logging
configure_logging("debug")
log = structlog.get_logger("fsnotifyd")
log.debug("t.debug")
log.info("t.info")
log.warning("t.warning")
log.error("rules.reload_failed", errors=["default.yaml:3:5: unknown kind"], kept=2)
log.critical("t.critical")
"""


def stream_to_journal(stdout_socket: Path, identifier: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(str(stdout_socket))
        # identifier, unit id, default priority (info), level prefix, syslog, kmsg, console
        s.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        s.shutdown(socket.SHUT_RD)
    except BaseException:
        s.close()
        raise
    return s


def log_through(stdout_socket: Path, identifier: str, journal_stream: bool) -> None:
    with stream_to_journal(stdout_socket, identifier) as s:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream:
            st = os.fstat(s.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-c", LOGGER], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=s.fileno(), env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0


def entries(root: Path, identifier: str, *args: str, want: int, timeout: float = 15.0) -> list[dict]:
    """The journal's entries from ``identifier`` (journalctl ``args`` added) once ``want`` are
    there, or what is there at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found: list[dict] = []
        for d in glob.glob(str(root / "*" / "*journal" / f"*.{NAMESPACE}")) + \
                glob.glob(str(root / "*" / "log" / "journal" / f"*.{NAMESPACE}")):
            r = subprocess.run(["journalctl", f"--directory={d}", "-o", "json", "--all", "--no-pager",
                                "-t", identifier, *args], capture_output=True, text=True, timeout=30)
            found += [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_journalctl_p_err_finds_the_daemons_errors(real_journald):
    sock, root = real_journald
    stdout_socket = sock.parent / "stdout"
    assert stdout_socket.exists(), list(sock.parent.iterdir())

    log_through(stdout_socket, "fsnd-prio", journal_stream=True)
    every = entries(root, "fsnd-prio", want=5)
    got = [(e["PRIORITY"], json.loads(e["MESSAGE"])["event"]) for e in every]
    assert got == [("7", "t.debug"), ("6", "t.info"), ("4", "t.warning"), ("3", "rules.reload_failed"),
                   ("2", "t.critical")], every
    assert {e["_TRANSPORT"] for e in every} == {"stdout"}
    errors = entries(root, "fsnd-prio", "-p", "err", want=2)
    assert [json.loads(e["MESSAGE"])["event"] for e in errors] == ["rules.reload_failed", "t.critical"]
    assert json.loads(errors[0]["MESSAGE"])["errors"] == ["default.yaml:3:5: unknown kind"]

    # The same lines without JOURNAL_STREAM: no prefix, all at the stream's default, info.
    log_through(stdout_socket, "fsnd-plain", journal_stream=False)
    plain = entries(root, "fsnd-plain", want=5)
    assert [(e["PRIORITY"], json.loads(e["MESSAGE"])["event"]) for e in plain] == [
        ("6", x) for x in ("t.debug", "t.info", "t.warning", "rules.reload_failed", "t.critical")], plain
    assert entries(root, "fsnd-plain", "-p", "err", want=1, timeout=1.0) == []
