"""Latency from a kernel fs error to its event on the daemon's socket, against bare readers.

Writes ``trigger_fs_error`` on a real loop-mounted ext4 N times (spaced, so each is its own
fact) and measures, for each, the time from just before the write to the arrival of the
fs.error event on a socket subscription. In the same run, two bare readers of the same kernel
interfaces, each a Python process of its own, see the same errors: one reads ``/dev/kmsg``, one
reads a fanotify ``FAN_FS_ERROR`` group marked on the filesystem. Their arrival times are the
floor: what any Python reader of these interfaces pays on this machine at this moment. Machines
differ by several times in speed, so the daemon's figures are printed as ratios to the floor.

Two phases of N errors each:
1. ext4's default kmsg rate limit in force, as on a real host (after 10 lines in 5 s kmsg
   prints nothing more; fanotify, the tracepoint and sysfs still see every error);
2. the rate limit off for this filesystem (``err_ratelimit_interval_ms`` = 0), so kmsg sees
   every error too.
The floor of an error is the earlier of the two bare readers. Prints p50/p90/p99/max of the
daemon and of each reader, and the daemon's p50 and p99 over the floor's. Target: daemon p99
<= 1.5x the floor's p99. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rigs.daemon import RunningDaemon  # noqa: E402
from tests.rigs.loop import loop_ext4  # noqa: E402

# Each bare reader prints "ready" once its kernel handle is open, then one line per record it
# read: "<CLOCK_MONOTONIC ns> <trigger index or -1>". Only the standard library: no daemon code.
KMSG_READER = r"""
import os, re, sys, time
fd = os.open("/dev/kmsg", os.O_RDONLY)
os.lseek(fd, 0, os.SEEK_END)
name = sys.argv[1].encode()
pat = re.compile(rb"\(device " + re.escape(name) + rb"\): .*latency-bench-(\d+)")
print("ready", flush=True)
while True:
    try:
        rec = os.read(fd, 8192)
    except BrokenPipeError:  # overrun: the records are gone, go on with the next
        continue
    t = time.monotonic_ns()
    m = pat.search(rec)
    if m:
        print(t, int(m.group(1)), flush=True)
"""

FANOTIFY_READER = r"""
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
FAN_CLASS_NOTIF, FAN_REPORT_FID, FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_FS_ERROR = 0, 0x200, 1, 0x100, 0x8000
fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID, os.O_RDONLY)
if fd < 0 or libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_FS_ERROR, -100,
                                sys.argv[1].encode()) < 0:
    sys.exit("fanotify: " + os.strerror(ctypes.get_errno()))
print("ready", flush=True)
while True:
    buf = os.read(fd, 65536)
    t = time.monotonic_ns()
    off = 0
    while off + 24 <= len(buf):
        (length,) = struct.unpack_from("I", buf, off)
        print(t, -1, flush=True)
        off += length
"""


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def stats(ms: list[float]) -> str:
    if not ms:
        return "no samples"
    return (f"p50 {percentile(ms, 50):.3f} ms  p90 {percentile(ms, 90):.3f} ms  p99 {percentile(ms, 99):.3f} ms  "
            f"max {max(ms):.3f} ms  mean {statistics.mean(ms):.3f} ms  (n={len(ms)})")


class BareReader:
    """One of the floor's readers, as a process of its own."""

    def __init__(self, name: str, code: str, arg: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready":
            self.stop()
            raise RuntimeError(f"bare {name} reader did not start: {line!r}")

    def stop(self) -> list[tuple[int, int]]:
        """End the reader (by its pid) and return (monotonic ns, index) of what it read."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        rows = []
        for line in out.splitlines():
            t, _, i = line.partition(" ")
            rows.append((int(t), int(i)))
        return rows


def arrivals(rows: list[tuple[int, int]], starts: list[int]) -> list[float | None]:
    """Per trigger, ms from its start to the first record of it: by index where the record names
    it (kmsg), else by time (fanotify: the first record after a start and before the next)."""
    out: list[float | None] = [None] * len(starts)
    for t, i in rows:
        if i < 0:
            i = max((k for k, s in enumerate(starts) if s <= t), default=-1)
        if 0 <= i < len(starts) and t >= starts[i] and out[i] is None:
            out[i] = (t - starts[i]) / 1e6
    return out


def phase(label: str, d: RunningDaemon, fs, n: int, gap: float, offset: int) -> bool:
    kmsg = BareReader("kmsg", KMSG_READER, fs.name)
    try:
        fan = BareReader("fanotify", FANOTIFY_READER, str(fs.mountpoint))
    except BaseException:
        kmsg.stop()
        raise
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    s.sendall(b'{"op":"tail","kinds":["fs.error"]}\n')
    f = s.makefile("rb")
    assert json.loads(f.readline())["ok"]
    fd = os.open(fs.sysfs / "trigger_fs_error", os.O_WRONLY)
    starts: list[int] = []
    lat: list[float] = []
    sources: dict[str, int] = {}
    try:
        for k in range(n):
            msg = f"latency-bench-{offset + k}".encode()
            t0 = time.monotonic_ns()
            os.pwrite(fd, msg, 0)
            while True:
                ev = json.loads(f.readline())
                if ev["device"]["name"] == fs.name:
                    break
            lat.append((time.monotonic_ns() - t0) / 1e6)
            starts.append(t0)
            key = "+".join(ev["sources"])
            sources[key] = sources.get(key, 0) + 1
            time.sleep(gap)
        time.sleep(0.2)  # the readers' last records
    finally:
        os.close(fd)
        s.close()
        k_rows, f_rows = kmsg.stop(), fan.stop()
    k_rows = [(t, i - offset) for t, i in k_rows]
    k_lat, f_lat = arrivals(k_rows, starts), arrivals(f_rows, starts)
    floor = [min(x for x in (a, b) if x is not None) if (a is not None or b is not None) else None
             for a, b in zip(k_lat, f_lat, strict=True)]
    paired = [(dl, fl) for dl, fl in zip(lat, floor, strict=True) if fl is not None]
    print(f"{label}")
    print(f"  daemon         {stats(lat)}")
    print(f"  bare kmsg      {stats([x for x in k_lat if x is not None])}")
    print(f"  bare fanotify  {stats([x for x in f_lat if x is not None])}")
    fl = [f for _, f in paired]
    dl = [d for d, _ in paired]
    print(f"  floor          {stats(fl)}")
    print(f"  sources seen by the daemon's events: {sources}")
    if not paired:
        print("  no error reached a bare reader: no ratio")
        return False
    r50 = percentile(dl, 50) / percentile(fl, 50)
    r99 = percentile(dl, 99) / percentile(fl, 99)
    ok = r99 <= 1.5
    print(f"  daemon / floor: p50 {r50:.2f}x  p99 {r99:.2f}x   target p99 <= 1.5x: {'MET' if ok else 'NOT MET'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=300, help="errors per phase")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between errors")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-") as tmp, loop_ext4(workdir=Path(tmp)) as fs:
        with RunningDaemon(Path(tmp) / "daemon", events_out=False) as d:
            d.wait_marked(fs)
            print(f"latency trigger_fs_error -> event, {args.n} errors per phase, {args.gap * 1000:.0f} ms apart; "
                  f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S')}")
            phase("(1) ext4's kmsg rate limit in force", d, fs, args.n, args.gap, 0)
            rl = fs.sysfs / "err_ratelimit_interval_ms"
            old = rl.read_text().strip()
            rl.write_text("0\n")
            try:
                phase("(2) rate limit off: kmsg sees every error", d, fs, args.n, args.gap, args.n)
            finally:
                rl.write_text(old + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
