"""Repack: move a running VE's live data out of partly used image clusters so they become free.

On a mounted ext4 on an attached image, with the VE running:

1. **Map** (:func:`read_map`): ``syncfs``, GETFSMAP for what is in use (static metadata by
   kind, everything else "unknown"), FIEMAP of every regular file and directory (walking the
   mount with ``os.scandir``, no symlinks followed, no mount crossed) for who owns it, and
   ``FS_IOC_GETFLAGS`` for what cannot move (immutable, append-only, inline, not
   extent-mapped, data journaling, verity), the swap files of ``/proc/swaps`` and the balloon.
2. **Plan** (:mod:`.repackplan`, pure): victims are holding clusters whose blocks all belong
   to movable file extents, least-used first; the rest is counted by reason.
3. **Move**, a batch at a time: a donor file in ``/.fsnotifyd-repack/`` gets one cluster per
   ``fallocate`` (:mod:`.placement` keeps only pieces FIEMAP shows filling exactly one wholly
   free cluster), the victims' pieces are moved into it with ``EXT4_IOC_MOVE_EXT`` (each
   file's pieces side by side, its mapping checked again just before), then the donor, which
   now holds the old scattered blocks, is unlinked and the journal committed (``syncfs``).
4. **Give back**: FITRIM of the whole filesystem (the emptied clusters are discarded whole),
   the exporter's flush, and an online compaction of the image.

Crash safety: ``EXT4_IOC_MOVE_EXT`` keeps a file's data whole at every instant (the kernel
copies, then swaps the mappings in one journaled step), so a crash anywhere loses nothing; what
it can leave is a donor, which the next run (and ``ve start``) deletes before anything else.
A run is idempotent: the next one maps afresh and finishes the work.

Refused outright, nothing moved: bigalloc, encryption, DAX, ``data=journal``; a filesystem
with no wholly free cluster for a donor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import ImageError
from ..mountinfo import read_mountinfo
from . import fiemap as fm
from . import fsmap, moveext, placement, thinness
from . import repackplan as rp
from .resize import BALLOON

log = structlog.get_logger("fsnotifyd.image.repack")

DONOR_DIR = ".fsnotifyd-repack"
FITRIM = (3 << 30) | (24 << 16) | (ord("X") << 8) | 121  # _IOWR('X', 121, struct fstrim_range)
MIB = 1 << 20
REFUSED_FEATURES = {"bigalloc": "bigalloc (clusters of blocks: EXT4_IOC_MOVE_EXT refuses them)",
                    "encrypt": "encryption (FIEMAP and moves of encrypted files are not supported)"}
REFUSED_OPTIONS = {"data=journal": "data=journal (EXT4_IOC_MOVE_EXT refuses journaled data)",
                   "dax": "DAX", "dax=always": "DAX"}


class RepackRefused(ImageError):
    """The filesystem cannot be repacked; nothing was moved."""


@dataclass
class Options:
    dry_run: bool = False
    budget_mib_s: float | None = None  # I/O rate limit of the moves
    max_seconds: float | None = None  # no move starts after this
    batch_clusters: int = 32  # donor clusters per donor file: the extra space a batch holds
    max_fill: float = 1.0  # clusters at least this full are left alone
    trim: bool = True
    compact: bool = True


@dataclass
class FsInfo:
    block_size: int
    blocks: int
    features: frozenset[str]
    options: frozenset[str]


@dataclass
class Map:
    used: list[rp.Used]
    files: list[rp.FileExtent]
    paths: dict[int, str]  # inode -> a path to it
    files_skipped: Counter[str] = field(default_factory=Counter)  # files left alone, by reason


# -- the filesystem ------------------------------------------------------------------------------

def _mount_options(mountpoint: str) -> frozenset[str]:
    mp = os.path.realpath(mountpoint)
    found: frozenset[str] | None = None
    for entry in read_mountinfo():
        if entry.mountpoint == mp:  # the last one is the one on top
            found = entry.mount_options | entry.super_options
            if entry.fstype != "ext4":
                raise RepackRefused(f"not ext4 but {entry.fstype}: repack moves ext4 extents only",
                                    file=mountpoint)
    if found is None:
        raise RepackRefused("not mounted: repack works on the running VE's filesystem", file=mountpoint)
    return found


def fs_info(mountpoint: str, device: str) -> FsInfo:
    r = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True)
    if r.returncode != 0:
        raise RepackRefused(f"dumpe2fs -h {device}: {(r.stderr or r.stdout).strip()[:300]}", file=device)
    fields = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    try:
        bs, blocks = int(fields["Block size"]), int(fields["Block count"])
    except (KeyError, ValueError):
        raise RepackRefused("cannot read the block size and count from the superblock", file=device) from None
    return FsInfo(bs, blocks, frozenset(fields.get("Filesystem features", "").split()), _mount_options(mountpoint))


def refusal(info: FsInfo) -> str | None:
    """Why this filesystem must not be repacked (None: it may)."""
    for feat, why in REFUSED_FEATURES.items():
        if feat in info.features:
            return f"the filesystem uses {why}"
    for opt, why in REFUSED_OPTIONS.items():
        if opt in info.options:
            return f"the filesystem is mounted with {why}"
    return None


def syncfs(path: str) -> None:
    thinness.syncfs(path)


def fitrim(mountpoint: str, start: int = 0, length: int = (1 << 64) - 1, minlen: int = 0) -> int:
    """Discard the free space of [start, start + length); returns the bytes the kernel trimmed."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(struct.pack("=QQQ", start, length, minlen))
        fcntl.ioctl(fd, FITRIM, buf)
        return struct.unpack("=QQQ", buf)[1]
    finally:
        os.close(fd)


def remove_donors(mountpoint: str) -> int:
    """Delete the donors a run left (a crash): they hold only blocks no file needs."""
    d = os.path.join(mountpoint, DONOR_DIR)
    n = 0
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, name))
            n += 1
    with contextlib.suppress(OSError):
        os.rmdir(d)
    if n:
        log.info("repack.donors_removed", mountpoint=mountpoint, donors=n)
    return n


def _swap_files() -> set[tuple[int, int]]:
    out = set()
    with contextlib.suppress(OSError):
        with open("/proc/swaps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) >= 2 and parts[1] == "file":
                    with contextlib.suppress(OSError):
                        st = os.stat(parts[0].replace("\\040", " "))
                        out.add((st.st_dev, st.st_ino))
    return out


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """The directories and regular files of the filesystem at ``root``: no symlink followed,
    no mount crossed."""
    top = os.lstat(root)
    yield root, top
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    yield e.path, st
                    stack.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    yield e.path, st


def _file_reason(path: str, st: os.stat_result, flags: int, root: str, swaps: set[tuple[int, int]]) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return rp.DIRECTORY
    rel = os.path.relpath(path, root)
    if rel == BALLOON:
        return rp.BALLOON
    if rel.split(os.sep, 1)[0] == DONOR_DIR:
        return rp.DONOR
    if (st.st_dev, st.st_ino) in swaps:
        return rp.SWAP
    if flags & (moveext.FS_IMMUTABLE_FL | moveext.FS_APPEND_FL):
        return rp.IMMUTABLE
    if flags & moveext.FS_INLINE_DATA_FL:
        return rp.INLINE
    if not flags & moveext.FS_EXTENT_FL:
        return rp.NOT_EXTENT
    if flags & moveext.FS_JOURNAL_DATA_FL:
        return rp.JOURNAL_DATA
    if flags & moveext.FS_VERITY_FL:
        return rp.VERITY
    return None


def read_map(mountpoint: str, block_size: int) -> Map:
    """Who owns each block of the filesystem (after a ``syncfs``: what is in the bitmaps)."""
    syncfs(mountpoint)
    used = [rp.Used(e.physical // block_size, -(-e.end // block_size) - e.physical // block_size, e.metadata)
            for e in fsmap.iter_extents(mountpoint) if not e.free]
    swaps = _swap_files()
    files: list[rp.FileExtent] = []
    paths: dict[int, str] = {}
    skipped: Counter[str] = Counter()
    for path, st in _walk(mountpoint):
        if st.st_ino in paths:
            continue  # another name of a file already mapped
        is_dir = stat.S_ISDIR(st.st_mode)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_NONBLOCK | os.O_CLOEXEC
                         | (os.O_DIRECTORY if is_dir else 0))
        except OSError:
            continue  # gone (or replaced by a symlink) since the scan: its blocks stay "unknown"
        try:
            if os.fstat(fd).st_ino != st.st_ino:
                continue
            try:
                flags = moveext.flags(fd)
            except OSError:
                flags = 0
            reason = _file_reason(path, st, flags, mountpoint, swaps)
            try:
                exts = fm.extents(fd)
            except OSError:
                continue
        finally:
            os.close(fd)
        if reason is None and any(e.inline for e in exts):
            reason = rp.INLINE
        if reason is None and any(e.encrypted for e in exts):
            reason = "encrypted"
        paths[st.st_ino] = path
        if reason is not None and not is_dir:
            skipped[reason] += 1
        for e in exts:
            if not e.placed or e.physical % block_size or e.logical % block_size:
                continue
            files.append(rp.FileExtent(st.st_ino, e.logical // block_size, e.physical // block_size,
                                       -(-e.length // block_size), reason))
    return Map(used, files, paths, skipped)


# -- moving ---------------------------------------------------------------------------------------

def _still_there(fd: int, part: rp.Piece, bs: int) -> bool:
    """Does the file still map ``part`` where the map saw it?"""
    for e in fm.extents(fd, part.logical * bs, part.length * bs):
        if not e.placed:
            return False
        if e.logical <= part.logical * bs and part.logical * bs + part.length * bs <= e.logical + e.length:
            return e.physical + (part.logical * bs - e.logical) == part.physical * bs
    return False


@dataclass
class _Run:
    opts: Options
    bs: int
    t0: float
    progress: Callable[[dict[str, Any]], None] | None
    moved_blocks: int = 0
    moved_files: set[int] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)
    timed_out: bool = False
    t_moves: float | None = None

    def out_of_time(self) -> bool:
        if self.opts.max_seconds is not None and time.monotonic() - self.t0 >= self.opts.max_seconds:
            self.timed_out = True
        return self.timed_out

    def throttle(self) -> None:
        if self.t_moves is None:
            self.t_moves = time.monotonic()
        if self.opts.budget_mib_s:
            due = self.moved_blocks * self.bs / (self.opts.budget_mib_s * MIB)
            late = due - (time.monotonic() - self.t_moves)
            if late > 0:
                time.sleep(late)


def _move_file(run: _Run, path: str, ino: int, parts: list[tuple[rp.Piece, int, int]], donor_fd: int) -> None:
    bs = run.bs
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NOATIME | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        run.skipped[rp.IMMUTABLE if e.errno == errno.EPERM else rp.CHANGED] += 1
        return
    try:
        st = os.fstat(fd)
        if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
            run.skipped[rp.CHANGED] += 1
            return
        if not all(_still_there(fd, p, bs) for p, _, _ in parts):
            run.skipped[rp.CHANGED] += 1
            return
        # Cached pages of the range make the kernel's move crawl (6.18, here: ~3 MiB/s against
        # ~100 without: it allocates and frees their buffer heads, retrying and forcing journal
        # commits while they are busy). Clean pages are dropped; dirty ones are the file's news.
        for part, _, n in parts:
            os.posix_fadvise(fd, part.logical * bs, n * bs, os.POSIX_FADV_DONTNEED)
        for part, donor_block, n in parts:
            if run.out_of_time():
                return
            try:
                got = moveext.move(fd, donor_fd, moveext.Move(part.logical, donor_block, n))
            except moveext.MoveError as e:
                run.moved_blocks += e.moved
                reason = {errno.ETXTBSY: rp.SWAP, errno.EPERM: rp.IMMUTABLE}.get(e.errno, rp.CHANGED)
                run.skipped[reason] += 1
                log.info("repack.move_refused", path=path, errno=errno.errorcode.get(e.errno, e.errno),
                         logical=part.logical, blocks=n)
                return
            run.moved_blocks += got
            if got:
                run.moved_files.add(ino)
            if got < n:  # past the end of the file (blocks preallocated beyond i_size)
                run.skipped[rp.PAST_EOF] += 1
                return
            run.throttle()
    finally:
        os.close(fd)


def _report(run: _Run, done: int, total: int) -> None:
    if run.progress is None:
        return
    secs = max(1e-6, time.monotonic() - run.t0)
    run.progress({"clusters_done": done, "clusters_total": total, "bytes_moved": run.moved_blocks * run.bs,
                  "seconds": secs, "mib_s": run.moved_blocks * run.bs / MIB / secs})


@dataclass
class _Donor:
    """The pass's donor file. Between batches it keeps only ``carry``, the unfilled end of the
    cluster the last batch filled last, which the next batch fills first."""

    fd: int
    path: str
    offset: int = 0  # file offset (bytes) of the next slot place() may use
    carry: tuple[int, int] | None = None  # (donor block, blocks)

    def release(self, keep: tuple[int, int] | None, bs: int) -> None:
        """Punch all but ``keep``: after the moves the donor holds the files' old blocks."""
        if keep is None:
            placement.punch(self.fd, 0, max(self.offset, bs))
        else:
            start, n = keep
            if start:
                placement.punch(self.fd, 0, start * bs)
            if (start + n) * bs < self.offset:
                placement.punch(self.fd, (start + n) * bs, self.offset - (start + n) * bs)
        self.carry = keep


def _open_donor(mountpoint: str) -> _Donor:
    ddir = os.path.join(mountpoint, DONOR_DIR)
    os.makedirs(ddir, mode=0o700, exist_ok=True)
    path = os.path.join(ddir, f"donor-{os.getpid()}")
    return _Donor(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path)


def _move_batch(run: _Run, mountpoint: str, m: Map, batch: list[rp.Victim], cluster: int,
                accept: Callable[[int], bool], donor: _Donor) -> int:
    """Place the donor clusters of one batch (the carried slot first), move its victims' pieces
    in, release all of the donor but the unfilled end of its last cluster. Returns the donor
    slots used (0: no room for a donor)."""
    bs, cpb = run.bs, cluster // run.bs
    moves: list[tuple[rp.Piece, int, int]] = []
    slots: list[tuple[int, int]] = [donor.carry] if donor.carry else []
    try:
        want = max(0, -(-(sum(v.used for v in batch) - sum(n for _, n in slots)) // cpb))
        if want:
            placed = placement.place(donor.fd, want, cluster, accept, offset=donor.offset,
                                     attempts=4 * want + 64)
            donor.offset = placed.next_offset
            slots += [(off // bs, cpb) for off, _ in placed.slots]
            log.info("repack.donors", wanted=want, placed=len(placed.slots), rejected=placed.rejected,
                     enospc=placed.enospc, carried=bool(donor.carry))
            if not placed.slots and not donor.carry:
                return 0
        moves = rp.pack([p for v in batch for p in v.pieces], slots)
        by_file: dict[int, list[tuple[rp.Piece, int, int]]] = {}
        for mv in moves:
            by_file.setdefault(mv[0].ino, []).append(mv)
        for ino, parts in by_file.items():
            if run.out_of_time():
                break
            _move_file(run, m.paths[ino], ino, parts, donor.fd)
        return len(slots)
    finally:
        donor.release(rp.tail(moves, slots) if not run.timed_out else None, bs)
        syncfs(mountpoint)  # committed: the freed blocks are free in the bitmaps (and reusable)


def _balloon_extents(mountpoint: str) -> list[tuple[int, int]]:
    try:
        fd = os.open(os.path.join(mountpoint, BALLOON), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        return [(p, n) for _, p, n in fm.fiemap(fd)]
    finally:
        os.close(fd)


def figures(att: Any, mountpoint: str) -> thinness.Figures:
    _flush(att)
    return thinness.measure_image(mountpoint, att.image, exclude=_balloon_extents(mountpoint))


def _flush(att: Any) -> None:
    from . import attach

    attach._ok(att, {"op": "flush"}, timeout=120)


@contextlib.contextmanager
def _one_at_a_time(att: Any) -> Iterator[None]:
    """One repack (or online shrink) per attachment: a second would delete the first's donors."""
    run_dir = os.path.dirname(os.path.dirname(att.fuse_dir))  # <run_dir>/fuse/<name>
    d = os.path.join(run_dir, "repack")
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, att.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepackRefused("another repack or online shrink of this image is running", file=att.image) from None
        yield
    finally:
        os.close(fd)


def run(att: Any, opts: Options, *, above: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        printer: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Repack the mounted filesystem of attachment ``att``. ``above`` (bytes, a cluster
    multiple): empty the region from there to the end instead, donors below it (online shrink).
    Returns the result dict: mode, clusters_freed, bytes_moved, seconds, moved_files, skipped
    (holding clusters left alone by reason; ``changed``/``past_eof``/... count files), before
    and after (:meth:`Figures.as_dict`), released (bytes the image's files gave back)."""
    with _one_at_a_time(att):
        return _run(att, opts, above=above, progress=progress, printer=printer)


def _run(att: Any, opts: Options, *, above: int | None,
         progress: Callable[[dict[str, Any]], None] | None,
         printer: Callable[[str], None] | None) -> dict[str, Any]:
    from . import attach

    t0 = time.monotonic()
    mp = att.mountpoint
    if not mp or not att.loop or not os.path.ismount(mp):
        raise RepackRefused("the image is not mounted: repack runs on the running VE's filesystem", file=att.image)
    info = fs_info(mp, att.loop)
    why = refusal(info)
    if why:
        raise RepackRefused(f"not repacked: {why}; nothing moved", file=att.image)
    cluster = thinness.image_side(att.image)[0]
    bs = info.block_size
    if cluster % bs or cluster < bs:
        raise RepackRefused(f"image cluster {cluster} is not a multiple of the block size {bs}", file=att.image)
    cpb = cluster // bs
    remove_donors(mp)
    before = figures(att, mp)
    on_host_before = before.image_bytes
    m = read_map(mp, bs)
    first = None if above is None else above // cluster
    pl = rp.plan(m.used, m.files, cluster_blocks=cpb, total_blocks=info.blocks, above=first, below=first,
                 max_fill=opts.max_fill)
    run_ = _Run(opts, bs, t0, progress)
    run_.skipped.update(pl.skipped)
    if opts.dry_run:
        summary = pl.summary(bs)
        if printer is not None:
            printer(_plan_text(summary, m.files_skipped, cluster))
        return {"mode": "repack", "dry_run": True, "plan": summary, "files_skipped": dict(m.files_skipped),
                "clusters_freed": 0, "bytes_moved": 0, "seconds": round(time.monotonic() - t0, 3),
                "moved_files": 0, "skipped": dict(pl.skipped), "before": before.as_dict(),
                "after": before.as_dict(), "released": 0}
    if not pl.free and (pl.victims or pl.skipped.get("no_room")):
        raise RepackRefused("the filesystem is too full for a donor: no wholly free cluster"
                            + ("" if first is None else " below the target size") + "; nothing moved",
                            file=att.image)
    log.info("repack.plan", mountpoint=mp, **{k: v for k, v in pl.summary(bs).items() if k != "skipped"},
             skipped=dict(pl.skipped))

    def accept(c: int) -> bool:
        return first is None or c < first

    done = 0
    total = len(pl.victims)
    donor = _open_donor(mp) if pl.victims else None
    try:
        for i, batch in enumerate(rp.batches(pl.victims, cpb, opts.batch_clusters)):
            if run_.out_of_time() or donor is None:
                break
            placed = _move_batch(run_, mp, m, batch, cluster, accept, donor)
            if not placed:
                if i == 0:
                    raise RepackRefused("the filesystem is too full for a donor: no fallocated cluster landed "
                                        "in a wholly free cluster"
                                        + ("" if first is None else " below the target size")
                                        + "; nothing moved", file=att.image)
                run_.skipped["no_donor"] += sum(1 for _ in batch)
                break
            done += len(batch)
            _report(run_, done, total)
    finally:
        if donor is not None:
            os.close(donor.fd)
            os.unlink(donor.path)  # with it the carried end of the last cluster
        # A refusal or a failed move must not leave the donors' directory in the VE's tree.
        remove_donors(mp)
    # What the moves emptied, from the bitmaps after the last commit.
    attempted = {v.cluster for v in pl.victims}
    syncfs(mp)
    still: set[int] = set()
    for e in fsmap.iter_extents(mp):
        if not e.free:
            still.update(c for c in range(e.physical // cluster, -(-e.end // cluster)) if c in attempted)
    freed = len(attempted - still) if run_.moved_blocks else 0
    if opts.trim:
        fitrim(mp)
    _flush(att)
    if opts.compact:
        attach.compact(att)
    after = figures(att, mp)
    result = {"mode": "repack", "clusters_freed": freed, "bytes_moved": run_.moved_blocks * bs,
              "seconds": round(time.monotonic() - t0, 3), "moved_files": len(run_.moved_files),
              "skipped": dict(run_.skipped), "before": before.as_dict(), "after": after.as_dict(),
              "released": max(0, on_host_before - after.image_bytes)}
    if run_.timed_out:
        result["stopped"] = "max_seconds"
    log.info("repack.done", mountpoint=mp, clusters_freed=freed, bytes_moved=result["bytes_moved"],
             seconds=result["seconds"], fragmentation_before=before.fragmentation,
             fragmentation_after=after.fragmentation)
    return result


def _plan_text(summary: dict[str, Any], files_skipped: Counter[str], cluster: int) -> str:
    lines = [f"plan: empty {summary['victims']} clusters into {summary['donors']} donor clusters "
             f"({summary['clusters_to_free']} clusters of {cluster // 1024} KiB freed), "
             f"{summary['bytes_to_move'] / MIB:.1f} MiB to move; {summary['free_clusters']} wholly free clusters, "
             f"{summary['holding']} holding"]
    skipped = summary["skipped"]
    if skipped:
        lines.append("clusters skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if files_skipped:
        lines.append("files that cannot move: " + ", ".join(f"{k}={v}" for k, v in sorted(files_skipped.items())))
    return "\n".join(lines)


def shrink_online(att: Any, size: int, opts: Options, *,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  printer: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Shrink the running VE's filesystem to ``size`` bytes online, giving the space back to
    the host: the data above ``size`` is repacked into donors below it, the balloon is laid
    over what is then free above (whole clusters, checked with FIEMAP), its extents are
    discarded and the image is compacted. The VE then has ``size`` bytes (less what could not
    leave the region: directories, metadata) and the image holds nothing above it."""
    with _one_at_a_time(att):
        return _shrink_online(att, size, opts, progress=progress, printer=printer)


def _shrink_online(att: Any, size: int, opts: Options, *, progress: Callable[[dict[str, Any]], None] | None,
                   printer: Callable[[str], None] | None) -> dict[str, Any]:
    from . import attach, resize

    mp = att.mountpoint
    if not mp or not att.loop or not os.path.ismount(mp):
        raise RepackRefused("the image is not mounted: an online shrink runs on the running VE", file=att.image)
    info = fs_info(mp, att.loop)
    cluster = thinness.image_side(att.image)[0]
    target = -(-size // cluster) * cluster
    fs_bytes = info.blocks * info.block_size
    if target >= fs_bytes:
        raise RepackRefused(f"the filesystem is {fs_bytes} bytes: nothing above {target} to give back",
                            file=att.image)
    used = thinness.df_used(mp) - resize.balloon_size(mp)
    if not opts.dry_run:
        resize.deflate(mp)  # an older balloon moves out of the way: it is laid again below
        syncfs(mp)
    if used > target * 0.95:
        raise RepackRefused(f"the data ({used >> 20} MiB in use) does not fit in {target >> 20} MiB with 5 % to "
                            f"spare; nothing moved", file=att.image)
    t0 = time.monotonic()
    on_host_before = thinness.image_side(att.image)[2]
    first = target // cluster
    total = info.blocks * info.block_size // cluster
    want = (fs_bytes - target) // cluster
    if not opts.dry_run:
        # The balloon takes the wholly free clusters above the target first: the donors can then
        # only land below it (the allocator cannot be told where to go).
        free_above = _free_clusters(mp, cluster, first, total)
        want -= resize.lay(mp, cluster, min(free_above, want), lambda c: c >= first, attempts=total + 64)
    moved = _run(att, _replace(opts, trim=False, compact=False), above=target, progress=progress,
                 printer=printer)
    moved["skipped"].pop(rp.BALLOON, None)
    moved.update(mode="shrink_online", size=target)
    if opts.dry_run:
        return moved
    # ... and what the moves emptied above it.
    resize.lay(mp, cluster, min(_free_clusters(mp, cluster, first, total), want), lambda c: c >= first,
               attempts=total + 64)
    resize.fill(mp, fs_bytes - target, cluster)
    b = resize.give_back(mp, att.loop, flush=lambda: _flush(att))
    if opts.compact:
        attach.compact(att)
    after = figures(att, mp)
    released = max(0, on_host_before - after.image_bytes)
    moved.update(balloon=b.size, discarded=b.discarded, seconds=round(time.monotonic() - t0, 3),
                 after=after.as_dict(), released=released)
    log.info("repack.shrunk_online", mountpoint=mp, size=target, balloon=b.size, released=released)
    return moved


def _free_clusters(mountpoint: str, cluster: int, first: int, total: int) -> int:
    """Wholly free clusters from ``first`` to ``total`` (after a commit)."""
    syncfs(mountpoint)
    held: set[int] = set()
    for e in fsmap.iter_extents(mountpoint):
        if not e.free:
            held.update(range(max(first, e.physical // cluster), min(total, -(-e.end // cluster))))
    return max(0, total - first - len(held))


def _replace(opts: Options, **changes: Any) -> Options:
    import dataclasses

    return dataclasses.replace(opts, **changes)
