"""KmsgSource against real ext4 errors on loop devices (root, kernel 6.18).

Each test makes the kernel print the line itself (trigger_fs_error, errors=remount-ro,
EXT4_IOC_SHUTDOWN, a root inode cleared with debugfs) rather than writing a copy into
/dev/kmsg: a user-space write carries facility LOG_USER and the source rightly ignores it.
Other work on the machine may log at the same time, so only this test's device is looked at.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from fsnotifyd.events import Observation
from fsnotifyd.sources.kmsg import KmsgSource
from tests.conftest import kernel_missing
from tests.rigs.loop import LoopFs, loop_ext4, run

from . import sourcekit  # noqa: E402

pytestmark = pytest.mark.kernel

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)


def running(src: KmsgSource):
    return sourcekit.running(src, "/dev/kmsg")


wait_until = sourcekit.wait_until


def mine(got: list[Observation], name: str) -> list[Observation]:
    return [o for o in got if o.device is not None and o.device.name == name]


class TestKmsgLive:
    def test_trigger_fs_error(self, kernel):
        """trigger_fs_error's kernel line arrives as fs.error with function, comm and message."""
        comm = Path("/proc/self/comm").read_text().strip()

        async def main(fs: LoopFs) -> tuple[list[Observation], float, float, KmsgSource]:
            src = KmsgSource()
            async with running(src) as got:
                t0 = time.time()
                (fs.sysfs / "trigger_fs_error").write_text("hello")
                await wait_until(lambda: any(o.kind == "fs.error" for o in mine(got, fs.name)))
                t1 = time.time()
                await asyncio.sleep(0.1)  # nothing more must come for this device
                return mine(got, fs.name), t0, t1, src

        with loop_ext4() as fs:
            fs.quiet_ratelimits()
            obs, t0, t1, src = asyncio.run(main(fs))
        assert len(obs) == 1, obs
        o = obs[0]
        assert (o.source, o.kind, o.fs) == ("kmsg", "fs.error", "ext4")
        assert o.device.name == fs.name
        k = o.kernel
        assert (k.function, k.comm, k.message) == ("trigger_test_error", comm, "hello")
        assert isinstance(k.line, int) and k.line > 0
        # The record's stamp (CLOCK_MONOTONIC based) lands between the write and its reading.
        assert t0 - 0.05 <= o.time <= t1 + 0.05
        assert src.records_read >= 1 and src.lost_total == 0

    def test_remount_read_only(self, kernel):
        """errors=remount-ro gives fs.error, the journal abort and the remount as fs.readonly."""

        async def main(fs: LoopFs) -> list[Observation]:
            async with running(KmsgSource()) as got:
                (fs.sysfs / "trigger_fs_error").write_text("boom")
                await wait_until(lambda: sum(o.kind == "fs.readonly" for o in mine(got, fs.name)) >= 2)
                await asyncio.sleep(0.1)
                return mine(got, fs.name)

        with loop_ext4(mount_options="errors=remount-ro") as fs:
            fs.quiet_ratelimits()
            obs = asyncio.run(main(fs))
        assert [o.kind for o in obs] == ["fs.error", "fs.readonly", "fs.readonly"], obs
        assert obs[0].kernel.message == "boom"
        assert obs[1].details == {"reason": "journal_aborted", "journal": f"{fs.name}-8"}
        assert obs[2].details == {"reason": "errors_remount_ro"}

    def test_shutdown(self, kernel):
        """EXT4_IOC_SHUTDOWN's line gives fs.shutdown with its flags."""

        async def main(fs: LoopFs) -> list[Observation]:
            async with running(KmsgSource()) as got:
                fd = os.open(fs.mountpoint, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", 1))  # LOGFLUSH
                finally:
                    os.close(fd)
                await wait_until(lambda: any(o.kind == "fs.shutdown" for o in mine(got, fs.name)))
                await asyncio.sleep(0.1)
                return mine(got, fs.name)

        with loop_ext4() as fs:
            obs = asyncio.run(main(fs))
        shut = [o for o in obs if o.kind == "fs.shutdown"]
        assert len(shut) == 1 and shut[0].details == {"flags": 1, "mode": "logflush"}

    def test_mount_failed_with_reason(self, kernel, tmp_path):
        """A root inode cleared with debugfs fails the mount: fs.error, then fs.mount_failed with the reason."""
        if shutil.which("debugfs") is None:
            kernel_missing("debugfs not installed (e2fsprogs)")
        image = tmp_path / "fs.img"
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        run("mkfs.ext4", "-q", "-F", str(image))
        run("debugfs", "-w", "-R", "clri <2>", str(image))

        async def main(fs: LoopFs) -> list[Observation]:
            async with running(KmsgSource()) as got:
                res = fs.mount(target=tmp_path / "mnt")
                assert res.returncode != 0, "mount of a broken image succeeded"
                await wait_until(lambda: any(o.kind == "fs.mount_failed" for o in mine(got, fs.name)))
                return mine(got, fs.name)

        with loop_ext4(image=image, mount_options=None, workdir=tmp_path) as fs:
            obs = asyncio.run(main(fs))
        kinds = [o.kind for o in obs]
        assert kinds[-1] == "fs.mount_failed" and "fs.error" in kinds, obs
        err = obs[kinds.index("fs.error")]
        assert (err.kernel.function, err.kernel.inode, err.kernel.comm) == ("__ext4_fill_super", 2, "mount")
        assert obs[-1].kernel.message == "get root inode failed"
