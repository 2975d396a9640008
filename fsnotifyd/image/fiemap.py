"""Where a file's data lies on its device: ``FS_IOC_FIEMAP``, shared by the balloon and repack.

The decoder is pure (:func:`parse`); :func:`extents` is the ioctl, in batches. Offsets and
lengths are bytes; an extent's ``flags`` say what FIEMAP knows of it (delayed allocation:
no place yet; inline: data in the inode; unwritten: preallocated).
"""

from __future__ import annotations

import fcntl
import struct
from dataclasses import dataclass

from ..errors import ImageError

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
# An extent with any of these has no blocks of its own a block-level mover could take.
NOT_PLACED = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED
HEAD = struct.Struct("=QQIIII")  # struct fiemap: start, length, flags, mapped, count, reserved
EXTENT = struct.Struct("=QQQQQIIII")  # struct fiemap_extent: logical, physical, length, 2 reserved, flags, 3 reserved


@dataclass(frozen=True, slots=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def placed(self) -> bool:
        return not self.flags & NOT_PLACED

    @property
    def inline(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_DATA_INLINE)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & (FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_ENCODED))


def parse(buf: bytes | bytearray, mapped: int) -> list[Extent]:
    out = []
    for i in range(mapped):
        logical, physical, length, _, _, flags, _, _, _ = EXTENT.unpack_from(buf, HEAD.size + i * EXTENT.size)
        out.append(Extent(logical, physical, length, flags))
    return out


def extents(fd: int, start: int = 0, length: int | None = None, *, sync: bool = False,
            batch: int = 256) -> list[Extent]:
    """Every extent of the open file ``fd`` that meets [start, start + length) (bytes);
    ``sync`` writes delayed data back first so it has a place."""
    end = (1 << 64) - 1 if length is None else start + length
    out: list[Extent] = []
    while start < end:
        buf = bytearray(HEAD.size + batch * EXTENT.size)
        HEAD.pack_into(buf, 0, start, end - start, FIEMAP_FLAG_SYNC if sync else 0, 0, batch, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        got = parse(buf, mapped)
        out.extend(got)
        if got[-1].flags & FIEMAP_EXTENT_LAST:
            return out
        start = got[-1].logical + got[-1].length
    return out


def fiemap(fd: int, batch: int = 256) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of every extent of an open file, in bytes, its delayed data
    written back first; an extent still without a place is an error."""
    out = []
    for e in extents(fd, sync=True, batch=batch):
        if e.flags & FIEMAP_EXTENT_UNKNOWN:
            raise ImageError("the file's extents are not known yet (delayed allocation)")
        out.append((e.logical, e.physical, e.length))
    return out
