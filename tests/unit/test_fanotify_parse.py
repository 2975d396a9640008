"""parse_events on buffers built per include/uapi/linux/fanotify.h (no kernel needed)."""

from __future__ import annotations

import errno
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.kernel.fanotify import (
    FAN_EVENT_INFO_TYPE_ERROR,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_FS_ERROR,
    FAN_NOFD,
    FAN_Q_OVERFLOW,
    FILEID_INO32_GEN,
    FILEID_INVALID,
    FsError,
    fsid_str,
    parse_events,
)

META = struct.Struct("=IBBHQii")  # event_len vers reserved metadata_len mask fd pid


def fid_record(fsid=(0x69CE58B5, -0x63BE2D3C), handle_type=FILEID_INO32_GEN,
               f_handle=struct.pack("=II", 12, 0xDEADBEEF), info_type=FAN_EVENT_INFO_TYPE_FID) -> bytes:
    body = struct.pack("=ii", *fsid) + struct.pack("=Ii", len(f_handle), handle_type) + f_handle
    body += b"\0" * (-(4 + len(body)) % 4)  # the kernel pads records to 4 bytes
    return struct.pack("=BBH", info_type, 0, 4 + len(body)) + body


def error_record(error=-errno.EUCLEAN, count=1) -> bytes:
    return struct.pack("=BBH", FAN_EVENT_INFO_TYPE_ERROR, 0, 12) + struct.pack("=iI", error, count)


def event(*records: bytes, mask=FAN_FS_ERROR, vers=3, pid=4195, meta_len=24) -> bytes:
    extra = b"\0" * (meta_len - 24)
    body = b"".join(records)
    return META.pack(24 + len(extra) + len(body), vers, 0, meta_len, mask, FAN_NOFD, pid) + extra + body


# The bytes read from a real fanotify fd on this project's kernel after
# `echo hi > /sys/fs/ext4/loop0/trigger_fs_error` (FILEID_INVALID with handle_bytes 0).
REAL = bytes.fromhex(
    "38000000030018000080000000000000ffffffff6310000001001400b558ce69c4d2419c00000000ff000000"
    "05000c007500000001000000"
)


def test_layout_sizes() -> None:
    assert META.size == 24
    assert len(error_record()) == 12


def test_real_kernel_bytes() -> None:
    assert parse_events(REAL) == [
        FsError(fsid=(0x69CE58B5, struct.unpack("=i", bytes.fromhex("c4d2419c"))[0]),
                handle_type=FILEID_INVALID, inode=None, error=errno.EUCLEAN, error_count=1,
                pid=0x1063)
    ]
    assert fsid_str(parse_events(REAL)[0].fsid) == "69ce58b5:9c41d2c4"


def test_normal_event_with_inode() -> None:
    [ev] = parse_events(event(fid_record(), error_record(-errno.EIO, 3)))
    assert ev.inode == 12
    assert ev.handle_type == FILEID_INO32_GEN
    assert ev.fsid == (0x69CE58B5, -0x63BE2D3C)
    assert ev.error == errno.EIO and ev.error_count == 3
    assert ev.pid == 4195


def test_fileid_invalid_has_no_inode() -> None:
    [ev] = parse_events(event(fid_record(handle_type=FILEID_INVALID, f_handle=b""), error_record()))
    assert ev.inode is None and ev.handle_type == FILEID_INVALID
    # A FILEID_INVALID handle with bytes in it still has no inode.
    [ev] = parse_events(event(fid_record(handle_type=FILEID_INVALID, f_handle=b"\1\0\0\0\0\0\0\0"),
                              error_record()))
    assert ev.inode is None


def test_error_sign_is_dropped() -> None:
    assert parse_events(event(fid_record(), error_record(-errno.EBADMSG)))[0].error == errno.EBADMSG
    assert parse_events(event(fid_record(), error_record(errno.EBADMSG)))[0].error == errno.EBADMSG


def test_records_in_any_order_and_unknown_records_skipped() -> None:
    unknown = struct.pack("=BBH", 4, 0, 8) + struct.pack("=i", 7)  # a PIDFD record
    [ev] = parse_events(event(error_record(-errno.EIO, 2), unknown, fid_record()))
    assert (ev.error, ev.error_count, ev.inode) == (errno.EIO, 2, 12)


def test_longer_metadata_is_honoured() -> None:
    [ev] = parse_events(event(fid_record(), error_record(), meta_len=32))
    assert ev.inode == 12


def test_several_events_in_one_buffer() -> None:
    buf = (event(fid_record(), error_record(-errno.EUCLEAN, 1))
           + event(mask=FAN_Q_OVERFLOW)  # not an error: skipped, but does not stop parsing
           + event(fid_record(fsid=(1, 2), f_handle=struct.pack("=II", 99, 1)),
                   error_record(-errno.EIO, 5)))
    evs = parse_events(buf)
    assert [(e.fsid, e.inode, e.error, e.error_count) for e in evs] == [
        ((0x69CE58B5, -0x63BE2D3C), 12, errno.EUCLEAN, 1),
        ((1, 2), 99, errno.EIO, 5),
    ]


def test_other_masks_and_old_versions_are_skipped() -> None:
    assert parse_events(event(fid_record(), error_record(), mask=0x2)) == []
    assert parse_events(event(fid_record(), error_record(), vers=2)) == []


def test_event_without_error_record_is_skipped() -> None:
    assert parse_events(event(fid_record())) == []


def test_event_without_fid_still_reports_error() -> None:
    [ev] = parse_events(event(error_record(-errno.EIO)))
    assert ev.fsid is None and ev.inode is None and ev.error == errno.EIO


def test_truncated_buffers() -> None:
    good = event(fid_record(), error_record())
    for n in range(len(good)):
        assert parse_events(good[:n]) == []
    # A whole event followed by a truncated one: the whole one is kept.
    two = good + good
    for n in range(len(good), len(two)):
        assert len(parse_events(two[:n])) == 1


def test_lying_lengths() -> None:
    ok = event(fid_record(), error_record())
    # event_len larger than the buffer, smaller than the metadata, zero.
    for event_len in (len(ok) + 1, 23, 0, 0xFFFFFFFF):
        assert parse_events(struct.pack("=I", event_len) + ok[4:]) == []
    # metadata_len beyond the event, or below the struct.
    for meta_len in (len(ok) + 4, 0, 8):
        bad = ok[:6] + struct.pack("=H", meta_len) + ok[8:]
        assert parse_events(bad) == []
    # An info record claiming more than the event holds: the records after it are lost, but
    # nothing is read out of bounds; here the error record comes after it, so the event is
    # dropped.
    bad_fid = struct.pack("=BBH", FAN_EVENT_INFO_TYPE_FID, 0, 200) + fid_record()[4:]
    assert parse_events(event(bad_fid, error_record())) == []
    # A file handle claiming more bytes than its record: fsid kept, no inode.
    fr = bytearray(fid_record())
    struct.pack_into("=I", fr, 12, 1000)
    [ev] = parse_events(event(bytes(fr), error_record()))
    assert ev.fsid == (0x69CE58B5, -0x63BE2D3C) and ev.inode is None
    # Records too short for their type are ignored.
    short_err = struct.pack("=BBH", FAN_EVENT_INFO_TYPE_ERROR, 0, 8) + b"\0" * 4
    assert parse_events(event(fid_record(), short_err)) == []
    short_fid = struct.pack("=BBH", FAN_EVENT_INFO_TYPE_FID, 0, 8) + b"\0" * 4
    [ev] = parse_events(event(short_fid, error_record()))
    assert ev.fsid is None
    # A zero-length record must not loop forever.
    zero = struct.pack("=BBH", 9, 0, 0)
    assert parse_events(event(zero, error_record())) == []


def test_non_bytes_input() -> None:
    assert parse_events(b"") == []
    assert parse_events(bytearray(event(fid_record(), error_record())))[0].inode == 12
    assert parse_events(memoryview(event(fid_record(), error_record())))[0].inode == 12


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_never_raises(buf: bytes) -> None:
    for ev in parse_events(buf):
        assert ev.error >= 0 and ev.error_count >= 0


_records = st.one_of(
    st.builds(fid_record, fsid=st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1)),
              handle_type=st.integers(-2**31, 2**31 - 1), f_handle=st.binary(max_size=40)),
    st.builds(error_record, error=st.integers(-2**31, 2**31 - 1), count=st.integers(0, 2**32 - 1)),
    st.binary(max_size=24),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.lists(_records, max_size=4), max_size=4), st.data())
def test_mutated_wellformed_never_raises(events: list[list[bytes]], data: st.DataObject) -> None:
    buf = bytearray(b"".join(event(*recs) for recs in events))
    # Flip some bytes and maybe cut the tail: still no exception and no out-of-range values.
    for _ in range(data.draw(st.integers(0, 4))):
        if buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for ev in parse_events(bytes(buf[:cut])):
        assert 0 <= ev.error <= 2**31
        assert ev.inode is None or ev.inode >= 0


def test_observation_mapping_known_and_unknown_fsid() -> None:
    from fsnotifyd.events import Device
    from fsnotifyd.sources.fanotify import FanotifySource, MarkInfo, _Group

    src = FanotifySource()
    group = _Group(-1)
    group.marks[(7, 3)] = MarkInfo(device=Device(7, 3, "loop3"), fstype="ext4",
                                   mountpoint="/vz/root/101", fsid=(1, -2))
    known = src._observation(group, FsError(fsid=(1, -2), handle_type=FILEID_INO32_GEN, inode=12,
                                     error=errno.EIO, error_count=4, pid=99))
    assert known.source == "fanotify" and known.kind == "fs.error"
    assert known.device == Device(7, 3, "loop3")
    assert (known.fs, known.mount) == ("ext4", "/vz/root/101")
    assert (known.kernel.errno, known.kernel.inode, known.kernel.pid) == (errno.EIO, 12, 99)
    assert known.count == 4
    assert known.details["error_count"] == 4 and known.details["fsid"] == "00000001:fffffffe"

    # Raced with umount (or never marked): still reported, without a device.
    unknown = src._observation(group, FsError(fsid=(5, 6), handle_type=FILEID_INVALID, inode=None,
                                       error=errno.EUCLEAN, error_count=1))
    assert unknown.device is None and unknown.mount is None and unknown.fs is None
    assert unknown.details["fsid"] == "00000005:00000006"
    assert unknown.kernel.errno == errno.EUCLEAN

    # Gone (unmounted) but remembered: still attributed.
    group.retired[(5, 6)] = MarkInfo(device=Device(7, 4, "loop4"), fstype="ext4",
                                     mountpoint="/vz/root/102", fsid=(5, 6))
    late = src._observation(group, FsError(fsid=(5, 6), handle_type=FILEID_INVALID, inode=None,
                                           error=errno.EUCLEAN, error_count=1))
    assert late.device == Device(7, 4, "loop4") and late.mount == "/vz/root/102"

    # Two live superblocks with one fsid in one group (cloned images, group limit reached):
    # no guessing, the candidates are named.
    group.marks[(7, 5)] = MarkInfo(device=Device(7, 5, "loop5"), fstype="ext4",
                                   mountpoint="/vz/root/103", fsid=(1, -2))
    amb = src._observation(group, FsError(fsid=(1, -2), handle_type=FILEID_INVALID, inode=None,
                                          error=errno.EUCLEAN, error_count=1))
    assert amb.device is None and amb.details["candidates"] == ["loop3", "loop5"]
