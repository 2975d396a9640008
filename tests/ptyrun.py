"""Run the CLI with stdout and/or stderr on a real pseudo-terminal, and what a progress line
drawn there looks like (tests of app/progress.py, unit and integration)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

from fsnotifyd.app.progress import CLEAR

ROOT = Path(__file__).resolve().parents[1]


def run_on_terminal(argv: list[str], *, stdout_tty: bool, stderr_tty: bool = True) -> tuple[int, bytes, bytes]:
    """Run ``fsnotifyd ARGV`` with stdout and/or stderr on a pseudo-terminal (120 columns), the
    other on a file (not a terminal; a pipe left unread while the terminal is read could fill);
    returns (exit code, what the terminal showed, what the file got)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile() as other:
        p = subprocess.Popen([sys.executable, "-m", "fsnotifyd", *argv], stdin=subprocess.DEVNULL, env=env,
                             stdout=slave if stdout_tty else other, stderr=slave if stderr_tty else other)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave closed it
                break
            if not chunk:
                break
            shown += chunk
        os.close(master)
        rc = p.wait(timeout=120)
        other.seek(0)
        return rc, shown, other.read()


def assert_drawn(shown: bytes, label: bytes) -> None:
    assert CLEAR.encode() + label in shown, shown
    assert b"%" in shown.split(CLEAR.encode() + label, 1)[1]  # done/total and a percentage


def assert_silent(*outputs: bytes) -> None:
    for o in outputs:
        assert b"\r" not in o.replace(b"\r\n", b"\n") and CLEAR.encode() not in o, o
