"""From the first kernel error on a VE to the VE isolated read-only, through the real daemon.

A VE on an fsnotifyd image, the daemon running with one rule (``fs.error`` on a VE ->
``isolate: {mode: readonly}``). Each round triggers a real ext4 error
(``/sys/fs/ext4/<loop>/trigger_fs_error``) and measures:

  kernel -> isolated   the fs.error event's time (the earliest kernel stamp among its
                       sources) to the daemon's ``action.succeeded`` for the isolate job
                       (the remount done and the exporter fenced);
  trigger -> ro seen   the trigger write to this process seeing the mount read-only in
                       /proc/self/mountinfo (polled every 0.2 ms).

Between rounds the VE is released (``fsnotifyd ve release``). Target: under 100 ms. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
from fsnotifyd.app.logging import configure_logging  # noqa: E402

RULES = """version: 1
rules:
  - name: error-isolate
    match:
      kind: fs.error
      where:
        ve: {exists: true}
    actions:
      - isolate: {mode: readonly}
"""


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def readonly(mountpoint: str) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == mountpoint:
            return "ro" in parts[5].split(",")
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--rounds", type=int, default=10)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    configure_logging("warning")
    from fsnotifyd.actions import isolate
    from fsnotifyd.actions.target import Targets
    from fsnotifyd.image import attach
    from fsnotifyd.ve import lifecycle
    from tests.rigs.daemon import RunningDaemon

    work = Path(tempfile.mkdtemp(prefix="fsnd-bench-iso-", dir=args.dir))
    print(f"isolation latency: {benchutil.machine_facts(str(work))}; {args.rounds} rounds")
    (work / "rules.yaml").write_text(RULES)
    sd = work / "d" / "state"
    kernel_to_isolated, trigger_to_ro = [], []
    with RunningDaemon(work / "d", extra_config=f"rules: [{work / 'rules.yaml'}]\n") as daemon:
        try:
            lifecycle.create(str(sd), "901", 64 << 20, mountpoint=str(work / "root"))
            rec = lifecycle.start(str(sd), "901")
            mp = rec.mountpoint
            while not any(v["id"] == "901" for v in daemon.status().get("ves", [])):
                time.sleep(0.05)
            trigger = Path("/sys/fs/ext4") / os.path.basename(rec.loop) / "trigger_fs_error"
            for i in range(args.rounds):
                stream = daemon.stream(["fs.error", "action.succeeded", "action.failed"])
                try:
                    time.sleep(0.2)
                    t0 = time.time()
                    trigger.write_text(f"bench round {i}")
                    while not readonly(mp) and time.time() - t0 < 5:
                        time.sleep(0.0002)
                    seen = time.time()
                    done = stream.wait_for(lambda e: e["kind"].startswith("action."), timeout=10)
                    errors = stream.wait_for(lambda e: e["kind"] == "fs.error", timeout=1)
                finally:
                    stream.close()
                if not done or done[0]["kind"] != "action.succeeded" or not errors:
                    print(f"  round {i}: no isolation ({done[:1]})")
                    continue
                kernel_to_isolated.append(stamp(done[0]["time"]) - stamp(errors[0]["time"]))
                trigger_to_ro.append(seen - t0)
                isolate.release(Targets(str(sd)), "901")
                # The error is on record: the kernel rate-limits its reports; a fresh second.
                time.sleep(1.1)
        finally:
            with contextlib.suppress(Exception):
                lifecycle.stop(str(sd), "901")
            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))
    for name, xs in (("kernel error -> isolated (daemon)", kernel_to_isolated),
                     ("trigger -> read-only seen", trigger_to_ro)):
        if xs:
            xs_ms = sorted(x * 1000 for x in xs)
            print(f"  {name:36s} median {statistics.median(xs_ms):6.1f} ms  "
                  f"p90 {xs_ms[int(0.9 * (len(xs_ms) - 1))]:6.1f} ms  max {xs_ms[-1]:6.1f} ms  (n={len(xs_ms)})")
    ok = kernel_to_isolated and statistics.median(kernel_to_isolated) < 0.1
    print(f"  target kernel error -> isolated < 100 ms: {'MET' if ok else 'NOT MET'}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
