"""fanotify ``FAN_FS_ERROR``: the kernel's own per-superblock error notification.

A fanotify group (``FAN_CLASS_NOTIF | FAN_REPORT_FID``) holds one ``FAN_MARK_FILESYSTEM`` mark
per watched superblock. A mark dies with its superblock (umount), so the mount table is watched
and every change re-marks what is mounted now (``FAN_MARK_ADD`` on an existing mark is a no-op,
and a device unmounted and mounted again between two reads has a new superblock without a mark).

Events carry the filesystem id (``f_fsid`` of ``statfs``) rather than a device, so each mark
records fsid -> (device, fstype, mountpoint) when it is made. ext4's fsid derives from its UUID,
so cloned images share one; such superblocks are spread over extra groups (see
:class:`FanotifySource`).

What ext4 reports (measured on 6.18, ``errors=continue``): ``trigger_fs_error`` gives EUCLEAN
(EFSCORRUPTED) with ``FILEID_INVALID`` (handle_bytes 0, no inode) and the writer's pid. With
``simulate_fail`` (after a fresh mount so metadata is read from disk): 2 (block bitmap csum) ->
EUCLEAN, no inode, on block allocation (write + fsync); 3 (inode bitmap EIO) -> EIO, no inode,
on file creation; 4 (inode bitmap csum) -> EUCLEAN, no inode, on creation; 5 (itable read EIO)
-> EIO with the inode, on ``stat`` of a file whose inode-table block is not cached; 6 (inode
csum) -> EBADMSG (EFSBADCRC) with the inode, on the first iget (lookup) of an uncached inode;
7 (dir block EIO) -> no event at all (only a kmsg warning, the syscall gets EIO); 8 (dir block
csum) -> EBADMSG with the directory's inode, on readdir/lookup in it; 1 (block bitmap EIO) is
unreliable (often consumed by a path that retries silently; once gave EIO, no inode).

Layouts and constants follow ``include/uapi/linux/fanotify.h`` (and ``include/linux/exportfs.h``
for file handle types). The event records are parsed by the pure
:func:`fsnotifyd.kernel.fanotify.parse_events`, which never raises on any input; this module
holds the syscalls and the marks.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as _errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from ..errors import SourceUnavailable
from ..events import Device, Kernel, Observation
from ..kernel.fanotify import FAN_FS_ERROR, FsError, fsid_str, parse_events
from ..mountinfo import MountEntry, MountTableWatch, block_device_name, read_mountinfo
from ..typing import Ready, Send

log = structlog.get_logger("fsnotifyd.fanotify")

# --- syscall constants (include/uapi/linux/fanotify.h); the record layouts: kernel/fanotify.py
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_FID = 0x00000200

FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_FILESYSTEM = 0x00000100

AT_FDCWD = -100
# What C programs pass: the libc header's value (0 on 64-bit, where the kernel forces it anyway).
O_LARGEFILE = getattr(os, "O_LARGEFILE", 0)

# --- libc ---------------------------------------------------------------------------------------


class _Statfs(ctypes.Structure):
    # glibc struct statfs64 (== struct statfs on 64-bit): __fsword_t is long, counts are u64.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.fanotify_init = self.lib.fanotify_init
        self.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self.fanotify_init.restype = ctypes.c_int
        self.fanotify_mark = self.lib.fanotify_mark
        self.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                       ctypes.c_char_p]
        self.fanotify_mark.restype = ctypes.c_int
        self.fstatfs = self.lib.fstatfs64
        self.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
        self.fstatfs.restype = ctypes.c_int


_libc: _Libc | None = None


def libc() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def fsid_of_fd(fd: int) -> tuple[int, int]:
    st = _Statfs()
    if libc().fstatfs(fd, ctypes.byref(st)) != 0:
        raise _oserror("fstatfs")
    return (st.f_fsid[0], st.f_fsid[1])


def _reason(e: OSError) -> str:
    name = _errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name}: {os.strerror(e.errno or 0)}"


# --- the source ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarkInfo:
    device: Device
    fstype: str
    mountpoint: str
    fsid: tuple[int, int]
    mount_id: int = 0  # of the mount the mark was placed through: tells a remount apart


class _Group:
    """One fanotify group (fd). Holds at most one live superblock per fsid unless full."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.marks: dict[tuple[int, int], MarkInfo] = {}  # devnum -> mark, live superblocks
        self.retired: dict[tuple[int, int], MarkInfo] = {}  # fsid -> mark of a gone superblock

    def holders(self, fsid: tuple[int, int]) -> list[MarkInfo]:
        return [m for m in self.marks.values() if m.fsid == fsid]


class FanotifySource:
    """Reports ``fs.error`` for every ``FAN_FS_ERROR`` on mounted filesystems of ``fstypes``.

    Events name a filesystem only by fsid, and ext4's fsid comes from its UUID: two images cloned
    from one template share it (the kernel accepts both marks in one group, and an error on one
    is indistinguishable from an error on the other). So a superblock whose fsid is already
    marked in the group goes into another fanotify group (fd), up to ``max_groups``; the group an
    event is read from then names the superblock. Past the limit the event is sent without a
    device, with ``details["candidates"]`` (and listed in ``ambiguous``).

    Status for the daemon: ``marked`` (devnum -> mountpoint of the mark), ``marks`` (devnum ->
    MarkInfo), ``mark_errors`` (mountpoint -> why it could not be marked), ``ambiguous`` (fsid ->
    device names sharing it in one group), ``groups`` (fanotify fds in use).
    """

    name = "fanotify"

    def __init__(self, fstypes: Iterable[str] = ("ext4",), *,
                 mountinfo_path: str = "/proc/self/mountinfo", max_groups: int = 16) -> None:
        self.fstypes = frozenset(fstypes)
        self.mountinfo_path = mountinfo_path
        self.max_groups = max(1, max_groups)
        self.marked: dict[tuple[int, int], str] = {}
        self.marks: dict[tuple[int, int], MarkInfo] = {}
        self.mark_errors: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        self.read_errors = 0
        self._groups: list[_Group] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send: Send | None = None

    @property
    def groups(self) -> int:
        return len(self._groups)

    # -- kernel handles --
    @staticmethod
    def _init_fd() -> int:
        fd = libc().fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK,
                                  os.O_RDONLY | O_LARGEFILE)
        if fd < 0:
            raise _oserror("fanotify_init")
        return fd

    def _open(self) -> _Group:
        try:
            libc()
        except (OSError, AttributeError) as e:
            raise SourceUnavailable(f"libc has no fanotify: {e}",
                                    "needs glibc with fanotify_init/fanotify_mark") from e
        try:
            fd = self._init_fd()
        except OSError as e:
            hint = {
                _errno.EPERM: "fanotify needs CAP_SYS_ADMIN in the initial user namespace (run as root)",
                _errno.EINVAL: "kernel too old for FAN_REPORT_FID/FAN_FS_ERROR (needs Linux >= 5.16)",
                _errno.ENOSYS: "kernel built without CONFIG_FANOTIFY",
                _errno.EMFILE: "too many fanotify groups or open files (fs.fanotify.max_user_groups)",
            }.get(e.errno or 0, "check CONFIG_FANOTIFY and privileges")
            raise SourceUnavailable(f"fanotify_init failed: {_reason(e)}", hint) from e
        return self._add_group(fd)

    def _add_group(self, fd: int) -> _Group:
        group = _Group(fd)
        self._groups.append(group)
        if self._loop is not None:
            self._loop.add_reader(fd, self._drain, group)
        return group

    def _close_group(self, group: _Group) -> None:
        if self._loop is not None:
            self._loop.remove_reader(group.fd)
        self._drain(group)  # whatever is still queued
        os.close(group.fd)
        self._groups.remove(group)

    def _open_sb(self, entries: list[MountEntry]) -> tuple[int, MountEntry, tuple[int, int]] | str:
        """An fd on the root of one mount of the superblock, the mount, and its fsid."""
        reason = "no usable mountpoint"
        want = os.makedev(entries[0].major, entries[0].minor)
        # Prefer mounts of the filesystem root, then any; skip over-mounted or vanished paths by
        # opening the path and checking the device of what was opened (no TOCTOU on the mark).
        for entry in sorted(entries, key=lambda e: (e.root != "/", e.mount_id)):
            try:
                dfd = os.open(entry.mountpoint, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                              | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_DIRECTORY", 0))
            except OSError as e:
                reason = _reason(e)
                continue
            try:
                if os.fstat(dfd).st_dev != want:
                    reason = "mountpoint is over-mounted"
                else:
                    return dfd, entry, fsid_of_fd(dfd)
            except OSError as e:
                reason = _reason(e)
            os.close(dfd)
        return reason

    def _choose_group(self, devnum: tuple[int, int], fsid: tuple[int, int],
                      assigned: dict[int, set[tuple[int, int]]]) -> _Group:
        """Where to mark: the group that already has this superblock, else one without its fsid."""
        for g in self._groups:
            old = g.marks.get(devnum)
            if old is not None and old.fsid == fsid and fsid not in assigned[id(g)]:
                return g  # sticky: a live mark must not move (it would report twice)
        for g in self._groups:
            if fsid not in assigned[id(g)]:
                return g
        if len(self._groups) < self.max_groups:
            try:
                g = self._add_group(self._init_fd())
                assigned[id(g)] = set()
                return g
            except OSError as e:
                log.warning("fanotify.group_unavailable", reason=_reason(e))
        return self._groups[0]  # ambiguous; reported with candidates

    def remark(self) -> None:
        """Mark every watched superblock mounted now; forget the ones that are gone."""
        try:
            entries = read_mountinfo(self.mountinfo_path)
        except OSError as e:
            log.warning("fanotify.mountinfo_unreadable", path=self.mountinfo_path, error=str(e))
            return
        sbs: dict[tuple[int, int], list[MountEntry]] = {}
        for entry in entries:
            if entry.fstype in self.fstypes:
                sbs.setdefault(entry.devnum, []).append(entry)
        # Superblocks already marked first, so they keep their group.
        order = sorted(sbs, key=lambda d: not any(d in g.marks for g in self._groups))
        assigned: dict[int, set[tuple[int, int]]] = {id(g): set() for g in self._groups}
        new_marks: dict[int, dict[tuple[int, int], MarkInfo]] = {id(g): {} for g in self._groups}
        errors: dict[str, str] = {}
        for devnum in order:
            mounts = sbs[devnum]
            opened = self._open_sb(mounts)
            if isinstance(opened, str):
                errors[mounts[0].mountpoint] = opened
                continue
            dfd, entry, fsid = opened
            try:
                group = self._choose_group(devnum, fsid, assigned)
                new_marks.setdefault(id(group), {})
                if libc().fanotify_mark(group.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
                                        FAN_FS_ERROR, dfd, None) != 0:
                    # The superblock's reason (EOPNOTSUPP, ENODEV, EXDEV): no other mount of
                    # it would do better.
                    errors[entry.mountpoint] = _reason(_oserror("fanotify_mark"))
                    continue
            finally:
                os.close(dfd)
            assigned[id(group)].add(fsid)
            new_marks[id(group)][devnum] = MarkInfo(
                device=Device(devnum[0], devnum[1], block_device_name(*devnum)),
                fstype=entry.fstype, mountpoint=entry.mountpoint, fsid=fsid, mount_id=entry.mount_id)
        for mp, why in errors.items():
            if self.mark_errors.get(mp) != why:
                log.warning("fanotify.mark_failed", mountpoint=mp, reason=why)
        self.mark_errors = errors
        for g in list(self._groups):
            now = new_marks.get(id(g), {})
            # Remember gone superblocks' fsids: an error that raced with umount (or from a
            # lazily unmounted fs still in use) is still attributed. Bounded.
            for devnum, m in g.marks.items():
                if devnum not in now and not any(n.fsid == m.fsid for n in now.values()):
                    g.retired[m.fsid] = m
            for n in now.values():
                g.retired.pop(n.fsid, None)
            while len(g.retired) > 256:
                g.retired.pop(next(iter(g.retired)))
            g.marks = now
            if g is not self._groups[0] and not now:
                self._close_group(g)
        self.marks = {d: m for g in self._groups for d, m in g.marks.items()}
        self.marked = {d: m.mountpoint for d, m in self.marks.items()}
        self.ambiguous = {}
        for g in self._groups:
            for fsid in {m.fsid for m in g.marks.values()}:
                holders = g.holders(fsid)
                if len(holders) > 1:
                    self.ambiguous[fsid_str(fsid) or ""] = sorted(
                        str(m.device.name or m.mountpoint) for m in holders)
        if self.ambiguous:
            log.warning("fanotify.fsid_ambiguous", max_groups=self.max_groups, shared=self.ambiguous)

    # -- events --
    def _observation(self, group: _Group, ev: FsError) -> Observation:
        info: MarkInfo | None = None
        details: dict[str, object] = {"error_count": ev.error_count, "fsid": fsid_str(ev.fsid)}
        if ev.fsid is not None:
            holders = group.holders(ev.fsid)
            if len(holders) == 1:
                info = holders[0]
            elif len(holders) > 1:
                details["candidates"] = sorted(str(m.device.name or m.mountpoint) for m in holders)
            else:
                info = group.retired.get(ev.fsid)
        if ev.handle_type is not None:
            details["handle_type"] = ev.handle_type
        return Observation(
            source=self.name,
            kind="fs.error",
            time=time.time(),
            device=info.device if info else None,
            fs=info.fstype if info else None,
            mount=info.mountpoint if info else None,
            kernel=Kernel(errno=ev.error, inode=ev.inode, pid=ev.pid),
            count=max(ev.error_count, 1),
            details=details,
        )

    def _drain(self, group: _Group) -> None:
        while True:
            try:
                buf = os.read(group.fd, 65536)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                self.read_errors += 1
                log.warning("fanotify.read_failed", error=str(e))
                return
            if not buf:
                return
            for ev in parse_events(buf):
                if self._send is not None:
                    self._send(self._observation(group, ev))

    def status(self) -> dict[str, object]:
        return {
            "marked": {f"{dev[0]}:{dev[1]}": {"mount": m.mountpoint, "mount_id": m.mount_id}
                       for dev, m in self.marks.items()},
            "mark_errors": dict(self.mark_errors),
            "groups": self.groups,
        }

    async def run(self, send: Send, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        self._send = send
        self._open()
        watch: MountTableWatch | None = None
        try:
            try:
                watch = MountTableWatch(self.mountinfo_path)
            except OSError as e:
                raise SourceUnavailable(f"cannot watch {self.mountinfo_path}: {e}",
                                        "without it marks are lost on the next mount") from e

            def on_mount_change() -> None:
                assert watch is not None
                try:
                    watch.consume()
                except OSError as e:
                    log.warning("fanotify.mount_watch_failed", error=str(e))
                self.remark()

            self.remark()
            self._loop = loop
            for g in self._groups:
                loop.add_reader(g.fd, self._drain, g)
            loop.add_reader(watch.fileno(), on_mount_change)
            ready()
            for g in list(self._groups):
                self._drain(g)  # anything queued between marking and add_reader
            await asyncio.Event().wait()
        finally:
            if watch is not None:
                if self._loop is not None:
                    loop.remove_reader(watch.fileno())
                watch.close()
            for g in list(self._groups):
                if self._loop is not None:
                    loop.remove_reader(g.fd)
                os.close(g.fd)
            self._groups = []
            self._loop = None
            self._send = None
            self.marks, self.marked = {}, {}
