"""The event schema: what sources observe and what the daemon publishes.

Sources produce :class:`Observation` (one interface's view of one kernel fact); the correlator
merges the observations of one fact into one :class:`Event`. Both are plain frozen data so they
can cross task boundaries and be compared in tests. Documented in ``docs/events.md``.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

SCHEMA = "fsnotifyd.event/1"

SEVERITY_PRIORITY: Mapping[str, int] = MappingProxyType({
    # Every severity, least severe first (sinks filter by rank), with its syslog(3) priority:
    # what the syslog sink writes as PRI and journald as PRIORITY.
    "debug": 7,  # LOG_DEBUG
    "info": 6,  # LOG_INFO
    "warning": 4,  # LOG_WARNING
    "error": 3,  # LOG_ERR
    "critical": 2,  # LOG_CRIT
})
SEVERITIES = tuple(SEVERITY_PRIORITY)

# Every event kind, with its default severity: the one table of kinds (docs/events.md's
# "Kinds" table is checked against it by tests/unit/test_tables.py).
DEFAULT_SEVERITY: Mapping[str, str] = MappingProxyType({
    "fs.error": "error",
    "fs.warning": "warning",
    "fs.readonly": "critical",
    "fs.writable": "info",
    "fs.shutdown": "critical",
    "fs.mount_failed": "error",
    "fs.enospc": "warning",
    "fs.edquot": "warning",
    "fs.alloc": "info",
    "quota.warning": "warning",
    "blk.io_error": "error",
    "dev.add": "info",
    "dev.change": "info",
    "dev.remove": "info",
    "source.up": "info",
    "source.down": "warning",
    "events.lost": "warning",
    "rule.matched": "warning",
    "action.started": "info",
    "action.succeeded": "info",
    "action.failed": "error",
    "fsck.result": "info",
    "image.repacked": "info",
    "notification": "warning",
    "ve.released": "info",
})
KINDS = frozenset(DEFAULT_SEVERITY)

# Kinds that describe a state of a filesystem rather than a countable happening: a second
# report of the same state is a confirmation, not a new fact.
STATE_KINDS = frozenset({"fs.readonly", "fs.writable", "fs.shutdown"})


@dataclass(frozen=True, slots=True)
class KindFilter:
    """Which event kinds a subscriber, sink or webhook wants: exact kinds and ``fs.*``
    prefixes; empty wants every kind. Built by :meth:`parse`, which refuses unknown kinds (a
    misspelt filter would silently pass nothing)."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, kinds: tuple[str, ...] | list[str]) -> KindFilter:
        exact, prefixes = set(), []
        for k in kinds:
            if k in KINDS:
                exact.add(k)
            elif k.endswith(".*") and any(x.startswith(k[:-1]) for x in KINDS):
                prefixes.append(k[:-1])
            else:
                raise ValueError(f"unknown event kind {k!r}")
        return cls(frozenset(exact), tuple(prefixes))

    def __call__(self, kind: str) -> bool:
        if not self.exact and not self.prefixes:
            return True
        return kind in self.exact or kind.startswith(self.prefixes)


@dataclass(frozen=True, slots=True)
class Device:
    """A block device as the kernel names it; any part may be unknown."""

    major: int | None = None
    minor: int | None = None
    name: str | None = None

    @property
    def devnum(self) -> tuple[int, int] | None:
        if self.major is None or self.minor is None:
            return None
        return (self.major, self.minor)

    def to_dict(self) -> dict[str, Any]:
        return {"major": self.major, "minor": self.minor, "name": self.name}


def errno_name(number: int | None) -> str | None:
    if number is None:
        return None
    return _errno.errorcode.get(abs(number))


@dataclass(frozen=True, slots=True)
class Kernel:
    """What the kernel said about the fact; ``None`` where no source knew."""

    errno: int | None = None
    function: str | None = None
    line: int | None = None
    inode: int | None = None
    block: int | None = None
    comm: str | None = None
    pid: int | None = None
    message: str | None = None
    # XFS and btrfs say more than ext4: the damaged structure (``xfs_bnobt``, ``dinode``,
    # ``leaf``), a disk address (XFS daddr in 512-byte sectors, btrfs logical bytenr), the
    # mirror that was read, the per-device counter that counted it (btrfs ``corrupt``, ...).
    structure: str | None = None
    daddr: int | None = None
    mirror: int | None = None
    counter: str | None = None

    def merged(self, other: Kernel) -> Kernel:
        """Fill what this view lacks from another view of the same fact."""
        return Kernel(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(_kernel_values(self), _kernel_values(other), strict=True)
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "errno": None
            if self.errno is None
            else {"name": errno_name(self.errno), "number": abs(self.errno)},
            "function": self.function,
            "line": self.line,
            "inode": self.inode,
            "block": self.block,
            "comm": self.comm,
            "pid": self.pid,
            "message": self.message,
            # Only where a filesystem gives them: ext4's events keep the keys they had.
            **{k: v for k, v in (("structure", self.structure), ("daddr", self.daddr), ("mirror", self.mirror),
                                 ("counter", self.counter)) if v is not None},
        }


def _kernel_values(k: Kernel) -> tuple[Any, ...]:
    return (k.errno, k.function, k.line, k.inode, k.block, k.comm, k.pid, k.message, k.structure, k.daddr,
            k.mirror, k.counter)


@dataclass(frozen=True, slots=True)
class Observation:
    """One source's view of one kernel fact, before correlation.

    ``count`` is how many kernel facts this view stands for when the source knows (a lost-record
    gap, a fanotify ``error_count``); ``errors_total`` is the filesystem's own cumulative error
    counter when the source read it (sysfs ``errors_count``), which the correlator uses to make
    the published counts add up to the kernel's.
    """

    source: str
    kind: str
    time: float
    device: Device | None = None
    kernel: Kernel = field(default_factory=Kernel)
    fs: str | None = None
    mount: str | None = None
    severity: str | None = None
    count: int = 1
    errors_total: int | None = None
    fs_key: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    # The VE a source attributed the fact to itself (BPF space counts: by the cgroup of the
    # failing process, which no device names); otherwise the correlator places the device.
    ve: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """The published, correlated event (schema ``fsnotifyd.event/1``)."""

    kind: str
    time: float
    host: str
    severity: str
    device: Device | None
    fs: str | None
    mount: str | None
    ve: str | None
    kernel: Kernel
    sources: tuple[str, ...]
    count: int = 1
    first_time: float | None = None
    last_time: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "id": self.id,
            "time": rfc3339(self.time),
            "host": self.host,
            "kind": self.kind,
            "severity": self.severity,
            "device": None if self.device is None else self.device.to_dict(),
            "fs": self.fs,
            "mount": self.mount,
            "ve": self.ve,
            "kernel": self.kernel.to_dict(),
            "sources": list(self.sources),
            "count": self.count,
            "first_time": None if self.first_time is None else rfc3339(self.first_time),
            "last_time": None if self.last_time is None else rfc3339(self.last_time),
            "details": dict(self.details),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


# Ids derived from what a kernel fact is (not drawn at random) for events that can be observed
# again after a restart of the daemon: the same fact gets the same id, and what was done about
# it (a decision, its jobs) is recognised instead of done twice.
FACT_NAMESPACE = uuid.UUID("6c0f3a52-8e4b-4d0e-9a57-2f1c9e2b7d10")


def fact_id(*parts: object) -> str:
    return str(uuid.uuid5(FACT_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


def hostname() -> str:
    return os.uname().nodename
