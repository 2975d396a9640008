"""Every corrupted image of e2fsprogs' test suite, mounted and exercised while the daemon runs.

The manifest (../shared/fixtures/e2fsprogs/manifest.json) lists the ext4 error functions the
kernel reports per phase; the daemon must report each of them (and fs.mount_failed for refused
mounts), and nothing at all for the clean controls. Rate limits are left at their defaults: the
daemon must not depend on them being lifted.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.rigs.loop import LoopFs, loop_device

from ..conftest import FIXTURES

pytestmark = pytest.mark.kernel


def _cases():
    path = FIXTURES / "manifest.json"
    if not path.exists():
        return [pytest.param(None, id="fixtures-missing")]
    return [pytest.param(c, id=c["case"]) for c in json.loads(path.read_text())["cases"]]


def traverse(root: Path) -> None:
    """lstat every entry, readlink every symlink, listdir every directory, read every file."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if os.path.islink(p):
                    os.readlink(p)
                elif os.path.isfile(p):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
                del st
            except OSError:
                pass


def write_phase(root: Path) -> None:
    p = root / "fsnotifyd-probe"
    try:
        with open(p, "wb") as f:
            f.write(b"x" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(p)
        os.sync()
        with open(p, "wb") as f:
            f.write(b"y" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


@pytest.mark.parametrize("case", _cases())
def test_fixture_errors_are_reported(case, daemon, workdir, e2fsprogs_fixtures):
    """The daemon reports the manifest's kernel error functions per phase, nothing for controls."""
    tmp = Path(tempfile.mkdtemp(dir=workdir, prefix=case["case"] + "-"))
    img = tmp / "image"
    with gzip.open(e2fsprogs_fixtures / case["file"], "rb") as src, open(img, "wb") as dst:
        shutil.copyfileobj(src, dst)
    stream = daemon.stream(["fs.*"])
    seen: dict[str, set[str]] = {}
    try:
        with loop_device(img) as dev:
            fs = LoopFs(image=img, loop=dev)
            mine = lambda e: e["device"] and e["device"]["name"] == fs.name  # noqa: E731
            try:
                start = len(stream.events)
                res = fs.mount("errors=continue", target=tmp / "mnt")
                phases = [("mount", None)]
                if res.returncode == 0:
                    phases += [("traversal", traverse), ("write", write_phase)]
                for phase, action in phases:
                    if action is not None:
                        start = len(stream.events)
                        action(fs.mountpoint)
                    stream.settle(quiet=0.7)
                    seen[phase] = {e["kernel"]["function"] for e in stream.events[start:]
                                   if mine(e) and e["kind"] == "fs.error"} - {None}
                if case["goes_emergency_ro"]:
                    assert stream.wait_for(lambda e: mine(e) and e["kind"] == "fs.readonly"), \
                        "expected fs.readonly for an image whose journal aborts"
            finally:
                fs.umount()
        stream.settle(quiet=0.5)
    finally:
        stream.close()
    events = [e for e in stream.events if e["device"] and e["device"]["name"] == os.path.basename(dev)]
    expected = case["kernel_error_functions"]
    if not expected:
        assert [e for e in events if e["kind"] in ("fs.error", "fs.mount_failed", "fs.readonly")] == []
        return
    if case["mounts"] == "refused":
        assert any(e["kind"] == "fs.mount_failed" for e in events), events
    # A function listed for a phase must be reported by the end of that phase. Earlier is
    # allowed: ext4 prefetches block bitmaps in the background after mount, so f_dup's
    # ext4_validate_block_bitmap fires during traversal on some runs and during write on others.
    so_far: set[str] = set()
    for phase in ("mount", "traversal", "write"):
        so_far |= seen.get(phase, set())
        missing = set(expected.get(phase, [])) - so_far
        assert not missing, f"phase {phase}: not reported {missing}; saw per phase {seen}"
