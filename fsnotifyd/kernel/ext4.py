"""ext4's kernel messages (fs/ext4/super.c, fs/ext4/ioctl.c; kernel 6.18). Pure.

=====================================================================  ========================
``EXT4-fs error (device D): FUNC:LINE: [inode #I: [block B: ]]comm C: [path P: ]MSG``
  (``__ext4_error``, ``__ext4_error_inode``, ``__ext4_error_file``)                  fs.error
``EXT4-fs error (device D): FUNC:LINE: group G, [inode I: ][block B:]MSG``
  (``__ext4_grp_locked_error``)                                                     fs.error
``EXT4-fs error (device D) in FUNC:LINE: ERRSTR`` (``__ext4_std_error``)            fs.error
``EXT4-fs warning (device D): FUNC:LINE: [inode #I: comm C: ]MSG``                  fs.warning
``EXT4-fs (D): Remounting filesystem read-only`` (``ext4_handle_error``)            fs.readonly
``EXT4-fs (D): shut down requested (FLAGS)`` (fs/ext4/ioctl.c)                      fs.shutdown
``EXT4-fs (D): mount failed`` (``__ext4_fill_super``, label ``failed_mount4``)      fs.mount_failed
=====================================================================  ========================

The other ``EXT4-fs (D): ...`` lines (mounted, unmounting, quota notes) are ``None``;
:func:`ext4_message` gives their device and text (the reason a later ``mount failed`` had).
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..events import Kernel, Observation
from .block import BLK_STS_ERRNO
from .kmsg import SOURCE, KmsgRecord, caller_pid, observation, record_device

__all__ = ["EXT4_ERRSTR", "PREFIX", "ext4_message", "ext4_report", "ext4_state"]

PREFIX = "EXT4-fs"

# ext4_decode_error() (fs/ext4/super.c); "error %d" is its fallback for other codes.
EXT4_ERRSTR: Mapping[str, int] = MappingProxyType(
    {
        "IO failure": _errno.EIO,
        "Out of memory": _errno.ENOMEM,
        "Corrupt filesystem": _errno.EUCLEAN,  # EFSCORRUPTED
        "Filesystem failed CRC": _errno.EBADMSG,  # EFSBADCRC
        "Readonly filesystem": _errno.EROFS,
        "Journal has aborted": _errno.EROFS,
    }
)

_SHUTDOWN_MODES = {0: "default", 1: "logflush", 2: "nologflush"}  # EXT4_GOING_FLAGS_*

_EXT4_REPORT = re.compile(
    r"EXT4-fs (?P<sev>error|warning)(?: \(device (?P<dev>[^)\s]*)\))?"
    r"(?P<form>:| in) (?P<func>[^\s:]+):(?P<line>\d+): ?(?P<rest>.*)",
    re.DOTALL,
)
# What __ext4_error{,_inode,_file} and __ext4_warning_inode put between FUNC:LINE and the text.
_EXT4_FIELDS = re.compile(
    r"(?:inode #(?P<ino>\d+): )?(?:block (?P<blk>\d+): )?(?:comm (?P<comm>.{1,16}?): )?"
    r"(?:path (?P<path>.*?): )?(?P<msg>.*)",
    re.DOTALL,
)
_EXT4_GROUP = re.compile(
    r"group (?P<grp>\d+), (?:inode (?P<ino>\d+): )?(?:block (?P<blk>\d+):)?(?P<msg>.*)", re.DOTALL
)
_EXT4_END_BIO = re.compile(
    r"I/O error (?P<sts>\d+) writing to inode (?P<ino>\d+) starting block (?P<blk>\d+)\)?"
)
_EXT4_MSG = re.compile(r"EXT4-fs \((?P<dev>[^)\s]*)\): (?P<text>.*)", re.DOTALL)
_SHUTDOWN = re.compile(r"shut down requested \((?P<flags>\d+)\)")
_ERROR_N = re.compile(r"error (-?\d+)")


def ext4_report(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """An ``EXT4-fs error ...`` or ``EXT4-fs warning ...`` line."""
    m = _EXT4_REPORT.fullmatch(msg)
    if m is None:
        return None
    kind = "fs.error" if m.group("sev") == "error" else "fs.warning"
    rest = m.group("rest")
    errno_: int | None = None
    ino = blk = None
    comm = None
    details: dict[str, Any] = {}
    if m.group("form") == " in":
        # __ext4_std_error: "in FUNC:LINE: ERRSTR"
        text = rest
        errno_ = EXT4_ERRSTR.get(rest)
        if errno_ is None:
            n = _ERROR_N.fullmatch(rest)
            if n is not None:
                errno_ = abs(int(n.group(1))) or None
    elif rest.startswith("group "):
        g = _EXT4_GROUP.fullmatch(rest)
        if g is None:
            return None
        details["group"] = int(g.group("grp"))
        ino = int(g.group("ino")) if g.group("ino") else None
        blk = int(g.group("blk")) if g.group("blk") else None
        text = g.group("msg").lstrip(" ")
    else:
        f = _EXT4_FIELDS.fullmatch(rest)
        if f is None:  # pragma: no cover - the pattern matches every string
            return None
        ino = int(f.group("ino")) if f.group("ino") else None
        blk = int(f.group("blk")) if f.group("blk") else None
        comm = f.group("comm")
        if f.group("path") is not None:
            details["path"] = f.group("path")
        text = f.group("msg")
        if kind == "fs.warning" and m.group("func") == "ext4_end_bio":
            # "I/O error 3 writing to inode 12 starting block 21761)": the number is a blk_status_t.
            b = _EXT4_END_BIO.match(text)
            if b is not None:
                status = int(b.group("sts"))
                details["blk_status"] = status
                errno_ = BLK_STS_ERRNO.get(status, _errno.EIO)
                ino = ino if ino is not None else int(b.group("ino"))
                blk = blk if blk is not None else int(b.group("blk"))
    return Observation(
        source=SOURCE,
        kind=kind,
        time=when,
        device=record_device(m.group("dev"), rec.props),
        kernel=Kernel(
            errno=errno_,
            function=m.group("func"),
            line=int(m.group("line")),
            inode=ino,
            block=blk,
            comm=comm,
            pid=caller_pid(rec.caller),
            message=text,
        ),
        fs="ext4",
        details=details,
    )


def ext4_message(rec: KmsgRecord) -> tuple[str, str] | None:
    """``(device, text)`` of an ``EXT4-fs (D): text`` line, else ``None``."""
    if not rec.message.startswith("EXT4-fs ("):
        return None
    m = _EXT4_MSG.fullmatch(rec.message)
    return None if m is None else (m.group("dev"), m.group("text"))


def ext4_state(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """An ``EXT4-fs (D): ...`` line that changes the filesystem's state (read-only, shut down,
    mount failed); ``None`` for the others."""
    m = _EXT4_MSG.fullmatch(msg)
    if m is None:
        return None
    text = m.group("text")
    details: dict[str, Any]
    if text == "Remounting filesystem read-only":
        kind, details = "fs.readonly", {"reason": "errors_remount_ro"}
    elif text == "mount failed":
        kind, details = "fs.mount_failed", {}
    elif text.startswith("shut down requested"):
        s = _SHUTDOWN.fullmatch(text)
        if s is None:
            return None
        flags = int(s.group("flags"))
        kind, details = "fs.shutdown", {"flags": flags}
        if flags in _SHUTDOWN_MODES:
            details["mode"] = _SHUTDOWN_MODES[flags]
    else:
        return None
    return observation(rec, when, kind, m.group("dev"), "ext4", text, details)
