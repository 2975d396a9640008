"""The VE registry: one JSON record per VE under ``<state_dir>/ves/``, safe for concurrent use.

A record names the VE's image directory, mount point and labels, and, while the VE runs, the
loop device and FUSE disk file it runs on (what the daemon's inventory matches events
against). Writers take an exclusive ``flock`` on ``ves/.lock`` for the whole
read-modify-write, and records are replaced atomically (write-temp, fsync, rename, fsync dir),
so the CLI and the daemon can read and change the registry at the same time, and a crash
leaves each record old or new. The registry outlives reboots: ``running`` then just says what
was running, and ``fsnotifyd ve start`` brings a VE back from any state. ``reason`` says why a
VE is not as last asked (a start refused, a stop that could not finish) until a start or stop
succeeds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

from ..errors import ConfigError
from ..inventory import VE, validate_ve_id
from ..statefile import write_json_atomic

RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class VeRecord:
    id: str
    image: str  # image directory (DiskDescriptor.xml and deltas)
    mountpoint: str
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    running: bool = False
    loop: str | None = None  # /dev/loopN while running
    disk: str | None = None  # the FUSE file the loop device reads (its backing file)
    reason: str | None = None  # why it is not as last asked: a start refused, a stop not finished
    # Mounted with online discard: every block the filesystem frees is discarded at its journal
    # commit, so the image follows the filesystem's usage without anyone running fstrim.
    discard: bool = True

    def to_ve(self) -> VE:
        """What the daemon's inventory matches events with."""
        devices = (os.path.basename(self.loop),) if self.running and self.loop else ()
        images = (self.disk,) if self.running and self.disk else ()
        return VE(self.id, mounts=(os.path.normpath(self.mountpoint),), devices=devices, images=images,
                  labels=tuple(sorted(self.labels.items())))


class Registry:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "ves")

    def path(self, ve_id: str) -> str:
        return os.path.join(self.dir, f"{validate_ve_id(ve_id)}.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the registry for a read-modify-write."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def ve_locked(self, ve_id: str) -> Iterator[None]:
        """Exclusive use of one VE for a long operation (start, stop) without blocking others."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, f".{validate_ve_id(ve_id)}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, ve_id: str) -> VeRecord:
        path = self.path(ve_id)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no VE {ve_id!r}", file=path, field="id") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"unreadable VE record: {e}", file=path) from None
        return _record(raw, path)

    def all(self) -> list[VeRecord]:
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            try:
                out.append(self.get(n[:-5]))
            except ConfigError:
                continue  # a broken record must not hide the others (`ve show` names the problem)
        return out

    def ves(self) -> list[VE]:
        return [r.to_ve() for r in self.all()]

    def put(self, rec: VeRecord) -> None:
        """Write a record (hold :meth:`locked` around the read-modify-write)."""
        data = asdict(rec) | {"version": RECORD_VERSION}
        write_json_atomic(self.path(rec.id), data)

    def add(self, rec: VeRecord) -> VeRecord:
        with self.locked():
            if os.path.exists(self.path(rec.id)):
                raise ConfigError(f"VE {rec.id!r} already exists", file=self.path(rec.id), field="id")
            for other in self.all():
                if os.path.normpath(other.mountpoint) == os.path.normpath(rec.mountpoint):
                    raise ConfigError(f"mount point {rec.mountpoint} is VE {other.id!r}'s", field="mountpoint")
                if os.path.realpath(other.image) == os.path.realpath(rec.image):
                    raise ConfigError(f"image {rec.image} is VE {other.id!r}'s", field="image")
            rec = replace(rec, created=rec.created or time.time())
            self.put(rec)
            return rec

    def update(self, ve_id: str, **changes: object) -> VeRecord:
        with self.locked():
            # changes are field names with their values' types unknown here; replace() raises
            # TypeError on a name VeRecord lacks
            rec = replace(self.get(ve_id), **changes)  # type: ignore[arg-type]
            self.put(rec)
            return rec

    def remove(self, ve_id: str) -> None:
        with self.locked():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(ve_id))


def _record(raw: object, path: str) -> VeRecord:
    if not isinstance(raw, dict):
        raise ConfigError("VE record is not a JSON object", file=path)
    try:
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise ConfigError("labels must map strings to strings", file=path, field="labels")
        discard = raw.get("discard", True)
        if not isinstance(discard, bool):
            raise ConfigError("discard must be true or false", file=path, field="discard")
        for key in ("id", "image", "mountpoint"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ConfigError(f"{key} must be a non-empty string", file=path, field=key)
        return VeRecord(id=validate_ve_id(raw["id"]), image=raw["image"], mountpoint=raw["mountpoint"], labels=labels,
                        created=float(raw.get("created") or 0.0), running=bool(raw.get("running")),
                        loop=raw.get("loop") if isinstance(raw.get("loop"), str) else None,
                        disk=raw.get("disk") if isinstance(raw.get("disk"), str) else None,
                        reason=raw.get("reason") if isinstance(raw.get("reason"), str) else None,
                        discard=discard)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad VE record: {e}", file=path) from None
