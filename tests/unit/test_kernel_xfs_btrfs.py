"""XFS and btrfs kernel lines, captured on this kernel (6.18), through classify().

tests/fixtures/kernel/xfs-6.18.txt and btrfs-6.18.txt are ``dmesg`` output of real
corruptions: ``xfs_db -x`` writes to an unmounted image's inode, directory block, AGF, AGI,
free-space and inode btree roots and superblock, then a mount and reads; ``xfs_io -x -c
shutdown``; a byte of a btrfs file's data and of its fs tree leaf overwritten. Every line goes
through :func:`classify`; the facts are listed below, everything else (follow-ups, hex dumps,
notices) must give nothing.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from fsnotifyd.kernel.btrfs import dev_errs
from fsnotifyd.kernel.classify import classify
from fsnotifyd.kernel.kmsg import KmsgRecord
from fsnotifyd.kernel.xfs import shutdown_reasons

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kernel"
_DMESG = re.compile(r"\[\s*(\d+)\.(\d+)\] (.*)")


def observations(name: str) -> list[tuple[str, object]]:
    out = []
    for i, line in enumerate((FIXTURES / name).read_text().splitlines()):
        m = _DMESG.fullmatch(line)
        assert m is not None, line
        rec = KmsgRecord(seq=i, ts_usec=int(m.group(1)) * 1_000_000 + int(m.group(2)), level=3, facility=0,
                         message=m.group(3), props={})
        obs = classify(rec, 0.0)
        if obs is not None:
            out.append((m.group(3), obs))
    return out


def test_xfs_facts_one_per_kernel_fact():
    got = observations("xfs-6.18.txt")
    kinds = [(o.kind, o.kernel.structure) for _, o in got]
    # The verifier's rejections, one per structure (bnobt: each of the 40 writes that needed it).
    assert kinds.count(("fs.error", "xfs_bnobt")) == 40
    for structure in ("xfs_inode", "xfs_agf", "xfs_agi", "xfs_inobt", "dinode", "xfs_dir3_data_reada",
                      "xfs_dir3_data"):
        assert ("fs.error", structure) in kinds, structure
    assert kinds.count(("fs.error", "data")) == 10  # "page discard": written data dropped, per inode
    assert kinds.count(("fs.shutdown", None)) == 3  # user request, and the AGF and AGI mounts
    assert ("fs.mount_failed", "dinode") in kinds and ("fs.mount_failed", None) in kinds
    assert all(o.fs == "xfs" and o.device is not None and o.device.name == "loop0" for _, o in got)
    # The "metadata I/O error ... error 117/74" after each verifier line is the same fact: nothing.
    assert not any(text.startswith("XFS (loop0): metadata I/O error") for text, _ in got)


def test_xfs_fields():
    by_text = {text: o for text, o in observations("xfs-6.18.txt")}
    agf = next(o for t, o in by_text.items() if "xfs_agf block" in t)
    assert (agf.kernel.function, agf.kernel.daddr, agf.kernel.errno) == ("xfs_agf_verify", 0x40001, errno.EUCLEAN)
    crc = next(o for t, o in by_text.items() if "Metadata CRC error" in t)
    assert (crc.kernel.structure, crc.kernel.daddr, crc.kernel.errno) == ("xfs_dir3_data", 0x78, errno.EBADMSG)
    dinode = next(o for t, o in by_text.items() if "inode 0x17d dinode" in t)
    assert (dinode.kernel.inode, dinode.kernel.function) == (0x17D, "xfs_dinode_verify.part.0")
    user = next(o for t, o in by_text.items() if "xfs_fs_goingdown" in t)
    assert user.kind == "fs.shutdown" and user.details["flags"] == 0x6
    assert user.details["reasons"] == ["log_io_error", "force_umount"]
    assert (user.kernel.function, user.kernel.line, user.details["file"]) == ("xfs_fs_goingdown", 475,
                                                                               "fs/xfs/xfs_fsops.c")
    incore = next(o for t, o in by_text.items() if "Corruption of in-memory data" in t)
    assert incore.details["reasons"] == ["corrupt_incore"]
    root = next(o for t, o in by_text.items() if "Failed to read root inode" in t)
    assert (root.kernel.inode, root.kernel.errno) == (0x80, errno.EUCLEAN)
    d = user.kernel.to_dict()
    assert "structure" not in d and d["function"] == "xfs_fs_goingdown"
    assert agf.kernel.to_dict()["daddr"] == 0x40001


def test_btrfs_facts_and_fields():
    got = observations("btrfs-6.18.txt")
    assert [(o.kind, o.kernel.structure) for _, o in got] == [
        ("fs.error", "data"), ("fs.error", "data"), ("fs.error", "tree_block"), ("fs.mount_failed", None)]
    data = got[0][1]
    assert (data.kernel.inode, data.kernel.mirror, data.kernel.counter, data.details["root"],
            data.details["offset"]) == (257, 1, "corrupt", 5, 0)
    tree = got[2][1]
    assert (tree.kernel.daddr, tree.kernel.mirror, tree.details["level"]) == (5472256, 1, 1)
    assert got[3][1].kernel.errno == errno.EIO
    assert all(o.fs == "btrfs" and o.device.name == "loop0" for _, o in got)
    counters = [dev_errs(m.group(3)) for line in (FIXTURES / "btrfs-6.18.txt").read_text().splitlines()
                if (m := _DMESG.fullmatch(line)) and "errs:" in line]
    assert counters == [("/dev/loop0", {"wr": 0, "rd": 0, "flush": 0, "corrupt": n, "gen": 0}) for n in (1, 2)]


@pytest.mark.parametrize("line", [
    "XFS (loop0): Metadata corruption detected at",
    "XFS (loop0): metadata I/O error in \"f\" at daddr 0xzz len 1 error 5",
    "XFS (loop0): Corruption of in-memory data (0xq) detected at f (a:1).  Shutting down filesystem.",
    "XFS (): Ending clean mount",
    "BTRFS warning (device loop0): csum failed root x ino 257",
    "BTRFS error (device loop0 state EA): open_ctree failed: -x",
    "BTRFS (device loop0): csum failed root 5 ino 257 off 0 csum 0x1 expected csum 0x2 mirror 1",
])
def test_garbage_lines_give_nothing(line):
    rec = KmsgRecord(seq=1, ts_usec=1, level=3, facility=0, message=line, props={})
    assert classify(rec, 0.0) is None


def test_user_space_copies_are_ignored():
    line = "BTRFS warning (device loop0): csum failed root 5 ino 257 off 0 csum 0x1 expected csum 0x2 mirror 1"
    assert classify(KmsgRecord(seq=1, ts_usec=1, level=4, facility=0, message=line, props={}), 0.0) is not None
    assert classify(KmsgRecord(seq=1, ts_usec=1, level=4, facility=1, message=line, props={}), 0.0) is None


def test_shutdown_reasons_decode_every_flag():
    assert shutdown_reasons(0x3F) == ["meta_io_error", "log_io_error", "force_umount", "corrupt_incore",
                                      "corrupt_ondisk", "device_removed"]
    assert shutdown_reasons(0) == []
