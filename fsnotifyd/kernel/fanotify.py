"""fanotify's event records (``include/uapi/linux/fanotify.h``): what one ``read()`` of a
``FAN_CLASS_NOTIF | FAN_REPORT_FID`` group returns, as :class:`FsError`. Pure.

:func:`parse_events` bounds-checks every length and never raises on any input; the group, its
marks and the reading are :mod:`fsnotifyd.sources.fanotify`'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["FAN_FS_ERROR", "FAN_Q_OVERFLOW", "FsError", "fsid_str", "parse_events"]

FAN_Q_OVERFLOW = 0x00004000
FAN_FS_ERROR = 0x00008000

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_ERROR = 5

# include/linux/exportfs.h (not uapi, but the values are ABI for name_to_handle_at).
FILEID_INO32_GEN = 1
FILEID_INO32_GEN_PARENT = 2
FILEID_INO64_GEN = 0x81
FILEID_INO64_GEN_PARENT = 0x82
FILEID_INVALID = 0xFF

# struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
#                                  __aligned_u64 mask; s32 fd; s32 pid; }  -> 24 bytes
_META = struct.Struct("=IBBHQii")
# struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }
_INFO_HDR = struct.Struct("=BBH")
# struct fanotify_event_info_fid { hdr; __kernel_fsid_t fsid (2 x s32); file_handle ... }
_FSID = struct.Struct("=ii")
# struct file_handle { u32 handle_bytes; s32 handle_type; unsigned char f_handle[]; }
_FILE_HANDLE = struct.Struct("=Ii")
# struct fanotify_event_info_error { hdr; s32 error; u32 error_count; }
_ERROR = struct.Struct("=iI")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

assert _META.size == 24 and _INFO_HDR.size == 4


@dataclass(frozen=True, slots=True)
class FsError:
    """One ``FAN_FS_ERROR`` event as the kernel reported it."""

    fsid: tuple[int, int] | None  # the two s32 of __kernel_fsid_t; None if no FID record
    handle_type: int | None
    inode: int | None
    error: int  # abs() of the kernel's s32 (the kernel may report -EUCLEAN or EUCLEAN)
    error_count: int
    pid: int | None = None  # the process that hit the error (tgid; a kworker for writeback)


def fsid_str(fsid: tuple[int, int] | None) -> str | None:
    if fsid is None:
        return None
    return f"{fsid[0] & 0xFFFFFFFF:08x}:{fsid[1] & 0xFFFFFFFF:08x}"


def _inode_from_handle(handle_type: int, f_handle: bytes) -> int | None:
    if handle_type in (FILEID_INO32_GEN, FILEID_INO32_GEN_PARENT) and len(f_handle) >= 4:
        return _U32.unpack_from(f_handle)[0]
    if handle_type in (FILEID_INO64_GEN, FILEID_INO64_GEN_PARENT) and len(f_handle) >= 8:
        return _U64.unpack_from(f_handle)[0]
    return None  # FILEID_INVALID (error not tied to an inode) or an opaque fs-specific handle


def _parse_event(buf: memoryview, start: int, end: int, meta_len: int, mask: int,
                 pid: int) -> FsError | None:
    """The info records of one event in ``buf[start+meta_len:end]``; None if not usable."""
    if not mask & FAN_FS_ERROR:
        return None
    fsid: tuple[int, int] | None = None
    handle_type: int | None = None
    inode: int | None = None
    error: tuple[int, int] | None = None
    pos = start + meta_len
    while pos + _INFO_HDR.size <= end:
        info_type, _pad, rec_len = _INFO_HDR.unpack_from(buf, pos)
        if rec_len < _INFO_HDR.size or pos + rec_len > end:
            break  # malformed record: the rest of this event cannot be trusted
        body = pos + _INFO_HDR.size
        rec_end = pos + rec_len
        if info_type == FAN_EVENT_INFO_TYPE_FID and fsid is None:
            if body + _FSID.size <= rec_end:
                fsid = _FSID.unpack_from(buf, body)
                fh = body + _FSID.size
                if fh + _FILE_HANDLE.size <= rec_end:
                    nbytes, htype = _FILE_HANDLE.unpack_from(buf, fh)
                    handle_type = htype
                    data = fh + _FILE_HANDLE.size
                    if nbytes <= rec_end - data:
                        inode = _inode_from_handle(htype, bytes(buf[data : data + nbytes]))
        elif info_type == FAN_EVENT_INFO_TYPE_ERROR and error is None:
            if body + _ERROR.size <= rec_end:
                err, count = _ERROR.unpack_from(buf, body)
                error = (abs(err), count)
        pos = rec_end
    if error is None:
        return None  # an FS_ERROR event without its error record is malformed
    return FsError(fsid=fsid, handle_type=handle_type, inode=inode, error=error[0],
                   error_count=error[1], pid=pid if pid > 0 else None)


def parse_events(buf: bytes) -> list[FsError]:
    """Every ``FAN_FS_ERROR`` event in one ``read()`` of a fanotify fd.

    Bounds-checks every length; a malformed event is skipped, and when an event's own length
    cannot be trusted the rest of the buffer is dropped (there is no way to resynchronise).
    """
    out: list[FsError] = []
    try:
        view = memoryview(buf).cast("B")
    except (TypeError, ValueError):
        return out
    total = len(view)
    pos = 0
    while pos + _META.size <= total:
        event_len, vers, _res, meta_len, mask, _fd, pid = _META.unpack_from(view, pos)
        if event_len < _META.size or pos + event_len > total:
            break
        end = pos + event_len
        if vers >= FANOTIFY_METADATA_VERSION and _META.size <= meta_len <= event_len:
            ev = _parse_event(view, pos, end, meta_len, mask, pid)
            if ev is not None:
                out.append(ev)
        pos = end
    return out
