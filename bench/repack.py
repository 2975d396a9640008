"""Repack on a churned VE: fragmentation before/after, clusters freed, MiB moved, MiB/s, time.

    sudo .venv/bin/python bench/repack.py [--size 2G] [--rounds 8] [--load] [--discard on|off]

Creates a VE in a scratch state dir, churns it as issue 16 defines (files of 1 KiB-2 MiB
written to 50 % full, 65 % of the live files deleted, ``syncfs`` between steps, ``--rounds``
times), prints the dry run's plan, runs ``fsnotifyd ve repack --json`` and prints the figures.
With ``--load``, fio random writes in one file and a reader of random 4 KiB blocks (page cache
dropped before each read) run in the VE during the repack: the reader's p50/p99 are printed
idle and during the repack, and every file outside fio's is checked by SHA-256 afterwards.
Everything it starts is stopped and detached at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import machine_facts  # noqa: E402
from tests.rigs.files import churn, tree_digests  # noqa: E402


def fsnd(*argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fsnotifyd {' '.join(argv)}: {r.stderr.strip()[-800:]}")
    return r


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000 if xs else float("nan")


def reader(files: list[Path], stop: threading.Event, lat: list[float]) -> None:
    r = random.Random(5)
    while not stop.is_set():
        p = r.choice(files)
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                off = r.randrange(0, max(1, size - 4096)) & ~4095
                os.posix_fadvise(f.fileno(), off, 4096, os.POSIX_FADV_DONTNEED)
                t = time.monotonic()
                os.pread(f.fileno(), 4096, off)
                lat.append(time.monotonic() - t)
        except FileNotFoundError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--discard", choices=("on", "off"), help="the VE's online discard (default: the VE default)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="fsnd-repack-", dir=args.workdir))
    sd, mnt = top / "state", top / "root"
    print(machine_facts(str(top)))
    try:
        fsnd("ve", "create", "bench", "--size", args.size, "--mountpoint", str(mnt), "--state-dir", str(sd))
        if args.discard:
            fsnd("ve", "set", "bench", "--discard", args.discard, "--state-dir", str(sd))
        fsnd("ve", "start", "bench", "--state-dir", str(sd))
        t = time.monotonic()
        live = churn(mnt, rounds=args.rounds, fill=0.5, delete=0.65)
        print(f"churn: {args.rounds} rounds in {time.monotonic() - t:.0f} s, {len(live)} files left")
        print(fsnd("ve", "repack", "bench", "--dry-run", "--state-dir", str(sd)).stdout.strip())
        stop, lat_idle, lat_busy = threading.Event(), [], []
        fio = None
        if args.load:
            files = [p for p in live if p.stat().st_size >= 8192]
            th = threading.Thread(target=reader, args=(files, stop, lat_idle), daemon=True)
            th.start()
            time.sleep(5)
            stop.set()
            th.join()
            stop.clear()
            digests = tree_digests(mnt)
            fio = subprocess.Popen(["fio", "--name=rw", f"--filename={mnt}/fio.dat", "--size=64M", "--rw=randwrite",
                                    "--bs=4k", "--ioengine=psync", "--time_based", "--runtime=3600", "--fsync=32",
                                    "--thread"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            th = threading.Thread(target=reader, args=(files, stop, lat_busy), daemon=True)
            th.start()
        try:
            r = json.loads(fsnd("ve", "repack", "bench", "--json", "--state-dir", str(sd)).stdout)
        finally:
            stop.set()
            if fio is not None:
                fio.send_signal(signal.SIGKILL)
                fio.wait()
        b, a = r["before"], r["after"]
        print(f"fragmentation {b['fragmentation']} -> {a['fragmentation']}, garbage {b['garbage']} -> {a['garbage']}, "
              f"swelling {b['swelling']} -> {a['swelling']}, df ratio {b['df_ratio']} -> {a['df_ratio']} "
              f"(Virtuozzo's 1.5)")
        print(f"holding clusters {b['holding']} -> {a['holding']}, allocated {b['allocated']} -> {a['allocated']}; "
              f"{r['clusters_freed']} clusters freed, {r['bytes_moved'] / 2**20:.1f} MiB moved in {r['moved_files']} "
              f"files, {r['seconds']:.1f} s, {r['bytes_moved'] / 2**20 / max(r['seconds'], 1e-6):.1f} MiB/s "
              f"(whole pass: map, moves, trim, compact); released {r['released'] / 2**20:.1f} MiB; "
              f"skipped {r['skipped']}")
        if args.load:
            print(f"reader 4 KiB p50/p99: idle {percentile(lat_idle, .5):.2f}/{percentile(lat_idle, .99):.2f} ms, "
                  f"during the repack with fio {percentile(lat_busy, .5):.2f}/{percentile(lat_busy, .99):.2f} ms")
            now = tree_digests(mnt)
            bad = [k for k, d in digests.items() if k != "fio.dat" and now.get(k) != d]
            print(f"files checked: {len(digests) - 1}, changed: {len(bad)}")
            if bad:
                return 1
        return 0
    finally:
        subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "ve", "stop", "bench", "--state-dir", str(sd)],
                       capture_output=True)
        if str(top) not in Path("/proc/self/mountinfo").read_text():
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
