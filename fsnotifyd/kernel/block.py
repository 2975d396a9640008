"""The block layer's I/O error messages (kernel 6.18). Pure.

=====================================================================  ========================
``STATUS error, dev D, sector S op 0xN:(OP) flags ...`` (block/blk-core.c)          blk.io_error
``Buffer I/O error on dev D, logical block N[, CONTEXT]`` (fs/buffer.c) and
``Buffer I/O error on device D, logical block N`` (fs/ext4/page-io.c)               blk.io_error
=====================================================================  ========================
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..events import Kernel, Observation
from .kmsg import SOURCE, KmsgRecord, caller_pid, record_device

__all__ = ["BLK_MARK", "BLK_STATUS_ERRNO", "BLK_STS_ERRNO", "BUFFER_PREFIX", "buffer_error", "request_error"]

BUFFER_PREFIX = "Buffer I/O error on dev"
BLK_MARK = " error, dev "  # inside a request error line (it may carry a "blk_update_request: " prefix)

# blk_errors[] (block/blk-core.c): the status name printed by blk_print_req_error() → errno.
BLK_STATUS_ERRNO: Mapping[str, int] = MappingProxyType(
    {
        "operation not supported": errno.EOPNOTSUPP,
        "timeout": errno.ETIMEDOUT,
        "critical space allocation": errno.ENOSPC,
        "recoverable transport": errno.ENOLINK,
        "critical target": errno.EREMOTEIO,
        "reservation conflict": errno.EBADE,
        "critical medium": errno.ENODATA,
        "protection": errno.EILSEQ,
        "kernel resource": errno.ENOMEM,
        "device resource": errno.EBUSY,
        "nonblocking retry": errno.EAGAIN,
        "device offline": errno.ENODEV,
        "dm internal retry": errno.EREMCHG,
        "open zones exceeded": errno.ETOOMANYREFS,
        "active zones exceeded": errno.EOVERFLOW,
        "duration limit exceeded": errno.ETIME,
        "invalid": errno.EINVAL,
        "I/O": errno.EIO,
    }
)

# blk_status_t numbers (include/linux/blk_types.h), printed raw by ext4_end_bio. Only the
# values that have been stable for years; 18/19 moved between releases.
BLK_STS_ERRNO: Mapping[int, int] = MappingProxyType(
    {
        1: errno.EOPNOTSUPP,
        2: errno.ETIMEDOUT,
        3: errno.ENOSPC,
        4: errno.ENOLINK,
        5: errno.EREMOTEIO,
        6: errno.EBADE,
        7: errno.ENODATA,
        8: errno.EILSEQ,
        9: errno.ENOMEM,
        10: errno.EIO,
        12: errno.EAGAIN,
        13: errno.EBUSY,
        16: errno.ENODEV,
    }
)


_BLK_REQ = re.compile(
    r"(?:blk_update_request: )?(?P<status>[^,]+?) error, dev (?P<dev>[^,\s]+), sector (?P<sector>\d+)"
    r"(?: op 0x(?P<opc>[0-9a-fA-F]+):\((?P<op>[^)]*)\))?(?P<tail>.*)",
    re.DOTALL,
)
_BLK_FLAGS = re.compile(r" flags 0x(?P<flags>[0-9a-fA-F]+)")
_BUFFER = re.compile(
    r"Buffer I/O error on dev(?:ice)? (?P<dev>[^,\s]+), logical block (?P<blk>\d+)(?:, (?P<ctx>.*))?",
    re.DOTALL,
)


def buffer_error(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """A ``Buffer I/O error on dev...`` line."""
    m = _BUFFER.fullmatch(msg)
    if m is None:
        return None
    block = int(m.group("blk"))
    details: dict[str, Any] = {"logical_block": block, "buffer": True}
    if m.group("ctx"):
        details["context"] = m.group("ctx")
    return Observation(
        source=SOURCE,
        kind="blk.io_error",
        time=when,
        device=record_device(m.group("dev"), rec.props),
        kernel=Kernel(errno=errno.EIO, block=block, pid=caller_pid(rec.caller), message=msg),
        details=details,
    )


def request_error(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    """A ``STATUS error, dev D, sector S ...`` line (``blk_print_req_error``)."""
    m = _BLK_REQ.fullmatch(msg)
    if m is None:
        return None
    status = m.group("status")
    sector = int(m.group("sector"))
    details: dict[str, Any] = {"sector": sector, "op": m.group("op"), "error": status}
    flags = _BLK_FLAGS.match(m.group("tail") or "")
    if flags is not None:
        details["flags"] = int(flags.group("flags"), 16)
    return Observation(
        source=SOURCE,
        kind="blk.io_error",
        time=when,
        device=record_device(m.group("dev"), rec.props),
        kernel=Kernel(
            errno=BLK_STATUS_ERRNO.get(status, errno.EIO),
            block=sector,
            pid=caller_pid(rec.caller),
            message=msg,
        ),
        details=details,
    )
