"""KmsgSource against real XFS and btrfs damage on loop devices (root, kernel 6.18).

The damage is made with the filesystems' own tools or by overwriting a checksummed block of
the unmounted image (``xfs_db -x``; a byte of a btrfs file's data), then the kernel meets it
on mount or read and prints its own lines. Only this test's loop device is looked at: other
work on the machine may log at the same time. Clean images, mounted and read the same way,
are the controls: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsnotifyd.events import Observation
from fsnotifyd.sources.kmsg import KmsgSource
from tests.conftest import kernel_missing
from tests.rigs.loop import loop_device, run

from . import sourcekit

pytestmark = pytest.mark.kernel

MARK = b"FSNDMARK" * 8192  # 64 KiB of a pattern findable in the image


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        kernel_missing(f"{', '.join(missing)} not installed (the bootstrap installs xfsprogs and btrfs-progs)")


@contextlib.contextmanager
def image(mkfs: list[str]) -> Iterator[tuple[Path, str, Path]]:
    with tempfile.TemporaryDirectory(prefix="fsnd-") as tmp:
        img, mnt = Path(tmp) / "fs.img", Path(tmp) / "mnt"
        mnt.mkdir()
        with open(img, "wb") as f:
            f.truncate(512 << 20)
        run(*mkfs, str(img))
        with loop_device(img) as dev:
            try:
                yield img, dev, mnt
            finally:
                if run("umount", str(mnt), check=False).returncode != 0 and mnt.is_mount():
                    run("umount", "-l", str(mnt), check=False)


def observed(dev: str, act) -> list[Observation]:
    name = Path(dev).name

    async def main() -> list[Observation]:
        async with sourcekit.running(KmsgSource(), "/dev/kmsg") as got:
            await asyncio.to_thread(act)
            await asyncio.sleep(0.3)  # the last lines of a mount or a read
            return [o for o in got if o.device is not None and o.device.name == name]

    return asyncio.run(main())


def populate(dev: str, mnt: Path, fstype: str) -> None:
    run("mount", "-t", fstype, dev, str(mnt))
    (mnt / "d").mkdir()
    for i in range(50):
        (mnt / "d" / f"file-{i}").write_text(f"hello {i}\n")
    (mnt / "data").write_bytes(MARK)
    run("umount", str(mnt))


def mount_and_read(dev: str, mnt: Path, fstype: str) -> None:
    if run("mount", "-t", fstype, dev, str(mnt), check=False).returncode != 0:
        return
    for p in [mnt / "data", *sorted((mnt / "d").glob("*"))]:
        with contextlib.suppress(OSError):
            p.read_bytes()
    run("umount", str(mnt), check=False)


@pytest.mark.parametrize("damaged", [False, True])
def test_xfs_agf_corruption(kernel, damaged):
    """A zeroed AGF magic: the verifier's fs.error (structure, daddr) and the forced shutdown
    the mount then makes (its flags decoded); a clean image gives nothing."""
    need("mkfs.xfs", "xfs_db")
    with image(["mkfs.xfs", "-q", "-f"]) as (img, dev, mnt):
        populate(dev, mnt, "xfs")
        if damaged:
            run("xfs_db", "-x", "-c", "agf 1", "-c", "write -d magicnum 0", str(img))
        got = observed(dev, lambda: mount_and_read(dev, mnt, "xfs"))
    if not damaged:
        assert got == []
        return
    kinds = [(o.kind, o.kernel.structure) for o in got]
    assert ("fs.error", "xfs_agf") in kinds and ("fs.shutdown", None) in kinds, kinds
    agf = next(o for o in got if o.kernel.structure == "xfs_agf")
    assert (agf.fs, agf.kernel.function, agf.kernel.errno) == ("xfs", "xfs_agf_verify", 117)
    assert agf.kernel.daddr is not None and agf.kernel.daddr > 0
    shut = next(o for o in got if o.kind == "fs.shutdown")
    assert "corrupt_incore" in shut.details["reasons"]
    # One event per fact: the follow-up "metadata I/O error ... error 117" gave none.
    assert kinds.count(("fs.error", "xfs_agf")) == 1


@pytest.mark.parametrize("damaged", [False, True])
def test_btrfs_data_checksum(kernel, damaged):
    """A byte of a file's data overwritten on the unmounted image: each read that meets it is
    one fs.error (inode, mirror, counter), as many as the device's corruption counter rose."""
    need("mkfs.btrfs", "btrfs")
    with image(["mkfs.btrfs", "-q", "-f"]) as (img, dev, mnt):
        populate(dev, mnt, "btrfs")
        if damaged:
            raw = img.read_bytes()
            at = raw.find(MARK)
            assert at >= 0
            with open(img, "r+b") as f:
                f.seek(at + 100)
                f.write(b"X")
        stats: list[str] = []
        inodes: list[int] = []

        def act() -> None:
            run("mount", "-t", "btrfs", dev, str(mnt))
            inodes.append((mnt / "data").stat().st_ino)
            with contextlib.suppress(OSError):
                (mnt / "data").read_bytes()
            stats.append(run("btrfs", "device", "stats", str(mnt)).stdout)
            run("umount", str(mnt))

        got = observed(dev, act)
    corrupt = int(next(line for line in stats[0].splitlines() if "corruption_errs" in line).split()[-1])
    if not damaged:
        assert got == [] and corrupt == 0
        return
    assert corrupt >= 1
    assert [(o.kind, o.fs, o.kernel.structure, o.kernel.counter) for o in got] == \
        [("fs.error", "btrfs", "data", "corrupt")] * corrupt
    assert all(o.kernel.inode == inodes[0] and o.kernel.mirror == 1 and o.details["root"] == 5 for o in got)
