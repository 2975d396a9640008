"""ENOSPC and EDQUOT storms, summarised: ``fs.enospc`` / ``fs.edquot`` (``bpf/space.c``).

The program counts failed syscalls in the kernel per (cgroup, process, comm, syscall, errno),
and the ext4 block-mapping failures per (cgroup, device, errno). Every period the source swaps
the program onto its spare maps (the swap waits out running programs, so nothing counted is
missed or counted twice), reads and clears the old ones, and publishes one observation per
VE (or per cgroup outside any VE) and errno, with the exact count, the top processes and
syscalls, and the device when ext4 named one. A million failing writes are a handful of events.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import errno as _errno
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from .. import syscalls
from ..cgroups import CgroupResolver, Membership, describe
from ..events import Device, Kernel, Observation
from ..inventory import Inventory
from ..typing import Ready, Send
from . import bpfload
from .bpf_errors import SOURCE, kernel_dev

log = structlog.get_logger("fsnotifyd.bpf")

KIND = {_errno.ENOSPC: "fs.enospc", _errno.EDQUOT: "fs.edquot"}
TOP = 10  # processes listed per event


def space_defines(ext4_devices: bool) -> dict[str, int]:
    """The program's build-time settings (also printed by ``fsnotifyd bpf show space``)."""
    return {"FSND_EXT4_DEVICES": 1} if ext4_devices else {}


def syscall_name(nr: int) -> str:
    # Not bcc.syscall: importing bcc would load LLVM into the daemon at the first storm.
    return syscalls.name(nr)


def _per_cpu(values: Any) -> tuple[int, int, str]:
    """Sum a per-CPU entry: (count, earliest first time, comm) over the CPUs that counted."""
    counted = [v for v in values if v.count]
    count = sum(int(v.count) for v in counted)
    first = min(counted, key=lambda v: v.first_ns) if counted else None
    if first is None:
        return 0, 0, ""
    comm = bytes(first.comm).split(b"\0", 1)[0].decode("utf-8", "replace") if hasattr(first, "comm") else ""
    return count, int(first.first_ns), comm


@dataclass
class Call:
    """One drained counting-map entry."""

    cgroup_id: int
    pid: int
    comm: str
    syscall: int
    err: int
    count: int
    first_ns: int
    last_ns: int


@dataclass
class Tally:
    """What one event of a period says: one VE (or cgroup) and one errno."""

    ve: str | None
    err: int
    members: list[Membership] = field(default_factory=list)
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    by_process: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    by_syscall: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cgroup_ids: set[int] = field(default_factory=set)
    unattributed: bool = False

    def add(self, c: Call, sysname: str) -> None:
        self.count += c.count
        self.first_ns = c.first_ns if not self.first_ns else min(self.first_ns, c.first_ns)
        self.last_ns = max(self.last_ns, c.last_ns)
        self.by_process[(c.pid, c.comm)] += c.count
        self.by_syscall[sysname] += c.count
        self.cgroup_ids.add(c.cgroup_id)


class BpfSpaceSource:
    name = "bpf_space"

    def __init__(self, inventory: Inventory | None = None, interval: float = 1.0,
                 resolver: CgroupResolver | None = None, defines: dict[str, int] | None = None,
                 ext4_devices: bool = False) -> None:
        self.inventory = inventory
        # FSND_KEYS, FSND_CG_KEYS: map sizes (tests shrink them); FSND_EXT4_DEVICES: the hooks
        # that name the device of failures in ext4's allocator
        self.defines = {**space_defines(ext4_devices), **(defines or {})}
        self.interval = interval
        self.resolver = resolver or CgroupResolver()
        self.prog: bpfload.Loaded | None = None
        self._spare = "b"
        self._overflow = [0, 0, 0]
        self.drained = 0  # failed calls published
        self.drains = 0
        self._wall_offset = time.time() - time.monotonic()
        self._draining = threading.Lock()  # the last drain at shutdown may meet a periodic one

    def status(self) -> dict[str, Any]:
        p = self.prog
        return {"program": "space", "load_s": round(p.load_seconds, 3) if p else None,
                "interval_s": self.interval, "failures_counted": self.drained, "drains": self.drains,
                "unattributed": self._overflow[0] + self._overflow[1], "device_counts_dropped": self._overflow[2]}

    # -- the kernel side -------------------------------------------------------------------
    def _load(self) -> None:
        self.prog = bpfload.load("space", self.defines)
        self._point("a")  # until the slots point at maps, the programs count nothing

    def _point(self, suffix: str) -> None:
        b = self.prog
        assert b is not None  # used only between _load() and close()
        for outer, inner in ((b"cache_now", "cache"), (b"calls_now", "calls"), (b"cgs_now", "cgs"),
                             (b"devs_now", "devs")):
            # An update of an array of maps returns after an RCU grace period: no program still
            # counts into the map it replaced.
            b[outer][ct.c_int(0)] = ct.c_int(b[f"{inner}_{suffix}".encode()].map_fd)

    def drain(self) -> tuple[list[Call], list[tuple[int, int, int, int]], list[int]]:
        """Swap maps and read the old ones: (calls, [(cgroup, dev, err, n)], overflow delta)."""
        with self._draining:
            return self._drain()

    def _drain(self) -> tuple[list[Call], list[tuple[int, int, int, int]], list[int]]:
        b = self.prog
        assert b is not None  # used only between _load() and close()
        old = "a" if self._spare == "b" else "b"
        self._point(self._spare)
        self._spare = old
        calls: list[Call] = []
        now_ns = time.monotonic_ns()  # the maps keep no last time: the drain bounds it
        for k, v in b[f"calls_{old}".encode()].items():
            count, first, comm = _per_cpu(v)
            calls.append(Call(k.cgroup_id, k.pid, comm, k.syscall, k.err, count, first, now_ns))
        cache = b[f"cache_{old}".encode()]
        for c in cache[ct.c_int(0)]:  # what each CPU had not yet moved into the hash
            if c.val.count:
                calls.append(Call(c.key.cgroup_id, c.key.pid,
                                  bytes(c.val.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
                                  c.key.syscall, c.key.err, int(c.val.count), int(c.val.first_ns), now_ns))
        del cache[ct.c_int(0)]  # zeroes every CPU's entry
        for k, v in b[f"cgs_{old}".encode()].items():
            count, first, _ = _per_cpu(v)
            calls.append(Call(k.cgroup_id, 0, "", -1, k.err, count, first, now_ns))
        devs = [(k.cgroup_id, k.dev, k.err, v.value) for k, v in b[f"devs_{old}".encode()].items()]
        for name in ("calls", "cgs", "devs"):
            b[f"{name}_{old}".encode()].clear()
        totals = [int(b[b"overflow"].sum(i).value) for i in range(3)]
        delta = [t - o for t, o in zip(totals, self._overflow, strict=True)]
        self._overflow = totals
        self.drains += 1
        return calls, devs, delta

    # -- summarising -------------------------------------------------------------------------
    def summarise(self, calls: Iterable[Call], devs: Iterable[tuple[int, int, int, int]],
                  overflow: list[int], now: float | None = None) -> list[Observation]:
        tallies: dict[tuple[str, int], Tally] = {}
        members_of: dict[tuple[int, int], tuple[Membership, ...]] = {}
        key_of_cgroup: dict[int, tuple[str, int]] = {}
        for c in calls:
            members = members_of.get((c.cgroup_id, c.pid))
            if members is None:
                members = members_of[(c.cgroup_id, c.pid)] = self.resolver.memberships(c.cgroup_id, c.pid or None)
            ve = self.inventory.ve_for_cgroups(members) if self.inventory else None
            v2 = next((p for h, p in members if h == ""), None)
            group = f"ve:{ve}" if ve else f"cgroup:{v2 if v2 is not None else c.cgroup_id}"
            t = tallies.get((group, c.err))
            if t is None:
                t = tallies[(group, c.err)] = Tally(ve, c.err)
            for m in members:
                if m not in t.members:
                    t.members.append(m)
            t.add(c, "unknown" if c.syscall < 0 else syscall_name(c.syscall))
            key_of_cgroup.setdefault(c.cgroup_id, (group, c.err))
        for i, err in enumerate((_errno.ENOSPC, _errno.EDQUOT)):
            if overflow[i]:
                t = tallies.setdefault(("unattributed", err), Tally(None, err, unattributed=True))
                t.count += overflow[i]
        dev_counts: dict[tuple[str, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for cg, dev, err, n in devs:
            gkey = (key_of_cgroup.get(cg, ("", err))[0], err)
            dev_counts[gkey][dev] += n
        now = time.time() if now is None else now
        out = []
        for gkey, t in tallies.items():
            devices = dev_counts.get(gkey, {})
            out.append(self._observation(t, devices, now))
        return out

    def _observation(self, t: Tally, devices: dict[int, int], now: float) -> Observation:
        top = sorted(t.by_process.items(), key=lambda kv: -kv[1])
        device: Device | None = kernel_dev(next(iter(devices))) if len(devices) == 1 else None
        device_from = "ext4" if device else None
        if device is None and not devices and t.ve and self.inventory is not None:
            # Delayed-allocation reservations fail before any tracepoint with a return value
            # (ext4_da_write_begin shows the write, nothing shows the failure): only failures
            # in ext4's block allocator (fallocate, nodelalloc, near-full fallback) name their
            # device. A VE with a single filesystem names it too.
            mine = [p.device for p in self.inventory.mounts() if p.ve == t.ve]
            if len(mine) == 1:
                device, device_from = mine[0], "ve"
        lead_pid, lead_comm = top[0][0] if top else (None, None)
        details: dict[str, Any] = {
            "period_s": self.interval,
            "processes": [{"pid": pid or None, "comm": comm or None, "count": n} for (pid, comm), n in top[:TOP]],
            "processes_total": len(top),
            "syscalls": dict(sorted(t.by_syscall.items(), key=lambda kv: -kv[1])),
            "cgroups": describe(t.members),
            "cgroup_ids": sorted(t.cgroup_ids),
            "devices": [{"major": d >> 20, "minor": d & 0xFFFFF, "ext4_failures": n}
                        for d, n in sorted(devices.items())],
            "device_from": device_from,
        }
        if t.unattributed:
            details["unattributed"] = "the counting maps were full: counted, but process and cgroup unknown"
        first = t.first_ns / 1e9 + self._wall_offset if t.first_ns else now
        last = t.last_ns / 1e9 + self._wall_offset if t.last_ns else now
        details["last_time"] = last
        return Observation(
            source=SOURCE, kind=KIND[t.err], time=first, device=device, count=t.count, ve=t.ve,
            kernel=Kernel(errno=t.err, comm=lead_comm or None, pid=lead_pid or None),
            details=details,
        )

    async def run(self, send: Send, ready: Ready) -> None:
        await asyncio.to_thread(self._load)
        assert self.prog is not None
        try:
            ready()
            while True:
                await asyncio.sleep(self.interval)
                await self.publish(send)
        finally:
            # One last drain, so failures counted since the last period are not lost at shutdown.
            try:
                calls, devs, over = self.drain()
                for obs in self.summarise(calls, devs, over):
                    send(obs)
            except Exception:  # noqa: BLE001
                log.exception("bpf.final_drain_failed", program="space")
            self.prog.close()

    async def publish(self, send: Send) -> None:
        calls, devs, over = await asyncio.to_thread(self.drain)
        observations = self.summarise(calls, devs, over)
        for obs in observations:
            self.drained += obs.count
            send(obs)
        lost = over[0] + over[1]
        if lost:
            send(Observation(source=SOURCE, kind="events.lost", time=time.time(), count=lost,
                             details={"reason": "bpf_map_full", "program": "space",
                                      "what": "process and cgroup of failed calls (the calls are counted)"}))
