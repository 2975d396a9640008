"""Who owns what: block device ↔ mount ↔ loop backing file ↔ VE, kept current.

The correlator asks it to complete an observation (a kmsg line names only ``loop3``; a fanotify
record only an fsid) and to attribute it to a VE. It remembers the last place it saw a device so
an event that arrives after its filesystem was unmounted or its loop detached is still
attributed (a vanished device must not lose the event).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import structlog

from .cgroups import CgroupMounts, Membership, matches
from .errors import ConfigError
from .events import Device
from .mountinfo import MountEntry, read_mountinfo

log = structlog.get_logger("fsnotifyd.inventory")

_VE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def validate_ve_id(ve_id: object) -> str:
    """A VE id becomes part of paths and metric labels: no separators, no ``..``."""
    if not isinstance(ve_id, str) or not _VE_ID.match(ve_id) or ".." in ve_id:
        raise ConfigError(
            f"invalid VE id {ve_id!r}: use 1-64 characters from A-Z a-z 0-9 _ . : -, "
            "starting with a letter or digit, without '..'",
            field="id",
        )
    return ve_id


@dataclass(frozen=True, slots=True)
class VE:
    id: str
    mounts: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()  # kernel names ("loop3") or "major:minor"
    images: tuple[str, ...] = ()  # loop backing files
    cgroup: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        validate_ve_id(self.id)


@dataclass(frozen=True, slots=True)
class Placement:
    """Everything known about where a device is, at one instant."""

    device: Device
    fs: str | None = None
    mount: str | None = None
    mount_id: int | None = None
    # Which mount this is: mount ids are reused by the kernel, so the inventory numbers every
    # (device, mount id) it sees appear; a umount and a new mount get a new number.
    mount_seq: int | None = None
    readonly: bool | None = None
    emergency_ro: bool = False
    backing_file: str | None = None
    ve: str | None = None
    # The image directory behind a loop device on an fsnotifyd image (its backing file is the
    # exporter's FUSE disk): what the thinness figures read the BAT of. None: no such image.
    image: str | None = None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass
class SysBlock:
    """Reads block device facts from sysfs; a separate object so tests can point it elsewhere."""

    root: str = "/sys"

    def devnum(self, name: str) -> tuple[int, int] | None:
        raw = _read(f"{self.root}/class/block/{name}/dev")
        if not raw:
            return None
        major, _, minor = raw.partition(":")
        try:
            return int(major), int(minor)
        except ValueError:
            return None

    def name(self, major: int, minor: int) -> str | None:
        try:
            return os.path.basename(os.readlink(f"{self.root}/dev/block/{major}:{minor}"))
        except OSError:
            return None

    def backing_file(self, name: str) -> str | None:
        if not name.startswith("loop"):
            return None
        return _read(f"{self.root}/block/{name}/loop/backing_file") or None


@dataclass
class Inventory:
    ves: list[VE] = field(default_factory=list)
    mountinfo: Callable[[], Iterable[MountEntry]] = read_mountinfo
    sys: SysBlock = field(default_factory=SysBlock)
    # More VEs, asked for on every refresh (the image manager's VE registry: a VE started by
    # the CLI mounts its filesystem, the mount table changes, and the VE is known from then).
    # The VEs given in ``ves`` win over a provided one of the same id.
    provider: Callable[[], Iterable[VE]] | None = None
    # (disk file, image directory) of every attached image (the image manager's attachment
    # records), asked for on every refresh: places a loop device on an image's disk.
    images: Callable[[], Iterable[tuple[str, str]]] | None = None
    _static: list[VE] = field(default_factory=list, init=False)
    _by_devnum: dict[tuple[int, int], Placement] = field(default_factory=dict, init=False)
    _by_name: dict[str, Placement] = field(default_factory=dict, init=False)
    _last_seen: dict[str, Placement] = field(default_factory=dict, init=False)
    _seqs: dict[tuple[int, int, int], int] = field(default_factory=dict, init=False)
    _next_seq: int = field(default=1, init=False)
    cgroup_mounts: Callable[[], CgroupMounts] = CgroupMounts.read
    _cg_mounts: CgroupMounts | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for ve in self.ves:
            if ve.id in seen:
                raise ConfigError(f"duplicate VE id {ve.id!r}", field="id")
            seen.add(ve.id)
        self._static = list(self.ves)
        self.refresh()

    # -- maintenance -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the device → mount map from the mount table (call on every table change)."""
        if self.provider is not None:
            try:
                extra = list(self.provider())
            except Exception as e:  # a broken registry must not stop placing events
                log.warning("inventory.provider_failed", error=str(e))
                extra = None
            if extra is not None:
                known = {v.id for v in self._static}
                self.ves = self._static + [v for v in extra if v.id not in known]
        image_of = self._image_dirs()
        by_devnum: dict[tuple[int, int], Placement] = {}
        for entry in self.mountinfo():
            if entry.major == 0:  # no block device behind it (tmpfs, proc, fuse, overlay, ...)
                continue
            if entry.devnum in by_devnum and entry.root != "/":
                continue  # keep the mount of the filesystem's root over bind mounts of a subdir
            name = self.sys.name(entry.major, entry.minor) or os.path.basename(entry.source)
            dev = Device(entry.major, entry.minor, name)
            backing = self.sys.backing_file(name)
            placement = Placement(
                device=dev,
                fs=entry.fstype,
                mount=entry.mountpoint,
                mount_id=entry.mount_id,
                readonly=entry.readonly,
                emergency_ro=entry.emergency_ro,
                backing_file=backing,
                image=image_of.get(backing.removesuffix(" (deleted)")) if backing else None,
            )
            prior = by_devnum.get(entry.devnum)
            if prior is None or (prior.mount and prior.mount != "/" and entry.root == "/"):
                by_devnum[entry.devnum] = placement
        seqs: dict[tuple[int, int, int], int] = {}
        for devnum, p in by_devnum.items():
            ident = (*devnum, p.mount_id or 0)
            seq = self._seqs.get(ident)
            if seq is None:
                seq, self._next_seq = self._next_seq, self._next_seq + 1
            seqs[ident] = seq
            by_devnum[devnum] = replace(p, mount_seq=seq)
        self._seqs = seqs
        self._by_devnum = {k: self._with_ve(p) for k, p in by_devnum.items()}
        self._by_name = {p.device.name: p for p in self._by_devnum.values() if p.device.name}
        self._last_seen.update(self._by_name)

    def _image_dirs(self) -> dict[str, str]:
        if self.images is None:
            return {}
        try:
            return {disk: image for disk, image in self.images()}
        except Exception as e:  # unreadable records must not stop placing events
            log.warning("inventory.images_failed", error=str(e))
            return {}

    def register(self, ve: VE) -> None:
        """Add or replace a VE at run time (the image manager registers the VEs it attaches)."""
        self.ves = [v for v in self.ves if v.id != ve.id] + [ve]
        self._static = [v for v in self._static if v.id != ve.id] + [ve]
        self.refresh()

    def unregister(self, ve_id: str) -> None:
        self.ves = [v for v in self.ves if v.id != ve_id]
        self._static = [v for v in self._static if v.id != ve_id]
        self.refresh()
        self._last_seen = {k: self._with_ve(p) for k, p in self._last_seen.items()}

    def mounts(self) -> list[Placement]:
        return list(self._by_devnum.values())

    # -- queries -----------------------------------------------------------------------------
    def place(self, device: Device | None, mount: str | None = None) -> Placement | None:
        """Complete a partial device into a placement with mount, fs and VE (None if unknown)."""
        if device is None and mount is None:
            return None
        p: Placement | None = None
        if device is not None:
            if device.devnum is not None:
                p = self._by_devnum.get(device.devnum)
            if p is None and device.name:
                p = self._by_name.get(device.name)
        if p is None and mount is not None:
            p = next((q for q in self._by_devnum.values() if q.mount == mount), None)
        if p is not None:
            return p
        # Not mounted now: a device that exists but holds no mounted fs (a refused mount, a
        # detached loop, a vanished device). Fill what sysfs knows, else what we saw last.
        name = device.name if device else None
        devnum = device.devnum if device else None
        if name and devnum is None:
            devnum = self.sys.devnum(name)
        if devnum and not name:
            name = self.sys.name(*devnum)
        if name and name in self._last_seen:
            last = self._last_seen[name]
            if devnum is None or last.device.devnum == devnum:
                return last
        if name is None and devnum is None:
            return None
        dev = Device(devnum[0] if devnum else None, devnum[1] if devnum else None, name)
        backing = self.sys.backing_file(name) if name else None
        return self._with_ve(Placement(device=dev, mount=mount, backing_file=backing))

    def ve_for(self, placement: Placement) -> str | None:
        dev = placement.device
        keys = {dev.name, f"{dev.major}:{dev.minor}"} - {None, "None:None"}
        for ve in self.ves:
            if placement.mount and placement.mount in ve.mounts:
                return ve.id
            if keys & set(ve.devices):
                return ve.id
            if placement.backing_file and placement.backing_file in ve.images:
                return ve.id
        return None

    def ve_for_cgroups(self, members: Iterable[Membership]) -> str | None:
        """The VE whose ``cgroup`` contains one of a process's cgroup memberships.

        A VE's cgroup is a path under a cgroup mount (``/sys/fs/cgroup/freezer/ve101``: that
        hierarchy only) or a path relative to any hierarchy's root (``/machine.slice/ve-101.scope``).
        The deepest match wins, so a VE nested inside another's cgroup gets its own processes.
        """
        members = list(members)
        best: tuple[int, str] | None = None
        for ve in self.ves:
            if not ve.cgroup:
                continue
            spec = self._cgroup_spec(ve.cgroup)
            if any(matches(spec, m) for m in members):
                depth = len(spec[1].rstrip("/"))
                if best is None or depth > best[0]:
                    best = (depth, ve.id)
        return best[1] if best else None

    def _cgroup_spec(self, cgroup: str) -> tuple[str | None, str]:
        if self._cg_mounts is None:
            self._cg_mounts = self.cgroup_mounts()
        found = self._cg_mounts.membership_of(cgroup)
        if found is not None:
            return found
        return (None, "/" + cgroup.strip("/"))

    def _with_ve(self, p: Placement) -> Placement:
        ve = self.ve_for(p)
        return p if ve == p.ve else replace(p, ve=ve)
