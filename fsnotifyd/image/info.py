"""What an image holds: virtual size, allocated clusters, file and physical sizes, per delta."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from ..errors import ImageError
from . import descriptor as dd
from .delta import Delta

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1.5T``, ``4096`` (bytes); binary units."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ImageError(f"not a size: {text!r} (e.g. 10G, 512M, 4096)", field="size")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(n: int) -> str:
    for unit, f in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= f:
            return f"{n / f:.1f}{unit}".replace(".0", "")
    return f"{n}B"


@dataclass(frozen=True, slots=True)
class DeltaInfo:
    guid: str
    file: str
    top: bool
    name: str | None
    created: float | None
    parent: str
    allocated_clusters: int
    allocated_bytes: int
    file_bytes: int  # the file's length
    physical_bytes: int  # blocks the host filesystem holds for it (holes excluded)
    in_use: bool
    zeroed_clusters: int = 0  # zero marks: clusters that read as zeros whatever lies below, at no cost


@dataclass(frozen=True, slots=True)
class ImageInfo:
    directory: str
    size: int
    cluster: int
    allocated_bytes: int  # virtual clusters that hold data anywhere in the stack
    file_bytes: int
    physical_bytes: int
    deltas: tuple[DeltaInfo, ...]  # bottom first along the top's chain

    def to_dict(self) -> dict:
        return asdict(self)


def image_info(directory: str) -> ImageInfo:
    desc = dd.load(os.path.join(directory, dd.NAME))
    deltas: list[DeltaInfo] = []
    mapped: set[int] = set()
    for shot in desc.chain():
        path = os.path.join(directory, shot.file)
        with Delta.open(path, strict=False) as d:
            vcs = [vc for vc in range(len(d.bat)) if d.physical(vc)]
            mapped.update(vcs)
            st = os.stat(path)
            deltas.append(DeltaInfo(shot.guid, shot.file, shot.guid == desc.top, shot.name, shot.created, shot.parent,
                                    len(vcs), len(vcs) * d.cluster, st.st_size, st.st_blocks * 512,
                                    d.header.in_use, sum(1 for vc in range(len(d.bat)) if d.zeroed(vc))))
    return ImageInfo(directory, desc.size, desc.cluster, len(mapped) * desc.cluster,
                     sum(d.file_bytes for d in deltas), sum(d.physical_bytes for d in deltas), tuple(deltas))
