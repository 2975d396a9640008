"""One delta file, open: its BAT in memory, clusters read and written, allocation made durable.

Crash safety (the ploop rule): a BAT entry reaches the disk only after the data it points to.
New mappings (allocations, moves) and unmappings (discards) are *pending* until
:meth:`Delta.commit`: ``fdatasync`` the data, write the changed BAT entries, ``fdatasync``
again. A crash before the commit leaves the old BAT, whose clusters still hold their old data;
the new clusters are unreferenced space that :mod:`.check` and compaction reclaim. A physical
cluster freed by a discard is reused only after the unmapping is committed, so no two BAT
entries on disk ever name the same cluster.

Memory: the BAT is an ``array('I')`` (4 bytes per virtual cluster: 256 KiB for a 64 GiB disk of
1 MiB clusters).
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ImageError
from .format import (
    BAT_ENTRY,
    DEFAULT_CLUSTER,
    HEADER_SIZE,
    ZERO_CLUSTER,
    BatProblem,
    Header,
    bat_region,
    capacity,
    new_header,
    parse_header,
    validate_bat,
)
from .readahead import ReadAhead
from .writebehind import WriteBehind

if sys.byteorder != "little":  # the BAT is little-endian and read straight into an array
    raise ImportError("fsnotifyd.image needs a little-endian host")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Direct I/O takes requests whose file offset and length are multiples of this (the largest
# logical block size of common disks) from a page-aligned buffer; other requests stay buffered.
DIRECT_ALIGN = 4096
# Requests below this stay buffered even when aligned: the host page cache absorbs small
# random writes until the VE's next flush and reads ahead for small reads, where a direct
# request would wait for the disk while the single-threaded exporter holds every other one.
DIRECT_MIN = 64 << 10
# The host filesystem's block: the unit a hole can be punched in (ext4, XFS and btrfs on 4 KiB).
PAGE = 4096
_ZEROS = bytes(DIRECT_ALIGN)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte is zero. Data that is not fails on its first bytes, which costs
    nothing; a whole check copies once (a memoryview compares byte by byte, 25x slower)."""
    n = len(data)
    head = bytes(data[:32])
    if head.count(0) != len(head):
        return False
    return n <= 32 or bytes(data) == bytes(n)


def punch_hole(fd: int, offset: int, length: int) -> None:
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:  # a host fs without holes: write zeros instead
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.pwrite(fd, bytes(length), offset)


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class Delta:
    path: str
    fd: int
    header: Header
    bat: array.array
    writable: bool
    problems: list[BatProblem] = field(default_factory=list)  # only when opened with strict=False
    file_clusters: int = 0  # physical clusters the file spans (rounded up)
    _pending: dict[int, int] = field(default_factory=dict)  # virtual -> physical (0: unmapped)
    _free: list[int] = field(default_factory=list)  # reusable physical clusters, kept sorted
    _freed: list[int] = field(default_factory=list)  # freed by pending unmappings: reusable after commit
    _fresh: set[int] = field(default_factory=set)  # physical clusters allocated since the last commit
    _dfd: int = -1  # the file again, opened O_DIRECT (see use_direct_io); -1: none
    _direct: bool = False  # data requests use _dfd (off again if the host fs refuses an aligned one)
    _behind_depth: int = 0  # large direct writes go to a WriteBehind of this depth (0: written at once)
    _behind: WriteBehind | None = None  # started after the first direct write succeeded
    _ahead_wanted: bool = False  # start a ReadAhead at the first sequential direct read
    _ahead: ReadAhead | None = None  # reads the next cluster after a sequential direct read
    _last_read_end: int = -1  # file position where the last direct read ended
    _stages: list[memoryview] = field(default_factory=list)  # free page-aligned bounce buffers, a cluster each
    _maps: list[mmap.mmap] = field(default_factory=list)  # all of them (one per concurrent request)
    # Told of every mapping change (virtual, physical or 0): the exporter's C data path
    # (fastio.py) keeps a copy of the top's mapping and must never write through a stale one.
    on_map: Callable[[int, int], None] | None = None
    on_sync: Callable[[], None] | None = None  # ... and raises what its writes in flight failed with
    _lost: OSError | None = None  # a write acknowledged and then failed: the next commit fails too

    # -- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path: str, size: int, cluster: int = DEFAULT_CLUSTER, *, reserve: int | None = None) -> Delta:
        """A new empty delta (header and zeroed BAT, durable); fails if ``path`` exists."""
        header = new_header(size, cluster, reserve=reserve)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, header.first_block)
            os.pwrite(fd, header.pack(), 0)
            os.fsync(fd)
            fsync_dir(path)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        bat = array.array("I", bytes(header.entries * BAT_ENTRY))
        return cls(path, fd, header, bat, True, file_clusters=header.first_cluster)

    @classmethod
    def open(cls, path: str, *, writable: bool = False, strict: bool = True) -> Delta:
        """Open and validate. ``strict`` refuses any BAT problem; without it the problems are
        listed in ``problems`` (for ``image check``) and the bad entries read as unmapped."""
        # O_NONBLOCK: a FIFO named as a delta must not block the open (no effect on files).
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise ImageError(f"cannot open delta: {e.strerror}", file=path) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("delta is not a regular file", file=path)
            size = st.st_size
            header = parse_header(os.pread(fd, HEADER_SIZE, 0), size, file=path)
            raw = os.pread(fd, header.entries * BAT_ENTRY, HEADER_SIZE)
            if len(raw) != header.entries * BAT_ENTRY:
                raise ImageError(f"truncated BAT: {len(raw)} of {header.entries * BAT_ENTRY} bytes", file=path,
                                 field="bat")
            bat = array.array("I", raw)
            problems = validate_bat(bat, header, size)
            if problems and strict:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ImageError(f"{problems[0]}{more}; run `fsnotifyd image check --repair`", file=path,
                                 field=f"bat[{problems[0].index}]")
            for p in problems:
                bat[p.index] = 0  # never read or write through a bad entry (a duplicate's first owner keeps it)
        except BaseException:
            os.close(fd)
            raise
        d = cls(path, fd, header, bat, writable, problems=problems,
                file_clusters=-(-size // header.cluster))
        d._free = d.unreferenced()
        return d

    def unreferenced(self) -> list[int]:
        """Physical data clusters inside the file that no BAT entry names (holes left by
        discards, or data of allocations a crash kept from being committed)."""
        used = set(self.bat) | set(self._pending.values())
        return [p for p in range(self.header.first_cluster, self.file_clusters) if p not in used]

    def use_direct_io(self, write_behind: int = 0, read_ahead: bool = False) -> bool:
        """Read and write data clusters with O_DIRECT from now on (the exporter does: through
        the host page cache, every 4 KiB write into a file cached in large folios costs a walk
        of the folio's buffers, and each flush of the VE writes back what the cache gathered).
        Requests that are not 4 KiB-aligned, the header and the BAT stay buffered; the kernel
        keeps the two views of the file coherent. False when the host fs refuses O_DIRECT.

        ``write_behind``: how many large direct writes may be in flight on a thread of their
        own (see :mod:`.writebehind`); every other access to the file waits for them.
        ``read_ahead``: sequential direct reads read the next cluster ahead (:mod:`.readahead`)."""
        if self.writable:
            self._behind_depth = write_behind
        self._ahead_wanted = read_ahead
        if self._dfd >= 0:
            return self._direct
        if self.fd < 0:
            return False
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_DIRECT
        try:
            self._dfd = os.open(f"/proc/self/fd/{self.fd}", flags)  # the same inode, even if renamed
        except OSError:
            return False
        self._direct = True
        return True

    @property
    def direct_fd(self) -> int:
        """The O_DIRECT descriptor data requests use, -1 when they are buffered."""
        return self._dfd if self._direct else -1

    def pending_mappings(self) -> list[tuple[int, int]]:
        """(virtual, physical or 0) mappings made since the last commit."""
        return list(self._pending.items())

    def _map(self, vc: int, p: int) -> None:
        self._pending[vc] = p
        if self.on_map is not None:
            self.on_map(vc, 0 if p == ZERO_CLUSTER else p)  # the C path serves data clusters only

    def _take_stage(self) -> memoryview:
        # list.pop and append are atomic: FUSE threads share the pool without a lock.
        try:
            return self._stages.pop()
        except IndexError:
            m = mmap.mmap(-1, max(self.cluster, DIRECT_ALIGN))
            self._maps.append(m)
            return memoryview(m)

    @property
    def read_ahead_hits(self) -> int:
        return self._ahead.hits if self._ahead is not None else 0

    @property
    def write_behind_waits(self) -> int:
        return self._behind.waits if self._behind is not None else 0

    def _sync(self) -> None:
        """Wait for the writes in flight (and raise the first that failed)."""
        try:
            if self._behind is not None:
                self._behind.drain()
            if self.on_sync is not None:
                self.on_sync()
        except OSError as e:
            # Whatever request meets the failure first (a read, another write) fails with it, and
            # so must the next commit: the flush is what promised the write was durable.
            self._lost = e
            raise

    def _changing(self) -> None:
        """The file is about to change: no read-ahead window may outlive it."""
        if self._ahead is not None:
            self._ahead.drop()

    def _drop_direct_io(self) -> None:
        # Only from close(): another thread may be inside a request on _dfd until then.
        self._direct = False
        if self._behind is not None:
            self._behind.close()
            self._behind = None
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        for v in self._stages:
            v.release()
        self._stages.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a request still holds it; freed with the request
                pass
        self._maps.clear()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                if self.writable:
                    self.commit()
            finally:
                self._drop_direct_io()
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Delta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    @property
    def cluster(self) -> int:
        return self.header.cluster

    def entry(self, vc: int) -> int:
        """The BAT entry for ``vc`` as it stands (pending changes included): a physical
        cluster, 0 or ``ZERO_CLUSTER``."""
        if vc >= len(self.bat):
            return 0
        p = self._pending.get(vc)
        return self.bat[vc] if p is None else p

    def physical(self, vc: int) -> int:
        """The physical cluster holding virtual cluster ``vc`` here (0: no data in this delta,
        whether reads fall through or it is marked zero)."""
        p = self.entry(vc)
        return 0 if p == ZERO_CLUSTER else p

    def zeroed(self, vc: int) -> bool:
        """Marked as zeros here: nothing below shows through, and no cluster is spent."""
        return self.entry(vc) == ZERO_CLUSTER

    def is_hole(self, phys: int) -> bool:
        """Whether physical cluster ``phys`` holds no data in the file (every block of it
        punched or never written): it reads as zeros and costs the host nothing."""
        self._sync()
        start = phys * self.cluster
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) >= start + self.cluster
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after start
                return True
            raise

    def read(self, phys: int, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` within physical cluster ``phys`` (zeros past EOF)."""
        buf = bytearray(length)
        self.read_into(phys, offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, phys: int, offset: int, view: memoryview) -> None:
        """Fill ``view`` (writable bytes) from ``offset`` within physical cluster ``phys``."""
        self._sync()
        pos, length = phys * self.cluster + offset, len(view)
        got = -1
        if self._direct and length >= DIRECT_MIN and not (pos | length) & (DIRECT_ALIGN - 1):
            sequential = pos == self._last_read_end
            self._last_read_end = pos + length
            if sequential and self._ahead is None and self._ahead_wanted:  # a thread only for deltas read in sequence
                self._ahead = ReadAhead(self._dfd, self.cluster, os.path.basename(self.path))
            ahead = self._ahead
            if ahead is not None and sequential and ahead.take(pos, view):
                ahead.advance(pos + length)
                return
            stage = self._take_stage()
            try:
                got = os.preadv(self._dfd, [stage[:length]], pos)
                view[:got] = stage[:got]
                if ahead is not None and sequential and got == length:
                    ahead.advance(pos + length)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # the host fs wants a larger alignment: buffered from now on
            finally:
                self._stages.append(stage)
        if got < 0:
            got = os.preadv(self.fd, [view], pos)
        if got < length:  # past the end of the file: zeros
            view[got:] = bytes(length - got)

    def allocated(self) -> int:
        return sum(1 for vc in range(len(self.bat)) if self.physical(vc))

    # -- writing -----------------------------------------------------------------------------
    def _need_writable(self) -> None:
        if not self.writable:
            raise ImageError("delta is open read-only", file=self.path)

    def write(self, phys: int, offset: int, data: bytes | memoryview) -> None:
        """Overwrite bytes inside an allocated cluster (durable at the next commit)."""
        self._need_writable()
        self._changing()
        pos, length = phys * self.cluster + offset, len(data)
        n = -1
        if self._direct and length >= DIRECT_MIN and not (pos | length) & (DIRECT_ALIGN - 1):
            stage = self._take_stage()
            view = stage[:length]
            view[:] = data
            if self._behind is not None:  # the stage goes back to the pool once written
                self._behind.submit(view, pos, lambda: self._stages.append(stage))
                return
            try:
                self._sync()
                n = os.pwrite(self._dfd, view, pos)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False
            finally:
                self._stages.append(stage)
            if n == length and self._behind_depth and self._behind is None:
                # Only once a direct write went through: a refusal (EINVAL) must come while
                # the data is still at hand to be written buffered instead.
                self._behind = WriteBehind(self._dfd, self._behind_depth, os.path.basename(self.path))
        if n < 0:
            self._sync()
            n = os.pwrite(self.fd, data, pos)
        if n != length:
            raise OSError(errno.EIO, f"short write to {self.path}")

    def take_cluster(self) -> int:
        """A physical cluster for new data: the lowest free one, else the end of the file."""
        if self._free:
            return self._free.pop(0)
        p = self.file_clusters
        self.file_clusters += 1
        return p

    def allocate(self, vc: int, data: bytes | memoryview) -> int:
        """Map virtual cluster ``vc`` to a new physical cluster holding ``data`` (a whole
        cluster). The mapping is pending until :meth:`commit`."""
        if len(data) != self.cluster:
            raise ValueError("allocate takes a whole cluster")
        return self._place(vc, lambda p, reused: self.write(p, 0, data))

    def allocate_sparse(self, vc: int, data: bytes | bytearray | memoryview) -> int:
        """Like :meth:`allocate`, writing only the pages of ``data`` that are not zeros (a copy
        up or a compaction costs what the cluster holds, and holes stay holes)."""
        c = self.cluster
        if len(data) != c:
            raise ValueError("allocate_sparse takes a whole cluster")
        view = memoryview(data)

        def fill(p: int, reused: bool) -> None:
            self._clear(p, reused)
            for start, end in _data_runs(view):
                self.write(p, start, view[start:end])

        return self._place(vc, fill)

    def _clear(self, p: int, reused: bool) -> None:
        """Make physical cluster ``p`` read as zeros before it is filled in part."""
        c = self.cluster
        self._sync()
        self._changing()
        if reused:  # a free cluster may still hold the data of an allocation a crash undid
            punch_hole(self.fd, p * c, c)
        else:  # the file always spans whole clusters (check treats a partial tail as debris)
            os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, (p + 1) * c))

    def allocate_zeroed(self, vc: int, offset: int, data: bytes | memoryview) -> int:
        """Like :meth:`allocate` for a cluster that is zeros but for ``data`` at ``offset``:
        only ``data`` is written, the rest is a hole (a first write into empty space costs
        what it writes, not a whole cluster of zeros)."""
        c = self.cluster
        if offset < 0 or offset + len(data) > c:
            raise ValueError("data past the cluster")

        def fill(p: int, reused: bool) -> None:
            self._clear(p, reused)
            self.write(p, offset, data)

        return self._place(vc, fill)

    def _place(self, vc: int, fill: Callable[[int, bool], None]) -> int:
        """Take a physical cluster, ``fill(p, reused)`` it, map ``vc`` to it (pending)."""
        self._need_writable()
        if vc >= self.header.entries:
            raise ImageError(f"virtual cluster {vc} past the disk ({self.header.entries} clusters)", file=self.path)
        old = self.physical(vc)
        reused = bool(self._free)
        p = self.take_cluster()
        try:
            fill(p, reused)
        except BaseException:
            self._release(p)
            raise
        self._map(vc, p)
        self._fresh.add(p)
        if old:
            self._release(old)
        return p

    def unmap(self, vc: int) -> None:
        """Drop this delta's data for ``vc`` (reads fall through below); the space is freed."""
        self._need_writable()
        old = self.physical(vc)
        if not old:
            if self.zeroed(vc):
                self._map(vc, 0)
            return
        self._sync()
        self._changing()
        self._map(vc, 0)
        self._release(old)
        punch_hole(self.fd, old * self.cluster, self.cluster)

    def set_zero(self, vc: int) -> None:
        """Mark ``vc`` as zeros here (pending until the commit): its cluster, if any, is
        punched at once (so a crash before the commit still reads zeros) and freed."""
        self._need_writable()
        if vc >= self.header.entries:
            raise ImageError(f"virtual cluster {vc} past the disk ({self.header.entries} clusters)", file=self.path)
        old = self.physical(vc)
        self._sync()
        self._changing()
        self._map(vc, ZERO_CLUSTER)
        if old:
            self._release(old)
            punch_hole(self.fd, old * self.cluster, self.cluster)

    def punch(self, phys: int, offset: int, length: int) -> bool:
        """Make ``[offset, offset + length)`` of allocated cluster ``phys`` read as zeros, as
        holes where whole pages are covered (discards add up: the pages stay punched) and zeros
        written at unaligned edges (a page they leave all zeros is punched too). True when the
        whole cluster is a hole now: the caller may free it."""
        self._need_writable()
        self._sync()
        self._changing()
        base = phys * self.cluster
        start, end = offset, offset + length
        first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if first < last:
            punch_hole(self.fd, base + first, last - first)
        for lo, hi in ((start, first), (last, end)) if first < last else ((start, end),):
            while lo < hi:  # at most two partial pages per edge
                page = lo // PAGE * PAGE
                upto = min(hi, page + PAGE)
                buf = bytearray(self.read(phys, page, PAGE))
                buf[lo - page:upto - page] = bytes(upto - lo)
                if buf.count(0) == PAGE:
                    punch_hole(self.fd, base + page, PAGE)
                else:
                    self.write(phys, lo, bytes(upto - lo))
                lo = upto
        return self.is_hole(phys)

    def _release(self, p: int) -> None:
        if p in self._fresh:  # never on disk in any BAT entry: reusable at once
            self._fresh.discard(p)
            _insort(self._free, p)
        else:
            self._freed.append(p)

    def commit(self) -> None:
        """Make pending mappings durable: data first, then the BAT entries."""
        try:
            self._sync()
        except OSError:
            self._lost = None  # reported here
            raise
        if self._lost is not None:
            lost, self._lost = self._lost, None
            raise lost
        if not self._pending:
            if self.writable and self.fd >= 0:
                os.fdatasync(self.fd)
            return
        os.fdatasync(self.fd)
        for vc, p in self._pending.items():
            self.bat[vc] = p
        self._write_bat_entries(sorted(self._pending))
        os.fdatasync(self.fd)
        self._pending.clear()
        self._fresh.clear()
        for p in self._freed:
            _insort(self._free, p)
        self._freed.clear()

    def _write_bat_entries(self, vcs: list[int]) -> None:
        # Whole 4 KiB pages of the BAT around the changed entries, a run of pages per write.
        page = 4096
        pages = sorted({(HEADER_SIZE + vc * BAT_ENTRY) // page for vc in vcs})
        raw = memoryview(self.bat).cast("B")
        run: list[int] = []
        for pg in pages + [None]:
            if run and (pg is None or pg != run[-1] + 1):
                start = max(run[0] * page, HEADER_SIZE)
                end = min((run[-1] + 1) * page, HEADER_SIZE + len(raw))
                os.pwrite(self.fd, raw[start - HEADER_SIZE:end - HEADER_SIZE], start)
                run = []
            if pg is not None:
                run.append(pg)

    def set_in_use(self, in_use: bool) -> None:
        """The header's in-use marker: set while a writer has the delta, cleared on a clean close."""
        self._need_writable()
        self.commit()
        self.header = Header(self.header.cluster, self.header.entries, self.header.size, self.header.first_block,
                             in_use, self.header.flags)
        os.pwrite(self.fd, self.header.pack(), 0)
        os.fdatasync(self.fd)

    # -- size and layout ---------------------------------------------------------------------
    def resize(self, size: int) -> None:
        """Change the virtual size. Growing past the BAT region's room first moves the data
        clusters in the way to the end of the file; shrinking unmaps the clusters past the end."""
        self._need_writable()
        self._changing()
        cluster = self.cluster
        entries = -(-size // cluster)
        new_header(size, cluster)  # checks the geometry
        self.commit()
        if size < self.header.size:
            for vc in range(entries, self.header.entries):
                if self.physical(vc):
                    self.unmap(vc)
            # The part of the new last cluster past the end must read as zeros if the disk
            # grows again (it held data: a cut to 35694080 then a grow showed the old bytes).
            tail = size % cluster
            p = self.physical(entries - 1)
            if tail and p:
                self.write(p, tail, bytes(cluster - tail))
            self.commit()
            self._write_header(Header(cluster, entries, size, self.header.first_block, self.header.in_use,
                                      self.header.flags))
            del self.bat[entries:]
            return
        first_block = self.header.first_block
        if entries > capacity(cluster, first_block):
            first_block = bat_region(cluster, entries)
            self._evacuate(first_block // cluster)
        # The file must reach the first data block before the header says where it is (an
        # image with no data clusters in the way is shorter than the grown BAT region).
        if os.fstat(self.fd).st_size < first_block:
            os.ftruncate(self.fd, first_block)
            self.file_clusters = max(self.file_clusters, first_block // cluster)
        # New entries start zeroed on disk before the header says they exist.
        extra = entries - self.header.entries
        if extra:
            os.pwrite(self.fd, bytes(extra * BAT_ENTRY), HEADER_SIZE + self.header.entries * BAT_ENTRY)
            os.fdatasync(self.fd)
        self._write_header(Header(cluster, entries, size, first_block, self.header.in_use, self.header.flags))
        self.bat.extend([0] * extra)

    def _evacuate(self, first_cluster: int) -> None:
        """Move every data cluster below ``first_cluster`` past it (the BAT grows there)."""
        self._free = [p for p in self._free if p >= first_cluster]
        self.file_clusters = max(self.file_clusters, first_cluster)
        for vc in range(len(self.bat)):
            p = self.physical(vc)
            if p and p < first_cluster:
                q = self.take_cluster()
                self.write(q, 0, self.read(p, 0, self.cluster))
                self._map(vc, q)
                self._fresh.add(q)
                # p is not freed: it becomes part of the BAT region
        self.commit()

    def _write_header(self, header: Header) -> None:
        self.header = header
        os.pwrite(self.fd, header.pack(), 0)
        os.fdatasync(self.fd)

    def move(self, vc: int, to: int) -> None:
        """Copy ``vc``'s data to free physical cluster ``to`` and map it there (pending).
        Only its data is copied: the holes discards left stay holes."""
        old = self.physical(vc)
        self._free.remove(to)
        view = memoryview(self.read(old, 0, self.cluster))
        self._clear(to, True)
        for start, end in _data_runs(view):
            self.write(to, start, view[start:end])
        self._map(vc, to)
        self._fresh.add(to)
        self._release(old)

    def truncate_tail(self) -> int:
        """Cut the file after its last used cluster; returns the bytes released. Call after a
        commit (pending clusters are kept)."""
        self._sync()
        self._changing()
        used = [p for p in (self.physical(vc) for vc in range(len(self.bat))) if p]
        last = max(used, default=self.header.first_cluster - 1) + 1
        last = max(last, self.header.first_cluster)
        if last >= self.file_clusters:
            return 0
        before = os.fstat(self.fd).st_size
        os.ftruncate(self.fd, last * self.cluster)
        os.fsync(self.fd)
        self.file_clusters = last
        self._free = [p for p in self._free if p < last]
        self._freed = [p for p in self._freed if p < last]
        return before - last * self.cluster


def _data_runs(view: memoryview) -> list[tuple[int, int]]:
    """(start, end) runs of the 4 KiB pages of ``view`` that are not all zeros."""
    runs: list[tuple[int, int]] = []
    start = -1
    n = len(view)
    for at in range(0, n, PAGE):
        page = bytes(view[at:at + PAGE])
        if page == _ZEROS[:len(page)]:
            if start >= 0:
                runs.append((start, at))
                start = -1
        elif start < 0:
            start = at
    if start >= 0:
        runs.append((start, n))
    return runs


def _insort(xs: list[int], x: int) -> None:
    import bisect

    bisect.insort(xs, x)
