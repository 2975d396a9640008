"""The test suite's PNG decoder (tests/pngdecode.py) against PNGs written here with each row filter."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from tests.pngdecode import SIGNATURE, decode


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode(rows: list[bytes], width: int, channels: int, filters: list[int]) -> bytes:
    """A PNG of ``rows`` (raw pixels), row y filtered with ``filters[y]``, as the spec defines them."""
    out, prev = bytearray(), bytes(width * channels)
    for row, f in zip(rows, filters, strict=True):
        enc = bytearray()
        for i, x in enumerate(row):
            a = row[i - channels] if i >= channels else 0
            b, c = prev[i], (prev[i - channels] if i >= channels else 0)
            pred = (0, a, b, (a + b) >> 1, _paeth(a, b, c))[f]
            enc.append((x - pred) & 0xFF)
        out += bytes([f]) + enc
        prev = row
    colour = 2 if channels == 3 else 6
    ihdr = struct.pack(">IIBBBBB", width, len(rows), 8, colour, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(out))) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_every_filter_decodes_to_the_pixels(channels: int) -> None:
    rnd = random.Random(7)
    width = 9
    rows = [bytes(rnd.randrange(256) for _ in range(width * channels)) for _ in range(10)]
    img = decode(encode(rows, width, channels, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    assert (img.width, img.height, img.channels) == (width, 10, channels)
    assert img.rows == rows
    assert img.pixel(2, 3) == tuple(rows[3][2 * channels:2 * channels + 3])
    assert decode(encode(rows, width, channels, [4] * 10), max_rows=4).rows == rows[:4]


def test_not_a_png() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        decode(b"GIF89a")
