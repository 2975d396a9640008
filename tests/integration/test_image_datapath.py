"""The image data path on a real kernel: exporter (FUSE) → loop device → ext4.

Every test makes its own small image under a temporary directory and takes down whatever it
attached, even when it fails (the ``images`` fixture detaches every attachment recorded in its
run directory); the module checks at the end that no FUSE mount, loop device or exporter
process of its own is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from fsnotifyd.image import attach as A
from fsnotifyd.image import ops
from tests.rigs.image import discards_settled
from tests.rigs.loop import run

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

PREFIX = f"fsnd-dp-{os.getpid()}-"  # this run only: other runs of this module may go on beside it
MiB = 1 << 20


def _check_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (Debian fuse3)"
    for tool in ("losetup", "e2fsck", "fsfreeze", "fstrim"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse3 unavailable: {e}"
    return None


def _ours() -> dict[str, list[str]]:
    """FUSE mounts, loop devices and exporters of this module (their paths carry PREFIX)."""
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if PREFIX in line]
    loops = [line for line in run("losetup", "-a", check=False).stdout.splitlines() if PREFIX in line]
    procs = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                cmd = Path(f"/proc/{n}/cmdline").read_bytes()
            except OSError:
                continue
            if A.EXPORTER_MODULE.encode() in cmd and PREFIX.encode() in cmd:
                procs.append(n)
    return {"mounts": mounts, "loops": loops, "exporters": procs}


@pytest.fixture(scope="module", autouse=True)
def nothing_left():
    yield
    left = _ours()
    assert left == {"mounts": [], "loops": [], "exporters": []}, left


@pytest.fixture
def images(kernel):
    reason = _check_fuse()
    if reason:
        from tests.conftest import kernel_missing

        kernel_missing(reason)
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
    kit = Kit(tmp)
    try:
        yield kit
    finally:
        kit.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


class Kit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = str(root / "run")
        self.procs: list[subprocess.Popen] = []

    def image(self, size: int = 128 * MiB, name: str = "img", **kw) -> str:
        path = str(self.root / name)
        kw.setdefault("mkfs_args", ("-b", "4096"))
        ops.create(path, size, **kw)
        return path

    def attach(self, image: str, **kw) -> A.Attached:
        return A.attach(image, run_dir=self.run_dir, **kw)

    def mount(self, att: A.Attached, name: str = "mnt", **kw) -> Path:
        mp = self.root / name
        A.mount(att, str(mp), **kw)
        return mp

    def detach(self, att: A.Attached) -> None:
        A.detach(att, run_dir=self.run_dir)
        assert not A.attached(self.run_dir) or att.name not in {a.name for a in A.attached(self.run_dir)}
        # nothing of this attachment is left
        assert A._loops_on(att.disk) == []
        assert A._fuse_mount(att.fuse_dir) is None
        assert A._exporters_for(att.control) == []

    def spawn(self, *argv: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for att in A.attached(self.run_dir):
            if att.pid and A._stopped(att.pid):
                os.kill(att.pid, signal.SIGCONT)
            try:
                A.detach(att, run_dir=self.run_dir, lazy=True)
            except Exception as e:  # keep going: the module check reports what is left
                print(f"cleanup: detach {att.name}: {e}", file=sys.stderr)


from tests.rigs.files import sha256_of as sha  # noqa: E402
from tests.rigs.files import write_synced as write_file  # noqa: E402


def fsck(loop: str, *, repair: bool = False) -> subprocess.CompletedProcess[str]:
    return run("e2fsck", "-fy" if repair else "-fn", loop, check=False)


def assert_clean(att: A.Attached) -> None:
    r = fsck(att.loop)
    assert r.returncode == 0, f"e2fsck -fn {att.loop}: rc={r.returncode}\n{r.stdout}{r.stderr}"


def physical_bytes(image: str) -> int:
    return sum(os.stat(os.path.join(image, n)).st_blocks * 512 for n in os.listdir(image) if ".hds" in n)


def dd_rate(argv: list[str]) -> float:
    """MB/s from dd's last line."""
    r = run(*argv)
    line = r.stderr.strip().splitlines()[-1]
    copied, secs = int(line.split()[0]), float(line.split(",")[-2].split()[0])
    return copied / secs / 1e6


# -- tests ---------------------------------------------------------------------------------------

def test_write_detach_reattach_same_data(images):
    img = images.image(256 * MiB)
    att = images.attach(img)
    try:
        assert A.status(att)["readonly"] is False
        assert os.stat(att.disk).st_size == 256 * MiB
        mp = images.mount(att)
        sums = {f"f{i}": write_file(mp / f"f{i}", size) for i, size in enumerate((4096, 3 * MiB + 17, 9 * MiB))}
        (mp / "dir").mkdir()
        sums["dir/g"] = write_file(mp / "dir" / "g", 1 * MiB)
        A.umount(att)
        assert_clean(att)
        st = A.status(att)
        assert st["errors"] == 0 and st["stats"]["commits"] > 0 and st["stats"]["allocated"] > 0
    finally:
        images.detach(att)
    assert A.attached(images.run_dir) == []

    att = images.attach(img)
    try:
        assert A.status(att)["was_in_use"] is False  # the clean exit cleared the in-use marker
        assert_clean(att)
        mp = images.mount(att)
        assert {name: sha(mp / name) for name in sums} == sums
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)


def test_throughput_dd_direct(images, capsys):
    """1 MiB direct sequential write and read, through ext4 and on the loop device itself."""
    img = images.image(384 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att)
        n = 192
        w = dd_rate(["dd", "if=/dev/zero", f"of={mp}/big", "bs=1M", f"count={n}", "oflag=direct", "conv=fsync"])
        r = dd_rate(["dd", f"if={mp}/big", "of=/dev/null", "bs=1M", "iflag=direct"])
        A.umount(att)
        # The loop device itself, past the filesystem's used blocks (ext4 is destroyed: scratch image).
        lw = dd_rate(["dd", "if=/dev/zero", f"of={att.loop}", "bs=1M", f"count={n}", "seek=128", "oflag=direct",
                      "conv=fsync"])
        lr = dd_rate(["dd", f"if={att.loop}", "of=/dev/null", "bs=1M", f"count={n}", "skip=128", "iflag=direct"])
    finally:
        images.detach(att)
    with capsys.disabled():
        print(f"\n[datapath] ext4 on loop(dio) on FUSE: write {w:.0f} MB/s, read {r:.0f} MB/s; "
              f"loop device: write {lw:.0f} MB/s, read {lr:.0f} MB/s")
    assert w > 20 and r > 20 and lw > 20 and lr > 20


def test_snapshot_view_then_merge(images):
    img = images.image()
    att = images.attach(img)
    try:
        mp = images.mount(att)
        old_a = write_file(mp / "a", 2 * MiB)
        guid = A.snapshot(att, name="before")  # frozen around it
        new_a = write_file(mp / "a", 2 * MiB)
        new_b = write_file(mp / "b", 3 * MiB)
        assert A.status(att)["deltas"] == 2

        view = images.attach(img, upto=guid)
        try:
            assert view.readonly and A.status(view)["readonly"] is True
            assert_clean(view)  # frozen when taken: consistent without a journal replay
            vmp = images.mount(view, "snap")
            assert sha(vmp / "a") == old_a
            assert not (vmp / "b").exists()
            with pytest.raises(OSError):
                (vmp / "c").write_bytes(b"x")
            A.umount(view)
        finally:
            images.detach(view)
        # The live one did not notice.
        assert sha(mp / "a") == new_a

        A.merge(att, guid)
        assert A.status(att)["deltas"] == 1
        assert sha(mp / "a") == new_a and sha(mp / "b") == new_b
        assert len([n for n in os.listdir(img) if ".hds" in n]) == 1
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)
    att = images.attach(img)
    try:
        mp = images.mount(att, readonly=True)
        assert sha(mp / "a") == new_a and sha(mp / "b") == new_b
    finally:
        images.detach(att)


def _df_bytes(mp: Path) -> int:
    st = os.statvfs(mp)
    return st.f_blocks * st.f_frsize


def test_grow_online(images):
    img = images.image(128 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att)
        keep = write_file(mp / "k", 1 * MiB)
        before = _df_bytes(mp)
        if A.has_cap_sys_resource():
            assert A.grow(att, 256 * MiB) == 256 * MiB
        else:
            # This host (a container without CAP_SYS_RESOURCE) refuses EXT4_IOC_RESIZE_FS: grow
            # the disk online, then the filesystem offline.
            with pytest.raises(Exception, match="CAP_SYS_RESOURCE"):
                A.grow(att, 256 * MiB)
            assert A.grow(att, 256 * MiB, resize_fs=False) == 256 * MiB
            assert int(run("blockdev", "--getsize64", att.loop).stdout) == 256 * MiB
            write_file(mp / "during", 1 * MiB)  # the fs keeps working on the grown device
            A.umount(att)
            assert_clean(att)
            assert fsck(att.loop, repair=True).returncode == 0  # resize2fs wants a fresh forced check
            r = run("resize2fs", att.loop, check=False)
            assert r.returncode == 0, r.stderr
            mp = images.mount(att)
        assert int(run("blockdev", "--getsize64", att.loop).stdout) == 256 * MiB
        assert os.stat(att.disk).st_size == 256 * MiB
        assert _df_bytes(mp) > before + 100 * MiB
        big = write_file(mp / "big", 150 * MiB)  # would not fit before
        assert sha(mp / "k") == keep and sha(mp / "big") == big
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)
    att = images.attach(img)
    try:
        assert A.status(att)["size"] == 256 * MiB
    finally:
        images.detach(att)


def test_fstrim_frees_clusters(images):
    img = images.image(128 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att)
        base = physical_bytes(img)
        write_file(mp / "junk", 48 * MiB)
        full = physical_bytes(img)
        assert full >= base + 48 * MiB
        (mp / "junk").unlink()
        os.sync()
        run("fstrim", str(mp))
        trimmed = physical_bytes(img)
        st = A.status(att)
        assert st["stats"]["discarded"] >= 40, st
        assert trimmed <= full - 40 * MiB, (base, full, trimmed)
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)


def _top_delta(image: str) -> str:
    from fsnotifyd.image import descriptor as dd

    desc = dd.load(os.path.join(image, dd.NAME))
    return os.path.join(image, desc.by_guid(desc.top).file)


def _trim(att: A.Attached, mp: Path) -> None:
    run("sync", "-f", str(mp))  # blocks freed in the open journal transaction are not trimmed
    run("fstrim", str(mp))
    A.control(att, {"op": "flush"})


def test_discards_over_a_snapshot_leave_the_top_delta_empty(images):
    """Issue 16's defect: a discard over clusters whose older data a snapshot holds left them
    mapped in the top (punched), and compaction copied them back as zeros (75-257 MiB kept)."""
    img = images.image(512 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att)
        write_file(mp / "first", 64 * MiB)
        A.snapshot(att)
        top = _top_delta(img)
        (mp / "first").unlink()
        _trim(att, mp)
        write_file(mp / "second", 64 * MiB)  # ext4 reuses the blocks the first file had
        (mp / "second").unlink()
        _trim(att, mp)
        held = os.stat(top).st_blocks * 512
        assert held <= 4 * MiB, f"the top delta holds {held / MiB:.1f} MiB after two deletes and trims"
        A.compact(att)
        held = os.stat(top).st_blocks * 512
        assert held <= 4 * MiB, f"the top delta holds {held / MiB:.1f} MiB after compaction"
        # In such a VE, data written after the snapshot is given back whole by a delete + trim.
        write_file(mp / "third", 200 * MiB)
        A.control(att, {"op": "flush"})
        full = physical_bytes(img)
        (mp / "third").unlink()
        _trim(att, mp)
        back = full - physical_bytes(img)
        assert back >= 196 * MiB, f"deleting and trimming 200 MiB gave back {back / MiB:.0f} MiB"
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)


def test_piecemeal_discards_free_whole_clusters(images):
    """Online discard sends a discard per freed extent: small files deleted one by one free
    their clusters once all of each is discarded (the image used to free only clusters one
    discard covered whole)."""
    img = images.image(256 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att, options=("discard",))
        d = mp / "small"
        d.mkdir()
        for i in range(2000):  # 64 MiB of 32 KiB files: many per 1 MiB cluster
            (d / f"f{i}").write_bytes(os.urandom(32 << 10))
        run("sync", "-f", str(mp))
        A.control(att, {"op": "flush"})
        full = physical_bytes(img)
        for first in (0, 1):  # every other file, committed, then the rest: no discard covers a cluster
            for i in range(first, 2000, 2):
                (d / f"f{i}").unlink()
            run("sync", "-f", str(mp))
        discards_settled(att)
        back = full - physical_bytes(img)
        assert back >= 60 * MiB, f"deleting 64 MiB of small files gave back {back / MiB:.1f} MiB"
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)


def test_lazy_inode_table_init_costs_no_clusters(images):
    """A new 8 GiB ext4 left to zero its inode tables itself (mkfs lazy_itable_init=1, as the
    default profile on a disk without discard) allocates no cluster for its 128 MiB of tables.
    On this kernel the loop device passes the zeroing on as write-zeroes requests (the exporter
    sees fallocate ZERO_RANGE/PUNCH_HOLE, discards); a disk without them gets written zeros, which
    zero detection drops (test_zero_writes_cost_no_clusters)."""
    import re

    img = images.image(8 << 30, profile="default", mkfs_args=("-b", "4096", "-E", "lazy_itable_init=1,nodiscard"))
    att = images.attach(img)
    try:
        created = physical_bytes(img)
        mp = images.mount(att, options=("init_itable=0",))  # no pause between groups
        deadline = time.monotonic() + 300
        while True:
            run("sync", "-f", str(mp))
            groups = re.findall(r"^Group \d+:.*$", run("dumpe2fs", att.loop).stdout, re.M)
            zeroed = sum("ITABLE_ZEROED" in g for g in groups)
            if groups and zeroed == len(groups):
                break
            assert time.monotonic() < deadline, f"lazy init zeroed {zeroed} of {len(groups)} groups in 300 s"
            time.sleep(0.5)
        A.control(att, {"op": "flush"})
        st = A.status(att)["stats"]
        grown = physical_bytes(img) - created
        assert grown <= 2 * MiB, f"lazy init of {len(groups)} groups cost {grown / MiB:.1f} MiB ({st})"
        assert st["allocated"] <= 2, st
        A.umount(att)
        assert_clean(att)
    finally:
        images.detach(att)


def test_zero_writes_cost_no_clusters(images):
    """A guest writing zeros (dd if=/dev/zero, a filesystem zeroing its tables) allocates
    nothing, and zeros over data free its clusters (qemu's detect-zeroes=unmap)."""
    img = images.image(256 * MiB)
    att = images.attach(img)
    try:
        base = physical_bytes(img)
        run("dd", "if=/dev/zero", f"of={att.loop}", "bs=1M", "seek=100", "count=100", "oflag=direct")
        A.control(att, {"op": "flush"})
        assert physical_bytes(img) - base <= 1 * MiB
        run("dd", "if=/dev/urandom", f"of={att.loop}", "bs=1M", "seek=100", "count=50", "oflag=direct")
        A.control(att, {"op": "flush"})
        assert physical_bytes(img) - base >= 48 * MiB  # a cluster or two there held metadata already
        run("dd", "if=/dev/zero", f"of={att.loop}", "bs=64K", "seek=1600", "count=800", "oflag=direct")
        A.control(att, {"op": "flush"})
        st = A.status(att)
        assert physical_bytes(img) - base <= 1 * MiB, st
        assert st["stats"]["zero_writes"] >= 100, st
        assert run("cmp", "-n", str(100 * MiB), "-i", f"{100 * MiB}:0", att.loop, "/dev/zero",
                   check=False).returncode == 0
    finally:
        images.detach(att)


def test_fsmap_accounts_for_every_block(images):
    """GETFSMAP (with the gaps the kernel leaves filled) covers the whole filesystem: free plus
    in use is its block count, and a file's blocks are all in use. On 6.18 the raw answer left
    out the in-use tail of a block group: a 200 MiB file here lost 120 MiB of it."""
    from fsnotifyd.image import fsmap, thinness

    img = images.image(512 * MiB)
    att = images.attach(img)
    try:
        mp = images.mount(att)
        write_file(mp / "a", 200 * MiB)
        thinness.syncfs(str(mp))
        extents = fsmap.read(str(mp))
        st = os.statvfs(mp)
        free = sum(e.length for e in extents if e.free)
        assert free == st.f_bfree * st.f_frsize
        assert extents[0].physical == 0 and extents[-1].end == 512 * MiB
        assert all(a.end == b.physical for a, b in pairwise(extents))
        ranges = thinness.in_use(extents)
        assert sum(e - s for s, e in ranges) >= 200 * MiB
        A.umount(att)
    finally:
        images.detach(att)


def test_live_readonly_switch(images):
    img = images.image()
    att = images.attach(img)
    try:
        mp = images.mount(att)
        kept = write_file(mp / "kept", 1 * MiB)
        # Clean switch: the filesystem is remounted read-only, then the exporter fences writes.
        A.set_readonly(att, True)
        assert A.status(att)["readonly"] is True
        with pytest.raises(OSError) as e:
            write_file(mp / "x", 4096)
        assert e.value.errno == 30  # EROFS
        A.set_readonly(att, False)
        later = write_file(mp / "later", 1 * MiB)

        # Fence only (no remount): the device refuses writes, the filesystem sees I/O errors.
        A.set_readonly(att, True, remount=False)
        with pytest.raises(OSError) as e:
            write_file(mp / "y", 1 * MiB)
        assert e.value.errno in (5, 30), e.value  # EIO, or EROFS once ext4 aborted its journal
        assert A.status(att)["errors"] == 0  # refused writes are not I/O errors of the image
        A.set_readonly(att, False, remount=False)
        A.umount(att)
        fsck(att.loop, repair=True)
        assert_clean(att)
        mp = images.mount(att)
        assert sha(mp / "kept") == kept and sha(mp / "later") == later
        write_file(mp / "again", 4096)
    finally:
        images.detach(att)


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
buf = os.urandom(1 << 20)
print("started", flush=True)
try:
    for i in range(100000):
        os.pwrite(fd, buf, (i % 64) << 20)
        os.fsync(fd)
except OSError as e:
    print("error", e.errno, flush=True)
    sys.exit(3)
"""


def _start_writer(images: Kit, path: Path) -> subprocess.Popen:
    p = images.spawn(sys.executable, "-c", WRITER, str(path))
    assert p.stdout is not None and p.stdout.readline().strip() == "started"
    time.sleep(0.3)
    assert p.poll() is None
    return p


def _reattach_repair_check(images: Kit, img: str, sums: dict[str, str], *, dirty: bool) -> None:
    att = images.attach(img)
    try:
        # Killed: the image stays marked in use. Stopped then aborted: it exits cleanly on SIGCONT.
        assert A.status(att)["was_in_use"] is dirty
        fsck(att.loop, repair=True)
        assert_clean(att)
        mp = images.mount(att)
        assert {n: sha(mp / n) for n in sums} == sums
    finally:
        images.detach(att)


def test_exporter_killed_while_writing(images):
    img = images.image()
    att = images.attach(img)
    mp = images.mount(att)
    sums = {"safe": write_file(mp / "safe", 2 * MiB)}
    writer = _start_writer(images, mp / "w")
    os.kill(att.pid, signal.SIGKILL)
    out, _ = writer.communicate(timeout=20)
    assert writer.returncode == 3 and "error" in out, out  # the VE saw I/O errors, did not hang
    with pytest.raises(OSError):
        write_file(mp / "after", 4096)
    # detach from the record alone, as after a crash of the caller too
    images.detach(A.attached(images.run_dir)[0])
    assert A.attached(images.run_dir) == []
    _reattach_repair_check(images, img, sums, dirty=True)


DELETER = """
import os, sys
d = sys.argv[1]
print("started", flush=True)
try:
    for i, name in enumerate(sorted(os.listdir(d))):
        os.unlink(os.path.join(d, name))
        if i % 8 == 7:
            os.sync()  # a journal commit: its freed blocks are discarded, a request per extent
except OSError as e:
    print("error", e, flush=True)
    sys.exit(3)
"""


def test_exporter_killed_during_online_discards(images, capsys):
    """SIGKILL of the exporter while online discards of a deleting VE arrive piece by piece
    (2 kills; 20 with FSNOTIFYD_STRESS=1): the image repairs clean, the filesystem too, the
    files kept read back."""
    import random

    from fsnotifyd.image.check import check

    kills = 20 if os.environ.get("FSNOTIFYD_STRESS") == "1" else 2
    rng = random.Random()
    img = images.image(256 * MiB)
    sums: dict[str, str] = {}
    found: dict[str, int] = {}
    for k in range(kills):
        att = images.attach(img)
        mp = images.mount(att, options=("discard",))
        doomed = mp / f"doomed{k}"
        doomed.mkdir()
        for i in range(300):
            if i % 30 == 0:  # files kept, among those deleted
                sums[f"kept{k}.{i}"] = write_file(mp / f"kept{k}.{i}", rng.randrange(1, 64) * 4096)
            (doomed / f"f{i:03d}").write_bytes(os.urandom(rng.randrange(1, 48) * 4096))
        run("sync", "-f", str(mp))
        deleter = images.spawn(sys.executable, "-c", DELETER, str(doomed))
        assert deleter.stdout is not None and deleter.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(att.pid, signal.SIGKILL)
        deleter.communicate(timeout=30)  # done, or stopped by the I/O errors: it must not hang
        images.detach(A.attached(images.run_dir)[0])
        first = check(img)
        for p in first.problems:
            found[p.field or "file"] = found.get(p.field or "file", 0) + 1
        repaired = check(img, repair=True)
        assert all(p.repaired for p in repaired.problems), str(repaired)
        assert check(img).clean, str(check(img))
        att = images.attach(img)
        try:
            fsck(att.loop, repair=True)
            assert_clean(att)
            mp = images.mount(att)
            assert {n: sha(mp / n) for n in sums} == sums, f"kill {k}"
        finally:
            images.detach(att)
    with capsys.disabled():
        print(f"\n  exporter killed during online discards: {kills} kills; check found {found}")


def test_exporter_stopped_watchdog_aborts(images):
    img = images.image()
    att = images.attach(img)
    mp = images.mount(att)
    sums = {"safe": write_file(mp / "safe", 2 * MiB)}
    assert A.watchdog_check(att, timeout=2.0) is True
    writer = _start_writer(images, mp / "w")
    os.kill(att.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        assert writer.poll() is None  # blocked (D state) behind the stopped exporter
        stop, fired = threading.Event(), threading.Event()
        t = threading.Thread(target=A.run_watchdog, args=(images.run_dir, 0.2, stop),
                             kwargs={"timeout": 1.0, "on_abort": lambda a: fired.set()}, daemon=True)
        t.start()
        try:
            assert fired.wait(10), "watchdog did not abort the connection"
            out, _ = writer.communicate(timeout=20)
        finally:
            stop.set()
            t.join(10)
        assert writer.returncode == 3 and "error" in out, out
    finally:
        os.kill(att.pid, signal.SIGCONT)
    images.detach(att)
    _reattach_repair_check(images, img, sums, dirty=False)


def test_host_full_is_an_io_error_counted_in_status(images):
    """The image's own file system fills up: the stack fails, the VE sees an I/O error, the
    exporter stays up and counts it."""
    from tests.rigs.loop import loop_ext4

    host_dir = images.root / "host"
    host_dir.mkdir()
    with loop_ext4(48, workdir=host_dir) as host:
        assert host.mountpoint is not None
        img = str(host.mountpoint / "img")
        ops.create(img, 128 * MiB, mkfs_args=("-b", "4096"))
        att = images.attach(img)
        try:
            mp = images.mount(att)
            kept = write_file(mp / "kept", 1 * MiB)
            with pytest.raises(OSError):
                write_file(mp / "big", 64 * MiB)
            st = A.status(att)
            assert st["errors"] > 0 and "No space left" in st["last_error"], st
            assert A.watchdog_check(att, timeout=2.0) is True  # still serving
            A.umount(att)
            (host.mountpoint / "img" / "DiskDescriptor.xml").stat()
        finally:
            images.detach(att)
        # room again (the VE's file is in the image, the image's file system is full): the
        # image still opens and the fsynced file is intact after a repair.
        att = images.attach(img)
        try:
            fsck(att.loop, repair=True)
            mp = images.mount(att, readonly=True)
            assert sha(mp / "kept") == kept
        finally:
            images.detach(att)


def test_detach_of_a_stopped_exporter_does_not_hang(images):
    img = images.image(64 * MiB)
    att = images.attach(img)
    mp = images.mount(att)
    sums = {"safe": write_file(mp / "safe", 1 * MiB)}
    (mp / "dirty").write_bytes(b"x" * 8192)  # not synced: umount must write through the exporter
    os.kill(att.pid, signal.SIGSTOP)
    while not A._stopped(att.pid):  # kill() returns before the threads stop
        time.sleep(0.01)
    t0 = time.monotonic()
    images.detach(att)  # aborts the stopped exporter's connection first: umount does not block
    assert time.monotonic() - t0 < 30
    _reattach_repair_check(images, img, sums, dirty=False)  # SIGTERM + SIGCONT: a clean exit


def test_detach_is_idempotent_and_attach_refuses_twice(images):
    img = images.image(64 * MiB, fs=None)
    att = images.attach(img, readonly=True)
    try:
        with pytest.raises(Exception, match="already attached"):
            images.attach(img)
        r = A.control(att, {"op": "snapshot", "name": None})
        assert r["ok"] is False and "read-only" in r["error"]
        assert A.control(att, {"op": "nope"})["ok"] is False
    finally:
        images.detach(att)
    images.detach(att)  # again: nothing to do
    A.detach(img, run_dir=images.run_dir)
