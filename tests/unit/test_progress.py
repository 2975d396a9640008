"""The progress line (app/progress.py): its text and rate limit, and the CLI run for real on a
pseudo-terminal (it draws) and on pipes (it draws nothing)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fsnotifyd.app.progress import CLEAR, Progress, render
from fsnotifyd.image import qemuimg
from fsnotifyd.image.info import human
from fsnotifyd.image.stack import Stack
from tests.ptyrun import assert_drawn, assert_silent, run_on_terminal

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "tests" / "fixtures" / "logs"
RULES = ROOT / "rules"
MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_render_figures() -> None:
    line = render("import", "copy", 256 * MiB, 1024 * MiB, "B", 2.0)
    assert line == "import copy  256M/1G  25 %  128M/s  ETA 6 s"
    assert render("compact", "compact", 30, 120, "clusters", 10.0) == \
        "compact  30/120 clusters  25 %  3 clusters/s  ETA 30 s"
    assert render("x", "", 5, 0, "B", 0.1) == "x  5B"  # total unknown, too early for a rate
    assert "ETA 1 h 23 min" in render("x", "y", 1, 5000, "clusters", 1.0)
    assert render("rules test", "", 10, 20, "B", 1.0, "7 events") .endswith("7 events")


def test_rate_limited_and_cleared() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("import", out=out, clock=clock, width=200)
    for i in range(1, 1001):  # a call per millisecond for a second
        clock.now += 0.001
        p("copy", i, 2000)
    assert 5 <= p.draws <= 6  # about RATE_HZ a second, whatever the calls
    clock.now += 0.001
    p("copy", 2000, 2000)  # the end is always drawn
    assert out.getvalue().endswith("import copy  2K/2K  100 %  2K/s" + CLEAR)  # the end clears itself
    p("copy", 2000, 2000)  # the same figures: not drawn again
    assert out.getvalue().endswith("import copy  2K/2K  100 %  2K/s" + CLEAR)
    p("copy", 1999, 2000)
    clock.now += 1
    p("copy", 1999, 2000)
    p.close()
    assert out.getvalue().endswith(CLEAR) and not out.getvalue().endswith(CLEAR + CLEAR)
    n = len(out.getvalue())
    p.close()  # once cleared, nothing more
    assert len(out.getvalue()) == n


def test_stage_change_restarts_the_rate() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("export", out=out, clock=clock, width=200)
    p("copy", 1, 10)
    clock.now += 100
    p("copy", 10, 10)
    clock.now += 1
    p("convert", 500, 1000)
    assert out.getvalue().endswith("export convert  500B/1000B  50 %")  # no rate from the copy's 100 s


def test_qemu_progress_parse() -> None:
    assert qemuimg.parse_percent(b"    (0.00/100%)\r    (66.67/100%)\r") == pytest.approx(0.6667)
    assert qemuimg.parse_percent(b"nothing") is None
    assert qemuimg.detect_format(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert qemuimg.detect_format(b"\x00" * 8) == "raw"


# -- the CLI on a terminal and on pipes --------------------------------------------------------

@pytest.fixture
def image(tmp_path: Path) -> str:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (e2fsprogs; scripts/bootstrap.sh installs it)")
    path = str(tmp_path / "img")
    from fsnotifyd.image import ops

    ops.create(path, 256 * MiB)
    return path


def _holes(image: str) -> None:
    """Data at the end of the file and holes before it: compact has clusters to move."""
    with Stack.open(image) as s:
        for i in range(32):
            s.write((100 + i) * MiB, os.urandom(MiB))
        s.flush()
        s.discard(100 * MiB, 24 * MiB)
        s.flush()


def test_compact_draws_on_a_terminal_only(image: str, tmp_path: Path) -> None:
    sd = str(tmp_path / "s")
    _holes(image)
    rc, shown, _ = run_on_terminal(["image", "compact", image, "--state-dir", sd], stdout_tty=True)
    assert rc == 0
    assert_drawn(shown, b"compact  ")
    result = shown.rsplit(CLEAR.encode(), 1)[1]  # the line is cleared before the result
    assert result.startswith(b"moved ") and result.endswith(b"\r\n"), shown
    moved = int(result.split()[1])
    assert moved >= 1 and f"{moved}/{moved} clusters  100 %".encode() in shown
    _holes(image)
    rc, shown, piped = run_on_terminal(["image", "compact", image, "--state-dir", sd], stdout_tty=False)
    assert rc == 0 and b"moved" in piped
    assert_silent(shown, piped)  # stdout a pipe: nothing drawn, even on the terminal stderr


def test_check_draws_on_a_terminal_only(image: str, tmp_path: Path) -> None:
    sd = str(tmp_path / "s")
    rc, shown, _ = run_on_terminal(["image", "check", image, "--state-dir", sd], stdout_tty=True)
    assert rc == 0 and b"clean" in shown
    assert_drawn(shown, b"image check  ")
    rc, shown, piped = run_on_terminal(["image", "check", image, "--state-dir", sd], stdout_tty=False, stderr_tty=False)
    assert rc == 0 and piped == f"{image}: clean\n".encode()
    assert_silent(shown, piped)


def test_import_draws_on_a_terminal_only(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(os.urandom(16 * MiB))
    sd = str(tmp_path / "s")
    rc, shown, _ = run_on_terminal(["image", "import", str(raw), str(tmp_path / "a"), "--state-dir", sd],
                                   stdout_tty=True)
    assert rc == 0
    assert_drawn(shown, b"import copy  ")
    assert b"16M/16M  100 %" in shown  # done/total in bytes of data extents
    rc, shown, piped = run_on_terminal(["image", "import", str(raw), str(tmp_path / "b"), "--state-dir", sd],
                            stdout_tty=False)
    assert rc == 0 and b"16 clusters allocated" in piped
    assert_silent(shown, piped)


def test_rules_test_draws_on_a_terminal_only(tmp_path: Path) -> None:
    # A log of some size: the fixture's kernel lines, again and again, a second apart.
    base = (LOGS / "journalctl-short-precise.txt").read_text().splitlines()
    log = tmp_path / "kern.log"
    log.write_text("\n".join(base * 200) + "\n")
    argv = ["rules", "test", str(RULES / "default.yaml"), "--events", str(log)]
    t0 = time.monotonic()
    rc, shown, _ = run_on_terminal(argv, stdout_tty=True)
    assert rc == 0, shown
    assert_drawn(shown, b"rules test  ")
    assert b" events" in shown and f"/{human(log.stat().st_size)}".encode() in shown, shown[-2000:]
    rc, shown, piped = run_on_terminal(argv, stdout_tty=False)
    assert rc == 0 and b"decisions" in piped
    assert_silent(shown, piped)
    assert time.monotonic() - t0 < 120


def test_e2fsck_reports_its_passes(tmp_path: Path) -> None:
    """e2fsck -C FD on a real ext4 (in a file): its completion lines reach the callback."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (e2fsprogs)")
    from fsnotifyd.image import e2fsck

    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(256 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    seen: list[tuple[str, int, int]] = []
    r = e2fsck.run(str(raw), "-fn", progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert r.exit_code == 0, r.output
    stages = {s for s, _, _ in seen}
    assert {"pass 1", "pass 5"} <= stages, seen[:10]
    assert all(0 <= d <= t for _, d, t in seen if t)
    assert e2fsck.parse_completion(b"1 23 100 /dev/loop0") == (1, 23, 100)
    assert e2fsck.parse_completion(b"garbage") is None


def test_merge_draws_on_a_terminal(image: str, tmp_path: Path) -> None:
    from fsnotifyd.image import ops

    with Stack.open(image) as s:
        guid = ops.snapshot(s, image)
        s.write(10 * MiB, os.urandom(MiB))
        s.flush()
    rc, shown, _ = run_on_terminal(["image", "merge", image, guid, "--state-dir", str(tmp_path / "s")],
                                   stdout_tty=True)
    assert rc == 0 and b"merged into its child" in shown
    assert_drawn(shown, b"merge  ")
    assert b"256/256 clusters  100 %" in shown  # every cluster of the 256 MiB disk looked at
