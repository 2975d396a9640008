"""Discards that add up, zero marks over snapshots, and zero detection (issue 16, item 1 and 2).

On real files of the host (ext4 on this VM: holes are punched in 4 KiB pages)."""

from __future__ import annotations

import os
import random
from itertools import pairwise

import pytest

from fsnotifyd.image import ops
from fsnotifyd.image.check import check
from fsnotifyd.image.format import ZERO_CLUSTER
from fsnotifyd.image.stack import Stack

from .test_image_format import KiB, MiB, Model, assert_clean, image, poke_bat, read_bat, top_path

C = 256 * KiB


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def header_bytes(d: str) -> int:
    """What an empty top delta takes on the host (the header and the BAT pages written)."""
    with Stack.open(d) as s:
        return allocated_bytes(s.top.path)


def pieces(rng: random.Random, start: int, end: int, n: int, *, aligned: bool) -> list[tuple[int, int]]:
    """``[start, end)`` cut into ``n`` pieces at random points, shuffled."""
    step = 4096 if aligned else 1
    cuts = sorted({start, end, *(rng.randrange(start, end, step) for _ in range(n - 1))})
    out = list(pairwise(cuts))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("aligned", [True, False])
def test_partial_discards_add_up_and_free_the_cluster(tmp_path, aligned):
    d = image(tmp_path, size=8 * C, cluster=C)
    rng = random.Random(aligned)
    model = Model(8 * C)
    with Stack.open(d) as s:
        empty = allocated_bytes(s.top.path)
        model.write(s, C, rng.randbytes(2 * C))  # clusters 1 and 2
        s.flush()
        assert allocated_bytes(s.top.path) >= empty + 2 * C
        for off, end in pieces(rng, C - 4096, 2 * C + 4096, 23, aligned=aligned):
            model.discard(s, off, end - off)
            left = model.data[C:2 * C].count(0) != C
            assert bool(s.top.physical(1)) == left, "freed before all of it was discarded, or kept after"
            model.assert_same(s)
        assert s.top.physical(1) == 0 and s.top.entry(1) == 0
        assert s.top.physical(2), "a cluster only partly discarded stays"
        s.flush()
        # What is left of cluster 2 (all but its first page) is all the delta holds.
        assert allocated_bytes(s.top.path) <= empty + C - 4096 + 4096
        model.assert_same(s)
    assert_clean(d)
    with Stack.open(d) as s:
        model.assert_same(s)


def test_zero_mark_over_a_snapshot_costs_no_cluster(tmp_path):
    d = image(tmp_path, size=8 * C, cluster=C)
    model = Model(8 * C)
    with Stack.open(d) as s:
        model.write(s, 0, os.urandom(8 * C))
        ops.snapshot(s, d)
        empty = allocated_bytes(s.top.path)
        model.discard(s, 2 * C, 2 * C)  # clusters 2 and 3, whole
        assert s.top.zeroed(2) and s.top.zeroed(3) and s.top.allocated() == 0
        # A part of a cluster over the snapshot's data is copied up; the rest of it, discarded
        # in pieces later, frees the copy again.
        model.discard(s, 5 * C + 1000, 9000)
        assert s.top.physical(5)
        model.discard(s, 5 * C, 1000)
        model.discard(s, 5 * C + 10000, C - 10000)
        assert s.top.zeroed(5) and s.top.allocated() == 0
        s.flush()
        model.assert_same(s)
        assert allocated_bytes(s.top.path) == empty
    assert_clean(d)
    _, bat = read_bat(top_path(d))
    assert [vc for vc, p in enumerate(bat) if p == ZERO_CLUSTER] == [2, 3, 5]
    from fsnotifyd.image.info import image_info

    assert [delta.zeroed_clusters for delta in image_info(d).deltas] == [0, 3]
    with Stack.open(d) as s:
        model.assert_same(s)
        # Writing into a zero-marked cluster: the rest of it is zeros, not the snapshot's data.
        model.write(s, 2 * C + 100, b"x" * 100)
        s.flush()
        model.assert_same(s)


def test_zero_writes_allocate_nothing_and_free_what_they_cover(tmp_path):
    d = image(tmp_path, size=8 * C, cluster=C)
    model = Model(8 * C)
    with Stack.open(d) as s:
        empty = allocated_bytes(s.top.path)
        model.write(s, 0, bytes(8 * C))  # a guest writing zeros over an empty disk
        model.write(s, 3 * C + 512, bytes(5000))
        assert s.top.allocated() == 0 and s.stats.zero_writes >= 8
        model.write(s, C, os.urandom(C))
        model.write(s, C, bytes(C))  # zeros over a whole mapped cluster free it
        assert s.top.allocated() == 0
        model.write(s, 4 * C, os.urandom(C))
        for off in range(0, C, 64 * KiB):  # in pieces, as a filesystem zeroing its blocks
            model.write(s, 4 * C + off, bytes(64 * KiB))
        assert s.top.allocated() == 0
        s.flush()
        assert allocated_bytes(s.top.path) == empty
        model.assert_same(s)
    assert_clean(d)


def test_compaction_keeps_holes_holes(tmp_path):
    d = image(tmp_path, size=16 * C, cluster=C)
    model = Model(16 * C)
    with Stack.open(d) as s:
        for vc in range(16):
            model.write(s, vc * C, os.urandom(C))
        for vc in range(0, 15):  # free the low ones, leave most of the top one as holes
            model.discard(s, vc * C, C)
        model.discard(s, 15 * C, C - 8192)
        s.flush()
        before = allocated_bytes(s.top.path)
        r = ops.compact(s.top)
        assert r.moved == 1
        assert allocated_bytes(s.top.path) <= before, "compaction turned holes into data"
        model.assert_same(s)
    assert_clean(d)


def test_merge_carries_zero_marks_and_holes(tmp_path):
    d = image(tmp_path, size=8 * C, cluster=C)
    model = Model(8 * C)
    with Stack.open(d) as s:
        model.write(s, 0, os.urandom(8 * C))
        base = ops.snapshot(s, d)
        model.discard(s, 0, C // 2)  # a copy-up with holes
        middle = ops.snapshot(s, d)
        model.discard(s, 2 * C, C)  # zero mark in the middle delta
        ops.snapshot(s, d)
        model.write(s, 6 * C, os.urandom(100))
        ops.merge(d, middle, stack=s)
        model.assert_same(s)
        ops.merge(d, base, stack=s)
        model.assert_same(s)
    assert_clean(d)
    with Stack.open(d) as s:
        model.assert_same(s)


def test_random_io_with_snapshots_and_zeros_matches_the_model(tmp_path):
    rng = random.Random(16)
    d = image(tmp_path, size=24 * C, cluster=C)
    model = Model(24 * C)
    with Stack.open(d) as s:
        for i in range(600):
            off = rng.randrange(s.size)
            n = min(rng.choice([512, 4096, 5000, C // 2, C, 2 * C + 7, rng.randrange(1, 3 * C)]), s.size - off)
            r = rng.random()
            if r < 0.3:
                model.discard(s, off, n)
            elif r < 0.5:
                model.write(s, off, bytes(n))
            else:
                model.write(s, off, rng.randbytes(n))
            if i % 150 == 149:
                ops.snapshot(s, d)
            if i % 13 == 0:
                s.flush()
        s.flush()
        model.assert_same(s)
    assert_clean(d)
    with Stack.open(d) as s:
        model.assert_same(s)
        assert ops.compact(s.top).moved >= 0
        model.assert_same(s)


def test_check_frees_mapped_clusters_that_are_all_holes(tmp_path):
    """A crash between the last punch and the commit that frees the cluster leaves it mapped
    and empty: check finds it, repair frees it (zero mark above a snapshot, unmapped in the base)."""
    d = image(tmp_path, size=8 * C, cluster=C)
    with Stack.open(d) as s:
        s.write(0, os.urandom(2 * C))
        s.flush()
        base_bat = dict(enumerate(s.top.bat))
        ops.snapshot(s, d)
        s.write(0, os.urandom(2 * C))
        s.flush()
        top_bat = dict(enumerate(s.top.bat))
    from fsnotifyd.image.delta import punch_hole
    with Stack.open(d) as s:
        base, top = s.deltas[0].path, s.top.path
    for path, bat in ((base, base_bat), (top, top_bat)):
        fd = os.open(path, os.O_RDWR)
        punch_hole(fd, bat[1] * C, C)
        os.close(fd)
    r = check(d, repair=True)
    assert [p.field for p in r.problems] == ["clusters", "clusters"], str(r)
    assert all(p.repaired for p in r.problems)
    assert_clean(d)
    assert read_bat(base)[1][1] == 0 and read_bat(top)[1][1] == ZERO_CLUSTER
    with Stack.open(d) as s:
        assert s.read(C, C) == bytes(C)


def test_an_all_ones_entry_past_the_file_is_a_zero_mark_not_a_problem(tmp_path):
    d = image(tmp_path, size=8 * C, cluster=C)
    poke_bat(top_path(d), 3, ZERO_CLUSTER)
    assert_clean(d)
    with Stack.open(d) as s:
        assert s.top.zeroed(3) and s.read(3 * C, C) == bytes(C)
    assert header_bytes(d) < MiB
