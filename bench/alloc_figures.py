#!/usr/bin/env python3
"""What one ``fs.alloc`` figures measurement costs (GETFSMAP walk + BAT read) on a VE.

Creates a VE of ``--size`` (default 2 GiB) in a scratch state directory, writes a tree of
files of 1 KiB-2 MiB to ``--fill`` of it and deletes a third (so the filesystem has many
extents to report), syncs, then times ``alloc_figures.measure`` ``--runs`` times and prints
min / median / max, and the figures. Root, FUSE and e2fsprogs needed. Run it on a quiet
machine: the figure is wall time.

    sudo .venv/bin/python bench/alloc_figures.py --size 2G --fill 0.5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsnotifyd.image import attach  # noqa: E402
from fsnotifyd.image.info import parse_size  # noqa: E402
from fsnotifyd.sources.alloc_figures import measure  # noqa: E402
from fsnotifyd.ve import lifecycle  # noqa: E402


def churn(root: str, budget: int, seed: int = 1) -> int:
    rnd = random.Random(seed)
    written, names = 0, []
    i = 0
    while written < budget:
        d = os.path.join(root, f"d{i % 64}")
        os.makedirs(d, exist_ok=True)
        n = rnd.choice((1 << 10, 8 << 10, 64 << 10, 512 << 10, 2 << 20))
        p = os.path.join(d, f"f{i}")
        with open(p, "wb") as f:
            f.write(os.urandom(n))
        names.append(p)
        written += n
        i += 1
    for p in rnd.sample(names, len(names) // 3):
        os.unlink(p)
    os.sync()
    return i


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(prefix="fsnd-figbench-") as sd:
        lifecycle.create(sd, "900", size, mountpoint=os.path.join(sd, "root"))
        try:
            rec = lifecycle.start(sd, "900")
            files = churn(rec.mountpoint, int(size * a.fill))
            times, got = [], {}
            for _ in range(a.runs):
                t0 = time.perf_counter()
                got = measure(rec.mountpoint, rec.image, 1 << 20)
                times.append(time.perf_counter() - t0)
            print(f"VE {a.size}, {files} files written, a third deleted")
            print(f"measure: min {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms, "
                  f"max {max(times) * 1e3:.1f} ms over {a.runs} runs")
            print({k: got[k] for k in ("garbage", "fragmentation", "swelling", "df_ratio", "holding", "allocated")})
        finally:
            lifecycle.stop(sd, "900")
            for att in attach.attached(os.path.join(sd, "run")):
                attach.detach(att, run_dir=os.path.join(sd, "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
