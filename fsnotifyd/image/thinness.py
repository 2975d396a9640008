"""How thin a thin image is: garbage, fragmentation, swelling and the df ratio.

The figures every doc, event, metric and bench of fsnotifyd uses (issue 16):

- a *holding cluster* is an image-cluster-sized, cluster-aligned region of the filesystem with at
  least one block its bitmaps mark in use;
- **garbage** = image clusters allocated / holding clusters (1.0: every allocated cluster holds
  live data; more: clusters the filesystem freed but the image still keeps);
- **fragmentation** = holding clusters / in-use blocks in clusters' worth (1.0: the live data is
  packed; more: it is spread thinly over partly used clusters);
- **swelling** = garbage × fragmentation = allocated clusters / in-use clusters' worth;
- **df ratio** = image bytes allocated on the host / ``df`` used (what Virtuozzo's 1.5 measures).

The filesystem's side comes from ``FS_IOC_GETFSMAP`` (:mod:`.fsmap`) after a ``syncfs`` (blocks
freed in the running journal transaction are not free in the bitmaps until it commits); the
image's side from its BAT. :func:`figures` is pure.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from . import fsmap

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Figures:
    cluster: int  # bytes
    allocated: int  # image clusters mapped (a zero-marked or unmapped cluster is not)
    holding: int  # clusters with a block in use
    used: int  # bytes the filesystem's bitmaps mark in use (metadata included, the balloon not)
    image_bytes: int  # bytes the image's files take on the host (st_blocks)
    df_used: int  # bytes ``df`` shows used (statfs; ext4's own metadata not counted)

    @property
    def garbage(self) -> float:
        return self.allocated / self.holding if self.holding else 1.0

    @property
    def fragmentation(self) -> float:
        worth = self.used / self.cluster
        return self.holding / worth if worth else 1.0

    @property
    def swelling(self) -> float:
        return self.garbage * self.fragmentation

    @property
    def df_ratio(self) -> float:
        return self.image_bytes / self.df_used if self.df_used else 0.0

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        for k in ("garbage", "fragmentation", "swelling", "df_ratio"):
            d[k] = round(getattr(self, k), 4)
        return d


def _subtract(extents: Iterable[tuple[int, int]], holes: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    """``extents`` (start, end) without any byte of ``holes`` (sorted, disjoint)."""
    for start, end in extents:
        for hs, he in holes:
            if he <= start or hs >= end:
                continue
            if hs > start:
                yield start, hs
            start = max(start, he)
            if start >= end:
                break
        if start < end:
            yield start, end


def in_use(extents: Iterable[fsmap.Extent], exclude: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """(start, end) byte ranges in use, ``exclude`` (physical, length: the balloon's extents,
    which the image does not hold) taken out."""
    holes = sorted((p, p + n) for p, n in exclude)
    return list(_subtract(((e.physical, e.end) for e in extents if not e.free), holes))


def holding_clusters(ranges: Iterable[tuple[int, int]], cluster: int) -> set[int]:
    out: set[int] = set()
    for start, end in ranges:
        out.update(range(start // cluster, -(-end // cluster)))
    return out


def figures(ranges: list[tuple[int, int]], cluster: int, *, allocated: int, image_bytes: int,
            df_used: int) -> Figures:
    return Figures(cluster, allocated, len(holding_clusters(ranges, cluster)), sum(e - s for s, e in ranges),
                   image_bytes, df_used)


def df_used(mountpoint: str) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def image_side(directory: str) -> tuple[int, int, int]:
    """(cluster, clusters allocated, bytes on the host) of the image in ``directory``, from its
    files as last committed (safe beside a running exporter: read-only, nothing locked)."""
    from .stack import Stack  # the stack is below this module's pure part; only this reads it

    with Stack.open(directory, writable=False) as stack:
        allocated = stack.allocated_clusters()
        on_host = sum(os.fstat(d.fd).st_blocks * 512 for d in stack.deltas)
        return stack.cluster, allocated, on_host


def measure_image(mountpoint: str, directory: str, exclude: Iterable[tuple[int, int]] = ()) -> Figures:
    """:func:`measure` for a filesystem on the image in ``directory`` (flush its exporter first:
    the BAT on disk is what was last committed)."""
    cluster, allocated, on_host = image_side(directory)
    return measure(mountpoint, cluster, allocated=allocated, image_bytes=on_host, exclude=exclude)


def measure(mountpoint: str, cluster: int, *, allocated: int, image_bytes: int,
            exclude: Iterable[tuple[int, int]] = ()) -> Figures:
    """The figures of the filesystem mounted at ``mountpoint`` on an image whose BAT maps
    ``allocated`` clusters of ``cluster`` bytes and whose files take ``image_bytes``."""
    syncfs(mountpoint)
    ranges = in_use(fsmap.iter_extents(mountpoint), exclude)
    return figures(ranges, cluster, allocated=allocated, image_bytes=image_bytes, df_used=df_used(mountpoint))
