"""FanotifySource against real ext4 errors on loop devices (root, kernel >= 5.16).

The simulate_fail table pins what each ext4 fault-injection code gives through fanotify on this
kernel (6.18), and which access triggers it; other parts of the project rely on these facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from collections.abc import AsyncIterator, Callable

import pytest

from fsnotifyd.events import Device, Observation
from fsnotifyd.sources.fanotify import FanotifySource
from tests.conftest import kernel_missing
from tests.rigs.loop import LoopFs, loop_ext4

from . import sourcekit  # noqa: E402

pytestmark = pytest.mark.kernel


@contextlib.asynccontextmanager
async def running(src: FanotifySource) -> AsyncIterator[list[Observation]]:
    async with sourcekit.running(src, "fanotify") as got:
        yield got
    assert src.marked == {} and src.groups == 0, "source did not clean up"


wait_until = sourcekit.wait_until


def mine(got: list[Observation], fs: LoopFs) -> list[Observation]:
    return [o for o in got if o.device is not None and o.device.name == fs.name]


def expected_device(fs: LoopFs) -> Device:
    major, minor = fs.devnum
    return Device(major, minor, fs.name)


async def trigger_and_check(src: FanotifySource, got: list[Observation], fs: LoopFs) -> Observation:
    before = len(mine(got, fs))
    (fs.sysfs / "trigger_fs_error").write_text("fsnotifyd test\n")
    await wait_until(lambda: len(mine(got, fs)) > before)
    await asyncio.sleep(0.2)  # nothing more must come
    new = mine(got, fs)[before:]
    assert len(new) == 1, new
    obs = new[0]
    assert obs.source == "fanotify" and obs.kind == "fs.error"
    assert obs.device == expected_device(fs)
    assert obs.mount == str(fs.mountpoint)
    assert obs.fs == "ext4"
    assert obs.kernel.errno == errno.EUCLEAN  # ext4's EFSCORRUPTED
    assert obs.kernel.inode is None  # trigger_fs_error is not about an inode (FILEID_INVALID)
    assert obs.count == 1 and obs.details["error_count"] == 1
    assert obs.details["fsid"] == "{:08x}:{:08x}".format(
        *(v & 0xFFFFFFFF for v in src.marks[fs.devnum].fsid))
    assert "candidates" not in obs.details
    return obs


def test_trigger_fs_error(kernel: None) -> None:
    async def main() -> None:
        with loop_ext4() as fs:
            fs.quiet_ratelimits()
            src = FanotifySource()
            async with running(src) as got:
                assert src.marked[fs.devnum] == str(fs.mountpoint)
                assert str(fs.mountpoint) not in src.mark_errors
                obs = await trigger_and_check(src, got, fs)
                assert obs.kernel.pid == os.getpid()  # the writer of the sysfs knob
                # A second error after the first was read is a new event.
                await trigger_and_check(src, got, fs)

    asyncio.run(main())


def test_unmarkable_fstype_is_recorded_not_fatal(kernel: None) -> None:
    async def main() -> None:
        with loop_ext4() as fs:
            src = FanotifySource(("ext4", "proc"))
            async with running(src) as got:
                assert src.mark_errors.get("/proc", "").startswith(("ENOTSUP", "EOPNOTSUPP", "ENODEV"))
                assert fs.devnum in src.marked
                await trigger_and_check(src, got, fs)

    asyncio.run(main())


def test_mount_after_start_is_marked(kernel: None) -> None:
    async def main() -> None:
        src = FanotifySource()
        async with running(src) as got:
            with loop_ext4() as fs:
                fs.quiet_ratelimits()
                await wait_until(lambda: src.marked.get(fs.devnum) == str(fs.mountpoint))
                await trigger_and_check(src, got, fs)

                # umount: the mark is forgotten; mount again: a new superblock, marked again.
                mnt = fs.mountpoint
                fs.umount()
                await wait_until(lambda: fs.devnum not in src.marked)
                assert fs.mount("errors=continue", target=mnt).returncode == 0
                fs.quiet_ratelimits()
                await wait_until(lambda: src.marked.get(fs.devnum) == str(fs.mountpoint))
                await trigger_and_check(src, got, fs)

                # umount and mount again before the source looks (one coalesced change): the
                # device number is unchanged but the superblock is new and must be re-marked.
                fs.umount()
                assert fs.mount("errors=continue", target=mnt).returncode == 0
                fs.quiet_ratelimits()
                await asyncio.sleep(0.3)
                await trigger_and_check(src, got, fs)

    asyncio.run(main())


# --- ext4 simulate_fail (one-shot fault injection, CONFIG_EXT4_DEBUG) ------------------------
#
# Each case: (code, access after a fresh mount, errno via fanotify or None for no event,
# which inode the event names). Measured on 6.18; a fresh mount (umount + mount) makes sure the
# metadata is read from disk, without dropping the whole host's caches.


def _stat_far(fs: LoopFs) -> None:
    os.stat(fs.mountpoint / "d" / "f150")  # its inode-table block is not the root inode's


def _listdir(fs: LoopFs) -> None:
    os.listdir(fs.mountpoint / "d")


def _create(fs: LoopFs) -> None:
    (fs.mountpoint / "d" / "new").write_text("x")


def _write_fsync(fs: LoopFs) -> None:
    fd = os.open(fs.mountpoint / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"y" * (1 << 20))
        os.fsync(fd)  # allocation (delalloc) happens here, reading the block bitmap
    finally:
        os.close(fd)


SIMULATE_FAIL = [
    # code, access, errno, inode named by the event
    pytest.param(2, _write_fsync, errno.EUCLEAN, None, id="2-block-bitmap-crc"),
    pytest.param(3, _create, errno.EIO, None, id="3-inode-bitmap-eio"),
    pytest.param(4, _create, errno.EUCLEAN, None, id="4-inode-bitmap-crc"),
    pytest.param(5, _stat_far, errno.EIO, "d/f150", id="5-itable-eio"),
    pytest.param(6, _stat_far, errno.EBADMSG, "d", id="6-inode-crc"),
    pytest.param(7, _listdir, None, None, id="7-dirblock-eio-no-event"),
    pytest.param(8, _listdir, errno.EBADMSG, "d", id="8-dirblock-crc"),
]


@pytest.mark.parametrize("code,access,want_errno,inode_of", SIMULATE_FAIL)
def test_simulate_fail(kernel: None, code: int, access: Callable[[LoopFs], None],
                       want_errno: int | None, inode_of: str | None) -> None:
    async def main() -> None:
        with loop_ext4(64) as fs:
            if not (fs.sysfs / "simulate_fail").exists():
                kernel_missing("ext4 simulate_fail needs CONFIG_EXT4_DEBUG")
            mnt = fs.mountpoint
            assert mnt is not None
            (mnt / "d").mkdir()
            for i in range(200):
                (mnt / "d" / f"f{i}").write_text("z")
            inode = os.stat(mnt / inode_of).st_ino if inode_of else None
            fs.umount()
            # no_prefetch_block_bitmaps: otherwise the lazyinit thread may read the bitmaps
            # first and consume (or not) the one-shot code in the background.
            res = fs.mount("errors=continue,no_prefetch_block_bitmaps", target=mnt)
            assert res.returncode == 0, res.stderr
            fs.quiet_ratelimits()
            src = FanotifySource()
            async with running(src) as got:
                (fs.sysfs / "simulate_fail").write_text(f"{code}\n")
                with contextlib.suppress(OSError):  # the access fails for most codes
                    access(fs)
                assert (fs.sysfs / "simulate_fail").read_text().strip() == "0", "code not consumed"
                if want_errno is None:
                    await asyncio.sleep(0.5)
                    assert mine(got, fs) == []
                    return
                await wait_until(lambda: mine(got, fs))
                await asyncio.sleep(0.2)
                [obs] = mine(got, fs)
                assert obs.kernel.errno == want_errno, obs
                assert obs.kernel.inode == inode, obs
                assert obs.device == expected_device(fs) and obs.mount == str(mnt)

    asyncio.run(main())


@contextlib.contextmanager
def two_clones():
    """Two mounted ext4 filesystems from one image: same UUID, hence the same fsid."""
    with loop_ext4(mount_options=None) as a:
        clone_dir = a.image.parent / "clone"
        clone_dir.mkdir()
        shutil.copyfile(a.image, clone_dir / "fs.img")
        res = a.mount("errors=continue")
        assert res.returncode == 0, res.stderr
        with loop_ext4(image=clone_dir / "fs.img", workdir=clone_dir) as b:
            a.quiet_ratelimits()
            b.quiet_ratelimits()
            yield a, b


def test_cloned_filesystems_sharing_an_fsid(kernel: None) -> None:
    async def main() -> None:
        with two_clones() as (a, b):
            src = FanotifySource()
            async with running(src) as got:
                assert src.marks[a.devnum].fsid == src.marks[b.devnum].fsid
                assert src.groups >= 2 and src.ambiguous == {}
                await trigger_and_check(src, got, b)
                assert mine(got, a) == []
                await trigger_and_check(src, got, a)
                assert len(mine(got, b)) == 1
                # Unmounting one clone frees its extra group; the other is still watched.
                groups = src.groups
                b.umount()
                await wait_until(lambda: b.devnum not in src.marked)
                assert src.groups == groups - 1
                await trigger_and_check(src, got, a)

    asyncio.run(main())


def test_cloned_filesystems_beyond_group_limit_are_ambiguous(kernel: None) -> None:
    async def main() -> None:
        with two_clones() as (a, b):
            src = FanotifySource(max_groups=1)
            async with running(src) as got:
                fsid = src.marks[a.devnum].fsid
                key = "{:08x}:{:08x}".format(*(v & 0xFFFFFFFF for v in fsid))
                assert sorted(src.ambiguous[key]) == sorted([a.name, b.name])
                (a.sysfs / "trigger_fs_error").write_text("clone\n")
                await wait_until(lambda: any(o.details.get("fsid") == key for o in got))
                [obs] = [o for o in got if o.details.get("fsid") == key]
                assert obs.device is None  # no guessing
                assert obs.details["candidates"] == sorted([a.name, b.name])
                assert obs.kernel.errno == errno.EUCLEAN

    asyncio.run(main())
