"""e2fsck(8): run it on an unmounted disk, and what its exit status says.

The status is a bit mask: 1 errors corrected, 2 corrected and a reboot needed, 4 errors left
uncorrected, 8 operational error, 16 usage error, 32 cancelled, 128 shared library error. After
a repair run (``-p``, ``-y``) only 0 to 3 leave a filesystem fit to resize or mount read-write.
One decoder for both users: ``ve start`` (beneath) and the fsck action (above), so it lives
here, in the image manager, which the actions may import and the VE lifecycle already does.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .progress import ProgressFn

EXIT_BITS = {1: "errors corrected", 2: "errors corrected, reboot needed", 4: "errors left uncorrected",
             8: "operational error", 16: "usage or syntax error", 32: "cancelled by request",
             128: "shared library error"}

_BANNER = re.compile(r"e2fsck \d+\.\d+")


def decode(code: int) -> list[str]:
    return [text for bit, text in EXIT_BITS.items() if code & bit] or ["no errors"]


def outcome(code: int, repair: bool) -> str:
    """``clean``, ``errors`` (a check found some, even when e2fsck -n then gave up: bit 8 with
    bit 4 is common on a damaged journal; a repair fixed them) or ``failed`` (nothing learnt,
    or a repair that left errors)."""
    if code == 0:
        return "clean"
    if repair:
        return "errors" if code & 3 and not code & ~3 else "failed"
    return "errors" if code & 7 else "failed"


@dataclass(frozen=True, slots=True)
class Result:
    command: tuple[str, ...]
    exit_code: int  # negative: killed by that signal
    output: str  # stdout then stderr

    @property
    def decoded(self) -> list[str]:
        return decode(self.exit_code) if self.exit_code >= 0 else [f"killed by signal {-self.exit_code}"]

    @property
    def repaired(self) -> bool:
        """After a repair run: the filesystem may be resized and mounted read-write."""
        return outcome(self.exit_code, repair=True) != "failed"

    def tail(self, lines: int = 2) -> str:
        """The last lines of the output, where e2fsck says how it ended (its version banner,
        printed on stderr, left out)."""
        said = [ln.strip() for ln in self.output.splitlines() if ln.strip() and not _BANNER.match(ln)]
        return " / ".join(said[-lines:])


def parse_completion(line: bytes) -> tuple[int, int, int] | None:
    """One line of ``e2fsck -C FD`` output, ``PASS CURRENT MAX DEVICE``: (pass, current, max)."""
    parts = line.split()
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return None


def run(device: str, *options: str, timeout: float | None = None, progress: ProgressFn | None = None) -> Result:
    """e2fsck ``options`` ``device``; with ``progress``, ``progress("pass N", current, max)`` as
    e2fsck reports its completion (``-C FD``) pass by pass."""
    argv = ("e2fsck", *options, device)
    if progress is None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        return Result(argv, r.returncode, r.stdout + r.stderr)
    rfd, wfd = os.pipe()
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            p = subprocess.Popen(("e2fsck", "-C", str(wfd), *options, device), stdout=out, stderr=err,
                                 pass_fds=(wfd,))
        finally:
            os.close(wfd)
        try:
            _follow(rfd, progress, deadline)
            code = p.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            os.close(rfd)
        out.seek(0)
        err.seek(0)
        text = (out.read() + err.read()).decode("utf-8", "replace")
    return Result(argv, code, text)


def _follow(fd: int, progress: ProgressFn, deadline: float | None) -> None:
    pending = b""
    while True:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise subprocess.TimeoutExpired("e2fsck", 0)
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            got = parse_completion(line)
            if got is not None:
                progress(f"pass {got[0]}", got[1], got[2])
