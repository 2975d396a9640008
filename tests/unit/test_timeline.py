"""The incident model, its text/JSON/HTML renderings and `events log` over journals written by the
real journal sink (rotation included). The journal a real daemon writes is in
tests/integration/test_events_log.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fsnotifyd.app.eventslog import journal_files
from fsnotifyd.cli import main
from fsnotifyd.events import Device, Event, Kernel
from fsnotifyd.sinks.journal import JournalSink
from fsnotifyd.timeline import html, model, text
from fsnotifyd.timeline.when import parse_when

T0 = 1_796_191_200.0  # 2026-12-02T06:00:00Z


def ev(kind: str, t: float, ve: str | None, id: str, severity: str = "info", **details: Any) -> Event:
    return Event(kind=kind, time=T0 + t, host="h", severity=severity,
                 device=Device(7, 0, "loop0") if kind.startswith("fs.") else None, fs="ext4", mount=None, ve=ve,
                 kernel=Kernel(errno=117, function="trigger_test_error", message="boom")
                 if kind == "fs.error" else Kernel(),
                 sources=("kmsg",), details=details, id=id)


def job(kind: str, t: float, ve: str, decision: str, i: int, action: str, mode: str | None = None,
        **extra: Any) -> Event:
    params = {"mode": mode} if mode else {}
    return ev(kind, t, ve, f"{decision}/{i}/{kind}", severity="error" if kind == "action.failed" else "info",
              job=f"{decision}/{i}", action=action, params=params, decision=decision, rule="r", **extra)


def incident_events() -> list[Event]:
    """VE 101: error, snapshot and check (errors), isolate and repair (which restarts it); VE 102: one
    error; two hours later VE 101 again, released by a person."""
    return [
        ev("fs.error", 0.0, "101", "e1", "error"),
        ev("rule.matched", 0.010, "101", "d1", "warning", rule="first-error-snapshot-and-check", event_ids=["e1"],
           actions=[{"snapshot": {"keep": 3}}, {"fsck": {"mode": "check"}}], trigger_kind="fs.error"),
        job("action.started", 0.020, "101", "d1", 0, "snapshot"),
        ev("fs.error", 1.0, "102", "e2", "error"),
        job("action.succeeded", 0.500, "101", "d1", 0, "snapshot", duration_s=0.48, result={"guid": "abcdef0123"}),
        job("action.started", 0.510, "101", "d1", 1, "fsck", "check"),
        ev("fsck.result", 2.000, "101", "c1", "error", mode="check", result="errors", exit_code=4, decision="d1",
           job="d1/1", action="fsck"),
        job("action.succeeded", 2.001, "101", "d1", 1, "fsck", "check", duration_s=1.49),
        ev("rule.matched", 2.010, "101", "d2", "warning", rule="check-found-errors-repair", event_ids=["c1"],
           actions=[{"isolate": {"mode": "readonly"}}, {"fsck": {"mode": "repair"}}], trigger_kind="fsck.result"),
        job("action.started", 2.020, "101", "d2", 0, "isolate", "readonly"),
        job("action.succeeded", 2.100, "101", "d2", 0, "isolate", "readonly", duration_s=0.08,
            result={"how": "remount-ro"}),
        job("action.started", 2.110, "101", "d2", 1, "fsck", "repair"),
        job("action.succeeded", 5.000, "101", "d2", 1, "fsck", "repair", duration_s=2.89,
            steps_done=["stopped", "snapshot", "repaired", "restarted"]),
        ev("source.up", 6.0, None, "s1", source="kmsg"),
        ev("fs.error", 7200.0, "101", "e3", "error"),
        ev("ve.released", 7300.0, "101", "r1", mode="readonly", how="remount-ro"),
    ]


def items(events: list[Event]) -> list[tuple[float, dict[str, Any]]]:
    return sorted(((e.time, e.to_dict()) for e in events), key=lambda x: x[0])


class TestModel:
    def test_incidents_per_ve_with_their_steps(self) -> None:
        """Decisions and jobs join the incident of the error they came from; a repair that started
        the VE again ends it; an error after a quiet gap starts the next one."""
        tl = model.build(items(incident_events()))
        got = {i.id: (i.steps, i.released) for i in tl.incidents}
        assert got == {
            "101#1": (["error", "decision", "snapshot", "check", "isolate", "repair"], True),
            "102#1": (["error"], False),
            "101#2": (["error", "released"], True),
        }
        assert tl.lanes == ("101", "102")
        assert "source.up" not in {ln.kind for ln in tl.lines}
        assert "source.up" in {ln.kind for ln in model.build(items(incident_events()), everything=True).lines}

    def test_durations_since_the_previous_step_and_the_start(self) -> None:
        tl = model.build(items(incident_events()))
        by_id = {ln.event_id: ln for ln in tl.lines}
        snap_done = by_id["d1/0/action.succeeded"]
        assert snap_done.incident == "101#1" and snap_done.step == "snapshot" and snap_done.phase == "succeeded"
        # the previous line of 101#1 is the snapshot's start (VE 102's error in between is another incident)
        assert snap_done.since_previous == pytest.approx(0.48) and snap_done.since_start == pytest.approx(0.5)
        assert snap_done.took == pytest.approx(0.48)
        assert by_id["e2"].since_previous is None and by_id["e2"].since_start == 0.0 and by_id["e2"].incident == "102#1"
        repair = by_id["d2/1/action.succeeded"]
        assert repair.step == "repair" and repair.since_start == pytest.approx(5.0)
        assert repair.since_previous == pytest.approx(5.0 - 2.110)
        released = by_id["r1"]
        assert released.incident == "101#2" and released.since_previous == pytest.approx(100.0)
        [i2] = [i for i in tl.incidents if i.id == "101#2"]
        assert i2.duration == pytest.approx(100.0)

    def test_jobs_are_spans_from_start_to_end(self) -> None:
        tl = model.build(items(incident_events()))
        spans = {s.job: s for s in tl.spans}
        assert set(spans) == {"d1/0", "d1/1", "d2/0", "d2/1"}
        s = spans["d1/0"]
        assert s.end is not None
        assert (s.step, s.start - T0, s.end - T0, s.outcome) == ("snapshot", pytest.approx(0.02), pytest.approx(0.5),
                                                               "succeeded")
        assert spans["d2/1"].step == "repair" and spans["d2/0"].step == "isolate"

    def test_a_job_whose_start_is_not_read_spans_back_by_its_duration(self) -> None:
        events = [e for e in incident_events() if e.id != "d1/0/action.started"]
        s = {s.job: s for s in model.build(items(events)).spans}["d1/0"]
        assert s.start - T0 == pytest.approx(0.02)

    def test_since_and_until_keep_incident_names_and_durations(self) -> None:
        tl = model.build(items(incident_events()), since=T0 + 1.5, until=T0 + 3600)
        assert all(T0 + 1.5 <= ln.time <= T0 + 3600 for ln in tl.lines)
        first = tl.lines[0]
        assert first.kind == "fsck.result" and first.incident == "101#1"
        assert first.since_start == pytest.approx(2.0) and first.since_previous == pytest.approx(2.0 - 0.51)
        assert [i.id for i in tl.incidents] == ["101#1"]  # 102#1 is all before the window, 101#2 after

    def test_ve_filter(self) -> None:
        tl = model.build(items(incident_events()), ves=["102"])
        assert {ln.lane for ln in tl.lines} == {"102"} and [i.id for i in tl.incidents] == ["102#1"]

    def test_errors_of_no_ve_are_the_host_lane(self) -> None:
        events = [ev("fs.error", 0.0, None, "h1", "error"),
                  ev("rule.matched", 0.01, None, "hd", "warning", rule="host-fs-error-notify", event_ids=["h1"],
                     actions=[{"notify": {}}], trigger_kind="fs.error"),
                  ev("action.started", 0.02, None, "hd/0/s", job="hd/0", action="notify", params={}, decision="hd")]
        tl = model.build(items(events) + items([ev("fs.error", 1.0, "101", "e1", "error")]), ves=["host"])
        assert [(ln.lane, ln.incident, ln.step) for ln in tl.lines] == [
            ("host", "host#1", "error"), ("host", "host#1", "decision"), ("host", "host#1", "notify")]
        assert "host</text>" in html.render(tl)

    def test_a_failed_job(self) -> None:
        events = incident_events()[:6] + [job("action.failed", 3.0, "101", "d1", 1, "fsck", "check",
                                              duration_s=2.49, error="e2fsck failed")]
        tl = model.build(items(events))
        [failed] = [ln for ln in tl.lines if ln.kind == "action.failed"]
        assert failed.step == "check" and failed.phase == "failed" and "e2fsck failed" in failed.summary
        assert {s.job: s.outcome for s in tl.spans}["d1/1"] == "failed"


    def test_a_remount_read_only_is_a_state_of_the_incident_not_a_new_one(self) -> None:
        """The fs.readonly an isolation's remount makes joins the incident; alone it starts none, while
        a read-only the kernel forced is an error that does."""
        events = incident_events()[:3] + [ev("fs.readonly", 0.4, "101", "ro1", "critical", reason="remounted_ro"),
                                          ev("fs.readonly", 0.5, "103", "ro2", "critical", reason="remounted_ro"),
                                          ev("fs.readonly", 0.6, "104", "ro3", "critical", reason="errors_remount_ro")]
        tl = model.build(items(events))
        by_id = {ln.event_id: ln for ln in tl.lines}
        assert (by_id["ro1"].step, by_id["ro1"].incident) == ("readonly", "101#1")
        assert (by_id["ro2"].step, by_id["ro2"].incident) == ("readonly", None)
        assert (by_id["ro3"].step, by_id["ro3"].incident) == ("error", "104#1")


class TestWhen:
    @pytest.mark.parametrize("value, back", [("1h", 3600), ("30m", 1800), ("90s", 90), ("1h30m", 5400), ("2d", 172800)])
    def test_durations_count_back_from_now(self, value: str, back: float) -> None:
        assert parse_when(value, T0) == T0 - back

    @pytest.mark.parametrize("value", ["2026-12-02T06:00:00Z", "2026-12-02T07:00:00+01:00", "2026-12-02T06:00:00.000Z"])
    def test_iso_times(self, value: str) -> None:
        assert parse_when(value, 0.0) == T0

    @pytest.mark.parametrize("value", ["yesterday", "5", "1x", ""])
    def test_anything_else_is_refused_saying_what_is_accepted(self, value: str) -> None:
        with pytest.raises(ValueError, match="duration .* ISO time"):
            parse_when(value, T0)


def write_journal(path: Path, events: list[Event], max_bytes: int = 1 << 30) -> None:
    sink = JournalSink(str(path), max_bytes=max_bytes, keep=50)
    try:
        for e in events:
            sink.publish(e)
    finally:
        sink.close()


class TestJournalAndCli:
    def test_rotated_files_are_read_oldest_first_and_give_the_same_timeline(self, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
        whole, rotated = tmp_path / "a" / "events.jsonl", tmp_path / "b" / "events.jsonl"
        write_journal(whole, incident_events())
        write_journal(rotated, incident_events(), max_bytes=2048)  # the real sink rotates every few events
        files = journal_files(str(rotated))
        assert len(files) >= 4 and files[-1] == str(rotated)
        assert [int(f.rsplit(".", 1)[1]) for f in files[:-1]] == sorted((int(f.rsplit(".", 1)[1]) for f in files[:-1]),
                                                                       reverse=True)
        assert main(["events", "log", "--journal", str(whole)]) == 0
        one = capsys.readouterr().out
        assert main(["events", "log", "--journal", str(rotated)]) == 0
        assert capsys.readouterr().out == one
        assert "101#1" in one and "3 incident(s):" in one

    def test_text_lines(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        j = tmp_path / "events.jsonl"
        write_journal(j, incident_events())
        assert main(["events", "log", "--journal", str(j), "--ve", "101"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:5] == ["time", "VE", "incident", "step", "event"]
        snap = next(line for line in out if "snapshot succeeded" in line)
        assert snap.split()[:7] == ["2026-12-02T06:00:00.500Z", "101", "101#1", "snapshot", "snapshot", "succeeded",
                                    "0.480s"]
        assert "snapshot: guid abcdef01 (took 0.480s)" in snap
        assert any(line.strip().startswith("101#1  2026-12-02T06:00:00.000Z → 2026-12-02T06:00:05.000Z  5.000s  "
                                           "released:  error → decision → snapshot → check → isolate → repair")
                   for line in out), out

    def test_json_lines(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        j = tmp_path / "events.jsonl"
        write_journal(j, incident_events())
        assert main(["events", "log", "--journal", str(j), "--json", "--since", "2026-12-02T06:00:01.5Z",
                     "--until", "2026-12-02T06:00:05Z"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["step"] for r in rows] == ["check", "check", "decision", "isolate", "isolate", "repair", "repair"]
        assert rows[0]["time"] == "2026-12-02T06:00:02.000000Z" and rows[0]["incident"] == "101#1"
        assert rows[-1]["took_s"] == 2.89 and rows[-1]["since_start_s"] == 5.0

    def test_html_is_self_contained_and_lists_every_line(self, tmp_path: Path) -> None:
        j, page = tmp_path / "events.jsonl", tmp_path / "t.html"
        write_journal(j, incident_events())
        assert main(["events", "log", "--journal", str(j), "--format", "html", "--output", str(page)]) == 0
        doc = page.read_text()
        for fetch in ("src=", "href=", "url(", "@import", "<link"):
            assert fetch not in doc
        assert doc.count('class="mark"') == 15 and doc.count('class="span"') == 4
        assert doc.count("<tr id=") == 15
        for colour in (html.STEP_COLOURS[s] for s in ("error", "snapshot", "check", "isolate", "repair", "released")):
            assert f'fill="{colour}"' in doc
        assert html.lane_colour(0) in doc and html.lane_colour(1) in doc

    def test_no_journal_and_bad_times(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["events", "log", "--journal", str(tmp_path / "none.jsonl")]) == 1
        assert "no journal at" in capsys.readouterr().err
        j = tmp_path / "events.jsonl"
        write_journal(j, incident_events())
        assert main(["events", "log", "--journal", str(j), "--since", "yesterday"]) == 2
        assert "'yesterday' is neither a duration" in capsys.readouterr().err

    def test_the_config_names_the_journal(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        j = tmp_path / "events.jsonl"
        write_journal(j, incident_events())
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"state_dir: {tmp_path}/state\njournal: {{path: {j}}}\n")
        assert main(["events", "log", "--config", str(cfg)]) == 0
        assert "102#1" in capsys.readouterr().out
        cfg.write_text(f"state_dir: {tmp_path}/state\njournal: null\n")
        assert main(["events", "log", "--config", str(cfg)]) == 2
        assert "journal is off" in capsys.readouterr().err

    def test_a_bad_line_is_named_and_the_rest_is_read(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        j = tmp_path / "events.jsonl"
        write_journal(j, incident_events())
        with open(j, "a") as f:
            f.write("{not json\n")
        assert main(["events", "log", "--journal", str(j)]) == 0
        captured = capsys.readouterr()
        assert f"{j}:17: not JSON" in captured.err and "101#2" in captured.out


def test_every_step_has_its_own_colour_apart_from_the_lanes() -> None:
    assert set(html.STEP_COLOURS) == set(model.STEPS)
    assert len(set(html.STEP_COLOURS.values())) == len(html.STEP_COLOURS)
    assert not set(html.STEP_COLOURS.values()) & set(html.LANE_COLOURS)


def test_durations_read_well() -> None:
    assert [text.duration(s) for s in (None, 0.0421, 12.53, 185, 8040, 3 * 86400 + 4 * 3600)] == \
        ["-", "0.042s", "12.5s", "3m05s", "2h14m", "3d04h"]


def test_journal_files_ignore_other_names(tmp_path: Path) -> None:
    for name in ("events.jsonl", "events.jsonl.1", "events.jsonl.10", "events.jsonl.2.gz", "events.jsonl.bak",
                 "events.jsonl.1.tmp", "other.jsonl.1"):
        (tmp_path / name).write_text("")
    assert [os.path.basename(p) for p in journal_files(str(tmp_path / "events.jsonl"))] == \
        ["events.jsonl.10", "events.jsonl.2.gz", "events.jsonl.1", "events.jsonl"]
