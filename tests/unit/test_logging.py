"""The daemon's log on journald's stdout stream: each line gets its sd-daemon ``<N>`` priority
prefix, so ``journalctl -p err`` finds errors. Only when standard error really is the stream
``JOURNAL_STREAM`` names (its dev:ino); anything else (not set, malformed, a stale value
inherited by a process whose stderr was redirected) gets plain JSON lines.

The logger runs in a child process: structlog is configured once per process and caches its
loggers, and the check is on the child's own fd 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One line per level; the exception goes through format_exc_info, so its traceback is inside
# the JSON line, not on lines of its own (which would get no prefix).
LOGGER = """
import structlog
from fsnotifyd.app.logging import configure_logging
configure_logging("debug")
log = structlog.get_logger("fsnotifyd")
log.debug("t.debug", k=1)
log.info("t.info")
log.warning("t.warning")
log.error("t.error", errors=["a.yaml:1:1: bad"])
log.critical("t.critical")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("t.exception")
"""

EXPECTED = [("<7>", "t.debug"), ("<6>", "t.info"), ("<4>", "t.warning"), ("<3>", "t.error"),
            ("<2>", "t.critical"), ("<3>", "t.exception")]


def dev_ino(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def run_logger(stderr_kind: str, journal_stream: Callable[[os.stat_result], str] | None) -> list[str]:
    """The child's stderr lines. ``stderr_kind``: ``socket`` (what journald hands a service) or
    ``pipe``; ``journal_stream`` makes JOURNAL_STREAM from the fstat of a *socket* (so with
    ``pipe`` it names some other file than stderr)."""
    sock_r, sock_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipe_r, pipe_w = os.pipe()
    try:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream(os.fstat(sock_w.fileno()))
        err = sock_w.fileno() if stderr_kind == "socket" else pipe_w
        proc = subprocess.run([sys.executable, "-c", LOGGER], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err, env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0
        sock_w.close()
        os.close(pipe_w)
        pipe_w = -1
        if stderr_kind == "socket":
            chunks = iter(lambda: sock_r.recv(65536), b"")
        else:
            chunks = iter(lambda: os.read(pipe_r, 65536), b"")
        return b"".join(chunks).decode().splitlines()
    finally:
        sock_r.close()
        sock_w.close()
        os.close(pipe_r)
        if pipe_w >= 0:
            os.close(pipe_w)


def test_each_line_has_its_priority_when_stderr_is_the_journal_stream() -> None:
    lines = run_logger("socket", dev_ino)
    assert [(line[:3], json.loads(line[3:])["event"]) for line in lines] == EXPECTED, lines
    records = [json.loads(line[3:]) for line in lines]
    assert records[0]["k"] == 1 and records[3]["level"] == "error"
    assert "ZeroDivisionError" in records[5]["exception"]


@pytest.mark.parametrize("stderr_kind, journal_stream", [
    ("socket", None),  # not started by systemd with StandardError=journal
    ("pipe", dev_ino),  # stderr redirected by whoever started us; JOURNAL_STREAM inherited
    ("socket", lambda st: f"{st.st_dev}:{st.st_ino + 1}"),  # another stream
    ("socket", lambda st: f"{st.st_ino}"),  # malformed: no colon
    ("socket", lambda st: f" {st.st_dev}:{st.st_ino}x"),  # malformed
    ("socket", lambda st: ""),
], ids=["unset", "redirected", "other-inode", "no-colon", "junk", "empty"])
def test_plain_json_lines_otherwise(stderr_kind: str, journal_stream: Callable[[os.stat_result], str] | None) -> None:
    lines = run_logger(stderr_kind, journal_stream)
    assert [json.loads(line)["event"] for line in lines] == [e for _, e in EXPECTED], lines


def test_stderr_is_journal_checks_the_fd_it_is_given(tmp_path: Path) -> None:
    from fsnotifyd.app.journalstream import stderr_is_journal

    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal(f.fileno(), {"JOURNAL_STREAM": dev_ino(st)})
        assert not stderr_is_journal(f.fileno(), {})
        assert not stderr_is_journal(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}:0"})
        fd = f.fileno()
    assert not stderr_is_journal(fd, {"JOURNAL_STREAM": dev_ino(st)})  # closed: EBADF, not a crash
