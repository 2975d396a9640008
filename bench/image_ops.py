"""Image operations: snapshot time by disk size, and compaction throughput.

Snapshot: a 1 GiB and a 64 GiB thin image (the 64 GiB one is created in a fraction of a
second: mkfs on a sparse file, only what it wrote is imported), each attached (FUSE exporter +
loop + ext4), mounted and filled with some data; both stay mounted and are snapshotted in
turn. Before each snapshot either nothing is left dirty (a sync first) or some new data is
written and left in the page cache, as on a busy VE (the freeze writes it back). Two ways,
alternated:
  whole   ``attach.snapshot(att)`` as the daemon calls it (freeze + new delta + thaw);
  parts   the same steps done here, each timed: FIFREEZE (which first writes the dirty data
          back), the exporter's snapshot request (new empty delta, descriptor), FITHAW.
Target: the same time for both sizes, under 100 ms plus the freeze.

Taking the images in turn matters: freezing the same filesystem again right after a thaw costs
~0.4 ms here, but a freeze after a while (or after another filesystem's) costs ~40-60 ms even
with nothing dirty (measured on this kernel; most likely the freeze's per-CPU rwsems waiting
for RCU grace periods that a recent freeze had already paid). Back-to-back snapshots of one image would
report the cheap case, which a VE snapshotted now and then never sees.

Compaction: an image is filled with files of varied sizes, half of them are deleted and
``fstrim`` hands the freed space back as discards (holes in the delta), then the image is
detached and compacted offline with ``ops.compact`` on a cold delta (its pages dropped from the
host cache). Prints clusters moved, MB/s of clusters moved, the time, the file before and
after; the files are read back afterwards and compared. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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
GiB = 1 << 30
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)




@contextlib.contextmanager
def attached(img: Path, run: Path, mnt: Path, *, readonly: bool = False) -> Iterator[object]:
    """The image attached and mounted; unmounted and detached on the way out, whatever happens."""
    from fsnotifyd.image import attach as at

    run.mkdir(parents=True, exist_ok=True)
    att = at.attach(str(img), run_dir=str(run), readonly=readonly)
    try:
        at.mount(att, str(mnt), readonly=readonly)
        yield att
    finally:
        with contextlib.suppress(Exception):
            at.umount(att)
        at.detach(att, run_dir=str(run))


def write_file(path: Path, size: int, pool: memoryview, rng: random.Random) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(pool) // 2)
            start = rng.randrange(len(pool) - n + 1)
            f.write(pool[start:start + n])
            left -= n


def ms(xs: list[float]) -> str:
    xs = [x * 1000 for x in xs]
    return f"{statistics.median(xs):7.1f} ms [{min(xs):.1f}-{max(xs):.1f}]"


# -- snapshots -----------------------------------------------------------------------------------

def snapshot_once(att, mnt: Path, way: str, t: dict) -> None:
    """One snapshot of a mounted image, timed into ``t``."""
    from fsnotifyd.image import attach as at

    if way == "whole":
        t0 = time.perf_counter()
        at.snapshot(att)
        t["whole"].append(time.perf_counter() - t0)
        return
    before = at.control(att, {"op": "status"})["stats"]["allocated"]
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        fcntl.ioctl(fd, FIFREEZE, 0)
        t1 = time.perf_counter()
        try:
            reply = at.control(att, {"op": "snapshot"})
        finally:
            t2 = time.perf_counter()
            fcntl.ioctl(fd, FITHAW, 0)
            t3 = time.perf_counter()
    finally:
        os.close(fd)
    if reply.get("ok") is False:
        raise RuntimeError(f"snapshot request refused: {reply}")
    # clusters the freeze's write-back allocated (a partial write over a cluster of the
    # snapshot below copies the whole cluster up first)
    t["alloc"].append(at.control(att, {"op": "status"})["stats"]["allocated"] - before)
    t["freeze"].append(t1 - t0)
    t["delta"].append(t2 - t1)
    t["thaw"].append(t3 - t2)
    t["parts"].append(t3 - t0)


def bench_snapshots(work: Path, sizes: list[int], fill: int, dirties: list[int], rounds: int,
                    pool: memoryview) -> list[dict]:
    """Snapshot timings of one image per size, all mounted at once and taken in turn (so a
    warm-up or a noisy moment of the machine is not charged to one size); per image
    ``{"by_dirty": {dirty: {way: [s, ...]}}}``."""
    outs: list[dict] = []
    with contextlib.ExitStack() as stack:
        mounted = []
        for n, size in enumerate(sizes):
            tag = f"{n}-{size // GiB}g"
            img, run, mnt = work / f"snap-{tag}", work / f"snap-{tag}.run", work / f"snap-{tag}.mnt"
            t0 = time.perf_counter()
            ops.create(str(img), size, profile="thin")
            stack.callback(shutil.rmtree, img, ignore_errors=True)
            out = {"size": size, "created": time.perf_counter() - t0, "img": img,
                   "by_dirty": {d: {k: [] for k in ("whole", "freeze", "delta", "thaw", "parts", "alloc")}
                                for d in dirties}}
            outs.append(out)
            att = stack.enter_context(attached(img, run, mnt))
            rng = random.Random(size)
            for i in range(max(1, fill // (16 * MiB))):
                write_file(mnt / f"fill{i}", min(16 * MiB, fill), pool, rng)
            sh("sync", "-f", str(mnt))
            mounted.append((out, att, mnt, rng))
        for dirty in dirties:
            for r in range(rounds):
                for way in ("whole", "parts"):
                    for out, att, mnt, rng in mounted:
                        if dirty:
                            write_file(mnt / f"dirty-{dirty}-{r}-{way}", dirty, pool, rng)  # left in the page cache
                        else:
                            sh("sync", "-f", str(mnt))
                        snapshot_once(att, mnt, way, out["by_dirty"][dirty])
        for out in outs:
            out["deltas"] = len([p for p in os.listdir(out["img"]) if p.startswith(ops.ROOT_FILE)])
    return outs


# -- compaction ----------------------------------------------------------------------------------

def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def delta_facts(path: Path) -> dict:
    st = os.stat(path)
    with Delta.open(str(path)) as d:
        return {"file": st.st_size, "alloc": st.st_blocks * 512, "clusters": d.allocated(),
                "holes": len(d.unreferenced()), "cluster": d.cluster}


def bench_compact(work: Path, size: int, pool: memoryview, seed: int) -> dict:
    img, run, mnt = work / "compact", work / "compact.run", work / "compact.mnt"
    rng = random.Random(seed)
    ops.create(str(img), size, profile="thin")
    out: dict = {"size": size}
    try:
        with attached(img, run, mnt):
            st = os.statvfs(mnt)
            budget = int(st.f_blocks * st.f_frsize * 0.6)
            files, total = [], 0
            while total < budget:
                n = int(2 ** rng.uniform(16, 23))  # 64 KiB .. 8 MiB, log-uniform
                p = mnt / f"f{len(files):05d}"
                write_file(p, n, pool, rng)
                files.append(p)
                total += n
            sh("sync", "-f", str(mnt))
            out["written"] = total
            gone = files[::2]
            for p in gone:
                p.unlink()
            kept = {p.name: hashlib.blake2b(p.read_bytes(), digest_size=16).digest() for p in files[1::2]}
            out["deleted"] = len(gone)
            sh("sync", "-f", str(mnt))
            t0 = time.perf_counter()
            trim = sh("fstrim", "-v", str(mnt)).stdout.strip()
            out["fstrim"] = (time.perf_counter() - t0, trim)
        top = img / ops.ROOT_FILE
        out["before"] = delta_facts(top)
        drop_file_cache(top)
        with exclusive(str(img), "compact"), Stack.open(str(img)) as stack:  # as `image compact` does
            t0 = time.perf_counter()
            res = ops.compact(stack.top)
            out["time"] = time.perf_counter() - t0
        out["moved"], out["released"] = res.moved, res.released
        out["after"] = delta_facts(top)
        with attached(img, run, mnt, readonly=True):
            bad = [n for n, h in kept.items()
                   if hashlib.blake2b((mnt / n).read_bytes(), digest_size=16).digest() != h]
        out["verified"] = f"{len(kept) - len(bad)}/{len(kept)} files read back identical"
    finally:
        shutil.rmtree(img, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--rounds", type=int, default=8,
                    help="snapshots of each way per size and dirty amount (default 8)")
    ap.add_argument("--fill", type=int, default=256, help="MiB written before the snapshots (default 256)")
    ap.add_argument("--sizes", default="1,64", help="disk sizes in GiB (default 1,64)")
    ap.add_argument("--dirty", default="0,16",
                    help="MiB left dirty before each snapshot, comma-separated (default 0,16)")
    ap.add_argument("--compact-size", type=int, default=4096, help="disk of the compaction image, MiB (default 4096)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 64 MiB fill, 1 GiB compaction image")
    ap.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    args = ap.parse_args()
    configure_logging("warning")  # the attach/detach info lines would drown the figures
    if args.quick:
        args.rounds, args.fill, args.compact_size = 3, 64, 1024
    if os.geteuid() != 0:
        print("image_ops: needs root (loop devices, mounts, FUSE)", file=sys.stderr)
        return 1
    try:
        from fsnotifyd.image import attach  # noqa: F401
    except ImportError as e:
        print(f"image_ops: fsnotifyd.image.attach is not importable ({e}); nothing to measure", file=sys.stderr)
        return 1
    pool = memoryview(os.urandom(16 * MiB))
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-ops-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"image operations benchmark: {machine_facts(tmp)}")
        dirties = [int(x) for x in args.dirty.split(",")]
        print(f"snapshot of a mounted image ({args.fill} MiB written; before each snapshot, "
              f"{' or '.join(map(str, dirties))} MiB left dirty; {args.rounds} of each way):")
        sizes = [int(x) * GiB for x in args.sizes.split(",")]
        snaps = bench_snapshots(work, sizes, args.fill * MiB, [d * MiB for d in dirties], args.rounds, pool)
        for s in snaps:
            print(f"  {s['size'] // GiB:>3} GiB (created in {s['created'] * 1000:.0f} ms, "
                  f"{s['deltas']} deltas at the end)")
            for dirty, t in s["by_dirty"].items():
                print(f"    {dirty // MiB:>3} MiB dirty: whole attach.snapshot {ms(t['whole'])}")
                print(f"                  parts: freeze {ms(t['freeze'])}  new delta {ms(t['delta'])}  "
                      f"thaw {ms(t['thaw'])}  sum {ms(t['parts'])}")
                print(f"                  clusters allocated in the image by the freeze's write-back: median "
                      f"{statistics.median(t['alloc']):.0f} [{min(t['alloc'])}-{max(t['alloc'])}]")
        worst = 0.0
        big, small = max(snaps, key=lambda s: s["size"]), min(snaps, key=lambda s: s["size"])
        for dirty in snaps[0]["by_dirty"]:
            a, b = (statistics.median(s["by_dirty"][dirty]["whole"]) for s in (small, big))
            c, d = (statistics.median(s["by_dirty"][dirty]["freeze"]) for s in (small, big))
            print(f"  {dirty // MiB} MiB dirty, medians {big['size'] // GiB} GiB / {small['size'] // GiB} GiB: "
                  f"whole {b / a:.2f}, freeze {d / c:.2f}")
            worst = max([worst] + [statistics.median(s["by_dirty"][dirty]["delta"])
                                   + statistics.median(s["by_dirty"][dirty]["thaw"]) for s in snaps])
        print(f"  snapshot less the freeze (new delta + thaw), worst median: {worst * 1000:.1f} ms; "
              f"target < 100 ms plus the freeze: {'MET' if worst < 0.1 else 'NOT MET'}")

        c = bench_compact(work, args.compact_size * MiB, pool, seed=7)
        bf, af, cl = c["before"], c["after"], c["before"]["cluster"]
        print(f"offline compaction of a {c['size'] // MiB} MiB image (cluster {cl // 1024} KiB): "
              f"{c['written'] / MiB:.0f} MiB written in files, every other one deleted ({c['deleted']}), "
              f"fstrim in {c['fstrim'][0]:.2f} s ({c['fstrim'][1]})")
        print(f"  before: file {bf['file'] / MiB:.0f} MiB, allocated {bf['alloc'] / MiB:.0f} MiB, "
              f"{bf['clusters']} clusters mapped, {bf['holes']} holes")
        mbs = c["moved"] * cl / c["time"] / 1e6 if c["time"] else 0.0
        print(f"  compact: {c['moved']} clusters moved ({c['moved'] * cl / MiB:.0f} MiB) in {c['time']:.2f} s = "
              f"{mbs:.0f} MB/s moved; {c['released'] / MiB:.0f} MiB cut from the file")
        print(f"  after:  file {af['file'] / MiB:.0f} MiB, allocated {af['alloc'] / MiB:.0f} MiB, "
              f"{af['clusters']} clusters mapped, {af['holes']} holes; {c['verified']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
