"""``DiskDescriptor.xml``: the disk's size and cluster, its delta files, and the snapshot tree.

The ploop layout, with two optional elements of ours in ``<Shot>`` (``<Name>``, ``<Created>``)::

    <Parallels_disk_image Version="1.0">
      <Disk_Parameters><Disk_size>SECTORS</Disk_size>...<Sectors>CLUSTER_SECTORS</Sectors></Disk_Parameters>
      <StorageData><Storage><Start>0</Start><End>SECTORS</End><Blocksize>CLUSTER_SECTORS</Blocksize>
        <Image><GUID>{...}</GUID><Type>Compressed</Type><File>root.hds</File></Image> ...
      </Storage></StorageData>
      <Snapshots><TopGUID>{...}</TopGUID>
        <Shot><GUID>{...}</GUID><ParentGUID>{00000000-...}</ParentGUID></Shot> ...
      </Snapshots>
    </Parallels_disk_image>

Every image is one delta; its ``Shot`` names its parent (the delta below it). The top is the
writable delta; every other delta is a snapshot. Saved by write-temp, fsync, rename, fsync dir.
Loading trusts nothing: no DTD or entities, delta files are plain names in the descriptor's
directory, every parent exists, the chain from the top reaches the root without a cycle.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Literal, overload
from xml.parsers import expat

from ..errors import ImageError
from .delta import fsync_dir
from .format import MAX_CLUSTER, MAX_VIRTUAL, MIN_CLUSTER, SECTOR

NAME = "DiskDescriptor.xml"
ROOT_PARENT = "{00000000-0000-0000-0000-000000000000}"
MAX_DESCRIPTOR = 1 << 20  # bytes: a descriptor of thousands of snapshots is still far below
MAX_DELTAS = 4096


def new_guid() -> str:
    return "{" + str(uuid.uuid4()) + "}"


@dataclass(frozen=True, slots=True)
class Shot:
    guid: str
    parent: str  # ROOT_PARENT for the base delta
    file: str  # delta file name, in the descriptor's directory
    name: str | None = None
    created: float | None = None


@dataclass(frozen=True, slots=True)
class Descriptor:
    size: int  # virtual bytes
    cluster: int  # bytes
    shots: tuple[Shot, ...]
    top: str

    def by_guid(self, guid: str) -> Shot:
        for s in self.shots:
            if s.guid == guid:
                return s
        raise KeyError(guid)

    def chain(self, upto: str | None = None) -> list[Shot]:
        """The deltas from the base up to ``upto`` (default: the top), bottom first."""
        out: list[Shot] = []
        guid = upto or self.top
        while guid != ROOT_PARENT:
            s = self.by_guid(guid)
            out.append(s)
            guid = s.parent
        return out[::-1]

    def snapshots(self) -> list[Shot]:
        """Every delta but the top, oldest (lowest) first along the top's chain, then the rest."""
        chain = [s.guid for s in self.chain()]
        order = {g: i for i, g in enumerate(chain)}
        return sorted((s for s in self.shots if s.guid != self.top), key=lambda s: order.get(s.guid, len(order)))

    def children(self, guid: str) -> list[Shot]:
        return [s for s in self.shots if s.parent == guid]

    def with_shots(self, shots: list[Shot] | tuple[Shot, ...], top: str | None = None) -> Descriptor:
        return replace(self, shots=tuple(shots), top=top or self.top)


@overload
def _text(parent: ET.Element, tag: str, file: str, *, required: Literal[True] = True) -> str: ...
@overload
def _text(parent: ET.Element, tag: str, file: str, *, required: bool) -> str | None: ...
def _text(parent: ET.Element, tag: str, file: str, *, required: bool = True) -> str | None:
    el = parent.find(tag)
    if el is None or el.text is None or not el.text.strip():
        if required:
            raise ImageError(f"missing <{tag}>", file=file, field=tag)
        return None
    return el.text.strip()


def _int(parent: ET.Element, tag: str, file: str) -> int:
    raw = _text(parent, tag, file)
    try:
        v = int(raw)
    except ValueError:
        raise ImageError(f"<{tag}> is not a whole number: {raw[:40]!r}", file=file, field=tag) from None
    if v < 0:
        raise ImageError(f"<{tag}> is negative", file=file, field=tag)
    return v


def _guid(raw: str | None, file: str, field: str) -> str:
    try:
        if raw is None or not (raw.startswith("{") and raw.endswith("}")):
            raise ValueError
        return "{" + str(uuid.UUID(raw[1:-1])) + "}"
    except ValueError:
        raise ImageError(f"not a {{GUID}}: {str(raw)[:60]!r}", file=file, field=field) from None


class _Refused(Exception):
    pass


def _refuse(*_args: object) -> None:
    raise _Refused


def _parse(raw: bytes) -> ET.Element:
    """Parse after an expat pass that refuses any DTD: the byte check in :func:`load` misses one
    in UTF-16 (a DOCTYPE there was parsed and its entities expanded)."""
    scan = expat.ParserCreate()
    scan.StartDoctypeDeclHandler = _refuse
    scan.EntityDeclHandler = _refuse
    try:
        scan.Parse(raw, True)
    except _Refused:
        raise ET.ParseError("a DTD or entity declaration (refused)") from None
    except (expat.ExpatError, LookupError, ValueError) as e:  # LookupError: an unknown encoding="..."
        raise ET.ParseError(str(e)) from None
    return ET.fromstring(raw)


def load(path: str) -> Descriptor:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DESCRIPTOR + 1)
    except OSError as e:
        raise ImageError(f"cannot read disk descriptor: {e.strerror}", file=path) from e
    if len(raw) > MAX_DESCRIPTOR:
        raise ImageError(f"disk descriptor larger than {MAX_DESCRIPTOR} bytes", file=path)
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise ImageError("disk descriptor declares a DTD or entities (refused)", file=path)
    try:
        root = _parse(raw)
    except ET.ParseError as e:
        raise ImageError(f"disk descriptor is not XML: {e}", file=path) from None
    if root.tag != "Parallels_disk_image":
        raise ImageError(f"root element <{root.tag}>, expected <Parallels_disk_image>", file=path)
    params = root.find("Disk_Parameters")
    if params is None:
        raise ImageError("missing <Disk_Parameters>", file=path, field="Disk_Parameters")
    sectors = _int(params, "Disk_size", path)
    cluster_sectors = _int(params, "Sectors", path)
    size, cluster = sectors * SECTOR, cluster_sectors * SECTOR
    if not 0 < size <= MAX_VIRTUAL:
        raise ImageError(f"disk size of {sectors} sectors is zero or too large", file=path, field="Disk_size")
    if cluster < MIN_CLUSTER or cluster > MAX_CLUSTER or cluster & (cluster - 1):
        raise ImageError(f"cluster of {cluster_sectors} sectors is not a power of two in range", file=path,
                         field="Sectors")
    files: dict[str, str] = {}
    images = root.findall("StorageData/Storage/Image")
    if not images or len(images) > MAX_DELTAS:
        raise ImageError(f"{len(images)} images: expected 1..{MAX_DELTAS}", file=path, field="StorageData")
    for i, im in enumerate(images):
        guid = _guid(_text(im, "GUID", path), path, f"Image[{i}].GUID")
        name = _text(im, "File", path) or ""
        if name in (".", "..") or "/" in name or "\0" in name or name == NAME:
            raise ImageError(f"delta file {name[:60]!r} is not a plain file name in the image directory",
                             file=path, field=f"Image[{i}].File")
        if guid in files:
            raise ImageError(f"image {guid} listed twice", file=path, field=f"Image[{i}].GUID")
        if name in files.values():
            raise ImageError(f"delta file {name!r} used by two images", file=path, field=f"Image[{i}].File")
        files[guid] = name
    snaps = root.find("Snapshots")
    if snaps is None:
        raise ImageError("missing <Snapshots>", file=path, field="Snapshots")
    top = _guid(_text(snaps, "TopGUID", path), path, "TopGUID")
    shots: list[Shot] = []
    for i, el in enumerate(snaps.findall("Shot")):
        guid = _guid(_text(el, "GUID", path), path, f"Shot[{i}].GUID")
        parent = _guid(_text(el, "ParentGUID", path), path, f"Shot[{i}].ParentGUID")
        if guid not in files:
            raise ImageError(f"snapshot {guid} has no <Image>", file=path, field=f"Shot[{i}].GUID")
        if any(s.guid == guid for s in shots):
            raise ImageError(f"snapshot {guid} listed twice", file=path, field=f"Shot[{i}].GUID")
        created = _text(el, "Created", path, required=False)
        when = None
        if created is not None:
            try:
                when = float(created)
            except ValueError:
                raise ImageError(f"<Created> is not a time: {created[:40]!r}", file=path,
                                 field=f"Shot[{i}].Created") from None
        shots.append(Shot(guid, parent, files[guid], _text(el, "Name", path, required=False), when))
    known = {s.guid for s in shots}
    if set(files) != known:
        missing = sorted(set(files) - known)[0]
        raise ImageError(f"image {missing} has no <Shot>", file=path, field="Snapshots")
    for i, s in enumerate(shots):
        if s.parent != ROOT_PARENT and s.parent not in known:
            raise ImageError(f"snapshot {s.guid}: parent {s.parent} does not exist", file=path,
                             field=f"Shot[{i}].ParentGUID")
    if top not in known:
        raise ImageError(f"top {top} is not a listed image", file=path, field="TopGUID")
    desc = Descriptor(size, cluster, tuple(shots), top)
    # Every delta's chain must reach the base without a loop: one walk per delta, stopping at a
    # delta already known to reach it (linear in the number of deltas: a 3000-deep chain took
    # 48 s with a walk from every delta to the base).
    parent_of = {s.guid: s.parent for s in shots}
    reaches = {ROOT_PARENT}
    for s in shots:
        walk: list[str] = []
        on_walk: set[str] = set()
        g = s.guid
        while g not in reaches:
            if g in on_walk:
                raise ImageError(f"snapshot {s.guid}: its parents form a cycle", file=path, field="Snapshots")
            walk.append(g)
            on_walk.add(g)
            g = parent_of[g]
        reaches.update(walk)
    if desc.children(top):
        raise ImageError(f"top {top} has snapshots above it", file=path, field="TopGUID")
    return desc


def dumps(desc: Descriptor) -> bytes:
    root = ET.Element("Parallels_disk_image", Version="1.0")
    params = ET.SubElement(root, "Disk_Parameters")
    sectors = desc.size // SECTOR
    for tag, value in (("Disk_size", sectors), ("Cylinders", -(-sectors // (16 * (desc.cluster // SECTOR)))),
                       ("PhysicalSectorSize", SECTOR), ("Heads", 16), ("Sectors", desc.cluster // SECTOR),
                       ("Padding", 0)):
        ET.SubElement(params, tag).text = str(value)
    storage = ET.SubElement(ET.SubElement(root, "StorageData"), "Storage")
    for tag, value in (("Start", 0), ("End", sectors), ("Blocksize", desc.cluster // SECTOR)):
        ET.SubElement(storage, tag).text = str(value)
    for s in desc.shots:
        im = ET.SubElement(storage, "Image")
        ET.SubElement(im, "GUID").text = s.guid
        ET.SubElement(im, "Type").text = "Compressed"
        ET.SubElement(im, "File").text = s.file
    snaps = ET.SubElement(root, "Snapshots")
    ET.SubElement(snaps, "TopGUID").text = desc.top
    for s in desc.shots:
        shot = ET.SubElement(snaps, "Shot")
        ET.SubElement(shot, "GUID").text = s.guid
        ET.SubElement(shot, "ParentGUID").text = s.parent
        if s.name is not None:
            ET.SubElement(shot, "Name").text = s.name
        if s.created is not None:
            ET.SubElement(shot, "Created").text = repr(s.created)
    ET.indent(root)
    return b"<?xml version='1.0' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="utf-8") + b"\n"


def save(path: str, desc: Descriptor) -> None:
    """Write temp, fsync, rename over, fsync the directory: the old or the new, never torn."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(dumps(desc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path)
