"""``image import`` and ``image export``: existing VE disks (raw or qcow2) in and out of images.

Sparse both ways. Import reads only the source's data extents (``SEEK_DATA``/``SEEK_HOLE``:
a hole costs nothing to skip) and allocates a cluster only for data that is not all zeros,
writing only its pages that are not zeros. Export writes a sparse raw file: only the clusters
the image holds are read, and only their pages that are not zeros are written; everything
else stays a hole.

qcow2 goes through ``qemu-img`` (:mod:`.qemuimg`) and a sparse raw file next to the target:
qemu-img has no way to hand another process the guest bytes of a range short of an NBD or
FUSE export, and its conversion to or from a sparse raw file costs the data only (it seeks
over zeros writing raw, and reads a raw file by its data extents). So a qcow2 import is
``qemu-img convert -O raw`` then the raw import, and a qcow2 export the raw export then
``qemu-img convert -O qcow2``; the temporary raw file needs the data's size of free space.

Nothing is half made: an import builds the image in a hidden directory beside the target and
renames it into place when complete (an existing image is replaced only with ``force``), an
export writes a hidden file beside the target and renames it. Every failure removes both.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ImageError
from . import descriptor as dd
from . import ops, qemuimg
from .delta import _data_runs, fsync_dir, is_zero
from .format import DEFAULT_CLUSTER, MAX_VIRTUAL
from .lock import exclusive
from .progress import ProgressFn
from .stack import Stack

COMMIT_EVERY = 256  # clusters between commits of an import (a crash mid-import leaves only the hidden directory)


@dataclass(frozen=True, slots=True)
class ImportResult:
    directory: str
    source: str
    format: str
    size: int  # the image's virtual size
    cluster: int
    data_bytes: int  # bytes in the source's data extents (what was read)
    clusters: int  # clusters allocated in the image


@dataclass(frozen=True, slots=True)
class ExportResult:
    target: str
    format: str
    size: int
    clusters: int  # clusters read out of the image
    written_bytes: int  # raw data bytes written (the rest is holes)


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of ``fd`` that hold data, by ``SEEK_DATA``/``SEEK_HOLE``
    (a file system without them, or a block device, reports the whole file as data)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                return
            if e.errno == errno.EINVAL:  # a block device: no holes it could tell of
                yield pos, size
                return
            raise
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        if start >= size:
            return
        yield start, end
        pos = end


def source_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in qemuimg.FORMATS:
            raise ImageError(f"unknown format {fmt!r} (raw or qcow2)", field="format")
        return fmt
    try:
        with open(path, "rb") as f:
            return qemuimg.detect_format(f.read(4))
    except OSError as e:
        raise ImageError(f"cannot read the disk: {e.strerror}", file=path) from e


def _source_size(path: str, fmt: str) -> int:
    if fmt == "qcow2":
        return qemuimg.info(path, "qcow2").virtual_size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)  # a block device's size too
    finally:
        os.close(fd)


def _check_target_dir(directory: str, force: bool) -> bool:
    """Whether ``directory`` holds an image to replace; refuses what must not be replaced."""
    if not os.path.lexists(directory):
        return False
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise ImageError("exists and is not a directory", file=directory)
    if not os.listdir(directory):
        return False
    if not force:
        raise ImageError("exists and is not empty (--force replaces an image there)", file=directory)
    if not os.path.exists(os.path.join(directory, dd.NAME)):
        raise ImageError(f"exists and holds no {dd.NAME}: --force replaces an image, not any directory",
                         file=directory)
    return True


def import_disk(source: str, directory: str, *, fmt: str | None = None, size: int | None = None,
                cluster: int = DEFAULT_CLUSTER, force: bool = False,
                progress: ProgressFn | None = None) -> ImportResult:
    """A new image in ``directory`` holding the disk in ``source`` (raw or qcow2)."""
    fmt = source_format(source, fmt)
    src_size = _source_size(source, fmt)
    virtual = src_size if size is None else size
    if virtual < src_size:
        raise ImageError(f"--size {virtual} is smaller than the disk's {src_size} bytes: data would be lost",
                         file=source, field="size")
    if not 0 < virtual <= MAX_VIRTUAL:
        raise ImageError(f"a disk of {virtual} bytes cannot be an image (1 byte to {MAX_VIRTUAL})",
                         file=source, field="size")
    directory = os.path.abspath(directory)
    replace = _check_target_dir(directory, force)
    parent = os.path.dirname(directory)
    base = os.path.basename(directory)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{base}.import-", dir=parent)
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(work, 0o777 & ~mask)  # as `image create` makes it (mkdtemp's is 0700)
    raw_tmp: str | None = None
    try:
        desc = ops.create_empty(work, virtual, cluster)
        raw = source
        if fmt == "qcow2":
            raw_tmp = os.path.join(parent, f".{base}.import-{os.path.basename(work)[-8:]}.raw")
            qemuimg.convert(source, "qcow2", raw_tmp, "raw",
                            on_fraction=None if progress is None else
                            (lambda f: progress("convert", int(f * src_size), src_size)))
            raw = raw_tmp
        data_bytes, clusters = _copy_in(raw, work, progress)
        if replace:
            with exclusive(directory, "replace"):
                old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
                os.rename(directory, os.path.join(old, base))
                os.rename(work, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(directory):
                os.rmdir(directory)  # empty (checked): the rename takes its place
            os.rename(work, directory)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if raw_tmp is not None and os.path.exists(raw_tmp):
            os.unlink(raw_tmp)
    return ImportResult(directory, os.path.abspath(source), fmt, desc.size, desc.cluster, data_bytes, clusters)


def _copy_in(raw: str, image_dir: str, progress: ProgressFn | None) -> tuple[int, int]:
    """Copy the data extents of ``raw`` into the (empty) image; returns (bytes read, clusters)."""
    fd = os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        ranges = list(data_ranges(fd, size))
        total = sum(e - s for s, e in ranges)
        done = clusters = 0
        with Stack.open(image_dir) as stack:
            top, c = stack.top, stack.cluster
            for start, end in ranges:
                vc = start // c
                while vc * c < end:
                    lo, hi = max(start, vc * c), min(end, (vc + 1) * c)
                    # The whole cluster: its part outside this extent is a hole (zeros) or
                    # data of the next extent, which this copy takes as well.
                    data = os.pread(fd, c, vc * c)
                    if len(data) < c:
                        data += bytes(c - len(data))
                    if not top.physical(vc) and not is_zero(data):
                        top.allocate_sparse(vc, data)
                        clusters += 1
                        if clusters % COMMIT_EVERY == 0:
                            top.commit()
                    done += hi - lo
                    if progress is not None:
                        progress("copy", done, total)
                    vc += 1
            top.commit()
    finally:
        os.close(fd)
    return total, clusters


def _check_target_file(target: str, force: bool) -> None:
    if not os.path.lexists(target):
        return
    if not force:
        raise ImageError("exists (--force replaces it)", file=target)
    if os.path.islink(target) or not os.path.isfile(target):
        raise ImageError("exists and is not a regular file: --force replaces a file only", file=target)


def export_disk(directory: str, target: str, *, fmt: str = "raw", snapshot: str | None = None,
                force: bool = False, progress: ProgressFn | None = None) -> ExportResult:
    """Write the image's disk (its top, or snapshot ``snapshot``) to ``target`` as a sparse
    raw file or a qcow2."""
    if fmt not in qemuimg.FORMATS:
        raise ImageError(f"unknown format {fmt!r} (raw or qcow2)", field="format")
    target = os.path.abspath(target)
    _check_target_file(target, force)
    if snapshot is not None:
        desc = dd.load(ops.descriptor_path(directory))
        if snapshot not in {s.guid for s in desc.shots}:
            raise ImageError(f"no snapshot {snapshot}", file=ops.descriptor_path(directory), field="GUID")
    parent, base = os.path.dirname(target), os.path.basename(target)
    fd, raw_tmp = tempfile.mkstemp(prefix=f".{base}.export-", suffix=".raw", dir=parent)
    out_tmp = None
    try:
        # The top changes under a writer: no exporter may attach it writable meanwhile. A
        # snapshot never changes, so exporting one needs no lock (the VE keeps running).
        with (exclusive(directory, "export") if snapshot is None else contextlib.nullcontext()), \
                Stack.open(directory, writable=False, upto=snapshot) as stack:
            size = stack.size
            clusters, written = _copy_out(stack, fd, progress)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if fmt == "qcow2":
            out_tmp = raw_tmp[:-len(".raw")] + ".qcow2"
            qemuimg.convert(raw_tmp, "raw", out_tmp, "qcow2",
                            on_fraction=None if progress is None else
                            (lambda f: progress("convert", int(f * size), size)))
            os.rename(out_tmp, target)
        else:
            os.rename(raw_tmp, target)
        fsync_dir(target)
    except BaseException:
        if out_tmp is not None and os.path.exists(out_tmp):
            os.unlink(out_tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(raw_tmp):
            os.unlink(raw_tmp)
    return ExportResult(target, fmt, size, clusters, written)


def _copy_out(stack: Stack, fd: int, progress: ProgressFn | None) -> tuple[int, int]:
    """Write the stack's clusters that hold data into the (new, empty) file ``fd``, which ends
    up ``stack.size`` long with holes everywhere else; returns (clusters, bytes written)."""
    c, size = stack.cluster, stack.size
    os.ftruncate(fd, size)
    owned = [(vc, hit) for vc in range(-(-size // c)) if (hit := stack.owner(vc)) is not None]
    total = sum(min(c, size - vc * c) for vc, _ in owned)  # bytes, as the import counts
    written = done = 0
    for vc, (delta, phys) in owned:
        n = min(c, size - vc * c)
        view = memoryview(delta.read(phys, 0, n))
        for lo, hi in _data_runs(view):
            os.pwrite(fd, view[lo:hi], vc * c + lo)
            written += hi - lo
        done += n
        if progress is not None:
            progress("copy", done, total)
    return len(owned), written
