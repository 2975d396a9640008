"""The VE registry: records, validation, concurrent writers, and the daemon inventory's view."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from fsnotifyd.errors import ConfigError
from fsnotifyd.inventory import Inventory, SysBlock
from fsnotifyd.mountinfo import MountEntry
from fsnotifyd.ve.registry import Registry, VeRecord


def rec(ve_id="101", **kw):
    return VeRecord(ve_id, kw.pop("image", f"/img/{ve_id}"), kw.pop("mountpoint", f"/vz/root/{ve_id}"), **kw)


def test_add_get_update_remove(tmp_path):
    reg = Registry(str(tmp_path))
    added = reg.add(rec(labels={"tier": "gold"}))
    assert added.created > 0
    assert reg.get("101") == added
    up = reg.update("101", running=True, loop="/dev/loop7", disk="/run/x/disk")
    assert reg.get("101").loop == "/dev/loop7" and up.running
    assert [r.id for r in reg.all()] == ["101"]
    reg.remove("101")
    assert reg.all() == []
    with pytest.raises(ConfigError, match="no VE '101'"):
        reg.get("101")


@pytest.mark.parametrize("other,match", [
    (rec("101", image="/img/x", mountpoint="/vz/x"), "already exists"),
    (rec("102", image="/img/x", mountpoint="/vz/root/101/"), "mount point"),
    (rec("102", image="/img/101", mountpoint="/vz/y"), "image"),
])
def test_ids_mountpoints_and_images_are_unique(tmp_path, other, match):
    reg = Registry(str(tmp_path))
    reg.add(rec())
    with pytest.raises(ConfigError, match=match):
        reg.add(other)


@pytest.mark.parametrize("bad_id", ["", "../x", "a/b", "x" * 300, ".hidden"])
def test_bad_ids_are_refused(tmp_path, bad_id):
    with pytest.raises(ConfigError):
        Registry(str(tmp_path)).add(rec(bad_id))


def test_a_broken_record_names_its_file_and_field_and_hides_no_other(tmp_path):
    reg = Registry(str(tmp_path))
    reg.add(rec("101"))
    path = os.path.join(reg.dir, "102.json")
    with open(path, "w") as f:
        json.dump({"id": "102", "image": "", "mountpoint": "/m"}, f)
    with pytest.raises(ConfigError) as e:
        reg.get("102")
    assert "102.json" in str(e.value) and "image" in str(e.value)
    assert [r.id for r in reg.all()] == ["101"]


def _add_many(state_dir: str, start: int) -> None:
    reg = Registry(state_dir)
    for i in range(start, start + 25):
        reg.add(rec(str(i)))
        reg.update(str(i), running=True)


def test_concurrent_writers_lose_nothing(tmp_path):
    """Four processes adding and updating at once: every record is there, whole."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), 1000 + 100 * k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = Registry(str(tmp_path)).all()
    assert len(recs) == 100 and all(r.running for r in recs)


class _NoSys(SysBlock):
    def name(self, major, minor):
        return f"loop{minor}" if major == 7 else None

    def devnum(self, name):
        return None

    def backing_file(self, name):
        return "/run/fsnotifyd/x/disk" if name == "loop9" else None


def test_the_inventory_picks_up_registered_ves_on_every_refresh(tmp_path):
    """A VE started from the CLI is known to the daemon from its next mount-table change:
    events on its mount point, its loop device or the FUSE file behind it carry its id."""
    reg = Registry(str(tmp_path))
    table: list[MountEntry] = []
    inv = Inventory(mountinfo=lambda: table, sys=_NoSys(), provider=reg.ves)
    reg.add(rec("101", mountpoint="/vz/root/101", labels={"tier": "gold"}))
    reg.update("101", running=True, loop="/dev/loop9", disk="/run/fsnotifyd/x/disk")
    table.append(MountEntry(mount_id=40, major=7, minor=9, root="/", mountpoint="/vz/root/101",
                            mount_options=frozenset({"rw"}), fstype="ext4", source="/dev/loop9",
                            super_options=frozenset({"rw"})))
    inv.refresh()
    [p] = inv.mounts()
    assert p.ve == "101"
    assert dict(next(v for v in inv.ves if v.id == "101").labels) == {"tier": "gold"}
    reg.update("101", running=False, loop=None, disk=None)
    reg.remove("101")
    inv.refresh()
    assert inv.mounts()[0].ve is None


def test_a_config_ve_wins_over_a_registered_one_and_a_broken_registry_is_survived(tmp_path):
    from fsnotifyd.inventory import VE

    reg = Registry(str(tmp_path))
    reg.add(rec("101"))
    inv = Inventory(ves=[VE("101", mounts=("/srv/a",))], mountinfo=lambda: [], sys=_NoSys(), provider=reg.ves)
    assert [v.mounts for v in inv.ves] == [("/srv/a",)]

    def broken():
        raise OSError("disk gone")

    inv2 = Inventory(mountinfo=lambda: [], sys=_NoSys(), provider=broken)
    assert inv2.ves == []
