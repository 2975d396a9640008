"""Debian's ``qemu-img`` (package qemu-utils) for qcow2 files: what a file is, and conversion
to and from a sparse raw file.

The parsers are pure (tests feed them qemu-img's JSON and progress text); :func:`info` and
:func:`convert` run the tool. Every path is handed over absolute, so qemu-img never reads a
file name as a protocol (``nbd:...``, ``json:{...}``), and with ``-f`` given, so it never
probes the format of a file an operator brought. A qcow2 that names a backing file or an
external data file is refused: its guest bytes would come from another file of this host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..errors import ImageError

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
_PERCENT = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")


def detect_format(head: bytes) -> str:
    """``qcow2`` when the file starts with the qcow2 magic, else ``raw``."""
    return "qcow2" if head[:4] == QCOW2_MAGIC else "raw"


@dataclass(frozen=True, slots=True)
class QemuInfo:
    format: str
    virtual_size: int
    backing: str | None  # backing file named in the header
    data_file: str | None  # qcow2 external data file


def parse_info(text: str, file: str) -> QemuInfo:
    """``qemu-img info --output=json`` of one file."""
    try:
        d = json.loads(text)
        size = int(d["virtual-size"])
        fmt = str(d["format"])
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(f"qemu-img info gave no virtual size and format ({e})", file=file) from None
    data = (d.get("format-specific") or {}).get("data") or {}
    return QemuInfo(fmt, size, d.get("backing-filename") or d.get("full-backing-filename"), data.get("data-file"))


def parse_percent(chunk: bytes) -> float | None:
    """The last ``(12.34/100%)`` of ``qemu-img convert -p`` output in ``chunk``, as a fraction."""
    found = _PERCENT.findall(chunk)
    return float(found[-1]) / 100 if found else None


def _tool() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise ImageError("qemu-img is not installed (Debian package qemu-utils; scripts/bootstrap.sh installs it)")
    return path


def _error(stderr: str, file: str) -> ImageError:
    lines = [line.strip().removeprefix("qemu-img: ") for line in stderr.splitlines() if line.strip()]
    return ImageError(f"qemu-img: {'; '.join(lines)[:500] or 'failed'}", file=file)


def info(path: str, fmt: str) -> QemuInfo:
    """What qemu-img makes of ``path`` read as ``fmt``; a qcow2 it cannot open (a hostile or
    garbage header) is an :class:`ImageError` naming the file, with qemu-img's reason."""
    path = os.path.abspath(path)
    r = subprocess.run([_tool(), "info", "--output=json", "-f", fmt, path], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise _error(r.stderr, path)
    got = parse_info(r.stdout, path)
    if got.backing:
        raise ImageError(f"the qcow2 names a backing file ({got.backing!r}): import the flattened disk "
                         "(qemu-img convert -O qcow2 without -B first)", file=path)
    if got.data_file:
        raise ImageError(f"the qcow2 keeps its data in an external file ({got.data_file!r}), refused", file=path)
    return got


def convert(src: str, src_fmt: str, dst: str, dst_fmt: str, *,
            on_fraction: Callable[[float], None] | None = None) -> None:
    """``qemu-img convert`` ``src`` to a new ``dst``. Raw output is sparse (qemu-img seeks
    over zeros); a raw input is read by its data extents (SEEK_DATA), so a sparse file costs
    its data only. ``on_fraction`` hears qemu-img's own progress (0..1)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    cmd = [_tool(), "convert", "-p", "-f", src_fmt, "-O", dst_fmt, src, dst]
    # stderr to a file: a pipe left unread while the progress is followed could fill and stall it
    with tempfile.TemporaryFile() as errf, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf) as p:
        assert p.stdout is not None
        _follow(p.stdout, on_fraction)
        rc = p.wait()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
    if rc != 0:
        raise _error(err, src)


def _follow(out: IO[bytes], on_fraction: Callable[[float], None] | None) -> None:
    while True:
        chunk = os.read(out.fileno(), 4096)
        if not chunk:
            return
        f = parse_percent(chunk)
        if f is not None and on_fraction is not None:
            on_fraction(f)


def check(path: str) -> dict[str, Any]:
    """``qemu-img check`` of a qcow2: its JSON report (tests and the docs use it)."""
    r = subprocess.run([_tool(), "check", "--output=json", "-f", "qcow2", os.path.abspath(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode not in (0, 2, 3):  # 2, 3: corruptions or leaks, reported in the JSON
        raise _error(r.stderr, path)
    return json.loads(r.stdout)
