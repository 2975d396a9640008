"""Swelling: how far a thin image grows past what its filesystem uses, over many write/delete cycles.

A thin image allocates a cluster (1 MiB) on the first write into it and frees it only on a
discard of the whole cluster, so a filesystem that spreads its writes over the disk makes its
image grow toward the full disk size even though it stays half empty. The experiment: a small
filesystem (default 512 MiB) in an image, attached and mounted; files of varied sizes (4 KiB
to 16 MiB, log-uniform) are written, and older ones deleted to keep the live data near 50 % of
the filesystem, until 10x the filesystem's size has been written, with a ``syncfs`` every 32 MiB (as
writeback would: on a host with much RAM, short-lived files would otherwise die in the page
cache and never reach the image). At every 1x (a checkpoint) it prints the filesystem's used
size (statfs, as ``df``: ext4's own metadata not counted) against the image's physical size:
the delta file's allocated bytes (``st_blocks*512``), its mapped cluster count (its BAT, after
a flush) and the file's length.

Four variants: mkfs.ext4 with default options or the "thin" profile (``ops.MKFS_PROFILES``),
each with no maintenance (no discards reach the image: ext4 is mounted without ``discard``) or
with maintenance at every checkpoint: ``fstrim`` (discards free whole clusters, punched out of
the delta) and then a compaction (the exporter has no online compaction request, so: umount,
detach, ``ops.compact``, attach, mount; the figures are taken after it). A final table compares
the four ("peak alloc" includes the figures just before each maintenance). Same random
sequence of files for every variant. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_facts, sh  # noqa: E402

from fsnotifyd.app.logging import configure_logging  # noqa: E402
from fsnotifyd.image import ops  # noqa: E402
from fsnotifyd.image.delta import Delta  # noqa: E402
from fsnotifyd.image.lock import exclusive  # noqa: E402
from fsnotifyd.image.stack import Stack  # noqa: E402

MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(fd)




@dataclass
class Point:
    written: int  # bytes written into files so far
    used: int  # the filesystem's used bytes (statfs)
    alloc: int  # the delta's st_blocks * 512
    clusters: int  # mapped clusters in the delta's BAT
    length: int  # the delta file's st_size
    pre_alloc: int = 0  # with maintenance: st_blocks * 512 just before it (the swelling between rounds)
    maint_s: float = 0.0  # time spent in fstrim + compaction at this checkpoint
    moved: int = 0  # clusters moved by that compaction


class Mounted:
    """The image attached and mounted, and the way to take it down and up again."""

    def __init__(self, img: Path, run: Path, mnt: Path) -> None:
        self.img, self.run, self.mnt, self.att = img, run, mnt, None

    def up(self) -> None:
        from fsnotifyd.image import attach as at

        self.run.mkdir(parents=True, exist_ok=True)
        self.att = at.attach(str(self.img), run_dir=str(self.run))
        try:
            at.mount(self.att, str(self.mnt))
        except BaseException:
            at.detach(self.att, run_dir=str(self.run))
            self.att = None
            raise

    def down(self) -> None:
        from fsnotifyd.image import attach as at

        if self.att is None:
            return
        att, self.att = self.att, None
        try:
            at.umount(att)
        finally:
            at.detach(att, run_dir=str(self.run))

    def flush(self) -> None:
        from fsnotifyd.image import attach as at

        syncfs(self.mnt)
        reply = at.control(self.att, {"op": "flush"})
        if isinstance(reply, dict) and reply.get("ok") is False:
            raise RuntimeError(f"flush refused: {reply}")


def measure(img: Path, mnt: Path, written: int) -> Point:
    st = os.statvfs(mnt)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    top = img / ops.ROOT_FILE
    fst = os.stat(top)
    with Delta.open(str(top), strict=False) as d:
        clusters = d.allocated()
    return Point(written, used, fst.st_blocks * 512, clusters, fst.st_size)


def file_sizes(seed: int, total: int) -> list[int]:
    rng = random.Random(seed)
    out, n = [], 0
    while n < total:
        s = int(math.exp(rng.uniform(math.log(4096), math.log(16 * MiB))))
        out.append(s)
        n += s
    return out


def run_variant(work: Path, fs_size: int, times: int, profile: str, maintain: bool, pool: memoryview,
                seed: int, sync_every: int) -> tuple[list[Point], float]:
    tag = f"{profile}-{'maint' if maintain else 'none'}"
    img, run, mnt = work / tag, work / f"{tag}.run", work / f"{tag}.mnt"
    ops.create(str(img), fs_size, profile=profile)
    m = Mounted(img, run, mnt)
    rng = random.Random(seed + 1)
    points: list[Point] = []
    t_start = time.perf_counter()
    try:
        m.up()
        st = os.statvfs(mnt)
        capacity = st.f_blocks * st.f_frsize
        target_live = capacity // 2
        live: collections.deque[tuple[Path, int]] = collections.deque()
        live_bytes = written = 0
        next_check, next_sync = fs_size, sync_every
        m.flush()
        points.append(measure(img, mnt, 0))
        for i, size in enumerate(file_sizes(seed, times * fs_size)):
            while live and live_bytes + size > target_live:
                # delete one of the older half, not strictly the oldest: usage patterns mix
                k = rng.randrange(max(1, len(live) // 2))
                p, s = live[k]
                del live[k]
                p.unlink()
                live_bytes -= s
            p = mnt / f"d{i % 64:02d}" / f"f{i:06d}"
            p.parent.mkdir(exist_ok=True)
            with open(p, "wb") as f:
                left = size
                while left:
                    n = min(left, len(pool) // 2)
                    start = rng.randrange(len(pool) - n + 1)
                    f.write(pool[start:start + n])
                    left -= n
            live.append((p, size))
            live_bytes += size
            written += size
            if written >= next_sync:  # as writeback would: a file deleted soon after may still reach the disk
                next_sync += sync_every
                syncfs(mnt)
            if written >= next_check:
                next_check += fs_size
                m.flush()
                maint_s, moved, pre = 0.0, 0, 0
                if maintain:
                    pre = os.stat(img / ops.ROOT_FILE).st_blocks * 512
                    t0 = time.perf_counter()
                    sh("fstrim", str(mnt))
                    m.down()
                    with exclusive(str(img), "compact"), Stack.open(str(img)) as stack:
                        moved = ops.compact(stack.top).moved
                    m.up()
                    maint_s = time.perf_counter() - t0
                pt = measure(img, mnt, written)
                pt.maint_s, pt.moved, pt.pre_alloc = maint_s, moved, pre
                points.append(pt)
    finally:
        try:
            m.down()
        finally:
            shutil.rmtree(img, ignore_errors=True)
    return points, time.perf_counter() - t_start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fs-size", type=int, default=512, help="filesystem (disk) size, MiB (default 512)")
    ap.add_argument("-n", "--times", type=int, default=10, help="total written, in filesystem sizes (default 10)")
    ap.add_argument("--quick", action="store_true", help="256 MiB filesystem, 4x written")
    ap.add_argument("--only", default=None, help="comma-separated variants, e.g. thin-none,default-maint")
    ap.add_argument("--sync-every", type=int, default=32, help="syncfs after every this many MiB written (default 32)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    args = ap.parse_args()
    configure_logging("warning")  # the attach/detach info lines would drown the figures
    if args.quick:
        args.fs_size, args.times = 256, 4
    if os.geteuid() != 0:
        print("image_swelling: needs root (loop devices, mounts, FUSE)", file=sys.stderr)
        return 1
    try:
        from fsnotifyd.image import attach  # noqa: F401
    except ImportError as e:
        print(f"image_swelling: fsnotifyd.image.attach is not importable ({e}); nothing to measure", file=sys.stderr)
        return 1
    fs_size = args.fs_size * MiB
    pool = memoryview(os.urandom(32 * MiB))
    variants = [(p, m) for p in ("default", "thin") for m in (False, True)]
    if args.only:
        want = args.only.split(",")
        variants = [(p, m) for p, m in variants if f"{p}-{'maint' if m else 'none'}" in want]
    summary = []
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-swell-", dir=args.dir) as tmp:
        print(f"image swelling: {machine_facts(tmp)}")
        print(f"  {args.fs_size} MiB filesystem, {args.times}x its size written in files of 4 KiB-16 MiB, "
              f"live data kept near 50 %, seed {args.seed}")
        for profile, maintain in variants:
            name = f"{profile}, {'fstrim + compact at each checkpoint' if maintain else 'no maintenance'}"
            points, took = run_variant(Path(tmp), fs_size, args.times, profile, maintain, pool, args.seed,
                                       args.sync_every * MiB)
            print(f"\n  {name} ({took:.0f} s)")
            print(f"  {'written':>9} {'fs used':>9} {'image alloc':>12} {'clusters':>9} {'file len':>9} "
                  f"{'alloc/used':>10}" + (f" {'before maint':>12} {'maint':>7} {'moved':>6}" if maintain else ""))
            for p in points:
                ratio = f"{p.alloc / p.used:.2f}" if p.used >= MiB else "-"
                print(f"  {p.written / MiB:>5.0f} MiB {p.used / MiB:>5.0f} MiB {p.alloc / MiB:>8.0f} MiB "
                      f"{p.clusters:>9} {p.length / MiB:>5.0f} MiB {ratio:>10}"
                      + (f" {p.pre_alloc / MiB:>8.0f} MiB {p.maint_s:>6.1f}s {p.moved:>6}" if maintain else ""))
            last = points[-1]
            peak = max(max(p.alloc, p.pre_alloc) for p in points)
            summary.append((profile, "fstrim+compact" if maintain else "none", last, peak, took))
    print(f"\n  final, after {args.times}x {args.fs_size} MiB written:")
    print(f"  {'mkfs':<8} {'maintenance':<15} {'fs used':>9} {'image alloc':>12} {'peak alloc':>11} "
          f"{'clusters':>9} {'file len':>9} {'alloc/used':>10} {'time':>6}")
    for profile, maint, p, peak, took in summary:
        print(f"  {profile:<8} {maint:<15} {p.used / MiB:>5.0f} MiB {p.alloc / MiB:>8.0f} MiB {peak / MiB:>7.0f} MiB "
              f"{p.clusters:>9} {p.length / MiB:>5.0f} MiB {p.alloc / p.used:>10.2f} {took:>5.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
