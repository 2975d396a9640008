"""``fsnotifyd image`` on detached images: no FUSE or loop device needed (mkfs works on a file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fsnotifyd.cli import main
from fsnotifyd.image.stack import Stack


def cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def image(tmp_path, capsys):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (e2fsprogs; scripts/bootstrap.sh installs it)")
    path = str(tmp_path / "img")
    rc, out, _ = cli(capsys, "image", "create", path, "--size", "256M", "--state-dir", str(tmp_path / "s"))
    assert rc == 0 and "256M image" in out
    return path


def test_create_makes_a_clean_ext4_of_the_asked_size(image, tmp_path):
    raw = tmp_path / "raw"
    with Stack.open(image, writable=False) as s:
        assert s.size == 256 << 20
        raw.write_bytes(s.read(0, s.size))
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.getsize(os.path.join(image, "root.hds")) < 64 << 20  # thin: mkfs's metadata only


def test_info_snapshot_list_merge(image, tmp_path, capsys):
    sd = str(tmp_path / "s")
    rc, out, _ = cli(capsys, "image", "info", image, "--json", "--state-dir", sd)
    info = json.loads(out)
    assert rc == 0 and info["size"] == 256 << 20 and len(info["deltas"]) == 1 and info["attached"] is None
    rc, out, _ = cli(capsys, "image", "snapshot", image, "--name", "before upgrade", "--state-dir", sd)
    guid = out.split()[0]
    assert rc == 0 and guid.startswith("{")
    rc, out, _ = cli(capsys, "image", "snapshots", image, "--json", "--state-dir", sd)
    [snap] = json.loads(out)
    assert snap["guid"] == guid and snap["name"] == "before upgrade"
    with Stack.open(image) as s:  # a write after the snapshot goes to the new top only
        s.write(0, b"new")
        s.flush()
    with Stack.open(image, writable=False, upto=guid) as s:
        assert s.read(0, 3) != b"new"
    rc, out, _ = cli(capsys, "image", "merge", image, guid, "--state-dir", sd)
    assert rc == 0
    rc, out, _ = cli(capsys, "image", "snapshots", image, "--json", "--state-dir", sd)
    assert json.loads(out) == []
    with Stack.open(image, writable=False) as s:
        assert s.read(0, 3) == b"new"


def test_compact_after_discards_cuts_the_file(image, tmp_path, capsys):
    with Stack.open(image) as s:
        for i in range(64):
            s.write((100 << 20) + i * (1 << 20), os.urandom(1 << 20))
        s.flush()
        s.discard(100 << 20, 63 << 20)  # all but the last: the file cannot shrink without a move
        s.flush()
        last = s.read((163 << 20), 1 << 20)
    before = os.path.getsize(os.path.join(image, "root.hds"))
    rc, out, _ = cli(capsys, "image", "compact", image, "--state-dir", str(tmp_path / "s"))
    after = os.path.getsize(os.path.join(image, "root.hds"))
    assert rc == 0 and "moved" in out
    assert before - after >= 0.95 * (63 << 20)
    with Stack.open(image, writable=False) as s:
        assert s.read(163 << 20, 1 << 20) == last


def test_errors_are_one_line_naming_the_file(tmp_path, capsys):
    rc, _, err = cli(capsys, "image", "info", str(tmp_path / "nope"), "--state-dir", str(tmp_path))
    assert rc == 1 and "DiskDescriptor.xml" in err and "Traceback" not in err
    # A bad size is a usage error (2, as argparse's own), caught before anything is made.
    with pytest.raises(SystemExit) as exited:
        main(["image", "create", str(tmp_path / "x"), "--size", "lots", "--state-dir", str(tmp_path)])
    assert exited.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
