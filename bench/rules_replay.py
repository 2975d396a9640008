"""Replay throughput of the rules engine: 50 rules over a 1,000,000-event JSONL log.

Generates a realistic log (fs.error storms on 200 VEs, read-only transitions, I/O errors,
device changes, a deterministic seed) and a 50-rule file, then replays the log with
`fsnotifyd rules test`'s code path (JSONL reader + engine) on one core, printing events/s and
the resident memory at 10 %, 50 % and 100 % of the replay (it must stay flat).
Target: >= 200,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsnotifyd.app import rulestest  # noqa: E402
from fsnotifyd.app.rulestest import Replay  # noqa: E402
from fsnotifyd.events import rfc3339  # noqa: E402
from fsnotifyd.replay.reader import read_timed_events  # noqa: E402
from fsnotifyd.rules import native  # noqa: E402

FUNCS = ["ext4_lookup", "__ext4_iget", "htree_dirblock_to_tree", "ext4_find_extent", "ext4_readdir",
         "ext4_validate_block_bitmap", "ext4_mb_generate_buddy", "dx_probe", "trigger_test_error"]
ERRNOS = [("EUCLEAN", 117), ("EBADMSG", 74), ("EIO", 5)]


TIERS = 5  # VEs 0..199 in five tiers of 40; the 50 rules are 10 policies x 5 tiers


def rules_yaml() -> str:
    """50 rules as a hosting operator would write them: ten policies, each per customer tier
    (a tier being a list of VE ids), with kinds, functions, errnos, thresholds, cooldowns."""
    policies = [
        ("first-error", "fs.error", {"count": {"ge": 1}}, None, "1h",
         [{"snapshot": {"keep": 3}}, {"fsck": {"mode": "check"}}]),
        ("repeated", "fs.error", {}, {"count": 3, "within": "10m"}, "1h", [{"isolate": {"mode": "readonly"}}]),
        ("lookup", "fs.error", {"kernel.function": {"in": ["ext4_lookup", "__ext4_iget"]}},
         {"count": 2, "within": "5m"}, None, [{"fsck": {"mode": "check"}}]),
        ("htree", "fs.error", {"kernel.function": {"in": ["htree_dirblock_to_tree", "dx_probe"]}}, None, "30m",
         [{"notify": {}}]),
        ("csum", "fs.error", {"kernel.errno.name": {"equals": "EBADMSG"}}, {"count": 5, "within": "1h"}, "2h",
         [{"snapshot": {}}]),
        ("eio", "fs.error",
         {"kernel.errno.name": {"equals": "EIO"}, "kernel.message": {"regex": "deleted inode.*|bad block.*"}},
         None, "10m", [{"notify": {"severity": "error"}}]),
        ("readonly", "fs.readonly", {}, None, "1h", [{"snapshot": {"keep": 3}}, {"notify": {"severity": "critical"}}]),
        ("writable", "fs.writable", {}, None, None, [{"notify": {"severity": "info"}}]),
        ("io", "blk.io_error", {}, {"count": 10, "within": "1m", "per": "device"}, "30m", [{"notify": {}}]),
        ("storm", "fs.*", {"count": {"ge": 5}}, None, "15m", [{"notify": {"severity": "warning"}}]),
    ]
    rules = []
    for tier in range(TIERS):
        ves = [str(v) for v in range(200) if v % TIERS == tier]
        for name, kind, where, threshold, cooldown, actions in policies:
            rule = {"name": f"{name}-tier{tier}",
                    "match": {"kind": kind, "ve": ves, **({"where": where} if where else {})},
                    "actions": actions}
            if threshold:
                rule["threshold"] = threshold
            if cooldown:
                rule["cooldown"] = cooldown
            rules.append(rule)
    return json.dumps({"version": 1, "rules": rules})  # JSON is YAML


def write_log(path: Path, n: int) -> None:
    t = 1_790_000_000.0
    with open(path, "w") as f:
        for i in range(n):
            t += random.expovariate(50.0)
            ve = random.randrange(200)
            r = random.random()
            kind = ("fs.error" if r < 0.85 else "fs.readonly" if r < 0.9 else "blk.io_error" if r < 0.97
                    else "fs.writable")
            errno_name, errno_num = random.choice(ERRNOS)
            ev = {"schema": "fsnotifyd.event/1", "id": f"{i:032x}", "time": rfc3339(t), "host": "h", "kind": kind,
                  "severity": "error", "device": {"major": 7, "minor": ve, "name": f"loop{ve}"}, "fs": "ext4",
                  "mount": f"/vz/root/{ve}", "ve": str(ve),
                  "kernel": {"errno": {"name": errno_name, "number": errno_num}, "function": random.choice(FUNCS),
                             "line": random.randrange(100, 6000), "inode": random.randrange(2, 10**6), "block": None,
                             "comm": "worker", "pid": None, "message": "deleted inode referenced: 18"},
                  "sources": ["kmsg", "fanotify", "sysfs"], "count": random.choice([1, 1, 1, 2, 5]),
                  "first_time": None, "last_time": None, "details": {}}
            f.write(json.dumps(ev, separators=(",", ":")) + "\n")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000)
    args = ap.parse_args()
    random.seed(7)
    with tempfile.TemporaryDirectory(prefix="fsnd-bench-rules-") as tmp:
        rules_path, log_path = Path(tmp) / "rules.yaml", Path(tmp) / "events.jsonl"
        rules_path.write_text(rules_yaml())
        t0 = time.perf_counter()
        write_log(log_path, args.n)
        print(f"generated {args.n} events ({log_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        n_read = sum(1 for _ in read_timed_events([str(log_path)]))
        read_rate = n_read / (time.perf_counter() - t0)
        print(f"reading and decoding alone: {read_rate:,.0f} events/s ({1e6 / read_rate:.2f} us/event)")
        results = {}
        for only_fired in (False, True):
            # The code path of `fsnotifyd rules test`: reader, engine in chunks, decisions streamed.
            r = Replay([str(rules_path)], [str(log_path)], only_fired=only_fired)
            marks = [(args.n // 10, "10%"), (args.n // 2, "50%")]
            mem = {"start": rss_mb()}
            decisions = 0
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for _ in r:
                decisions += 1
                if marks and r.events >= marks[0][0]:
                    mem[marks.pop(0)[1]] = rss_mb()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            mem["100%"] = rss_mb()
            results[only_fired] = r.events / wall
            engine = r.engine
            what = "fired decisions only (--only-fired)" if only_fired else "every decision (the rules test table)"
            print(f"replayed {r.events:,} events through {len(engine.compiled.rules)} rules, {what}: "
                  f"{r.events / wall:,.0f} events/s wall, {r.events / cpu:,.0f} events/s CPU, one core "
                  f"({'C core' if engine.native else 'Python core: ' + str(native.reason)})")
            s = engine.stats
            print(f"  {decisions:,} decisions listed; matched {s.matched:,}, fired {s.fired:,}, suppressed "
                  f"{s.suppressed_threshold:,} by threshold and {s.suppressed_cooldown:,} by cooldown; state kept: "
                  f"{len(engine._windows)} windows, {len(engine._cooldowns)} cooldowns")
            print("  RSS MB: " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))
        # The whole command, output included (formatting every row is the command's own cost).
        for fmt, only_fired in (("table", True), ("json", True), ("table", False)):
            t0 = time.perf_counter()
            with open(os.devnull, "w") as out, open(os.devnull, "w") as err:
                rulestest.run([str(rules_path)], [str(log_path)], fmt=fmt, only_fired=only_fired, out=out, err=err)
            wall = time.perf_counter() - t0
            print(f"fsnotifyd rules test --format {fmt}{' --only-fired' if only_fired else ''} > /dev/null: "
                  f"{wall:.1f} s, {args.n / wall:,.0f} events/s")
    print(f"target >= 200,000 events/s (replay: read, decide, every decision listed): "
          f"{'MET' if results[False] >= 200_000 else 'NOT MET'} ({results[False]:,.0f}; "
          f"{results[True]:,.0f} with --only-fired)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
