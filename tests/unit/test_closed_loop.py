"""Issue 16's closed loop without the kernel: the rules' ``sustained`` condition and ``window``
(in the C core and its Python twin), the default repack rule, one heavy job at a time across
VEs for repack/fsck/resize, the ``image.repacked`` event a repack pass becomes, its metrics,
and when the alloc source measures the figures."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from fsnotifyd.actions.executor import Executor
from fsnotifyd.actions.job import Job
from fsnotifyd.actions.journal import JobJournal
from fsnotifyd.errors import RuleErrors
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.metrics import Metrics
from fsnotifyd.rules import decide, native
from fsnotifyd.rules.engine import Engine, seconds_until_window
from fsnotifyd.rules.loader import load_rules, parse_rules
from fsnotifyd.sinks.prometheus import MetricsSink
from fsnotifyd.sources.alloc_figures import FiguresClock

ROOT = Path(__file__).resolve().parents[2]
IMPLS = [decide] + ([native.impl] if native.NATIVE else [])
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
MiB = 1 << 20

RULE = """
rules:
  - name: repack
    match: {kind: fs.alloc, where: {ve: {exists: true}}}
    sustained: {where: {details.figures.fragmentation: {gt: 1.2}}, for: 30m%s}
    cooldown: 6h%s
    actions: [{shrink: {mode: repack}}]
"""


def alloc(t: float, frag: float | None, ve: str = "101", i: int = 0) -> dict:
    figures = {} if frag is None else {"fragmentation": frag}
    return {"kind": "fs.alloc", "time": T0 + t, "ve": ve, "id": f"{ve}-{t}-{i}",
            "device": {"name": "loop0"}, "details": {"figures": figures}}


def decisions(engine: Engine, events) -> list[tuple[float, str, str]]:
    return [(d.time - T0, d.outcome, d.detail) for e in events for d in engine.process(e)]


@pytest.fixture(params=IMPLS, ids=lambda m: "C" if m is not decide else "python")
def impl(request):
    return request.param


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_sustained_fires_once_held_for_its_duration(impl):
    e = Engine(parse_rules(RULE % ("", "")), impl=impl)
    got = decisions(e, [alloc(m * 60, 1.3) for m in range(0, 40, 5)])
    assert [o for _, o, _ in got] == ["sustained"] * 6 + ["fired", "cooldown"]
    assert got[0][2] == "held 0s of 30m" and got[5][2] == "held 25m of 30m"
    assert got[6][0] == 1800  # exactly 30 minutes after the first event above


def test_one_event_below_starts_the_count_again(impl):
    e = Engine(parse_rules(RULE % ("", "")), impl=impl)
    events = [alloc(0, 1.3), alloc(1200, 1.3), alloc(1500, 1.1), alloc(1800, 1.3), alloc(3000, 1.3),
              alloc(3600, 1.3)]
    got = decisions(e, events)
    # The event below makes no decision (the rule's sustained condition failed), and resets.
    assert [(t, o) for t, o, _ in got] == [(0, "sustained"), (1200, "sustained"), (1800, "sustained"),
                                           (3000, "sustained"), (3600, "fired")]
    assert e.stats.suppressed_sustained == 4 and e.stats.fired == 1


def test_an_event_without_the_figures_breaks_the_streak(impl):
    e = Engine(parse_rules(RULE % ("", "")), impl=impl)
    got = decisions(e, [alloc(0, 1.3), alloc(600, None), alloc(1800, 1.3)])
    assert [o for _, o, _ in got] == ["sustained", "sustained"]
    assert got[1][2] == "held 0s of 30m"


def test_a_silence_longer_than_max_gap_breaks_the_streak(impl):
    e = Engine(parse_rules(RULE % (", max_gap: 10m", "")), impl=impl)
    got = decisions(e, [alloc(t, 1.3) for t in (0, 600, 1900, 2400, 3000, 3600, 3700)])
    # 600 -> 1900 is 21m40s without an event: the count starts again at 1900
    assert [o for _, o, _ in got] == ["sustained"] * 6 + ["fired"]
    assert got[2][2] == "held 0s of 30m" and got[6][0] == 3700
    e2 = Engine(parse_rules(RULE % ("", "")), impl=impl)  # default max_gap = for (30m)
    got2 = decisions(e2, [alloc(0, 1.3), alloc(600, 1.3), alloc(1900, 1.3)])
    assert [o for _, o, _ in got2] == ["sustained", "sustained", "fired"]


def test_each_ve_holds_its_own_streak(impl):
    e = Engine(parse_rules(RULE % ("", "")), impl=impl)
    events = []
    for m in range(0, 35, 5):
        events += [alloc(m * 60, 1.3, "101"), alloc(m * 60, 1.1 if m == 20 else 1.3, "102")]
    fired = [(d.ve, d.time - T0) for ev in events for d in e.process(ev) if d.outcome == "fired"]
    assert fired == [("101", 1800)]


def test_the_c_core_and_the_python_twin_agree():
    if not native.NATIVE:
        pytest.skip(f"the C core is not built: {native.reason}")
    import random

    rnd = random.Random(16)
    events = []
    t = 0.0
    for i in range(3000):
        t += rnd.choice((10, 60, 60, 60, 300, 2400))
        events.append(alloc(t, rnd.choice((1.1, 1.25, 1.3, 1.4, None)), rnd.choice(("1", "2", "3")), i))
    rules = RULE % (", max_gap: 15m", "") + """
  - name: windowed
    match: {kind: fs.alloc}
    sustained: {where: {details.figures.fragmentation: {ge: 1.25}}, for: 10m}
    window: "22:00-03:00"
    threshold: {count: 2, within: 1h}
    cooldown: 1h
    actions: [{notify: {message: x}}]
"""
    a, b = Engine(parse_rules(rules), impl=decide), Engine(parse_rules(rules), impl=native.impl)
    assert [d[:9] for d in a.process_all(events)] == [d[:9] for d in b.process_all(events)]
    assert a.stats == b.stats and a.state() == b.state()
    assert a.stats.fired and a.stats.suppressed_sustained and a.stats.suppressed_window


def test_window_waits_then_fires_inside(impl, utc):
    # 08:00Z: outside 01:00-05:00; the sustained count goes on, and the first event inside fires.
    e = Engine(parse_rules(RULE % ("", '\n    window: "01:00-05:00"')), impl=impl)
    start = 1_799_971_200.0 - T0  # 2027-01-15T00:00:00Z relative to T0
    events = [alloc(start + m * 60, 1.3) for m in range(0, 24 * 60, 10)]
    got = decisions(e, events)
    fired = [t - start for t, o, _ in got if o == "fired"]
    assert fired == [3600]  # 01:00, the window opening, the condition held since 00:00
    outside = [x for x in got if x[1] == "window"]
    assert outside[0][0] - start == 1800 and outside[0][2] == "outside its window, opens in +30m"
    assert e.stats.suppressed_window == len(outside)


def test_window_wrapping_midnight(utc):
    w = (22 * 60, 3 * 60)
    day = 1_799_971_200.0  # a midnight, UTC
    assert seconds_until_window(w, day + 23 * 3600) == 0.0
    assert seconds_until_window(w, day + 2 * 3600 + 59 * 60) == 0.0
    assert seconds_until_window(w, day + 3 * 3600) == 19 * 3600
    assert seconds_until_window(w, day + 21 * 3600 + 30 * 60 + 15.5) == pytest.approx(29 * 60 + 44.5)


def test_streaks_survive_a_restart_and_recovery_clears_them(impl):
    rules = parse_rules(RULE % ("", ""))
    e = Engine(rules, impl=impl)
    decisions(e, [alloc(0, 1.3), alloc(1200, 1.3)])
    saved = e.state()
    assert saved["streaks"] == [["repack", "ve:101", T0, T0 + 1200]]
    e2 = Engine(rules, impl=impl)
    assert e2.restore(saved) == 1
    assert [o for _, o, _ in decisions(e2, [alloc(1800, 1.3)])] == ["fired"]
    e3 = Engine(rules, impl=impl)
    e3.restore(saved)
    e3.process({"kind": "dev.remove", "time": T0 + 1300, "ve": "101", "device": {"name": "loop0"}})
    assert e3.state()["streaks"] == []


def test_loader_names_what_is_wrong():
    bad = """
rules:
  - name: r
    match: {kind: fs.alloc}
    sustained: {where: {details.figures.fragmentation: {gt: 1.2}}, hold: 3m}
    window: "1-5"
    actions: [{shrink: {mode: repack}}]
"""
    with pytest.raises(RuleErrors) as ei:
        parse_rules(bad, "bad.yaml")
    text = str(ei.value)
    assert "bad.yaml:5:" in text and "rules[0].sustained" in text and "'for'" in text
    assert "bad.yaml:6:" in text and "rules[0].window" in text and "HH:MM-HH:MM" in text


def test_default_rules_schedule_a_repack_on_lasting_fragmentation():
    ruleset = load_rules([str(ROOT / "rules" / "default.yaml")])
    [rule] = [r for r in ruleset.rules if r.name == "fragmented-image-repack"]
    assert rule.actions[0].to_dict() == {"shrink": {"mode": "repack"}}
    assert rule.sustained.hold == 1800 and rule.cooldown == 6 * 3600
    e = Engine(ruleset)

    def ev(t: float, frag: float, slack: int = 400 * MiB, from_image: bool = True) -> dict:
        return {"kind": "fs.alloc", "time": T0 + t, "ve": "101", "id": f"e{t}", "device": {"name": "loop0"},
                "details": {"figures": {"fragmentation": frag, "slack_bytes": slack, "from_image": from_image}}}

    fired = [d for t in range(0, 7200, 60) for d in e.process(ev(t, 1.3)) if d.outcome == "fired"]
    assert [d.time - T0 for d in fired] == [1800]
    e = Engine(ruleset)
    quiet = [ev(t, 1.3, slack=100 * MiB) for t in range(0, 7200, 60)] + \
            [ev(t, 1.3, from_image=False) for t in range(7200, 14400, 60)]
    assert not [d for x in quiet for d in e.process(x) if d.outcome == "fired"]


# -- the executor: one heavy job at a time, a pass as one event ---------------------------------
def run_jobs(tmp_path, handlers, ds, **kw):
    events: list = []

    async def main():
        ex = Executor(JobJournal(str(tmp_path / "journal.jsonl")), handlers, events.append, **kw)
        for d in ds:
            ex.submit(d)
        await ex.idle()
        await ex.close()
        ex.journal.close()

    asyncio.run(main())
    return events


def rule_matched(i: int, ve: str, action: dict) -> dict:
    return {"id": f"dec-{i}", "kind": "rule.matched", "ve": ve, "device": {"name": f"loop{i}", "major": 7, "minor": i},
            "fs": "ext4", "mount": f"/vz/root/{ve}",
            "details": {"rule": "fragmented-image-repack", "actions": [action], "dry_run": False,
                        "event_ids": [f"ev-{i}"], "trigger_kind": "fs.alloc"}}


PASS = {"mode": "repack", "clusters_freed": 87, "bytes_moved": 234 * MiB, "seconds": 30.5, "moved_files": 1200,
        "skipped": {"metadata": 12, "directory": 40, "changing": 1}, "before": {"fragmentation": 1.39},
        "after": {"fragmentation": 1.08}, "released": 87 * MiB}


def test_repack_fsck_and_resize_of_different_ves_run_one_at_a_time(tmp_path):
    lock = threading.Lock()
    state = {"running": 0, "max": 0}
    order: list[str] = []

    def heavy(job: Job, step) -> dict:
        with lock:
            state["running"] += 1
            state["max"] = max(state["max"], state["running"])
            order.append(f"{job.ve}:{job.action}:{job.params.get('mode')}")
        time.sleep(0.05)
        with lock:
            state["running"] -= 1
        return dict(PASS) if job.params.get("mode") == "repack" else {}

    ds = [rule_matched(0, "101", {"shrink": {"mode": "repack"}}),
          rule_matched(1, "102", {"fsck": {"mode": "check"}}),
          rule_matched(2, "103", {"shrink": {"mode": "resize"}}),
          rule_matched(3, "104", {"shrink": {"mode": "repack"}})]
    events = run_jobs(tmp_path, {"shrink": heavy, "fsck": heavy}, ds, heavy_limit=1)
    assert state["max"] == 1 and len(order) == 4
    passes = [e for e in events if e.kind == "image.repacked"]
    assert [e.ve for e in passes] == ["101", "104"]


def test_a_repack_pass_is_one_image_repacked_event_with_its_figures(tmp_path):
    events = run_jobs(tmp_path, {"shrink": lambda job, step: dict(PASS)},
                      [rule_matched(0, "101", {"shrink": {"mode": "repack"}})])
    kinds = [e.kind for e in events]
    assert kinds == ["action.started", "action.succeeded", "image.repacked"]
    [p] = [e for e in events if e.kind == "image.repacked"]
    assert p.ve == "101" and p.device.name == "loop0" and p.severity == "info" and p.sources == ("actions",)
    for k, v in PASS.items():
        assert p.details[k] == v
    assert p.details["rule"] == "fragmented-image-repack" and p.details["job"] == "dec-0/0"

    # A trim is no repack; a dry run moved nothing: neither is a pass.
    (tmp_path / "trim").mkdir()
    events = run_jobs(tmp_path / "trim", {"shrink": lambda job, step: {"mode": "trim"}},
                      [rule_matched(1, "101", {"shrink": {"mode": "trim"}})])
    assert [e.kind for e in events] == ["action.started", "action.succeeded"]
    (tmp_path / "dry").mkdir()
    events = run_jobs(tmp_path / "dry", {"shrink": lambda job, step: dict(PASS)},
                      [rule_matched(2, "101", {"shrink": {"mode": "repack"}})], dry_run=True)
    assert "image.repacked" not in [e.kind for e in events]


def test_repack_metrics_from_the_events():
    m = Metrics()
    sink = MetricsSink(m)

    def event(kind: str, details: dict) -> Event:
        return Event(kind=kind, time=time.time(), host="h", severity="info", device=Device(7, 0, "loop0"), fs="ext4",
                     mount="/m", ve="101", kernel=Kernel(), sources=("actions",), details=details)

    sink.publish(event("image.repacked", {"action": "shrink", "params": {"mode": "repack"}, **PASS}))
    sink.publish(event("action.failed", {"action": "shrink", "params": {"mode": "repack"}, "dry_run": False}))
    sink.publish(event("action.succeeded", {"action": "shrink", "params": {"mode": "repack"}, "dry_run": True}))
    sink.publish(event("action.failed", {"action": "shrink", "params": {"mode": "trim"}}))
    sink.publish(event("fs.alloc", {"figures": {"garbage": 1.3, "fragmentation": 1.25, "swelling": 1.625,
                                                "df_ratio": 1.41}, "swelling": 2.5}))
    v = m.registry.get_sample_value
    assert v("fsnotifyd_repack_runs_total", {"ve": "101", "result": "succeeded"}) == 1
    assert v("fsnotifyd_repack_runs_total", {"ve": "101", "result": "failed"}) == 1
    assert v("fsnotifyd_repack_runs_total", {"ve": "101", "result": "dry_run"}) == 1
    assert v("fsnotifyd_repack_clusters_freed_total", {"ve": "101"}) == 87
    assert v("fsnotifyd_repack_moved_bytes_total", {"ve": "101"}) == 234 * MiB
    assert v("fsnotifyd_repack_seconds_sum", {}) == 30.5
    assert v("fsnotifyd_repack_skipped_total", {"ve": "101", "reason": "directory"}) == 40
    labels = {"device": "loop0", "ve": "101"}
    assert v("fsnotifyd_image_garbage_ratio", labels) == 1.3
    assert v("fsnotifyd_image_fragmentation_ratio", labels) == 1.25
    assert v("fsnotifyd_image_swelling_ratio", labels) == 1.625
    assert v("fsnotifyd_image_df_ratio", labels) == 1.41
    assert v("fsnotifyd_fs_swelling_ratio", labels) == 2.5  # the BPF figure stays its own


# -- when the figures are measured ----------------------------------------------------------------
def test_figures_clock_measures_each_fs_once_per_interval():
    c = FiguresClock(60.0)
    assert c.due(1, 7, 100.0)
    c.put(1, 7, 100.0, {"fragmentation": 1.3})
    assert not c.due(1, 7, 159.0) and c.due(1, 7, 160.0)
    assert c.due(1, 8, 101.0)  # another mount on the device: afresh
    assert c.unpublished(1, 7)
    assert c.current(1, 7, 130.0) == {"fragmentation": 1.3, "age_s": 30.0}
    assert not c.unpublished(1, 7)
    assert c.current(1, 8, 130.0) is None
    c.put(2, 1, 100.0, None)  # a failed measurement waits an interval too, and publishes nothing
    assert not c.due(2, 1, 120.0) and c.current(2, 1, 120.0) is None and not c.unpublished(2, 1)
    c.forget({2})
    assert c.current(1, 7, 130.0) is None


def test_inventory_places_a_loop_on_an_image():
    from fsnotifyd.inventory import Inventory, SysBlock
    from fsnotifyd.mountinfo import parse_mountinfo

    class Sys(SysBlock):
        def name(self, major, minor):
            return f"loop{minor}"

        def backing_file(self, name):
            return {"loop3": "/run/fsnotifyd/images/fuse/x/disk (deleted)", "loop4": "/srv/plain.img"}.get(name)

    lines = ["36 25 7:3 / /vz/root/101 rw,relatime shared:1 - ext4 /dev/loop3 rw",
             "37 25 7:4 / /vz/root/102 rw,relatime shared:1 - ext4 /dev/loop4 rw"]
    inv = Inventory(mountinfo=lambda: parse_mountinfo("\n".join(lines) + "\n"), sys=Sys(),
                    images=lambda: [("/run/fsnotifyd/images/fuse/x/disk", "/vz/private/101/root.hdd")])
    by_mount = {p.mount: p for p in inv.mounts()}
    assert by_mount["/vz/root/101"].image == "/vz/private/101/root.hdd"
    assert by_mount["/vz/root/102"].image is None
