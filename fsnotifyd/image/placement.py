"""Getting whole image clusters from ext4's allocator, and checking where they landed.

Userspace cannot tell ext4 where to allocate. A request of a power-of-two number of blocks
(one image cluster: cluster / block size) is served by mballoc from a free buddy of that
order when there is one, i.e. aligned and, for the ``thin`` profile's stripe of one cluster,
stripe-aligned: in practice a wholly free image cluster. In practice is not always, so each
piece is ``fallocate``d at its own slot of the file (one cluster of file offsets each) and
FIEMAP says where it went: a piece is kept only when it is one extent filling exactly one
cluster that ``accept`` takes. Rejected pieces are held until the call ends, so the allocator
cannot hand the same blocks out twice, then punched out (their blocks go back to the
filesystem; ext4 reuses them only after the journal commits).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import fiemap as fm

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


@dataclass
class Placed:
    slots: list[tuple[int, int]]  # (file offset, cluster index) of each piece kept, in bytes/clusters
    rejected: int  # pieces that landed elsewhere (released)
    next_offset: int  # the file offset of the next slot
    enospc: bool  # the filesystem ran out of space


def place(fd: int, count: int, cluster: int, accept: Callable[[int], bool], *, offset: int = 0,
          attempts: int | None = None) -> Placed:
    """Up to ``count`` pieces of one cluster each in the open file ``fd``, at slots from file
    offset ``offset`` on, each one extent exactly filling a cluster whose index ``accept``
    takes. ``attempts`` bounds the pieces tried (default: 4 per wanted one, plus 64)."""
    budget = attempts if attempts is not None else 4 * count + 64
    kept: list[tuple[int, int]] = []
    rejects: list[int] = []
    enospc = False
    try:
        while len(kept) < count and budget > 0:
            budget -= 1
            try:
                fallocate(fd, 0, offset, cluster)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    enospc = True
                    break
                raise
            ext = [e for e in fm.extents(fd, offset, cluster)]
            got = None
            if (len(ext) == 1 and ext[0].logical == offset and ext[0].length == cluster
                    and ext[0].physical % cluster == 0 and ext[0].placed):
                got = ext[0].physical // cluster
            if got is not None and accept(got):
                kept.append((offset, got))
            else:
                rejects.append(offset)
            offset += cluster
    finally:
        for off in rejects:
            punch(fd, off, cluster)
    return Placed(kept, len(rejects), offset, enospc)
