"""The image manager without FUSE or loop devices: format, delta, descriptor, stack, operations
and ``image check``, every content compared against a bytearray model of the virtual disk."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import time

import pytest

from fsnotifyd.errors import ImageError
from fsnotifyd.image import descriptor as dd
from fsnotifyd.image import ops
from fsnotifyd.image.check import check
from fsnotifyd.image.delta import Delta
from fsnotifyd.image.format import (
    HEADER_SIZE,
    IN_USE,
    Header,
    bat_region,
    capacity,
    new_header,
    parse_header,
    validate_bat,
)
from fsnotifyd.image.stack import Stack

KiB, MiB = 1 << 10, 1 << 20


# -- helpers -----------------------------------------------------------------------------------

class Model:
    """What the virtual disk must read as."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, stack: Stack, offset: int, data: bytes) -> None:
        stack.write(offset, data)
        self.data[offset:offset + len(data)] = data

    def discard(self, stack: Stack, offset: int, length: int) -> None:
        stack.discard(offset, length)
        self.data[offset:offset + length] = bytes(length)

    def resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def assert_same(self, stack: Stack) -> None:
        assert stack.size == len(self.data)
        got = stack.read(0, stack.size)
        if got != self.data:
            c = stack.cluster
            bad = [i // c for i in range(0, len(got), c) if got[i:i + c] != self.data[i:i + c]]
            pytest.fail(f"virtual clusters differ from the model: {bad[:20]}")


def random_io(stack: Stack, model: Model, rng: random.Random, n: int, *, discard_share: float = 0.25,
              flush_every: int = 7) -> None:
    size, c = stack.size, stack.cluster
    for i in range(n):
        off = rng.randrange(size)
        length = min(rng.choice([1, 17, 512, c // 2, c, 3 * c + 5, rng.randrange(1, 4 * c)]), size - off)
        if rng.random() < discard_share:
            model.discard(stack, off, length)
        else:
            model.write(stack, off, rng.randbytes(length))
        if i % flush_every == 0:
            stack.flush()
    stack.flush()


def image(tmp_path, size=4 * MiB, cluster=4 * KiB, **kw) -> str:
    d = str(tmp_path / "img")
    ops.create_empty(d, size, cluster, **kw)
    return d


def assert_clean(d: str) -> None:
    r = check(d)
    assert r.clean, str(r)


def top_path(d: str) -> str:
    desc = dd.load(os.path.join(d, dd.NAME))
    return os.path.join(d, desc.by_guid(desc.top).file)


def read_bat(path: str) -> tuple[Header, list[int]]:
    with open(path, "rb") as f:
        raw = f.read()
    h = parse_header(raw, len(raw))
    return h, list(struct.unpack_from(f"<{h.entries}I", raw, HEADER_SIZE))


def poke_bat(path: str, vc: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 4 * vc)
        f.write(struct.pack("<I", value))


# -- format ------------------------------------------------------------------------------------

def test_header_round_trip_and_geometry():
    h = new_header(10 * MiB + 512, 64 * KiB, reserve=64 * MiB)
    assert h.entries == 161 and h.first_block == bat_region(64 * KiB, 1024) == 64 * KiB
    assert capacity(64 * KiB, h.first_block) >= 1024
    back = parse_header(h.pack(), h.first_block)
    assert back == h
    assert parse_header(Header(h.cluster, h.entries, h.size, h.first_block, True).pack(), 1 << 30).in_use
    with pytest.raises(ImageError) as e:
        parse_header(h.pack(), h.first_block - 1)
    assert e.value.field == "m_FirstBlockOffset"
    for bad_cluster in (512, 3 * 4096, 128 * MiB):
        with pytest.raises(ImageError):
            new_header(MiB, bad_cluster)
    with pytest.raises(ImageError):
        new_header(1 << 50, 4096)  # 2^38 entries do not fit a u32


def test_validate_bat_kinds():
    h = new_header(64 * KiB, 4096, reserve=16 * MiB)  # first cluster 5
    assert h.first_cluster == 5
    size = (h.first_cluster + 3) * 4096
    bat = [5, 0, 2, 9, 6, 5] + [0] * (h.entries - 6)
    kinds = [(p.index, p.problem) for p in validate_bat(bat, h, size)]
    assert kinds == [(2, "in-header"), (3, "past-end"), (5, "duplicate")]


# -- stack and delta ---------------------------------------------------------------------------

@pytest.mark.parametrize("cluster,seed", [(4 * KiB, 1), (4 * KiB, 2), (64 * KiB, 3), (MiB, 4)])
def test_random_writes_and_discards_round_trip(tmp_path, cluster, seed):
    rng = random.Random(seed)
    size = max(4 * MiB, 8 * cluster) + 512 * 3  # a partial last cluster
    d = image(tmp_path, size, cluster)
    model = Model(size)
    with Stack.open(d) as s:
        random_io(s, model, rng, 300)
        model.assert_same(s)
    with Stack.open(d) as s:
        model.assert_same(s)
        random_io(s, model, rng, 100, discard_share=0.5)
    with Stack.open(d, writable=False) as s:
        model.assert_same(s)
        with pytest.raises(ImageError):
            s.write(0, b"x")
    assert_clean(d)


def test_io_outside_the_disk_is_refused(tmp_path):
    d = image(tmp_path, MiB)
    with Stack.open(d) as s:
        for off, n in ((MiB, 1), (MiB - 1, 2), (-1, 1)):
            with pytest.raises(ImageError):
                s.write(off, b"x" * n)
        with pytest.raises(ImageError):
            s.read(MiB + 1, 1)
        assert s.read(MiB - 1, 10) == b"\0"


def test_discard_frees_clusters_and_reuses_them(tmp_path):
    d = image(tmp_path, MiB)
    c = 4 * KiB
    with Stack.open(d) as s:
        s.write(0, b"a" * (10 * c))
        s.flush()
        size = os.path.getsize(s.top.path)
        s.discard(0, 10 * c)
        s.flush()
        assert s.top.allocated() == 0 and s.stats.discarded == 10
        s.write(20 * c, b"b" * (10 * c))  # reuses the freed clusters: the file does not grow
        s.flush()
        assert os.path.getsize(s.top.path) == size
        assert s.read(0, 10 * c) == bytes(10 * c)
    assert_clean(d)


def test_in_use_marker(tmp_path):
    d = image(tmp_path, MiB)
    with Stack.open(d) as s:
        s.top.set_in_use(True)
    h, _ = read_bat(top_path(d))
    assert h.in_use
    r = check(d)
    assert [p.field for p in r.problems] == ["m_DiskInUse"]
    assert check(d, repair=True).problems[0].repaired
    assert_clean(d)
    assert not read_bat(top_path(d))[0].in_use


# -- operations --------------------------------------------------------------------------------

def test_snapshot_and_merge_keep_the_data(tmp_path):
    rng = random.Random(7)
    size = 4 * MiB
    d = image(tmp_path, size)
    model = Model(size)
    views: dict[str, bytes] = {}
    with Stack.open(d) as s:
        for _ in range(3):
            random_io(s, model, rng, 60)
            guid = ops.snapshot(s, d, name="x")
            views[guid] = bytes(model.data)
            model.assert_same(s)
        random_io(s, model, rng, 60, discard_share=0.5)  # discards over data held below
        model.assert_same(s)
    assert len(os.listdir(d)) == 5
    for guid, data in views.items():  # every snapshot still reads as it was taken
        with Stack.open(d, writable=False, upto=guid) as snap:
            assert snap.read(0, size) == data
    assert_clean(d)
    desc = dd.load(os.path.join(d, dd.NAME))
    base, middle, last = [sh.guid for sh in desc.chain()[:3]]
    ops.merge(d, middle)  # into a snapshot (its child is not the top)
    with Stack.open(d, writable=False, upto=last) as snap:
        assert snap.read(0, size) == views[last]
    with Stack.open(d) as s:
        ops.merge(d, last, stack=s)  # into the open top
        ops.merge(d, base, stack=s)
        model.assert_same(s)
        assert len(s.deltas) == 1
        random_io(s, model, rng, 30)
    with Stack.open(d) as s:
        model.assert_same(s)
    assert sorted(os.listdir(d)) == sorted([dd.NAME, os.path.basename(top_path(d))])
    assert_clean(d)


def test_compact_after_discards_releases_the_space(tmp_path):
    c = 4 * KiB
    n = 1000
    d = image(tmp_path, n * c)
    model = Model(n * c)
    rng = random.Random(11)
    with Stack.open(d) as s:
        for vc in range(n):
            model.write(s, vc * c, bytes([vc % 251 + 1]) * c)
        s.flush()
        before = os.path.getsize(s.top.path)
        dropped = rng.sample(range(n), 800)
        for vc in dropped:
            model.discard(s, vc * c, c)
        s.flush()
        result = ops.compact(s.top)
        after = os.path.getsize(s.top.path)
        assert before - after >= 0.95 * len(dropped) * c, (before, after)
        assert result.released == before - after
        model.assert_same(s)
        random_io(s, model, rng, 50)
    with Stack.open(d) as s:
        model.assert_same(s)
    assert_clean(d)


@pytest.mark.parametrize("filled", [True, False])
def test_grow_past_the_bat_region_relocates_clusters(tmp_path, filled):
    c = 4 * KiB
    size = 3 * MiB
    d = image(tmp_path, size)
    assert capacity(c, c) * c < 16 * MiB  # one BAT cluster: 16 MiB needs a larger BAT region
    model = Model(size)
    rng = random.Random(5)
    with Stack.open(d) as s:
        if filled:
            for vc in range(size // c):
                model.write(s, vc * c, rng.randbytes(c))
            s.flush()
        first_before = s.top.header.first_block
        for new in (16 * MiB, 40 * MiB + 512):
            ops.grow_stack(s, d, new)
            model.resize(new)
            assert s.top.header.first_block > first_before
            model.assert_same(s)
            random_io(s, model, rng, 80)
    with Stack.open(d) as s:
        model.assert_same(s)
    assert_clean(d)


def test_shrink_drops_the_tail(tmp_path):
    c = 4 * KiB
    d = image(tmp_path, 8 * MiB)
    model = Model(8 * MiB)
    rng = random.Random(9)
    with Stack.open(d) as s:
        random_io(s, model, rng, 200, discard_share=0.1)
        ops.cut_stack(s, d, 5 * MiB + 512)
        model.resize(5 * MiB + 512)
        model.assert_same(s)
        ops.grow_stack(s, d, 8 * MiB)  # what was cut reads as zeros
        model.resize(8 * MiB)
        model.assert_same(s)
        assert all(s.top.physical(vc) == 0 for vc in range(-(-(5 * MiB + 512) // c), 8 * MiB // c))
        # a cut inside a cluster: the cut part of the cluster reads as zeros after a grow
        model.write(s, 3 * MiB - 100, b"q" * 200)
        ops.cut_stack(s, d, 3 * MiB - 512)
        model.resize(3 * MiB - 512)
        ops.grow_stack(s, d, 4 * MiB)
        model.resize(4 * MiB)
        model.assert_same(s)
    assert_clean(d)
    with Stack.open(d) as s:
        ops.snapshot(s, d)
        with pytest.raises(ImageError):
            ops.cut_stack(s, d, MiB)


def test_create_ext4_is_thin_and_fsck_clean(tmp_path):
    if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs not installed")
    d = str(tmp_path / "img")
    ops.create(d, 64 * MiB)
    assert_clean(d)
    assert os.path.getsize(top_path(d)) < 16 * MiB
    raw = tmp_path / "raw"
    with Stack.open(d, writable=False) as s, open(raw, "wb") as f:
        for off in range(0, s.size, MiB):
            f.write(s.read(off, MiB))
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_thin_profile_ends_each_superblock_copy_on_a_cluster(tmp_path):
    """mke2fs's own reserve makes a 2 GiB disk's superblock copies 257 blocks: the last block
    of each pins a cluster that nothing but file data can fill (docs/thin.md, "Repack")."""
    if shutil.which("mkfs.ext4") is None or shutil.which("dumpe2fs") is None:
        pytest.skip("e2fsprogs not installed")
    d = str(tmp_path / "img")
    ops.create(d, 2 << 30)
    raw = tmp_path / "raw"
    with Stack.open(d, writable=False) as s, open(raw, "wb") as f:
        f.truncate(s.size)
        for off in range(0, s.size, MiB):
            if (chunk := s.read(off, MiB)).count(0) != MiB:
                f.seek(off)
                f.write(chunk)
    r = subprocess.run(["dumpe2fs", str(raw)], capture_output=True, text=True)
    ends = [int(line.rsplit("-", 1)[1]) + 1 for line in r.stdout.splitlines()
            if line.strip().startswith("Reserved GDT blocks at")]
    assert len(ends) >= 4, r.stdout[-2000:]
    per_cluster = ops.DEFAULT_CLUSTER // 4096
    assert [e % per_cluster for e in ends] == [0] * len(ends)
    # mke2fs's reserve is 255 blocks here (growth to 1024x): one block less.
    reserved = int(next(line for line in r.stdout.splitlines()
                        if line.startswith("Reserved GDT blocks:")).split(":")[1])
    assert reserved == 254


def test_aligned_resize_keeps_mke2fs_reserve_when_aligning_would_halve_it():
    # 1 GiB: 1 + 1 + 127 blocks; aligning down to a 1 MiB cluster leaves no reserve at all.
    assert ops.aligned_resize(1 << 30, 1 << 20) is None
    # 64 KiB clusters: 129 -> 128 blocks, a reserve of 126.
    assert ops.aligned_resize(1 << 30, 64 * KiB) == (126 + 1) * 64 * 32768
    assert ops.aligned_resize(2 << 30, 1 << 20) == (254 + 1) * 64 * 32768
    assert ops.aligned_resize(9 << 30, 1 << 20) == (1021 + 2) * 64 * 32768  # two descriptor blocks
    assert ops.aligned_resize(16 * MiB, 1 << 20) is None  # smaller than a group: one copy only
    assert ops.aligned_resize(2 << 30, 4096) is None  # block-sized clusters: nothing to align
    # An -E in mkfs_args replaces the profile's -E and with it the aligned reserve (mke2fs keeps
    # the last -E): the caller's options win.
    args = ops._with_aligned_resize(ops.MKFS_PROFILES["thin"], dd.Descriptor(2 << 30, 1 << 20, (), ""))
    assert args[args.index("-E") + 1].endswith(",resize=534773760")
    assert ops._with_aligned_resize(ops.MKFS_PROFILES["default"], dd.Descriptor(2 << 30, 1 << 20, (), "")) == []


# -- check -------------------------------------------------------------------------------------

def filled_image(tmp_path, n=64, **kw) -> tuple[str, Model]:
    c = 4 * KiB
    d = image(tmp_path, n * c, **kw)
    model = Model(n * c)
    with Stack.open(d) as s:
        for vc in range(n):
            model.write(s, vc * c, bytes([vc + 1]) * c)
    return d, model


def repaired_and_clean(d: str, fields: list[str | None]) -> None:
    r = check(d)
    assert not r.clean
    assert sorted(map(str, (p.field for p in r.problems))) == sorted(map(str, fields)), str(r)
    r = check(d, repair=True)
    assert all(p.repaired for p in r.problems), str(r)
    assert_clean(d)
    assert check(d, repair=True).clean  # idempotent


def test_check_clean_on_good_images(tmp_path):
    d, _ = filled_image(tmp_path)
    r = check(d)
    assert r.clean and r.leaked_clusters == 0


def test_check_bat_past_end_in_header_duplicate(tmp_path):
    d, model = filled_image(tmp_path, reserve=16 * MiB)  # first data cluster 5
    p = top_path(d)
    _, bat = read_bat(p)
    poke_bat(p, 3, 10 ** 6)  # past the end
    poke_bat(p, 4, 2)  # inside the BAT region
    poke_bat(p, 6, bat[5])  # duplicate of bat[5]
    with pytest.raises(ImageError) as e:
        Stack.open(d)
    assert e.value.field == "bat[3]"
    r = check(d)
    assert {x.field: x.what for x in r.problems}.keys() >= {"bat[3]", "bat[4]", "bat[6]"}
    # the clusters bat[3], bat[4] and bat[6] pointed at are now unreferenced and hold data
    repaired_and_clean(d, ["bat[3]", "bat[4]", "bat[6]", "clusters"])
    c = 4 * KiB
    for vc in (3, 4, 6):
        model.data[vc * c:(vc + 1) * c] = bytes(c)
    with Stack.open(d) as s:
        model.assert_same(s)
    assert read_bat(p)[1][5] == bat[5]  # the first owner keeps the cluster


def test_check_leaked_clusters_and_partial_tail(tmp_path):
    d, model = filled_image(tmp_path)
    c = 4 * KiB
    p = top_path(d)
    with Stack.open(d) as s:
        model.discard(s, 10 * c, 5 * c)  # holes: free space, not a leak
    assert_clean(d)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size)
        f.write(b"L" * (3 * c) + b"partial")  # an uncommitted append cut short by a crash
    _, bat = read_bat(p)
    holes = [q for q in range(1, size // c) if q not in set(bat)]
    assert holes
    with open(p, "r+b") as f:
        f.seek(holes[0] * c)
        f.write(b"I" * c)  # an interior hole refilled by a write that never got committed
    r = check(d)
    assert r.leaked_clusters == 4 + 1 and r.leaked_bytes == 5 * c  # the partial cluster counts too
    repaired_and_clean(d, ["clusters", "length"])
    assert os.path.getsize(p) == size
    with Stack.open(d) as s:
        model.assert_same(s)


def test_check_leftover_files(tmp_path):
    d, model = filled_image(tmp_path)
    shutil.copy(top_path(d), os.path.join(d, "root.hds.{0b0e7bd7-2a4c-4a4e-9c55-0c5b29f7ad6a}"))
    shutil.copy(os.path.join(d, dd.NAME), os.path.join(d, dd.NAME + ".tmp"))
    os.mkdir(os.path.join(d, "fsnd-mkfs-abc"))
    with open(os.path.join(d, "root.hds.6f1c2a4e-0d4b-4c1e-9a43-1f0e6f0f3b2a"), "wb") as f:
        f.truncate(4096)  # a snapshot killed between creating its delta and writing the header
    (tmp_path / "img" / "notes.txt").write_text("mine")
    r = check(d)
    assert len(r.problems) == 5
    r = check(d, repair=True)
    assert [os.path.basename(x.file) for x in r.problems if not x.repaired] == ["notes.txt"]
    assert sorted(os.listdir(d)) == sorted([dd.NAME, "notes.txt", os.path.basename(top_path(d))])


def test_check_size_mismatch_after_interrupted_grow(tmp_path):
    d, model = filled_image(tmp_path)
    with Delta.open(top_path(d), writable=True) as delta:  # the grow's first half only
        delta.resize(64 * MiB)
    with pytest.raises(ImageError) as e:  # refused until check cuts it to the descriptor's size
        Stack.open(d)
    assert e.value.field == "m_SizeInSectors"
    repaired_and_clean(d, ["m_SizeInSectors"])
    with Stack.open(d) as s:
        model.assert_same(s)
        assert s.top.header.size == len(model.data)


def test_check_unrepairable_problems(tmp_path):
    d, _ = filled_image(tmp_path)
    p = top_path(d)
    with open(p, "r+b") as f:
        f.seek(28)
        f.write(struct.pack("<I", 16))  # 8 KiB clusters: the BAT no longer matches the size
    r = check(d, repair=True)
    assert [(x.field, x.repaired, x.repairable) for x in r.problems] == [("m_Size", False, False)]
    os.unlink(p)
    r = check(d)
    assert len(r.problems) == 1 and not r.problems[0].repairable
    with open(os.path.join(d, dd.NAME), "wb") as f:
        f.write(b"<Parallels_disk_image><Disk_Parameters/></Parallels_disk_image>")
    r = check(d, repair=True)
    assert [(x.field, x.repaired) for x in r.problems] == [("Disk_size", False)]


def test_check_in_use_with_a_bad_bat_repairs_both(tmp_path):
    d, _ = filled_image(tmp_path)
    p = top_path(d)
    with open(p, "r+b") as f:
        f.seek(44)
        f.write(struct.pack("<I", IN_USE))
    poke_bat(p, 1, 0xFFFFFFFE)
    repaired_and_clean(d, ["m_DiskInUse", "bat[1]", "clusters"])


# -- direct I/O and write-behind (the exporter's data path) --------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_direct_io_with_write_behind_matches_the_model(tmp_path, monkeypatch, seed):
    """Large aligned writes go to a write-behind thread, small ones through the page cache,
    discards punch holes: every read in between must see every earlier write, in order."""
    from fsnotifyd.image import writebehind

    def slow_pwrite(fd, data, pos):  # the real write, late: a missing wait shows as wrong data
        time.sleep(0.002)
        return os.pwrite(fd, data, pos)

    monkeypatch.setattr(writebehind, "pwrite", slow_pwrite)
    rng = random.Random(seed)
    c = 256 * KiB
    size = 8 * c  # small: later requests often land on what a queued write covers
    d = image(tmp_path, size, c)
    model = Model(size)
    with Stack.open(d) as s:
        assert s.use_direct_io(write_behind=2, read_ahead=True)
        for i in range(500):
            if i == 250:  # a snapshot: discards over its clusters punch holes in the new top
                ops.snapshot(s, d)
                assert s.use_direct_io(write_behind=2, read_ahead=True)
            if rng.random() < 0.6:  # aligned: 4 KiB multiples, some >= 64 KiB (direct)
                off = rng.randrange(size // 4096) * 4096
                length = min(rng.choice([4096, 64 * KiB, 128 * KiB, c, 2 * c]), size - off)
            else:
                off = rng.randrange(size)
                length = min(rng.choice([1, 700, 5000, 70 * KiB]), size - off)
            r = rng.random()
            if r < 0.15:
                model.discard(s, off, length)
            elif r < 0.3:
                assert s.read(off, length) == model.data[off:off + length], f"op {i}"
            elif r < 0.35:  # sequential reads: the read-ahead window serves the next one
                step = rng.choice([64 * KiB, c])
                for pos in range(off // step * step, min(size, off + 4 * step), step):
                    assert s.read(pos, step) == model.data[pos:pos + step], f"op {i} at {pos}"
            else:
                model.write(s, off, rng.randbytes(length))
            if i % 37 == 0:
                s.flush()
                with Stack.open(d, writable=False) as disk:  # a flush leaves it all on disk
                    model.assert_same(disk)
        assert s.top._behind is not None, "no write went through write-behind"
        assert sum(d._ahead.hits for d in s.deltas if d._ahead) > 0, "no read was served by read-ahead"
        model.assert_same(s)
    with Stack.open(d) as s:  # what was flushed and closed is on disk
        model.assert_same(s)
        # A discarded cluster is a hole: no queued write landed on it after the punch.
        top = s.top
        for p in top.unreferenced():
            try:
                assert os.lseek(top.fd, p * c, os.SEEK_DATA) >= (p + 1) * c, f"data in freed cluster {p}"
            except OSError:  # ENXIO: no data past p at all
                pass
    assert_clean(d)


def test_a_discard_waits_for_the_queued_write_it_frees(tmp_path, monkeypatch):
    from fsnotifyd.image import writebehind

    def slow_pwrite(fd, data, pos):
        time.sleep(0.05)
        return os.pwrite(fd, data, pos)

    monkeypatch.setattr(writebehind, "pwrite", slow_pwrite)
    c = 256 * KiB
    d = image(tmp_path, 4 * c, c)
    with Stack.open(d) as s:
        assert s.use_direct_io(write_behind=2)
        s.write(0, b"a" * c)
        s.flush()  # cluster 0 allocated and committed; write-behind started
        p = s.top.physical(0)
        s.write(0, b"b" * c)  # queued, lands 50 ms later
        s.discard(0, c)  # must wait for it, or the punched hole fills up again
        s.flush()
        assert os.lseek(s.top.fd, p * c, os.SEEK_HOLE) == p * c, "the freed cluster holds data"
        assert s.read(0, c) == bytes(c)
        # With the data in a snapshot below, the top keeps a hole over it instead.
        s.write(c, b"x" * c)
        ops.snapshot(s, d)
        assert s.use_direct_io(write_behind=2)
        s.write(c, b"y" * c)  # written at once (the first direct write of the new top)
        s.write(c, b"z" * c)  # queued
        s.discard(c, c)
        s.flush()
        assert s.read(c, c) == bytes(c)


def test_write_behind_keeps_order_and_reports_a_failed_write(tmp_path):
    from fsnotifyd.image.writebehind import WriteBehind

    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    returned = []
    wb = WriteBehind(fd, 2, "t")
    try:
        for i in range(50):  # the same block again and again: the last write wins
            wb.submit(memoryview(bytes([i]) * 4096), 4096, lambda i=i: returned.append(i))
        wb.drain()
        assert os.pread(fd, 4096, 4096) == bytes([49]) * 4096
        assert returned == list(range(50))
    finally:
        wb.close()
        os.close(fd)
    ro = os.open(path, os.O_RDONLY)  # a real refusal from the kernel: EBADF on write
    wb = WriteBehind(ro, 2, "t")
    try:
        wb.submit(memoryview(b"x" * 4096), 0, lambda: None)
        with pytest.raises(OSError) as e:
            wb.drain()
        assert e.value.errno == 9  # EBADF
        wb.drain()  # reported once
    finally:
        wb.close()
        os.close(ro)


def test_a_failed_write_behind_write_fails_the_next_commit_whoever_met_it_first(tmp_path, monkeypatch):
    """A write acknowledged and then failed on its thread: the first access to the delta
    after it fails (here a read), and the next commit fails all the same, since that is what
    promised the write durable. The failure is the kernel's: the thread's writes go to a
    read-only descriptor of the file (EBADF)."""
    from fsnotifyd.image import writebehind

    c = 256 * KiB
    d = image(tmp_path, 4 * c, c)
    with Stack.open(d) as s:
        assert s.use_direct_io(write_behind=2)
        s.write(0, os.urandom(c))  # allocation, then the first direct write (synchronous)
        s.write(0, os.urandom(c))
        s.flush()
        ro = os.open(s.top.path, os.O_RDONLY)
        try:
            monkeypatch.setattr(writebehind, "pwrite", lambda fd, data, pos: os.pwrite(ro, data, pos))
            s.write(0, os.urandom(c))  # acknowledged: behind
            with pytest.raises(OSError) as first:
                s.read(0, 4096)
            assert first.value.errno == 9  # EBADF
            with pytest.raises(OSError) as flush:
                s.flush()
            assert flush.value.errno == 9
            monkeypatch.undo()
            s.flush()  # reported: the next flush is a plain one
        finally:
            os.close(ro)
