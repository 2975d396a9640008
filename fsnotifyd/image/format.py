"""The ploop1 (v2) delta file layout: a 64-byte header, the BAT, then data clusters.

All little-endian. The header (``struct ploop_pvd_header``)::

    0   m_Sig[16]           "WithouFreSpacExt" (v2: sizes in 64-bit sectors, BAT in clusters)
    16  m_Type u32          2 (PRL_IMAGE_COMPRESSED: the only type ploop writes)
    20  m_Heads u32         16 (geometry, kept for compatibility)
    24  m_Cylinders u32     virtual size / (heads * cluster sectors), rounded up
    28  m_Sectors u32       cluster size in 512-byte sectors (2048 for 1 MiB)
    32  m_Size u32          number of BAT entries (virtual clusters)
    36  m_SizeInSectors u64 virtual size in sectors
    44  m_DiskInUse u32     0x746F6E59 while a writer has it open (a crash leaves it set)
    48  m_FirstBlockOffset u32  first data cluster, in sectors (the header + BAT, rounded up)
    52  m_Flags u32
    56  m_Reserved[8]

The BAT follows the header at byte 64: one u32 per virtual cluster, the physical cluster number
holding its data (offset = number * cluster size), 0 when the delta has no data for it (reads
fall through to the delta below), or ``ZERO_CLUSTER`` (all ones, fsnotifyd's extension): the
cluster reads as zeros and nothing below shows through. Physical clusters below ``first_block``
hold the header and BAT, so a valid entry is at least ``first_block_clusters``.

:func:`parse_header` and :func:`validate_bat` trust nothing in the file: every size is checked
against the others and the file's length before anything is allocated or indexed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ImageError

SIGNATURE = b"WithouFreSpacExt"
SECTOR = 512
HEADER = struct.Struct("<16sIIIIIQIII8s")
HEADER_SIZE = HEADER.size  # 64
IMAGE_TYPE = 2
HEADS = 16
IN_USE = 0x746F6E59  # "Ynot"
DEFAULT_CLUSTER = 1 << 20
MIN_CLUSTER = 4096  # one page: writes below it cannot be atomic on any host fs
MAX_CLUSTER = 64 << 20
MAX_VIRTUAL = 1 << 50  # 1 PiB: far past any VE; keeps offsets clear of 64-bit overflow
BAT_ENTRY = 4
MAX_ENTRIES = 0xFFFFFFFF  # m_Size, m_FirstBlockOffset (sectors) and BAT entries are u32
# fsnotifyd's extension: a BAT entry of all ones says "zeros here, do not look below" (a discard
# or a write of zeros over data a snapshot holds, recorded without a cluster). It can never be
# a cluster number: a delta holds at most 2^32-1 clusters, numbered 0 .. 2^32-2.
ZERO_CLUSTER = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Header:
    cluster: int  # bytes
    entries: int  # virtual clusters (BAT length)
    size: int  # virtual size in bytes (a multiple of the sector size)
    first_block: int  # byte offset of the first data cluster (multiple of the cluster)
    in_use: bool = False
    flags: int = 0

    @property
    def first_cluster(self) -> int:
        """The lowest physical cluster number a BAT entry may hold."""
        return self.first_block // self.cluster

    def pack(self) -> bytes:
        sectors = self.cluster // SECTOR
        cylinders = -(-self.size // (HEADS * self.cluster)) if self.size else 0
        return HEADER.pack(SIGNATURE, IMAGE_TYPE, HEADS, min(cylinders, 0xFFFFFFFF), sectors, self.entries,
                           self.size // SECTOR, IN_USE if self.in_use else 0, self.first_block // SECTOR,
                           self.flags, b"\0" * 8)


def bat_region(cluster: int, entries: int) -> int:
    """Bytes reserved for header + BAT: whole clusters."""
    need = HEADER_SIZE + entries * BAT_ENTRY
    return -(-need // cluster) * cluster


def capacity(cluster: int, first_block: int) -> int:
    """How many BAT entries fit in a header + BAT region of ``first_block`` bytes."""
    return (first_block - HEADER_SIZE) // BAT_ENTRY


def new_header(size: int, cluster: int = DEFAULT_CLUSTER, *, reserve: int | None = None) -> Header:
    """A header for a virtual disk of ``size`` bytes; ``reserve`` (bytes of virtual size) sizes
    the BAT region for growing later without moving data."""
    check_geometry(size, cluster)
    entries = -(-size // cluster)
    room = max(entries, -(-(reserve or 0) // cluster))
    if room > MAX_ENTRIES or bat_region(cluster, room) // SECTOR > MAX_ENTRIES:
        raise ImageError(f"{room} BAT entries of {cluster}-byte clusters do not fit the u32 header fields",
                         field="m_Size")
    return Header(cluster=cluster, entries=entries, size=size, first_block=bat_region(cluster, room))


def check_geometry(size: int, cluster: int, *, file: str | None = None) -> None:
    if cluster < MIN_CLUSTER or cluster > MAX_CLUSTER or cluster & (cluster - 1):
        raise ImageError(f"cluster size {cluster} is not a power of two between {MIN_CLUSTER} and {MAX_CLUSTER}",
                         file=file, field="m_Sectors")
    if size <= 0 or size % SECTOR or size > MAX_VIRTUAL:
        raise ImageError(f"virtual size {size} is not a positive multiple of {SECTOR} up to {MAX_VIRTUAL}",
                         file=file, field="m_SizeInSectors")


def parse_header(raw: bytes, file_size: int, *, file: str | None = None) -> Header:
    """The header of a delta file whose first bytes are ``raw`` and whose length is
    ``file_size``; every field is checked against the others and the file's length."""
    if len(raw) < HEADER_SIZE:
        raise ImageError(f"truncated header: {len(raw)} of {HEADER_SIZE} bytes", file=file)
    sig, typ, _heads, _cyl, sectors, entries, size_sectors, in_use, first_sectors, flags, _ = HEADER.unpack_from(raw)
    if sig != SIGNATURE:
        raise ImageError(f"not a ploop v2 delta: signature {sig!r}", file=file, field="m_Sig")
    if typ != IMAGE_TYPE:
        raise ImageError(f"unsupported image type {typ} (only {IMAGE_TYPE})", file=file, field="m_Type")
    cluster = sectors * SECTOR
    if sectors == 0 or cluster < MIN_CLUSTER or cluster > MAX_CLUSTER or cluster & (cluster - 1):
        raise ImageError(f"cluster size of {sectors} sectors is not a power of two of "
                         f"{MIN_CLUSTER // SECTOR}..{MAX_CLUSTER // SECTOR} sectors", file=file, field="m_Sectors")
    size = size_sectors * SECTOR
    if size_sectors == 0 or size > MAX_VIRTUAL:
        raise ImageError(f"virtual size of {size_sectors} sectors is zero or past {MAX_VIRTUAL} bytes",
                         file=file, field="m_SizeInSectors")
    if entries != -(-size // cluster):
        raise ImageError(f"{entries} BAT entries for a virtual size of {size} bytes in {cluster}-byte clusters "
                         f"(expected {-(-size // cluster)})", file=file, field="m_Size")
    first_block = first_sectors * SECTOR
    if first_block % cluster or first_block < bat_region(cluster, entries):
        raise ImageError(f"first data block at {first_block} bytes: not a cluster boundary at or past the BAT "
                         f"({bat_region(cluster, entries)} bytes)", file=file, field="m_FirstBlockOffset")
    if first_block > file_size:
        raise ImageError(f"truncated: the header and BAT need {first_block} bytes, the file has {file_size}",
                         file=file, field="m_FirstBlockOffset")
    if in_use not in (0, IN_USE):
        raise ImageError(f"in-use marker {in_use:#x} is neither 0 nor {IN_USE:#x}", file=file, field="m_DiskInUse")
    return Header(cluster=cluster, entries=entries, size=size, first_block=first_block,
                  in_use=in_use == IN_USE, flags=flags)


@dataclass(frozen=True, slots=True)
class BatProblem:
    index: int  # virtual cluster
    physical: int
    problem: str  # "past-end" | "in-header" | "duplicate"
    other: int | None = None  # the first virtual cluster that holds the same physical one

    def __str__(self) -> str:
        if self.problem == "past-end":
            return f"bat[{self.index}] = {self.physical}: past the end of the file"
        if self.problem == "in-header":
            return f"bat[{self.index}] = {self.physical}: inside the header and BAT"
        return f"bat[{self.index}] = {self.physical}: the same physical cluster as bat[{self.other}]"


def validate_bat(bat: Sequence[int], header: Header, file_size: int) -> list[BatProblem]:
    """Every entry that cannot be right: past the end of the file (a cluster partly past the
    end counts), inside the header and BAT, or a physical cluster used twice."""
    problems: list[BatProblem] = []
    first = header.first_cluster
    # A cluster whose end is past the file is as bad as one past it (reads would come short).
    end = file_size // header.cluster
    seen: dict[int, int] = {}
    for i, p in enumerate(bat):
        if p == 0 or p == ZERO_CLUSTER:
            continue
        if p < first:
            problems.append(BatProblem(i, p, "in-header"))
        elif p >= end:
            problems.append(BatProblem(i, p, "past-end"))
        elif p in seen:
            problems.append(BatProblem(i, p, "duplicate", seen[p]))
        else:
            seen[p] = i
    return problems
