"""A consumer of a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) by mmap, as libbpf's ``ring_buffer__consume``.

The map fd maps as one read-write page holding the consumer position, then (read-only) one
page with the producer position and the data area mapped twice in a row, so a record that
wraps is still contiguous. Each record has an 8-byte header: its length with two flag bits
(``BUSY`` while the producer writes it, ``DISCARD`` when it gave it up) and a page offset; records
are 8-byte aligned. The map fd polls readable while records wait (``add_reader`` works on it).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")


class RingBuffer:
    def __init__(self, fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"a ring buffer's size is a power of two, not {size}")
        page = mmap.PAGESIZE
        self.fd = fd
        self.mask = size - 1
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons.close()
            raise
        self._page = page

    def consume(self, on_record: Callable[[mmap.mmap, int, int], object]) -> int:
        """Hand every complete record to ``on_record(buffer, offset, size)``; returns how many.

        ``buffer`` is the mapping itself (read it with ``from_buffer_copy(buffer, offset)``), valid
        only during the call. An exception from ``on_record`` propagates with the record unconsumed.
        """
        cons = _u64.unpack_from(self._cons, 0)[0]
        prod = _u64.unpack_from(self._prod, 0)[0]
        n = 0
        while cons < prod:
            off = cons & self.mask
            length = _u32.unpack_from(self._prod, self._page + off)[0]
            if length & BUSY:
                break  # the producer is still writing it; the next wake-up brings it
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                on_record(self._prod, self._page + off + HEADER, size)
                n += 1
            cons += (size + HEADER + 7) & ~7
            # Give the space back record by record, as libbpf does: a slow callback must not
            # hold the whole buffer.
            _u64.pack_into(self._cons, 0, cons)
            if cons >= prod:
                prod = _u64.unpack_from(self._prod, 0)[0]
        return n

    def close(self) -> None:
        self._prod.close()
        self._cons.close()
