"""End to end on the real kernel: a real ext4 error in, exactly one structured event out."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.rigs.loop import loop_device, loop_ext4, run

pytestmark = pytest.mark.kernel


def _on(fs):
    return lambda e: e["device"] and e["device"]["name"] == fs.name


def test_trigger_fs_error_is_one_event(daemon, workdir):
    """trigger_fs_error: one fs.error with device, mount, VE, function, line, message, all sources."""
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        fs.umount()
        fs.mount("errors=continue", target=workdir / "ve101")
        daemon.wait_marked(fs)
        stream = daemon.stream(["fs.*"])
        try:
            (fs.sysfs / "trigger_fs_error").write_text("hello from the test")
            [ev] = stream.wait_for(lambda e: _on(fs)(e) and e["kind"] == "fs.error")
            stream.settle(quiet=1.5)
            errs = [e for e in stream.events if _on(fs)(e) and e["kind"] == "fs.error"]
        finally:
            stream.close()
        assert len(errs) == 1, errs
        major, minor = fs.devnum
        assert ev["device"] == {"major": major, "minor": minor, "name": fs.name}
        assert ev["mount"] == str(workdir / "ve101") and ev["ve"] == "101" and ev["fs"] == "ext4"
        k = ev["kernel"]
        assert k["function"] == "trigger_test_error" and isinstance(k["line"], int)
        assert k["message"] == "hello from the test"
        assert k["errno"] == {"name": "EUCLEAN", "number": errno.EUCLEAN}
        assert set(ev["sources"]) == {"bpf", "kmsg", "fanotify", "sysfs"}
        assert ev["count"] == 1 and ev["schema"] == "fsnotifyd.event/1"
        assert ev["time"].endswith("Z") and ev["severity"] == "error"


def test_remount_ro_gives_fs_readonly(daemon, workdir):
    """errors=remount-ro: the first error makes the fs read-only, reported once."""
    with loop_ext4(mount_options="errors=remount-ro", workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        stream = daemon.stream(["fs.readonly", "fs.error"])
        try:
            (fs.sysfs / "trigger_fs_error").write_text("go read-only")
            ro = stream.wait_for(lambda e: _on(fs)(e) and e["kind"] == "fs.readonly")
            stream.settle(quiet=1.5)
            ro = [e for e in stream.events if _on(fs)(e) and e["kind"] == "fs.readonly"]
        finally:
            stream.close()
        assert len(ro) == 1, ro
        assert ro[0]["mount"] == str(fs.mountpoint)
        assert "kmsg" in ro[0]["sources"] and "mountinfo" in ro[0]["sources"]


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)


def test_shutdown_ioctl_gives_fs_shutdown(daemon, workdir):
    """EXT4_IOC_SHUTDOWN: no ext4_error, no fanotify; kmsg's line becomes fs.shutdown."""
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        stream = daemon.stream(["fs.shutdown"])
        try:
            fd = os.open(fs.mountpoint, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", 2))  # NOLOGFLUSH
            finally:
                os.close(fd)
            [ev] = stream.wait_for(lambda e: _on(fs)(e))
        finally:
            stream.close()
        assert ev["kind"] == "fs.shutdown" and ev["mount"] == str(fs.mountpoint)
        assert ev["details"].get("flags") == 2


def test_loop_over_full_tmpfs_gives_blk_io_error(daemon, workdir):
    """A loop device over a file on a tiny tmpfs fails writes in the block layer."""
    tmpfs = workdir / "tiny"
    tmpfs.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2m", "tiny", str(tmpfs))
    try:
        img = tmpfs / "disk.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        with loop_device(img) as dev:
            name = os.path.basename(dev)
            stream = daemon.stream(["blk.io_error"])
            try:
                subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=8", "oflag=direct"],
                               capture_output=True)
                evs = stream.wait_for(lambda e: e["device"]["name"] == name)
            finally:
                stream.close()
        assert evs, daemon.log()[-2000:]
        ev = evs[0]
        assert ev["kind"] == "blk.io_error" and ev["sources"] == ["kmsg"]
        assert ev["kernel"]["errno"]["name"] in ("ENOSPC", "EIO")
        assert ev["count"] >= 1
    finally:
        run("umount", str(tmpfs), check=False)


def test_loop_attach_detach_gives_dev_events(daemon, workdir):
    """Attaching and detaching a loop device are dev.change events from udev."""
    img = workdir / "plain.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    stream = daemon.stream(["dev.*"])
    try:
        with loop_device(img) as dev:
            name = os.path.basename(dev)
            stream.wait_for(lambda e: e["device"]["name"] == name)
        evs = stream.wait_for(lambda e: e["device"]["name"] == name, count=2)
    finally:
        stream.close()
    kinds = [e["kind"] for e in evs]
    assert len(evs) >= 2 and set(kinds) <= {"dev.add", "dev.change", "dev.remove"}, evs
    assert all(e["sources"] == ["udev"] for e in evs)


from .test_fanotify_live import _listdir, _stat_far, _write_fsync  # noqa: E402


@pytest.mark.parametrize("code,access,want", [
    pytest.param(5, _stat_far, errno.EIO, id="5-itable-read-eio"),
    pytest.param(6, _stat_far, errno.EBADMSG, id="6-inode-checksum"),
    pytest.param(8, _listdir, errno.EBADMSG, id="8-dirblock-checksum"),
    pytest.param(2, _write_fsync, errno.EUCLEAN, id="2-block-bitmap"),
])
def test_simulate_fail_gives_the_right_errno(daemon, workdir, code, access, want):
    """ext4's one-shot fault injection: one fs.error per code with the kernel's errno."""
    with loop_ext4(64, workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        if not (fs.sysfs / "simulate_fail").exists():
            from tests.conftest import kernel_missing

            kernel_missing("ext4 simulate_fail needs CONFIG_EXT4_DEBUG")
        mnt = fs.mountpoint
        (mnt / "d").mkdir()
        for i in range(200):
            (mnt / "d" / f"f{i}").write_text("z")
        fs.umount()
        # A fresh mount reads metadata from disk; no lazy bitmap prefetch consumes the code.
        assert fs.mount("errors=continue,no_prefetch_block_bitmaps", target=mnt).returncode == 0
        daemon.wait_marked(fs)
        stream = daemon.stream(["fs.error"])
        try:
            (fs.sysfs / "simulate_fail").write_text(f"{code}\n")
            try:
                access(fs)
            except OSError:
                pass  # the access fails for most codes: that is the point
            stream.wait_for(_on(fs))
            stream.settle(quiet=1.2)
            evs = [e for e in stream.events if _on(fs)(e)]
        finally:
            stream.close()
        assert len(evs) == 1, evs
        ev = evs[0]
        assert ev["kernel"]["errno"]["number"] == want, ev
        assert {"fanotify", "sysfs"} <= set(ev["sources"]) and ev["count"] == 1
        assert ev["kernel"]["function"], ev


def test_remount_ro_then_rw_gives_readonly_then_writable(daemon, workdir):
    """An administrator's remount read-only and back: fs.readonly, then the recovery fs.writable."""
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        stream = daemon.stream(["fs.readonly", "fs.writable"])
        try:
            run("mount", "-o", "remount,ro", str(fs.mountpoint))
            stream.wait_for(lambda e: _on(fs)(e) and e["kind"] == "fs.readonly")
            run("mount", "-o", "remount,rw", str(fs.mountpoint))
            stream.wait_for(lambda e: _on(fs)(e) and e["kind"] == "fs.writable")
            stream.settle(quiet=1.2)
            evs = [e for e in stream.events if _on(fs)(e)]
        finally:
            stream.close()
        assert [e["kind"] for e in evs] == ["fs.readonly", "fs.writable"], evs
        assert evs[0]["details"]["reason"] == "remounted_ro" and evs[0]["sources"] == ["mountinfo"]
