"""The allocator study (issue 16 item 6): what an operator's choices do to a thin image, no kernel patch.

Each variant is one choice changed from the baseline (the ``thin`` mkfs profile, default mount
options and ext4 tunables, 1 MiB image clusters), run on the three churn workloads of
``bench/image_swelling.py`` (small files, append-only logs, large files rewritten in place)
with the same random sequence:

  mkfs       flex_bg size (-G 16 / 64 / 4096: thin's), packed_meta_blocks, journal size
             (-J size=4 / 16 / 256; 1 GiB gets 32 MiB by default), inode ratio (-i 4096 / 65536), mkfs's plain defaults;
  mount      mb_optimize_scan=0 / 1, discard (the defaults mode of the swelling bench);
  sysfs      /sys/fs/ext4/<dev>/mb_group_prealloc (64 / 256 / 2048 blocks; default 512),
             mb_stream_req (0 / 256 / 1024 blocks; default 16);
  cluster    the image's cluster: 64 KiB / 256 KiB (1 MiB is the baseline).

Mounted without ``discard`` (but for the discard variant) and nothing done during the churn, so
the figures show where the allocator put the data: peak garbage (and stale%: mapped clusters
that hold nothing), fragmentation and the df ratio at the end; then one fstrim + online compact
(and a repack pass once ``fsnotifyd.image.repack`` exists) shows what maintenance gets back and
what it costs (clusters moved). A second baseline run with another seed shows the noise.

Garbage and fragmentation are in image clusters, so the cluster variants change their scale:
compare them by the MiB allocated and the df ratio. For cluster size against BAT size and I/O
speed, ``--io`` runs ``bench/image_io.py --quick --only raw,image`` once per cluster size.
Needs root. Default 1 GiB VE, 4x churn per workload (the full bench's 2 GiB/10x times about
45 variants is too long on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import image_swelling as sw  # noqa: E402
from benchutil import machine_facts  # noqa: E402
from fsnotifyd.app.logging import configure_logging  # noqa: E402
from fsnotifyd.image import format as fmt  # noqa: E402

KiB, MiB = sw.KiB, sw.MiB
THIN_E = "lazy_itable_init=0,lazy_journal_init=0,nodiscard,stride=256,stripe_width=256"


def thin_args(*, extended: str = "", G: str = "4096", extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The thin profile's mkfs options with one changed (mke2fs takes only the last -E, so the
    extended options are merged here)."""
    e = THIN_E + ("," + extended if extended else "")
    return ("-b", "4096", "-E", e, *(("-G", G) if G else ()), *extra)


def variants() -> list[tuple[str, sw.Setup, str]]:
    """(group, setup, mode) per variant; the first is the baseline."""
    base = sw.Setup(name="baseline (thin)", profile="default", mkfs_args=thin_args())
    v = [("base", base, "none")]
    v += [("mkfs", replace(base, name="mkfs defaults", mkfs_args=("-b", "4096")), "none"),
          ("mkfs", replace(base, name="-G 16", mkfs_args=thin_args(G="16")), "none"),
          ("mkfs", replace(base, name="-G 64", mkfs_args=thin_args(G="64")), "none"),
          ("mkfs", replace(base, name="packed_meta_blocks", mkfs_args=thin_args(extended="packed_meta_blocks=1")),
           "none"),
          ("mkfs", replace(base, name="-J size=4", mkfs_args=thin_args(extra=("-J", "size=4"))), "none"),
          ("mkfs", replace(base, name="-J size=16", mkfs_args=thin_args(extra=("-J", "size=16"))), "none"),
          ("mkfs", replace(base, name="-J size=256", mkfs_args=thin_args(extra=("-J", "size=256"))), "none"),
          ("mkfs", replace(base, name="-i 4096", mkfs_args=thin_args(extra=("-i", "4096"))), "none"),
          ("mkfs", replace(base, name="-i 65536", mkfs_args=thin_args(extra=("-i", "65536"))), "none")]
    v += [("mount", replace(base, name="mb_optimize_scan=0", mount_opts=("mb_optimize_scan=0",)), "none"),
          ("mount", replace(base, name="mb_optimize_scan=1", mount_opts=("mb_optimize_scan=1",)), "none"),
          ("mount", replace(base, name="discard"), "defaults")]
    v += [("sysfs", replace(base, name=f"mb_group_prealloc={n}", sysfs=(("mb_group_prealloc", n),)), "none")
          for n in (64, 256, 2048)]
    v += [("sysfs", replace(base, name=f"mb_stream_req={n}", sysfs=(("mb_stream_req", n),)), "none")
          for n in (0, 256, 1024)]
    v += [("cluster", replace(base, name=f"cluster {c} KiB", cluster=c * KiB), "none") for c in (64, 256)]
    return v


def bat_bytes(size: int, cluster: int) -> int:
    entries = -(-size // cluster)
    return fmt.bat_region(cluster, entries)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="VE disk size, MiB (default 1024)")
    ap.add_argument("--churn", type=float, default=4, help="written per workload, in disk sizes (default 4)")
    ap.add_argument("--workloads", default=",".join(sw.WORKLOADS))
    ap.add_argument("--only", default=None,
                    help="comma-separated variant names or groups (base,mkfs,mount,sysfs,cluster)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--io", action="store_true", help="also bench/image_io.py --quick per cluster size")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    configure_logging("warning")
    sw.stop_on_sigterm()
    if os.geteuid() != 0:
        print("allocator_study: needs root (loop devices, mounts, FUSE)", file=sys.stderr)
        return 1
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in sw.WORKLOADS:
            ap.error(f"--workloads: unknown workload {w!r} (known: {', '.join(sw.WORKLOADS)})")
    todo = variants()
    if args.only:
        want = set(args.only.split(","))
        todo = [t for t in todo if t[0] in want or t[1].name in want]
    if todo and todo[0][0] == "base":  # the same baseline with other random files: the noise
        todo.append(("noise", replace(todo[0][1], name="baseline, seed +1"), "none"))
    size = args.size * MiB
    pool = memoryview(os.urandom(16 * MiB))
    rows: list[tuple[str, str, sw.Result]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsnd-study-", dir=args.dir) as tmp:
        print(f"allocator study: {machine_facts(tmp)}")
        print(f"  {args.size} MiB VE, {args.churn:g}x its size written per workload, syncfs every 32 MiB, "
              f"seed {args.seed}; "
              f"no maintenance during the churn, one fstrim + compact{' + repack' if sw.repack_module() else ''} after")
        for group, setup, mode in todo:
            seed = args.seed + (1 if group == "noise" else 0)
            for w in workloads:
                r = sw.run_one(Path(tmp), size, args.churn, w, sw.MODES[mode], setup, seed=seed, pool=pool,
                               final_pass=True)
                rows.append((group, setup.name, r))
                print_row(group, setup.name, r, size, setup.cluster, header=len(rows) == 1)
    print(f"\n  total {time.perf_counter() - t_all:.0f} s")
    print_summary(rows)
    if args.io:
        io_by_cluster(args)
    return 0


HEAD = (f"  {'group':<7} {'variant':<20} {'workload':<8} {'pk garb':>7} {'pk st%':>6} {'garbage':>7} {'frag':>5} "
        f"{'swell':>5} {'df r.':>5} {'pk MiB':>6} {'pk host':>7} {'mean fr':>7} | after fstrim+compact: {'MiB':>5} "
        f"{'host':>5} {'df r.':>5} {'frag':>5} {'moved':>6} {'BAT KiB':>7} {'time':>5}")


def print_row(group: str, name: str, r: sw.Result, size: int, cluster: int, header: bool) -> None:
    if header:
        print(HEAD)
    if r.skipped:
        print(f"  {group:<7} {name:<20} {r.workload:<8} skipped: {r.skipped}")
        return
    last = r.samples[-1]
    f, a = last.fig, last.after or last.fig
    peak_mib = max(s.fig.allocated * s.fig.cluster for s in r.samples) / MiB
    peak_host = max(s.fig.image_bytes for s in r.samples) / MiB
    moved = last.maint.get("compact_moved", 0) * cluster / MiB
    rep = "".join(f" {k}={v:g}" for k, v in last.maint.items() if k.startswith("repack_"))
    print(f"  {group:<7} {name:<20} {r.workload:<8} {r.peak('garbage'):>7.2f} {100 * r.peak('stale_share'):>6.1f} "
          f"{f.garbage:>7.2f} {f.fragmentation:>5.2f} {f.swelling:>5.2f} {f.df_ratio:>5.2f} {peak_mib:>6.0f} "
          f"{peak_host:>7.0f} {mean_frag(r):>7.3f} | {'':>20}: {a.allocated * a.cluster / MiB:>5.0f} "
          f"{a.image_bytes / MiB:>5.0f} {a.df_ratio:>5.2f} {a.fragmentation:>5.2f} "
          f"{moved:>4.0f}Mi {bat_bytes(size, cluster) / KiB:>7.0f} {r.seconds:>4.0f}s{rep}", flush=True)


def print_summary(rows: list[tuple[str, str, sw.Result]]) -> None:
    """Per variant, each figure against the baseline's on the same workload, in %."""
    base = {r.workload: r for g, _n, r in rows if g == "base" and not r.skipped}
    if not base:
        return
    print("\n  against the baseline, same workload (%; negative is better): peak stale% is in points")
    print(f"  {'variant':<20} {'workload':<8} {'pk MiB':>7} {'pk host':>7} {'pk st%':>7} {'mean fr':>7} "
          f"{'df r.':>6} {'maint MiB':>9} {'maint host':>10}")
    by_variant: dict[str, list[float]] = {}
    for g, n, r in rows:
        b = base.get(r.workload)
        if g == "base" or r.skipped or b is None:
            continue
        cells = [pct(peak_mib(r), peak_mib(b)), pct(peak_host(r), peak_host(b)),
                 100 * (r.peak("stale_share") - b.peak("stale_share")),
                 pct(mean_frag(r), mean_frag(b)),
                 pct(r.samples[-1].fig.df_ratio, b.samples[-1].fig.df_ratio),
                 pct(end_mib(r), end_mib(b)), pct(final(r).image_bytes, final(b).image_bytes)]
        by_variant.setdefault(n, []).append((cells[0], cells[1], cells[3], cells[5], cells[6]))
        widths = (7, 7, 7, 7, 6, 9, 10)
        print(f"  {n:<20} {r.workload:<8} " + " ".join(f"{c:>+{w}.1f}" for c, w in zip(cells, widths, strict=True)))
    print("\n  mean over the workloads, against the baseline (%): peak MiB allocated, peak host bytes, mean "
          "fragmentation, MiB allocated and host bytes after fstrim + compact")
    for n, xs in by_variant.items():
        print(f"    {n:<20} " + " ".join(f"{statistics.mean(col):>+7.1f}" for col in zip(*xs, strict=True)))


def mean_frag(r: sw.Result) -> float:
    """Fragmentation over the churn (the samples after the first fill), not at one instant: where
    in a fill/delete cycle the churn stops moves the last figure more than most choices do."""
    xs = [s.fig.fragmentation for s in r.samples if s.written >= r.samples[-1].written / 8]
    return statistics.mean(xs) if xs else 1.0


def final(r: sw.Result) -> sw.Measured:
    return r.samples[-1].after or r.samples[-1].fig


def peak_mib(r: sw.Result) -> float:
    return max(s.fig.allocated * s.fig.cluster for s in r.samples) / MiB


def peak_host(r: sw.Result) -> float:
    return max(s.fig.image_bytes for s in r.samples) / MiB


def end_mib(r: sw.Result, before: bool = False) -> float:
    f = r.samples[-1].fig if before else final(r)
    return f.allocated * f.cluster / MiB


def pct(x: float, base: float) -> float:
    return 100 * (x / base - 1) if base else 0.0


def io_by_cluster(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parent
    for c in (64, 256, 1024):
        print(f"\n  bench/image_io.py --quick --only raw,image --cluster {c}", flush=True)
        cmd = [sys.executable, str(here / "image_io.py"), "--quick", "--only", "raw,image", "--cluster", str(c)]
        if args.dir:
            cmd += ["--dir", args.dir]
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    sys.exit(main())
