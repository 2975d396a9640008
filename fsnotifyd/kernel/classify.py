"""One kernel record → an :class:`~fsnotifyd.events.Observation` or ``None``. Pure, never raises.

The live kmsg source and the replay of ``dmesg``/``journalctl`` text both call
:func:`classify`, so a replay produces the observations the daemon would have. The message
formats live one module per subsystem (:mod:`.ext4`, :mod:`.xfs`, :mod:`.btrfs`, :mod:`.jbd2`,
:mod:`.block`); a new
filesystem adds its module and one prefix test here.

Trust: records written from user space into ``/dev/kmsg`` always carry a non-zero facility (the
kernel forces ``LOG_USER`` when the writer gives none), so by default :func:`classify` ignores
every record whose facility is not 0 (kernel): a program that logs a copy of an ext4 line does
not make a false event.
"""

from __future__ import annotations

from ..events import Observation
from . import block, btrfs, ext4, jbd2, xfs
from .block import buffer_error, request_error
from .btrfs import btrfs_message
from .ext4 import ext4_report, ext4_state
from .jbd2 import journal_abort
from .kmsg import KmsgRecord
from .xfs import xfs_message

__all__ = ["KMSG_KINDS", "classify"]

# The kinds of observations from kmsg: what classify() returns, and the source's own
# events.lost (records the kernel overwrote before they were read).
KMSG_KINDS = frozenset({"fs.error", "fs.warning", "fs.readonly", "fs.shutdown", "fs.mount_failed",
                        "blk.io_error", "events.lost"})

# The cheap test every record goes through before any regex (the kmsg path is latency bound).
_PREFIXES = (ext4.PREFIX, jbd2.PREFIX, block.BUFFER_PREFIX, xfs.PREFIX, btrfs.PREFIX)
_BLK_MARK = block.BLK_MARK


def classify(rec: KmsgRecord, boot_wallclock: float, *, kernel_only: bool = True) -> Observation | None:
    """Map a record to an :class:`Observation` (``source="kmsg"``), or ``None``. Never raises.

    ``time`` is ``boot_wallclock + ts_usec / 1e6``. With ``kernel_only`` (the default) records
    that user space wrote into ``/dev/kmsg`` (facility != 0) are ignored.
    """
    try:
        msg = rec.message
        if not (msg.startswith(_PREFIXES) or _BLK_MARK in msg):
            return None
        if kernel_only and rec.facility != 0:
            return None
        return _classify(rec, msg, boot_wallclock + rec.ts_usec / 1e6)
    except Exception:  # noqa: BLE001 - never raises
        return None


def _classify(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    if msg.startswith("EXT4-fs"):
        if msg.startswith(("EXT4-fs error", "EXT4-fs warning")):
            return ext4_report(rec, msg, when)
        if msg.startswith("EXT4-fs ("):
            return ext4_state(rec, msg, when)
        return None
    if msg.startswith(xfs.PREFIX):
        return xfs_message(rec, msg, when)
    if msg.startswith(btrfs.PREFIX):
        return btrfs_message(rec, msg, when)
    if msg.startswith("Aborting journal on device "):
        return journal_abort(rec, msg, when)
    if msg.startswith("Buffer I/O error on dev"):
        return buffer_error(rec, msg, when)
    return request_error(rec, msg, when)
