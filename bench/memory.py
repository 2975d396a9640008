"""Resident memory of the idle daemon with every source running.

Starts the daemon on a config equal to the embedded default but with private paths, waits for
it to be ready and idle, and prints VmRSS and VmHWM from /proc. Target: idle RSS < 60 MB.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rigs.daemon import RunningDaemon  # noqa: E402


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0])
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fsnd-mem-") as tmp:
        with RunningDaemon(Path(tmp), events_out=False) as d:
            st = d.status()
            time.sleep(3)
            m = proc_status(d.proc.pid)
    up = [n for n, s in st["sources"].items() if s["up"]]
    down = {n: s["reason"] for n, s in st["sources"].items() if not s["up"]}
    print(f"idle daemon memory, sources up: {up}" + (f", down: {down}" if down else ""))
    print(f"  VmRSS {m['VmRSS'] / 1024:.1f} MB (anon {m['RssAnon'] / 1024:.1f} MB, file {m['RssFile'] / 1024:.1f} MB), "
          f"peak VmHWM {m['VmHWM'] / 1024:.1f} MB")
    print(f"  target idle RSS < 60 MB: {'MET' if m['VmRSS'] < 60 * 1024 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
