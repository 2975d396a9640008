"""Which cgroups a process is in, from what BPF gives (a cgroup v2 id and a pid).

``bpf_get_current_cgroup_id()`` is the inode number of the task's cgroup v2 directory (kernfs
ids are inode numbers). On a pure v2 host that names the cgroup; on a hybrid host (v1
controllers plus ``/sys/fs/cgroup/unified``) container managers may place tasks only in v1
hierarchies, so the v2 id alone can be the root. The resolver therefore gives every membership
it can find: the v2 path from the id (a walk of the v2 mount, cached and re-walked on a miss),
and, while the process still exists, the paths of ``/proc/<pid>/cgroup``, v1 hierarchies
included.

A membership is ``(hierarchy, path)``: hierarchy ``""`` for v2, else the v1 hierarchy's name
as ``/proc/<pid>/cgroup`` spells it (``freezer``, ``cpu,cpuacct``, ``name=systemd``); the path
is relative to the hierarchy's root.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .mountinfo import read_mountinfo

Membership = tuple[str, str]


@dataclass(frozen=True)
class CgroupMounts:
    """Where the hierarchies are mounted: v2 mount points and v1 mount point → hierarchy name."""

    v2: tuple[str, ...] = ()
    v1: tuple[tuple[str, str], ...] = ()

    @classmethod
    def read(cls, mountinfo: str = "/proc/self/mountinfo") -> CgroupMounts:
        v2: list[str] = []
        v1: list[tuple[str, str]] = []
        for m in read_mountinfo(mountinfo):
            if m.fstype == "cgroup2":
                v2.append(m.mountpoint)
            elif m.fstype == "cgroup":
                opts = set(m.super_options) | set(m.mount_options)
                names = [o for o in opts if o.startswith("name=")]
                ctrls = sorted(o for o in opts if o in _V1_CONTROLLERS)
                v1.append((m.mountpoint, ",".join(ctrls + names)))
        return cls(tuple(v2), tuple(v1))

    def membership_of(self, path: str) -> Membership | None:
        """``/sys/fs/cgroup/freezer/ve101`` → ``("freezer", "/ve101")``; None if not under one."""
        path = os.path.normpath(path)
        best: tuple[int, Membership] | None = None
        for mnt in self.v2:
            if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
                cand = (len(mnt), ("", "/" + path[len(mnt):].strip("/")))
                best = cand if best is None or cand[0] > best[0] else best
        for mnt, name in self.v1:
            if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
                cand = (len(mnt), (name, "/" + path[len(mnt):].strip("/")))
                best = cand if best is None or cand[0] > best[0] else best
        return best[1] if best else None


_V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio", "perf_event",
    "net_prio", "hugetlb", "pids", "rdma", "misc",
})


def matches(spec: tuple[str | None, str], member: Membership) -> bool:
    """A VE's cgroup contains a process's membership (spec hierarchy ``None``: any hierarchy)."""
    hier, path = spec
    mh, mp = member
    if hier is not None and hier != mh:
        return False
    path = path.rstrip("/") or "/"
    return path == "/" and mp == "/" or mp == path or mp.startswith(path + "/")


@dataclass
class CgroupResolver:
    mounts: CgroupMounts = field(default_factory=CgroupMounts.read)
    proc: str = "/proc"
    rewalk_after: float = 1.0  # a miss re-walks the v2 tree at most this often
    _by_id: dict[int, str] = field(default_factory=dict, init=False)
    _walked: float = field(default=-1e9, init=False)

    def v2_path(self, cgroup_id: int) -> str | None:
        path = self._by_id.get(cgroup_id)
        if path is None and time.monotonic() - self._walked >= self.rewalk_after:
            self._walk()
            path = self._by_id.get(cgroup_id)
        return path

    def _walk(self) -> None:
        self._walked = time.monotonic()
        ids: dict[int, str] = {}
        for root in self.mounts.v2:
            stack = [root]
            while stack:
                d = stack.pop()
                try:
                    st = os.stat(d)
                    entries = list(os.scandir(d))
                except OSError:
                    continue  # removed while walking
                ids[st.st_ino] = "/" + d[len(root):].strip("/")
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        self._by_id = ids

    def proc_memberships(self, pid: int) -> list[Membership]:
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return []  # the process is gone
        out: list[Membership] = []
        for line in lines:
            _, _, rest = line.partition(":")
            hier, _, path = rest.partition(":")
            if path:
                out.append((hier, path))
        return out

    def memberships(self, cgroup_id: int, pid: int | None) -> tuple[Membership, ...]:
        found: list[Membership] = []
        v2 = self.v2_path(cgroup_id)
        if v2 is not None:
            found.append(("", v2))
        if pid:
            found += [m for m in self.proc_memberships(pid) if m not in found]
        return tuple(found)


def describe(members: Iterable[Membership]) -> list[str]:
    return [f"{h}:{p}" if h else p for h, p in members]
