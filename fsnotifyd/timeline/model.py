"""Incidents from journaled events: which events belong together, in what order, how long each took.

An incident is the chain of one VE's events that starts at a kernel error (``fs.error``,
``fs.readonly``, ``fs.shutdown``, ``fs.mount_failed``, ``blk.io_error``) and runs through what
the daemon decided and did about it: ``rule.matched``, the jobs (``action.started`` /
``succeeded`` / ``failed``), their findings (``fsck.result``, ``image.repacked``,
``notification``) and the release (``ve.released``). Decisions are tied to their incident by
the ids they carry (a decision's ``details.event_ids``, a job event's ``details.decision``), so
a job that runs long after its error still lands in the right incident; a new error of the VE
joins the incident in progress. An incident ends when the VE is released, when a repair
started it again (the repair clears the isolation), or after :data:`QUIET_GAP` without events.

Each event becomes one :class:`Line` with its step (``error``, ``decision``, ``snapshot``,
``check``, ``isolate``, ``repair``, ``released``, ``notify`` …; an ``fs.readonly`` that is a
plain remount, as an isolation makes, is ``readonly`` and starts no incident) and the seconds since the
previous line and the first line of its incident. Each job becomes a :class:`Span` from its
start to its end. Pure: events in, a :class:`Timeline` out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

HOST_LANE = "host"  # events of no VE (the host's own filesystems) share one lane

ERROR_KINDS = frozenset({"fs.error", "fs.readonly", "fs.shutdown", "fs.mount_failed", "blk.io_error"})
# Kinds that are part of an incident's chain; the others (source.up, fs.alloc …) only with everything=True.
CHAIN_KINDS = ERROR_KINDS | frozenset({
    "fs.warning", "fs.writable", "rule.matched", "action.started", "action.succeeded", "action.failed",
    "fsck.result", "image.repacked", "notification", "ve.released",
})
JOB_KINDS = frozenset({"action.started", "action.succeeded", "action.failed"})
QUIET_GAP = 3600.0  # seconds without an event after which a VE's next error is a new incident

STEPS = ("error", "decision", "snapshot", "check", "isolate", "repair", "released", "notify", "shrink",
         "exec", "readonly", "writable", "other")
# fs.readonly reasons that are a remount someone asked for (an isolation, an operator), not an error.
REMOUNT_REASONS = frozenset({"remounted_ro"})
_ACTION_STEP = {"snapshot": "snapshot", "isolate": "isolate", "notify": "notify", "shrink": "shrink",
                "exec": "exec"}


@dataclass(frozen=True, slots=True)
class Line:
    """One event, as the timeline shows it."""

    time: float
    lane: str  # the VE, or HOST_LANE
    incident: str | None  # "<lane>#<n>"; None for an event outside any incident
    step: str  # one of STEPS
    kind: str
    phase: str  # "started", "succeeded", "failed" (jobs), "result" (fsck.result), else ""
    severity: str
    summary: str
    event_id: str
    job: str | None = None
    since_previous: float | None = None  # seconds since the previous line of the same incident
    since_start: float | None = None  # seconds since the incident's first line
    took: float | None = None  # a job's end: how long it ran

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "lane": self.lane, "incident": self.incident, "step": self.step,
                "kind": self.kind, "phase": self.phase, "severity": self.severity, "summary": self.summary,
                "event_id": self.event_id, "job": self.job, "since_previous_s": _round(self.since_previous),
                "since_start_s": _round(self.since_start), "took_s": _round(self.took)}


@dataclass(frozen=True, slots=True)
class Span:
    """One job, from its start to its end (``end`` None: not finished in the events read)."""

    lane: str
    incident: str | None
    step: str
    job: str
    start: float
    end: float | None
    outcome: str | None  # "succeeded", "failed", None while running


@dataclass(slots=True)
class Incident:
    id: str
    lane: str
    start: float
    end: float
    steps: list[str] = field(default_factory=list)  # each step once, in the order first reached
    released: bool = False
    open: bool = True

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Timeline:
    lines: tuple[Line, ...]
    spans: tuple[Span, ...]
    incidents: tuple[Incident, ...]

    @property
    def lanes(self) -> tuple[str, ...]:
        """Lanes in the order their first line appears."""
        return tuple(dict.fromkeys(ln.lane for ln in self.lines))

    @property
    def start(self) -> float | None:
        times = [ln.time for ln in self.lines] + [s.start for s in self.spans]
        return min(times) if times else None

    @property
    def end(self) -> float | None:
        times = [ln.time for ln in self.lines] + [s.end for s in self.spans if s.end is not None]
        return max(times) if times else None


def step_of(event: Mapping[str, Any]) -> tuple[str, str]:
    """(step, phase) of one event."""
    kind = str(event.get("kind"))
    details = event.get("details") or {}
    if kind == "fs.readonly" and details.get("reason") in REMOUNT_REASONS:
        return "readonly", ""
    if kind in ERROR_KINDS or kind == "fs.warning":
        return "error", ""
    if kind == "rule.matched":
        return "decision", ""
    if kind == "ve.released":
        return "released", ""
    if kind == "fs.writable":
        return "writable", ""
    if kind == "notification":
        return "notify", ""
    if kind == "fsck.result":
        return ("repair" if details.get("mode") == "repair" else "check"), "result"
    if kind == "image.repacked":
        return "shrink", "result"
    if kind in JOB_KINDS:
        action = str(details.get("action"))
        if action == "fsck":
            mode = (details.get("params") or {}).get("mode", "check")
            step = "repair" if mode == "repair" else "check"
        else:
            step = _ACTION_STEP.get(action, "other")
        return step, kind.split(".", 1)[1]
    return "other", ""


def summary_of(event: Mapping[str, Any]) -> str:
    """A few words on what the event says, for the text list."""
    kind = event.get("kind")
    d = event.get("details") or {}
    k = event.get("kernel") or {}
    dev = (event.get("device") or {}).get("name")
    if kind in ERROR_KINDS or kind in ("fs.warning", "fs.writable"):
        errno = (k.get("errno") or {}).get("name") if isinstance(k.get("errno"), dict) else None
        parts = [dev, event.get("mount"), errno, k.get("function"),
                 repr(k["message"]) if k.get("message") else None, d.get("reason")]
        count = event.get("count")
        text = " ".join(str(p) for p in parts if p)
        return text + (f" (count {count})" if isinstance(count, int) and count > 1 else "")
    if kind == "rule.matched":
        names = [next(iter(a)) for a in d.get("actions") or [] if isinstance(a, dict) and a]
        return f"{d.get('rule')}: {', '.join(names) or 'no actions'}" + (" (dry run)" if d.get("dry_run") else "")
    if kind in JOB_KINDS:
        params = d.get("params") or {}
        text = " ".join([str(d.get("action")), *(f"{k}={v}" for k, v in params.items())])
        if kind == "action.failed":
            return f"{text}: {d.get('error')}"
        if kind == "action.succeeded":
            words = _result_words(d.get("action"), d.get("result") or {})
            if "restarted" in (d.get("steps_done") or []):
                words = ", ".join(w for w in (words, "VE started again, isolation cleared") if w)
            return f"{text}: {words}" if words else text
        return text + (" (resumed)" if d.get("resumed") else "")
    if kind == "fsck.result":
        problems = d.get("problems")
        return (f"{d.get('mode')} {d.get('result')}, exit {d.get('exit_code')}"
                + (f", {problems} problems" if problems else "")
                + (f", snapshot {_short(d['snapshot'])}" if d.get("snapshot") else ""))
    if kind == "notification":
        return str(d.get("message") or "")
    if kind == "ve.released":
        return f"isolation {d.get('mode')} ({d.get('how')}) undone"
    if kind == "image.repacked":
        return f"{d.get('clusters_freed')} clusters freed, {d.get('released')} bytes released"
    return str(d.get("reason") or d.get("source") or "")


def _result_words(action: Any, result: Mapping[str, Any]) -> str:
    if not result:
        return ""
    if result.get("deduplicated_into"):
        return f"done by {result['deduplicated_into']}"
    if result.get("dry_run"):
        return "dry run"
    if action == "snapshot" and result.get("guid"):
        return f"guid {_short(result['guid'])}"
    if action == "isolate":
        return str(result.get("how") or result.get("mode") or "")
    if action == "fsck":
        return str(result.get("result") or "")
    return ""


def build(items: Iterable[tuple[float, Mapping[str, Any]]], *, ves: Iterable[str] = (),
          since: float | None = None, until: float | None = None, everything: bool = False,
          quiet_gap: float = QUIET_GAP) -> Timeline:
    """The timeline of ``items`` (``(epoch seconds, event)``, in time order as the replay reader
    gives them). ``ves``: only these lanes (VE ids; ``host`` for events of no VE). ``since`` /
    ``until``: only lines in that window; incidents are still built from every event before
    ``until``, so a window that starts mid-incident keeps the incident's name and durations.
    ``everything``: also the events that are no part of any chain (source.up, fs.alloc …)."""
    wanted = frozenset(ves)
    b = _Builder(quiet_gap)
    for t, event in items:
        if until is not None and t > until:
            break
        kind = str(event.get("kind"))
        if kind not in CHAIN_KINDS and not everything:
            continue
        lane = str(event.get("ve")) if event.get("ve") is not None else HOST_LANE
        if wanted and lane not in wanted:
            continue
        b.add(t, lane, event, keep=since is None or t >= since)
    lines = tuple(b.lines)
    shown = {ln.incident for ln in lines}
    spans = tuple(s for s in b.spans() if since is None or s.end is None or s.end >= since)
    return Timeline(lines, spans, tuple(i for i in b.incidents if i.id in shown))


class _Builder:
    def __init__(self, quiet_gap: float) -> None:
        self.quiet_gap = quiet_gap
        self.lines: list[Line] = []
        self.incidents: list[Incident] = []
        self._open: dict[str, Incident] = {}  # lane → its incident in progress
        self._of_event: dict[str, Incident] = {}  # event / decision id → incident
        self._last: dict[str, float] = {}  # incident id → time of its latest line
        self._numbers: dict[str, int] = {}
        self._starts: dict[str, tuple[float, str, str | None, str]] = {}  # job → (start, lane, incident, step)
        self._ends: dict[str, tuple[float, str]] = {}  # job → (end, outcome)

    def add(self, t: float, lane: str, event: Mapping[str, Any], *, keep: bool) -> None:
        kind = str(event.get("kind"))
        step, phase = step_of(event)
        incident = self._incident_of(t, lane, kind, event)
        d = event.get("details") or {}
        job = str(d["job"]) if kind in JOB_KINDS and d.get("job") is not None else None
        previous = start = None
        if incident is not None:
            last = self._last.get(incident.id)
            previous = None if last is None else t - last  # None: the incident's first line
            start = t - incident.start
            self._last[incident.id] = t
            incident.end = max(incident.end, t)
            if step not in incident.steps:
                incident.steps.append(step)
            if step == "released" or (kind == "action.succeeded" and step == "repair"
                                       and "restarted" in (d.get("steps_done") or [])):
                incident.released, incident.open = True, False
                if self._open.get(lane) is incident:
                    del self._open[lane]
        took = None
        if job is not None:
            if kind == "action.started":
                self._starts.setdefault(job, (t, lane, incident.id if incident else None, step))
            else:
                self._ends[job] = (t, phase)
                duration = d.get("duration_s")
                took = float(duration) if isinstance(duration, (int, float)) else None
                self._starts.setdefault(job, (t - (took or 0.0), lane, incident.id if incident else None, step))
        if keep:
            self.lines.append(Line(time=t, lane=lane, incident=incident.id if incident else None, step=step,
                                   kind=kind, phase=phase, severity=str(event.get("severity") or "info"),
                                   summary=summary_of(event), event_id=str(event.get("id")), job=job,
                                   since_previous=previous, since_start=start, took=took))

    def _incident_of(self, t: float, lane: str, kind: str, event: Mapping[str, Any]) -> Incident | None:
        d = event.get("details") or {}
        linked = None
        if kind == "rule.matched":
            linked = next((self._of_event[i] for i in d.get("event_ids") or [] if i in self._of_event), None)
        elif d.get("decision") is not None and kind != "ve.released":
            linked = self._of_event.get(str(d["decision"]))
        current = self._open.get(lane)
        if current is not None and t - self._last.get(current.id, current.end) > self.quiet_gap:
            current.open = False
            del self._open[lane]
            current = None
        incident = linked
        if incident is None and kind in ERROR_KINDS and step_of(event)[0] == "error":
            incident = current or self._new(t, lane)
        elif incident is None and kind in ("ve.released", "fs.writable", "fs.warning", "fs.readonly"):
            incident = current
        elif incident is None and kind == "rule.matched" and d.get("trigger_kind") in ERROR_KINDS:
            incident = current  # its trigger was read before the window, or rotated away
        if incident is not None and event.get("id") is not None:
            self._of_event[str(event["id"])] = incident
        return incident

    def _new(self, t: float, lane: str) -> Incident:
        n = self._numbers[lane] = self._numbers.get(lane, 0) + 1
        incident = Incident(id=f"{lane}#{n}", lane=lane, start=t, end=t)
        self.incidents.append(incident)
        self._open[lane] = incident
        return incident

    def spans(self) -> list[Span]:
        out = []
        for job, (start, lane, incident, step) in self._starts.items():
            end = self._ends.get(job)
            out.append(Span(lane=lane, incident=incident, step=step, job=job, start=start,
                            end=end[0] if end else None, outcome=end[1] if end else None))
        return sorted(out, key=lambda s: (s.start, s.job))


def _short(guid: Any) -> str:
    """The first 8 hex digits of a GUID (images write them in braces), enough to find it in `image snapshots`."""
    return str(guid).strip("{}")[:8]


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
