"""Who owns each block of a mounted filesystem: ``FS_IOC_GETFSMAP`` (ext4, XFS).

ext4 has no reverse map, so it reports its static metadata by kind (superblock, group
descriptors, bitmaps, inode tables), free space, and everything else in use as *unknown*
(file data, directories, extent-tree blocks, the journal); FIEMAP per file says which file
holds a block. Measured on kernel 6.18 with a 256 MiB ext4: 46 records, ``fmr_offset`` 0.

The decoder is pure (:func:`parse`); :func:`read` is the ioctl, in batches, each batch starting
after the last record of the one before (the kernel's convention, as ``xfs_io -c fsmap``).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

RECORD = struct.Struct("=IIQQQQ24x")  # struct fsmap: device, flags, physical, owner, offset, length
HEAD = struct.Struct("=IIII48x")  # struct fsmap_head before its two keys: iflags, oflags, count, entries
FS_IOC_GETFSMAP = 0xC0C0583B  # _IOWR('X', 59, struct fsmap_head): 192 bytes
FMR_OF_SPECIAL_OWNER = 0x10
FMR_OF_LAST = 0x20
U32, U64 = (1 << 32) - 1, (1 << 64) - 1


def owner(kind: int, code: int) -> int:
    return (kind << 32) | code


OWN_FREE = owner(0, 1)
OWN_UNKNOWN = owner(0, 2)
# ext4's special owners (fs/ext4/fsmap.h); XFS uses 'f' for its own kinds.
OWNER_NAMES = {
    OWN_FREE: "free",
    OWN_UNKNOWN: "unknown",
    owner(ord("X"), 1): "fs",
    owner(ord("X"), 2): "log",
    owner(ord("X"), 5): "inodes",
    owner(ord("f"), 1): "gdt",
    owner(ord("f"), 2): "resv_gdt",
    owner(ord("f"), 3): "block_bitmap",
    owner(ord("f"), 4): "inode_bitmap",
}


@dataclass(frozen=True, slots=True)
class Extent:
    physical: int  # bytes from the start of the device
    length: int  # bytes
    owner: int  # an inode number, or a special owner (see ``special``)
    special: bool

    @property
    def end(self) -> int:
        return self.physical + self.length

    @property
    def free(self) -> bool:
        return self.special and self.owner == OWN_FREE

    @property
    def kind(self) -> str:
        """``free``, ``unknown`` (ext4: any file's blocks), a metadata kind, or ``inode``."""
        if not self.special:
            return "inode"
        return OWNER_NAMES.get(self.owner, f"special:{self.owner >> 32:#x}:{self.owner & U32}")

    @property
    def metadata(self) -> bool:
        """Static filesystem metadata: never moved by anything but the filesystem itself."""
        return self.special and self.owner not in (OWN_FREE, OWN_UNKNOWN)


def parse(buf: bytes | bytearray | memoryview, entries: int, first: int) -> list[tuple[Extent, int]]:
    """The ``entries`` records at byte ``first`` of a GETFSMAP reply, each with its flags."""
    out = []
    for i in range(entries):
        _dev, flags, physical, own, _offset, length = RECORD.unpack_from(buf, first + i * RECORD.size)
        out.append((Extent(physical, length, own, bool(flags & FMR_OF_SPECIAL_OWNER)), flags))
    return out


def fill_gaps(extents: Iterable[Extent]) -> Iterator[Extent]:
    """``extents`` (device order) with every gap between two of them reported as in use
    (``unknown``).

    ext4's GETFSMAP covers the whole device, but on 6.18 it drops the in-use tail of a block
    group when the next group starts in use without metadata: a 200 MiB file in a 512 MiB ext4
    (32768-block groups) at blocks 34816-65535 and 69632-90111 came back as free up to 34816
    and then ``unknown`` from 65536 only, 120 MiB missing. Its free records are right (they
    sum to statfs's ``f_bfree`` exactly), so what lies between records is in use."""
    pos: int | None = None
    for e in extents:
        if pos is not None and e.physical > pos:
            yield Extent(pos, e.physical - pos, OWN_UNKNOWN, True)
        yield e
        pos = e.end if pos is None else max(pos, e.end)


def iter_extents(path: str, *, batch: int = 512) -> Iterator[Extent]:
    """Every extent of the filesystem mounted at ``path`` (any file or directory in it), in
    device order, with what the kernel left out reported in use (:func:`fill_gaps`)."""
    return fill_gaps(_getfsmap(path, batch))


def _getfsmap(path: str, batch: int) -> Iterator[Extent]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        low = (0, 0, 0, 0, 0, 0)
        while True:
            buf = bytearray(HEAD.size + (2 + batch) * RECORD.size)
            HEAD.pack_into(buf, 0, 0, 0, batch, 0)
            RECORD.pack_into(buf, HEAD.size, *low)
            RECORD.pack_into(buf, HEAD.size + RECORD.size, U32, U32, U64, U64, U64, 0)
            fcntl.ioctl(fd, FS_IOC_GETFSMAP, buf)
            entries = HEAD.unpack_from(buf, 0)[3]
            if entries == 0:
                return
            records = parse(buf, entries, HEAD.size + 2 * RECORD.size)
            for ext, _flags in records:
                yield ext
            if records[-1][1] & FMR_OF_LAST:
                return
            # The next batch starts after the last record: the kernel reads the low key as
            # "past this record".
            low = RECORD.unpack_from(buf, HEAD.size + 2 * RECORD.size + (entries - 1) * RECORD.size)
    finally:
        os.close(fd)


def read(path: str) -> list[Extent]:
    return list(iter_extents(path))
