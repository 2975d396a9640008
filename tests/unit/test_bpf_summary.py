"""The userspace halves of the BPF sources, without the kernel: cgroup ids to VEs, and a
drained ENOSPC map summarised into a handful of exact observations.

The cgroup tree and /proc are directories built in tmp_path (the resolver only reads files and
inode numbers); the drained entries are what the kernel maps hold (bpf_space.Call).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fsnotifyd.cgroups import CgroupMounts, CgroupResolver, matches
from fsnotifyd.events import Device
from fsnotifyd.inventory import VE, Inventory
from fsnotifyd.mountinfo import MountEntry
from fsnotifyd.sources.bpf_space import BpfSpaceSource, Call


def tree(tmp_path: Path) -> tuple[CgroupMounts, dict[str, int]]:
    root = tmp_path / "cg2"
    ids = {}
    for rel in ("", "ve101", "ve101/app", "ve102", "other"):
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        ids["/" + rel] = os.stat(d).st_ino
    return CgroupMounts(v2=(str(root),), v1=((str(tmp_path / "freezer"), "freezer"),)), ids


def proc(tmp_path: Path, pid: int, lines: str) -> Path:
    p = tmp_path / "proc" / str(pid)
    p.mkdir(parents=True)
    (p / "cgroup").write_text(lines)
    return tmp_path / "proc"


class TestCgroups:
    def test_membership_of_paths_under_mounts(self, tmp_path):
        mounts, _ = tree(tmp_path)
        assert mounts.membership_of(str(tmp_path / "cg2" / "ve101" / "app")) == ("", "/ve101/app")
        assert mounts.membership_of(str(tmp_path / "freezer" / "x")) == ("freezer", "/x")
        assert mounts.membership_of("/elsewhere/x") is None

    def test_matches_whole_path_components_only(self):
        assert matches((None, "/ve101"), ("", "/ve101/app"))
        assert not matches((None, "/ve10"), ("", "/ve101"))
        assert not matches(("freezer", "/ve101"), ("memory", "/ve101"))
        assert matches(("", "/ve101"), ("", "/ve101"))

    def test_resolver_id_then_proc_with_v1(self, tmp_path):
        mounts, ids = tree(tmp_path)
        procdir = proc(tmp_path, 42, "4:freezer:/ct7\n0::/ve102\n")
        r = CgroupResolver(mounts=mounts, proc=str(procdir))
        assert r.memberships(ids["/ve101/app"], None) == (("", "/ve101/app"),)
        assert r.memberships(ids["/ve102"], 42) == (("", "/ve102"), ("freezer", "/ct7"))
        assert r.memberships(999999999, 43) == ()  # gone from the tree and from /proc

    def test_resolver_sees_a_cgroup_made_later(self, tmp_path):
        mounts, _ = tree(tmp_path)
        r = CgroupResolver(mounts=mounts, rewalk_after=0)
        r.memberships(1, None)
        late = tmp_path / "cg2" / "late"
        late.mkdir()
        assert r.v2_path(os.stat(late).st_ino) == "/late"

    def test_inventory_deepest_ve_wins_and_v1_paths_match(self, tmp_path):
        mounts, _ = tree(tmp_path)
        inv = Inventory(ves=[VE("101", cgroup="/ve101"), VE("101-app", cgroup=str(tmp_path / "cg2" / "ve101" / "app")),
                             VE("ct7", cgroup=str(tmp_path / "freezer" / "ct7"))],
                        mountinfo=lambda: [], cgroup_mounts=lambda: mounts)
        assert inv.ve_for_cgroups([("", "/ve101/app/worker")]) == "101-app"
        assert inv.ve_for_cgroups([("", "/ve101/db")]) == "101"
        assert inv.ve_for_cgroups([("", "/"), ("freezer", "/ct7/sub")]) == "ct7"
        assert inv.ve_for_cgroups([("memory", "/ct7")]) is None
        assert inv.ve_for_cgroups([("", "/other")]) is None


def _mount(dev: tuple[int, int], mnt: str) -> MountEntry:
    return MountEntry(mount_id=100 + dev[1], major=dev[0], minor=dev[1], root="/", mountpoint=mnt,
                      mount_options=frozenset({"rw"}), fstype="ext4", source=f"/dev/loop{dev[1]}",
                      super_options=frozenset({"rw"}))


class TestSpaceSummary:
    def setup(self, tmp_path, mounts_list=()):
        mounts, ids = tree(tmp_path)
        procdir = proc(tmp_path, 7, "0::/ve101/app\n")
        inv = Inventory(ves=[VE("101", cgroup="/ve101", mounts=("/vz/101",)), VE("102", cgroup="/ve102")],
                        mountinfo=lambda: list(mounts_list), cgroup_mounts=lambda: mounts)
        src = BpfSpaceSource(inventory=inv, interval=1.0, resolver=CgroupResolver(mounts=mounts, proc=str(procdir)))
        return src, ids

    def test_one_observation_per_ve_and_errno_with_exact_counts(self, tmp_path):
        src, ids = self.setup(tmp_path)
        calls = [
            Call(ids["/ve101"], 10, "dd", 1, errno.ENOSPC, 600_000, 5, 9),
            Call(ids["/ve101/app"], 11, "python3", 1, errno.ENOSPC, 400_000, 3, 8),
            Call(ids["/ve101/app"], 11, "python3", 285, errno.ENOSPC, 7, 4, 4),
            Call(ids["/ve101"], 10, "dd", 1, errno.EDQUOT, 5, 6, 6),
            Call(ids["/ve102"], 12, "tar", 1, errno.ENOSPC, 3, 1, 2),
            Call(ids["/other"], 13, "cp", 1, errno.ENOSPC, 2, 1, 1),
        ]
        obs = src.summarise(calls, [], [0, 0, 0], now=100.0)
        by = {(o.ve, o.kind): o for o in obs}
        assert len(obs) == 4
        a = by[("101", "fs.enospc")]
        assert a.count == 1_000_007 and a.kernel.errno == errno.ENOSPC
        assert a.details["syscalls"] == {"write": 1_000_000, "fallocate": 7}
        assert a.details["processes"][0] == {"pid": 10, "comm": "dd", "count": 600_000}
        assert a.details["processes_total"] == 2
        assert sorted(a.details["cgroups"]) == ["/ve101", "/ve101/app"]
        assert by[("101", "fs.edquot")].count == 5
        assert by[("102", "fs.enospc")].count == 3
        outside = by[(None, "fs.enospc")]
        assert outside.count == 2 and outside.details["cgroups"] == ["/other"]

    def test_device_from_ext4_tracepoint_else_from_the_ve(self, tmp_path):
        src, ids = self.setup(tmp_path, [_mount((7, 3), "/vz/101")])
        calls = [Call(ids["/ve101"], 10, "dd", 1, errno.ENOSPC, 10, 5, 9)]
        with_dev = src.summarise(calls, [(ids["/ve101"], (7 << 20) | 3, errno.ENOSPC, 4)], [0, 0, 0])[0]
        assert with_dev.device == Device(7, 3, None) and with_dev.details["device_from"] == "ext4"
        assert with_dev.details["devices"] == [{"major": 7, "minor": 3, "ext4_failures": 4}]
        from_ve = src.summarise(calls, [], [0, 0, 0])[0]
        assert from_ve.device is not None and from_ve.device.devnum == (7, 3)
        assert from_ve.details["device_from"] == "ve"

    def test_overflow_is_counted_unattributed(self, tmp_path):
        src, _ = self.setup(tmp_path)
        obs = src.summarise([], [], [12, 1, 0])
        assert sorted((o.kind, o.count) for o in obs) == [("fs.edquot", 1), ("fs.enospc", 12)]
        assert all(o.ve is None and "unattributed" in o.details for o in obs)
