"""Hostile image files: headers, BATs and descriptors generated or mutated by hypothesis.

Opening a delta, opening a stack and ``image check`` (with and without repair) may only ever
raise :class:`ImageError` (naming the file), never hang, never ask the OS for more bytes than a
file can hold (every ``pread``/``pwrite`` is watched), and a stack that did open writes only to
its top's BAT, header and data clusters past the BAT region. With 300 examples per property
the module runs in about 10 s; ``FSNOTIFYD_FUZZ_EXAMPLES=N`` sets another count (1500: 36 s).
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tempfile
import tracemalloc
import uuid
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsnotifyd.errors import ImageError
from fsnotifyd.image import descriptor as dd
from fsnotifyd.image import ops
from fsnotifyd.image.check import check
from fsnotifyd.image.delta import Delta
from fsnotifyd.image.format import (
    HEADER,
    HEADER_SIZE,
    IN_USE,
    SIGNATURE,
    ZERO_CLUSTER,
    bat_region,
    new_header,
    parse_header,
)
from fsnotifyd.image.stack import Stack

KiB = 1 << 10
C = 4 * KiB
SIZE = 32 * C  # 32 virtual clusters
N = int(os.environ.get("FSNOTIFYD_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=N or 300, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_IO = 1 << 22  # no single read or write of these tiny files may ask for more


# -- fixtures built once ----------------------------------------------------------------------

def _build_template() -> tuple[bytes, bytes, str]:
    """A valid image: root delta with a reserved BAT region (first data cluster 5) and 20
    allocated clusters, some discarded; returns (delta bytes, descriptor bytes, delta name)."""
    with tempfile.TemporaryDirectory() as t:
        d = os.path.join(t, "img")
        ops.create_empty(d, SIZE, C, reserve=16 << 20)
        with Stack.open(d) as s:
            for vc in range(20):
                s.write(vc * C, bytes([vc + 1]) * C)
            s.flush()
            s.discard(3 * C, 2 * C)
        name = ops.ROOT_FILE
        with open(os.path.join(d, name), "rb") as f:
            delta = f.read()
        with open(os.path.join(d, dd.NAME), "rb") as f:
            desc = f.read()
    return delta, desc, name


DELTA, DESC, NAME = _build_template()
TEMPLATE_HEADER = parse_header(DELTA, len(DELTA))
assert TEMPLATE_HEADER.first_cluster == 5


@contextlib.contextmanager
def image_dir(delta: bytes | None = None, desc: bytes | None = None, extra: dict[str, bytes] | None = None):
    with tempfile.TemporaryDirectory(prefix="fsnd-fuzz-") as t:
        d = os.path.join(t, "img")
        os.mkdir(d)
        with open(os.path.join(d, NAME), "wb") as f:
            f.write(DELTA if delta is None else delta)
        with open(os.path.join(d, dd.NAME), "wb") as f:
            f.write(DESC if desc is None else desc)
        for name, data in (extra or {}).items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        yield d


@contextlib.contextmanager
def watched_io():
    """Every pread/pwrite: its (fd, offset, length); none larger than MAX_IO."""
    calls: list[tuple[str, int, int, int]] = []
    real_pread, real_pwrite = os.pread, os.pwrite

    def pread(fd, n, off):
        assert 0 <= n <= MAX_IO, f"pread of {n} bytes"
        calls.append(("r", fd, off, n))
        return real_pread(fd, n, off)

    def pwrite(fd, data, off):
        n = len(memoryview(data).cast("B"))
        assert n <= MAX_IO, f"pwrite of {n} bytes"
        calls.append(("w", fd, off, n))
        return real_pwrite(fd, data, off)

    with mock.patch.object(os, "pread", pread), mock.patch.object(os, "pwrite", pwrite):
        yield calls


def open_and_check(d: str) -> None:
    """The calls a hostile directory may meet; only ImageError may come out of them."""
    with watched_io():
        try:
            Delta.open(os.path.join(d, NAME), strict=False).close()
        except ImageError as e:
            assert e.file
        try:
            Stack.open(d).close()
        except ImageError as e:
            assert e.file or e.field
        r1 = check(d)
        r2 = check(d, repair=True)
        r3 = check(d)
    for p in r1.problems + r2.problems + r3.problems:
        assert isinstance(p.what, str) and p.file
    if r2.problems and all(p.repaired for p in r2.problems):
        assert r3.clean, str(r3)
    assert [str(p) for p in r3.problems] == [str(p) for p in check(d).problems]  # repair is idempotent


def exercise_stack(d: str, seed: int) -> None:
    """Writes and discards through a stack that opened: only the BAT, the header and data
    clusters past the BAT region are written, and the disk reads back like the model."""
    try:
        s = Stack.open(d)
    except ImageError:
        return
    rng = random.Random(seed)
    with s, watched_io() as calls:
        top = s.top
        first = top.header.first_block
        bat_end = HEADER_SIZE + top.header.entries * 4
        model = bytearray(s.read(0, s.size))
        for _ in range(12):
            off = rng.randrange(s.size)
            n = min(rng.choice([1, 100, C, 2 * C + 3]), s.size - off)
            if rng.random() < 0.3:
                s.discard(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                s.write(off, data)
                model[off:off + n] = data
        s.flush()
        assert s.read(0, s.size) == model
        for kind, fd, off, n in calls:
            if kind == "w" and fd == top.fd:
                assert off == 0 and n == HEADER_SIZE or HEADER_SIZE <= off and off + n <= bat_end or off >= first, \
                    (off, n, first, bat_end)


# -- headers -----------------------------------------------------------------------------------

FIELDS = {  # name: (offset, struct format)
    "m_Type": (16, "<I"), "m_Heads": (20, "<I"), "m_Cylinders": (24, "<I"), "m_Sectors": (28, "<I"),
    "m_Size": (32, "<I"), "m_SizeInSectors": (36, "<Q"), "m_DiskInUse": (44, "<I"),
    "m_FirstBlockOffset": (48, "<I"), "m_Flags": (52, "<I"),
}
INTERESTING = [0, 1, 2, 7, 8, 16, 40, 512, 2048, 4096, 1 << 16, 1 << 31, (1 << 32) - 1, IN_USE,
               (1 << 38), (1 << 41), (1 << 63), (1 << 64) - 1]


@st.composite
def mutated_delta(draw) -> bytes:
    raw = bytearray(DELTA)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "flip", "truncate", "extend", "bat"]))
        if kind == "field":
            name = draw(st.sampled_from(sorted(FIELDS)))
            off, fmt = FIELDS[name]
            bits = 8 * struct.calcsize(fmt)
            v = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << bits) - 1)) % (1 << bits)
            if len(raw) >= off + struct.calcsize(fmt):
                struct.pack_into(fmt, raw, off, v)
        elif kind == "flip":
            i = draw(st.integers(0, min(len(raw), 5 * C) - 1)) if raw else 0
            if raw:
                raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del raw[draw(st.integers(0, len(raw))):]
        elif kind == "extend":
            raw += draw(st.binary(max_size=C + 10))
        else:
            if len(raw) >= HEADER_SIZE + 4 * 32:
                i = draw(st.integers(0, 31))
                v = draw(st.sampled_from([0, 1, 4, 5, 6, 7, 24, 25, 30, 1 << 20, (1 << 32) - 1]))
                struct.pack_into("<I", raw, HEADER_SIZE + 4 * i, v)
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_a_delta(raw):
    with image_dir(delta=raw) as d:
        open_and_check(d)


@FUZZ
@given(st.binary(max_size=HEADER_SIZE - len(SIGNATURE)), st.integers(0, 2 * C))
def test_random_header_with_a_valid_signature(rest, length):
    raw = SIGNATURE + rest
    raw = raw + bytes(max(0, length - len(raw)))
    with image_dir(delta=raw) as d:
        open_and_check(d)


@FUZZ
@given(mutated_delta(), st.integers(0, 1 << 30))
def test_mutated_valid_delta(raw, seed):
    with image_dir(delta=raw) as d:
        open_and_check(d)
        exercise_stack(d, seed)


def test_huge_bat_claim_is_refused_before_reading():
    """A header claiming 2^32-1 BAT entries (16 GiB of BAT) on a 100-byte file."""
    entries = (1 << 32) - 1
    h = HEADER.pack(SIGNATURE, 2, 16, 0, C // 512, entries, entries * C // 512, 0,
                    bat_region(C, entries) // 512, 0, b"\0" * 8)
    raw = h + bytes(100 - len(h))
    with image_dir(delta=raw) as d:
        tracemalloc.start()
        try:
            open_and_check(d)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20
        try:
            Delta.open(os.path.join(d, NAME))
            raise AssertionError("opened")
        except ImageError as e:
            assert e.field == "m_FirstBlockOffset" and "truncated" in e.message


def test_header_sizes_at_the_limits():
    for size, cluster in ((1 << 50, 64 << 20), (1 << 50, 1 << 20), ((1 << 50) + 512, 1 << 20)):
        try:
            h = new_header(size, cluster)
        except ImageError:
            continue
        assert parse_header(h.pack(), h.first_block) == h


# -- BATs --------------------------------------------------------------------------------------

@st.composite
def hostile_bat(draw) -> tuple[bytes, list[int]]:
    first = TEMPLATE_HEADER.first_cluster
    nclusters = draw(st.integers(first, first + 40))
    entry = st.sampled_from([0, 0, 0, 1, first - 1, first, first + 1, nclusters - 1, nclusters, nclusters + 1,
                             (1 << 32) - 1]) | st.integers(0, nclusters + 3)
    bat = draw(st.lists(entry, min_size=32, max_size=32))
    tail = draw(st.integers(0, C - 1))
    raw = bytearray(DELTA[:TEMPLATE_HEADER.first_block])
    struct.pack_into("<32I", raw, HEADER_SIZE, *bat)
    rng = random.Random(draw(st.integers(0, 1 << 20)))
    raw += b"".join(bytes([rng.randrange(1, 256)]) * C for _ in range(nclusters - first)) + b"t" * tail
    return bytes(raw), bat


@FUZZ
@given(hostile_bat(), st.integers(0, 1 << 30))
def test_hostile_bat(case, seed):
    raw, bat = case
    with image_dir(delta=raw) as d:
        path = os.path.join(d, NAME)
        with watched_io():
            loose = Delta.open(path, strict=False)
        loose.close()
        try:
            Delta.open(path).close()
            assert not loose.problems
        except ImageError as e:
            assert loose.problems and e.field and e.field.startswith("bat[")
        good = {vc: p for vc, p in enumerate(bat) if p and vc not in {x.index for x in loose.problems}}
        # all ones is the zero mark (docs/image-format.md), not a bad entry: it reads as zeros
        before = {vc: bytes(C) if p == ZERO_CLUSTER else raw[p * C:(p + 1) * C] for vc, p in good.items()}
        r = check(d, repair=True)
        assert all(p.repaired for p in r.problems), str(r)
        assert check(d).clean
        with Stack.open(d, writable=False) as s:  # the entries that were right still read their data
            for vc, data in before.items():
                assert s.read(vc * C, C) == data
        exercise_stack(d, seed)
        assert check(d).clean


# -- descriptors -------------------------------------------------------------------------------

def desc_xml(*, size="256", sectors="8", images=None, top=None, shots=None, extra="") -> bytes:
    g = "{" + str(uuid.UUID(int=1)) + "}"
    images = [(g, NAME)] if images is None else images
    shots = [(g, dd.ROOT_PARENT)] if shots is None else shots
    top = g if top is None else top
    ims = "".join(f"<Image><GUID>{a}</GUID><Type>Compressed</Type><File>{b}</File></Image>" for a, b in images)
    sh = "".join(f"<Shot><GUID>{a}</GUID><ParentGUID>{b}</ParentGUID></Shot>" for a, b in shots)
    return (f"<?xml version='1.0' encoding='UTF-8'?>{extra}<Parallels_disk_image Version='1.0'>"
            f"<Disk_Parameters><Disk_size>{size}</Disk_size><Sectors>{sectors}</Sectors></Disk_Parameters>"
            f"<StorageData><Storage>{ims}</Storage></StorageData>"
            f"<Snapshots><TopGUID>{top}</TopGUID>{sh}</Snapshots></Parallels_disk_image>").encode()


def test_template_descriptor_is_what_desc_xml_builds():
    with image_dir(desc=desc_xml()) as d:
        assert check(d).clean


GUIDS = ["{" + str(uuid.UUID(int=i)) + "}" for i in range(1, 6)]
NUMBERS = st.sampled_from(["0", "-1", "8", "256", "256", "1e9", " 64 ", "0x40", "9" * 30, "9" * 5000, "", "NaN",
                           str(1 << 41), str((1 << 50) // 512 + 1), "&#49;&#50;"])
NAMES = st.sampled_from([NAME, "../root.hds", "/etc/passwd", "a/b", "", ".", "..", dd.NAME, "root.hds.x",
                         "fifo", "dir", "x" * 300, "%2e%2e", "\u00e9t\u00e9"])
GUID_TEXT = st.sampled_from(GUIDS + [dd.ROOT_PARENT, "{not-a-guid}", "", "0" * 32, "{" + "0" * 40 + "}"])


@st.composite
def structured_descriptor(draw) -> bytes:
    n = draw(st.integers(0, 4))
    images = [(draw(GUID_TEXT), draw(NAMES)) for _ in range(n)]
    shots = [(draw(GUID_TEXT), draw(GUID_TEXT)) for _ in range(draw(st.integers(0, 4)))]
    return desc_xml(size=draw(NUMBERS), sectors=draw(st.sampled_from(["8", "16", "1", "0"]) | NUMBERS),
                    images=images, shots=shots, top=draw(GUID_TEXT))


def _with_specials(d: str) -> None:
    os.mkfifo(os.path.join(d, "fifo"))
    os.mkdir(os.path.join(d, "dir"))


@FUZZ
@given(structured_descriptor())
def test_structured_hostile_descriptor(raw):
    with image_dir(desc=raw) as d:
        _with_specials(d)
        try:
            desc = dd.load(os.path.join(d, dd.NAME))
        except ImageError as e:
            assert e.file
        else:  # what loaded is sane
            assert all("/" not in s.file and s.file not in ("", ".", "..") for s in desc.shots)
            assert 0 < desc.size <= 1 << 50
        open_and_check(d)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(DESC) - 1), st.sampled_from(["del", "dup", "flip", "ins"]),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_mutated_descriptor_bytes(edits):
    raw = bytearray(DESC)
    for pos, kind, data in edits:
        pos %= max(1, len(raw))
        if kind == "del":
            del raw[pos:pos + len(data)]
        elif kind == "dup":
            raw[pos:pos] = raw[pos:pos + 40]
        elif kind == "flip":
            raw[pos] ^= data[0] or 1
        else:
            raw[pos:pos] = data
    with image_dir(desc=bytes(raw)) as d:
        try:
            dd.load(os.path.join(d, dd.NAME))
        except ImageError as e:
            assert e.file
        open_and_check(d)


LAUGHS = ("<!DOCTYPE lolz [<!ENTITY lol 'lol'>" + "".join(
    f"<!ENTITY lol{i} '{('&lol' + str(i - 1) + ';') * 10 if i > 1 else '&lol;' * 10}'>" for i in range(1, 10))
    + "]>")
ATTACKS = {
    "billion-laughs": desc_xml(size="&lol9;", extra=LAUGHS),
    "external-entity": desc_xml(size="&x;", extra="<!DOCTYPE a [<!ENTITY x SYSTEM 'file:///etc/hostname'>]>"),
    "parameter-entity": desc_xml(extra="<!DOCTYPE a [<!ENTITY % p SYSTEM 'http://127.0.0.1:9/x'> %p;]>"),
    "utf16-doctype": desc_xml(size="&lol9;", extra=LAUGHS).decode().replace("UTF-8", "UTF-16").encode("utf-16"),
    "utf16-plain": desc_xml().decode().replace("UTF-8", "UTF-16").encode("utf-16"),
    "deep-nesting": b"<a>" * 100000 + b"</a>" * 100000,
    "oversized": desc_xml(extra="<!--" + "x" * (1 << 20) + "-->"),
    "cycle": desc_xml(images=[(GUIDS[0], NAME), (GUIDS[1], "b"), (GUIDS[2], "c")], top=GUIDS[2],
                      shots=[(GUIDS[0], GUIDS[1]), (GUIDS[1], GUIDS[0]), (GUIDS[2], GUIDS[1])]),
    "self-parent": desc_xml(shots=[(GUIDS[0], GUIDS[0])], images=[(GUIDS[0], NAME)], top=GUIDS[0]),
    "top-not-leaf": desc_xml(images=[(GUIDS[0], NAME), (GUIDS[1], "b")], top=GUIDS[0],
                             shots=[(GUIDS[0], dd.ROOT_PARENT), (GUIDS[1], GUIDS[0])]),
    "missing-parent": desc_xml(shots=[(GUIDS[0], GUIDS[3])], images=[(GUIDS[0], NAME)], top=GUIDS[0]),
    "dotdot": desc_xml(images=[(GUIDS[0], "../root.hds")], shots=[(GUIDS[0], dd.ROOT_PARENT)], top=GUIDS[0]),
    "huge-size": desc_xml(size=str(1 << 60)),
    "huge-digits": desc_xml(size="9" * 100000),
    "fifo-delta": desc_xml(images=[(GUIDS[0], "fifo")], shots=[(GUIDS[0], dd.ROOT_PARENT)], top=GUIDS[0]),
    "dir-delta": desc_xml(images=[(GUIDS[0], "dir")], shots=[(GUIDS[0], dd.ROOT_PARENT)], top=GUIDS[0]),
}


def test_descriptor_attacks():
    import time

    for name, raw in ATTACKS.items():
        with image_dir(desc=raw) as d:
            _with_specials(d)
            t0 = time.monotonic()
            try:
                dd.load(os.path.join(d, dd.NAME))
                loaded = True
            except ImageError as e:
                assert e.file, name
                loaded = False
            assert loaded == (name in ("utf16-plain", "fifo-delta", "dir-delta")), name
            open_and_check(d)
            assert time.monotonic() - t0 < 5, name


def test_long_snapshot_chain_loads_in_linear_time():
    import time

    n = 3000
    guids = [dd.new_guid() for _ in range(n)]
    desc = dd.Descriptor(SIZE, C, tuple(dd.Shot(g, guids[i - 1] if i else dd.ROOT_PARENT, f"d{i}")
                                        for i, g in enumerate(guids)), guids[-1])
    with image_dir(desc=dd.dumps(desc)) as d:
        t0 = time.monotonic()
        assert len(dd.load(os.path.join(d, dd.NAME)).shots) == n
        assert time.monotonic() - t0 < 3
        r = check(d)  # 2999 missing deltas and one unknown root.hds, quickly
        assert len(r.problems) == n + 1 and time.monotonic() - t0 < 10


def test_copied_image_with_leftover_and_truncated_snapshot():
    """A stack of two deltas whose lower one is cut short: only ImageError, and check names it."""
    with tempfile.TemporaryDirectory() as t:
        d = os.path.join(t, "img")
        ops.create_empty(d, SIZE, C)
        with Stack.open(d) as s:
            s.write(0, b"a" * (3 * C))
            ops.snapshot(s, d)
            s.write(C, b"b")
        with open(os.path.join(d, ops.ROOT_FILE), "r+b") as f:
            f.truncate(C + 100)
        try:
            Stack.open(d)
            raise AssertionError("opened")
        except ImageError as e:
            assert e.file.endswith(ops.ROOT_FILE)
        r = check(d, repair=True)
        assert any(p.field == "bat[0]" for p in r.problems), str(r)
        assert check(d).clean
        with Stack.open(d) as s:
            assert s.read(C, 1) == b"b" and s.read(0, 1) == b"\0"
