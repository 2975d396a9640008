"""Crash tests of a VE's whole data path: SIGKILL the exporter under a writing ext4.

Per iteration, a writer process fills files on the mounted VE, and only after a file's
``fsync`` (and its directory's) returned does it log the file's name and SHA-256 to a side
file on the host. The exporter is killed with SIGKILL at a random moment: during plain writes,
right after a snapshot request (freeze, new delta, thaw), or during a merge; or the offline
``fsnotifyd image compact`` process is killed mid-way. Afterwards:

- ``detach`` leaves nothing behind, ``image check --repair`` then ``image check`` is clean;
- ``e2fsck -fy`` repairs what the filesystem lost (unsynced writes) and ``e2fsck -fn`` is clean;
- every file the writer logged as fsynced reads back with its SHA-256.

Default: ``ITERATIONS`` (3) per kind. ``FSNOTIFYD_STRESS=1``: 50 per kind (or
``FSNOTIFYD_STRESS_ITERATIONS``). A failure names the kind, iteration and kill delay.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import kernel_missing

pytestmark = pytest.mark.kernel

STRESS = os.environ.get("FSNOTIFYD_STRESS") == "1"
ITERATIONS = int(os.environ.get("FSNOTIFYD_STRESS_ITERATIONS", "50")) if STRESS else 3

WRITER = r"""
import hashlib, os, random, sys
root, log = sys.argv[1], sys.argv[2]
rng = random.Random(int(sys.argv[3]))
logf = open(log, "a")
mine = []
def note(line):
    logf.write(line + "\n")
    logf.flush()
    os.fsync(logf.fileno())
i = 0
while True:
    i += 1
    # Keep the filesystem under half full: deletes make holes for trim and compact, and a
    # nearly full filesystem would turn writes short.
    st = os.statvfs(root)
    while mine and st.f_bavail < st.f_blocks * 0.5:
        victim = mine.pop(0)
        note("-" + victim)  # before the unlink: a kill between them must not look like a loss
        os.unlink(os.path.join(root, victim))
        st = os.statvfs(root)
    name = f"f{sys.argv[3]}-{i}"
    data = rng.randbytes(rng.choice([4096, 65536, 300000, 1 << 20, 2 << 20]))
    fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    view = memoryview(data)
    while view:  # a short write is not an error: write the rest
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    mine.append(name)
    note(f"{name} {hashlib.sha256(data).hexdigest()}")
"""


@pytest.fixture
def fuse(kernel):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")


def _synced(log: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.startswith("-"):
                files.pop(line[1:], None)
            elif " " in line:
                name, digest = line.split()
                files[name] = digest
    return files


class Rig:
    def __init__(self, tmp: Path) -> None:
        from fsnotifyd.image import ops

        self.tmp, self.image, self.run, self.mnt = tmp, str(tmp / "img"), str(tmp / "run"), tmp / "mnt"
        ops.create(self.image, 192 << 20)
        self.log = tmp / "synced.log"
        self.att = None

    def up(self) -> None:
        from fsnotifyd.image import attach

        self.att = attach.attach(self.image, run_dir=self.run)
        attach.mount(self.att, str(self.mnt))

    def down(self) -> None:
        from fsnotifyd.image import attach

        for a in attach.attached(self.run):
            attach.detach(a, run_dir=self.run)
        self.att = None

    def writer(self, seed: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", WRITER, str(self.mnt), str(self.log), str(seed)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def recover_and_verify(self, what: str) -> None:
        from fsnotifyd.image import attach
        from fsnotifyd.image.check import check

        self.down()
        check(self.image, repair=True)
        report = check(self.image)
        assert report.clean, f"{what}: image check not clean after repair: {report}"
        a = attach.attach(self.image, run_dir=self.run)
        try:
            r = subprocess.run(["e2fsck", "-fy", a.loop], capture_output=True, text=True)
            assert r.returncode < 4, f"{what}: e2fsck -fy could not repair ({r.returncode}): {r.stdout[-2000:]}"
            r = subprocess.run(["e2fsck", "-fn", a.loop], capture_output=True, text=True)
            assert r.returncode == 0, f"{what}: e2fsck -fn after repair: {r.stdout[-2000:]}"
        finally:
            attach.detach(a, run_dir=self.run)
        self.up()
        for name, digest in _synced(self.log).items():
            path = self.mnt / name
            assert path.exists(), f"{what}: fsynced file {name} lost"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{what}: fsynced file {name} differs"


@pytest.fixture
def rig(tmp_path, fuse):
    r = Rig(tmp_path)
    try:
        r.up()
        yield r
    finally:
        with contextlib.suppress(Exception):
            r.down()
        from fsnotifyd.image import attach

        for a in attach.attached(r.run):
            attach.detach(a, run_dir=r.run)
        assert str(tmp_path) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def _kill_exporter(rig: Rig) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(rig.att.pid, signal.SIGKILL)


def _stop_writer(w: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        w.kill()
    w.wait(30)


@pytest.mark.parametrize("kind", ["write", "snapshot", "merge", "compact"])
def test_sigkill_keeps_fsynced_data(rig, kind):
    from fsnotifyd.image import attach

    rng = random.Random(f"{kind}-crash")
    for it in range(ITERATIONS):
        delay = rng.uniform(0.05, 0.8)
        what = f"kind={kind} iteration={it} delay={delay:.3f}s"
        w = rig.writer(rng.randrange(1 << 30))
        try:
            time.sleep(0.3)  # some files synced before anything happens
            if kind == "write":
                time.sleep(delay)
                _kill_exporter(rig)
            elif kind == "snapshot":
                t = threading.Thread(target=_quietly, args=(attach.snapshot, rig.att), daemon=True)
                t.start()
                time.sleep(delay / 20)
                _kill_exporter(rig)
                t.join(30)
            elif kind == "merge":
                guid = attach.snapshot(rig.att)
                time.sleep(delay)
                t = threading.Thread(target=_quietly, args=(attach.merge, rig.att, guid), daemon=True)
                t.start()
                time.sleep(delay / 10)
                _kill_exporter(rig)
                t.join(30)
            else:  # compact: offline, so holes first (trim), then kill the compacting process
                time.sleep(delay)
                _stop_writer(w)
                subprocess.run(["fstrim", str(rig.mnt)], capture_output=True)
                rig.down()
                p = subprocess.Popen([sys.executable, "-m", "fsnotifyd.cli", "image", "compact", rig.image,
                                      "--state-dir", str(rig.tmp / "state")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(delay / 8)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(60)
        finally:
            _stop_writer(w)
        rig.recover_and_verify(what)


def _quietly(fn, *args) -> None:
    with contextlib.suppress(Exception):
        fn(*args)
