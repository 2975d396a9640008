"""I/O through a VE's image against a plain loop device, same disk, same ext4, same run.

Columns (each an ext4 made with the same mkfs profile, mounted with the same options):
  raw    a sparse raw file on the host fs, loop ``--direct-io=on`` (the ceiling);
  image  an fsnotifyd image (ploop-style delta) served by its FUSE exporter, loop
         ``--direct-io=on`` (``fsnotifyd.image.attach``);
  qcow2  where Debian's ``qemu-storage-daemon`` is installed (``qemu-system-common``): a
         qcow2 file through its FUSE export, loop WITHOUT direct I/O (qsd 7.2's FUSE export
         corrupts data under a dio loop, design.md section 5).

Jobs (fio, libaio, direct=1, iodepth 16, time-based): sequential 1 MiB write and read, random
4 KiB write and read, on one test file laid out beforehand (that first write, which allocates
the image's clusters, is timed too). Jobs are interleaved across the columns and repeated, so
noise from the shared 2-core VM spreads over all of them; medians and [min-max] are printed,
and ratios image/raw of the medians. Targets: sequential >= 0.7, random 4 KiB write >= 0.5.
Without fio, a Python O_DIRECT loop at queue depth 1 stands in (figures not comparable).

Note: the exporter reads and writes its delta files through the host page cache (it fsyncs on
the VE's flushes), while the raw loop uses O_DIRECT; so before each read job the host cache of
the image's files is evicted (``posix_fadvise DONTNEED`` on those files only), or the image
column would read from RAM (``--warm`` keeps it, to see that case). Needs root.

The exporter serves mapped reads and writes in C (``fsnotifyd/image/_fastio.c``) when the
module is built; ``FSNOTIFYD_FASTIO=0`` measures the all-Python data path instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
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

import benchutil  # noqa: E402
from benchutil import sh  # noqa: E402
from fsnotifyd.app.logging import configure_logging  # noqa: E402
from fsnotifyd.image import ops  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

# name, fio rw, block size, what is printed
JOBS = [
    ("seq write 1M", "write", "1M", "MB/s"),
    ("seq read 1M", "read", "1M", "MB/s"),
    ("rand write 4K", "randwrite", "4k", "IOPS"),
    ("rand read 4K", "randread", "4k", "IOPS"),
]
TARGETS = {"seq write 1M": 0.7, "seq read 1M": 0.7, "rand write 4K": 0.5}
EXPORTER_STATUS: dict = {}  # the image column's exporter status, taken before it is detached



def machine_facts(workdir: str) -> str:
    fio = sh("fio", "--version", check=False).stdout.strip() if shutil.which("fio") else "fio missing"
    return f"{benchutil.machine_facts(workdir)}, {fio}"


# -- the columns ---------------------------------------------------------------------------------

def mkfs(dev: str, profile: str) -> None:
    sh("mkfs.ext4", "-q", "-F", *ops.MKFS_PROFILES[profile], dev)


def mount(dev: str, mnt: Path, options: tuple[str, ...] = ()) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "ext4", *(["-o", ",".join(options)] if options else []), dev, str(mnt))


def umount(mnt: Path) -> None:
    if sh("umount", str(mnt), check=False).returncode != 0:
        sh("umount", "-l", str(mnt), check=False)


@contextlib.contextmanager
def raw_column(work: Path, size: int, profile: str, options: tuple[str, ...] = ()) -> Iterator[tuple[Path, list[Path]]]:
    """Sparse raw file -> loop --direct-io=on -> ext4. Yields the mountpoint and the host
    files whose page cache holds the disk's data (none: the loop reads with O_DIRECT)."""
    raw, mnt = work / "raw.img", work / "raw.mnt"
    with open(raw, "wb") as f:
        f.truncate(size)
    dev = None
    mounted = False
    try:
        dev = sh("losetup", "--find", "--show", "--direct-io=on", str(raw)).stdout.strip()
        mkfs(dev, profile)
        mount(dev, mnt, options)
        mounted = True
        yield mnt, []
    finally:
        if mounted:
            umount(mnt)
        if dev:
            sh("losetup", "-d", dev, check=False)
        raw.unlink(missing_ok=True)


@contextlib.contextmanager
def image_column(work: Path, size: int, profile: str, options: tuple[str, ...] = (),
                 cluster: int = ops.DEFAULT_CLUSTER) -> Iterator[tuple[Path, list[Path]]]:
    """fsnotifyd image -> FUSE exporter -> loop --direct-io=on -> ext4."""
    from fsnotifyd.image import attach as at

    img, run, mnt = work / "image", work / "image.run", work / "image.mnt"
    ops.create(str(img), size, profile=profile, cluster=cluster)
    run.mkdir()
    att = None
    try:
        att = at.attach(str(img), run_dir=str(run), direct_io=True)
        at.mount(att, str(mnt), options=options)
        yield mnt, sorted(img.glob(ops.ROOT_FILE + "*"))  # the exporter reads its deltas through the host cache
    finally:
        if att is not None:
            with contextlib.suppress(Exception):
                EXPORTER_STATUS.update(at.status(att))
            with contextlib.suppress(Exception):
                at.umount(att)
            at.detach(att, run_dir=str(run))
        shutil.rmtree(img, ignore_errors=True)


@contextlib.contextmanager
def qcow2_column(work: Path, size: int, profile: str,
                 options: tuple[str, ...] = ()) -> Iterator[tuple[Path, list[Path]]]:
    """qcow2 -> qemu-storage-daemon FUSE export -> loop (no direct I/O) -> ext4."""
    qcow, export, mnt = work / "img.qcow2", work / "qcow2.export", work / "qcow2.mnt"
    pidfile = work / "qsd.pid"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(size))
    export.touch()
    pid = dev = None
    mounted = False
    try:
        # --daemonize returns once the export is set up; the pid file names the daemon.
        sh("qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=file0,filename={qcow},discard=unmap,cache.direct=off",
           "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,discard=unmap",
           "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={export},writable=on",
           "--pidfile", str(pidfile), "--daemonize")
        pid = int(pidfile.read_text())
        dev = sh("losetup", "--find", "--show", str(export)).stdout.strip()
        mkfs(dev, profile)
        mount(dev, mnt, options)
        mounted = True
        yield mnt, [qcow]
    finally:
        if mounted:
            umount(mnt)
        if dev:
            sh("losetup", "-d", dev, check=False)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
        sh("fusermount3", "-u", str(export), check=False)
        qcow.unlink(missing_ok=True)
        export.unlink(missing_ok=True)


# -- measuring -----------------------------------------------------------------------------------

def drop_host_cache(files: list[Path]) -> None:
    """Evict these files' clean pages from the host page cache (only theirs: not a global
    drop_caches, other work on the machine keeps its cache)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fio(path: Path, rw: str, bs: str, size: int, runtime: float | None, iodepth: int) -> tuple[float, float]:
    """(MB/s, IOPS) of one fio job on ``path``."""
    argv = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
            "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}", "--numjobs=1", "--randrepeat=0",
            "--norandommap", "--output-format=json"]
    if runtime is not None:
        argv += [f"--runtime={runtime}", "--time_based"]
    if "write" in rw:
        argv.append("--end_fsync=1")
    out = json.loads(sh(*argv).stdout)
    side = out["jobs"][0]["write" if "write" in rw else "read"]
    return side["bw_bytes"] / 1e6, side["iops"]


def pyio(path: Path, rw: str, bs: str, size: int, runtime: float | None, iodepth: int) -> tuple[float, float]:
    """The fio job in Python: O_DIRECT, queue depth 1."""
    block = MiB if bs == "1M" else 4096
    buf = mmap.mmap(-1, block)  # page aligned, as O_DIRECT wants
    buf.write(os.urandom(block))
    write = "write" in rw
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT | os.O_CREAT, 0o600)
    try:
        blocks = size // block
        rng = random.Random(1)
        n, t0 = 0, time.perf_counter()
        deadline = t0 + (runtime if runtime is not None else 1e9)
        while True:
            i = rng.randrange(blocks) if rw.startswith("rand") else n % blocks
            if write:
                os.pwritev(fd, [buf], i * block)
            else:
                os.preadv(fd, [buf], i * block)
            n += 1
            if (runtime is None and n >= blocks) or (n % 64 == 0 and time.perf_counter() >= deadline):
                break
        if write:
            os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return n * block / dt / 1e6, n / dt


def spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:8.0f}"
    return f"{statistics.median(xs):8.0f} [{min(xs):.0f}-{max(xs):.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--repeat", type=int, default=3, help="rounds of the four jobs (default 3)")
    ap.add_argument("--runtime", type=float, default=10, help="seconds per job (default 10)")
    ap.add_argument("--file-size", type=int, default=2048, help="test file, MiB (default 2048)")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--profile", default="thin", choices=sorted(ops.MKFS_PROFILES), help="mkfs.ext4 options")
    ap.add_argument("--warm", action="store_true",
                    help="leave the host cache of the image's files warm for the read jobs (default: evict it)")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s jobs on a 512 MiB file")
    ap.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    ap.add_argument("--only", default=None, help="comma-separated columns to run (raw,image,qcow2)")
    ap.add_argument("--mount-options", default="", help="ext4 mount options for every column, e.g. discard "
                    "(what `ve start` mounts with by default)")
    ap.add_argument("--cluster", type=int, default=ops.DEFAULT_CLUSTER >> 10,
                    help="the image's cluster size, KiB (default 1024)")
    args = ap.parse_args()
    configure_logging("warning")  # the attach/detach info lines would drown the figures
    if args.quick:
        args.repeat, args.runtime, args.file_size = 1, 3, 512
    if os.geteuid() != 0:
        print("image_io: needs root (loop devices, mounts)", file=sys.stderr)
        return 1
    size = args.file_size * MiB
    disk = max(4 * GiB, 2 * size + GiB)
    runner = fio if shutil.which("fio") else pyio
    options = tuple(o for o in args.mount_options.split(",") if o)

    columns = {"raw": raw_column, "image": functools.partial(image_column, cluster=args.cluster << 10)}
    notes = []
    try:
        import fsnotifyd.image.attach  # noqa: F401
    except ImportError as e:
        del columns["image"]
        notes.append(f"image column skipped: fsnotifyd.image.attach not importable ({e})")
    if shutil.which("qemu-storage-daemon") and shutil.which("qemu-img"):
        columns["qcow2"] = qcow2_column
    else:
        missing = [p for p in ("qemu-storage-daemon", "qemu-img") if not shutil.which(p)]
        notes.append(f"qcow2 column skipped: {' and '.join(missing)} not installed "
                     "(apt-get install --no-install-recommends qemu-utils qemu-system-common)")
    if args.only:
        columns = {k: v for k, v in columns.items() if k in args.only.split(",")}
    if runner is pyio:
        notes.append("fio not installed: Python O_DIRECT loop at queue depth 1 instead (not comparable to fio)")

    with tempfile.TemporaryDirectory(prefix="fsnd-bench-io-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"image I/O benchmark: {machine_facts(tmp)}")
        print(f"  ext4 profile {args.profile!r} on a {disk // GiB} GiB disk, image cluster {args.cluster} KiB, "
              f"test file {args.file_size} MiB, "
              f"{args.repeat} round(s) of {args.runtime:g} s jobs, iodepth {args.iodepth if runner is fio else 1}, "
              f"read jobs {'with the host cache warm' if args.warm else 'after evicting the host cache of image files'}"
              ", "
              f"mounted {'-o ' + ','.join(options) if options else 'with no options'}")
        for n in notes:
            print(f"  {n}")
        results: dict[str, dict[str, list[float]]] = {j[0]: {c: [] for c in columns} for j in JOBS}
        layout: dict[str, float] = {}
        with contextlib.ExitStack() as stack:
            mnts, caches = {}, {}
            for name, col in columns.items():
                t0 = time.perf_counter()
                mnts[name], caches[name] = stack.enter_context(col(work, disk, args.profile, options))
                print(f"  {name}: set up in {time.perf_counter() - t0:.1f} s")
            for name, mnt in mnts.items():  # lay out the test file: the first, allocating write
                mbs, _ = runner(mnt / "test.dat", "write", "1M", size, None, args.iodepth)
                layout[name] = mbs
            for _ in range(args.repeat):
                for job, rw, bs, _unit in JOBS:
                    for name, mnt in mnts.items():
                        if "read" in rw and not args.warm:
                            drop_host_cache(caches[name])
                        mbs, iops = runner(mnt / "test.dat", rw, bs, size, args.runtime, args.iodepth)
                        results[job][name].append(mbs if bs == "1M" else iops)

    cols = list(columns)
    print()
    print(f"  {'job':<16}" + "".join(f"{c:>30}" for c in cols) + "".join(f"{c + '/raw':>12}" for c in cols[1:]))
    print(f"  {'first write 1M':<16}" + "".join(f"{layout[c]:>25.0f} MB/s" for c in cols)
          + "".join(f"{layout[c] / layout['raw']:>12.2f}" for c in cols[1:] if 'raw' in layout))
    ratios: dict[str, float] = {}
    for job, _rw, _bs, unit in JOBS:
        row = f"  {job:<16}" + "".join(f"{spread(results[job][c]) + ' ' + unit:>30}" for c in cols)
        if "raw" in columns:
            base = statistics.median(results[job]["raw"])
            for c in cols[1:]:
                r = statistics.median(results[job][c]) / base
                ratios[f"{job} {c}"] = r
                row += f"{r:>12.2f}"
        print(row)
    if EXPORTER_STATUS:
        fast = EXPORTER_STATUS.get("fast_path")
        path = ("C (_fastio): " + ", ".join(f"{k} {v}" for k, v in fast.items())) if fast else "Python"
        print(f"\n  image exporter data path: {path}; read-ahead hits {EXPORTER_STATUS.get('read_ahead_hits')}, "
              f"write-behind waits {EXPORTER_STATUS.get('write_behind_waits')}, errors {EXPORTER_STATUS.get('errors')}")
    if "image" in columns and "raw" in columns:
        print()
        for job, want in TARGETS.items():
            r = ratios[f"{job} image"]
            print(f"  target {job} image/raw >= {want}: {r:.2f} {'MET' if r >= want else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
