"""The action executor and its journal, with real handlers (plain functions writing files and
sleeping): ordering per VE, the host-wide heavy limit and its priorities, timeouts, dry-run,
a decision delivered twice, and resumption from the journal after a restart."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from itertools import pairwise

import pytest

from fsnotifyd.actions.executor import ActionError, Executor
from fsnotifyd.actions.job import FAILED, RUNNING, SUCCEEDED, Job
from fsnotifyd.actions.journal import JobJournal
from fsnotifyd.metrics import Metrics


def decision(i: int, ve: str | None, *actions: dict, dry_run: bool = False) -> dict:
    return {"id": f"dec-{i}", "kind": "rule.matched", "ve": ve, "device": {"name": "loop9", "major": 7, "minor": 9},
            "fs": "ext4", "mount": "/m", "details": {"rule": "r", "actions": list(actions), "dry_run": dry_run,
                                                     "event_ids": [f"ev-{i}"], "trigger_kind": "fs.error"}}


class Recorder:
    """Handlers that note when they run (real threads, real sleeps)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, float]] = []
        self.running = 0
        self.max_running = 0

    def handler(self, name: str, seconds: float = 0.0, fail: bool = False):
        def run(job: Job, step) -> dict:
            with self.lock:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                self.log.append((job.ve or "-", f"{name}:{job.params.get('n')}", time.monotonic()))
            try:
                time.sleep(seconds)
                if fail:
                    raise ActionError("told to fail")
                return {"n": job.params.get("n")}
            finally:
                with self.lock:
                    self.running -= 1
        return run


def run_executor(tmp_path, handlers, decisions, **kw):
    events: list = []

    async def main():
        ex = Executor(JobJournal(str(tmp_path / "journal.jsonl")), handlers, events.append, **kw)
        for d in decisions:
            ex.submit(d)
        await ex.idle()
        await ex.close()
        ex.journal.close()
        return ex

    ex = asyncio.run(main())
    return ex, events


def test_jobs_of_one_ve_run_in_order_and_report_events(tmp_path):
    rec = Recorder()
    ds = [decision(i, "101", {"notify": {"n": i}}) for i in range(5)]
    metrics = Metrics()
    ex, events = run_executor(tmp_path, {"notify": rec.handler("notify", 0.01)}, ds, metrics=metrics)
    assert [x[1] for x in rec.log] == [f"notify:{i}" for i in range(5)]
    assert rec.max_running == 1
    kinds = [e.kind for e in events]
    assert kinds == ["action.started", "action.succeeded"] * 5
    done = events[1]
    assert done.ve == "101" and done.device.name == "loop9" and done.details["result"] == {"n": 0}
    assert done.details["duration_s"] >= 0.01
    assert metrics.actions.labels("notify", "succeeded")._value.get() == 5
    states = {j.id: j.state for j in JobJournal(str(tmp_path / "journal.jsonl")).jobs.values()}
    assert states == {f"dec-{i}/0": SUCCEEDED for i in range(5)}


def test_heavy_jobs_share_one_slot_lowest_priority_first(tmp_path):
    rec = Recorder()
    # Three VEs: the first fsck takes the slot; of the two waiting, priority 1 goes before 5.
    ds = [decision(0, "a", {"fsck": {"n": 0, "priority": 9}}),
          decision(1, "b", {"fsck": {"n": 1, "priority": 5}}),
          decision(2, "c", {"fsck": {"n": 2, "priority": 1}}),
          decision(3, "d", {"notify": {"n": 3}})]
    ex, events = run_executor(tmp_path, {"fsck": rec.handler("fsck", 0.2), "notify": rec.handler("notify")}, ds,
                              heavy_limit=1)
    fscks = [x for x in rec.log if x[1].startswith("fsck")]
    assert [x[1] for x in fscks] == ["fsck:0", "fsck:2", "fsck:1"]
    for a, b in pairwise(fscks):
        assert b[2] - a[2] >= 0.19  # one after the other
    notify_t = next(x[2] for x in rec.log if x[1] == "notify:3")
    assert notify_t < fscks[1][2]  # light jobs of other VEs do not wait for the slot


def test_two_heavy_jobs_run_together_with_concurrency_2(tmp_path):
    rec = Recorder()
    ds = [decision(i, f"ve{i}", {"fsck": {"n": i}}) for i in range(4)]
    run_executor(tmp_path, {"fsck": rec.handler("fsck", 0.15)}, ds, heavy_limit=2)
    assert rec.max_running == 2


def test_timeout_failure_and_unknown_action_fail_the_job_only(tmp_path):
    rec = Recorder()
    ds = [decision(0, "v", {"snapshot": {"n": 0}}, {"isolate": {"n": 1}}, {"nosuch": {}}, {"notify": {"n": 3}})]
    handlers = {"snapshot": rec.handler("snapshot", 1.0), "isolate": rec.handler("i", fail=True),
                "notify": rec.handler("notify")}
    ex, events = run_executor(tmp_path, handlers, ds, timeouts={"snapshot": 0.1})
    ends = [(e.details["action"], e.kind, e.details["error"]) for e in events if e.kind != "action.started"]
    assert ends == [("snapshot", "action.failed", "timed out after 0.1 s"),
                    ("isolate", "action.failed", "told to fail"),
                    ("nosuch", "action.failed", "no handler for action 'nosuch'"),
                    ("notify", "action.succeeded", None)]


def test_dry_run_records_and_does_nothing(tmp_path):
    rec = Recorder()
    ds = [decision(0, "v", {"isolate": {"mode": "readonly"}}, dry_run=True)]
    ex, events = run_executor(tmp_path, {"isolate": rec.handler("isolate")}, ds)
    assert rec.log == []
    assert events[-1].kind == "action.succeeded"
    assert events[-1].details["result"] == {"dry_run": True, "would": {"isolate": {"mode": "readonly"}}, "ve": "v"}
    ex, events = run_executor(tmp_path / "x", {"isolate": rec.handler("isolate")},
                              [decision(1, "v", {"isolate": {}})], dry_run=True)  # forced by the config
    assert rec.log == [] and events[-1].details["dry_run"] is True


def test_a_decision_delivered_twice_runs_once(tmp_path):
    rec = Recorder()
    d = decision(0, "v", {"notify": {"n": 0}})
    run_executor(tmp_path, {"notify": rec.handler("notify")}, [d, d])
    run_executor(tmp_path, {"notify": rec.handler("notify")}, [d])  # and after a restart
    assert len(rec.log) == 1


def test_unfinished_jobs_resume_from_their_last_step(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    j = JobJournal(path)
    job = Job(id="dec-7/0", decision="dec-7", rule="r", ve="v", action="twostep", params={}, state=RUNNING,
              steps=["first"], data={"made": "x"}, created=time.time(), attempts=1)
    j.record(job)
    j.record(Job(id="dec-6/0", decision="dec-6", rule="r", ve="v", action="twostep", params={},
                 state=SUCCEEDED, created=time.time() - 1))
    j.close()
    calls = []

    def twostep(job, step):
        if not step.done("first"):
            calls.append("first")
            step.finish("first", made="y")
        calls.append(f"second with {job.data['made']}")
        step.finish("second")
        return {}

    async def main():
        ex = Executor(JobJournal(path), {"twostep": twostep}, lambda e: None)
        resumed = ex.resume()
        await ex.idle()
        await ex.close()
        return resumed

    resumed = asyncio.run(main())
    assert [r.id for r in resumed] == ["dec-7/0"]
    assert calls == ["second with x"]
    after = JobJournal(path).jobs["dec-7/0"]
    assert after.state == SUCCEEDED and after.steps == ["first", "second"] and after.attempts == 2


def test_journal_skips_a_torn_line_and_names_it(tmp_path):
    path = tmp_path / "journal.jsonl"
    j = JobJournal(str(path))
    j.record(Job(id="a/0", decision="a", rule="r", ve=None, action="notify", params={}, created=1.0))
    j.close()
    with open(path, "a") as f:
        f.write('{"id": "b/0", "decis')  # a crash in the middle of a write
    j = JobJournal(str(path))
    assert list(j.jobs) == ["a/0"]
    assert j.problems and f"{path}:2:" in j.problems[0]
    j.record(Job(id="c/0", decision="c", rule="r", ve=None, action="notify", params={}, created=2.0))
    j.close()
    assert sorted(JobJournal(str(path)).jobs) == ["a/0", "c/0"]  # not glued to the torn line


def test_journal_rewrite_keeps_unfinished_and_newest_finished(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    j = JobJournal(path, keep_finished=3)
    for i in range(10):
        j.record(Job(id=f"d{i}/0", decision=f"d{i}", rule="r", ve=None, action="notify", params={},
                     state=FAILED if i % 2 else SUCCEEDED, created=float(i), finished=float(i)))
    j.record(Job(id="open/0", decision="open", rule="r", ve="v", action="fsck", params={}, created=0.5))
    j.close()
    j = JobJournal(path, keep_finished=3)
    assert sorted(j.jobs) == ["d7/0", "d8/0", "d9/0", "open/0"]
    with open(path) as f:
        assert len([json.loads(x) for x in f]) == 4
    j.close()


def test_a_second_fsck_for_a_ve_waiting_for_the_slot_is_folded_into_the_first(tmp_path):
    rec = Recorder()
    ds = [decision(0, "a", {"fsck": {"n": 0, "mode": "check"}}),  # takes the slot
          decision(1, "b", {"fsck": {"n": 1, "mode": "check"}}),  # waits
          decision(2, "b", {"fsck": {"n": 2, "mode": "check"}}),  # same VE, same mode, b's still waits: folded
          decision(3, "b", {"fsck": {"n": 3, "mode": "repair"}})]  # another mode: its own job
    ex, events = run_executor(tmp_path, {"fsck": rec.handler("fsck", 0.1)}, ds, heavy_limit=1)
    assert sorted(x[1] for x in rec.log) == ["fsck:0", "fsck:1", "fsck:3"]
    folded = [e for e in events if e.details["job"] == "dec-2/0"]
    assert [e.kind for e in folded] == ["action.succeeded"]
    assert folded[0].details["result"] == {"deduplicated_into": "dec-1/0"}


def test_repair_window_arithmetic():
    from fsnotifyd.actions.executor import seconds_until_window
    from fsnotifyd.config import parse_window

    at = lambda h, m, sec=0: time.struct_time((2026, 1, 1, h, m, sec, 0, 1, 0))  # noqa: E731
    night = parse_window("22:00-04:00")  # wraps past midnight
    assert night == (1320, 240)
    assert seconds_until_window(night, at(23, 30)) == 0 and seconds_until_window(night, at(3, 59)) == 0
    assert seconds_until_window(night, at(4, 0)) == 18 * 3600
    assert seconds_until_window(night, at(21, 59, 30)) == 30
    assert seconds_until_window(parse_window("02:00-03:00"), at(3, 0)) == 23 * 3600
    assert seconds_until_window(None, at(12, 0)) == 0
    for bad in ("2-3", "24:00-01:00", "01:00-01:00", "01:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_a_repair_outside_its_window_waits_and_other_ves_go_on(tmp_path):
    rec = Recorder()
    now = time.localtime()
    minute = now.tm_hour * 60 + now.tm_min
    closed = ((minute + 120) % 1440, (minute + 180) % 1440)  # opens in two hours
    events: list = []

    async def main():
        ex = Executor(JobJournal(str(tmp_path / "j.jsonl")), {"fsck": rec.handler("fsck"), "notify": rec.handler("n")},
                      events.append, repair_window=closed)
        ex.submit(decision(0, "a", {"fsck": {"n": 0, "mode": "repair"}}, {"notify": {"n": 1}}))
        ex.submit(decision(1, "b", {"fsck": {"n": 2, "mode": "check"}}))
        await asyncio.sleep(0.5)
        state = {j.id: j.state for j in ex.journal.jobs.values()}
        await ex.close()
        ex.journal.close()
        return state

    state = asyncio.run(main())
    assert [x[1] for x in rec.log] == ["fsck:2"]  # b's check ran; a's repair and what follows it wait
    assert state == {"dec-0/0": "queued", "dec-0/1": "queued", "dec-1/0": "succeeded"}


def test_a_journal_the_disk_refuses_holds_records_and_writes_them_later(tmp_path, monkeypatch) -> None:
    """While appends fail (a full disk) jobs still run: each job's newest record is held in
    memory, said once, and appended in order by the next record or flush once the disk takes
    it; a part-written line is cut off again."""
    import errno
    import os

    from structlog.testing import capture_logs

    from fsnotifyd import statefile

    full = {"on": False, "take": 0}
    real = os.write

    def write(fd, data):
        if not full["on"]:
            return real(fd, data)
        if full["take"]:
            n, full["take"] = real(fd, bytes(data[:full["take"]])), 0
            return n
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(statefile, "_has_room", lambda path: not full["on"])
    path = tmp_path / "actions" / "journal.jsonl"
    recorder = Recorder()

    async def main() -> None:
        journal = JobJournal(str(path))
        ex = Executor(journal, {"note": recorder.handler("note")}, lambda e: None)
        ex.submit(decision(1, "101", {"note": {"n": 1}}))
        await ex.idle()
        full.update(on=True, take=25)
        with capture_logs() as logs:
            ex.submit(decision(2, "101", {"note": {"n": 2}}))
            await ex.idle()
        assert [x["event"] for x in logs if x["event"].startswith("state.")] == ["state.write_failed"]
        assert journal.held == 1 and journal.jobs["dec-2/0"].state == SUCCEEDED  # it ran all the same
        assert not journal.flush()
        full["on"] = False
        with capture_logs() as logs:
            assert journal.flush() and journal.held == 0
        assert [x["event"] for x in logs] == ["state.write_recovered"]
        journal.close()

    asyncio.run(main())
    assert [r[1] for r in recorder.log] == ["note:1", "note:2"]
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # every line whole
    assert [(x["id"], x["state"]) for x in lines][-1] == ("dec-2/0", SUCCEEDED)
    assert JobJournal(str(path)).jobs["dec-2/0"].state == SUCCEEDED and not JobJournal(str(path)).problems
