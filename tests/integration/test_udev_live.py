"""UdevSource: kernel uevents for real loop attach / resize / detach, and the pure mapping.

Measured on 6.18 with kernel uevents (no udevd), for /dev/loopN:
  attach  -> change (no extra property, DISKSEQ=N, loop/backing_file present)
  resize  -> change RESIZE=1
  detach  -> change (no extra property, DISKSEQ=N again, backing_file gone)
             then change DISK_MEDIA_CHANGE=1 (DISKSEQ=N; sysfs diskseq becomes N+1)
This kernel has no partition table parser (no CONFIG_MSDOS_PARTITION/EFI_PARTITION), so loop
partitions cannot be made here; partition uevents are covered by the mapping tests below.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from fsnotifyd.events import Device, Observation
from fsnotifyd.sources.udev import UdevSource
from tests.rigs.loop import loop_device, run

from . import sourcekit


def running(src: UdevSource):
    return sourcekit.running(src, "uevents")


wait_until = sourcekit.wait_until


def whats(got: list[Observation], name: str) -> list[str | None]:
    return [o.details.get("what") for o in got if o.device and o.device.name == name]


@pytest.mark.kernel
def test_loop_attach_resize_detach(kernel: None) -> None:
    async def main() -> None:
        src = UdevSource()
        async with running(src) as got:
            with tempfile.TemporaryDirectory(prefix="fsnd-udev-") as tmp:
                image = Path(tmp) / "disk.img"
                with open(image, "wb") as f:
                    f.truncate(8 << 20)
                with loop_device(image) as dev:
                    name = os.path.basename(dev)
                    st = os.stat(dev)
                    device = Device(os.major(st.st_rdev), os.minor(st.st_rdev), name)
                    await wait_until(lambda: "attach" in whats(got, name))
                    [attach] = [o for o in got if o.device == device and o.details.get("what") == "attach"]
                    assert attach.source == "udev" and attach.kind == "dev.change"
                    assert attach.details["action"] == "change"
                    assert attach.details["devtype"] == "disk"
                    assert attach.details["backing_file"] == str(image)
                    assert isinstance(attach.details["diskseq"], int)
                    seq = attach.details["diskseq"]

                    with open(image, "r+b") as f:
                        f.truncate(16 << 20)
                    run("losetup", "-c", dev)
                    await wait_until(lambda: "resize" in whats(got, name))
                    [resize] = [o for o in got if o.device == device and o.details.get("what") == "resize"]
                    assert resize.kind == "dev.change" and resize.details["resize"] is True
                # detached by loop_device's exit
                await wait_until(lambda: "detach" in whats(got, name))
                ours = [o for o in got if o.device == device]
                ours = ours[[o.details.get("what") for o in ours].index("attach"):]
                assert [o.details.get("what") for o in ours][:4] == [
                    "attach", "resize", "detaching", "detach"]
                detaching, detach = ours[2], ours[3]
                assert all(o.kind == "dev.change" for o in ours[:4])
                assert detaching.details["diskseq"] == seq and "backing_file" not in detaching.details
                assert detach.details["disk_media_change"] is True and detach.details["diskseq"] == seq

    asyncio.run(main())


@pytest.mark.kernel
def test_detach_of_loop_bound_before_start(kernel: None) -> None:
    """A loop attached before the source started: its detach is not taken for an attach."""

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="fsnd-udev-") as tmp:
            image = Path(tmp) / "disk.img"
            with open(image, "wb") as f:
                f.truncate(4 << 20)
            src = UdevSource()
            async with running(src) as got:
                with loop_device(image) as dev:
                    name = os.path.basename(dev)
                    # Simulate "bound before start" by re-priming after the attach was consumed.
                    await wait_until(lambda: "attach" in whats(got, name))
                    src._loop_seq.clear()
                    src.prime()
                    got.clear()
                await wait_until(lambda: "detach" in whats(got, name))
                assert whats(got, name)[:2] == ["detaching", "detach"]

    asyncio.run(main())


# --- the mapping, without a kernel ---------------------------------------------------------


def props(action: str, name: str, devtype: str = "disk", parent: str | None = None,
          major: str = "7", **extra: str) -> dict[str, str]:
    path = f"/devices/virtual/block/{parent}/{name}" if parent else f"/devices/virtual/block/{name}"
    p = {"ACTION": action, "DEVPATH": path, "DEVNAME": f"/dev/{name}", "DEVTYPE": devtype,
         "MAJOR": major, "MINOR": "3", "SUBSYSTEM": "block", "SEQNUM": "100"}
    p.update(extra)
    return p


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> Path:
    (tmp_path / "block").mkdir()
    return tmp_path


def bind(sysfs: Path, name: str, backing: str | None, diskseq: int) -> None:
    d = sysfs / "block" / name
    (d / "loop").mkdir(parents=True, exist_ok=True)
    (d / "diskseq").write_text(f"{diskseq}\n")
    bf = d / "loop" / "backing_file"
    if backing is None:
        bf.unlink(missing_ok=True)
    else:
        bf.write_text(backing + "\n")


def test_loop_sequence_by_diskseq(fake_sysfs: Path) -> None:
    src = UdevSource(sysfs=fake_sysfs)
    bind(fake_sysfs, "loop3", "/img/a", 10)
    a = src.observe("change", props("change", "loop3", DISKSEQ="10"), now=1.0)
    assert a is not None
    assert (a.kind, a.device, a.time) == ("dev.change", Device(7, 3, "loop3"), 1.0)
    assert a.details == {"action": "change", "devtype": "disk", "diskseq": 10, "seqnum": 100,
                         "backing_file": "/img/a", "what": "attach"}
    r = src.observe("change", props("change", "loop3", DISKSEQ="10", RESIZE="1"))
    assert r is not None and r.details["what"] == "resize" and r.details["resize"] is True
    bind(fake_sysfs, "loop3", None, 10)
    d1 = src.observe("change", props("change", "loop3", DISKSEQ="10"))
    d2 = src.observe("change", props("change", "loop3", DISKSEQ="10", DISK_MEDIA_CHANGE="1"))
    assert d1 is not None and d1.details["what"] == "detaching" and "backing_file" not in d1.details
    assert d2 is not None and d2.details["what"] == "detach" and d2.details["disk_media_change"] is True
    # Re-attached (new diskseq), even if the event is read after the loop was detached again.
    late = src.observe("change", props("change", "loop3", DISKSEQ="12"))
    assert late is not None and late.details["what"] == "attach"


def test_prime_from_sysfs(fake_sysfs: Path) -> None:
    bind(fake_sysfs, "loop5", "/img/b", 7)
    bind(fake_sysfs, "loop6", None, 3)
    src = UdevSource(sysfs=fake_sysfs)
    src.prime()
    assert src._loop_seq == {"loop5": 7}
    bind(fake_sysfs, "loop5", None, 7)
    obs = src.observe("change", props("change", "loop5", DISKSEQ="7"))
    assert obs is not None and obs.details["what"] == "detaching"


def test_loop_without_diskseq_falls_back_to_backing_file(fake_sysfs: Path) -> None:
    src = UdevSource(sysfs=fake_sysfs)
    bind(fake_sysfs, "loop1", "/img/c", 1)
    obs = src.observe("change", props("change", "loop1"))
    assert obs is not None and obs.details["what"] == "attach"
    bind(fake_sysfs, "loop1", None, 1)
    obs = src.observe("change", props("change", "loop1"))
    assert obs is not None and obs.details["what"] == "detaching"


def test_add_remove_and_partitions(fake_sysfs: Path) -> None:
    src = UdevSource(sysfs=fake_sysfs)
    add = src.observe("add", props("add", "loop9"))
    rem = src.observe("remove", props("remove", "loop9"))
    assert add is not None and add.kind == "dev.add" and "what" not in add.details
    assert rem is not None and rem.kind == "dev.remove"
    part = src.observe("add", props("add", "loop9p1", devtype="partition", parent="loop9",
                                    PARTN="1", PARTNAME="root"))
    assert part is not None and part.kind == "dev.add"
    assert part.device == Device(7, 3, "loop9p1")
    assert part.details["devtype"] == "partition"
    assert (part.details["partn"], part.details["partname"], part.details["parent"]) == (1, "root", "loop9")
    assert "backing_file" not in part.details and "what" not in part.details
    gone = src.observe("remove", props("remove", "loop9p1", devtype="partition", parent="loop9", PARTN="1"))
    assert gone is not None and gone.kind == "dev.remove"


def test_non_loop_disks_and_other_actions(fake_sysfs: Path) -> None:
    src = UdevSource(sysfs=fake_sysfs)
    grow = src.observe("change", props("change", "vda", major="254", RESIZE="1"))
    assert grow is not None and grow.details["what"] == "resize"
    eject = src.observe("change", props("change", "sr0", major="11", DISK_MEDIA_CHANGE="1"))
    assert eject is not None and eject.details["what"] == "media_change"
    plain = src.observe("change", props("change", "vda"))
    assert plain is not None and "what" not in plain.details
    for action in ("bind", "unbind", "move", "online", None):
        assert src.observe(action, props(str(action), "vda")) is None
    # Missing or garbage numbers do not raise.
    odd = src.observe("change", {"ACTION": "change", "DEVPATH": "/devices/x/vdb", "MAJOR": "x"})
    assert odd is not None and odd.device == Device(None, None, "vdb")
