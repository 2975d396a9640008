"""btrfs's kernel messages (fs/btrfs/messages.c, inode.c, disk-io.c, volumes.c; kernel 6.18).
Pure. Lines are ``BTRFS LEVEL (device D[ state S]): TEXT``; each format below was captured on
this kernel (tests/fixtures/kernel/btrfs-6.18.txt: a byte of a file's data and of a tree leaf
overwritten on the unmounted image).

========================================================================================  ===============
``csum failed root R ino I off O csum 0x.. expected csum 0x.. mirror M``
  (a data block whose checksum does not match; ``btrfs_print_data_csum_error``)          fs.error
``checksum verify failed on logical L mirror M wanted 0x.. found 0x.. level N``
  (a tree block; ``btrfs_validate_extent_buffer``)                                        fs.error
``open_ctree failed: -E``  (the mount gave up)                                            fs.mount_failed
``bdev /dev/D errs: wr W, rd R, flush F, corrupt C, gen G``
  (``btrfs_dev_stat_print_on_error``: the device's counters after the error above it)    ``None``
========================================================================================  ===============

The counters line follows every error the device counts and restates it: :func:`dev_errs`
reads it (for the counters' reconciliation), :func:`btrfs_message` returns ``None`` for it, as
for follow-ups (``failed to read fs tree: -E``) and notices (mount, unmount, features).
"""

from __future__ import annotations

import errno as _errno
import re
from typing import Any

from ..events import Observation
from .kmsg import KmsgRecord, observation

__all__ = ["COUNTERS", "PREFIX", "btrfs_message", "dev_errs"]

PREFIX = "BTRFS"

# The per-device counters (BTRFS_DEV_STAT_*), as the errs line and `btrfs device stats` name them.
COUNTERS = ("wr", "rd", "flush", "corrupt", "gen")

_LINE = re.compile(
    r"BTRFS (?P<level>emerg|alert|critical|error|warning|notice|info|debug)"
    r" \(device (?P<dev>[^)\s]+)(?: state (?P<state>[A-Za-z]+))?\): (?P<text>.*)",
    re.DOTALL,
)
_DATA_CSUM = re.compile(
    r"csum failed root (?P<root>-?\d+) ino (?P<ino>\d+) off (?P<off>\d+) csum 0x(?P<got>[0-9a-f]+)"
    r" expected csum 0x(?P<want>[0-9a-f]+) mirror (?P<mirror>\d+)"
)
_TREE_CSUM = re.compile(
    r"checksum verify failed on logical (?P<logical>\d+) mirror (?P<mirror>\d+)"
    r" wanted 0x(?P<want>[0-9a-f]+) found 0x(?P<got>[0-9a-f]+) level (?P<level>\d+)"
)
_OPEN_CTREE = re.compile(r"open_ctree failed(?:: -?(?P<err>\d+))?")
_ERRS = re.compile(
    r"bdev (?P<bdev>\S+) errs: wr (?P<wr>\d+), rd (?P<rd>\d+), flush (?P<flush>\d+),"
    r" corrupt (?P<corrupt>\d+), gen (?P<gen>\d+)"
)


def dev_errs(msg: str) -> tuple[str, dict[str, int]] | None:
    """``(bdev path, counters)`` of a ``bdev D errs: ...`` line, else ``None``."""
    m = _LINE.fullmatch(msg)
    if m is None:
        return None
    e = _ERRS.fullmatch(m.group("text").rstrip())
    if e is None:
        return None
    return e.group("bdev"), {c: int(e.group(c)) for c in COUNTERS}


def btrfs_message(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """A ``BTRFS LEVEL (device D): ...`` line, or ``None``."""
    m = _LINE.fullmatch(msg)
    if m is None:
        return None
    text = m.group("text").rstrip()
    kind = "fs.error"
    details: dict[str, Any] = {}
    if m.group("state"):
        details["state"] = m.group("state")
    k: dict[str, Any]
    if (d := _DATA_CSUM.fullmatch(text)) is not None:
        k = {"errno": _errno.EIO, "inode": int(d.group("ino")), "structure": "data",
             "mirror": int(d.group("mirror")), "counter": "corrupt"}
        details.update(root=int(d.group("root")), offset=int(d.group("off")),
                       csum=d.group("got"), expected=d.group("want"))
    elif (t := _TREE_CSUM.fullmatch(text)) is not None:
        k = {"errno": _errno.EUCLEAN, "structure": "tree_block", "daddr": int(t.group("logical")),
             "mirror": int(t.group("mirror"))}
        details.update(level=int(t.group("level")), csum=t.group("got"), expected=t.group("want"))
    elif (o := _OPEN_CTREE.fullmatch(text)) is not None:
        kind = "fs.mount_failed"
        k = {"errno": int(o.group("err"))} if o.group("err") else {}
    else:
        return None
    return observation(rec, when, kind, m.group("dev"), "btrfs", text, details, **k)
