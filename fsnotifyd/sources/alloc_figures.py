"""The thinness figures of a VE's filesystem, for ``fs.alloc`` (issue 16's garbage,
fragmentation, swelling and df ratio; :mod:`fsnotifyd.image.thinness` defines them).

Reading them costs a walk of the whole filesystem's ``FS_IOC_GETFSMAP`` and, on an fsnotifyd
image, a read of every delta's BAT, so :class:`FiguresClock` measures each filesystem at most
once per ``figures_interval`` and the source runs :func:`measure` in a worker thread, never on
the event loop.

What is read, and how current it is:

- the filesystem's side without a ``syncfs`` (a monitor must not force the VE's writeback
  every minute: files that delayed allocation would never have placed would get blocks, which
  changes what is measured); blocks freed in the running journal transaction still count as
  in use, so this side lags by at most one journal commit (ext4's ``commit=``, 5 s);
- the image's side as its files were last committed (read-only, nothing locked, the exporter
  not flushed first), so it lags by at most one exporter flush;
- the balloon's extents are taken out (the image does not hold them).

A filesystem on no fsnotifyd image has no image side: only ``fragmentation`` (and ``holding``,
``used``), in clusters of the configured region size.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..image import fsmap, thinness
from ..image.fiemap import fiemap
from ..image.resize import BALLOON


def balloon_extents(mountpoint: str) -> list[tuple[int, int]]:
    """(physical, length) of the balloon's extents; none when there is no balloon."""
    try:
        fd = os.open(os.path.join(mountpoint, BALLOON), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        return [(physical, length) for _logical, physical, length in fiemap(fd)]
    finally:
        os.close(fd)


def measure(mountpoint: str, image: str | None, region_bytes: int) -> dict[str, Any]:
    """The figures as ``fs.alloc`` carries them in ``details.figures`` (rounded ratios, sizes in
    bytes, ``measure_s`` what reading them took)."""
    t0 = time.monotonic()
    exclude = balloon_extents(mountpoint)
    ranges = thinness.in_use(fsmap.iter_extents(mountpoint), exclude)
    if image is not None:
        cluster, allocated, on_host = thinness.image_side(image)
        f = thinness.figures(ranges, cluster, allocated=allocated, image_bytes=on_host,
                             df_used=thinness.df_used(mountpoint))
        out: dict[str, Any] = f.as_dict()
    else:
        f = thinness.figures(ranges, region_bytes, allocated=0, image_bytes=0, df_used=0)
        out = {"cluster": f.cluster, "holding": f.holding, "used": f.used,
               "fragmentation": round(f.fragmentation, 4)}
    # Free space inside holding clusters: what packing the data could give back at most (a
    # rule can ask for enough of it before a repack is worth its I/O).
    out["slack_bytes"] = max(0, f.holding * f.cluster - f.used)
    out["from_image"] = image is not None
    out["measure_s"] = round(time.monotonic() - t0, 4)
    return out


@dataclass
class _Last:
    mount_seq: int | None
    at: float  # monotonic time of the measurement (or of the failed try)
    figures: dict[str, Any] | None
    wall: float = 0.0  # when it was measured (epoch), for ``figures.time``
    published: bool = False


@dataclass
class FiguresClock:
    """Which filesystem is due for a measurement, and the last figures of each.

    Keyed by device number; a new mount on the device (another ``mount_seq``) is measured
    afresh. A failed measurement waits a whole interval too (a filesystem that refuses GETFSMAP
    is not asked every period)."""

    interval: float
    last: dict[int, _Last] = field(default_factory=dict)

    def due(self, dev: int, mount_seq: int | None, now: float) -> bool:
        got = self.last.get(dev)
        return got is None or got.mount_seq != mount_seq or now - got.at >= self.interval

    def put(self, dev: int, mount_seq: int | None, now: float, figures: dict[str, Any] | None) -> None:
        self.last[dev] = _Last(mount_seq, now, figures, time.time())

    def current(self, dev: int, mount_seq: int | None, now: float) -> dict[str, Any] | None:
        """The last figures of the filesystem now on ``dev``, with ``age_s``; marks them published."""
        got = self.last.get(dev)
        if got is None or got.mount_seq != mount_seq or got.figures is None:
            return None
        got.published = True
        return {**got.figures, "age_s": round(max(0.0, now - got.at), 3)}

    def unpublished(self, dev: int, mount_seq: int | None) -> bool:
        got = self.last.get(dev)
        return got is not None and got.mount_seq == mount_seq and got.figures is not None and not got.published

    def forget(self, keep: set[int]) -> None:
        for dev in [d for d in self.last if d not in keep]:
            del self.last[dev]
