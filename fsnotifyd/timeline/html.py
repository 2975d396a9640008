"""The timeline as one self-contained HTML page: inline CSS, SVG and a few lines of JS, nothing
fetched from anywhere (the page is opened on machines with no network, attached to tickets).

A lane per VE (a coloured swatch and the VE id on the left); in it, kernel events on the upper
row, the daemon's decisions, job ends and findings on the middle row, and each job as a bar from
its start to its end on the lower row. A mark's shape says the kind of event, its colour the
step (:data:`STEP_COLOURS`) and its outline the severity. A time axis under the lanes, a
legend, and the text list (the same rows as ``events log`` prints) below.

:class:`Layout` fixes where everything is on the page, in CSS pixels from the page's top left
corner, so that a screenshot can be checked against it (tests/integration/test_events_log.py).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass

from . import text
from .model import ERROR_KINDS, HOST_LANE, Line, Span, Timeline

STEP_COLOURS = {
    "error": "#d62728",
    "decision": "#9467bd",
    "snapshot": "#1f77b4",
    "check": "#17becf",
    "isolate": "#ff7f0e",
    "repair": "#2ca02c",
    "released": "#8c564b",
    "notify": "#e377c2",
    "shrink": "#bcbd22",
    "exec": "#393b79",
    "readonly": "#843c39",
    "writable": "#637939",
    "other": "#7f7f7f",
}
# One swatch per lane; none of them is a step colour, so a screenshot tells lanes and marks apart.
LANE_COLOURS = ("#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#5f3dc4", "#087f5b", "#a61e4d", "#364fc7")
SEVERITY_STROKE = {"critical": ("#000000", 2.5), "error": ("#000000", 1.5), "warning": ("#555555", 1.0)}
GRID = "#e6e6e6"
LANE_BACKGROUNDS = ("#fafafa", "#f1f3f5")


@dataclass(frozen=True, slots=True)
class Layout:
    """Page geometry in CSS pixels (a screenshot at device scale 1 has the same pixels)."""

    left: int = 16  # the drawing's left edge on the page
    top: int = 72  # the drawing's top edge on the page (below the title, fixed height)
    width: int = 1320
    label: int = 120  # lane labels, left of the plot
    right_pad: int = 24
    lane: int = 64
    axis: int = 40  # the time axis under the lanes

    def plot_x(self) -> tuple[int, int]:
        """Left and right page x of the plotted time range."""
        return self.left + self.label, self.left + self.width - self.right_pad

    def lane_band(self, i: int) -> tuple[int, int]:
        """Top and bottom page y of lane ``i``."""
        y0 = self.top + i * self.lane
        return y0, y0 + self.lane

    def height(self, lanes: int) -> int:
        return lanes * self.lane + self.axis


def lane_colour(i: int) -> str:
    return LANE_COLOURS[i % len(LANE_COLOURS)]


class _Scale:
    def __init__(self, t0: float, t1: float, x0: int, x1: int) -> None:
        pad = max((t1 - t0) * 0.02, 0.5)  # a mark at either end is drawn whole
        self.t0, self.t1, self.x0, self.x1 = t0 - pad, t1 + pad, x0, x1

    def x(self, t: float) -> float:
        return self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0)


def render(tl: Timeline, *, title: str = "fsnotifyd incident timeline", source: str = "",
           layout: Layout = Layout()) -> str:
    """The page; ``source`` says where the events were read (shown under the title)."""
    lanes = tl.lanes
    window = f"{text.clock(tl.start)} – {text.clock(tl.end)}" if tl.start is not None and tl.end is not None else ""
    sub = " · ".join(p for p in (window, f"{len(tl.lines)} events", f"{len(tl.incidents)} incident(s)", source) if p)
    svg = _svg(tl, lanes, layout) if tl.lines else '<p class="none">no events</p>'
    rows = "\n".join(
        f'<tr id="r{i}" class="sev-{html.escape(ln.severity)}">'
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for i, (ln, row) in enumerate(zip(tl.lines, text.rows(tl), strict=True)))
    incidents = "\n".join(f"<li>{html.escape(text.incident_summary(i))}</li>" for i in tl.incidents)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in text.HEADER)
    return _PAGE.format(title=html.escape(title), sub=html.escape(sub), top=layout.top, left=layout.left, svg=svg,
                        legend=_legend(), head=head, rows=rows,
                        incidents=f"<ul>{incidents}</ul>" if incidents else "")


def _svg(tl: Timeline, lanes: tuple[str, ...], lay: Layout) -> str:
    assert tl.start is not None and tl.end is not None
    x0, x1 = lay.plot_x()
    # The SVG's own coordinates are page coordinates shifted by (left, top).
    scale = _Scale(tl.start, tl.end, x0 - lay.left, x1 - lay.left)
    h = lay.height(len(lanes))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{lay.width}" height="{h}" '
           f'viewBox="0 0 {lay.width} {h}" shape-rendering="crispEdges">']
    index = {lane: i for i, lane in enumerate(lanes)}
    for i, lane in enumerate(lanes):
        y = i * lay.lane
        out.append(f'<rect x="0" y="{y}" width="{lay.width}" height="{lay.lane}" '
                   f'fill="{LANE_BACKGROUNDS[i % 2]}"/>')
        out.append(f'<rect x="4" y="{y + 8}" width="12" height="{lay.lane - 16}" fill="{lane_colour(i)}"/>')
        name = "host" if lane == HOST_LANE else f"VE {lane}"
        out.append(f'<text x="24" y="{y + lay.lane / 2 + 5}" class="lane">{html.escape(name)}</text>')
    ticks = _ticks(scale.t0, scale.t1)
    for t in ticks:
        x = round(scale.x(t))
        out.append(f'<line x1="{x}" y1="0" x2="{x}" y2="{len(lanes) * lay.lane}" stroke="{GRID}" stroke-width="1"/>')
    axis_y = len(lanes) * lay.lane
    out.append(f'<line x1="{x0 - lay.left}" y1="{axis_y}" x2="{x1 - lay.left}" y2="{axis_y}" stroke="#333333"/>')
    for t in ticks:
        x = round(scale.x(t))
        out.append(f'<line x1="{x}" y1="{axis_y}" x2="{x}" y2="{axis_y + 5}" stroke="#333333"/>')
        out.append(f'<text x="{x}" y="{axis_y + 18}" class="tick">{html.escape(_tick_label(t, ticks))}</text>')
    for span in tl.spans:
        out.append(_span(span, index[span.lane] * lay.lane, scale, tl.end, lay))
    for n, ln in enumerate(tl.lines):
        out.append(_mark(ln, n, index[ln.lane] * lay.lane, scale, lay))
    out.append("</svg>")
    return "\n".join(out)


def _span(span: Span, lane_y: int, scale: _Scale, last: float, lay: Layout) -> str:
    end = span.end if span.end is not None else last
    xa, xb = scale.x(span.start), scale.x(end)
    width = max(3.0, xb - xa)
    y = lane_y + lay.lane * 0.70
    state = span.outcome or "not finished"
    tip = f"{span.step} {span.job}: {text.duration(end - span.start)} ({state})"
    outline = ' stroke="#000000" stroke-width="1"' if span.outcome == "failed" else ""
    return (f'<rect class="span" x="{xa:.1f}" y="{y:.0f}" width="{width:.1f}" height="10" '
            f'fill="{STEP_COLOURS[span.step]}"{outline}><title>{html.escape(tip)}</title></rect>')


def _mark(ln: Line, n: int, lane_y: int, scale: _Scale, lay: Layout) -> str:
    x = scale.x(ln.time)
    kernel = ln.kind in ERROR_KINDS or ln.kind.startswith("fs.")
    y = lane_y + lay.lane * (0.25 if kernel else 0.47)
    stroke, sw = SEVERITY_STROKE.get(ln.severity, ("none", 0.0))
    tip = html.escape(f"{text.clock(ln.time)} {ln.lane} {ln.kind}: {ln.summary}")
    return (f'<g class="mark" data-row="r{n}" fill="{STEP_COLOURS[ln.step]}" stroke="{stroke}" '
            f'stroke-width="{sw}"><title>{tip}</title>{_shape(ln, kernel, x, y)}</g>')


def _shape(ln: Line, kernel: bool, x: float, y: float, r: float = 6.0) -> str:
    """The mark's shape says what kind of event it is (the legend shows them)."""
    if kernel:  # diamond
        return (f'<polygon points="{x:.1f},{y - r - 1:.1f} {x + r + 1:.1f},{y:.1f} '
                f'{x:.1f},{y + r + 1:.1f} {x - r - 1:.1f},{y:.1f}"/>')
    if ln.kind == "rule.matched":  # triangle
        return f'<polygon points="{x:.1f},{y - r:.1f} {x + r:.1f},{y + r:.1f} {x - r:.1f},{y + r:.1f}"/>'
    if ln.kind == "notification":  # triangle down
        return f'<polygon points="{x - r:.1f},{y - r:.1f} {x + r:.1f},{y - r:.1f} {x:.1f},{y + r:.1f}"/>'
    if ln.kind == "ve.released":  # a flag on a pole
        return (f'<rect x="{x - 1:.1f}" y="{y - r - 2:.1f}" width="2" height="{2 * r + 4:.1f}"/>'
                f'<rect x="{x + 1:.1f}" y="{y - r - 2:.1f}" width="{r + 4:.1f}" height="{r:.1f}"/>')
    if ln.phase == "failed":  # a cross
        bar = f'x="{x - r:.1f}" y="{y - 1.5:.1f}" width="{2 * r:.1f}" height="3"'
        return (f'<rect {bar} transform="rotate(45 {x:.1f} {y:.1f})"/>'
                f'<rect {bar} transform="rotate(-45 {x:.1f} {y:.1f})"/>')
    if ln.phase in ("result", "succeeded"):  # square
        return f'<rect x="{x - r + 1:.1f}" y="{y - r + 1:.1f}" width="{2 * r - 2:.1f}" height="{2 * r - 2:.1f}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r - 1:.1f}"/>'  # job started, and the rest


def _swatch(body: str) -> str:
    return f'<svg width="16" height="16" viewBox="0 0 16 16">{body}</svg>'


def _key(body: str, name: str) -> str:
    return f'<span class="key">{_swatch(body)}{html.escape(name)}</span>'


def _legend() -> str:
    g = "#666666"
    steps = "".join(_key(f'<rect x="2" y="2" width="12" height="12" fill="{c}"/>', s) for s, c in STEP_COLOURS.items())
    shapes = [
        ("kernel event", f'<polygon points="8,1 15,8 8,15 1,8" fill="{g}"/>'),
        ("decision", f'<polygon points="8,2 14,14 2,14" fill="{g}"/>'),
        ("job started", f'<circle cx="8" cy="8" r="5" fill="{g}"/>'),
        ("job done / finding", f'<rect x="3" y="3" width="10" height="10" fill="{g}"/>'),
        ("job failed", f'<path d="M3 3 L13 13 M13 3 L3 13" stroke="{g}" stroke-width="3"/>'),
        ("notification", f'<polygon points="2,2 14,2 8,14" fill="{g}"/>'),
        ("released", f'<rect x="3" y="1" width="2" height="14" fill="{g}"/>'
                     f'<rect x="5" y="1" width="9" height="6" fill="{g}"/>'),
        ("job, start to end", f'<rect x="1" y="5" width="14" height="6" fill="{g}"/>'),
    ]
    kinds = "".join(_key(body, name) for name, body in shapes)
    sev = "".join(_key(f'<rect x="3" y="3" width="10" height="10" fill="#ffffff" stroke="{c}" stroke-width="{w}"/>', s)
                  for s, (c, w) in SEVERITY_STROKE.items())
    return (f'<div class="legend"><div><b>step</b> {steps}</div><div><b>event</b> {kinds}</div>'
            f'<div><b>outline: severity</b> {sev}<span class="key">info: none</span></div></div>')


_NICE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
         3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)


def _ticks(t0: float, t1: float, want: int = 8) -> list[float]:
    span = max(t1 - t0, 1e-3)
    step = next((s for s in _NICE if span / s <= want), _NICE[-1] * math.ceil(span / want / _NICE[-1]))
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) / step) + 1)]


def _tick_label(t: float, ticks: Iterable[float]) -> str:
    ts = list(ticks)
    step = ts[1] - ts[0] if len(ts) > 1 else 1.0
    stamp = text.clock(t)  # 2026-12-02T06:10:01.123Z
    if step < 1:
        return stamp[11:23]
    if step < 60:
        return stamp[11:19]
    if step < 86400:
        return stamp[11:16] + "Z"
    return stamp[:10]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
html, body {{ margin: 0; padding: 0; background: #ffffff; color: #222222;
  font: 13px/1.4 -apple-system, "DejaVu Sans", "Segoe UI", sans-serif; }}
header {{ height: {top}px; box-sizing: border-box; padding: 12px {left}px 0; overflow: hidden; }}
header h1 {{ margin: 0; font-size: 20px; font-weight: 600; }}
header .sub {{ margin-top: 2px; font-size: 12px; color: #555555; white-space: nowrap; }}
main {{ padding: 0 {left}px 24px; }}
svg text.lane {{ font-size: 13px; font-weight: 600; fill: #222222; }}
svg text.tick {{ font-size: 11px; fill: #444444; text-anchor: middle; }}
svg .mark {{ cursor: pointer; }}
.legend {{ margin: 10px 0 16px; }}
.legend div {{ margin: 4px 0; }}
.key {{ display: inline-flex; align-items: center; gap: 4px; margin-right: 14px; }}
table {{ border-collapse: collapse; font: 12px/1.35 "DejaVu Sans Mono", monospace; }}
th, td {{ text-align: left; padding: 2px 10px 2px 0; white-space: nowrap; vertical-align: top; }}
td:last-child {{ white-space: normal; }}
tr.sev-error td, tr.sev-critical td {{ font-weight: 600; }}
tr.hit td {{ background: #fff3bf; }}
.none {{ font-style: italic; }}
</style></head>
<body>
<header><h1>{title}</h1><div class="sub">{sub}</div></header>
<main>
{svg}
{legend}
{incidents}
<table><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table>
</main>
<script>
// A click on a mark shows its line in the list.
document.querySelectorAll(".mark").forEach(function (m) {{
  m.addEventListener("click", function () {{
    document.querySelectorAll("tr.hit").forEach(function (r) {{ r.classList.remove("hit"); }});
    var row = document.getElementById(m.getAttribute("data-row"));
    if (row) {{ row.classList.add("hit"); row.scrollIntoView({{block: "center"}}); }}
  }});
}});
</script>
</body></html>
"""
