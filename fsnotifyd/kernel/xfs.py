"""XFS's kernel messages (fs/xfs/xfs_message.c, xfs_error.c, xfs_buf.c, xfs_fsops.c; kernel
6.18). Pure. Every line is ``XFS (D): TEXT``; each format below was captured on this kernel
(tests/fixtures/kernel/xfs-6.18.txt, made with ``xfs_db -x`` and ``xfs_io -x -c shutdown``).

==========================================================================================  ===============
``Metadata corruption detected at FUNC+0x../0x.., STRUCT block 0xDADDR [NAME]``
  (``xfs_verifier_error``: a verifier rejected a buffer; errno EFSCORRUPTED)                fs.error
``Metadata CRC error detected at FUNC+..., STRUCT block 0xDADDR``  (errno EFSBADCRC)        fs.error
``Metadata corruption detected at FUNC+..., inode 0xINO dinode``
  (``xfs_inode_verifier_error``)                                                            fs.error
``metadata I/O error in "FUNC+..." at daddr 0xD len N error E``  (``xfs_buf_ioerror_alert``)
  fs.error for a device error; ``None`` when E is EFSCORRUPTED/EFSBADCRC: the verifier's line
  just before it is that fact
``log I/O error -E``  (``xlog_ioend_work``)                                                 fs.error
``page discard on page P, inode 0xINO, pos N.``  (``xfs_discard_folio``: dirty data that
  could not be written back, dropped)                                                       fs.error
``REASON (0xFLAGS) detected at FUNC+... (FILE:LINE).  Shutting down filesystem.``
  (``xfs_do_force_shutdown``; REASON "Log I/O Error", "Metadata I/O Error", "Corruption of
  in-memory data", "Corruption of on-disk metadata", "Device removal"; flags decoded)       fs.shutdown
``Failed to read root inode 0xINO, error E``, ``Invalid superblock magic number``,
``SB validate failed with error -E.``, ``log mount failed``  (mount)                       fs.mount_failed
==========================================================================================  ===============

The follow-ups of those facts (``Unmount and run xfs_repair``, ``First 128 bytes of corrupted
metadata buffer:`` and its hex dump, ``User initiated shutdown received.``, ``Please unmount
the filesystem and rectify the problem(s)``, ``Uncorrected metadata errors detected; please run
xfs_repair.``, ``Error -E reserving per-AG metadata reserve pool.``) and the notices (mounting,
unmounting) are ``None``: one event per kernel fact.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..events import Observation
from .kmsg import KmsgRecord, observation

__all__ = ["PREFIX", "SHUTDOWN_FLAGS", "xfs_message"]

PREFIX = "XFS ("

EFSCORRUPTED = _errno.EUCLEAN  # fs/xfs/xfs_linux.h
EFSBADCRC = _errno.EBADMSG

# SHUTDOWN_* (fs/xfs/xfs_mount.h), the flags xfs_do_force_shutdown prints.
SHUTDOWN_FLAGS: Mapping[int, str] = MappingProxyType({
    0x1: "meta_io_error", 0x2: "log_io_error", 0x4: "force_umount", 0x8: "corrupt_incore",
    0x10: "corrupt_ondisk", 0x20: "device_removed",
})

_LINE = re.compile(r"XFS \((?P<dev>[^)\s]*)\): (?P<text>.*)", re.DOTALL)
_FUNC = r"(?P<func>[A-Za-z0-9_.]+)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?"
_VERIFIER = re.compile(
    r"Metadata (?P<what>corruption|CRC error) detected at " + _FUNC
    + r", (?:(?P<struct>\S+) block 0x(?P<daddr>[0-9a-f]+)(?: (?P<name>\S+))?"
    + r"|inode 0x(?P<ino>[0-9a-f]+) (?P<istruct>\S+))\s*"
)
_IOERROR = re.compile(
    r'metadata I/O error in "' + _FUNC + r'" at daddr 0x(?P<daddr>[0-9a-f]+) len (?P<len>\d+) error (?P<err>\d+)'
)
_LOG_IO = re.compile(r"log I/O error -?(?P<err>\d+)")
_SHUTDOWN = re.compile(
    r"(?P<reason>[A-Za-z][A-Za-z /-]*?) \(0x(?P<flags>[0-9a-f]+)\) detected at " + _FUNC
    + r" \((?P<file>[^:()]+):(?P<line>\d+)\)\.\s+Shutting down filesystem\.?"
)
_PAGE_DISCARD = re.compile(r"page discard on page \S+, inode 0x(?P<ino>[0-9a-f]+), pos (?P<pos>\d+)\.?")
_ROOT_INODE = re.compile(r"Failed to read root inode 0x(?P<ino>[0-9a-f]+), error (?P<err>\d+)")
_SB_VALIDATE = re.compile(r"SB validate failed with error -?(?P<err>\d+)\.?")
_MOUNT_FAILED = ("Invalid superblock magic number", "log mount failed")


def shutdown_reasons(flags: int) -> list[str]:
    return [name for bit, name in SHUTDOWN_FLAGS.items() if flags & bit]


def xfs_message(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """An ``XFS (D): ...`` line, or ``None`` (a follow-up, a notice, or not XFS's)."""
    m = _LINE.fullmatch(msg)
    if m is None:
        return None
    text = m.group("text").rstrip()
    kind = "fs.error"
    details: dict[str, Any] = {}
    k: dict[str, Any] = {}
    if text.startswith("Metadata "):
        v = _VERIFIER.fullmatch(text)
        if v is None:
            return None
        k["errno"] = EFSBADCRC if v.group("what") == "CRC error" else EFSCORRUPTED
        k["function"] = v.group("func")
        if v.group("ino") is not None:
            k["inode"] = int(v.group("ino"), 16)
            k["structure"] = v.group("istruct")
        else:
            k["structure"] = v.group("struct")
            k["daddr"] = int(v.group("daddr"), 16)
    elif text.startswith("metadata I/O error"):
        e = _IOERROR.fullmatch(text)
        if e is None:
            return None
        err = int(e.group("err"))
        if err in (EFSCORRUPTED, EFSBADCRC):
            return None  # the verifier's own line, just before, is this fact
        k.update(errno=err, function=e.group("func"), daddr=int(e.group("daddr"), 16))
        details["length"] = int(e.group("len"))  # 512-byte sectors
    elif text.startswith("log I/O error"):
        e = _LOG_IO.fullmatch(text)
        if e is None:
            return None
        k.update(errno=int(e.group("err")), structure="log")
    elif (pd := _PAGE_DISCARD.fullmatch(text)) is not None:
        k.update(errno=_errno.EIO, inode=int(pd.group("ino"), 16), structure="data")
        details["offset"] = int(pd.group("pos"))
    elif "Shutting down filesystem" in text:
        s = _SHUTDOWN.fullmatch(text)
        if s is None:
            return None
        kind = "fs.shutdown"
        flags = int(s.group("flags"), 16)
        details.update(flags=flags, reason=s.group("reason"), reasons=shutdown_reasons(flags),
                       file=s.group("file"))
        k.update(function=s.group("func"), line=int(s.group("line")))
    elif (r := _ROOT_INODE.fullmatch(text)) is not None:
        kind = "fs.mount_failed"
        k.update(errno=int(r.group("err")), inode=int(r.group("ino"), 16), structure="dinode")
    elif (sb := _SB_VALIDATE.fullmatch(text)) is not None:
        kind = "fs.mount_failed"
        k.update(errno=int(sb.group("err")), structure="sb")
    elif text in _MOUNT_FAILED:
        kind = "fs.mount_failed"
    else:
        return None
    return observation(rec, when, kind, m.group("dev"), "xfs", text, details, **k)
