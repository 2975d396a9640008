"""Latency from a kernel fs error to its event on the daemon's socket.

Writes ``trigger_fs_error`` on a real loop-mounted ext4 N times (spaced, so each is its own
fact) and measures, for each, the time from just before the write to the arrival of the
fs.error event on a socket subscription. ext4's default kmsg rate limit is left in force, as
on a real host (after 10 lines in 5 s only fanotify and sysfs see the errors).
Prints p50/p90/p99/max. Target: p99 < 5 ms. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsnotifyd.testing import RunningDaemon, loop_ext4  # noqa: E402


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between errors")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-") as tmp, loop_ext4(workdir=Path(tmp)) as fs:
        with RunningDaemon(Path(tmp) / "daemon", events_out=False) as d:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            s.sendall(b'{"op":"tail","kinds":["fs.error"]}\n')
            f = s.makefile("rb")
            assert json.loads(f.readline())["ok"]
            fd = os.open(fs.sysfs / "trigger_fs_error", os.O_WRONLY)
            lat, sources = [], {}
            for _ in range(args.n):
                t0 = time.perf_counter()
                os.pwrite(fd, b"bench", 0)
                while True:
                    ev = json.loads(f.readline())
                    if ev["device"]["name"] == fs.name:
                        break
                lat.append(time.perf_counter() - t0)
                if os.environ.get("BENCH_DEBUG") and lat[-1] > 0.003:
                    print(f"  slow #{len(lat)} {lat[-1]*1000:.1f} ms {ev['sources']} count={ev['count']}")
                key = "+".join(ev["sources"])
                sources[key] = sources.get(key, 0) + 1
                time.sleep(args.gap)
            os.close(fd)
            s.close()
    ms = [x * 1000 for x in lat]
    print(f"latency trigger_fs_error -> socket event, n={len(ms)}")
    print(f"  p50 {percentile(ms, 50):.3f} ms  p90 {percentile(ms, 90):.3f} ms  "
          f"p99 {percentile(ms, 99):.3f} ms  max {max(ms):.3f} ms  mean {statistics.mean(ms):.3f} ms")
    print(f"  sources seen: {sources}")
    print(f"  target p99 < 5 ms: {'MET' if percentile(ms, 99) < 5 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
