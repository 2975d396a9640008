"""``image import`` / ``image export`` with a real ext4: made in a sparse raw file with files
written through a loop mount, imported, checked, attached (FUSE exporter + loop device),
mounted, and read back; exported again as raw and as qcow2 and compared with qemu-img.

Everything this module mounts or attaches is taken down in ``finally`` blocks; the module
checks at the end that no loop device or mount of its own is left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsnotifyd.cli import main
from fsnotifyd.image import attach as A
from fsnotifyd.image.check import check
from fsnotifyd.image.stack import Stack

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

PREFIX = f"fsnd-imex-{os.getpid()}-"
MiB = 1 << 20
DISK = 512 * MiB
ZEROS = 48 * MiB  # a file of written zeros: data to the raw file, nothing to the image


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ours() -> list[str]:
    loops = [line for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
             if PREFIX in line]
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if PREFIX in line]
    return loops + mounts


@pytest.fixture(scope="module", autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    assert ours() == []


@pytest.fixture
def work(kernel: None) -> Iterator[Path]:
    for tool in ("mkfs.ext4", "losetup", "qemu-img", "fusermount3"):
        if shutil.which(tool) is None:
            from tests.conftest import kernel_missing

            kernel_missing(f"{tool} not installed (scripts/bootstrap.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        yield root
    finally:
        run_dir = str(root / "s" / "run")
        for att in A.attached(run_dir):
            A.detach(att, run_dir=run_dir, lazy=True)
        for mp in (root / "mnt", root / "src-mnt"):
            if mp.is_dir() and os.path.ismount(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def make_ext4(root: Path) -> tuple[Path, dict[str, str]]:
    """A sparse raw file with an ext4 holding a few files; returns it and the files' sha256."""
    raw = root / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", str(raw))
    mp = root / "src-mnt"
    mp.mkdir()
    sh("mount", "-o", "loop", str(raw), str(mp))  # autoclear: the loop device goes with the umount
    try:
        (mp / "dir").mkdir()
        (mp / "small.txt").write_text("hello from a VE disk\n")
        (mp / "dir" / "random.bin").write_bytes(os.urandom(23 * MiB + 123))
        with open(mp / "dir" / "zeros.bin", "wb") as f:  # written zeros: allocated blocks in the raw file
            for _ in range(ZEROS // MiB):
                f.write(bytes(MiB))
        (mp / "sparse.bin").write_bytes(b"")
        with open(mp / "sparse.bin", "r+b") as f:
            f.seek(200 * MiB)
            f.write(os.urandom(4096))
        sums = {str(p.relative_to(mp)): sha(p) for p in mp.rglob("*") if p.is_file()}
    finally:
        sh("umount", str(mp))
    return raw, sums


def nonzero_clusters(path: Path, cluster: int = MiB) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(cluster):
            n += chunk.count(0) != len(chunk)
    return n


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_ext4_round_trip_raw_and_qcow2(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, sums = make_ext4(work)
    sd = str(work / "s")
    image = str(work / "img")
    rc, out, err = cli(capsys, "image", "import", str(raw), image, "--state-dir", sd)
    assert rc == 0, err
    rep = check(image)
    assert rep.clean, str(rep)

    # Sparse: the image holds the clusters with data that is not zeros, exactly; the 48 MiB of
    # written zeros the raw file holds cost nothing.
    with Stack.open(image, writable=False) as s:
        held = s.allocated_clusters()
    assert held == nonzero_clusters(raw)
    raw_used = os.stat(raw).st_blocks * 512
    assert held * MiB < raw_used - ZEROS + 8 * MiB, (held, raw_used)

    # Attached and mounted, the files are the files.
    att = A.attach(image, run_dir=os.path.join(sd, "run"), readonly=True)
    try:
        mp = work / "mnt"
        A.mount(att, str(mp), readonly=True)
        got = {str(p.relative_to(mp)): sha(p) for p in mp.rglob("*") if p.is_file() and p.name != "lost+found"}
        assert got == sums
    finally:
        A.detach(att, run_dir=os.path.join(sd, "run"))

    # Export raw: the same bytes as the source, with holes where the image has no data.
    out_raw = work / "out.raw"
    rc, out, err = cli(capsys, "image", "export", image, str(out_raw), "--state-dir", sd)
    assert rc == 0, err
    sh("cmp", str(raw), str(out_raw))
    used = os.stat(out_raw).st_blocks * 512
    du = sh("du", "-k", str(out_raw)).stdout.split()[0]
    assert int(du) * 1024 == used <= held * MiB and used < raw_used - ZEROS + MiB, (used, raw_used)
    with capsys.disabled():
        print(f"\nsource raw {raw_used / MiB:.1f} MiB used, image {held} clusters, export {used / MiB:.1f} MiB used")

    # qcow2 both ways through a real qemu-img.
    out_q = work / "out.qcow2"
    rc, out, err = cli(capsys, "image", "export", image, str(out_q), "--state-dir", sd)
    assert rc == 0, err
    sh("qemu-img", "check", "-f", "qcow2", str(out_q))
    assert "Images are identical" in sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                                        str(out_q)).stdout
    image2 = str(work / "img2")
    rc, out, err = cli(capsys, "image", "import", str(out_q), image2, "--state-dir", sd)
    assert rc == 0 and "from qcow2" in out, err
    assert check(image2).clean
    with Stack.open(image2, writable=False) as s:
        assert s.allocated_clusters() == held
    back = work / "back.raw"
    assert cli(capsys, "image", "export", image2, str(back), "--state-dir", sd)[0] == 0
    sh("cmp", str(raw), str(back))
    # e2fsck on the exported raw: the filesystem came through whole
    sh("e2fsck", "-fn", str(back))


def test_ve_start_draws_its_check_and_e2fsck_on_a_terminal(work: Path) -> None:
    """``ve start`` run on a real pty: the image check and e2fsck's passes are drawn; with
    stdout on a file, nothing is."""
    from tests.ptyrun import assert_drawn, assert_silent, run_on_terminal

    sd = str(work / "s")
    rc, shown, _ = run_on_terminal(["ve", "create", "imex1", "--size", "256M", "--state-dir", sd],
                                   stdout_tty=False)
    assert rc == 0
    try:
        # Grown while stopped: the start runs a full e2fsck (-fy) before resize2fs; a clean
        # filesystem's `e2fsck -p` runs no passes, so reports none.
        rc, _, piped = run_on_terminal(["image", "grow", str(work / "s" / "images" / "imex1"), "384M",
                                        "--state-dir", sd], stdout_tty=False)
        assert rc == 0, piped
        rc, shown, _ = run_on_terminal(["ve", "start", "imex1", "--state-dir", sd], stdout_tty=True)
        assert rc == 0, shown
        assert_drawn(shown, b"ve start check  ")
        assert_drawn(shown, b"ve start pass 1  ")
        assert b"VE imex1 running" in shown.rsplit(b"\x1b[K", 1)[1]
        assert run_on_terminal(["ve", "stop", "imex1", "--state-dir", sd], stdout_tty=False)[0] == 0
        rc, shown, piped = run_on_terminal(["ve", "start", "imex1", "--state-dir", sd], stdout_tty=False)
        assert rc == 0 and b"running" in piped
        assert_silent(shown, piped)
    finally:
        run_on_terminal(["ve", "destroy", "imex1", "--state-dir", sd], stdout_tty=False)


def test_import_from_a_block_device(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A block device answers SEEK_DATA with EINVAL: it is read whole (zeros still allocate
    nothing), not taken for a disk without data."""
    raw, _ = make_ext4(work)
    dev = sh("losetup", "-f", "--show", "-r", str(raw)).stdout.strip()
    try:
        image = str(work / "img")
        rc, out, err = cli(capsys, "image", "import", dev, image, "--state-dir", str(work / "s"))
        assert rc == 0, err
        assert f"{DISK // MiB}M of data extents read" in out
    finally:
        sh("losetup", "-d", dev)
    with Stack.open(image, writable=False) as s:
        assert s.allocated_clusters() == nonzero_clusters(raw)
    back = work / "back.raw"
    assert cli(capsys, "image", "export", image, str(back), "--state-dir", str(work / "s"))[0] == 0
    sh("cmp", str(raw), str(back))
