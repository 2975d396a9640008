"""Changing how much space a VE has: offline shrink, and ploop's balloon for shrinking online.

Offline shrink: attach without mounting, ``e2fsck -fy``, ``resize2fs`` (``-M`` or to a size),
detach, cut the image's virtual size to the filesystem's new end, compact the file.

The balloon (online): a hidden file at the filesystem's root is ``fallocate``d to the size to
take away, its extents (FIEMAP) are discarded on the VE's block device (the image frees those
clusters) and it is made immutable. The filesystem counts its blocks as used, so the VE's
usable size drops without unmounting; the image gives the space back to the host. Deflating
removes the file: the filesystem has the blocks again, and they cost the image nothing until
written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FsckFailed, ImageError
from . import e2fsck, ops
from .fiemap import fiemap
from .progress import ProgressFn
from .stack import Stack

BALLOON = ".fsnotifyd-balloon"


def _run(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in ok:
        raise ImageError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:500]}")
    return r


@dataclass(frozen=True, slots=True)
class BalloonResult:
    size: int  # bytes the balloon holds in the filesystem
    discarded: int  # bytes discarded on the device (freed in the image)
    extents: int


def inflate(mountpoint: str, device: str, size: int, *, flush: Callable[[], object] | None = None,
            cluster: int | None = None) -> BalloonResult:
    """Take ``size`` bytes away from the VE's filesystem mounted at ``mountpoint`` (on
    ``device``, the VE's loop device) and give them back to the host. ``flush`` makes the
    image's freed clusters durable (the exporter's flush) once the discards are done.

    With ``cluster`` (the image's cluster size) the balloon is laid one whole cluster at a
    time, each piece checked with FIEMAP (:func:`lay`), the rest wherever the allocator puts
    it: a piece filling a cluster is given back whole, while one allocation of ``size`` may
    share clusters with live data, which the image cannot free."""
    path = os.path.join(mountpoint, BALLOON)
    if os.path.exists(path):
        _run("chattr", "-i", path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o000)
    try:
        os.ftruncate(fd, 0)
        if cluster is None:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise ImageError(f"the filesystem has no {size} bytes free for the balloon: {e.strerror}",
                                 file=path) from e
    finally:
        os.close(fd)
    if cluster is not None:
        fill(mountpoint, size, cluster)
    return give_back(mountpoint, device, flush=flush)


def _open_balloon(mountpoint: str) -> int:
    path = os.path.join(mountpoint, BALLOON)
    if os.path.exists(path):
        _run("chattr", "-i", path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o000)


def lay(mountpoint: str, cluster: int, count: int, accept: Callable[[int], bool], *,
        attempts: int | None = None) -> int:
    """Add up to ``count`` pieces of one whole cluster each to the balloon (made if missing),
    on clusters ``accept`` takes (:func:`.placement.place`). Returns the pieces laid."""
    from . import placement

    if count <= 0:
        return 0
    fd = _open_balloon(mountpoint)
    try:
        offset = -(-os.fstat(fd).st_size // cluster) * cluster
        return len(placement.place(fd, count, cluster, accept, offset=offset, attempts=attempts).slots)
    finally:
        os.close(fd)


def fill(mountpoint: str, size: int, cluster: int) -> None:
    """Bring the balloon to ``size`` bytes: whole clusters anywhere first, the rest in one
    allocation."""
    fd = _open_balloon(mountpoint)
    try:
        have = os.fstat(fd).st_blocks * 512
        if have < size:
            lay(mountpoint, cluster, (size - have) // cluster, lambda c: True)
            have = os.fstat(fd).st_blocks * 512
        if have < size:
            offset = -(-os.fstat(fd).st_size // cluster) * cluster
            try:
                os.posix_fallocate(fd, offset, size - have)
            except OSError as e:
                raise ImageError(f"the filesystem has no {size - have} more bytes free for the balloon: "
                                 f"{e.strerror}", file=os.path.join(mountpoint, BALLOON)) from e
    finally:
        os.close(fd)


def give_back(mountpoint: str, device: str, *, flush: Callable[[], object] | None = None) -> BalloonResult:
    """Discard the balloon's extents on the device (the image frees the clusters they fill),
    flush, and pin the balloon (immutable)."""
    path = os.path.join(mountpoint, BALLOON)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        extents = fiemap(fd)
    finally:
        os.close(fd)
    discarded = 0
    dev = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for _, physical, length in extents:
            discarded += discard(dev, physical, length)
    finally:
        os.close(dev)
    if flush is not None:
        flush()
    _run("chattr", "+i", path)  # pinned: nobody writes into it or deletes it by mistake
    return BalloonResult(sum(n for _, _, n in extents), discarded, len(extents))


BLKDISCARD = 0x1277  # _IO(0x12, 119)
PAGE = 4096


def discard(dev: int, offset: int, length: int) -> int:
    """Discard ``[offset, offset + length)`` of the open block device ``dev``; returns the bytes
    discarded. The kernel first drops the range from the device's page cache and refuses the
    whole request (EBUSY) when a page of it is still held by the mounted filesystem (a block
    that was metadata until lately, its buffer still in the journal's hands: seen once in a
    full test run). Such a request is split in halves down to single pages, and only those
    pages are skipped; the image frees each cluster once the rest of it is discarded."""
    try:
        fcntl.ioctl(dev, BLKDISCARD, struct.pack("=QQ", offset, length))
        return length
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise ImageError(f"discard of {length} bytes at {offset} failed: {e.strerror}") from e
    if length <= PAGE:
        return 0
    half = (length // 2 + PAGE - 1) // PAGE * PAGE
    return discard(dev, offset, half) + discard(dev, offset + half, length - half)


def deflate(mountpoint: str) -> bool:
    """Give the balloon's space back to the VE; False when there was none."""
    path = os.path.join(mountpoint, BALLOON)
    if not os.path.exists(path):
        return False
    _run("chattr", "-i", path)
    os.unlink(path)
    return True


def balloon_size(mountpoint: str) -> int:
    try:
        st = os.stat(os.path.join(mountpoint, BALLOON))
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512


def fs_size(device: str) -> int:
    """The ext4 filesystem's size in bytes, from its superblock."""
    out = _run("dumpe2fs", "-h", device).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    try:
        return int(fields["Block count"].strip()) * int(fields["Block size"].strip())
    except (KeyError, ValueError):
        raise ImageError("cannot read the filesystem's size from its superblock", file=device) from None


def shrink_filesystem(device: str, size: int | None, *, progress: ProgressFn | None = None) -> int:
    """e2fsck then resize2fs an unmounted ext4 to ``size`` bytes (None: as small as it goes);
    returns the new size. ``progress`` hears e2fsck's passes."""
    r = e2fsck.run(device, "-fy", progress=progress)
    if not r.repaired:  # exit 4 and up: resizing a filesystem e2fsck left broken breaks it more
        raise FsckFailed(f"not shrunk: {' '.join(r.command)} exited {r.exit_code} ({', '.join(r.decoded)}): "
                         f"{r.tail()}", command=r.command, exit_code=r.exit_code, decoded=r.decoded, file=device)
    if size is None:
        _run("resize2fs", "-M", device)
    else:
        _run("resize2fs", device, f"{size // 1024}K")
    return fs_size(device)


def cut_and_compact(image_dir: str, size: int, *, progress: ProgressFn | None = None) -> ops.CompactResult:
    """After the filesystem shrank: cut the image's virtual size and compact its file."""
    with Stack.open(image_dir) as stack:
        ops.cut_stack(stack, image_dir, size)
        return ops.compact(stack.top, progress=progress)


