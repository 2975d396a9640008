"""Loss accounting of the BPF sources on the real kernel: a ring buffer that fills up and
counting maps that run out of room become ``events.lost`` with exact counts, never silence.

The sources run alone (tests/integration/sourcekit.py); the losses are made real: the event
loop is kept from reading while the kernel produces records, and the maps are built small.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.sourcekit import running, wait_until
from tests.rigs.loop import loop_ext4


def test_full_ring_buffer_is_counted_as_lost(bpf_ready, tmp_path):
    """5000 ext4 errors while the loop does not read: the 256 KiB ring buffer holds part of
    them; every one is either delivered or counted in events.lost (bpf_ringbuf_full)."""
    from fsnotifyd.sources.bpf_errors import BpfErrorsSource

    n = 5000

    async def main() -> tuple[int, int, list]:
        src = BpfErrorsSource(lost_interval=0.2)
        with loop_ext4(32, workdir=tmp_path) as fs:
            async with running(src, "bpf_errors") as got:
                trigger = fs.sysfs / "trigger_fs_error"
                with open(trigger, "w") as f:  # the loop is blocked here: nothing is read
                    for i in range(n):
                        f.write(f"flood {i}\n")
                        f.flush()
                await wait_until(lambda: src.errors + src.lost >= n, timeout=10)
                await asyncio.sleep(0.5)  # anything more would be a double count
                return src.errors, src.lost, list(got)

    errors, lost, got = asyncio.run(main())
    assert lost > 0, "the ring buffer never filled: the test proves nothing"
    assert errors + lost == n
    lost_obs = [o for o in got if o.kind == "events.lost"]
    assert sum(o.count for o in lost_obs) == lost
    assert all(o.details["reason"] == "bpf_ringbuf_full" for o in lost_obs)
    assert sum(1 for o in got if o.kind == "fs.error") == errors


FAIL = "import os\nf = os.open('/dev/full', os.O_WRONLY)\nfor _ in range({k}):\n" \
       "    try:\n        os.write(f, b'x')\n    except OSError:\n        pass\n"


def fail_in(cg: Path, k: int) -> None:
    """One process in ``cg`` whose ``k`` writes to /dev/full fail with ENOSPC."""
    subprocess.run(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec {sys.executable} -c "$0"', FAIL.format(k=k)],
                   check=True)


def test_full_counting_maps_fall_back_then_count_as_lost(bpf_ready, make_cgroup):
    """Maps of 4 process keys and 1 cgroup key: cgroup A's 6 processes fill the process map and
    fall back to A's per-cgroup entry (still attributed); cgroup B then finds both full: what
    it moves out of the per-CPU cache is counted unattributed and reported as events.lost
    (what is still in a CPU's cache at the drain keeps its process). Every failure is counted."""
    from fsnotifyd.sources.bpf_space import BpfSpaceSource

    k = 10

    async def main() -> list:
        src = BpfSpaceSource(interval=3600, defines={"FSND_KEYS": 4, "FSND_CG_KEYS": 1})
        with make_cgroup("fsnd-loss-a") as a, make_cgroup("fsnd-loss-b") as b:
            async with running(src, "bpf_space") as got:
                await src.publish(got.append)  # start from empty maps
                got.clear()
                for _ in range(6):
                    await asyncio.to_thread(fail_in, a, k)
                for _ in range(3):
                    await asyncio.to_thread(fail_in, b, k)
                await src.publish(got.append)
                return [o for o in got]

    got = asyncio.run(main())
    enospc = [o for o in got if o.kind == "fs.enospc"]
    in_a = [o for o in enospc if f"/fsnd-loss-a-{os.getpid()}" in o.details["cgroups"]]
    in_b = [o for o in enospc if f"/fsnd-loss-b-{os.getpid()}" in o.details["cgroups"]]
    unattributed = [o for o in enospc if "unattributed" in o.details]
    lost = [o for o in got if o.kind == "events.lost"]
    assert sum(o.count for o in in_a) == 6 * k, [(o.count, o.details["cgroups"]) for o in enospc]
    u = sum(o.count for o in unattributed)
    assert u >= k and u + sum(o.count for o in in_b) == 3 * k, [(o.count, o.details["cgroups"]) for o in enospc]
    assert sum(o.count for o in lost) == u and lost[0].details["reason"] == "bpf_map_full"
    # other processes on the host may fail with ENOSPC too; ours are all there and nothing else is lost
    assert sum(o.count for o in enospc) >= 9 * k
