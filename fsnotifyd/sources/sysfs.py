"""ext4's own error record in sysfs: the counter that makes the published counts exact.

``/sys/fs/ext4/<dev>/errors_count`` is the superblock's ``s_error_count``, raised by every
ext4_error after the error is notified: usually it reads N+1 right after ``trigger_fs_error``
returns, sometimes a few ms later (7 ms measured; the correlator waits for it), and it survives
in the superblock across mounts. kmsg is rate limited and fanotify coalesces, so this counter
is the one place where every error is counted. The source reports each filesystem's counter
on start-up and on a period; the correlator turns a rise since the last accounted value (kept
in the daemon's state file) into fs.error events, so nothing that happened while the daemon
was down or while other sources were throttled goes unreported.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid as _uuid
from dataclasses import dataclass, field

from ..errors import SourceUnavailable
from ..events import Device, Kernel, Observation
from ..typing import ErrorCounter, Ready, Send

EXT4_SYSFS = "/sys/fs/ext4"

# fs/ext4/ext4.h EXT4_ERR_*: ext4 stores its own codes in the superblock, not errno values.
EXT4_ERRCODES: dict[int, int] = {
    2: errno.EIO,
    3: errno.ENOMEM,
    4: errno.EBADMSG,  # EFSBADCRC
    5: errno.EUCLEAN,  # EFSCORRUPTED
    6: errno.ENOSPC,
    7: errno.ENOKEY,
    8: errno.EROFS,
    9: errno.EFBIG,
    10: errno.EEXIST,
    11: errno.ERANGE,
    12: errno.EOVERFLOW,
    13: errno.EBUSY,
    14: errno.ENOTDIR,
    15: errno.ENOTEMPTY,
    16: errno.ESHUTDOWN,
    17: errno.EFAULT,
}


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace").strip()
    except OSError:
        return None


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def read_ext4_uuid(device_path: str) -> str | None:
    """The filesystem UUID from the on-disk superblock (offset 1024 + 0x68)."""
    try:
        fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 16, 1024 + 0x68)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != 16 or raw == bytes(16):
        return None
    return str(_uuid.UUID(bytes=raw))


def kernel_hz(config: str = "/proc/config.gz", timer_list: str = "/proc/timer_list") -> int:
    """The kernel's tick rate (CONFIG_HZ): from the built-in config, else measured from
    ``/proc/timer_list`` (jiffies against nanoseconds), else Debian's default 250."""
    import gzip
    import re

    try:
        with gzip.open(config, "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=", 1)[1])
    except (OSError, ValueError, EOFError):
        pass

    def sample() -> tuple[int, int] | None:
        try:
            with open(timer_list) as f:
                head = f.read(4096)
        except OSError:
            return None
        now = re.search(r"^now at (\d+) nsecs", head, re.M)
        jiffies = re.search(r"^jiffies: (\d+)", head, re.M)
        return (int(now.group(1)), int(jiffies.group(1))) if now and jiffies else None

    first = sample()
    if first is not None:
        time.sleep(0.1)
        second = sample()
        if second is not None and second[0] > first[0]:
            hz = (second[1] - first[1]) * 1e9 / (second[0] - first[0])
            for known in (100, 250, 300, 1000):
                if abs(hz - known) < known * 0.2:
                    return known
    return 250


@dataclass
class Ext4Counters:
    """Reads ``/sys/fs/ext4/<dev>``; implements :class:`fsnotifyd.typing.ErrorCounters`.

    The filesystem key is its UUID plus where it lives (loop backing file or device name):
    test images and cloned VE templates share UUIDs, and a key that merged them would hide
    one filesystem's errors behind another's counter.
    """

    root: str = EXT4_SYSFS
    dev_root: str = "/dev"
    sys_root: str = "/sys"
    _keys: dict[tuple[str, int], str] = field(default_factory=dict)
    _hz: int | None = None

    def devices(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except OSError:
            return []

    def fs_key(self, name: str) -> str | None:
        try:
            # The sysfs directory is recreated for every mount, so its inode tells mounts apart.
            ino = os.stat(f"{self.root}/{name}").st_ino
        except OSError:
            return None
        key = self._keys.get((name, ino))
        if key is None:
            fs_uuid = read_ext4_uuid(f"{self.dev_root}/{name}") or "no-uuid"
            where = _read(f"{self.sys_root}/block/{name}/loop/backing_file") or name
            key = f"{fs_uuid}@{where}"
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[(name, ino)] = key
        return key

    def read(self, device_name: str) -> ErrorCounter | None:
        base = f"{self.root}/{device_name}"
        total = _int(_read(f"{base}/errors_count"))
        if total is None:
            return None
        key = self.fs_key(device_name)
        if key is None:
            return None
        if total == 0:
            return ErrorCounter(key, 0, Kernel(), None)
        code = _int(_read(f"{base}/last_error_errcode"))
        ts = _int(_read(f"{base}/last_error_time"))
        last = Kernel(
            errno=EXT4_ERRCODES.get(code) if code else None,
            function=_read(f"{base}/last_error_func") or None,
            line=_int(_read(f"{base}/last_error_line")) or None,
            inode=_int(_read(f"{base}/last_error_ino")) or None,
            block=_int(_read(f"{base}/last_error_block")) or None,
        )
        return ErrorCounter(key, total, last, float(ts) if ts else None)

    def ratelimit(self, device_name: str) -> tuple[int, float] | None:
        """ext4's kmsg rate limit for errors on this filesystem: (burst, interval seconds).

        Despite its name, ``err_ratelimit_interval_ms`` shows and takes jiffies (ext4 exposes
        the ratelimit_state field raw): 1250 on this HZ=250 kernel is ext4's 5 s default.
        """
        base = f"{self.root}/{device_name}"
        burst = _int(_read(f"{base}/err_ratelimit_burst"))
        interval = _int(_read(f"{base}/err_ratelimit_interval_ms"))
        if burst is None or interval is None:
            return None
        if self._hz is None:
            self._hz = kernel_hz()
        return burst, interval / self._hz

    def first_error(self, device_name: str) -> dict[str, object]:
        base = f"{self.root}/{device_name}"
        return {
            "function": _read(f"{base}/first_error_func") or None,
            "line": _int(_read(f"{base}/first_error_line")) or None,
            "inode": _int(_read(f"{base}/first_error_ino")) or None,
            "block": _int(_read(f"{base}/first_error_block")) or None,
            "time": _int(_read(f"{base}/first_error_time")) or None,
        }


@dataclass
class SysfsSource:
    """Reports every ext4 filesystem's error counter at start and then every ``interval`` s."""

    counters: Ext4Counters = field(default_factory=Ext4Counters)
    interval: float = 1.0
    name: str = "sysfs"
    scans: int = 0

    def scan(self, send: Send) -> None:
        for dev in self.counters.devices():
            c = self.counters.read(dev)
            if c is None or c.errors_total == 0:
                continue
            send(
                Observation(
                    source=self.name,
                    kind="fs.error",
                    time=c.last_error_time or time.time(),
                    device=Device(name=dev),
                    kernel=c.last_error,
                    fs="ext4",
                    count=0,
                    errors_total=c.errors_total,
                    fs_key=c.fs_key,
                    details={"first_error": self.counters.first_error(dev)},
                )
            )
        self.scans += 1

    async def run(self, send: Send, ready: Ready) -> None:
        if not os.path.isdir(self.counters.root):
            raise SourceUnavailable(
                f"{self.counters.root} does not exist", hint="is the ext4 module loaded?"
            )
        self.scan(send)
        ready()
        while True:
            await asyncio.sleep(self.interval)
            self.scan(send)
