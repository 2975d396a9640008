"""``image import`` / ``image export`` on real files (sparse raw files, qcow2 made and checked
by a real qemu-img); no root needed. The ext4-with-files round trip through a mounted image
is in tests/integration/test_image_transfer.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fsnotifyd.cli import main
from fsnotifyd.image import qemuimg
from fsnotifyd.image.check import check
from fsnotifyd.image.stack import Stack

MiB = 1 << 20
SIZE = 64 * MiB + 3 * 4096  # not a whole number of clusters: the last one is partial

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img not installed (Debian qemu-utils; scripts/bootstrap.sh installs it)")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def make_raw(path: Path) -> bytes:
    """A sparse raw disk: data in four places (one cluster only partly, one all zeros but
    written, so SEEK_DATA reports it), holes elsewhere; returns its content."""
    content = bytearray(SIZE)
    pieces = {
        1 * MiB: os.urandom(2 * MiB),  # two whole clusters
        5 * MiB + 8192: os.urandom(4096),  # one page in the middle of a cluster
        20 * MiB: bytes(3 * MiB),  # zeros, written: data to SEEK_DATA, nothing to allocate
        SIZE - 4096: os.urandom(4096),  # the partial last cluster
    }
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for at, data in pieces.items():
            f.seek(at)
            f.write(data)
            content[at:at + len(data)] = data
    return bytes(content)


def nonzero_clusters(content: bytes, cluster: int = MiB) -> int:
    return sum(1 for at in range(0, len(content), cluster) if content[at:at + cluster].count(0) != len(
        content[at:at + cluster]))


def image_bytes(image: str, upto: str | None = None) -> bytes:
    with Stack.open(image, writable=False, upto=upto) as s:
        return s.read(0, s.size)


def allocated(image: str) -> int:
    with Stack.open(image, writable=False) as s:
        return s.allocated_clusters()


def test_raw_import_allocates_only_data_and_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    content = make_raw(raw)
    image = str(tmp_path / "img")
    rc, out, err = cli(capsys, "image", "import", str(raw), image, "--state-dir", str(tmp_path / "s"))
    assert rc == 0, err
    assert "from raw" in out and "4 clusters allocated" in out
    assert check(image).clean
    assert allocated(image) == nonzero_clusters(content) == 4  # the written zeros cost nothing
    assert image_bytes(image)[:SIZE] == content
    with Stack.open(image, writable=False) as s:
        assert s.size == SIZE
    # Only the data's pages were written: the delta holds about 2 MiB + 2 pages, not 4 clusters.
    physical = os.stat(os.path.join(image, "root.hds")).st_blocks * 512
    assert physical < 2 * MiB + 64 * 1024 + 256 * 1024  # data, header and BAT


def test_raw_export_is_sparse_and_equal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    content = make_raw(raw)
    image, out_raw = str(tmp_path / "img"), tmp_path / "out.raw"
    assert cli(capsys, "image", "import", str(raw), image, "--state-dir", str(tmp_path / "s"))[0] == 0
    rc, out, err = cli(capsys, "image", "export", image, str(out_raw), "--state-dir", str(tmp_path / "s"))
    assert rc == 0, err
    assert out_raw.read_bytes() == content
    st = out_raw.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 <= 2 * MiB + 2 * 4096  # holes wherever the image has no data, zeros too
    assert os.stat(raw).st_blocks * 512 >= 5 * MiB  # the source held its written zeros


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    make_raw(raw)
    sd = str(tmp_path / "s")
    image, out_raw = str(tmp_path / "img"), tmp_path / "out.raw"
    assert cli(capsys, "image", "import", str(raw), image, "--state-dir", sd)[0] == 0
    rc, _, err = cli(capsys, "image", "import", str(raw), image, "--state-dir", sd)
    assert rc == 1 and "exists and is not empty" in err and image in err
    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"other disk")
    rc, _, err = cli(capsys, "image", "import", str(other), image, "--force", "--state-dir", sd)
    assert rc == 0, err
    assert image_bytes(image)[:10] == b"other disk" and len(image_bytes(image)) == 8 * MiB
    assert check(image).clean
    # --force replaces an image, never just any directory
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep").write_text("x")
    rc, _, err = cli(capsys, "image", "import", str(raw), str(plain), "--force", "--state-dir", sd)
    assert rc == 1 and "holds no DiskDescriptor.xml" in err and (plain / "keep").read_text() == "x"
    out_raw.write_bytes(b"precious")
    rc, _, err = cli(capsys, "image", "export", image, str(out_raw), "--state-dir", sd)
    assert rc == 1 and "exists" in err and out_raw.read_bytes() == b"precious"
    assert cli(capsys, "image", "export", image, str(out_raw), "--force", "--state-dir", sd)[0] == 0
    assert out_raw.read_bytes()[:10] == b"other disk"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no hidden work left


def test_size_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    content = make_raw(raw)
    sd = str(tmp_path / "s")
    rc, _, err = cli(capsys, "image", "import", str(raw), str(tmp_path / "small"), "--size", "32M", "--state-dir", sd)
    assert rc == 1 and "smaller than the disk" in err and not (tmp_path / "small").exists()
    big = str(tmp_path / "big")
    assert cli(capsys, "image", "import", str(raw), big, "--size", "128M", "--state-dir", sd)[0] == 0
    data = image_bytes(big)
    assert len(data) == 128 * MiB and data[:SIZE] == content and data[SIZE:].count(0) == 128 * MiB - SIZE


def test_export_snapshot_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    content = make_raw(raw)
    sd = str(tmp_path / "s")
    image = str(tmp_path / "img")
    assert cli(capsys, "image", "import", str(raw), image, "--state-dir", sd)[0] == 0
    rc, out, _ = cli(capsys, "image", "snapshot", image, "--state-dir", sd)
    guid = out.split()[0]
    with Stack.open(image) as s:
        s.write(1 * MiB, b"after the snapshot")
        s.flush()
    top, snap = tmp_path / "top.raw", tmp_path / "snap.raw"
    assert cli(capsys, "image", "export", image, str(top), "--state-dir", sd)[0] == 0
    assert cli(capsys, "image", "export", image, str(snap), "--snapshot", guid, "--state-dir", sd)[0] == 0
    assert snap.read_bytes() == content
    assert top.read_bytes()[1 * MiB:1 * MiB + 18] == b"after the snapshot"
    rc, _, err = cli(capsys, "image", "export", image, str(tmp_path / "x.raw"), "--snapshot",
                     "{00000000-0000-0000-0000-000000000001}", "--state-dir", sd)
    assert rc == 1 and "no snapshot" in err and not (tmp_path / "x.raw").exists()


@needs_qemu
def test_qcow2_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    content = make_raw(raw)
    sd = str(tmp_path / "s")
    src_qcow2 = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src_qcow2)], check=True)
    image = str(tmp_path / "img")
    rc, out, err = cli(capsys, "image", "import", str(src_qcow2), image, "--state-dir", sd)  # format from the magic
    assert rc == 0, err
    assert "from qcow2" in out
    assert check(image).clean and allocated(image) == 4
    assert image_bytes(image) == content
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the sparse raw temp is gone
    exported = tmp_path / "out.qcow2"
    rc, out, err = cli(capsys, "image", "export", image, str(exported), "--state-dir", sd)  # qcow2 from the name
    assert rc == 0, err
    assert exported.read_bytes()[:4] == qemuimg.QCOW2_MAGIC
    report = qemuimg.check(str(exported))
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(exported)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(exported)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    # sparse: qemu-img allocates about the data (2 MiB + 2 pages), not the disk
    assert qemuimg.info(str(exported), "qcow2").virtual_size == SIZE
    assert exported.stat().st_blocks * 512 < 4 * MiB
    # --format overrides the magic: the qcow2 file itself as a raw disk
    as_raw = str(tmp_path / "asraw")
    assert cli(capsys, "image", "import", str(exported), as_raw, "--format", "raw", "--state-dir", sd)[0] == 0
    assert image_bytes(as_raw)[:exported.stat().st_size] == exported.read_bytes()


@needs_qemu
def test_garbage_qcow2_is_a_clear_error_and_creates_nothing(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(qemuimg.QCOW2_MAGIC + os.urandom(100_000))
    target = tmp_path / "img"
    rc, out, err = cli(capsys, "image", "import", str(bad), str(target), "--state-dir", str(tmp_path / "s"))
    assert rc == 1 and out == ""
    assert str(bad) in err and "qemu-img: Could not open" in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.qcow2"]  # no image, no hidden work, no raw temp
    # a valid header that names a backing file would read another file of this host
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(backed)],
                   check=True)
    rc, _, err = cli(capsys, "image", "import", str(backed), str(target), "--state-dir", str(tmp_path / "s"))
    assert rc == 1 and "backing file" in err and str(backed) in err and not target.exists()
