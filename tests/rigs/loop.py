"""Real loop devices and loop-mounted ext4 (root): made fresh and always taken down again, in order.

``LoopFs`` is one such filesystem: umount, then detach the loop device it attached itself
(never ``losetup -D``: other tests and helpers share the machine).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)


@dataclass
class LoopFs:
    image: Path
    loop: str  # /dev/loopN
    mountpoint: Path | None = None
    _cleanups: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.loop)

    @property
    def devnum(self) -> tuple[int, int]:
        st = os.stat(self.loop)
        return (os.major(st.st_rdev), os.minor(st.st_rdev))

    @property
    def sysfs(self) -> Path:
        return Path("/sys/fs/ext4") / self.name

    def errors_count(self) -> int:
        return int((self.sysfs / "errors_count").read_text())

    def mount(self, options: str = "errors=continue", target: Path | None = None) -> subprocess.CompletedProcess[str]:
        target = target or self.image.parent / "mnt"
        target.mkdir(exist_ok=True)
        res = run("mount", "-t", "ext4", "-o", options, self.loop, str(target), check=False)
        if res.returncode == 0:
            self.mountpoint = target
        return res

    def umount(self) -> None:
        if self.mountpoint is not None:
            # A lazy umount as last resort keeps a failed test from leaking a busy mount.
            if run("umount", str(self.mountpoint), check=False).returncode != 0:
                run("umount", "-l", str(self.mountpoint), check=False)
            self.mountpoint = None

    def quiet_ratelimits(self) -> None:
        for knob in ("err_ratelimit_interval_ms", "warning_ratelimit_interval_ms", "msg_ratelimit_interval_ms"):
            with contextlib.suppress(OSError):
                (self.sysfs / knob).write_text("0")


@contextlib.contextmanager
def loop_device(image: Path, *, direct_io: bool = False) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    dev = run(*argv, str(image)).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def loop_ext4(size_mb: int = 32, *, mkfs: bool = True, image: Path | None = None,
              mount_options: str | None = "errors=continue", workdir: Path | None = None) -> Iterator[LoopFs]:
    """A fresh ext4 image on a loop device, mounted unless ``mount_options`` is None."""
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fsnd-")))
        if image is None:
            image = tmp / "fs.img"
            with open(image, "wb") as f:
                f.truncate(size_mb << 20)
            if mkfs:
                run("mkfs.ext4", "-q", "-F", str(image))
        dev = stack.enter_context(loop_device(image))
        fs = LoopFs(image=image, loop=dev)
        stack.callback(fs.umount)
        if mount_options is not None:
            res = fs.mount(mount_options, target=tmp / "mnt")
            if res.returncode != 0:
                raise RuntimeError(f"mount {dev} failed: {res.stderr.strip()}")
        yield fs
