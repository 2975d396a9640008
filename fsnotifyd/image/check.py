"""``image check``: find (and with ``repair=True`` fix) what a crash or a hostile edit can leave
in an image directory.

What is checked, per :func:`check`:

- the disk descriptor loads (else nothing else can be known: reported, not repairable);
- a ``DiskDescriptor.xml.tmp`` of an interrupted save (removed);
- every delta the descriptor names opens (``Delta.open(strict=False)``); a delta that does not
  open is reported with the file and header field at fault (not repairable);
- its cluster and virtual size agree with the descriptor (a top larger than the descriptor is
  what an interrupted grow or cut leaves: repaired by resizing the top to the descriptor);
- BAT entries past the end of the file, inside the header and BAT, or naming a physical cluster
  another entry already names (repaired: the entry is zeroed, a duplicate's first owner keeps
  the cluster; the BAT is written and fdatasync'd);
- a file length that is not a whole number of clusters (the partial tail of an interrupted
  append: repaired by cutting it; it is never referenced once the BAT is repaired);
- unreferenced physical clusters that hold anything but zeros (an allocation a crash kept from being
  committed, a compaction cut short): their count and bytes (repaired: the file is cut after
  the last used cluster, interior ones are punched). Unreferenced clusters that are holes are
  ordinary free space left by discards, not problems;
- mapped clusters that are all holes: every page discarded, the cluster not yet freed (a crash
  between the last punch and the commit that frees it; repaired: the entry is marked zero, or
  unmapped in the base delta, which has nothing below to hide);
- the header's in-use marker (a writer did not close cleanly: reported; repaired by clearing it
  once the rest of the delta is repaired);
- files in the directory that the descriptor does not name: a delta (ploop signature, or named
  ``root.hds.<uuid>`` like a snapshot's: one killed while being created has no header yet) left
  by an interrupted snapshot or merge, a ``*.tmp`` file, an ``fsnd-mkfs-*`` directory of an
  interrupted create (removed); any other file is reported and left alone.

Run it on a detached image only: an exporter's in-flight snapshot looks like a leftover delta.
Repair is idempotent; a check after a repair is clean unless a problem is not repairable.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass, field

from ..errors import ImageError
from . import descriptor as dd
from .delta import Delta, punch_hole
from .descriptor import Descriptor
from .format import SIGNATURE, ZERO_CLUSTER
from .progress import ProgressFn

TMP_SUFFIX = ".tmp"
MKFS_TMP_PREFIX = "fsnd-mkfs-"
# ops._delta_name
SNAPSHOT_NAME = re.compile(r"root\.hds\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Problem:
    file: str
    field: str | None
    what: str
    repaired: bool = False
    repairable: bool = True

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        state = " [repaired]" if self.repaired else ("" if self.repairable else " [not repairable]")
        return f"{self.file}{where}: {self.what}{state}"


@dataclass
class CheckReport:
    directory: str
    problems: list[Problem] = field(default_factory=list)
    leaked_clusters: int = 0  # unreferenced clusters holding data, over all deltas
    leaked_bytes: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    def add(self, file: str, field_: str | None, what: str, *, repaired: bool = False,
            repairable: bool = True) -> Problem:
        p = Problem(file, field_, what, repaired, repairable)
        self.problems.append(p)
        return p

    def __str__(self) -> str:
        if self.clean:
            return f"{self.directory}: clean"
        return "\n".join(str(p) for p in self.problems)


def check(image_dir: str, *, repair: bool = False, progress: ProgressFn | None = None) -> CheckReport:
    """Check the image in ``image_dir``; with ``repair`` fix what can be fixed. Never raises for
    what is in the directory: every problem is an entry of the report. ``progress("check",
    bytes, bytes)`` over the delta files, after each one."""
    report = CheckReport(image_dir)
    desc_path = os.path.join(image_dir, dd.NAME)
    try:
        desc = dd.load(desc_path)
    except ImageError as e:
        report.add(e.file or desc_path, e.field, e.message, repairable=False)
        return report  # which files are leftovers cannot be known without the descriptor
    sizes = [_file_size(os.path.join(image_dir, shot.file)) for shot in desc.shots]
    done = 0
    for shot, size in zip(desc.shots, sizes, strict=True):
        _check_delta(os.path.join(image_dir, shot.file), desc, shot.guid == desc.top, report, repair,
                     base=shot.parent == dd.ROOT_PARENT)
        done += size
        if progress is not None:
            progress("check", done, sum(sizes))
    _leftovers(image_dir, desc, report, repair)
    return report


def _file_size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0  # reported by the check itself


# -- one delta ---------------------------------------------------------------------------------

def _check_delta(path: str, desc: Descriptor, is_top: bool, report: CheckReport, repair: bool, *,
                 base: bool = False) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        report.add(path, None, f"delta file missing or unreadable: {e.strerror}", repairable=False)
        return
    if not stat.S_ISREG(st.st_mode):
        report.add(path, None, "delta is not a regular file", repairable=False)
        return
    try:
        delta = Delta.open(path, writable=repair, strict=False)
    except ImageError as e:
        report.add(e.file or path, e.field, e.message, repairable=False)
        return
    try:
        _check_open_delta(delta, desc, is_top, report, repair, base)
    except ImageError as e:
        report.add(e.file or path, e.field, e.message, repairable=False)
    except OSError as e:
        report.add(path, None, f"I/O error while checking: {e.strerror or e}", repairable=False)
    finally:
        try:
            os.close(delta.fd)  # not close(): nothing is pending, and a failed repair must not commit
        except OSError:
            pass
        delta.fd = -1


def _check_open_delta(delta: Delta, desc: Descriptor, is_top: bool, report: CheckReport, repair: bool,
                      base: bool = False) -> None:
    path, h = delta.path, delta.header
    c = h.cluster

    # Geometry against the descriptor.
    if c != desc.cluster:
        report.add(path, "m_Sectors", f"cluster of {c} bytes, the descriptor says {desc.cluster}",
                   repairable=False)
        return  # nothing below is meaningful with the wrong cluster
    resize_to = None
    if is_top and h.size != desc.size:
        # Larger: an interrupted grow (header first) or cut (descriptor first); nothing was
        # written past the descriptor's size either way, so the descriptor wins.
        resize_to = desc.size
        report.add(path, "m_SizeInSectors", f"virtual size {h.size}, the descriptor says {desc.size}",
                   repaired=repair)
    elif not is_top and h.size > desc.size:
        report.add(path, "m_SizeInSectors", f"snapshot's virtual size {h.size} is larger than the disk's "
                   f"{desc.size}", repairable=False)

    # BAT entries that cannot be right (already read as unmapped in memory).
    bad = [p.index for p in delta.problems]
    for problem in delta.problems:
        report.add(path, f"bat[{problem.index}]", str(problem), repaired=repair)
    if repair and bad:
        delta._write_bat_entries(sorted(bad))
        os.fdatasync(delta.fd)

    # A partial cluster at the end of the file.
    size = os.fstat(delta.fd).st_size
    if size % c:
        report.add(path, "length", f"file length {size} is not a whole number of {c}-byte clusters "
                   f"({size % c} bytes of a partial cluster at the end)", repaired=repair)
        if repair:
            os.ftruncate(delta.fd, size - size % c)
            os.fsync(delta.fd)
            delta.file_clusters = size // c
            delta._free = delta.unreferenced()

    # Unreferenced clusters that hold data: space a crash leaked.
    leaked = [p for p in delta.unreferenced() if _has_data(delta.fd, p * c, c)]
    if leaked:
        report.leaked_clusters += len(leaked)
        report.leaked_bytes += len(leaked) * c
        report.add(path, "clusters", f"{len(leaked)} unreferenced clusters hold data "
                   f"({len(leaked) * c} bytes leaked)", repaired=repair)
        if repair:
            delta.truncate_tail()
            for p in leaked:
                if p < delta.file_clusters:
                    punch_hole(delta.fd, p * c, c)
            os.fsync(delta.fd)
            delta._free = delta.unreferenced()

    # Mapped clusters every page of which was discarded: free space the image still holds.
    with_data = _data_clusters(delta.fd, c)
    hollow = [vc for vc in range(len(delta.bat)) if (p := delta.physical(vc)) and p not in with_data]
    if hollow:
        report.add(path, "clusters", f"{len(hollow)} mapped clusters are all holes (discarded, not freed)",
                   repaired=repair)
        if repair:
            for vc in hollow:
                delta.bat[vc] = 0 if base else ZERO_CLUSTER
            delta._write_bat_entries(hollow)
            os.fdatasync(delta.fd)
            delta._free = delta.unreferenced()

    if repair and resize_to is not None:
        delta.resize(resize_to)

    if delta.header.in_use:
        report.add(path, "m_DiskInUse", "in-use marker set: the delta was not closed cleanly", repaired=repair)
        if repair:
            delta.set_in_use(False)


def _data_clusters(fd: int, cluster: int) -> set[int]:
    """Physical clusters with at least one block of data in the file (SEEK_DATA/SEEK_HOLE: a
    walk over the file's extents, not a call per cluster)."""
    out: set[int] = set()
    end = os.fstat(fd).st_size
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data at or after pos
            break
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        out.update(range(start // cluster, -(-stop // cluster)))
        pos = stop
    return out


def _has_data(fd: int, offset: int, length: int) -> bool:
    """Whether ``[offset, offset + length)`` holds anything but zeros: a hole is skipped without
    reading (SEEK_DATA); allocated zeros (a copy made without holes, a host fs that cannot punch
    them) are not counted, as a repair could not make them go away there."""
    try:
        at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: no data at or after offset
        return False
    if at >= offset + length:
        return False
    data = os.pread(fd, offset + length - at, at)
    return data.count(0) != len(data)


# -- files the descriptor does not name ----------------------------------------------------------

def _is_delta(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SIGNATURE)) == SIGNATURE
    except OSError:
        return False


def _leftovers(image_dir: str, desc: Descriptor, report: CheckReport, repair: bool) -> None:
    try:
        names = sorted(os.listdir(image_dir))
    except OSError as e:
        report.add(image_dir, None, f"cannot list the image directory: {e.strerror}", repairable=False)
        return
    known = {dd.NAME} | {s.file for s in desc.shots}
    removed = False
    for name in names:
        if name in known:
            continue
        path = os.path.join(image_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if name.startswith(MKFS_TMP_PREFIX):
                report.add(path, None, "scratch directory of an interrupted create", repaired=repair)
                if repair:
                    shutil.rmtree(path, ignore_errors=True)
                    removed = True
            else:
                report.add(path, None, "directory the descriptor does not name (left alone)", repairable=False)
            continue
        regular = stat.S_ISREG(st.st_mode)
        if regular and name.endswith(TMP_SUFFIX):
            what = "temporary file of an interrupted save"
        elif regular and (_is_delta(path) or SNAPSHOT_NAME.fullmatch(name)):
            # by name too: a snapshot killed inside Delta.create leaves a file without a header
            what = "delta the descriptor does not name (an interrupted snapshot or merge)"
        else:
            report.add(path, None, "file the descriptor does not name (left alone)", repairable=False)
            continue
        report.add(path, None, what, repaired=repair)
        if repair:
            os.unlink(path)
            removed = True
    if removed:
        try:
            fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
