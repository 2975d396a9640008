"""``image compact`` of an attached image runs inside its exporter: the exporter sends progress
lines on the control connection and the CLI draws them on a real pty (and nothing when stdout
is a pipe). Real parts: the FUSE exporter, its loop device, BLKDISCARD through ``blkdiscard``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fsnotifyd.app.progress import CLEAR
from tests.integration.test_ve_lifecycle import fsnd, fuse  # noqa: F401  (fuse: a fixture)
from tests.ptyrun import assert_drawn, assert_silent, run_on_terminal

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

MiB = 1 << 20


def holes(loop: str) -> None:
    """Data at the end of the disk and discarded clusters before it: compact has moves to do."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={loop}", "bs=1M", "count=32", "seek=100", "oflag=direct",
                    "status=none"], check=True)
    subprocess.run(["blkdiscard", "-o", str(100 * MiB), "-l", str(24 * MiB), loop], check=True)


@pytest.mark.usefixtures("fuse")
def test_online_compact_draws_the_exporters_progress(tmp_path: Path) -> None:
    sd = str(tmp_path / "s")
    image = str(tmp_path / "img")
    fsnd("image", "create", image, "--size", "256M", "--no-mkfs", "--state-dir", sd)
    loop = json.loads(fsnd("image", "attach", image, "--json", "--state-dir", sd).stdout)["loop"]
    try:
        holes(loop)
        rc, shown, _ = run_on_terminal(["image", "compact", image, "--state-dir", sd], stdout_tty=True)
        assert rc == 0
        assert_drawn(shown, b"compact  ")
        # The line is cleared before what follows (the attach module's log line, the result).
        result = shown.rsplit(CLEAR.encode(), 1)[1].splitlines()[-1]
        assert result.startswith(b"moved ") and b"(online)" in result, shown
        moved = int(result.split()[1])
        assert moved >= 1 and f"{moved}/{moved} clusters  100 %".encode() in shown
        holes(loop)
        rc, shown, piped = run_on_terminal(["image", "compact", image, "--state-dir", sd], stdout_tty=False)
        assert rc == 0 and b"(online)" in piped
        assert_silent(shown, piped)
    finally:
        fsnd("image", "detach", image, "--state-dir", sd)
