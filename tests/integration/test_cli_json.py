"""--json and exit codes, verb by verb, on real images, loop devices, ext4 and a real daemon.

Every result-printing verb: its --json output parsed, and per family the three exit codes
(0 ok, 1 failed, 2 usage/config). Everything attached or mounted is taken down in a finally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kernel_missing

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]


def fsnd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsnotifyd", *argv], capture_output=True, text=True, timeout=300)


def ok_json(*argv: str) -> Any:
    r = fsnd(*argv, "--json")
    assert r.returncode == 0, f"{argv} exited {r.returncode}: {r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)  # stdout is the JSON document and nothing else


def failed_json(code: int, *argv: str) -> dict[str, Any]:
    r = fsnd(*argv, "--json")
    assert r.returncode == code, f"{argv}: expected {code}, got {r.returncode}: {r.stdout}\n{r.stderr}"
    out = json.loads(r.stdout)
    assert out["ok"] is False and r.stderr.startswith("fsnotifyd: "), (out, r.stderr)
    return out


def usage(*argv: str) -> str:
    r = fsnd(*argv)
    assert r.returncode == 2 and r.stdout == "", (argv, r.returncode, r.stdout, r.stderr)
    return r.stderr


@pytest.fixture
def sd(kernel, tmp_path: Path):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    from fsnotifyd.image import attach
    from fsnotifyd.ve.registry import Registry

    state = tmp_path / "state"
    try:
        yield state
    finally:
        for rec in Registry(str(state)).all() if state.exists() else []:
            fsnd("ve", "stop", rec.id, "--state-dir", str(state))
        for a in attach.attached(str(state / "run")) if state.exists() else []:
            attach.detach(a, run_dir=str(state / "run"))
        leftovers = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(state) not in leftovers, leftovers
        assert str(state) not in Path("/proc/self/mountinfo").read_text()


def test_image_verbs(sd: Path, tmp_path: Path) -> None:
    s = ("--state-dir", str(sd))
    img, mnt, snap_mnt = str(tmp_path / "img"), tmp_path / "mnt", tmp_path / "snap"
    mnt.mkdir()
    snap_mnt.mkdir()
    created = ok_json("image", "create", img, "--size", "256M", *s)
    assert created["size"] == 256 << 20 and created["fs"] == "ext4"
    attached = ok_json("image", "attach", img, *s)
    assert attached["loop"].startswith("/dev/loop") and attached["mountpoint"] is None
    mounted = ok_json("image", "mount", img, str(mnt), *s)
    assert mounted["mountpoint"] == str(mnt) and os.path.ismount(mnt)
    (mnt / "f").write_bytes(b"x" * (1 << 20))
    snap = ok_json("image", "snapshot", img, "--name", "one", *s)
    assert snap["online"] is True and snap["guid"].startswith("{")
    [listed] = ok_json("image", "snapshots", img, *s)
    assert listed["guid"] == snap["guid"]
    view = ok_json("image", "mount-snapshot", img, snap["guid"], str(snap_mnt), *s)
    assert view["readonly"] is True and (snap_mnt / "f").stat().st_size == 1 << 20
    down = ok_json("image", "umount-snapshot", img, snap["guid"], *s)
    assert down["detached"] is True and not os.path.ismount(snap_mnt)
    info = ok_json("image", "info", img, *s)
    assert info["attached"]["loop"] == attached["loop"] and len(info["deltas"]) == 2
    grown = ok_json("image", "grow", img, "512M", *s)
    assert grown["online"] is True and grown["size"] == 512 << 20
    balloon = ok_json("image", "shrink", img, "--online", "64M", *s)
    assert balloon["mode"] == "balloon" and balloon["balloon"] == 64 << 20
    assert ok_json("image", "shrink", img, "--online", "0", *s)["balloon"] == 0
    merged = ok_json("image", "merge", img, snap["guid"], *s)
    assert merged["merged"] is True and merged["online"] is True
    compact = ok_json("image", "compact", img, *s)
    assert compact["online"] is True and compact["moved"] >= 0
    assert ok_json("image", "umount", img, *s)["mountpoint"] is None and not os.path.ismount(mnt)
    # failed (1): the image is attached, a repair needs it detached
    assert "repair needs the image detached" in failed_json(1, "image", "check", img, "--repair", *s)["error"]
    [gone] = ok_json("image", "detach", img, *s)["detached"]
    assert gone["loop"] == attached["loop"]
    assert ok_json("image", "detach", img, *s)["detached"] == []
    shrunk = ok_json("image", "shrink", img, *s)  # offline: resize2fs to its minimum, cut, compact
    assert shrunk["mode"] == "offline" and shrunk["size"] < 512 << 20
    checked = ok_json("image", "check", img, *s)
    assert checked["ok"] and checked["clean"] and checked["problems"] == []
    # failed (1): a check that finds problems, and an image that is not there
    os.unlink(os.path.join(img, "DiskDescriptor.xml"))
    bad = fsnd("image", "check", img, "--json", *s)
    assert bad.returncode == 1 and json.loads(bad.stdout)["problems"][0]["file"].endswith("DiskDescriptor.xml")
    assert "DiskDescriptor.xml" in failed_json(1, "image", "info", str(tmp_path / "nope"), *s)["error"]
    # usage (2): a bad size, a bad budget, a bad config, a missing verb
    assert "not a size" in usage("image", "grow", img, "lots", *s)
    assert "must be positive" in usage("image", "repack", img, "--budget-mib-s", "0", *s)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("state_dri: /x\n")
    assert "config error" in failed_json(2, "image", "info", img, "--config", str(bad_cfg))["error"]
    assert "required" in usage("image")


def test_ve_verbs(sd: Path, tmp_path: Path) -> None:
    s = ("--state-dir", str(sd))
    created = ok_json("ve", "create", "301", "--size", "256M", "--label", "tier=gold", *s)
    assert created["id"] == "301" and created["running"] is False and created["labels"] == {"tier": "gold"}
    started = ok_json("ve", "start", "301", *s)
    assert started["running"] is True and os.path.ismount(started["mountpoint"])
    shown = ok_json("ve", "show", "301", *s)
    assert shown["ve"]["id"] == "301" and shown["attached"]["loop"] == started["loop"] and shown["deltas"]
    [listed] = ok_json("ve", "list", *s)
    assert listed["id"] == "301" and listed["running"]
    assert ok_json("ve", "set", "301", "--discard", "off", *s)["discard"] is False
    repacked = ok_json("ve", "repack", "301", "--dry-run", *s)
    assert repacked["dry_run"] is True
    # failed (1): releasing a VE that is not isolated; a VE that does not exist
    assert failed_json(1, "ve", "release", "301", *s)["error"]
    assert "999" in failed_json(1, "ve", "show", "999", *s)["error"]
    # usage (2): a label that is not KEY=VALUE, an offline ve shrink, a bad size
    assert "expected KEY=VALUE" in failed_json(2, "ve", "create", "302", "--size", "64M", "--label", "x", *s)["error"]
    assert "online only" in failed_json(2, "ve", "shrink", "301", "--to", "128M", *s)["error"]
    assert "not a size" in usage("ve", "create", "303", "--size", "big", *s)
    assert ok_json("ve", "stop", "301", *s) == {"id": "301", "running": False}
    assert ok_json("ve", "destroy", "301", *s)["destroyed"] is True
    assert ok_json("ve", "list", *s) == []


def test_rules_config_and_bpf_verbs(daemon, tmp_path: Path, bpf_ready) -> None:
    rules = str(REPO / "rules/default.yaml")
    checked = ok_json("rules", "check", rules)
    assert checked == {"ok": True, "files": [rules], "errors": []}
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    match: {kind: fs.error}\n    actions: [{explode: {}}]\n")
    r = fsnd("rules", "check", str(bad), "--json")
    assert r.returncode == 1
    [err] = json.loads(r.stdout)["errors"]
    assert (err["file"], err["line"]) == (str(bad), 5) and "explode" in err["message"], err
    # rules test: --json is --format json (JSON lines, one decision each)
    log = tmp_path / "k.log"
    log.write_text("[  100.000000] EXT4-fs error (device loop9): ext4_lookup:1855: inode #2: comm ls: bad\n")
    r = fsnd("rules", "test", rules, "--events", str(log), "--json", "--boot-time", "1700000000")
    assert r.returncode == 0, r.stderr
    decisions = [json.loads(line) for line in r.stdout.splitlines()]
    assert decisions and all("rule" in d and "outcome" in d for d in decisions)
    expect = tmp_path / "expect.jsonl"
    expect.write_text("")
    assert fsnd("rules", "test", rules, "--events", str(log), "--expect", str(expect)).returncode == 1
    assert fsnd("rules", "test", str(bad), "--events", str(log)).returncode == 2  # rules not valid
    assert fsnd("rules", "test", rules, "--events", str(tmp_path / "none.log")).returncode == 2
    # rules reload against the running daemon: 0 reloaded; 2 not asked (no daemon there)
    reloaded = ok_json("rules", "reload", "--socket", daemon.socket)
    assert reloaded["ok"] and reloaded["rules"] >= 1
    assert failed_json(2, "rules", "reload", "--socket", str(tmp_path / "none.sock"))["asked"] is False
    # status: 0, and 1 with {"ok": false} when no daemon answers
    assert ok_json("status", "--socket", daemon.socket)["version"]
    assert "cannot reach" in failed_json(1, "status", "--socket", str(tmp_path / "none.sock"))["error"]
    # config check: 0; 2 with file, line and field
    assert ok_json("config", "check", "--config", str(daemon.config))["ok"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metrics:\n  prot: 1\n")
    [cerr] = failed_json(2, "config", "check", "--config", str(cfg))["errors"]
    assert (cerr["file"], cerr["line"], cerr["field"]) == (str(cfg), 2, "metrics.prot")
    assert "config check" in failed_json(2, "config", "show")["error"]  # --json is for config check
    # bpf check: every program loads here (bpf_ready)
    programs = ok_json("bpf", "check")["programs"]
    assert set(programs) == {"ext4_error", "space", "alloc"} and all(p["ok"] for p in programs.values())
    assert "invalid choice" in usage("bpf", "nonsense")


def test_refusals_by_the_host_are_one_line_not_a_traceback(kernel) -> None:
    """As nobody: an image verb the filesystem refuses fails (1); an --out it cannot open is a
    usage error (2), not "cannot reach the daemon"."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    tmp_path = Path(tempfile.mkdtemp(prefix="fsnd-nobody-", dir="/tmp"))  # pytest's basetemp is 0700
    tmp_path.chmod(0o755)
    (tmp_path / "ro").mkdir(mode=0o755)
    try:
        _as_nobody(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _as_nobody(tmp_path: Path) -> None:
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
              "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "fsnotifyd"]
    r = subprocess.run([*nobody, "image", "create", str(tmp_path / "ro/img"), "--size", "64M", "--state-dir",
                        str(tmp_path / "ro/s"), "--json"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout) == {"ok": False, "error": f"{tmp_path / 'ro/img'}: Permission denied"}
    r = subprocess.run([*nobody, "record", "--out", str(tmp_path / "ro/x.jsonl"), "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, f"fsnotifyd: {tmp_path / 'ro/x.jsonl'}: Permission denied\n")
