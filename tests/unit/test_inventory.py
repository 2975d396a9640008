"""The inventory: device ↔ mount ↔ backing file ↔ VE, and VE id validation."""

from __future__ import annotations

import pytest

from fsnotifyd.errors import ConfigError
from fsnotifyd.events import Device
from fsnotifyd.inventory import VE, Inventory, SysBlock, validate_ve_id
from fsnotifyd.mountinfo import parse_mountinfo

TABLE = (
    "30 1 7:3 / /vz/root/101 rw - ext4 /dev/loop3 rw\n"
    "31 1 7:3 /sub /srv/bind rw - ext4 /dev/loop3 rw\n"
    "32 1 7:4 / /vz/root/102 ro - ext4 /dev/loop4 ro\n"
    "33 1 7:5 / /data rw - ext4 /dev/loop5 rw,emergency_ro\n"
    "34 1 0:40 / /run tmpfs rw - tmpfs tmpfs rw\n"
)


class FakeSys(SysBlock):
    names = {(7, 3): "loop3", (7, 4): "loop4", (7, 5): "loop5", (7, 9): "loop9"}

    def devnum(self, name):
        return {v: k for k, v in self.names.items()}.get(name)

    def name(self, major, minor):
        return self.names.get((major, minor))

    def backing_file(self, name):
        return {"loop5": "/images/103.img"}.get(name)


def inventory(ves, table=TABLE):
    return Inventory(ves=ves, mountinfo=lambda: parse_mountinfo(table), sys=FakeSys())


class TestPlacement:
    def test_root_mount_wins_over_bind_mount(self):
        """A device's mount is the mount of its filesystem root, not a bind of a subdir."""
        p = inventory([]).place(Device(name="loop3"))
        assert p.mount == "/vz/root/101" and p.device == Device(7, 3, "loop3") and p.fs == "ext4"

    def test_ve_by_mount_device_and_image(self):
        """A VE owns a device by mount point, by device name or number, or by backing file."""
        inv = inventory([VE("101", mounts=("/vz/root/101",)), VE("102", devices=("7:4",)),
                         VE("103", images=("/images/103.img",))])
        assert inv.place(Device(7, 3)).ve == "101"
        assert inv.place(Device(name="loop4")).ve == "102"
        assert inv.place(Device(name="loop5")).ve == "103"
        assert inv.place(Device(name="loop5")).emergency_ro
        assert inv.place(Device(0, 40)) is None or inv.place(Device(0, 40)).mount is None

    def test_unmounted_device_is_still_placed(self):
        """A device with no mounted fs gets its number from sysfs and no mount."""
        p = inventory([VE("109", devices=("loop9",))]).place(Device(name="loop9"))
        assert p.device == Device(7, 9, "loop9") and p.mount is None and p.ve == "109"

    def test_last_seen_placement_survives_umount(self):
        """After an umount, a late event for the device keeps its last mount and VE."""
        table = [TABLE]
        inv = Inventory(ves=[VE("101", mounts=("/vz/root/101",))], mountinfo=lambda: parse_mountinfo(table[0]),
                        sys=FakeSys())
        table[0] = ""
        inv.refresh()
        p = inv.place(Device(name="loop3"))
        assert p.mount == "/vz/root/101" and p.ve == "101"


class TestVeIds:
    @pytest.mark.parametrize("bad", ["", "..", "a/b", "../etc", "a..b", "-x", "x" * 65, 7, None, "a b"])
    def test_rejected(self, bad):
        """Ids that could escape a path or break a label are refused."""
        with pytest.raises(ConfigError):
            validate_ve_id(bad)

    @pytest.mark.parametrize("good", ["101", "ve-101", "web_1.prod", "a:b"])
    def test_accepted(self, good):
        """Ordinary ids pass."""
        assert validate_ve_id(good) == good

    def test_duplicate_ids_refused(self):
        """Two VEs with one id is a configuration error."""
        with pytest.raises(ConfigError):
            inventory([VE("1"), VE("1")])


class TestRegistration:
    def test_register_and_unregister_at_run_time(self):
        """A VE registered later owns its device at once; unregistered, it owns nothing."""
        inv = inventory([])
        assert inv.place(Device(name="loop4")).ve is None
        inv.register(VE("102", devices=("loop4",)))
        assert inv.place(Device(name="loop4")).ve == "102"
        inv.unregister("102")
        assert inv.place(Device(name="loop4")).ve is None
