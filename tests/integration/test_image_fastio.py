"""The exporter's C data path (``fsnotifyd/image/_fastio.c``) against a model of the disk.

A random mix of requests goes to an attached image's loop device (O_DIRECT, so every one
reaches the exporter): small and large writes, writes across two clusters, reads, discards,
flushes, and between them the control requests that change the stack under the C side
(snapshot, compaction, merge, read-only switches). After every read the bytes must be the
model's. The same run goes through the all-Python exporter (``FSNOTIFYD_FASTIO=0``), which
stays the fallback where the module is not built. A failed write-behind write is made real
by filling the image's host file system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import random
import struct

import pytest

from fsnotifyd.image import attach as A
from fsnotifyd.image import fastio
from tests.integration.test_image_datapath import MiB, images, nothing_left  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

BLKDISCARD = 0x1277
SIZE = 48 * MiB


@pytest.fixture(params=["c", "python"])
def data_path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("FSNOTIFYD_FASTIO", "0")
    elif fastio.load() is None:
        # Built by the bootstrap (setup.py build_ext); a missing build must not pass unseen.
        pytest.fail("fsnotifyd.image._fastio is not built: run scripts/bootstrap.sh")
    return request.param


class Disk:
    """The loop device, O_DIRECT, with page-aligned buffers."""

    def __init__(self, loop: str) -> None:
        self.fd = os.open(loop, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, 4 * MiB)

    def write(self, off: int, data: bytes) -> None:
        self.buf[:len(data)] = data
        with memoryview(self.buf) as view:
            assert os.pwritev(self.fd, [view[:len(data)]], off) == len(data)

    def read(self, off: int, n: int) -> bytes:
        with memoryview(self.buf) as view:
            assert os.preadv(self.fd, [view[:n]], off) == n
            return bytes(view[:n])

    def discard(self, off: int, n: int) -> None:
        fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", off, n))

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # a failed request's traceback may hold a view
            self.buf.close()


def _request(rng: random.Random) -> tuple[int, int]:
    """An offset and length the way a file system sends them: 4 KiB-aligned, 4 KiB to 2 MiB,
    on or off cluster boundaries."""
    n = rng.choice([4096, 8192, 64 << 10, 256 << 10, MiB, MiB, 2 * MiB, 3 * 4096])
    if rng.random() < 0.5:
        off = rng.randrange(0, SIZE - n + 1, MiB) if n <= MiB else rng.randrange(0, SIZE - n + 1, MiB)
    else:
        off = rng.randrange(0, SIZE - n + 1, 4096)
    return off, n


def test_random_requests_match_the_model(images, data_path):
    seed = random.randrange(1 << 30)
    print(f"seed {seed} ({data_path})")
    rng = random.Random(seed)
    img = images.image(SIZE, fs=None)
    model = bytearray(SIZE)
    att = images.attach(img)
    disk = Disk(att.loop)
    counts: dict[str, int] = {}
    try:
        for step in range(400):
            what = rng.choices(["write", "read", "stream", "discard", "flush", "snapshot", "compact", "merge",
                                "readonly"], weights=[40, 26, 4, 8, 6, 2, 3, 2, 2])[0]
            counts[what] = counts.get(what, 0) + 1
            off, n = _request(rng)
            where = f"step {step} {what} {off}+{n} (seed {seed})"
            if what == "write":
                data = rng.randbytes(n)
                disk.write(off, data)
                model[off:off + n] = data
            elif what == "read":
                assert disk.read(off, n) == model[off:off + n], where
            elif what == "stream":  # a sequential reader (read-ahead) with writes landing ahead of it
                start = rng.randrange(0, SIZE - 8 * MiB, MiB)
                for i in range(8):
                    assert disk.read(start + i * MiB, MiB) == model[start + i * MiB:start + (i + 1) * MiB], where
                    ahead = start + (i + rng.randrange(1, 4)) * MiB + rng.randrange(0, MiB - 65536, 4096)
                    if rng.random() < 0.5 and ahead + 65536 <= SIZE:
                        data = rng.randbytes(rng.choice([4096, 65536]))
                        disk.write(ahead, data)
                        model[ahead:ahead + len(data)] = data
            elif what == "discard":
                disk.discard(off, n)
                model[off:off + n] = bytes(n)
            elif what == "flush":
                os.fsync(disk.fd)
            elif what == "snapshot":
                assert A.control(att, {"op": "snapshot", "name": None})["ok"], where
            elif what == "compact":
                assert A.control(att, {"op": "compact"})["ok"], where
            elif what == "merge":
                shots = _snapshots(img)
                if shots:
                    r = A.control(att, {"op": "merge", "guid": rng.choice(shots)}, timeout=60)
                    assert r["ok"], (where, r)
            elif what == "readonly":
                assert A.control(att, {"op": "readonly", "value": True})["ok"]
                with pytest.raises(OSError) as e:
                    disk.write(off, bytes(n))
                assert e.value.errno in (errno.EIO, errno.EROFS), where
                assert disk.read(off, n) == model[off:off + n], where
                assert A.control(att, {"op": "readonly", "value": False})["ok"]
        for off in range(0, SIZE, 4 * MiB):
            assert disk.read(off, 4 * MiB) == model[off:off + 4 * MiB], f"final read at {off} (seed {seed})"
        st = A.status(att)
        print(f"  {counts}; fast_path {st['fast_path']}, read-ahead hits {st['read_ahead_hits']}, "
              f"errors {st['errors']}")
        if data_path == "c":
            fast = st["fast_path"]
            assert fast is not None and fast["writes"] > 0 and fast["reads"] > 0, st
        else:
            assert st["fast_path"] is None, st
    finally:
        disk.close()
        images.detach(att)
    # What a clean close left is what was written.
    att = images.attach(img)
    disk = Disk(att.loop)
    try:
        for off in range(0, SIZE, 4 * MiB):
            assert disk.read(off, 4 * MiB) == model[off:off + 4 * MiB], f"after reattach at {off} (seed {seed})"
    finally:
        disk.close()
        images.detach(att)


def _snapshots(img: str) -> list[str]:
    from fsnotifyd.image import descriptor

    d = descriptor.load(os.path.join(img, descriptor.NAME))
    return [s.guid for s in d.shots if s.guid != d.top and len(d.children(s.guid)) == 1]


def test_failed_write_behind_write_fails_the_next_flush(images):
    """Large writes go behind (acknowledged before the disk has them, like a disk's write
    cache). When one fails, the flush that was to make it durable fails, also when another
    request met the failure first, and the exporter counts it. The failure is real: the image's
    host file system is full, and the write goes to a cluster that is mapped but still a hole (a
    first 4 KiB write allocated it)."""
    if fastio.load() is None:
        pytest.fail("fsnotifyd.image._fastio is not built: run scripts/bootstrap.sh")
    from tests.rigs.loop import loop_ext4

    host_dir = images.root / "host"
    host_dir.mkdir()
    with loop_ext4(64, workdir=host_dir) as host:
        assert host.mountpoint is not None
        img = str(host.mountpoint / "img")
        from fsnotifyd.image import ops

        ops.create(img, 32 * MiB, fs=None)
        att = images.attach(img)
        disk = Disk(att.loop)
        try:
            disk.write(0, b"\1" * MiB)  # a whole cluster, then a direct write to it: writes may go behind now
            disk.write(0, b"\2" * MiB)
            for c in range(1, 24):  # 23 clusters mapped, 4 KiB of each on disk
                disk.write(c * MiB, b"\3" * 4096)
            os.fsync(disk.fd)
            filler = host.mountpoint / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * MiB)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            os.sync()
            before = A.status(att)["fast_path"]["writes"]
            failed = None
            for c in range(1, 24):
                try:
                    disk.write(c * MiB, b"\4" * MiB)
                except OSError as e:
                    failed = e
                    break
            # The next request Python serves meets the failure first (a first write, to a
            # cluster not mapped yet): it fails, and the flush must fail all the same.
            with pytest.raises(OSError):
                disk.write(30 * MiB, b"\5" * 4096)
            with pytest.raises(OSError) as flush:
                os.fsync(disk.fd)
            st = A.status(att)
            assert st["fast_path"]["writes"] > before, st  # the writes went through the C side
            # Acknowledged, then failed on the disk: the flush reports it.
            assert failed is None and st["errors"] >= 1, (st, failed)
            assert "write-behind: No space left" in st["last_error"], st
            assert flush.value.errno in (errno.EIO, errno.ENOSPC)
            assert A.watchdog_check(att, timeout=2.0) is True
            filler.unlink()
            os.sync()
            # Room again: what was flushed before is there.
            assert disk.read(0, MiB) == b"\2" * MiB
        finally:
            disk.close()
            images.detach(att)
