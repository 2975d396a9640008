"""VEs on images, end to end on the real kernel: FUSE exporter, loop device, ext4, the daemon.

`fsnotifyd ve create/start/stop`, data surviving stop/start and a killed exporter, the daemon
attributing a real ext4 error on the VE's filesystem to the VE id from the registry, online
shrink with the balloon, offline shrink, online grow. Everything a test attaches is detached
in a finally, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import kernel_missing

pytestmark = pytest.mark.kernel


def fsnd(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", *argv], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"fsnotifyd {' '.join(argv)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def fuse(kernel):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        kernel_missing(f"mfusepy/libfuse3 not importable: {e}")


def _take_down(sd: Path) -> None:
    """Stop every VE of state dir ``sd``, detach every attachment (snapshot views too), and
    check that nothing of it is left on the machine."""
    from fsnotifyd.image import attach
    from fsnotifyd.ve.registry import Registry

    for rec in Registry(str(sd)).all():
        fsnd("ve", "stop", rec.id, "--state-dir", str(sd), check=False)
    for a in attach.attached(str(sd / "run")):
        attach.detach(a, run_dir=str(sd / "run"))
    leftovers = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(sd) not in leftovers, leftovers
    assert str(sd) not in Path("/proc/self/mountinfo").read_text()


@pytest.fixture
def state(tmp_path, fuse):
    """A state dir; at the end every VE in it is stopped and every attachment detached."""
    sd = tmp_path / "state"
    sd.mkdir()
    yield sd
    _take_down(sd)


@pytest.fixture
def short_state(fuse):
    """A state dir with a short path (``/tmp/fsnd-XXXXXXXX/state``), taken down like
    :func:`state` and removed. Short enough that the VE's attachment record keeps its
    flattened path as its name while a snapshot view's (``...@GUID``) is hashed to
    ``ID-<hash>``, which sorts first: the order in which the issue-15 report met them."""
    top = Path(tempfile.mkdtemp(prefix="fsnd-", dir="/tmp"))
    sd = top / "state"
    sd.mkdir()
    try:
        yield sd
    finally:
        try:
            _take_down(sd)
        finally:
            if str(top) not in Path("/proc/self/mountinfo").read_text():  # never rm into a mount
                shutil.rmtree(top, ignore_errors=True)


from tests.rigs.files import sha256_of as sha  # noqa: E402
from tests.rigs.files import write_synced as write_file  # noqa: E402


def record(sd: Path, ve: str) -> dict:
    return json.loads((sd / "ves" / f"{ve}.json").read_text())


def e2fsck_n(image: str, sd: Path) -> None:
    """The filesystem is clean: attached read-only on its own, checked, detached."""
    from fsnotifyd.image import attach

    a = attach.attach(image, run_dir=str(sd / "run"), readonly=True)
    try:
        r = subprocess.run(["e2fsck", "-fn", a.loop], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        attach.detach(a, run_dir=str(sd / "run"))


def test_create_start_stop_start_keeps_data(state, tmp_path):
    mnt = tmp_path / "root101"
    fsnd("ve", "create", "101", "--size", "256M", "--mountpoint", str(mnt), "--label", "tier=gold",
         "--state-dir", str(state))
    fsnd("ve", "start", "101", "--state-dir", str(state))
    rec = record(state, "101")
    assert rec["running"] and rec["loop"].startswith("/dev/loop") and os.path.ismount(mnt)
    digest = write_file(mnt / "data.bin", 8 << 20)
    listed = fsnd("ve", "list", "--json", "--state-dir", str(state)).stdout
    assert json.loads(listed)[0]["running"] is True
    fsnd("ve", "start", "101", "--state-dir", str(state))  # idempotent while running
    fsnd("ve", "stop", "101", "--state-dir", str(state))
    assert not os.path.ismount(mnt) and not record(state, "101")["running"]
    e2fsck_n(rec["image"], state)
    fsnd("ve", "start", "101", "--state-dir", str(state))
    assert sha(mnt / "data.bin") == digest


def test_start_after_the_exporter_was_killed(state, tmp_path):
    """A crash of the exporter (SIGKILL): the VE sees I/O errors; `ve start` takes the dead
    attachment apart, checks and repairs the image, and brings the VE back with every fsynced
    file intact."""
    from fsnotifyd.image import attach

    mnt = tmp_path / "root102"
    fsnd("ve", "create", "102", "--size", "256M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "102", "--state-dir", str(state))
    digest = write_file(mnt / "kept.bin", 4 << 20)
    [a] = attach.attached(str(state / "run"))
    os.kill(a.pid, signal.SIGKILL)
    with pytest.raises(OSError):
        write_file(mnt / "lost.bin", 1 << 20)
    fsnd("ve", "start", "102", "--state-dir", str(state))
    assert sha(mnt / "kept.bin") == digest
    [b] = attach.attached(str(state / "run"))
    assert b.pid != a.pid


def test_events_on_a_ve_carry_its_id(state, tmp_path):
    """The daemon learns the VE from the registry when it is mounted: a real ext4 error on its
    filesystem is one fs.error with ve=103."""
    from tests.rigs.daemon import RunningDaemon
    from tests.rigs.net import free_port

    workdir = tmp_path / "d"
    workdir.mkdir()
    mnt = tmp_path / "root103"
    port = free_port()
    with RunningDaemon(workdir, metrics_port=port) as daemon:
        sd = workdir / "state"  # the daemon's state_dir: the CLI shares its registry
        fsnd("ve", "create", "103", "--size", "128M", "--mountpoint", str(mnt), "--state-dir", str(sd))
        try:
            fsnd("ve", "start", "103", "--state-dir", str(sd))
            loop = record(sd, "103")["loop"]
            stream = daemon.stream(["fs.error"])
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(
                        v["id"] == "103" for v in daemon.status().get("ves", [])):
                    time.sleep(0.1)
                sysfs = Path("/sys/fs/ext4") / os.path.basename(loop) / "trigger_fs_error"
                sysfs.write_text("error on a VE")
                name = os.path.basename(loop)
                [ev] = stream.wait_for(lambda e: e["kind"] == "fs.error" and e["device"]["name"] == name)
            finally:
                stream.close()
            assert ev["ve"] == "103" and ev["mount"] == str(mnt)
            [im] = daemon.status()["images"]["attached"]  # the exporter's own report, through the daemon
            assert im["healthy"] and im["loop"] == loop and im["stats"]["writes"] > 0
            assert im["data_path"] == "c"  # the bootstrap built it; FSNOTIFYD_FASTIO is not set here
            text = fsnd("status", "--config", str(daemon.config)).stdout
            assert f"on {loop}" in text and "healthy" in text and "data path c" in text
            # The same figures as metrics, from the watchdog's last round (every 2 s).
            image = im["image"]
            want = f'fsnotifyd_image_io_requests_total{{image="{image}",op="write",ve="103"}}'
            deadline = time.monotonic() + 10
            while True:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                if want in metrics or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("fsnotifyd_image_")}
            assert values.get(want, 0) > 0, [k for k in values]
            assert values[f'fsnotifyd_image_exporter_healthy{{image="{image}",ve="103"}}'] == 1
            assert values[f'fsnotifyd_image_io_bytes_total{{image="{image}",op="write",ve="103"}}'] > 0
            assert f'fsnotifyd_image_python_requests_total{{image="{image}",ve="103"}}' in values
        finally:
            fsnd("ve", "stop", "103", "--state-dir", str(sd), check=False)
            from fsnotifyd.image import attach

            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))


def _avail(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _allocated(image: str) -> int:
    from fsnotifyd.image.info import image_info

    return image_info(image).allocated_bytes


def test_balloon_shrinks_online_and_deflates(state, tmp_path):
    """The balloon: usable space drops without unmounting, the image gives clusters back;
    deflating returns the space to the VE."""
    mnt = tmp_path / "root104"
    # Without online discard (a VE set so, or an older one), so that:
    fsnd("ve", "create", "104", "--size", "512M", "--mountpoint", str(mnt), "--no-discard", "--state-dir", str(state))
    fsnd("ve", "start", "104", "--state-dir", str(state))
    image = record(state, "104")["image"]
    # Most of the filesystem written then deleted without trim: the image still holds those
    # clusters, and a balloon of most of the filesystem must lie on them.
    write_file(mnt / "big.bin", 400 << 20)
    (mnt / "big.bin").unlink()
    subprocess.run(["sync"], check=True)
    allocated_before, avail_before = _allocated(image), _avail(mnt)
    assert allocated_before >= 400 << 20
    out = fsnd("image", "shrink", image, "--online", "380M", "--state-dir", str(state)).stdout
    assert "balloon" in out
    assert os.path.ismount(mnt)
    assert avail_before - _avail(mnt) >= 370 << 20
    assert allocated_before - _allocated(image) >= 250 << 20
    with pytest.raises(OSError):
        (mnt / ".fsnotifyd-balloon").unlink()  # pinned
    fsnd("image", "shrink", image, "--online", "0", "--state-dir", str(state))
    assert _avail(mnt) >= avail_before - (4 << 20)
    digest = write_file(mnt / "after.bin", 32 << 20)
    assert sha(mnt / "after.bin") == digest


def test_offline_shrink_and_online_grow(state, tmp_path):
    mnt = tmp_path / "root105"
    fsnd("ve", "create", "105", "--size", "512M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "105", "--state-dir", str(state))
    image = record(state, "105")["image"]
    digest = write_file(mnt / "keep.bin", 16 << 20)
    fsnd("ve", "stop", "105", "--state-dir", str(state))
    fsnd("image", "shrink", image, "--state-dir", str(state))
    from fsnotifyd.image.info import image_info

    small = image_info(image).size
    assert small < 256 << 20
    e2fsck_n(image, state)
    fsnd("ve", "start", "105", "--state-dir", str(state))
    assert sha(mnt / "keep.bin") == digest
    from fsnotifyd.image.attach import has_cap_sys_resource

    before = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    fsnd("image", "grow", image, "1G", "--state-dir", str(state))
    assert image_info(image).size == 1 << 30
    loop = record(state, "105")["loop"]
    assert int(Path(f"/sys/block/{os.path.basename(loop)}/size").read_text()) * 512 == 1 << 30  # live
    if not has_cap_sys_resource():
        # This sandbox's root lacks CAP_SYS_RESOURCE, which EXT4_IOC_RESIZE_FS needs: the
        # filesystem grows offline at the next start instead.
        fsnd("ve", "stop", "105", "--state-dir", str(state))
        fsnd("ve", "start", "105", "--state-dir", str(state))
    after = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    assert after > before + (512 << 20)
    assert sha(mnt / "keep.bin") == digest


def test_the_daemon_aborts_a_hung_exporter_and_reports_the_io_errors(state, tmp_path):
    """SIGSTOP the exporter under a writer: the daemon's watchdog aborts the FUSE connection,
    the writer returns with an error instead of hanging in D state, and the I/O errors that
    follow on the VE's filesystem come out as events carrying the VE id."""
    from fsnotifyd.image import attach
    from tests.rigs.daemon import RunningDaemon
    from tests.rigs.net import free_port

    workdir = tmp_path / "d"
    workdir.mkdir()
    mnt = tmp_path / "root106"
    port = free_port()
    with RunningDaemon(workdir, metrics_port=port) as daemon:
        sd = workdir / "state"
        fsnd("ve", "create", "106", "--size", "128M", "--mountpoint", str(mnt), "--state-dir", str(sd))
        writer = None
        try:
            fsnd("ve", "start", "106", "--state-dir", str(sd))
            [a] = attach.attached(str(sd / "run"))
            stream = daemon.stream(["fs.*", "blk.io_error"])
            try:
                os.kill(a.pid, signal.SIGSTOP)
                writer = subprocess.Popen([sys.executable, "-c", (
                    "import os\n"
                    f"fd = os.open({str(mnt / 'w.bin')!r}, os.O_WRONLY | os.O_CREAT)\n"
                    "os.write(fd, os.urandom(1 << 20))\n"
                    "os.fsync(fd)\n")], stderr=subprocess.PIPE, text=True)
                rc = writer.wait(timeout=60)  # the watchdog checks every 2 s, 5 s timeout
                assert rc != 0, "the writer should fail once the connection is aborted"
                evs = stream.wait_for(lambda e: e.get("ve") == "106", timeout=30)
            finally:
                stream.close()
            assert evs[0]["kind"] in ("fs.error", "blk.io_error", "fs.readonly", "fs.shutdown")
            assert daemon.status()["images"]["exporters_aborted"] >= 1
            # The aborted attachment stays in the metrics, unhealthy, until it is taken apart
            # (FsnotifydImageExporterUnhealthy fires on it).
            want = f'fsnotifyd_image_exporter_healthy{{image="{a.image}",ve="106"}} 0.0'
            deadline = time.monotonic() + 10
            while want not in (text := urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                 timeout=5).read().decode()):
                assert time.monotonic() < deadline, [x for x in text.splitlines() if "image_exporter" in x]
                time.sleep(0.5)
            time.sleep(4)  # two more watchdog rounds: it is still there
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert want in text
        finally:
            for a in attach.attached(str(sd / "run")):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(a.pid, signal.SIGCONT)
            if writer is not None and writer.poll() is None:
                writer.kill()
            fsnd("ve", "stop", "106", "--state-dir", str(sd), check=False)
            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))


def test_fstrim_then_compact_gives_back_the_trimmed_clusters(state, tmp_path):
    """fstrim inside the VE frees clusters (holes in the image file); compact then moves the
    clusters behind them into the holes and cuts the file: it shrinks by at least 95 % of what
    was trimmed, and the data left reads back with a clean filesystem."""
    from fsnotifyd.image import attach
    from fsnotifyd.image.info import image_info

    mnt = tmp_path / "root107"
    fsnd("ve", "create", "107", "--size", "384M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "107", "--state-dir", str(state))
    image = record(state, "107")["image"]
    digests = {f"f{i}": write_file(mnt / f"f{i}", 8 << 20) for i in range(30)}
    for i in range(0, 30, 4):  # keep some files spread over the disk: compaction must move them
        digests.pop(f"f{i + 1}")
        (mnt / f"f{i + 1}").unlink()
        for j in (i + 2, i + 3):
            if j < 30:
                digests.pop(f"f{j}")
                (mnt / f"f{j}").unlink()
    [a] = attach.attached(str(state / "run"))
    subprocess.run(["sync", "-f", str(mnt)], check=True)  # fstrim skips blocks freed in an open transaction
    before = attach.control(a, {"op": "status"})["stats"]["discarded"]
    subprocess.run(["fstrim", str(mnt)], check=True)
    trimmed = attach.control(a, {"op": "status"})["stats"]["discarded"] - before
    assert trimmed * (1 << 20) >= 150 << 20, trimmed
    fsnd("ve", "stop", "107", "--state-dir", str(state))
    file_before = image_info(image).file_bytes
    out = fsnd("image", "compact", image, "--state-dir", str(state)).stdout
    file_after = image_info(image).file_bytes
    assert file_before - file_after >= 0.95 * trimmed * (1 << 20), (out, file_before, file_after, trimmed)
    e2fsck_n(image, state)
    fsnd("ve", "start", "107", "--state-dir", str(state))
    for name, digest in digests.items():
        assert sha(mnt / name) == digest


def test_offline_operations_refuse_an_image_in_use(state, tmp_path):
    """The exporter holds the image's lock: compact, merge, repair or an offline grow from
    another process are refused instead of racing its BAT in memory."""
    from fsnotifyd.errors import ImageError
    from fsnotifyd.image.lock import exclusive

    mnt = tmp_path / "root108"
    fsnd("ve", "create", "108", "--size", "128M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "108", "--state-dir", str(state))
    image = record(state, "108")["image"]
    with pytest.raises(ImageError, match="in use"):
        with exclusive(image, "compact"):
            pass
    # Even with the attachment's record gone (a wiped run dir), the lock still says no.
    r = fsnd("image", "check", image, "--repair", "--state-dir", str(tmp_path / "elsewhere"), check=False)
    assert r.returncode == 1 and "in use" in r.stderr
    fsnd("ve", "stop", "108", "--state-dir", str(state))
    with exclusive(image, "compact"):
        pass


def _snapshot_view(sd: Path, image: str, where: Path) -> str:
    """`image snapshot` then `image mount-snapshot` at ``where``; returns the snapshot's GUID."""
    fsnd("image", "snapshot", image, "--state-dir", str(sd))
    guid = json.loads(fsnd("image", "snapshots", image, "--json", "--state-dir", str(sd)).stdout)[-1]["guid"]
    fsnd("image", "mount-snapshot", image, guid, str(where), "--state-dir", str(sd))
    return guid


def _attachments(sd: Path, upto: str | None = None) -> list:
    """The recorded attachments of ``sd``: the images' own (``upto`` None) or views of ``upto``."""
    from fsnotifyd.image import attach

    return [a for a in attach.attached(str(sd / "run")) if a.upto == upto]


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie has exited: here PID 1 may be slow to reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _backing(loop: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def test_stop_after_a_snapshot_view_stops_the_ve(short_state):
    """Issue 15 (3), the reported sequence through the CLI: `ve create --start`, `image
    snapshot`, `image mount-snapshot`, `umount` of the view, `ve stop`. The stop takes down
    the VE itself (not the view, another attachment of the same image): its mount, its loop
    device and its exporter are gone, the image checks clean, the registry says stopped."""
    sd = short_state
    fsnd("ve", "create", "--start", "d1", "--size", "128M", "--state-dir", str(sd))
    rec = record(sd, "d1")
    [own] = _attachments(sd)
    assert own.loop == rec["loop"] and own.pid
    view = sd.parent / "view"
    guid = _snapshot_view(sd, rec["image"], view)
    subprocess.run(["umount", str(view)], check=True)

    r = fsnd("ve", "stop", "d1", "--state-dir", str(sd))
    assert "VE d1 stopped" in r.stdout
    targets = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()
    assert rec["mountpoint"] not in targets, targets
    assert _backing(rec["loop"]) != rec["disk"], f"{rec['loop']} still on {rec['disk']}"
    assert not _alive(own.pid), f"exporter pid {own.pid} still there"
    checked = fsnd("image", "check", rec["image"], "--state-dir", str(sd), check=False)
    assert checked.returncode == 0 and "clean" in checked.stdout, checked.stdout + checked.stderr
    [listed] = json.loads(fsnd("ve", "list", "--json", "--state-dir", str(sd)).stdout)
    assert listed["running"] is False and listed["loop"] is None
    # The view is not the VE's: `ve stop` leaves it to `image detach`.
    assert len(_attachments(sd, upto=guid)) == 1
    fsnd("image", "detach", rec["image"], "--state-dir", str(sd))


def test_umount_snapshot_takes_down_the_view_and_leaves_the_ve_running(short_state):
    """`image umount-snapshot IMAGE GUID` unmounts the view and detaches it (its loop device
    and exporter go), while the VE on the same image keeps its mount, device and exporter;
    `image detach IMAGE --snapshot GUID` does the same for a view already unmounted."""
    sd = short_state
    fsnd("ve", "create", "--start", "d3", "--size", "128M", "--state-dir", str(sd))
    rec = record(sd, "d3")
    [own] = _attachments(sd)
    view = sd.parent / "view"
    guid = _snapshot_view(sd, rec["image"], view)
    [v] = _attachments(sd, upto=guid)
    r = fsnd("image", "umount-snapshot", rec["image"], guid, "--state-dir", str(sd))
    assert f"snapshot {guid} unmounted and detached" in r.stdout
    assert not os.path.ismount(view)
    assert _backing(v.loop) != v.disk and not _alive(v.pid)
    assert _attachments(sd, upto=guid) == []
    assert os.path.ismount(rec["mountpoint"]) and _alive(own.pid) and _backing(rec["loop"]) == rec["disk"]
    guid2 = _snapshot_view(sd, rec["image"], view)
    subprocess.run(["umount", str(view)], check=True)
    fsnd("image", "detach", rec["image"], "--snapshot", guid2, "--state-dir", str(sd))
    assert _attachments(sd, upto=guid2) == [] and os.path.ismount(rec["mountpoint"])
    fsnd("ve", "stop", "d3", "--state-dir", str(sd))
    assert not os.path.ismount(rec["mountpoint"])


def test_start_while_a_snapshot_view_is_mounted_keeps_the_ve_on_its_own_device(short_state):
    """`ve start` of a running VE is a no-op even with a snapshot view of its image mounted:
    the registry keeps the VE's own loop device, not the view's."""
    sd = short_state
    fsnd("ve", "create", "--start", "d2", "--size", "128M", "--state-dir", str(sd))
    rec = record(sd, "d2")
    _snapshot_view(sd, rec["image"], sd.parent / "view")
    fsnd("ve", "start", "d2", "--state-dir", str(sd))
    assert record(sd, "d2")["loop"] == rec["loop"]
    assert os.path.ismount(rec["mountpoint"]) and os.path.ismount(sd.parent / "view")


def test_a_stop_that_cannot_finish_says_so_and_the_ve_stays_running(state, tmp_path):
    """A process inside the VE keeps its filesystem busy: `ve stop` fails, names what is
    still up, exits non-zero, and the registry keeps saying running (it is)."""
    mnt = tmp_path / "root109"
    fsnd("ve", "create", "109", "--size", "128M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "109", "--state-dir", str(state))
    busy = subprocess.Popen(["sleep", "300"], cwd=mnt)
    try:
        r = fsnd("ve", "stop", "109", "--state-dir", str(state), check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "VE 109 is not stopped" in r.stderr and str(mnt) in r.stderr, r.stderr
        rec = record(state, "109")
        assert rec["running"] and os.path.ismount(mnt)
        assert "stop failed" in rec["reason"]
        listed = fsnd("ve", "list", "--state-dir", str(state)).stdout
        assert "running" in listed and "stop failed" in listed
    finally:
        busy.kill()  # our own child, by pid
        busy.wait()
    fsnd("ve", "stop", "109", "--state-dir", str(state))
    rec = record(state, "109")
    assert not rec["running"] and rec["reason"] is None and not os.path.ismount(mnt)


def _fill_to_the_last_block(mnt: Path, loop: str) -> None:
    """Every data block of the filesystem used, no /lost+found, a root directory whose blocks
    are full, and /d/victim (100 kB) whose entry is about to go: e2fsck can then neither make
    /lost+found nor link the victim into the root directory (no block to grow either)."""
    import errno

    # ext4 keeps 2 % of the clusters back even from root; e2fsck's allocator does not.
    (Path("/sys/fs/ext4") / os.path.basename(loop) / "reserved_clusters").write_text("0")
    (mnt / "lost+found").rmdir()
    (mnt / "d").mkdir()
    write_file(mnt / "d" / "victim", 100_000)

    def fill(path: Path, chunk: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    fill(mnt / "fill", 1 << 20)
    fill(mnt / "fill", 4096)
    subprocess.run(["sync", "-f", str(mnt)], check=True)  # delalloc reservations back, then the rest
    for i in range(1000):  # more files, each to ENOSPC, until one gets no block at all
        fill(mnt / f"s{i}", 4096)
        if (mnt / f"s{i}").stat().st_size == 0:
            break
    n = 0
    try:
        while True:  # names as short as e2fsck's ("#12"): then its entry cannot fit either
            (mnt / f"z{n:x}").touch(exist_ok=False)
            n += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    assert os.statvfs(mnt).f_bfree == 0


def _block_count(image: str, sd: Path) -> int:
    from fsnotifyd.image import attach

    a = attach.attach(image, run_dir=str(sd / "run"), readonly=True)
    try:
        out = subprocess.run(["dumpe2fs", "-h", a.loop], capture_output=True, text=True, check=True).stdout
    finally:
        attach.detach(a, run_dir=str(sd / "run"))
    return int(next(ln.split(":")[1] for ln in out.splitlines() if ln.startswith("Block count:")))


def test_start_refuses_a_filesystem_e2fsck_cannot_repair(state, tmp_path):
    """Issue 15 (4): a disk grown while detached makes `ve start` run `e2fsck -fy` before
    resize2fs. On a filesystem -p passes (marked clean) but -fy leaves with errors (exit 4:
    full to the last block, no /lost+found and an unattached inode, so 'Insufficient space to
    recover lost files'), the start stops there: nothing resized or mounted, the image detached
    and clean, the VE stopped with the reason in its record, `ve list`, `ve show` and the
    `ve.start_refused` log line, and the CLI exits non-zero naming e2fsck's exit status."""
    mnt = tmp_path / "root110"
    fsnd("ve", "create", "110", "--size", "64M", "--mountpoint", str(mnt), "--state-dir", str(state))
    fsnd("ve", "start", "110", "--state-dir", str(state))
    rec = record(state, "110")
    _fill_to_the_last_block(mnt, rec["loop"])
    fsnd("ve", "stop", "110", "--state-dir", str(state))
    loop = fsnd("image", "attach", rec["image"], "--state-dir", str(state)).stdout.split()[-1]
    try:
        subprocess.run(["debugfs", "-w", "-R", "unlink /d/victim", loop], check=True, capture_output=True)
        assert subprocess.run(["e2fsck", "-p", loop], capture_output=True).returncode == 0  # clean to -p
    finally:
        fsnd("image", "detach", rec["image"], "--state-dir", str(state))
    blocks = _block_count(rec["image"], state)
    fsnd("image", "grow", rec["image"], "128M", "--state-dir", str(state))

    r = fsnd("ve", "start", "110", "--state-dir", str(state), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "VE 110 not started: e2fsck -fy" in r.stderr and "exited 4 (errors left uncorrected)" in r.stderr, r.stderr
    # The log event, on stderr with the message (stdout is for the result alone).
    assert "ve.start_refused" in r.stderr and "exit_code=4" in r.stderr, r.stderr
    assert not os.path.ismount(mnt) and _attachments(state) == []
    assert str(state) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    checked = fsnd("image", "check", rec["image"], "--state-dir", str(state), check=False)
    assert checked.returncode == 0 and "clean" in checked.stdout, checked.stdout + checked.stderr
    after = record(state, "110")
    assert not after["running"] and after["loop"] is None
    assert after["reason"] == "start refused: e2fsck -fy exited 4 (errors left uncorrected)", after["reason"]
    assert after["reason"] in fsnd("ve", "list", "--state-dir", str(state)).stdout
    assert after["reason"] in fsnd("ve", "show", "110", "--state-dir", str(state)).stdout
    assert _block_count(rec["image"], state) == blocks  # resize2fs did not run


def _mount_options(mnt: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if f[1] == str(mnt):
            return f[3].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def _settled(image: str) -> int:
    """The image's allocation once online discards stopped arriving."""
    from fsnotifyd.image import attach
    from tests.rigs.image import discards_settled

    a = attach.attachment(str(Path(image).parent.parent / "run"), image)
    assert a is not None
    discards_settled(a)
    return _allocated(image)


def test_online_discard_by_default_gives_the_space_back_without_fstrim(state, tmp_path):
    mnt = tmp_path / "root120"
    fsnd("ve", "create", "120", "--size", "512M", "--mountpoint", str(mnt), "--start", "--state-dir", str(state))
    assert "discard" in _mount_options(mnt)
    image = record(state, "120")["image"]
    tree = mnt / "tree"
    tree.mkdir()
    for i in range(1500):  # 96 MiB of 64 KiB files
        (tree / f"f{i}").write_bytes(os.urandom(64 << 10))
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    full = _settled(image)
    for first in (0, 1):  # every other file, then the rest: each discard covers parts of clusters
        for i in range(first, 1500, 2):
            (tree / f"f{i}").unlink()
        subprocess.run(["sync", "-f", str(mnt)], check=True)
    back = full - _settled(image)
    assert back >= 88 << 20, f"96 MiB deleted, {back / (1 << 20):.1f} MiB given back without fstrim"
    # Per VE: off from the next start.
    out = fsnd("ve", "set", "120", "--discard", "off", "--state-dir", str(state)).stdout
    assert "off (from the next start)" in out
    fsnd("ve", "stop", "120", "--state-dir", str(state))
    fsnd("ve", "start", "120", "--state-dir", str(state))
    assert "discard" not in _mount_options(mnt)
    assert record(state, "120")["discard"] is False
    assert "online discard off" in fsnd("ve", "show", "120", "--state-dir", str(state)).stdout
