"""Parsing ``/proc/self/mountinfo`` and waiting for the mount table to change.

Parsing is a pure function of text: a malformed line is skipped and reported, never raised,
because the mount table is input the daemon does not control (odd paths, new kernel fields).
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    mount_options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def devnum(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def readonly(self) -> bool:
        """Read-only for writers: by mount flag, superblock flag, or ext4's error handling."""
        return (
            "ro" in self.mount_options
            or "ro" in self.super_options
            or "emergency_ro" in self.super_options
        )

    @property
    def emergency_ro(self) -> bool:
        return "emergency_ro" in self.super_options


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            try:
                out.append(chr(int(field[i + 1 : i + 4], 8)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return "".join(out)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or None when it is not one (see proc(5))."""
    parts = line.split()
    try:
        sep = parts.index("-", 6)
    except ValueError:
        return None
    if len(parts) < sep + 3 or sep < 6:
        return None
    try:
        mount_id = int(parts[0])
        major_s, _, minor_s = parts[2].partition(":")
        major, minor = int(major_s), int(minor_s)
    except ValueError:
        return None
    if major < 0 or minor < 0:
        return None
    return MountEntry(
        mount_id=mount_id,
        major=major,
        minor=minor,
        root=_unescape(parts[3]),
        mountpoint=_unescape(parts[4]),
        mount_options=frozenset(parts[5].split(",")),
        fstype=parts[sep + 1],
        source=_unescape(parts[sep + 2]),
        super_options=frozenset(parts[sep + 3].split(",")) if len(parts) > sep + 3 else frozenset(),
    )


def parse_mountinfo(text: str) -> list[MountEntry]:
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def by_device(entries: Iterable[MountEntry]) -> dict[tuple[int, int], list[MountEntry]]:
    out: dict[tuple[int, int], list[MountEntry]] = {}
    for e in entries:
        out.setdefault(e.devnum, []).append(e)
    return out


class MountTableWatch:
    """An fd that becomes readable when the mount table changes.

    ``/proc/self/mountinfo`` signals changes with POLLPRI, which asyncio's ``add_reader`` (EPOLLIN)
    does not see; an inner epoll registered for EPOLLPRI turns it into plain readability.
    """

    def __init__(self, path: str = MOUNTINFO) -> None:
        self._file = open(path, "rb")
        self._ep = select.epoll()
        self._ep.register(self._file.fileno(), select.EPOLLPRI | select.EPOLLERR)

    def fileno(self) -> int:
        return self._ep.fileno()

    def consume(self) -> bool:
        """Acknowledge a change signalled by readability of :meth:`fileno`.

        The kernel's mountinfo poll hands out each change once: the outer poll that reported
        readability has already taken it, so the inner epoll usually shows nothing by now.
        Returns True: the caller was woken because the table changed.
        """
        self._ep.poll(0)
        return True

    def close(self) -> None:
        self._ep.close()
        self._file.close()

    def __enter__(self) -> MountTableWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def block_device_name(major: int, minor: int) -> str | None:
    """The kernel's name for a block device number (``loop3``), from sysfs."""
    try:
        link = os.readlink(f"/sys/dev/block/{major}:{minor}")
    except OSError:
        return None
    return os.path.basename(link)
