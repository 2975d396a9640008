"""``EXT4_IOC_MOVE_EXT``: swap a range of a file's blocks with a donor file's, online.

What e4defrag uses: the kernel locks both inodes, copies the range's data (from the page
cache or the old blocks) into the donor's blocks and swaps the two block mappings in one
journaled step, so the file's data is whole at every instant and writers to it wait, not
fail. After the call the file's range sits where the donor's blocks were; the donor holds the
file's old blocks (freed when the donor is unlinked). Lengths and offsets are in filesystem
blocks; ``orig_start`` and ``donor_start`` may differ (same offset within a page).
"""

from __future__ import annotations

import errno
import fcntl
import struct
from dataclasses import dataclass

MOVE_EXTENT = struct.Struct("=IIQQQQ")  # reserved, donor_fd, orig_start, donor_start, len, moved_len
EXT4_IOC_MOVE_EXT = (3 << 30) | (MOVE_EXTENT.size << 16) | (ord("f") << 8) | 15  # _IOWR('f', 15, ...)
FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long)
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
FS_JOURNAL_DATA_FL = 0x4000
FS_ENCRYPT_FL = 0x800
FS_EXTENT_FL = 0x80000
FS_VERITY_FL = 0x100000
FS_INLINE_DATA_FL = 0x10000000
FS_DAX_FL = 0x2000000


class MoveError(OSError):
    """A move the kernel refused; ``moved`` blocks were moved before it did."""

    errno: int  # always given (OSError's may be None)

    def __init__(self, err: int, text: str, moved: int) -> None:
        super().__init__(err, text)
        self.moved = moved


@dataclass(frozen=True, slots=True)
class Move:
    orig_start: int  # blocks
    donor_start: int
    length: int


def move(orig_fd: int, donor_fd: int, m: Move) -> int:
    """Move ``m.length`` blocks of ``orig_fd`` (opened read-write) at ``m.orig_start`` into
    the donor's blocks at ``m.donor_start`` (the donor opened for writing, its blocks
    allocated). Returns the blocks moved; :class:`MoveError` (with the blocks moved so far)
    when the kernel refuses."""
    buf = bytearray(MOVE_EXTENT.pack(0, donor_fd, m.orig_start, m.donor_start, m.length, 0))
    try:
        fcntl.ioctl(orig_fd, EXT4_IOC_MOVE_EXT, buf)
    except OSError as e:
        moved = MOVE_EXTENT.unpack(buf)[5]
        raise MoveError(e.errno or errno.EIO, f"EXT4_IOC_MOVE_EXT: {e.strerror}", moved) from None
    return MOVE_EXTENT.unpack(buf)[5]


def flags(fd: int) -> int:
    """The inode's flags (``FS_IOC_GETFLAGS``, as ``lsattr`` shows them)."""
    buf = bytearray(struct.pack("=l", 0))
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return struct.unpack("=l", buf)[0] & 0xFFFFFFFF
