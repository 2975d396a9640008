"""The exporter's C data path (``_fastio.c``) without FUSE: its read and write called the way
libfuse calls them, over a real stack of delta files in a temporary directory, with Python
fallbacks that record what reached them. What is checked: mapped requests stay in C, the rest
falls through; C's copy of the mapping follows every change Python makes (allocation,
discard, compaction, snapshot); the bytes always read as a model says; C's writes in flight
are on disk before Python touches the file."""

from __future__ import annotations

import ctypes
import os
import random

import pytest

from fsnotifyd.image import fastio, ops
from fsnotifyd.image.stack import Stack

MiB = 1 << 20
CLUSTER = 256 << 10  # small clusters: more of them in a small image
SIZE = 8 * MiB
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                      ctypes.c_void_p)


@pytest.fixture
def fast():
    f = fastio.load()
    if f is None:  # built by scripts/bootstrap.sh (setup.py build_ext): a missing build must not pass unseen
        pytest.fail("fsnotifyd.image._fastio is not built: run scripts/bootstrap.sh")
    yield f
    with f.lock:
        f.off()
        f.raise_error()


class Harness:
    """An image, its stack served by C, and libfuse's two calls."""

    def __init__(self, fast: fastio.FastIO, directory: str) -> None:
        ops.create(directory, SIZE, cluster=CLUSTER, fs=None)
        self.dir = directory
        self.fast = fast
        self.stack = Stack.open(directory)
        self.model = bytearray(SIZE)
        self.fallbacks: list[tuple[str, int, int]] = []
        self.c_writes, self.c_reads = fast.stats.writes, fast.stats.reads  # the C counters are per process
        lib = self.lib = fast._lib
        for fn in (lib.fio_read, lib.fio_write):
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p]
            fn.restype = ctypes.c_int

        def py_read(path, buf, size, off, fi):  # what mfusepy's callback does, under the lock
            self.fallbacks.append(("read", off, size))
            view = memoryview((ctypes.c_char * size).from_address(buf)).cast("B")
            with fast.lock:
                return self.stack.read_into(off, view)

        def py_write(path, buf, size, off, fi):
            self.fallbacks.append(("write", off, size))
            with fast.lock:
                return self.stack.write(off, ctypes.string_at(buf, size))

        self._callbacks = (CB(py_read), CB(py_write))  # alive while C may call them
        lib.fio_set_fallbacks(ctypes.cast(self._callbacks[0], ctypes.c_void_p),
                              ctypes.cast(self._callbacks[1], ctypes.c_void_p))
        self.serve()

    def serve(self) -> None:
        """What the exporter does after the stack changed."""
        with self.fast.lock:
            self.stack.use_direct_io(0, read_ahead=True, top_read_ahead=False)
            assert self.fast.serve(self.stack.top, self.stack.size, False)

    def write(self, off: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        assert self.lib.fio_write(b"/disk", buf, len(data), off, None) == len(data)
        self.model[off:off + len(data)] = data

    def read(self, off: int, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        assert self.lib.fio_read(b"/disk", buf, n, off, None) == n
        return buf.raw[:n]

    def check(self, off: int, n: int, where: str = "") -> None:
        assert self.read(off, n) == self.model[off:off + n], where

    def assert_mapping(self) -> None:
        """C's copy of the top's mapping is the top's."""
        with self.fast.lock:
            top = self.stack.top
            wrong = [(vc, self.fast.get(vc), top.physical(vc)) for vc in range(len(top.bat))
                     if self.fast.get(vc) != top.physical(vc)]
        assert wrong == [], wrong[:5]

    def close(self) -> None:
        with self.fast.lock:
            self.fast.off()
            self.stack.close()


@pytest.fixture
def h(fast, tmp_path):
    harness = Harness(fast, str(tmp_path / "img"))
    yield harness
    harness.close()


def test_mapped_requests_stay_in_c_the_rest_falls_through(h):
    h.write(0, b"a" * 4096)  # cluster 0 unmapped: Python allocates it
    assert h.fallbacks == [("write", 0, 4096)]
    h.assert_mapping()
    h.write(4096, b"b" * 4096)  # mapped now: C
    h.write(CLUSTER, os.urandom(CLUSTER))  # Python (allocates cluster 1)
    h.write(CLUSTER, os.urandom(CLUSTER))  # C, direct
    h.write(CLUSTER, os.urandom(CLUSTER))  # C, written behind
    assert len(h.fallbacks) == 2
    h.write(CLUSTER + CLUSTER // 2, os.urandom(CLUSTER))  # across clusters 1 and 2 (unmapped): Python
    assert len(h.fallbacks) == 3
    h.write(CLUSTER // 2, os.urandom(2 * CLUSTER))  # across 0, 1, 2, all mapped: C, in pieces
    assert len(h.fallbacks) == 3
    h.check(0, 3 * CLUSTER)
    assert len(h.fallbacks) == 3  # mapped: read in C
    h.check(5 * CLUSTER, 4096)  # not mapped: Python (zeros)
    assert h.fallbacks[-1] == ("read", 5 * CLUSTER, 4096)
    assert h.fast.stats.writes - h.c_writes == 4 and h.fast.stats.reads - h.c_reads >= 1


def test_the_mapping_follows_discard_compaction_and_snapshot(h):
    for c in range(12):
        h.write(c * CLUSTER, os.urandom(CLUSTER))
    with h.fast.lock:
        h.stack.flush()
        for c in (1, 3, 4, 7):  # discards arrive through Python (fallocate)
            h.stack.discard(c * CLUSTER, CLUSTER)
            h.model[c * CLUSTER:(c + 1) * CLUSTER] = bytes(CLUSTER)
    h.assert_mapping()
    with h.fast.lock:
        result = ops.compact(h.stack.top)  # clusters move into the holes
    assert result.moved > 0
    h.assert_mapping()
    for c in range(12):  # C writes land in the moved clusters, not in the old places
        h.write(c * CLUSTER + 4096, os.urandom(8192))
    h.check(0, 12 * CLUSTER)
    with h.fast.lock:
        ops.snapshot(h.stack, h.dir)
    h.serve()
    h.assert_mapping()
    before = bytes(h.model)
    h.write(2 * CLUSTER, os.urandom(4096))  # only in the snapshot: Python copies it up
    assert h.fallbacks[-1] == ("write", 2 * CLUSTER, 4096)
    h.write(2 * CLUSTER + 8192, os.urandom(4096))  # now in the new top: C
    assert h.fallbacks[-1] == ("write", 2 * CLUSTER, 4096)
    h.check(0, SIZE)
    with h.fast.lock:  # the snapshot kept the old bytes
        assert h.stack.deltas[0].read(h.stack.deltas[0].physical(2), 0, CLUSTER) == before[2 * CLUSTER:3 * CLUSTER]


def test_writes_in_flight_are_on_disk_before_python_goes_on(h):
    for c in range(4):  # Python allocates; then the first direct write in C is synchronous
        h.write(c * CLUSTER, os.urandom(CLUSTER))
    h.write(0, os.urandom(CLUSTER))
    last = {}
    for _ in range(3):  # these go behind
        for c in range(4):
            last[c] = os.urandom(CLUSTER)
            h.write(c * CLUSTER, last[c])
    assert len(h.fallbacks) == 4
    with h.fast.lock:  # what Python reads from the file itself is the last write
        top = h.stack.top
        for c in range(4):
            assert os.pread(top.fd, CLUSTER, top.physical(c) * CLUSTER) == last[c], c


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_requests_and_changes_match_the_model(h, seed):
    rng = random.Random(seed)
    for step in range(600):
        what = rng.choices(["write", "read", "stream", "discard", "flush", "compact"],
                           weights=[50, 30, 6, 8, 5, 2])[0]
        n = rng.choice([4096, 8192, 64 << 10, CLUSTER, CLUSTER, 2 * CLUSTER])
        off = rng.randrange(0, SIZE - n + 1, 4096 if rng.random() < 0.5 else CLUSTER)
        where = f"step {step} {what} {off}+{n} (seed {seed})"
        if what == "write":
            h.write(off, rng.randbytes(n))
        elif what == "read":
            h.check(off, n, where)
        elif what == "stream":  # a sequential reader (read-ahead) with writes landing ahead of it
            start = rng.randrange(0, SIZE - 8 * CLUSTER, CLUSTER)
            for i in range(8):
                h.check(start + i * CLUSTER, CLUSTER, f"{where} stream {i}")
                ahead = start + (i + rng.randrange(1, 4)) * CLUSTER + rng.randrange(0, CLUSTER, 4096)
                if rng.random() < 0.5 and ahead + 8192 <= SIZE:
                    h.write(ahead, rng.randbytes(rng.choice([4096, 8192])))
        elif what == "discard":
            with h.fast.lock:
                h.stack.discard(off, n)
            h.model[off:off + n] = bytes(n)
        elif what == "flush":
            with h.fast.lock:
                h.stack.flush()
        else:
            with h.fast.lock:
                h.stack.flush()
                ops.compact(h.stack.top)
            h.assert_mapping()
    h.assert_mapping()
    h.check(0, SIZE, f"final (seed {seed})")
    assert h.fast.stats.writes > h.c_writes and h.fast.stats.reads > h.c_reads
