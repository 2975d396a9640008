"""Allocation telemetry per filesystem: ``fs.alloc`` (``bpf/alloc.c``).

The program keeps cumulative per-device counters (blocks allocated, freed, discarded) and the
set of image-cluster sized regions holding allocations. Every period this source reads the
counters, publishes what changed for each mounted ext4 as one ``fs.alloc`` observation, and
computes the **swelling** figure: live regions (entered on a first allocation, left when a
discard covered them whole) over the regions the data in use needs (``statvfs`` used bytes /
region size, rounded up). A thin image grows by cluster, so a filesystem that spreads its
writes over fresh regions while its usage stays flat shows a rising figure, and trim shows up
as discards and a falling one.

Counting starts when the program is attached (or the filesystem is mounted, whichever is
later): regions a filesystem filled before that are not in the set until written again.

Each event also carries ``details.figures``: garbage, fragmentation, swelling and df ratio as
:mod:`fsnotifyd.image.thinness` defines them, read from GETFSMAP and the image's BAT by
:mod:`.alloc_figures` at most every ``figures_interval`` seconds per filesystem, in a worker
thread. A filesystem with no activity in a period gets an event only when it was measured again
since its last one (zero counts, fresh figures), so a rule that watches the figures still sees
an idle VE's state once per interval.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from ..events import Observation
from ..inventory import Inventory, Placement
from ..typing import Ready, Send
from . import bpfload
from .alloc_figures import FiguresClock, measure
from .bpf_errors import MINORBITS, SOURCE

log = structlog.get_logger("fsnotifyd.bpf")

FIELDS = ("allocated", "freed", "discarded", "regions_added", "regions_removed", "allocations")


def defines(region_bytes: int) -> dict[str, int]:
    """The program's build-time settings (also printed by ``fsnotifyd bpf show alloc``)."""
    return {"FSND_DEFAULT_SHIFT": max(0, int(math.log2(max(region_bytes // 4096, 1))))}


def kdev(major: int, minor: int) -> int:
    return (major << MINORBITS) | minor


@dataclass
class _Tracked:
    mount_seq: int | None
    shift: int
    block_size: int
    last: dict[str, int]


class BpfAllocSource:
    name = "bpf_alloc"

    def __init__(self, inventory: Inventory, interval: float = 10.0, region_mib: int = 1,
                 figures_interval: float = 60.0) -> None:
        self.inventory = inventory
        self.interval = interval
        self.region_bytes = region_mib << 20
        # 0: no figures (the GETFSMAP walk is skipped entirely).
        self.figures = FiguresClock(figures_interval) if figures_interval > 0 else None
        self.figures_failed = 0
        self.figures_seconds = 0.0  # the last measurement's cost, for status
        self.prog: bpfload.Loaded | None = None
        self._tracked: dict[int, _Tracked] = {}
        self._overflow = [0, 0, 0]
        self._lock = threading.Lock()
        self.published = 0

    def status(self) -> dict[str, Any]:
        p = self.prog
        return {"program": "alloc", "load_s": round(p.load_seconds, 3) if p else None, "interval_s": self.interval,
                "region_bytes": self.region_bytes, "devices": len(self._tracked), "published": self.published,
                "regions_not_tracked": self._overflow[0] + self._overflow[1],
                "figures_interval_s": self.figures.interval if self.figures else None,
                "figures_last_s": round(self.figures_seconds, 4), "figures_failed": self.figures_failed}

    def _load(self) -> None:
        self.prog = bpfload.load("alloc", defines(self.region_bytes))

    # -- per period -------------------------------------------------------------------------
    def _ext4_mounts(self) -> dict[int, Placement]:
        out: dict[int, Placement] = {}
        for p in self.inventory.mounts():
            # VE filesystems only: the host's own filesystems would add an event every period
            # that nobody acts on.
            if p.fs == "ext4" and p.device.devnum and p.mount and p.ve:
                out[kdev(*p.device.devnum)] = p
        return out

    def _forget(self, dev: int) -> None:
        """A new filesystem on a device number: drop what the old one left in the maps."""
        b = self.prog
        assert b is not None  # used only between _load() and close()
        regions = b[b"regions"]
        stale = [k for k in regions.keys() if k.dev == dev]
        for k in stale:
            try:
                del regions[k]
            except KeyError:
                pass
        try:
            del b[b"stats"][ct.c_uint32(dev)]
        except KeyError:
            pass

    def collect(self, now: float | None = None) -> tuple[list[Observation], int]:
        with self._lock:
            return self._collect(time.time() if now is None else now)

    def _collect(self, now: float) -> tuple[list[Observation], int]:
        b = self.prog
        assert b is not None  # used only between _load() and close()
        mounts = self._ext4_mounts()
        for dev, mounted in mounts.items():
            t = self._tracked.get(dev)
            if t is not None and t.mount_seq == mounted.mount_seq:
                continue
            if t is not None:
                self._forget(dev)
            try:
                bsize = os.statvfs(mounted.mount).f_bsize  # type: ignore[arg-type]  # _ext4_mounts: all have one
            except OSError:
                continue
            shift = max(0, int(math.log2(max(self.region_bytes // bsize, 1))))
            b[b"region_shift"][ct.c_uint32(dev)] = ct.c_uint32(shift)
            self._tracked[dev] = _Tracked(mounted.mount_seq, shift, bsize, dict.fromkeys(FIELDS, 0))
        stats = {int(k.value): v for k, v in b[b"stats"].items()}
        out: list[Observation] = []
        for dev, t in list(self._tracked.items()):
            p = mounts.get(dev)
            v = stats.get(dev)
            if p is None:
                # Unmounted: publish nothing more for it; a new mount starts afresh.
                del self._tracked[dev]
                self._forget(dev)
                continue
            if v is None and not (self.figures is not None and self.figures.unpublished(dev, p.mount_seq)):
                continue
            now_vals = t.last if v is None else {f: int(getattr(v, f)) for f in FIELDS}
            delta = {f: now_vals[f] - t.last[f] for f in FIELDS}
            t.last = now_vals
            if not any(delta[f] for f in ("allocated", "freed", "discarded")):
                # Idle: an event only to carry figures measured since the last one.
                if self.figures is None or not self.figures.unpublished(dev, p.mount_seq):
                    continue
            out.append(self._observation(p, t, now_vals, delta, now, dev))
        totals = [int(b[b"overflow"].sum(i).value) for i in range(3)]
        lost = sum(totals[:2]) - sum(self._overflow[:2])
        self._overflow = totals
        return out, lost

    def _observation(self, p: Placement, t: _Tracked, total: dict[str, int], delta: dict[str, int],
                     now: float, dev: int) -> Observation:
        region_blocks = 1 << t.shift
        region_bytes = region_blocks * t.block_size
        live = total["regions_added"] - total["regions_removed"]
        try:
            st = os.statvfs(p.mount)  # type: ignore[arg-type]  # _ext4_mounts keeps only mounted placements
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
        except OSError:
            used = None
        needed = math.ceil(used / region_bytes) if used else None
        details = {
            "period_s": self.interval,
            "blocks_allocated": delta["allocated"],
            "blocks_freed": delta["freed"],
            "blocks_discarded": delta["discarded"],
            "allocations": delta["allocations"],
            "regions_new": delta["regions_added"],
            "regions_released": delta["regions_removed"],
            "regions_touched_total": total["regions_added"],
            "regions_live": live,
            "regions_needed": needed,
            "swelling": round(live / needed, 3) if needed else None,
            "region_bytes": region_bytes,
            "block_size": t.block_size,
            "used_bytes": used,
            "totals": {"blocks_allocated": total["allocated"], "blocks_freed": total["freed"],
                       "blocks_discarded": total["discarded"]},
        }
        figures = self.figures.current(dev, p.mount_seq, time.monotonic()) if self.figures else None
        if figures is not None:
            details["figures"] = figures
        return Observation(source=SOURCE, kind="fs.alloc", time=now, device=p.device, fs="ext4", mount=p.mount,
                           details=details)

    async def measure_due(self) -> None:
        """Measure the figures of every filesystem due for it, one at a time, each in a worker
        thread (a GETFSMAP walk of a large filesystem must not stall the event loop)."""
        if self.figures is None:
            return
        mounts = self._ext4_mounts()
        with self._lock:
            self.figures.forget(set(mounts))
        for dev, p in mounts.items():
            if not self.figures.due(dev, p.mount_seq, time.monotonic()) or not p.mount:
                continue
            try:
                got = await asyncio.to_thread(measure, p.mount, p.image, self.region_bytes)
                self.figures_seconds = got["measure_s"]
            except Exception as e:  # noqa: BLE001 - a filesystem that refuses is reported, not fatal
                self.figures_failed += 1
                log.warning("bpf_alloc.figures_failed", mount=p.mount, image=p.image, error=str(e))
                got = None
            with self._lock:
                self.figures.put(dev, p.mount_seq, time.monotonic(), got)

    async def run(self, send: Send, ready: Ready) -> None:
        await asyncio.to_thread(self._load)
        assert self.prog is not None
        try:
            await asyncio.to_thread(self.collect)  # prime: shifts set, current counters as base
            ready()
            while True:
                await asyncio.sleep(self.interval)
                await self.measure_due()
                observations, lost = await asyncio.to_thread(self.collect)
                for obs in observations:
                    self.published += 1
                    send(obs)
                if lost > 0:
                    send(Observation(source=SOURCE, kind="events.lost", time=time.time(), count=lost,
                                     details={"reason": "bpf_map_full", "program": "alloc",
                                              "what": "regions not added to the set (swelling reads low)"}))
        finally:
            self.prog.close()
