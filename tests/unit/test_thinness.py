"""The thinness figures (issue 16's definitions) from hand-made extents, and the GETFSMAP decoder."""

from __future__ import annotations

import pytest

from fsnotifyd.image import fsmap, thinness

MiB = 1 << 20


def ext(physical: int, length: int, owner: int = fsmap.OWN_UNKNOWN, special: bool = True) -> fsmap.Extent:
    return fsmap.Extent(physical, length, owner, special)


def test_figures_follow_the_definitions() -> None:
    # Three clusters hold data: one full, two with 64 KiB each; the image maps five.
    extents = [ext(0, MiB), ext(2 * MiB, 64 << 10), ext(5 * MiB + 4096, 64 << 10), ext(MiB, MiB, fsmap.OWN_FREE)]
    ranges = thinness.in_use(extents)
    f = thinness.figures(ranges, MiB, allocated=5, image_bytes=6 * MiB, df_used=3 * MiB)
    assert f.holding == 3
    assert f.used == MiB + (128 << 10)
    assert f.garbage == pytest.approx(5 / 3)
    assert f.fragmentation == pytest.approx(3 / (1.125))
    assert f.swelling == pytest.approx(5 / 1.125)
    assert f.df_ratio == pytest.approx(2.0)
    assert f.as_dict()["garbage"] == round(5 / 3, 4)


def test_an_extent_across_a_boundary_holds_both_clusters() -> None:
    assert thinness.holding_clusters([(MiB - 4096, MiB + 4096)], MiB) == {0, 1}
    assert thinness.holding_clusters([(0, MiB)], MiB) == {0}


def test_the_balloon_is_taken_out() -> None:
    extents = [ext(0, 4 * MiB)]
    ranges = thinness.in_use(extents, exclude=[(MiB, 2 * MiB)])
    assert ranges == [(0, MiB), (3 * MiB, 4 * MiB)]
    assert thinness.holding_clusters(ranges, MiB) == {0, 3}


def test_empty_filesystem_figures_are_neutral() -> None:
    f = thinness.figures([], MiB, allocated=0, image_bytes=0, df_used=0)
    assert (f.garbage, f.fragmentation, f.df_ratio) == (1.0, 1.0, 0.0)


def test_parse_decodes_records_and_special_owners() -> None:
    buf = bytearray(3 * fsmap.RECORD.size)
    fsmap.RECORD.pack_into(buf, 0, 0x700, fsmap.FMR_OF_SPECIAL_OWNER, 0, fsmap.owner(ord("X"), 1), 0, 4096)
    fsmap.RECORD.pack_into(buf, fsmap.RECORD.size, 0x700, 0, 4096, 12, 0, 8192)
    fsmap.RECORD.pack_into(buf, 2 * fsmap.RECORD.size, 0x700, fsmap.FMR_OF_SPECIAL_OWNER | fsmap.FMR_OF_LAST,
                           12288, fsmap.OWN_FREE, 0, 4096)
    recs = fsmap.parse(buf, 3, 0)
    assert [e.kind for e, _ in recs] == ["fs", "inode", "free"]
    assert recs[0][0].metadata and not recs[1][0].metadata and recs[2][0].free
    assert recs[2][1] & fsmap.FMR_OF_LAST


def test_fill_gaps_reports_what_getfsmap_left_out_as_in_use() -> None:
    # As ext4 on 6.18 answers for a group whose in-use tail runs into a next group that starts
    # in use: free up to 3 MiB, then nothing until the next group's record at 4 MiB.
    got = list(fsmap.fill_gaps([ext(0, MiB, fsmap.owner(ord("X"), 1)), ext(MiB, 2 * MiB, fsmap.OWN_FREE),
                                ext(4 * MiB, MiB), ext(5 * MiB, MiB, fsmap.OWN_FREE)]))
    assert [(e.physical // MiB, e.length // MiB, e.kind) for e in got] == [
        (0, 1, "fs"), (1, 2, "free"), (3, 1, "unknown"), (4, 1, "unknown"), (5, 1, "free")]
    assert thinness.in_use(got) == [(0, MiB), (3 * MiB, 4 * MiB), (4 * MiB, 5 * MiB)]
