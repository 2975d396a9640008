"""SIGKILL in the middle of actions, then a restart: every decision's actions complete once.

A child process runs the daemon's executor (the same Executor, journal and handlers the daemon
composes) on a running VE with one decision: snapshot (keep 2), isolate read-only, fsck check,
notify. It is SIGKILLed at a random moment; a second child is started like the daemon after a
crash (the journal's unfinished jobs resume, the same decision arrives again) and runs to the
end. Then: every job of the decision succeeded, exactly one snapshot carries the decision's
name, the check's snapshot is gone (the filesystem is clean), the VE's filesystem is not left
frozen, and the image has exactly one attachment (no snapshot view left behind).
Default: 8 kills; FSNOTIFYD_STRESS=1: 25 (FSNOTIFYD_STRESS_ITERATIONS=N for another count).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import kernel_missing

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
STRESS = os.environ.get("FSNOTIFYD_STRESS") == "1"
ITERATIONS = int(os.environ.get("FSNOTIFYD_STRESS_ITERATIONS", "25")) if STRESS else 8
ACTIONS = [{"snapshot": {"keep": 2}}, {"isolate": {"mode": "readonly"}}, {"fsck": {"mode": "check"}},
           {"notify": {"message": "m"}}]


def child_main(state_dir: str, decision_id: str, ready: str, ve: str = "801", actions: list | None = None) -> None:
    import asyncio

    from fsnotifyd.actions.executor import Executor
    from fsnotifyd.actions.handlers import handlers
    from fsnotifyd.actions.journal import JobJournal
    from fsnotifyd.actions.target import Targets
    from fsnotifyd.app.logging import configure_logging

    configure_logging("warning")

    async def main() -> None:
        journal = JobJournal(os.path.join(state_dir, "actions", "journal.jsonl"))
        ex = Executor(journal, handlers(Targets(state_dir)), lambda e: None)
        ex.resume()
        ex.submit({"id": decision_id, "kind": "rule.matched", "ve": ve, "device": None, "fs": "ext4",
                   "mount": None, "details": {"rule": "crash", "actions": actions or ACTIONS, "dry_run": False,
                                              "event_ids": [], "trigger_kind": "fs.error"}})
        Path(ready).write_text("ready")
        await ex.idle()
        await ex.close()
        journal.close()

    asyncio.run(main())


def run_child(state: Path, decision_id: str, kill_after: float | None, *, ve: str = "801",
              actions: list | None = None) -> bool:
    ready = state / "ready"
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "tests.integration.test_actions_crash", str(state), decision_id,
                          str(ready), ve, json.dumps(actions or ACTIONS)], cwd=str(ROOT), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if kill_after is not None:
            deadline = time.monotonic() + 30
            while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(kill_after)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
                return True
        rc = p.wait(120)
        err = p.stderr.read().decode()
        assert rc == 0, err[-3000:]
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


@contextlib.contextmanager
def running_ve(tmp_path: Path, ve_id: str, size: int):
    """A VE started in its own state dir; afterwards nothing of it is left attached."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    from fsnotifyd.image import attach
    from fsnotifyd.ve import lifecycle

    sd = tmp_path / "state"
    sd.mkdir()
    lifecycle.create(str(sd), ve_id, size)
    rec = lifecycle.start(str(sd), ve_id)
    try:
        yield sd, rec
    finally:
        subprocess.run(["fsfreeze", "-u", rec.mountpoint], capture_output=True)
        with contextlib.suppress(Exception):
            lifecycle.stop(str(sd), ve_id)
        for a in attach.attached(str(sd / "run")):
            attach.detach(a, run_dir=str(sd / "run"))
        leftovers = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(sd) not in leftovers, leftovers


@pytest.fixture
def ve(tmp_path, kernel):
    with running_ve(tmp_path, "801", 48 << 20) as it:
        yield it


def test_sigkill_during_actions_then_restart_completes_each_once(ve, capsys):
    from fsnotifyd.actions import isolate
    from fsnotifyd.actions.journal import JobJournal
    from fsnotifyd.actions.target import Targets
    from fsnotifyd.image import attach
    from fsnotifyd.image import descriptor as dd

    sd, rec = ve
    rng = random.Random()
    killed = 0
    resumed_steps: dict[str, int] = {}
    t0 = time.monotonic()
    for it in range(ITERATIONS):
        did = f"crash{it:03d}-{rng.randrange(1 << 30):08x}"
        delay = rng.uniform(0.0, 0.25)  # the four actions take about 0.3-0.5 s here
        killed += run_child(sd, did, delay)
        journal = JobJournal(str(sd / "actions" / "journal.jsonl"))
        for j in journal.unfinished():
            resumed_steps[j.action] = resumed_steps.get(j.action, 0) + 1
        journal.close()
        run_child(sd, did, None)
        journal = JobJournal(str(sd / "actions" / "journal.jsonl"))
        jobs = [journal.jobs.get(f"{did}/{i}") for i in range(len(ACTIONS))]
        journal.close()
        where = f"iteration {it} (kill after {delay:.3f} s)"
        assert all(j is not None and j.state == "succeeded" for j in jobs), \
            (where, [(j.action, j.state, j.error, j.steps) for j in jobs if j])
        desc = dd.load(os.path.join(rec.image, dd.NAME))
        names = [s.name or "" for s in desc.snapshots()]
        assert names.count(f"auto:crash:{did[:8]}") == 1, (where, names)  # taken once, the newest: kept
        assert len([n for n in names if n.startswith("auto:")]) <= 2, (where, names)  # keep: 2
        assert not [n for n in names if n.startswith("fsck-check:")], (where, names)  # clean: dropped
        froze = subprocess.run(["fsfreeze", "-u", rec.mountpoint], capture_output=True)
        assert froze.returncode != 0, f"{where}: the VE's filesystem was left frozen"
        atts = attach.attached(str(sd / "run"))
        assert len(atts) == 1 and atts[0].upto is None, (where, [(a.name, a.upto) for a in atts])
        with pytest.raises(OSError):  # isolated read-only
            with open(os.path.join(rec.mountpoint, "probe"), "w") as f:
                f.write("x")
        isolate.release(Targets(str(sd)), "801")
    with capsys.disabled():
        print(f"\n  actions crash: {ITERATIONS} runs, {killed} killed, resumed jobs by action {resumed_steps}, "
              f"{time.monotonic() - t0:.1f} s")
    assert killed >= ITERATIONS // 3  # the rest ended before their kill: timing varies


REPACK_KILLS = int(os.environ.get("FSNOTIFYD_STRESS_ITERATIONS", "20")) if STRESS else 3


def test_sigkill_the_executor_during_a_repack_then_restart(tmp_path, kernel, capsys):
    """The daemon's executor killed at random points of a `shrink: {mode: repack}` job: no file
    changes, the restarted executor resumes the job and finishes it, no donor is left, and the
    image and the filesystem check clean. (The repack process itself is killed in
    test_repack.py; here it is the daemon that runs the action.)"""
    from fsnotifyd.actions.journal import JobJournal
    from fsnotifyd.image import attach
    from fsnotifyd.image.check import check
    from fsnotifyd.image.repack import DONOR_DIR
    from fsnotifyd.ve import lifecycle
    from tests.rigs.files import churn, tree_digests

    rng = random.Random()
    killed, t0 = 0, time.monotonic()
    repack = [{"shrink": {"mode": "repack"}}]
    with running_ve(tmp_path, "802", 256 << 20) as (sd, rec):
        it, last = 0, 2.0
        while killed < REPACK_KILLS and it < 3 * REPACK_KILLS:
            churn(rec.mountpoint, rounds=3 if it == 0 else 1, fill=0.45, seed=200 + it, subdir=f"c{it}")
            digests = tree_digests(rec.mountpoint)
            did = f"repack{it:03d}-{rng.randrange(1 << 30):08x}"
            delay = rng.uniform(0.0, last)  # within a pass: mapping, moves, trim, compaction
            killed += run_child(sd, did, delay, ve="802", actions=repack)
            where = f"iteration {it} (kill after {delay:.3f} s)"
            left = {k: v for k, v in tree_digests(rec.mountpoint).items() if not k.startswith(DONOR_DIR + "/")}
            assert left == digests, where  # a donor a kill left holds no file's data
            t1 = time.monotonic()
            run_child(sd, did, None, ve="802", actions=repack)
            last = max(0.3, time.monotonic() - t1 - 0.5)  # the next kill within a pass as long (less start-up)
            journal = JobJournal(str(sd / "actions" / "journal.jsonl"))
            job = journal.jobs.get(f"{did}/0")
            journal.close()
            assert job is not None and job.state == "succeeded", (where, job and (job.state, job.error))
            assert not os.path.exists(os.path.join(rec.mountpoint, DONOR_DIR)), where
            assert tree_digests(rec.mountpoint) == digests, where
            it += 1
        assert killed >= REPACK_KILLS, f"{killed} kills in {it} runs"
        lifecycle.stop(str(sd), "802")
        report = check(rec.image)
        assert report.clean, str(report)
        a = attach.attach(rec.image, run_dir=str(sd / "run"), readonly=True)
        try:
            r = subprocess.run(["e2fsck", "-fn", a.loop], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            attach.detach(a, run_dir=str(sd / "run"))
    with capsys.disabled():
        print(f"\n  repack under a killed executor: {it} runs, {killed} killed, "
              f"{time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], sys.argv[3], *sys.argv[4:5],
               *([json.loads(sys.argv[5])] if len(sys.argv) > 5 else []))


DAEMON_RULES = """version: 1
rules:
  - name: crash-rule
    match:
      kind: fs.error
      where:
        ve: {exists: true}
    actions:
      - snapshot: {keep: 50}
      - isolate: {mode: readonly}
      - fsck: {mode: check}
      - notify: {message: crash}
"""
DAEMON_ITERATIONS = int(os.environ.get("FSNOTIFYD_STRESS_ITERATIONS", "20")) if STRESS else 4


def test_sigkill_the_daemon_during_its_actions_then_restart(tmp_path, kernel, capsys):
    """The whole daemon: a real ext4 error on a VE fires the rule; the daemon is SIGKILLed at a
    random moment after it and started again. Each error must give exactly one decision whose
    four jobs all succeed (no second decision re-fired from the same kernel error after the
    restart), one snapshot, no frozen filesystem, one attachment."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    from fsnotifyd.actions import isolate
    from fsnotifyd.actions.journal import JobJournal
    from fsnotifyd.actions.target import Targets
    from fsnotifyd.image import attach
    from fsnotifyd.image import descriptor as dd
    from fsnotifyd.ve import lifecycle
    from tests.rigs.daemon import RunningDaemon

    rules = tmp_path / "rules.yaml"
    rules.write_text(DAEMON_RULES)
    daemon = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n")
    sd = tmp_path / "d" / "state"
    rng = random.Random()
    killed = 0
    t0 = time.monotonic()
    daemon.start()
    try:
        lifecycle.create(str(sd), "802", 48 << 20, mountpoint=str(tmp_path / "root"))
        rec = lifecycle.start(str(sd), "802")
        trigger = Path("/sys/fs/ext4") / os.path.basename(rec.loop) / "trigger_fs_error"
        for it in range(DAEMON_ITERATIONS):
            while not any(v["id"] == "802" for v in daemon.status().get("ves", [])):
                time.sleep(0.05)
            before = {j.decision for j in JobJournal(str(sd / "actions" / "journal.jsonl")).jobs.values()}
            shots_before = {s.guid for s in dd.load(os.path.join(rec.image, dd.NAME)).snapshots()}
            trigger.write_text(f"crash round {it}")
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGKILL)  # our own child, by pid
                daemon.proc.wait()
                killed += 1
            daemon.stderr.close()
            daemon.proc = None
            daemon.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = daemon.status()["actions"]
                if st["unfinished"] == 0:
                    break
                time.sleep(0.1)
            time.sleep(1.0)  # a decision re-fired after the restart would show up by now
            journal = JobJournal(str(sd / "actions" / "journal.jsonl"))
            new = {}
            for j in journal.jobs.values():
                if j.decision not in before:
                    new.setdefault(j.decision, []).append(j)
            journal.close()
            where = f"round {it} (kill after {delay:.3f} s)"
            assert len(new) == 1, (where, {d: [(j.action, j.state) for j in js] for d, js in new.items()})
            [jobs] = new.values()
            assert sorted(j.action for j in jobs) == ["fsck", "isolate", "notify", "snapshot"], where
            assert all(j.state == "succeeded" for j in jobs), (where, [(j.action, j.state, j.error) for j in jobs])
            shots = [s for s in dd.load(os.path.join(rec.image, dd.NAME)).snapshots() if s.guid not in shots_before]
            assert [s.name.split(":")[0] for s in shots] == ["auto"], (where, [s.name for s in shots])
            froze = subprocess.run(["fsfreeze", "-u", rec.mountpoint], capture_output=True)
            assert froze.returncode != 0, f"{where}: left frozen"
            atts = attach.attached(str(sd / "run"))
            assert len(atts) == 1 and atts[0].upto is None, (where, [(a.name, a.upto) for a in atts])
            isolate.release(Targets(str(sd)), "802")
            time.sleep(1.1)  # past the kernel's error report rate limit
    finally:
        daemon.stop()
        subprocess.run(["fsfreeze", "-u", str(tmp_path / "root")], capture_output=True)
        with contextlib.suppress(Exception):
            lifecycle.stop(str(sd), "802")
        for a in attach.attached(str(sd / "run")):
            attach.detach(a, run_dir=str(sd / "run"))
    with capsys.disabled():
        print(f"\n  daemon crash: {DAEMON_ITERATIONS} rounds, {killed} killed, {time.monotonic() - t0:.1f} s")
