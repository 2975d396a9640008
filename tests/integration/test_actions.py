"""Actions on real VEs: images on FUSE + loop + ext4, real cgroups, real programs.

The executor runs the real handlers on decisions shaped like the rules engine's: snapshots
with retention, isolation read-only and release, a corruption made with debugfs found by a
check of a snapshot while the VE runs and repaired offline (the pre-repair snapshot keeps the
corrupted state), cgroup freeze (v1 freezer and v2), exec. Everything a test attaches, mounts,
creates or starts is taken down in a finally, also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import kernel_missing

pytestmark = pytest.mark.kernel
MiB = 1 << 20


@pytest.fixture
def state(tmp_path, kernel):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    for tool in ("debugfs", "e2fsck", "mkfs.ext4"):
        if shutil.which(tool) is None:
            kernel_missing(f"{tool} not installed (e2fsprogs)")
    sd = tmp_path / "state"
    sd.mkdir()
    yield sd
    from fsnotifyd.image import attach
    from fsnotifyd.ve import lifecycle
    from fsnotifyd.ve.registry import Registry

    for rec in Registry(str(sd)).all():
        with contextlib.suppress(Exception):
            subprocess.run(["mount", "-o", "remount,rw", rec.mountpoint], capture_output=True)
            lifecycle.stop(str(sd), rec.id)
    for a in attach.attached(str(sd / "run")):
        attach.detach(a, run_dir=str(sd / "run"))
    leftovers = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(sd) not in leftovers, leftovers
    assert str(sd) not in Path("/proc/self/mountinfo").read_text()


def run_actions(state_dir, decisions, ves=(), **kw):
    """Run the decisions through an executor with the real handlers; returns the events."""
    from fsnotifyd.actions.executor import Executor
    from fsnotifyd.actions.handlers import handlers
    from fsnotifyd.actions.journal import JobJournal
    from fsnotifyd.actions.target import Targets

    events = []

    async def main():
        journal = JobJournal(os.path.join(state_dir, "actions", "journal.jsonl"))
        ex = Executor(journal, handlers(Targets(str(state_dir), ves)), events.append, **kw)
        for d in decisions:
            ex.submit(d)
        await ex.idle()
        await ex.close()
        journal.close()

    asyncio.run(main())
    return events


_n = iter(range(10**6))


def decision(ve, *actions):
    i = next(_n)
    return {"id": f"t{os.getpid()}-{i}-{time.monotonic_ns()}", "kind": "rule.matched", "ve": ve, "device": None,
            "fs": "ext4", "mount": None, "details": {"rule": "test", "actions": list(actions), "dry_run": False,
                                                    "event_ids": [], "trigger_kind": "fs.error"}}


def ends(events):
    return [(e.details["action"], e.kind, e.details.get("error")) for e in events
            if e.kind in ("action.succeeded", "action.failed")]


def new_ve(state, ve_id="701", size=64 * MiB):
    from fsnotifyd.ve import lifecycle

    lifecycle.create(str(state), ve_id, size)
    return lifecycle.start(str(state), ve_id)


def write_file(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def snapshots(image):
    from fsnotifyd.image import descriptor as dd

    return dd.load(os.path.join(image, dd.NAME)).snapshots()


def test_snapshot_retention_keeps_the_newest_automatic_ones(state):
    rec = new_ve(state)
    data = os.urandom(3 * MiB)
    write_file(os.path.join(rec.mountpoint, "a"), data)
    events = run_actions(state, [decision("701", {"snapshot": {"keep": 2}}) for _ in range(3)])
    assert ends(events) == [("snapshot", "action.succeeded", None)] * 3
    shots = snapshots(rec.image)
    autos = [s for s in shots if s.name and s.name.startswith("auto:")]
    assert len(autos) == 2, shots
    merged = events[-1].details["result"]["merged"]
    assert len(merged) == 1 and merged[0] not in {s.guid for s in autos}
    with open(os.path.join(rec.mountpoint, "a"), "rb") as f:
        assert f.read() == data


def test_isolate_readonly_then_release(state):
    rec = new_ve(state)
    p = os.path.join(rec.mountpoint, "f")
    write_file(p, b"before")
    events = run_actions(state, [decision("701", {"isolate": {"mode": "readonly"}})])
    assert ends(events) == [("isolate", "action.succeeded", None)]
    assert "remount-ro" in events[-1].details["result"]["how"]
    with pytest.raises(OSError) as e:
        write_file(p, b"during")
    assert e.value.errno == errno.EROFS
    r = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "ve", "release", "701", "--state-dir", str(state)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    write_file(p, b"after")
    with open(p, "rb") as f:
        assert f.read() == b"after"
    r = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "ve", "release", "701", "--state-dir", str(state)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not isolated" in r.stderr


def corrupt(state, rec):
    """Stop the VE, clear the inode of /victim with debugfs, start it again (a clean-flagged
    filesystem: the start's e2fsck -p does not look, the corruption goes live)."""
    from fsnotifyd.image import attach
    from fsnotifyd.ve import lifecycle

    lifecycle.stop(str(state), rec.id)
    a = attach.attach(rec.image, run_dir=str(state / "run"))
    try:
        r = subprocess.run(["debugfs", "-w", "-R", "clri /victim", a.loop], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        attach.detach(a, run_dir=str(state / "run"))
    return lifecycle.start(str(state), rec.id)


def check_view(state, image, guid=None):
    """e2fsck -fn of snapshot ``guid``'s read-only view (None: the image, stopped): its exit code."""
    from fsnotifyd.image import attach

    v = attach.attach(image, run_dir=str(state / "run"), readonly=True, upto=guid)
    try:
        return subprocess.run(["e2fsck", "-fn", v.loop], capture_output=True, text=True).returncode
    finally:
        attach.detach(v, run_dir=str(state / "run"))


def test_check_finds_a_corruption_while_the_ve_runs_and_repair_fixes_it(state):
    rec = new_ve(state)
    write_file(os.path.join(rec.mountpoint, "victim"), b"x" * 10000)
    write_file(os.path.join(rec.mountpoint, "keep"), b"k" * 5000)
    rec = corrupt(state, rec)
    events = run_actions(state, [decision("701", {"fsck": {"mode": "check"}})])
    results = [e for e in events if e.kind == "fsck.result"]
    assert len(results) == 1 and results[0].details["result"] == "errors", results[0].details
    assert results[0].details["exit_code"] == 4 and results[0].details["problems"] >= 1
    assert ends(events) == [("fsck", "action.succeeded", None)]
    evidence = results[0].details["snapshot"]
    assert evidence in {s.guid for s in snapshots(rec.image)}  # kept: it shows the errors
    assert os.path.ismount(rec.mountpoint)  # the VE kept running

    events = run_actions(state, [decision("701", {"fsck": {"mode": "repair"}})])
    results = [e for e in events if e.kind == "fsck.result"]
    assert results[0].details["result"] == "errors" and results[0].details["exit_code"] in (1, 2)
    pre_repair = results[0].details["snapshot"]
    assert os.path.ismount(rec.mountpoint)  # started again
    with open(os.path.join(rec.mountpoint, "keep"), "rb") as f:
        assert f.read() == b"k" * 5000
    from fsnotifyd.ve import lifecycle

    lifecycle.stop(str(state), "701")
    assert check_view(state, rec.image) == 0
    assert check_view(state, rec.image, pre_repair) == 4  # the corrupted state, kept for forensics


def _cgroup(base: str, name: str) -> str | None:
    if not os.path.isdir(base):
        return None
    path = os.path.join(base, name)
    try:
        os.mkdir(path)
    except OSError:
        return None
    return path


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_isolate_freeze_and_release_a_cgroup(state, kind):
    from fsnotifyd.inventory import VE

    base = "/sys/fs/cgroup/freezer" if kind == "v1" else "/sys/fs/cgroup/unified"
    if kind == "v2" and not os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers"):
        base = "/sys/fs/cgroup"
    path = _cgroup(base, f"fsnd-test-{os.getpid()}")
    if path is None:
        kernel_missing(f"cannot create a {kind} cgroup under {base}")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        ve = VE("cg1", mounts=(), cgroup=path)
        events = run_actions(state, [decision("cg1", {"isolate": {"mode": "freeze"}})], ves=(ve,))
        assert ends(events) == [("isolate", "action.succeeded", None)], events
        state_of = lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # noqa: E731
        frozen_file = "freezer.state" if kind == "v1" else "cgroup.events"
        text = Path(path, frozen_file).read_text()
        assert ("FROZEN" in text) if kind == "v1" else ("frozen 1" in text)
        from fsnotifyd.actions import isolate
        from fsnotifyd.actions.target import Targets

        isolate.release(Targets(str(state), (ve,)), "cg1")
        text = Path(path, frozen_file).read_text()
        assert ("THAWED" in text) if kind == "v1" else ("frozen 0" in text)
        assert state_of() in ("S", "R")
    finally:
        with contextlib.suppress(OSError):
            thaw = ("freezer.state", "THAWED") if kind == "v1" else ("cgroup.freeze", "0")
            Path(path, thaw[0]).write_text(thaw[1])
        proc.kill()
        proc.wait()
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.02)


def test_exec_gets_the_decision_on_stdin_and_a_failure_is_reported(state, tmp_path):
    out = tmp_path / "out.json"
    prog = f"import json,sys; d=json.load(sys.stdin); open({str(out)!r},'w').write(json.dumps(d))"
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    events = run_actions(state, [decision(None, {"exec": {"command": [sys.executable, "-c", prog], "timeout": "10s"}}),
                                 decision(None, {"exec": {"command": fail}}),
                                 decision(None, {"exec": {"command": ["/nonexistent/prog"]}})])
    assert [x[:2] for x in ends(events)] == [("exec", "action.succeeded"), ("exec", "action.failed"),
                                             ("exec", "action.failed")]
    assert json.loads(out.read_text())["rule"] == "test"
    assert "exited 3" in ends(events)[1][2] and "not found" in ends(events)[2][2]


def test_actions_a_config_ve_cannot_take_fail_with_the_reason(state):
    from fsnotifyd.inventory import VE

    ve = VE("plain", mounts=("/nonexistent-mnt",))
    events = run_actions(state, [decision("plain", {"snapshot": {}}), decision("plain", {"isolate": {"mode": "block"}}),
                                 decision("nobody", {"snapshot": {}})], ves=(ve,))
    errs = {e.ve: e.details["error"] for e in events if e.kind == "action.failed"}  # lanes run side by side
    by_action = {e.details["action"]: e.details["error"] for e in events
                 if e.kind == "action.failed" and e.ve == "plain"}
    assert "not managed by the image manager" in by_action["snapshot"]
    assert "snapshot needs an fsnotifyd image" in by_action["snapshot"]
    assert "isolate block needs an fsnotifyd image" in by_action["isolate"]
    assert "unknown VE 'nobody'" in errs["nobody"]


def test_daemon_on_default_rules_snapshots_checks_isolates_and_repairs_a_corrupted_ve(state, tmp_path):
    """End to end: a VE whose image was corrupted with debugfs, the daemon on its embedded
    default rules. The first access is a kernel error; the rules snapshot and check; the
    check's errors isolate and repair; afterwards the VE is clean and running, and the
    snapshot taken before the repair still holds the corrupted filesystem."""
    from fsnotifyd.image import attach
    from fsnotifyd.ve import lifecycle
    from tests.rigs.daemon import RunningDaemon

    workdir = tmp_path / "d"
    workdir.mkdir()
    with RunningDaemon(workdir) as daemon:
        sd = workdir / "state"
        lifecycle.create(str(sd), "104", 64 * MiB, mountpoint=str(tmp_path / "root104"))
        try:
            rec = lifecycle.start(str(sd), "104")
            write_file(os.path.join(rec.mountpoint, "victim"), b"v" * 20000)
            write_file(os.path.join(rec.mountpoint, "keep"), b"k" * 20000)
            rec = corrupt(sd, rec)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(v["id"] == "104" for v in daemon.status().get("ves", [])):
                time.sleep(0.1)
            stream = daemon.stream()
            try:
                with pytest.raises(OSError):  # the first access: EFSCORRUPTED (or ENOENT) from the kernel
                    with open(os.path.join(rec.mountpoint, "victim"), "rb") as f:
                        f.read()
                done = lambda e: (e["kind"] == "action.succeeded" and e["details"]["action"] == "fsck"  # noqa: E731
                                  and e["details"]["params"].get("mode") == "repair")
                stream.wait_for(done, timeout=120)
                stream.wait_for(lambda e: e["kind"] == "notification" and "check found" in e["details"]["message"])
                seen = list(stream.events)
            finally:
                stream.close()
            def one(kind, **details):
                return [e for e in seen if e["kind"] == kind and e["ve"] == "104"
                        and all(e["details"].get(k) == v for k, v in details.items())]
            assert one("fs.error"), [e["kind"] for e in seen]
            assert one("rule.matched", rule="first-error-snapshot-and-check")
            [check] = one("fsck.result", mode="check")
            assert check["details"]["result"] == "errors"
            assert one("rule.matched", rule="check-found-errors-repair")
            assert [e for e in one("action.succeeded", action="isolate")]
            [repair] = one("fsck.result", mode="repair")
            assert repair["details"]["result"] == "errors" and repair["details"]["exit_code"] in (1, 2)
            assert not one("action.failed"), one("action.failed")
            [note] = [e for e in seen if e["kind"] == "notification" and "check found" in e["details"]["message"]]
            assert note["severity"] == "critical" and note["details"]["trigger"]["kind"] == "fsck.result"
            assert os.path.ismount(rec.mountpoint)  # repaired and running again
            with open(os.path.join(rec.mountpoint, "keep"), "rb") as f:
                assert f.read() == b"k" * 20000
            deadline = time.monotonic() + 10
            while daemon.status()["actions"]["unfinished"] and time.monotonic() < deadline:
                time.sleep(0.05)  # the notification after the repair
            jobs = daemon.status()["actions"]["recent"]
            assert all(j["state"] == "succeeded" for j in jobs if j["ve"] == "104"), jobs
            text = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "status", "--config", str(daemon.config)],
                                  capture_output=True, text=True).stdout
            assert "actions: 0 unfinished" in text and "notify on VE 104 succeeded" in text, text
            lifecycle.stop(str(sd), "104")
            assert check_view(sd, rec.image) == 0
            assert check_view(sd, rec.image, repair["details"]["snapshot"]) == 4
        finally:
            with contextlib.suppress(Exception):
                lifecycle.stop(str(sd), "104")
            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))


def test_a_config_ve_on_a_plain_loop_device_readonly_trim_and_fsck(state, tmp_path):
    """A VE that is only a mount in the config (no image): readonly, fstrim and (unmounted)
    fsck work; fsck while mounted fails saying why."""
    from fsnotifyd.actions import isolate
    from fsnotifyd.actions.target import Targets
    from fsnotifyd.inventory import VE

    raw, mnt = tmp_path / "plain.img", tmp_path / "plain"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(raw)], capture_output=True, text=True,
                         check=True).stdout.strip()
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        mounted = True
        ve = VE("p1", mounts=(str(mnt),), devices=(os.path.basename(dev),))
        write_file(mnt / "big", os.urandom(8 * MiB))
        os.unlink(mnt / "big")
        events = run_actions(state, [decision("p1", {"shrink": {"mode": "trim"}}),
                                     decision("p1", {"fsck": {"mode": "check"}}),
                                     decision("p1", {"isolate": {"mode": "readonly"}})], ves=(ve,))
        got = {e.details["action"]: e for e in events if e.kind in ("action.succeeded", "action.failed")}
        assert got["shrink"].kind == "action.succeeded" and "trimmed" in got["shrink"].details["result"]["fstrim"]
        assert got["fsck"].kind == "action.failed" and "needs it unmounted" in got["fsck"].details["error"]
        assert got["isolate"].kind == "action.succeeded"
        with pytest.raises(OSError) as e:
            write_file(mnt / "x", b"x")
        assert e.value.errno == errno.EROFS
        isolate.release(Targets(str(state), (ve,)), "p1")
        write_file(mnt / "x", b"x")
        subprocess.run(["umount", str(mnt)], check=True)
        mounted = False
        events = run_actions(state, [decision("p1", {"fsck": {"mode": "check"}})], ves=(ve,))
        [res] = [e for e in events if e.kind == "fsck.result"]
        assert res.details["result"] == "clean" and res.details["exit_code"] == 0
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.parametrize("case", ["f_badinode", "f_bad_inode_csum", "f_dir_bad_csum"])
def test_daemon_on_default_rules_repairs_a_ve_built_from_an_e2fsprogs_image(state, tmp_path, case, e2fsprogs_fixtures):
    """A VE whose disk is one of e2fsprogs' corrupted test images (imported into an fsnotifyd
    image and mounted as it is, without the e2fsck -p of `ve start`): walking its tree is the
    first access; the default rules check, isolate and repair it."""
    import gzip

    from fsnotifyd.image import attach, ops
    from fsnotifyd.image.stack import Stack
    from fsnotifyd.ve import lifecycle
    from fsnotifyd.ve.registry import Registry, VeRecord
    from tests.rigs.daemon import RunningDaemon

    src = e2fsprogs_fixtures / f"{case}.img.gz"
    raw = tmp_path / "raw.img"
    raw.write_bytes(gzip.decompress(src.read_bytes()))
    image = tmp_path / "image"
    ops.create_empty(str(image), -(-raw.stat().st_size // 4096) * 4096, 64 * 1024)
    with Stack.open(str(image)) as s:
        ops.import_raw(s, str(raw))
    workdir = tmp_path / "d"
    workdir.mkdir()
    with RunningDaemon(workdir) as daemon:
        sd = workdir / "state"
        mnt = tmp_path / "root"
        Registry(str(sd)).add(VeRecord("105", str(image), str(mnt)))
        try:
            a = attach.attach(str(image), run_dir=str(sd / "run"))
            mnt.mkdir()
            attach.mount(a, str(mnt), options=("errors=continue",))
            Registry(str(sd)).update("105", running=True, loop=a.loop, disk=a.disk)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(v["id"] == "105" for v in daemon.status().get("ves", [])):
                time.sleep(0.1)
            stream = daemon.stream()
            try:
                for root, dirs, files in os.walk(mnt):  # the first access: the kernel finds the damage
                    for name in dirs + files:
                        with contextlib.suppress(OSError):
                            os.lstat(os.path.join(root, name))
                            if name in files:
                                with open(os.path.join(root, name), "rb") as f:
                                    f.read()
                def done(e: dict) -> bool:
                    return (e["kind"] in ("action.succeeded", "action.failed") and e["details"]["action"] == "fsck"
                            and e["details"]["params"].get("mode") == "repair")
                stream.wait_for(done, timeout=120)
                seen = list(stream.events)
            finally:
                stream.close()
            mine = [e for e in seen if e["ve"] == "105"]
            kinds = [e["kind"] for e in mine]
            assert "fs.error" in kinds, kinds
            checks = [e["details"] for e in mine if e["kind"] == "fsck.result" and e["details"]["mode"] == "check"]
            assert checks and checks[0]["result"] in ("errors", "failed"), checks
            repairs = [e["details"] for e in mine if e["kind"] == "fsck.result" and e["details"]["mode"] == "repair"]
            assert repairs and repairs[0]["result"] == "errors" and repairs[0]["exit_code"] in (1, 2), repairs
            assert os.path.ismount(mnt)  # repaired and running again
            lifecycle.stop(str(sd), "105")
            assert check_view(sd, str(image)) == 0
            assert check_view(sd, str(image), repairs[0]["snapshot"]) >= 4  # the corruption, kept
        finally:
            with contextlib.suppress(Exception):
                lifecycle.stop(str(sd), "105")
            for a in attach.attached(str(sd / "run")):
                attach.detach(a, run_dir=str(sd / "run"))


def test_two_ves_failing_at_once_are_checked_one_after_the_other(state):
    """Concurrency 1: the two checks do not overlap, and both complete with their findings."""
    recs = []
    for ve_id in ("711", "712"):
        rec = new_ve(state, ve_id)
        write_file(os.path.join(rec.mountpoint, "victim"), b"v" * 10000)
        recs.append(corrupt(state, rec))
    events = run_actions(state, [decision("711", {"fsck": {"mode": "check"}}),
                                 decision("712", {"fsck": {"mode": "check"}})], heavy_limit=1)
    spans = {}
    for e in events:
        if e.details.get("action") == "fsck" and e.kind.startswith("action."):
            spans.setdefault(e.ve, []).append(e.time)
    (a0, a1), (b0, b1) = sorted(spans.values())
    assert a1 <= b0, spans  # the second started after the first ended
    results = {e.ve: e.details["result"] for e in events if e.kind == "fsck.result"}
    assert results == {"711": "errors", "712": "errors"}


def test_readonly_falls_back_to_shutdown_when_the_remount_is_refused(state):
    """A file open for writing makes `remount,ro` fail (busy): the filesystem is shut down
    instead; release brings the VE back through a stop and a start."""
    rec = new_ve(state)
    write_file(os.path.join(rec.mountpoint, "kept"), b"k" * 4096)
    holder = open(os.path.join(rec.mountpoint, "held"), "w")  # keeps the remount busy
    try:
        events = run_actions(state, [decision("701", {"isolate": {"mode": "readonly"}})])
        assert ends(events) == [("isolate", "action.succeeded", None)]
        assert events[-1].details["result"]["how"].startswith("shutdown"), events[-1].details["result"]
        with pytest.raises(OSError) as e:
            write_file(os.path.join(rec.mountpoint, "after"), b"x")
        assert e.value.errno in (errno.EIO, errno.EROFS)
    finally:
        holder.close()
    from fsnotifyd.actions import isolate
    from fsnotifyd.actions.target import Targets

    isolate.release(Targets(str(state)), "701")
    write_file(os.path.join(rec.mountpoint, "after"), b"x")
    with open(os.path.join(rec.mountpoint, "kept"), "rb") as f:
        assert f.read() == b"k" * 4096


def test_shrink_trim_balloon_and_resize_on_an_image_ve(state):
    from fsnotifyd.image.resize import balloon_size, fs_size
    from fsnotifyd.ve.registry import Registry

    rec = new_ve(state, size=96 * MiB)
    write_file(os.path.join(rec.mountpoint, "big"), os.urandom(24 * MiB))
    os.unlink(os.path.join(rec.mountpoint, "big"))
    events = run_actions(state, [decision("701", {"shrink": {"mode": "trim"}})])
    assert ends(events) == [("shrink", "action.succeeded", None)]
    assert events[-1].details["result"]["reclaimed_bytes"] >= 20 * MiB, events[-1].details["result"]
    compacted = events[-1].details["result"]["compacted"]
    assert compacted["moved"] >= 0 and compacted["released"] >= 0
    r = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "image", "compact", rec.image, "--state-dir",
                        str(state)], capture_output=True, text=True)
    assert r.returncode == 0 and "(online)" in r.stdout, r.stdout + r.stderr  # the CLI, on the attached image
    from fsnotifyd.image.check import check
    from fsnotifyd.ve import lifecycle

    lifecycle.stop(str(state), "701")  # compacted online: the image is still sound
    assert check(rec.image).clean
    assert check_view(state, rec.image) == 0
    rec = lifecycle.start(str(state), "701")

    events = run_actions(state, [decision("701", {"shrink": {"mode": "balloon", "target": "16M"}})])
    assert ends(events) == [("shrink", "action.succeeded", None)], events[-1].details
    assert balloon_size(rec.mountpoint) == 16 * MiB
    run_actions(state, [decision("701", {"shrink": {"mode": "balloon", "target": 0}})])
    assert balloon_size(rec.mountpoint) == 0

    write_file(os.path.join(rec.mountpoint, "kept"), b"k" * 100000)
    events = run_actions(state, [decision("701", {"shrink": {"mode": "resize", "margin": "20%"}})])
    assert ends(events) == [("shrink", "action.succeeded", None)], events[-1].details
    new_size = events[-1].details["result"]["size"]
    assert new_size < 96 * MiB
    rec = Registry(str(state)).get("701")
    assert rec.running and os.path.ismount(rec.mountpoint)
    assert fs_size(rec.loop) == new_size
    with open(os.path.join(rec.mountpoint, "kept"), "rb") as f:
        assert f.read() == b"k" * 100000


def test_shrink_repack_action_runs_a_pass_and_publishes_it(state):
    """`shrink: {mode: repack}` on a running image VE: one pass (a donor left by a killed pass
    is deleted first), its result the repack dict, published as image.repacked; on a stopped
    VE it fails with the reason."""
    from fsnotifyd.image.repack import DONOR_DIR
    from fsnotifyd.ve import lifecycle
    from tests.rigs.files import churn, tree_digests

    rec = new_ve(state, "702", size=256 * MiB)
    churn(rec.mountpoint, rounds=2, fill=0.5, delete=0.65)
    digests = tree_digests(rec.mountpoint)
    os.makedirs(os.path.join(rec.mountpoint, DONOR_DIR))
    with open(os.path.join(rec.mountpoint, DONOR_DIR, "donor-1-0"), "wb") as f:  # as a SIGKILL leaves it
        os.posix_fallocate(f.fileno(), 0, 2 * MiB)
    events = run_actions(state, [decision("702", {"shrink": {"mode": "repack", "budget_mib_s": 200}})])
    assert ends(events) == [("shrink", "action.succeeded", None)], events[-1].details
    r = next(e for e in events if e.kind == "action.succeeded").details["result"]
    assert r["mode"] == "repack" and r["bytes_moved"] > 0 and r["after"]["fragmentation"] < r["before"]["fragmentation"]
    [passed] = [e for e in events if e.kind == "image.repacked"]
    assert passed.details["clusters_freed"] == r["clusters_freed"]
    assert not os.path.exists(os.path.join(rec.mountpoint, DONOR_DIR))
    assert tree_digests(rec.mountpoint) == digests
    lifecycle.stop(str(state), "702")
    events = run_actions(state, [decision("702", {"shrink": {"mode": "repack"}})])
    [(_, kind, error)] = ends(events)
    assert kind == "action.failed" and "mounted" in error, error
