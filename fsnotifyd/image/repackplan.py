"""The repack planner: from who owns each block, which image clusters to empty and how.

Pure: its input is the filesystem's map in blocks (what GETFSMAP says is in use, and the file
extents FIEMAP gave, each with the reason its file cannot move, if any), its output the
victim clusters with the file pieces to move out of them, and the wholly free clusters donors
may take. :mod:`.repack` reads the map and carries the plan out.

A cluster is image-cluster-sized and cluster-aligned (the filesystem starts at disk offset
0). A *victim* is a holding cluster whose every in-use block belongs to a movable file
extent; a cluster with any other in-use block (static metadata, a directory, an extent-tree
block, the journal, a file that cannot move) is skipped, counted under the first reason met.
Victims are taken least-used first: each empties one cluster for its used fraction of a donor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

# Reasons a block cannot move (the keys of ``skipped``).
METADATA = "metadata"  # superblock, group descriptors, bitmaps, inode tables
UNKNOWN = "unknown"  # in use, owned by no file we mapped: extent-tree blocks, the journal, xattrs
DIRECTORY = "directory"
INLINE = "inline"
IMMUTABLE = "immutable"  # immutable or append-only
SWAP = "swap"
BALLOON = "balloon"
DONOR = "donor"  # a donor of a run in progress (or left by a crash, removed before mapping)
NOT_EXTENT = "not_extent"  # block-mapped (ext3-style) file: MOVE_EXT takes extent files only
JOURNAL_DATA = "journal_data"
VERITY = "verity"
CHANGED = "changed"  # the file changed between mapping and moving (counted in files)
PAST_EOF = "past_eof"  # blocks preallocated past the end of the file: MOVE_EXT stops at i_size


@dataclass(frozen=True, slots=True)
class Used:
    """Blocks GETFSMAP marks in use: ``metadata`` (a static kind) or not (any file's)."""

    start: int  # block
    length: int
    metadata: bool = False


@dataclass(frozen=True, slots=True)
class FileExtent:
    ino: int
    logical: int  # block in the file
    physical: int  # block on the device
    length: int
    reason: str | None = None  # why it cannot move; None: movable


@dataclass(frozen=True, slots=True)
class Piece:
    """A movable file extent, clipped to one victim cluster."""

    ino: int
    logical: int
    physical: int
    length: int


@dataclass
class Victim:
    cluster: int
    used: int  # blocks in use
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class Plan:
    cluster_blocks: int
    victims: list[Victim]  # in the order they are to be emptied
    free: list[int]  # wholly free clusters a donor may take (ascending)
    skipped: Counter[str]  # holding clusters left alone, by reason
    holding: int  # holding clusters in the map

    @property
    def blocks_to_move(self) -> int:
        return sum(v.used for v in self.victims)

    @property
    def donors_needed(self) -> int:
        return -(-self.blocks_to_move // self.cluster_blocks)

    @property
    def clusters_to_free(self) -> int:
        """Holding clusters fewer after the plan: victims emptied, less the donors filled."""
        return len(self.victims) - self.donors_needed

    def summary(self, block_size: int) -> dict[str, object]:
        return {"victims": len(self.victims), "donors": self.donors_needed,
                "clusters_to_free": self.clusters_to_free, "bytes_to_move": self.blocks_to_move * block_size,
                "free_clusters": len(self.free), "holding": self.holding, "skipped": dict(self.skipped)}


def _clip(start: int, length: int, cpb: int) -> Iterable[tuple[int, int, int]]:
    """(cluster, start, length) of each cluster's part of [start, start + length)."""
    end = start + length
    while start < end:
        c = start // cpb
        stop = min(end, (c + 1) * cpb)
        yield c, start, stop - start
        start = stop


def plan(used: Iterable[Used], files: Iterable[FileExtent], *, cluster_blocks: int, total_blocks: int,
         above: int | None = None, below: int | None = None, max_fill: float = 1.0,
         capacity: int | None = None) -> Plan:
    """What to move.

    - Repack (``above`` None): victims are the partly used clusters (fill under ``max_fill``)
      whose blocks all move, least-used first, as many as the free clusters (``capacity``
      when given) can take.
    - Evacuation for an online shrink (``above`` = the first cluster of the region to empty):
      every holding cluster from ``above`` on whose blocks all move, full or not.

    Donors may take the wholly free clusters below ``below`` (None: anywhere; a shrink passes
    ``above``). The last cluster, when the filesystem ends inside it, is never free.
    """
    cpb = cluster_blocks
    in_use: Counter[int] = Counter()
    meta: set[int] = set()
    for u in used:
        for c, _s, n in _clip(u.start, u.length, cpb):
            in_use[c] += n
            if u.metadata:
                meta.add(c)
    movable: Counter[int] = Counter()
    pieces: dict[int, list[Piece]] = {}
    blocked: dict[int, str] = {}
    for f in files:
        for c, s, n in _clip(f.physical, f.length, cpb):
            if f.reason is not None:
                blocked.setdefault(c, f.reason)
                continue
            movable[c] += n
            pieces.setdefault(c, []).append(Piece(f.ino, f.logical + (s - f.physical), s, n))
    skipped: Counter[str] = Counter()
    candidates: list[Victim] = []
    for c, n in in_use.items():
        if above is None and n >= cpb * max_fill:
            continue  # full enough: moving it gains nothing worth its I/O
        if above is not None and c < above:
            continue
        if movable[c] < n:  # some block in use is not a movable file's
            skipped[blocked.get(c) or (METADATA if c in meta else UNKNOWN)] += 1
            continue
        candidates.append(Victim(c, n, sorted(pieces[c], key=lambda p: p.physical)))
    limit = total_blocks // cpb if below is None else min(below, total_blocks // cpb)
    free = [c for c in range(limit) if in_use[c] == 0]
    candidates.sort(key=lambda v: (v.used, v.cluster))
    room = (len(free) if capacity is None else min(capacity, len(free))) * cpb
    victims: list[Victim] = []
    for v in candidates:
        if v.used > room:
            skipped["no_room"] += 1
            continue
        room -= v.used
        victims.append(v)
    if above is None:
        # Only as many as pay: k victims fill ceil(used / cluster) donors, so the clusters freed
        # are k less that; a last victim that would only refill its own donor is left alone.
        best, best_k, blocks = 0, 0, 0
        for k, v in enumerate(victims, 1):
            blocks += v.used
            if k - -(-blocks // cpb) > best:
                best, best_k = k - -(-blocks // cpb), k
        if best_k < len(victims):
            skipped["not_worth_it"] += len(victims) - best_k
        victims = victims[:best_k]
    return Plan(cpb, victims, free, skipped, len(in_use))


def batches(victims: list[Victim], cluster_blocks: int, donors: int) -> list[list[Victim]]:
    """Victims grouped so that each group fits ``donors`` donor clusters."""
    out: list[list[Victim]] = []
    cur: list[Victim] = []
    room = donors * cluster_blocks
    for v in victims:
        if cur and v.used > room:
            out.append(cur)
            cur, room = [], donors * cluster_blocks
        cur.append(v)
        room -= v.used
    if cur:
        out.append(cur)
    return out


def pack(pieces: Iterable[Piece], slots: list[tuple[int, int]]) -> list[tuple[Piece, int, int]]:
    """Where each piece goes: (piece part, donor block, length), the pieces in file order (a
    file's pieces land side by side) split where a donor slot ((first block in the donor file,
    blocks)) is full. Pieces that do not fit are left out."""
    out: list[tuple[Piece, int, int]] = []
    it = iter(slots)
    pos = end = 0
    for p in sorted(pieces, key=lambda p: (p.ino, p.logical)):
        logical, physical, left = p.logical, p.physical, p.length
        while left:
            if pos == end:
                slot = next(it, None)
                if slot is None:
                    return out
                pos, end = slot[0], slot[0] + slot[1]
            n = min(left, end - pos)
            out.append((Piece(p.ino, logical, physical, n), pos, n))
            pos += n
            logical += n
            physical += n
            left -= n
    return out


def tail(moves: list[tuple[Piece, int, int]], slots: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The unfilled end (donor block, blocks) of the last slot ``pack`` put anything in, or None
    when it is full. Kept for the next batch, it fills that cluster: each batch releasing a
    half-filled last donor left one such cluster per batch, a few clusters' worth of slack per
    pass on a churned 2 GiB VE."""
    if not moves:
        return None
    _, block, n = moves[-1]
    end = block + n
    for start, length in slots:
        if start <= block < start + length:
            return (end, start + length - end) if end < start + length else None
    return None
