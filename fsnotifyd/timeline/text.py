"""The timeline as text: one line per event in time order, then one line per incident; or the
same lines as JSON (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

from ..events import rfc3339
from .model import Incident, Line, Timeline

HEADER = ("time", "VE", "incident", "step", "event", "+prev", "+start", "what")


def clock(t: float) -> str:
    """RFC 3339 UTC to the millisecond: the journal's own zone, short enough to scan."""
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float | None) -> str:
    """``0.042s``, ``12.5s``, ``3m05s``, ``2h14m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.3f}s"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def event_label(line: Line) -> str:
    return line.kind if not line.phase or line.phase == "result" else f"{line.step} {line.phase}"


def what(line: Line) -> str:
    took = f" (took {duration(line.took)})" if line.took is not None else ""
    return line.summary + took


def rows(tl: Timeline) -> list[tuple[str, ...]]:
    """The cells of each line, as the text and the HTML list show them."""
    return [(clock(ln.time), ln.lane, ln.incident or "-", ln.step, event_label(ln),
             duration(ln.since_previous) if ln.incident else "", duration(ln.since_start) if ln.incident else "",
             what(ln)) for ln in tl.lines]


def incident_summary(i: Incident) -> str:
    state = "released" if i.released else ("open" if i.open else "ended")
    return (f"{i.id}  {clock(i.start)} → {clock(i.end)}  {duration(i.duration)}  {state}:  "
            + " → ".join(i.steps))


def render(tl: Timeline) -> str:
    if not tl.lines:
        return "no events\n"
    table = [HEADER, *rows(tl)]
    widths = [max(len(r[c]) for r in table) for c in range(len(HEADER) - 1)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in table]
    if tl.incidents:
        out += ["", f"{len(tl.incidents)} incident(s):"] + [f"  {incident_summary(i)}" for i in tl.incidents]
    return "\n".join(line.rstrip() for line in out) + "\n"


def render_json(tl: Timeline) -> Iterator[str]:
    """One JSON object per line (``time`` as RFC 3339), in the same order as :func:`render`."""
    for ln in tl.lines:
        d = ln.as_dict()
        d["time"] = rfc3339(ln.time)
        yield json.dumps(d, separators=(",", ":"))
