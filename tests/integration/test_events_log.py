"""`fsnotifyd events log` on the journal a real daemon wrote about real kernel errors.

Three VEs on fsnotifyd images (FUSE + loop + ext4) under the daemon on its embedded default
rules: three `trigger_fs_error` on VE 201 (the first snapshots and checks it, the third
isolates it read-only), one on VE 202 (snapshot and check), and VE 203 corrupted with debugfs
beforehand, whose first access is a real kernel error: snapshot, check (errors), isolate,
repair, and the repair starts it again. Then `fsnotifyd ve release 201`.
The log is read back as text, JSON and HTML, and the HTML page is opened in a real headless
Chromium (Debian's `chromium`, installed by scripts/bootstrap.sh) whose screenshot must show
a lane per VE with the marks of that VE's steps in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kernel_missing
from tests.integration.test_actions import corrupt, write_file
from tests.pngdecode import Image, decode

pytestmark = pytest.mark.kernel
MiB = 1 << 20
CHROMIUM_TIMEOUT_S = 90.0
VES = ("201", "202", "203")


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        kernel_missing("chromium not installed (Debian package chromium; scripts/bootstrap.sh installs it)")
    assert path is not None
    return path


@pytest.fixture
def workdir(tmp_path: Path, kernel: None) -> Any:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    yield tmp_path / "d"
    leftovers = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in leftovers, leftovers
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsnotifyd.cli", *argv], capture_output=True, text=True, timeout=120)


def trigger(loop: str | None, message: str) -> None:
    assert loop, "a started VE has a loop device"
    Path(f"/sys/fs/ext4/{os.path.basename(loop)}/trigger_fs_error").write_text(message)


def screenshot(chromium: str, page: Path, out: Path) -> None:
    """One headless Chromium run; the browser (a process this test starts) is ended by its pid,
    with its process group, if it has not finished in time."""
    profile = out.parent / "chromium-profile"
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--hide-scrollbars", "--force-device-scale-factor=1", f"--screenshot={out}", "--window-size=1400,900",
         page.as_uri()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0 and out.exists(), output.decode(errors="replace")[-2000:]


def colours_in(img: Image, y0: int, y1: int, x0: int, x1: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for y in range(y0, y1):
        for x in range(x0, x1):
            c = "#" + bytes(img.pixel(x, y)).hex()
            seen[c] = seen.get(c, 0) + 1
    return seen


def test_events_log_of_a_real_incident_text_json_and_html_in_a_browser(chromium: str, workdir: Path,
                                                                       tmp_path: Path) -> None:
    from fsnotifyd.image import attach
    from fsnotifyd.timeline import html
    from fsnotifyd.ve import lifecycle
    from tests.rigs.daemon import RunningDaemon

    workdir.mkdir()
    with RunningDaemon(workdir) as daemon:
        sd = workdir / "state"
        try:
            recs = {}
            for ve in VES:
                lifecycle.create(str(sd), ve, 64 * MiB, mountpoint=str(tmp_path / f"root{ve}"))
                recs[ve] = lifecycle.start(str(sd), ve)
            write_file(os.path.join(recs["203"].mountpoint, "victim"), b"v" * 20000)
            recs["203"] = corrupt(sd, recs["203"])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and {v["id"] for v in daemon.status().get("ves", [])} < set(VES):
                time.sleep(0.1)
            stream = daemon.stream()
            try:
                for i in range(3):
                    trigger(recs["201"].loop, f"timeline test error {i}")
                    time.sleep(0.4)
                trigger(recs["202"].loop, "timeline test error on 202")
                time.sleep(0.4)
                with pytest.raises(OSError):  # EFSCORRUPTED (or ENOENT) from the kernel
                    with open(os.path.join(recs["203"].mountpoint, "victim"), "rb") as f:
                        f.read()

                def isolated(e: dict[str, Any]) -> bool:
                    return e["kind"] == "action.succeeded" and e["ve"] == "201" and e["details"]["action"] == "isolate"

                stream.wait_for(isolated, timeout=120)
                r = cli("ve", "release", "201", "--config", str(daemon.config))
                assert r.returncode == 0 and "by the daemon" in r.stdout, r.stdout + r.stderr
                stream.wait_for(lambda e: e["kind"] == "ve.released" and e["ve"] == "201", timeout=60)
                stream.wait_for(lambda e: e["kind"] in ("action.succeeded", "action.failed") and e["ve"] == "203"
                                and e["details"]["action"] == "fsck" and e["details"]["params"].get("mode") == "repair",
                                timeout=180)
            finally:
                stream.close()
            deadline = time.monotonic() + 120
            while daemon.status()["actions"]["unfinished"] and time.monotonic() < deadline:
                time.sleep(0.1)  # the checks and notifications queued behind the isolation
            assert not daemon.status()["actions"]["unfinished"]
        finally:
            with contextlib.suppress(Exception):
                for ve in VES:
                    lifecycle.stop(str(sd), ve)
            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))

    # The daemon has stopped; its journal is what an operator reads afterwards.
    r = cli("events", "log", "--config", str(daemon.config))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    (tmp_path / "log.txt").write_text(out)
    lines = out.splitlines()
    rows = [line.split() for line in lines[1:] if line[:4].isdigit()]
    mine = [row for row in rows if row[1] == "201"]
    assert [row[2] for row in mine] == ["201#1"] * len(mine), out  # one incident: errors, jobs, release
    steps_201 = [row[3] for row in mine]
    for step in ("error", "decision", "snapshot", "check", "isolate", "notify", "released"):
        assert step in steps_201, out
    assert steps_201[0] == "error" and steps_201[-1] == "released", out
    assert steps_201.index("isolate") > steps_201.index("snapshot")
    assert sum(1 for row in mine if row[4] == "fs.error") >= 3, out
    summary = next(line for line in lines if line.strip().startswith("201#1 "))
    assert "released:" in summary and summary.split("released:")[1].split()[0] == "error", summary
    steps_202 = [row[3] for row in rows if row[1] == "202"]
    assert steps_202[0] == "error" and "check" in steps_202 and "isolate" not in steps_202, out
    repaired = [row for row in rows if row[1] == "203"]
    assert {row[2] for row in repaired} == {"203#1"}, out
    summary = next(line for line in lines if line.strip().startswith("203#1 "))
    assert "released:" in summary, summary
    reached = [w.strip() for w in summary.split("released:")[1].split("→")]
    chain = ["error", "snapshot", "check", "isolate", "repair"]  # in this order, other steps between
    assert [w for w in reached if w in chain] == chain, summary
    assert any(row[3] == "repair" and row[5] == "succeeded" for row in repaired), out

    r = cli("events", "log", "--config", str(daemon.config), "--json", "--ve", "201")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert {g["lane"] for g in got} == {"201"} and len(got) == len(mine)
    released = got[-1]
    assert released["kind"] == "ve.released" and released["since_start_s"] > 0.8  # three errors 0.4 s apart
    assert released["since_previous_s"] >= 0
    snap_done = next(g for g in got if g["step"] == "snapshot" and g["phase"] == "succeeded")
    assert snap_done["took_s"] > 0 and snap_done["since_start_s"] >= snap_done["took_s"]
    first = got[0]["time"]
    r = cli("events", "log", "--config", str(daemon.config), "--json", "--ve", "201", "--since", first)
    assert [json.loads(line)["event_id"] for line in r.stdout.splitlines()] == [g["event_id"] for g in got]
    r = cli("events", "log", "--config", str(daemon.config), "--json", "--since", "1s", "--until", "1s")
    assert r.returncode == 0 and r.stdout == ""  # nothing happened in the last second

    page, png = tmp_path / "timeline.html", tmp_path / "timeline.png"
    r = cli("events", "log", "--config", str(daemon.config), "--format", "html", "--output", str(page))
    assert r.returncode == 0, r.stderr
    screenshot(chromium, page, png)
    lay = html.Layout()
    img = decode(png.read_bytes(), max_rows=lay.lane_band(len(VES))[1] + 1)
    assert (img.width, img.height) == (1400, 900)
    x0, x1 = lay.plot_x()
    labels, plots = {}, {}
    for i, ve in enumerate(VES):  # lanes in the order of their first line: the order the VEs failed
        y0, y1 = lay.lane_band(i)
        labels[ve] = colours_in(img, y0, y1, lay.left, lay.left + lay.label)
        plots[ve] = colours_in(img, y0, y1, x0, x1)
    for i, ve in enumerate(VES):
        assert labels[ve].get(html.lane_colour(i), 0) > 100, (ve, labels[ve])  # its swatch, in its band only
        assert all(html.lane_colour(i) not in labels[other] for other in VES if other != ve)
        for step in ("error", "decision", "snapshot", "check"):  # the steps every VE went through
            assert plots[ve].get(html.STEP_COLOURS[step], 0) > 10, (ve, step, plots[ve])

    def only_in(ve: str, step: str) -> None:
        assert plots[ve].get(html.STEP_COLOURS[step], 0) > 10, (ve, step, plots[ve])
        for other in VES:
            if other != ve:
                assert html.STEP_COLOURS[step] not in plots[other], (other, step, plots[other])

    only_in("201", "released")  # released by a person: only 201
    only_in("203", "repair")  # repaired: only 203
    for ve in ("201", "203"):  # isolated: 201 and 203, not 202
        assert plots[ve].get(html.STEP_COLOURS["isolate"], 0) > 10, (ve, plots[ve])
    assert html.STEP_COLOURS["isolate"] not in plots["202"], plots["202"]
