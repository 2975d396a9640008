"""Swelling: how far a thin image grows past what its filesystem holds while the VE works.

A VE on a fsnotifyd image (``ops.create`` + ``attach`` + ``mount``, default 2 GiB) is churned
by three workloads, each writing 10x the filesystem's size:

  small    a tree of files of 1 KiB-2 MiB (log-uniform): fill to 50 %, delete 65 % at random,
           in rounds;
  logs     append-only logs: 48 open at once, appended in turns (512 B-64 KiB per append),
           rotated at 256 KiB-64 MiB (the open ones
           together at most a quarter of the fs), the oldest deleted to keep the live data near 50 %;
  rewrite  large files (16-256 MiB, 50 % of the fs) rewritten in place by random 4 KiB-1 MiB
           overwrites; every 1/16 of the fs written, one file is truncated and grown again, or
           deleted and written anew.

The data reaches the disk as in a VE whose files outlive the page cache: a ``syncfs`` every
32 MiB written and at the end of every fill/delete step. Without it delayed allocation gives
files deleted before write-back no blocks at all, and the bench would measure nothing (issue 16).

Modes, side by side in one run, each on a fresh image with the same random sequence:

  none            mounted without ``discard``, nothing done (the old behaviour);
  defaults        the new defaults: mounted with ``discard`` (and whatever the image's data
                  path does by itself: zero detection, discard accumulation);
  fstrim+compact  mounted without ``discard``; ``fstrim`` + online compaction
                  (``attach.compact``) at each checkpoint;
  repack          the defaults plus a repack pass (``fsnotifyd.image.repack``), then
                  fstrim + compact, at each checkpoint; skipped with a note while the module
                  is absent.

The figures (``fsnotifyd.image.thinness``, issue 16): garbage = image clusters allocated /
holding clusters; fragmentation = holding clusters / in-use clusters' worth; swelling = their
product; df ratio = image bytes on the host / ``df`` used (Virtuozzo's 1.5 compares with it).
They are taken after a ``syncfs`` and an exporter flush, four times per 1x written ("peak"
is the highest of those, and of the figures just before each maintenance), and printed at each
checkpoint (every 1x), before and after the checkpoint's maintenance. "stale%" is the share of mapped
clusters that hold no block in use (garbage counted without the zero metadata that holds clusters
but costs the image nothing, see ``Measured``). Mounted with ``discard``, the figures are taken
once the exporter has seen no discard for 0.4 s (ext4 sends online discards from a work item
after the commit, so right after a syncfs they are still on the way); the garbage before that is
printed as "transient". Needs root.

``run_one`` is the building block ``bench/allocator_study.py`` reuses (mkfs options, mount
options, ext4 sysfs tunables, image cluster size).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_facts, sh  # noqa: E402
from fsnotifyd.app.logging import configure_logging  # noqa: E402
from fsnotifyd.image import fsmap, ops, thinness  # noqa: E402
from fsnotifyd.image.format import DEFAULT_CLUSTER  # noqa: E402
from fsnotifyd.image.thinness import Figures  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
VIRTUOZZO_DF_RATIO = 1.5  # linux-fsdevel, "fallocate2() ... TP defrag", 2020-02
TARGET_PEAK_GARBAGE = 1.10  # with the defaults, no pass by hand
TARGET_FRAG_AFTER_REPACK = 1.05
SAMPLES_PER_X = 4
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(fd)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# -- modes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    name: str
    discard: bool  # mounted with -o discard
    fstrim_compact: bool  # fstrim + online compact at each checkpoint
    repack: bool  # a repack pass at each checkpoint (before fstrim + compact)


MODES = {m.name: m for m in (
    Mode("none", discard=False, fstrim_compact=False, repack=False),
    Mode("defaults", discard=True, fstrim_compact=False, repack=False),
    Mode("fstrim+compact", discard=False, fstrim_compact=True, repack=False),
    Mode("repack", discard=True, fstrim_compact=True, repack=True),
)}


def repack_module():
    """``fsnotifyd.image.repack`` when it is there (another branch builds it), else None."""
    try:
        return importlib.import_module("fsnotifyd.image.repack")
    except ImportError:
        return None


def repack_pass(att) -> dict[str, float]:
    """One repack pass over the mounted VE (it trims and compacts itself); what it moved."""
    mod = repack_module()
    assert mod is not None
    r = mod.run(att, mod.Options())
    return {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- the VE ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What the allocator study varies; the bench runs the defaults."""
    name: str = "thin"
    profile: str = "thin"  # ops.MKFS_PROFILES
    mkfs_args: tuple[str, ...] = ()  # appended to the profile's
    mount_opts: tuple[str, ...] = ()  # besides discard, which the mode decides
    sysfs: tuple[tuple[str, int], ...] = ()  # /sys/fs/ext4/<dev>/<name> = value, after mounting
    cluster: int = DEFAULT_CLUSTER


class VE:
    """An image created, attached and mounted; taken down (and removed) however the run ends."""

    def __init__(self, work: Path, tag: str, size: int, setup: Setup, mode: Mode) -> None:
        self.img, self.run, self.mnt = work / tag, work / f"{tag}.run", work / f"{tag}.mnt"
        self.size, self.setup, self.mode, self.att = size, setup, mode, None

    def __enter__(self) -> VE:
        from fsnotifyd.image import attach as at

        ops.create(str(self.img), self.size, cluster=self.setup.cluster, profile=self.setup.profile,
                   mkfs_args=self.setup.mkfs_args)
        self.run.mkdir(parents=True, exist_ok=True)
        try:
            self.att = at.attach(str(self.img), run_dir=str(self.run))
            opts = [*self.setup.mount_opts, *(["discard"] if self.mode.discard else ["nodiscard"])]
            at.mount(self.att, str(self.mnt), options=opts)
            dev = os.path.basename(self.att.loop)
            for name, value in self.setup.sysfs:
                Path(f"/sys/fs/ext4/{dev}/{name}").write_text(f"{value}\n")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from fsnotifyd.image import attach as at

        try:
            if self.att is not None:
                att, self.att = self.att, None
                try:
                    at.umount(att, lazy=True)
                finally:
                    at.detach(att, run_dir=str(self.run))
        finally:
            shutil.rmtree(self.img, ignore_errors=True)
            shutil.rmtree(self.run, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.mnt.rmdir()

    def capacity(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_blocks * st.f_frsize

    def figures(self) -> Measured:
        """The figures after a syncfs and an exporter flush (the BAT on disk is then current).
        Mounted with ``discard``, once more after the discards settled (:meth:`settle`); the
        figure before is kept as ``transient``."""
        first = self._measure()
        if not self.mode.discard:
            return first
        waited = self.settle()
        settled = self._measure()
        return replace(settled, transient=first.fig.garbage, settle_s=waited)

    def settle(self, quiet: float = 0.4, limit: float = 10.0) -> float:
        """Wait until the exporter has seen no discard for ``quiet`` seconds; the seconds waited.
        ext4 issues online discards from a work item after the journal commit (6.18), so right
        after a syncfs the blocks are free in the bitmaps but their discards are still on the
        way: measured then, a churn of small files showed 133 of 265 mapped clusters holding
        nothing, and 0 of 130 a second later."""
        from fsnotifyd.image import attach as at

        t0 = time.perf_counter()
        last, since = None, t0
        while time.perf_counter() - t0 < limit:
            syncfs(self.mnt)
            n = at.status(self.att)["stats"]["discards"]
            now = time.perf_counter()
            if n != last:
                last, since = n, now
            elif now - since >= quiet:
                break
            time.sleep(0.1)
        return time.perf_counter() - t0

    def _measure(self) -> Measured:
        from fsnotifyd.image import attach as at
        from fsnotifyd.image.stack import Stack

        syncfs(self.mnt)
        reply = at.control(self.att, {"op": "flush"}, timeout=120)
        if reply.get("ok") is False:
            raise RuntimeError(f"exporter flush refused: {reply}")
        ranges = thinness.in_use(fsmap.iter_extents(str(self.mnt)))
        with Stack.open(str(self.img), writable=False) as stack:
            c = stack.cluster
            mapped = {vc for vc in range(-(-stack.size // c)) if stack.owner(vc) is not None}
            on_host = sum(os.fstat(d.fd).st_blocks * 512 for d in stack.deltas)
        fig = thinness.figures(ranges, c, allocated=len(mapped), image_bytes=on_host,
                               df_used=thinness.df_used(str(self.mnt)))
        return Measured(fig, len(mapped - thinness.holding_clusters(ranges, c)))

    def maintain(self) -> dict[str, float]:
        """The mode's checkpoint pass; seconds taken and what it moved."""
        from fsnotifyd.image import attach as at

        out: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.mode.repack:
            for k, v in repack_pass(self.att).items():
                out[f"repack_{k}"] = v
        if self.mode.fstrim_compact:
            sh("fstrim", str(self.mnt))
            syncfs(self.mnt)
            out["compact_moved"] = at.compact(self.att)["moved"]
        out["seconds"] = time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class Measured:
    """The thinness figures, and the mapped clusters that hold nothing the filesystem uses.

    ``garbage`` divides by all holding clusters, and some hold only metadata that is zeros and
    so never allocated (inode tables, a journal not yet gone round): about 100 clusters on a
    2 GiB VE, which pull garbage below 1.0 on a fresh image and hide as much real garbage later.
    ``stale`` counts what an allocated cluster that holds nothing is: the garbage itself."""
    fig: Figures
    stale: int  # mapped clusters with no block in use
    transient: float | None = None  # mounted with discard: garbage before the discards settled
    settle_s: float = 0.0  # how long they took

    def __getattr__(self, name: str):
        return getattr(self.fig, name)

    @property
    def stale_share(self) -> float:
        """Mapped clusters holding nothing, per mapped cluster (0: no garbage at all)."""
        return self.stale / self.fig.allocated if self.fig.allocated else 0.0


# -- the workloads -------------------------------------------------------------------------------

class Churn:
    """Writes into the VE, counts them, syncs as writeback would and samples the figures."""

    def __init__(self, ve: VE, total: int, pool: memoryview, rng: random.Random, sync_every: int,
                 on_sample: Callable[[int, bool], None]) -> None:
        self.ve, self.mnt, self.total, self.pool, self.rng = ve, ve.mnt, total, pool, rng
        self.capacity = ve.capacity()
        self.written = 0
        self.changes = 0  # writes, deletes, truncates: the last sample is current while it has not moved
        self.sync_every, self.next_sync = sync_every, sync_every
        self.step = max(1, ve.size // SAMPLES_PER_X)
        self.next_sample = self.step
        self.on_sample = on_sample  # (written, is_checkpoint)
        self.sampled_at = 0

    @property
    def done(self) -> bool:
        return self.written >= self.total

    def data(self, n: int) -> memoryview:
        start = self.rng.randrange(len(self.pool) - n + 1)
        return self.pool[start:start + n]

    def wrote(self, n: int) -> None:
        self.written += n
        self.changes += 1
        if self.written >= self.next_sync:
            self.next_sync += self.sync_every
            syncfs(self.mnt)
        while self.written >= self.next_sample:
            k = self.next_sample // self.step
            self.next_sample += self.step
            self.sampled_at = self.changes
            self.on_sample(self.written, k % SAMPLES_PER_X == 0)

    def removed(self) -> None:
        """A delete or a truncate (they change the figures as writes do)."""
        self.changes += 1

    def write_at(self, fd: int, offset: int, n: int) -> None:
        chunk = len(self.pool) // 4
        while n > 0:
            m = min(n, chunk)
            os.pwrite(fd, self.data(m), offset)
            offset += m
            n -= m
            self.wrote(m)

    def new_file(self, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.write_at(fd, 0, size)
        finally:
            os.close(fd)


def small_files(c: Churn) -> None:
    rng, live, live_bytes, i = c.rng, {}, 0, 0
    while not c.done:
        while live_bytes < c.capacity // 2 and not c.done:
            size = log_uniform(rng, KiB, 2 * MiB)
            p = c.mnt / f"d{rng.randrange(16):x}" / f"e{rng.randrange(16):x}" / f"f{i:07d}"
            c.new_file(p, size)
            live[p] = size
            live_bytes += size
            i += 1
        syncfs(c.mnt)
        for p in rng.sample(sorted(live), int(len(live) * 0.65)):
            p.unlink()
            c.removed()
            live_bytes -= live.pop(p)
        syncfs(c.mnt)


def append_logs(c: Churn, streams: int = 48) -> None:
    rng, i = c.rng, 0
    closed: list[tuple[Path, int]] = []  # oldest first
    live_bytes = 0
    open_logs: list[list] = []  # [fd, path, size, limit]
    # the open logs together stay under a quarter of the fs, so deleting closed ones keeps it near 50 %
    hi = max(64 * KiB, min(64 * MiB, c.capacity // (4 * streams)))

    def start() -> list:
        nonlocal i
        p = c.mnt / f"svc{i % streams:02d}" / f"log{i:06d}"
        i += 1
        p.parent.mkdir(exist_ok=True)
        return [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), p, 0,
                log_uniform(rng, min(256 * KiB, hi // 4), hi)]

    open_logs = [start() for _ in range(streams)]
    try:
        while not c.done:
            k = rng.randrange(streams)
            lg = open_logs[k]
            n = log_uniform(rng, 512, 64 * KiB)
            os.write(lg[0], c.data(n))
            lg[2] += n
            live_bytes += n
            c.wrote(n)
            if lg[2] >= lg[3]:
                os.close(lg[0])
                closed.append((lg[1], lg[2]))
                open_logs[k] = start()
            while live_bytes > c.capacity // 2 and closed:
                p, s = closed.pop(0)
                p.unlink()
                c.removed()
                live_bytes -= s
    finally:
        for lg in open_logs:
            os.close(lg[0])


def rewrite_in_place(c: Churn) -> None:
    rng = c.rng
    files: list[tuple[Path, int]] = []
    total, i = 0, 0
    hi = max(16 * MiB + 1, min(256 * MiB, c.capacity // 4))
    while total < c.capacity // 2 and not c.done:
        size = log_uniform(rng, 16 * MiB, hi)
        p = c.mnt / "db" / f"big{i:04d}"
        c.new_file(p, size)
        files.append((p, size))
        total += size
        i += 1
    syncfs(c.mnt)
    event_every = max(MiB, c.capacity // 16)
    next_event = c.written + event_every
    while not c.done:
        k = rng.randrange(len(files))
        p, size = files[k]
        n = min(size, log_uniform(rng, 4 * KiB, MiB))
        off = rng.randrange(0, size - n + 1) // 4096 * 4096
        fd = os.open(p, os.O_WRONLY)
        try:
            c.write_at(fd, off, n)
        finally:
            os.close(fd)
        if c.written >= next_event:
            next_event += event_every
            if rng.random() < 0.5:  # truncate and grow again by appending
                keep = int(size * rng.uniform(0.1, 0.9)) // 4096 * 4096
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.ftruncate(fd, keep)
                    c.removed()
                    syncfs(c.mnt)
                    c.write_at(fd, keep, size - keep)
                finally:
                    os.close(fd)
            else:  # deleted and written anew, maybe another size
                p.unlink()
                c.removed()
                syncfs(c.mnt)
                new = log_uniform(rng, 16 * MiB, hi)
                new = min(new, size + max(0, c.capacity // 2 - sum(s for _, s in files)))
                c.new_file(p, new)
                files[k] = (p, new)


WORKLOADS: dict[str, Callable[[Churn], None]] = {
    "small": small_files, "logs": append_logs, "rewrite": rewrite_in_place}


# -- one run -------------------------------------------------------------------------------------

@dataclass
class Sample:
    written: int
    fig: Measured  # before the checkpoint's maintenance
    checkpoint: bool
    after: Measured | None = None  # after it (modes with maintenance)
    maint: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    workload: str
    mode: str
    setup: str
    samples: list[Sample]
    seconds: float
    skipped: str | None = None

    @property
    def final(self) -> Measured:
        s = self.samples[-1]
        return s.after or s.fig

    def peak(self, attr: str) -> float:
        return max(getattr(f, attr) for s in self.samples for f in (s.fig, s.after) if f is not None)

    @property
    def maint_seconds(self) -> float:
        return sum(s.maint.get("seconds", 0.0) for s in self.samples)

    def total(self, key: str) -> float:
        return sum(s.maint.get(key, 0.0) for s in self.samples)


def run_one(work: Path, size: int, times: float, workload: str, mode: Mode, setup: Setup, *, seed: int,
            pool: memoryview, sync_every: int = 32 * MiB, final_pass: bool = False,
            printer: Callable[[Sample], None] | None = None) -> Result:
    """One workload on a fresh VE in one mode. ``final_pass``: after the churn, one fstrim +
    compact (and a repack where the mode has one) even in a mode that does none, for the
    study's "what the churn leaves" figures."""
    if mode.repack and repack_module() is None:
        return Result(workload, mode.name, setup.name, [], 0.0, skipped="fsnotifyd.image.repack not there yet")
    tag = f"{workload}-{mode.name.replace('+', '_')}-{setup.name}"
    samples: list[Sample] = []
    t0 = time.perf_counter()
    with VE(work, tag, size, setup, mode) as ve:
        def on_sample(written: int, checkpoint: bool) -> None:
            s = Sample(written, ve.figures(), checkpoint)
            if checkpoint and (mode.fstrim_compact or mode.repack):
                s.maint = ve.maintain()
                s.after = ve.figures()
            samples.append(s)
            if printer is not None and checkpoint:
                printer(s)

        samples.append(Sample(0, ve.figures(), True))
        if printer is not None:
            printer(samples[0])
        churn = Churn(ve, int(times * size), pool, random.Random(f"{seed}-{workload}"), sync_every, on_sample)
        WORKLOADS[workload](churn)
        last = samples[-1]
        # The figures end on what the churn leaves: a last checkpoint unless the last sample was
        # one and nothing changed since (a churn that stops mid-fill still deletes its round).
        if not (last.checkpoint and churn.sampled_at == churn.changes):
            if churn.sampled_at == churn.changes:
                samples.pop()
            on_sample(churn.written, True)
            last = samples[-1]
        if final_pass and last.after is None:
            from fsnotifyd.image import attach as at

            t1 = time.perf_counter()
            maint: dict[str, float] = {}
            if repack_module() is not None:
                maint.update({f"repack_{k}": v for k, v in repack_pass(ve.att).items()})
            sh("fstrim", str(ve.mnt))
            syncfs(ve.mnt)
            maint["compact_moved"] = at.compact(ve.att)["moved"]
            maint["seconds"] = time.perf_counter() - t1
            last.maint, last.after = maint, ve.figures()
    return Result(workload, mode.name, setup.name, samples, time.perf_counter() - t0)


# -- printing ------------------------------------------------------------------------------------

def fig_cells(f: Measured) -> str:
    return (f"{f.garbage:>7.2f} {f.fragmentation:>6.2f} {f.swelling:>6.2f} {f.df_ratio:>6.2f} "
            f"{f.allocated * f.cluster / MiB:>7.0f} {f.image_bytes / MiB:>6.0f} {f.df_used / MiB:>7.0f} "
            f"{100 * f.stale_share:>5.1f}")


# alloc: clusters mapped x cluster size; host: what the image's files take on the host (holes
# punched inside a cluster cost nothing there)
FIG_HEAD = (f"{'garbage':>7} {'frag':>6} {'swell':>6} {'df r.':>6} {'alloc':>7} {'host':>6} {'df used':>7} "
            f"{'stale%':>5}")


def checkpoint_printer(size: int) -> Callable[[Sample], None]:
    print(f"    {'written':>7} | before maintenance: {FIG_HEAD} | after: {FIG_HEAD} | pass")

    def show(s: Sample) -> None:
        line = f"    {s.written / size:>6.2f}x | {'':>20}{fig_cells(s.fig)}"
        if s.after is not None:
            line += f" | {'':>7}{fig_cells(s.after)} | {s.maint.get('seconds', 0):.1f}s"
            line += f" moved {int(s.maint.get('compact_moved', 0))}"
            if "repack_bytes_moved" in s.maint:
                line += (f", repack moved {s.maint['repack_bytes_moved'] / MiB:.0f} MiB, freed "
                         f"{int(s.maint.get('repack_clusters_freed', 0))} clusters")
        if s.fig.transient is not None:
            line += f" | before discards settled ({s.fig.settle_s:.1f} s): garbage {s.fig.transient:.2f}"
        print(line, flush=True)
    return show


def transient(r: Result) -> str:
    """The peak garbage counted before the discards settled ("-": not mounted with discard)."""
    xs = [f.transient for s in r.samples for f in (s.fig, s.after) if f is not None and f.transient is not None]
    return f"{max(xs):.2f}" if xs else "-"


def print_final(results: list[Result], size: int, times: float) -> None:
    print(f"\n  final, after {times:g}x {size / MiB:.0f} MiB written (alloc, host, df used: MiB; "
          f"df ratio beside Virtuozzo's {VIRTUOZZO_DF_RATIO}):")
    print(f"  {'workload':<8} {'mode':<15} {'peak garb':>9} {'pk stale%':>9} {'pk transient':>12} {'garbage':>7} "
          f"{'frag':>6} {'swell':>6} "
          f"{'df ratio':>8} {'VZ':>4} {'alloc':>7} {'host':>6} {'df used':>7} {'peak alloc':>10} {'peak host':>9} "
          f"{'maint':>6} {'time':>6}")
    for r in results:
        if r.skipped:
            print(f"  {r.workload:<8} {r.mode:<15} skipped: {r.skipped}")
            continue
        f = r.final
        peak_alloc = max(x.allocated * x.cluster for s in r.samples for x in (s.fig, s.after) if x is not None)
        peak_host = max(x.image_bytes for s in r.samples for x in (s.fig, s.after) if x is not None)
        print(f"  {r.workload:<8} {r.mode:<15} {r.peak('garbage'):>9.2f} {100 * r.peak('stale_share'):>9.1f} "
              f"{transient(r):>12} {f.garbage:>7.2f} {f.fragmentation:>6.2f} "
              f"{f.swelling:>6.2f} {f.df_ratio:>8.2f} {VIRTUOZZO_DF_RATIO:>4} {f.allocated * f.cluster / MiB:>7.0f} "
              f"{f.image_bytes / MiB:>6.0f} {f.df_used / MiB:>7.0f} {peak_alloc / MiB:>10.0f} {peak_host / MiB:>9.0f} "
              f"{r.maint_seconds:>5.0f}s {r.seconds:>5.0f}s")
    print("\n  targets:")
    for r in results:
        if r.skipped:
            continue
        if r.mode == "defaults":
            pg = r.peak("garbage")
            print(f"    {r.workload:<8} peak garbage with the defaults {pg:.3f} (target <= {TARGET_PEAK_GARBAGE}): "
                  f"{'met' if pg <= TARGET_PEAK_GARBAGE else 'NOT met'}")
        if r.mode == "repack":
            fr = r.final.fragmentation
            print(f"    {r.workload:<8} fragmentation after a repack {fr:.3f} (target <= {TARGET_FRAG_AFTER_REPACK}): "
                  f"{'met' if fr <= TARGET_FRAG_AFTER_REPACK else 'NOT met'}")


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like ^C, so the VE in use is unmounted and detached (a run started with
    ``&`` from a script ignores SIGINT)."""
    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, stop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="VE disk size, MiB (default 2048)")
    ap.add_argument("--churn", type=float, default=10, help="written per workload, in disk sizes (default 10)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {','.join(WORKLOADS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 512 MiB, 3x")
    ap.add_argument("--profile", default="thin", choices=sorted(ops.MKFS_PROFILES), help="mkfs profile (default thin)")
    ap.add_argument("--cluster", type=int, default=DEFAULT_CLUSTER // KiB, help="image cluster, KiB (default 1024)")
    ap.add_argument("--sync-every", type=int, default=32, help="syncfs after every this many MiB written (default 32)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the images go (default: $TMPDIR)")
    args = ap.parse_args()
    configure_logging("warning")  # the attach/detach info lines would drown the figures
    stop_on_sigterm()
    if args.quick:
        args.size, args.churn = 512, 3
    workloads, modes = args.workloads.split(","), args.modes.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"--workloads: unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    if os.geteuid() != 0:
        print("image_swelling: needs root (loop devices, mounts, FUSE)", file=sys.stderr)
        return 1
    size = args.size * MiB
    setup = Setup(args.profile, args.profile, cluster=args.cluster * KiB)
    pool = memoryview(os.urandom(16 * MiB))  # random: no zero detection or compression helps
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-swell-", dir=args.dir) as tmp:
        print(f"image swelling: {machine_facts(tmp)}")
        print(f"  {args.size} MiB VE, mkfs profile {args.profile}, {args.cluster} KiB clusters, {args.churn:g}x its "
              f"size written per workload, syncfs every {args.sync_every} MiB, seed {args.seed}")
        if "repack" in modes and repack_module() is None:
            print("  note: fsnotifyd.image.repack is not there yet: the repack mode is skipped")
        for w in workloads:
            for m in modes:
                mode = MODES[m]
                if mode.repack and repack_module() is None:
                    results.append(Result(w, m, setup.name, [], 0.0, skipped="fsnotifyd.image.repack not there yet"))
                    continue
                print(f"\n  {w}, {m}")
                r = run_one(Path(tmp), size, args.churn, w, mode, setup, seed=args.seed, pool=pool,
                            sync_every=args.sync_every * MiB, printer=checkpoint_printer(size))
                print(f"    peak garbage {r.peak('garbage'):.2f}, {r.seconds:.0f} s", flush=True)
                results.append(r)
    print_final(results, size, args.churn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
