"""The mount table as a source: read-only transitions, and the inventory kept current.

ext4's ``errors=remount-ro`` and a journal abort set ``emergency_ro`` on the superblock without
touching the mount table, so no mountinfo change event announces them: the table is polled on a
short period as well as re-read whenever the kernel signals a change.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..errors import SourceUnavailable
from ..events import Observation
from ..inventory import Inventory, Placement
from ..mountinfo import MOUNTINFO, MountTableWatch
from ..typing import Ready, Send


@dataclass
class MountsSource:
    inventory: Inventory
    interval: float = 0.5
    path: str = MOUNTINFO
    name: str = "mountinfo"
    # (major, minor, mount_seq) -> readonly; a new mount has its own state (mount ids are reused).
    _ro: dict[tuple[int, int, int], bool] = field(default_factory=dict)

    def check(self, send: Send, *, initial: bool = False) -> None:
        self.inventory.refresh()
        now = time.time()
        current: dict[tuple[int, int, int], Placement] = {}
        for p in self.inventory.mounts():
            if p.device.devnum is None or p.mount_seq is None:
                continue
            current[(*p.device.devnum, p.mount_seq)] = p
        for key, p in current.items():
            before = self._ro.get(key)
            ro = bool(p.readonly)
            if before is None:
                # A mount seen for the first time is only news when ext4 forced it read-only;
                # an administrator's "ro" mount is a choice, not an incident.
                if ro and p.emergency_ro:
                    send(self._obs("fs.readonly", p, now, {"reason": "emergency_ro", "at_start": initial}))
            elif before != ro:
                if ro:
                    reason = "emergency_ro" if p.emergency_ro else "remounted_ro"
                    send(self._obs("fs.readonly", p, now, {"reason": reason}))
                else:
                    send(self._obs("fs.writable", p, now, {}))
            self._ro[key] = ro
        for gone in set(self._ro) - set(current):
            del self._ro[gone]

    def _obs(self, kind: str, p: Placement, now: float, details: dict) -> Observation:
        return Observation(
            source=self.name,
            kind=kind,
            time=now,
            device=p.device,
            fs=p.fs,
            mount=p.mount,
            details={**details, "mount_id": p.mount_id},
        )

    async def run(self, send: Send, ready: Ready) -> None:
        try:
            watch = MountTableWatch(self.path)
        except OSError as e:
            raise SourceUnavailable(f"cannot open {self.path}: {e.strerror}") from e
        loop = asyncio.get_running_loop()

        def on_change() -> None:
            # Re-read in the reader callback itself, not in a task woken by it: the correlator
            # then never places an observation of the same loop iteration on a stale table.
            watch.consume()
            self.check(send)

        try:
            self.check(send, initial=True)
            loop.add_reader(watch.fileno(), on_change)
            ready()
            while True:
                # ext4's emergency_ro changes no mount table event, so poll as well.
                await asyncio.sleep(self.interval)
                self.check(send)
        finally:
            loop.remove_reader(watch.fileno())
            watch.close()
