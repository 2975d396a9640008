"""Image operations on an image directory or an open :class:`~.stack.Stack`.

The same functions serve a detached image (the CLI opens the stack itself) and an attached one
(the exporter, which owns the open stack, calls them on a control request), so there is one
implementation of each operation. Every step that changes what is on disk is ordered so a crash
between any two steps leaves an image that opens and reads as before or after the operation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ..errors import ImageError
from . import descriptor as dd
from .delta import Delta, fsync_dir
from .descriptor import Descriptor, Shot
from .format import DEFAULT_CLUSTER, SECTOR
from .progress import ProgressFn
from .stack import Stack

ROOT_FILE = "root.hds"


def descriptor_path(directory: str) -> str:
    return os.path.join(directory, dd.NAME)


def create_empty(directory: str, size: int, cluster: int = DEFAULT_CLUSTER, *,
                 reserve: int | None = None) -> Descriptor:
    """A new image of one empty delta. ``directory`` must not exist or be empty."""
    size = -(-size // SECTOR) * SECTOR
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        raise ImageError("image directory is not empty", file=directory)
    Delta.create(os.path.join(directory, ROOT_FILE), size, cluster, reserve=reserve).close()
    guid = dd.new_guid()
    desc = Descriptor(size, cluster, (Shot(guid, dd.ROOT_PARENT, ROOT_FILE, None, time.time()),), guid)
    dd.save(descriptor_path(directory), desc)
    return desc


def import_raw(stack: Stack, raw: str) -> int:
    """Copy the data extents of a (sparse) raw disk file into the stack; returns clusters copied."""
    c = stack.cluster
    copied = 0
    fd = os.open(raw, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no data past pos
                break
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
            first, last = data_at // c, -(-hole_at // c)
            for vc in range(first, last):
                chunk = os.pread(fd, c, vc * c)
                if chunk.count(0) != len(chunk):
                    stack.write(vc * c, chunk + bytes(c - len(chunk)) if len(chunk) < c else chunk)
                    copied += 1
            pos = last * c
        stack.flush()
    finally:
        os.close(fd)
    return copied


# ext4 for a thin image: keep allocations close together so the image does not swell (see
# docs/images.md "Swelling"): one flex group spanning many block groups packs metadata at the
# start, inode tables are initialised now (zeros: they cost the image nothing) instead of by
# the kernel's lazy-init thread later, a 1 MiB cluster-aligned stripe, and 4 KiB blocks even
# on small disks (mkfs would pick 1 KiB, which limits online growth).
MKFS_PROFILES = {
    "default": [],
    "thin": ["-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard,stride=256,stripe_width=256",
             "-G", "4096"],
}
# "thin" with a 16 MiB journal: the journal is written round and round, so all of it ends up
# allocated in the image (df does not count it) and sets the df ratio's floor; mke2fs gives 32 MiB
# to 1 GiB, 64 MiB to 2-16 GiB, up to 1 GiB. Not the default: what a smaller journal costs in
# metadata throughput is not measured yet (docs/thin.md, "The allocator study").
MKFS_PROFILES["thin-lean"] = [*MKFS_PROFILES["thin"], "-J", "size=16"]

_EXT4_BLOCK = 4096
_EXT4_BLOCKS_PER_GROUP = 8 * _EXT4_BLOCK
_EXT4_DESCS_PER_BLOCK = _EXT4_BLOCK // 64  # 64bit descriptors
_EXT4_MAX_RESERVED_GDT = _EXT4_BLOCK // 4  # mke2fs's cap: the resize inode's one indirect block


def aligned_resize(size: int, cluster: int) -> int | None:
    """The ``-E resize=`` (in 4 KiB blocks) that makes each superblock copy, group descriptors
    and reserved GDT blocks end on a cluster boundary, or None to keep mke2fs's reserve.

    Every backup superblock group starts cluster-aligned, and mke2fs's reserve (growth to 1024x)
    makes the copy 257 blocks on a 2 GiB disk: its last block holds a cluster of its own that only
    file data can fill, and once churn frees that data no repack can empty it (metadata does not
    move). Such clusters were a sixth of a churned 2 GiB VE's slack past 1.0 fragmentation
    (docs/thin.md, "Repack"). Rounding the reserve down to the cluster costs a few groups of
    online growth; where that would take more than half of it, the reserve stays.
    """
    per_cluster = cluster // _EXT4_BLOCK
    blocks = size // _EXT4_BLOCK
    if per_cluster <= 1 or blocks < _EXT4_BLOCKS_PER_GROUP:
        return None
    groups = -(-blocks // _EXT4_BLOCKS_PER_GROUP)
    desc = -(-groups // _EXT4_DESCS_PER_BLOCK)
    # mke2fs's default (calc_reserved_gdt_blocks): enough descriptors for 1024x, or 2^32 blocks.
    max_blocks = min(blocks * 1024, 2**32 - 1)
    reserve_groups = -(-max_blocks // _EXT4_BLOCKS_PER_GROUP)
    reserved = min(-(-reserve_groups // _EXT4_DESCS_PER_BLOCK) - desc, _EXT4_MAX_RESERVED_GDT)
    copy = 1 + desc + reserved
    want = copy // per_cluster * per_cluster - 1 - desc
    if copy % per_cluster == 0 or want < reserved // 2:
        return None
    # mke2fs turns resize= back into a reserve: ceil(ceil(resize / bpg) / gdpb) - desc.
    return (want + desc) * _EXT4_DESCS_PER_BLOCK * _EXT4_BLOCKS_PER_GROUP


def _with_aligned_resize(args: list[str], desc: Descriptor) -> list[str]:
    """``args`` with aligned_resize's reserve added to its ``-E`` (mke2fs keeps only the last
    ``-E``, so it joins the profile's; an ``-E`` in mkfs_args still replaces both)."""
    resize = aligned_resize(desc.size, desc.cluster)
    if resize is None or "-E" not in args:
        return list(args)
    i = args.index("-E") + 1
    return [*args[:i], f"{args[i]},resize={resize}", *args[i + 1:]]


def create(directory: str, size: int, *, cluster: int = DEFAULT_CLUSTER, fs: str | None = "ext4",
           profile: str = "thin", mkfs_args: tuple[str, ...] = (), reserve: int | None = None) -> Descriptor:
    """A new image, formatted with ``mkfs.ext4`` (``fs=None``: left blank).

    mkfs writes to a sparse raw file of the same size, whose data extents are then copied into
    the image: creating needs no FUSE and costs only what mkfs wrote.
    """
    if profile not in MKFS_PROFILES:
        raise ImageError(f"unknown mkfs profile {profile!r} (known: {', '.join(MKFS_PROFILES)})", field="profile")
    desc = create_empty(directory, size, cluster, reserve=reserve)
    if fs is None:
        return desc
    if fs != "ext4":
        raise ImageError(f"only ext4 is supported, not {fs!r}", field="fs")
    with tempfile.TemporaryDirectory(prefix="fsnd-mkfs-", dir=directory) as tmp:
        raw = os.path.join(tmp, "raw")
        with open(raw, "wb") as f:
            f.truncate(desc.size)
        cmd = ["mkfs.ext4", "-q", "-F", *_with_aligned_resize(MKFS_PROFILES[profile], desc), *mkfs_args, raw]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            raise ImageError(f"mkfs.ext4 failed: {r.stderr.strip() or r.returncode}", file=directory)
        with Stack.open(directory) as stack:
            import_raw(stack, raw)
    return desc


# -- snapshots ---------------------------------------------------------------------------------

def _delta_name(guid: str) -> str:
    return f"root.hds.{guid.strip('{}')}"


def snapshot(stack: Stack, directory: str, *, name: str | None = None) -> str:
    """Freeze the current top as a snapshot and stack a new empty writable delta over it;
    returns the snapshot's GUID (the delta that became read-only). O(1) in the image size:
    a header and an empty BAT are written, nothing is copied. The caller freezes the
    filesystem around it when the image is mounted."""
    desc = dd.load(descriptor_path(directory))
    if not stack.writable:
        raise ImageError("cannot snapshot a read-only image", file=directory)
    stack.flush()
    old_top = desc.by_guid(desc.top)
    guid = dd.new_guid()
    new_file = _delta_name(guid)
    new = Delta.create(os.path.join(directory, new_file), stack.size, stack.cluster)
    # Until the descriptor names the new delta, it is an unused file and the image is unchanged.
    shots = [Shot(s.guid, s.parent, s.file, name if s.guid == old_top.guid else s.name,
                  time.time() if s.guid == old_top.guid else s.created) for s in desc.shots]
    shots.append(Shot(guid, old_top.guid, new_file, None, time.time()))
    try:
        dd.save(descriptor_path(directory), desc.with_shots(shots, top=guid))
    except BaseException:
        new.close()
        os.unlink(new.path)
        raise
    # The old top is read-only from now on; keep it open for reads.
    old = stack.top
    old.commit()
    reopened = Delta.open(old.path, writable=False)
    old.close()
    stack.deltas[-1] = reopened
    stack.deltas.append(new)
    return old_top.guid


def grow_stack(stack: Stack, directory: str, size: int) -> None:
    """Grow the virtual disk (the caller then refreshes the loop device and runs resize2fs)."""
    size = -(-size // SECTOR) * SECTOR
    desc = dd.load(descriptor_path(directory))
    if size < desc.size:
        raise ImageError(f"{size} bytes is smaller than the disk's {desc.size}: use shrink", file=directory)
    stack.top.resize(size)
    dd.save(descriptor_path(directory), Descriptor(size, desc.cluster, desc.shots, desc.top))
    stack.size = size


def cut_stack(stack: Stack, directory: str, size: int) -> None:
    """Cut the virtual disk to ``size`` bytes (the filesystem must already fit: resize2fs)."""
    size = -(-size // SECTOR) * SECTOR
    desc = dd.load(descriptor_path(directory))
    if size > desc.size:
        raise ImageError("cut to a larger size: use grow", file=directory)
    if len(stack.deltas) > 1:
        raise ImageError("cannot shrink an image with snapshots (merge or delete them first)", file=directory)
    # The descriptor first: a crash after it leaves a top larger than the disk, which
    # `image check --repair` cuts to the descriptor's size (the data past it is never shown).
    dd.save(descriptor_path(directory), Descriptor(size, desc.cluster, desc.shots, desc.top))
    stack.size = size
    stack.top.resize(size)


@dataclass
class CompactResult:
    moved: int
    released: int  # bytes cut from the end of the file


def _moves(delta: Delta) -> int:
    """How many clusters a compaction would move now: the last ones into the first holes."""
    holes = delta._free
    owners = sorted((p for vc in range(len(delta.bat)) if (p := delta.physical(vc))), reverse=True)
    return sum(1 for p, h in zip(owners, holes, strict=False) if h < p)  # as many pairs as the shorter side has


def compact(delta: Delta, *, batch: int = 64, progress: ProgressFn | None = None) -> CompactResult:
    """Move the clusters at the end of the file into the holes discards left, then cut the
    file. In batches: copy, fdatasync, remap (commit); a crash keeps each cluster mapped to a
    complete copy. ``progress("compact", moved, to move)`` after each batch."""
    delta.commit()
    moved = 0
    total = _moves(delta) if progress is not None else 0
    while True:
        holes = list(delta._free)
        owners = sorted(((p, vc) for vc in range(len(delta.bat)) if (p := delta.physical(vc))), reverse=True)
        pairs = []
        for (p, vc), h in zip(owners, holes, strict=False):  # the shorter side ends the moves
            if h >= p:
                break
            pairs.append((vc, h))
            if len(pairs) >= batch:
                break
        if not pairs:
            break
        for vc, h in pairs:
            delta.move(vc, h)
        delta.commit()
        moved += len(pairs)
        if progress is not None:
            progress("compact", moved, max(total, moved))
    released = delta.truncate_tail()
    return CompactResult(moved, released)


def merge(directory: str, guid: str, *, stack: Stack | None = None, progress: ProgressFn | None = None) -> None:
    """Delete snapshot ``guid`` by merging its data into its child (the delta above it): each
    cluster the child does not have is copied up (its data pages only) or marked zero as the
    snapshot marks it, then the descriptor drops the snapshot, then its file is removed. Reads
    are the same at every step. ``progress("merge", clusters looked at, clusters)``."""
    path = descriptor_path(directory)
    desc = dd.load(path)
    if guid == desc.top:
        raise ImageError("the top delta is not a snapshot", file=path, field="GUID")
    try:
        shot = desc.by_guid(guid)
    except KeyError:
        raise ImageError(f"no snapshot {guid}", file=path, field="GUID") from None
    children = desc.children(guid)
    if len(children) != 1:
        raise ImageError(f"snapshot {guid} has {len(children)} children; merging needs exactly one",
                         file=path, field="GUID")
    child = children[0]
    own_child = None
    if stack is not None and child.guid == desc.top:
        target = stack.top
    else:
        own_child = target = Delta.open(os.path.join(directory, child.file), writable=True)
    try:
        with Delta.open(os.path.join(directory, shot.file)) as src:
            c = src.cluster
            n = 0
            base = shot.parent == dd.ROOT_PARENT  # zeros in the base hide nothing: no mark needed
            entries = min(len(src.bat), target.header.entries)
            for vc in range(entries):
                if progress is not None:
                    progress("merge", vc + 1, entries)
                if target.entry(vc):  # the child has data or zeros of its own there
                    continue
                p = src.physical(vc)
                if p:
                    target.allocate_sparse(vc, src.read(p, 0, c))
                elif src.zeroed(vc) and not base:
                    target.set_zero(vc)
                else:
                    continue
                n += 1
                if n % 64 == 0:
                    target.commit()
            target.commit()
        shots = [Shot(s.guid, shot.parent if s.guid == child.guid else s.parent, s.file, s.name, s.created)
                 for s in desc.shots if s.guid != guid]
        dd.save(path, desc.with_shots(shots))
    finally:
        if own_child is not None:
            own_child.close()
    if stack is not None:
        for i, d in enumerate(list(stack.deltas)):
            name = os.path.basename(d.path)
            if name == child.file and own_child is not None:  # its BAT in the stack is stale
                stack.deltas[i] = Delta.open(d.path)
                d.close()
        for i, d in enumerate(stack.deltas):
            if os.path.basename(d.path) == shot.file:
                d.close()
                del stack.deltas[i]
                break
    os.unlink(os.path.join(directory, shot.file))
    fsync_dir(path)
