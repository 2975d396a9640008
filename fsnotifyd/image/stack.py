"""The virtual disk seen through a stack of deltas: reads fall through, writes go to the top.

A write to a cluster the top does not have copies the cluster up first (from the highest delta
below that has it, else zeros) unless it covers the whole cluster; the copy holds only the pages
that are not zeros.

A discard (``fstrim`` or online discard in the VE, arriving as ``fallocate(PUNCH_HOLE)``) and a
write whose data is all zeros (qemu's ``detect-zeroes=unmap``) are the same: the range must read
as zeros and should cost nothing. Inside a cluster the top holds, the covered pages are punched
out of the delta file, so separate partial discards add up, and once the whole cluster is a hole
it is freed: unmapped when nothing below has data there, else marked zero in the BAT
(``ZERO_CLUSTER``, no cluster spent). Over a cluster the top does not hold, a whole cluster
costs nothing either way; a part of one over data below is copied up (the rest of the cluster
must still show the data below) and punched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ImageError
from . import descriptor as desc_mod
from .delta import Delta, is_zero
from .descriptor import Descriptor
from .format import ZERO_CLUSTER


@dataclass
class IoStats:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    allocated: int = 0  # clusters newly allocated in the top
    discards: int = 0  # discard requests
    discarded: int = 0  # clusters freed by discards and writes of zeros
    zero_writes: int = 0  # pieces of writes (a cluster's worth at most) that were all zeros
    commits: int = 0


@dataclass(eq=False)
class Stack:
    deltas: list[Delta]  # bottom first; the last is the top
    size: int
    stats: IoStats = field(default_factory=IoStats)

    @classmethod
    def open(cls, directory: str, *, writable: bool = True, upto: str | None = None,
             descriptor: Descriptor | None = None) -> Stack:
        """The image in ``directory`` (its ``DiskDescriptor.xml``), up to snapshot ``upto``
        (default: the top). Only the top may be writable, and only when ``upto`` is None."""
        path = os.path.join(directory, desc_mod.NAME)
        d = descriptor or desc_mod.load(path)
        chain = d.chain(upto)
        deltas: list[Delta] = []
        try:
            for i, shot in enumerate(chain):
                top = i == len(chain) - 1
                delta = Delta.open(os.path.join(directory, shot.file), writable=writable and top and upto is None)
                deltas.append(delta)
                if delta.cluster != d.cluster:
                    raise ImageError(f"cluster of {delta.cluster} bytes, the descriptor says {d.cluster}",
                                     file=delta.path, field="m_Sectors")
                # A top larger than the descriptor is what an interrupted grow (top first) or cut
                # (descriptor first) leaves; `image check --repair` cuts it to the descriptor
                # (opening it as is would let a later grow show the cut data again).
                if delta.header.size > d.size or (top and upto is None and delta.header.size != d.size):
                    raise ImageError(f"virtual size {delta.header.size} does not fit the descriptor's {d.size} "
                                     f"(run `fsnotifyd image check --repair`)",
                                     file=delta.path, field="m_SizeInSectors")
        except BaseException:
            for delta in deltas:
                delta.close()
            raise
        return cls(deltas, d.size)

    @property
    def top(self) -> Delta:
        return self.deltas[-1]

    @property
    def cluster(self) -> int:
        return self.top.cluster

    @property
    def writable(self) -> bool:
        return self.top.writable

    def use_direct_io(self, write_behind: int = 0, read_ahead: bool = False, *,
                      top_read_ahead: bool | None = None) -> bool:
        """Direct I/O on every delta, write-behind on the top, read-ahead on each (see
        :meth:`.Delta.use_direct_io`); again after the stack changes (a snapshot or merge opens
        deltas). ``top_read_ahead``: for the top, if not as the others. True when all have it."""
        top = self.deltas[-1]
        return all([d.use_direct_io(write_behind, read_ahead if d is not top or top_read_ahead is None
                                    else top_read_ahead) for d in self.deltas])

    def close(self) -> None:
        for d in reversed(self.deltas):
            d.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cluster level -----------------------------------------------------------------------
    def owner(self, vc: int) -> tuple[Delta, int] | None:
        """The highest delta that has data for virtual cluster ``vc``, and where; None when it
        reads as zeros (no delta has it, or one above those that do marks it zero)."""
        for d in reversed(self.deltas):
            p = d.entry(vc)
            if p == ZERO_CLUSTER:
                return None
            if p:
                return d, p
        return None

    def _zeros_below(self, vc: int) -> bool:
        """Whether ``vc`` reads as zeros in the deltas below the top."""
        for d in reversed(self.deltas[:-1]):
            p = d.entry(vc)
            if p:
                return p == ZERO_CLUSTER
        return True

    def read_cluster(self, vc: int, offset: int = 0, length: int | None = None) -> bytes:
        n = self.cluster - offset if length is None else length
        hit = self.owner(vc)
        return bytes(n) if hit is None else hit[0].read(hit[1], offset, n)

    def _top_cluster(self, vc: int) -> int:
        """The top's physical cluster for ``vc``, copying it up from below first if needed."""
        p = self.top.physical(vc)
        if p:
            return p
        self.stats.allocated += 1
        return self.top.allocate_sparse(vc, self.read_cluster(vc))

    # -- byte level --------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"I/O at {offset}+{length} past the disk's {self.size} bytes", file=self.top.path)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` (writable bytes) from the disk at ``offset``, cut at the disk's end;
        returns the bytes read."""
        length = max(0, min(len(view), self.size - offset))
        self._check(offset, length)
        c = self.cluster
        pos = 0
        while pos < length:
            vc, off = divmod(offset + pos, c)
            n = min(length - pos, c - off)
            hit = self.owner(vc)
            if hit is None:
                view[pos:pos + n] = bytes(n)
            else:
                hit[0].read_into(hit[1], off, view[pos:pos + n])
            pos += n
        self.stats.reads += 1
        self.stats.read_bytes += length
        return length

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if not self.writable:
            raise ImageError("the image is read-only", file=self.top.path)
        view = memoryview(data)
        self._check(offset, len(view))
        c, top = self.cluster, self.top
        pos = 0
        while pos < len(view):
            vc, off = divmod(offset + pos, c)
            n = min(len(view) - pos, c - off)
            chunk = view[pos:pos + n]
            p = top.physical(vc)
            if is_zero(chunk):  # zero detection: as a discard, no cluster spent on zeros
                self._zero(vc, off, n)
                self.stats.zero_writes += 1
            elif p:
                top.write(p, off, chunk)
            elif n == c:
                top.allocate(vc, chunk)
                self.stats.allocated += 1
            elif self.owner(vc) is None:  # zeros here: write only what was written
                top.allocate_zeroed(vc, off, chunk)
                self.stats.allocated += 1
            else:  # copy the cluster up from below, with the new bytes in it
                base = bytearray(self.read_cluster(vc))
                base[off:off + n] = chunk
                top.allocate_sparse(vc, base)
                self.stats.allocated += 1
            pos += n
        self.stats.writes += 1
        self.stats.written_bytes += len(view)
        return len(view)

    def discard(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros, freeing whole clusters."""
        if not self.writable:
            raise ImageError("the image is read-only", file=self.top.path)
        length = max(0, min(length, self.size - offset))
        self._check(offset, length)
        self.stats.discards += 1
        c = self.cluster
        end = offset + length
        while offset < end:
            vc, off = divmod(offset, c)
            n = min(end - offset, c - off)
            self._zero(vc, off, n)
            offset += n

    def _zero(self, vc: int, off: int, n: int) -> None:
        """``[off, off + n)`` of virtual cluster ``vc`` reads as zeros from now on, at the
        least cost in clusters (see the module's text)."""
        top = self.top
        p = top.physical(vc)
        if n < self.cluster:
            if not p:
                if self.owner(vc) is None:
                    return  # zeros already
                p = self._top_cluster(vc)  # the rest of the cluster must keep the data below
            if not top.punch(p, off, n):
                return
        if self._zeros_below(vc):
            if top.entry(vc):
                top.unmap(vc)
                self.stats.discarded += bool(p)
        elif not top.zeroed(vc):
            top.set_zero(vc)
            self.stats.discarded += bool(p)

    def flush(self) -> None:
        """Everything written so far is durable (data, then the BAT)."""
        if self.writable:
            self.top.commit()
            self.stats.commits += 1

    # -- accounting --------------------------------------------------------------------------
    def allocated_clusters(self) -> int:
        return sum(1 for vc in range(-(-self.size // self.cluster)) if self.owner(vc) is not None)
