"""Why a mount failed: ext4 prints ``mount failed`` only for failures late in
``__ext4_fill_super`` and the reason on the line before it (``get root inode failed``). Pure.

:class:`MountFailureReasons` keeps, per device, the last unclassified ``EXT4-fs (D): ...`` line
and, when it came at most a few records and one second before ``mount failed``, puts its text
in ``kernel.message`` and ``details["reason"]``. Early refusals (``VFS: Can't find ext4
filesystem``, unsupported features) are not followed by ``mount failed`` on 6.18; the live
source infers them from sysfs (which a replay cannot).
"""

from __future__ import annotations

from dataclasses import replace

from ..events import Observation
from .ext4 import ext4_message
from .kmsg import KmsgRecord

__all__ = ["REASON_DEVICES", "MountFailureReasons"]

_REASON_RECORDS = 8  # "mount failed" follows its reason within this many records ...
_REASON_USEC = 1_000_000  # ... and this many microseconds
REASON_DEVICES = 64  # bound of the per-device memory


class MountFailureReasons:
    """Per device, the last ``EXT4-fs (D): ...`` line nothing else claimed, so that a following
    ``mount failed`` can say why (ext4 prints the reason on the line before). Pure: the live
    source and the replay of kernel text share it."""

    def __init__(self, limit: int = REASON_DEVICES) -> None:
        self.limit = limit
        self._reasons: dict[str, tuple[int, int, str]] = {}

    def remember(self, rec: KmsgRecord) -> tuple[str, str] | None:
        """Keep the line if it is an ext4 message; returns its (device, text)."""
        found = ext4_message(rec)
        if found is None:
            return None
        dev, text = found
        if dev not in self._reasons and len(self._reasons) >= self.limit:
            self._reasons.pop(next(iter(self._reasons)))
        self._reasons[dev] = (rec.seq, rec.ts_usec, text)
        return found

    def explain(self, rec: KmsgRecord, obs: Observation) -> Observation:
        """``obs`` (a ``mount failed``) with the remembered reason, when it came just before."""
        name = obs.device.name if obs.device is not None else None
        found = self._reasons.pop(name, None) if name is not None else None
        if found is None:
            return obs
        seq, ts, text = found
        if not (0 < rec.seq - seq <= _REASON_RECORDS and 0 <= rec.ts_usec - ts <= _REASON_USEC):
            return obs
        return replace(obs, kernel=replace(obs.kernel, message=text), details={**obs.details, "reason": text})
