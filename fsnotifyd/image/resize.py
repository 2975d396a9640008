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

import os
import subprocess
from dataclasses import dataclass
from typing import Callable

from ..errors import FsckFailed, ImageError
from . import e2fsck, ops
from .fiemap import fiemap
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
            cluster: int | None = None, prefer: Callable[[int], bool] | None = None) -> BalloonResult:
    """Take ``size`` bytes away from the VE's filesystem mounted at ``mountpoint`` (on
    ``device``, the VE's loop device) and give them back to the host. ``flush`` makes the
    image's freed clusters durable (the exporter's flush) once the discards are done.

    With ``cluster`` (the image's cluster size) the balloon is laid one cluster at a time,
    each piece checked with FIEMAP (:mod:`.placement`): first on wholly free clusters that
    ``prefer`` takes (an online shrink: the region above the new size), then on any wholly
    free cluster, the rest wherever the allocator puts it. A piece filling a whole cluster is
    given back whole; one allocation of ``size`` may share clusters with live data, and those
    the image cannot free."""
    path = os.path.join(mountpoint, BALLOON)
    if os.path.exists(path):
        _run("chattr", "-i", path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o000)
    try:
        os.ftruncate(fd, 0)
        try:
            if cluster is None:
                os.posix_fallocate(fd, 0, size)
            else:
                _lay(fd, size, cluster, prefer)
        except OSError as e:
            raise ImageError(f"the filesystem has no {size} bytes free for the balloon: {e.strerror}",
                             file=path) from e
        os.fsync(fd)
        extents = fiemap(fd)
    finally:
        os.close(fd)
    discarded = 0
    for _, physical, length in extents:
        _run("blkdiscard", "--force", "-o", str(physical), "-l", str(length), device)
        discarded += length
    if flush is not None:
        flush()
    _run("chattr", "+i", path)  # pinned: nobody writes into it or deletes it by mistake
    return BalloonResult(sum(n for _, _, n in extents), discarded, len(extents))


def _lay(fd: int, size: int, cluster: int, prefer: Callable[[int], bool] | None) -> None:
    from . import placement

    want = size // cluster
    offset = 0
    if prefer is not None:
        got = placement.place(fd, want, cluster, prefer, attempts=2 * want + 64)
        want -= len(got.slots)
        offset = got.next_offset
    if want > 0:
        got = placement.place(fd, want, cluster, lambda c: True, offset=offset, attempts=2 * want + 64)
        want -= len(got.slots)
        offset = got.next_offset
    rest = want * cluster + size % cluster
    if rest:
        os.posix_fallocate(fd, offset, rest)


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


def shrink_filesystem(device: str, size: int | None) -> int:
    """e2fsck then resize2fs an unmounted ext4 to ``size`` bytes (None: as small as it goes);
    returns the new size."""
    r = e2fsck.run(device, "-fy")
    if not r.repaired:  # exit 4 and up: resizing a filesystem e2fsck left broken breaks it more
        raise FsckFailed(f"not shrunk: {' '.join(r.command)} exited {r.exit_code} ({', '.join(r.decoded)}): "
                         f"{r.tail()}", command=r.command, exit_code=r.exit_code, decoded=r.decoded, file=device)
    if size is None:
        _run("resize2fs", "-M", device)
    else:
        _run("resize2fs", device, f"{size // 1024}K")
    return fs_size(device)


def cut_and_compact(image_dir: str, size: int) -> ops.CompactResult:
    """After the filesystem shrank: cut the image's virtual size and compact its file."""
    with Stack.open(image_dir) as stack:
        ops.cut_stack(stack, image_dir, size)
        return ops.compact(stack.top)


