"""The repack planner, pure: victims, skipped reasons, donors, packing order."""

from __future__ import annotations

from fsnotifyd.image import repackplan as rp

CPB = 256  # blocks per 1 MiB cluster of 4 KiB blocks


def used_of(files, extra=()):
    return [rp.Used(f.physical, f.length) for f in files] + list(extra)


def test_partly_used_movable_clusters_are_victims_least_used_first():
    files = [rp.FileExtent(12, 0, 0 * CPB + 10, 100), rp.FileExtent(13, 0, 1 * CPB, 30),
             rp.FileExtent(14, 0, 2 * CPB, CPB)]  # cluster 2 is full: left alone
    p = rp.plan(used_of(files), files, cluster_blocks=CPB, total_blocks=8 * CPB)
    assert [v.cluster for v in p.victims] == [1, 0]
    assert p.blocks_to_move == 130 and p.donors_needed == 1 and p.clusters_to_free == 1
    assert p.free == [3, 4, 5, 6, 7]
    assert p.victims[1].pieces == [rp.Piece(12, 0, 10, 100)]


def test_a_cluster_with_any_unmovable_block_is_skipped_by_reason():
    files = [rp.FileExtent(12, 0, 0, 10), rp.FileExtent(2, 0, 20, 1, rp.DIRECTORY),
             rp.FileExtent(15, 0, CPB, 10), rp.FileExtent(16, 0, 2 * CPB, 10, rp.IMMUTABLE),
             rp.FileExtent(17, 0, 3 * CPB, 5)]
    meta = [rp.Used(CPB + 100, 4, metadata=True), rp.Used(3 * CPB + 50, 2)]  # cluster 3: extent-tree block
    p = rp.plan(used_of(files, meta), files, cluster_blocks=CPB, total_blocks=8 * CPB)
    assert p.victims == []
    assert dict(p.skipped) == {rp.DIRECTORY: 1, rp.METADATA: 1, rp.IMMUTABLE: 1, rp.UNKNOWN: 1}


def test_extents_are_clipped_to_clusters():
    f = rp.FileExtent(12, 100, CPB - 10, 30)  # 10 blocks in cluster 0, 20 in cluster 1
    p = rp.plan(used_of([f]), [f], cluster_blocks=CPB, total_blocks=8 * CPB)
    pieces = sorted((pc for v in p.victims for pc in v.pieces), key=lambda pc: pc.logical)
    assert pieces == [rp.Piece(12, 100, CPB - 10, 10), rp.Piece(12, 110, CPB, 20)]


def test_a_victim_that_would_only_refill_its_donor_is_not_moved():
    f = rp.FileExtent(12, 0, 0, 200)  # one cluster 78 % used: moving it frees nothing
    p = rp.plan(used_of([f]), [f], cluster_blocks=CPB, total_blocks=4 * CPB)
    assert p.victims == [] and p.skipped["not_worth_it"] == 1


def test_no_more_victims_than_free_clusters_can_take():
    files = [rp.FileExtent(20 + c, 0, c * CPB, 100) for c in range(4)]  # 4 clusters 40 % used
    p = rp.plan(used_of(files), files, cluster_blocks=CPB, total_blocks=5 * CPB)  # 1 free cluster
    assert len(p.victims) == 2 and p.skipped["no_room"] == 2 and p.clusters_to_free == 1


def test_evacuation_takes_every_movable_cluster_above_and_donors_below():
    files = [rp.FileExtent(12, 0, 0, CPB), rp.FileExtent(13, 0, 5 * CPB, CPB),  # full, above
             rp.FileExtent(14, 0, 6 * CPB + 3, 7), rp.FileExtent(2, 0, 7 * CPB, 1, rp.DIRECTORY)]
    p = rp.plan(used_of(files), files, cluster_blocks=CPB, total_blocks=8 * CPB, above=4, below=4)
    assert sorted(v.cluster for v in p.victims) == [5, 6]
    assert p.free == [1, 2, 3] and dict(p.skipped) == {rp.DIRECTORY: 1}


def test_the_partial_last_cluster_is_never_free():
    p = rp.plan([], [], cluster_blocks=CPB, total_blocks=3 * CPB + 10)
    assert p.free == [0, 1, 2]


def test_pack_keeps_a_files_pieces_together_and_splits_at_slot_ends():
    pieces = [rp.Piece(13, 0, 900, 200), rp.Piece(12, 50, 10, 100), rp.Piece(12, 0, 600, 50)]
    out = rp.pack(pieces, [(1000, CPB), (5000, CPB)])
    assert out == [(rp.Piece(12, 0, 600, 50), 1000, 50), (rp.Piece(12, 50, 10, 100), 1050, 100),
                   (rp.Piece(13, 0, 900, 106), 1150, 106), (rp.Piece(13, 106, 1006, 94), 5000, 94)]


def test_pack_leaves_out_what_does_not_fit():
    out = rp.pack([rp.Piece(12, 0, 0, 300)], [(0, CPB)])
    assert out == [(rp.Piece(12, 0, 0, CPB), 0, CPB)]


def test_batches_fit_their_donors():
    vs = [rp.Victim(c, 100) for c in range(7)]
    groups = rp.batches(vs, CPB, 1)
    assert [len(g) for g in groups] == [2, 2, 2, 1]


def test_pack_fills_a_carried_partial_slot_first_and_tail_is_what_is_left():
    # The last batch left 56 blocks free at the end of its last donor cluster (block 1200..1255).
    slots = [(1200, 56), (2048, CPB)]
    out = rp.pack([rp.Piece(12, 0, 7000, 100)], slots)
    assert out == [(rp.Piece(12, 0, 7000, 56), 1200, 56), (rp.Piece(12, 56, 7056, 44), 2048, 44)]
    assert rp.tail(out, slots) == (2048 + 44, CPB - 44)
    full = rp.pack([rp.Piece(12, 0, 7000, 56)], slots)
    assert rp.tail(full, slots) is None  # the carried slot is exactly full; the next was not touched
    assert rp.tail([], slots) is None
