"""The virtual disk seen through a stack of deltas: reads fall through, writes go to the top.

A write to a cluster the top does not have copies the cluster up first (from the highest delta
below that has it, else zeros) unless it covers the whole cluster. A discard (``fstrim`` in the
VE, arriving as ``fallocate(PUNCH_HOLE)``) of a whole cluster unmaps it from the top when no
delta below has it (the space is freed); when one does, the top keeps a cluster of zeros (a
hole in the file, no space) so the old data cannot show through. Partial discards write zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ImageError
from . import descriptor as desc_mod
from .delta import Delta
from .descriptor import Descriptor


@dataclass
class IoStats:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    allocated: int = 0  # clusters newly allocated in the top
    discarded: int = 0  # clusters freed by discards
    commits: int = 0


@dataclass(eq=False)
class Stack:
    deltas: list[Delta]  # bottom first; the last is the top
    size: int
    stats: IoStats = field(default_factory=IoStats)

    @classmethod
    def open(cls, directory: str, *, writable: bool = True, upto: str | None = None,
             descriptor: Descriptor | None = None) -> "Stack":
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

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cluster level -----------------------------------------------------------------------
    def owner(self, vc: int) -> tuple[Delta, int] | None:
        """The highest delta that has virtual cluster ``vc``, and where."""
        for d in reversed(self.deltas):
            p = d.physical(vc)
            if p:
                return d, p
        return None

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
        return self.top.allocate(vc, self.read_cluster(vc))

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
            p = top.physical(vc)
            if p:
                top.write(p, off, view[pos:pos + n])
            elif n == c:
                top.allocate(vc, view[pos:pos + n])
                self.stats.allocated += 1
            elif self.owner(vc) is None:  # zeros below: write only what was written
                top.allocate_zeroed(vc, off, view[pos:pos + n])
                self.stats.allocated += 1
            else:  # copy the cluster up from below, with the new bytes in it
                base = bytearray(self.read_cluster(vc))
                base[off:off + n] = view[pos:pos + n]
                top.allocate(vc, base)
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
        c, top = self.cluster, self.top
        end = offset + length
        while offset < end:
            vc, off = divmod(offset, c)
            n = min(end - offset, c - off)
            below = any(d.physical(vc) for d in self.deltas[:-1])
            if n == c and not below:
                if top.physical(vc):
                    top.unmap(vc)
                    self.stats.discarded += 1
            elif n == c:  # zeros must hide the data below: a hole in the top's cluster
                top.zero_cluster(self._top_cluster(vc))
            elif self.owner(vc) is not None:
                p = self._top_cluster(vc)
                top.write(p, off, bytes(n))
            offset += n

    def flush(self) -> None:
        """Everything written so far is durable (data, then the BAT)."""
        if self.writable:
            self.top.commit()
            self.stats.commits += 1

    # -- accounting --------------------------------------------------------------------------
    def allocated_clusters(self) -> int:
        return sum(1 for vc in range(-(-self.size // self.cluster)) if self.owner(vc) is not None)
