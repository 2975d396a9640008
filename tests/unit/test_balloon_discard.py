"""The balloon's discards: a request the kernel refuses with EBUSY is split down to the pages
it holds.

The kernel's EBUSY (a page of the range still held by the mounted filesystem, a buffer the
journal has not let go of) cannot be provoked on demand, so ``fcntl.ioctl`` is replaced here by
one that refuses any range over the busy pages; the discards of real balloons run in
tests/integration (test_ve_lifecycle, test_repack)."""

from __future__ import annotations

import errno
import struct

import pytest

from fsnotifyd.errors import ImageError
from fsnotifyd.image import resize

PAGE = 4096


def fake_device(monkeypatch, busy: set[int], fail: int | None = None) -> list[tuple[int, int]]:
    done: list[tuple[int, int]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> None:
        assert request == resize.BLKDISCARD
        offset, length = struct.unpack("=QQ", arg)
        if fail is not None:
            raise OSError(fail, "refused")
        if any(offset <= p * PAGE < offset + length for p in busy):
            raise OSError(errno.EBUSY, "busy")
        done.append((offset, length))

    monkeypatch.setattr(resize.fcntl, "ioctl", ioctl)
    return done


def test_a_busy_page_is_skipped_and_the_rest_discarded(monkeypatch):
    done = fake_device(monkeypatch, busy={37, 200})
    n = resize.discard(3, 0, 256 * PAGE)
    assert n == 254 * PAGE
    covered = sorted(done)
    assert sum(length for _, length in covered) == 254 * PAGE
    assert all(not (o <= 37 * PAGE < o + length or o <= 200 * PAGE < o + length) for o, length in covered)
    assert len(done) <= 2 * 9 * 2  # halves down to a page: a few requests per busy page


def test_no_busy_page_is_one_request(monkeypatch):
    done = fake_device(monkeypatch, busy=set())
    assert resize.discard(3, 1 << 20, 95 << 20) == 95 << 20
    assert done == [(1 << 20, 95 << 20)]


def test_other_errors_name_the_range(monkeypatch):
    fake_device(monkeypatch, busy=set(), fail=errno.EIO)
    with pytest.raises(ImageError, match="discard of 4096 bytes at 8192"):
        resize.discard(3, 8192, PAGE)
