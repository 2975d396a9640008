"""``fsnotifyd rules test``: replay recorded events through rules and show what they decide.

Events come from fsnotifyd JSONL journals or recordings, or from plain kernel log text
(``dmesg``, ``dmesg -T``, ``journalctl -k [-o short-precise]``) turned into events by the same
kmsg classifier and correlator the daemon uses. The replay runs in event time (no sleeping),
so a month of log replays in seconds and the same input always gives the same decisions.
With ``--expect`` the decisions are compared with a file of expected ones; a difference is
printed as a unified diff and the command exits 1.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from ..inventory import VE
from ..replay.reader import ReadReport, read_items
from ..replay.vemap import load_ve_map
from ..rules.engine import Decision, Engine
from ..rules.loader import load_rules
from .progress import Clearing, reporter


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical(d: Decision) -> dict[str, Any]:
    """What --expect compares: everything but the triggering event ids (which differ between
    a JSONL recording and the kernel text of the same incident); time to the second."""
    return {
        "time": _iso(d.time),
        "rule": d.rule,
        "outcome": d.outcome,
        "ve": d.ve,
        "device": d.device,
        "actions": [a.to_dict() for a in d.actions],
        "dry_run": d.dry_run,
        "detail": d.detail,
    }


def canonical_line(decision: dict[str, Any]) -> str:
    return json.dumps(decision, sort_keys=True, separators=(",", ":"))


def canonical_lines(decisions: Iterable[dict[str, Any]]) -> list[str]:
    return [canonical_line(d) for d in decisions]


@dataclass
class RulesTestResult:
    decisions: list[Decision]
    events: int
    report: ReadReport


CHUNK = 128  # events per engine call: decisions of a chunk are held, so keep it small


class Replay:
    """A replay in progress: iterating it yields the decisions in order, as they are made;
    ``events`` and ``report`` fill in as it goes. Nothing is kept between chunks, so a month
    of log replays in constant memory whatever is done with the decisions."""

    def __init__(self, rules: Sequence[str], logs: Sequence[str], *, ves: Sequence[VE] = (),
                 year: int | None = None, boot_time: float | None = None, only_fired: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.progress = progress  # told the events replayed so far, after each chunk
        labels = {ve.id: dict(ve.labels) for ve in ves}
        self.engine = Engine(load_rules(rules), labels_of=lambda ve: labels.get(ve, {}), explain=not only_fired)
        self.report = ReadReport()
        self.events = 0
        self._stream = read_items(logs, ves=ves, year=year, boot_time=boot_time, report=self.report)

    def __iter__(self) -> Iterator[Decision]:
        # The engine pulls each event from the reader and decides on it while it is still in
        # the CPU cache: reading a chunk first and deciding after is twice as slow.
        process, stream, counted = self.engine.process_timed, self._stream, self.engine.stats.events
        while True:
            decisions = process(itertools.islice(stream, CHUNK))
            seen = self.engine.stats.events - counted
            if seen == self.events:
                break
            self.events = seen
            if self.progress is not None:
                self.progress(seen)
            yield from decisions


def replay(rules: Sequence[str], logs: Sequence[str], *, ves: Sequence[VE] = (), year: int | None = None,
           boot_time: float | None = None, only_fired: bool = False) -> RulesTestResult:
    """Every decision of a replay, in a list (for small incidents and tests)."""
    r = Replay(rules, logs, ves=ves, year=year, boot_time=boot_time, only_fired=only_fired)
    decisions = list(r)
    return RulesTestResult(decisions, r.events, r.report)


TABLE_HEADER = ("TIME", "VE", "RULE", "OUTCOME", "ACTIONS", "DETAIL")
TABLE_SIZING_ROWS = 1000  # columns are as wide as in the first rows; later longer cells push


def _row(d: Decision) -> tuple[str, ...]:
    actions = ", ".join(
        a.name + ("(" + ", ".join(f"{k}={v}" for k, v in a.params) + ")" if a.params else "") for a in d.actions
    )
    outcome = d.outcome if d.outcome == "fired" else f"suppressed: {d.outcome}"
    return (_iso(d.time), d.ve or f"({d.device or '-'})", d.rule,
            outcome + (" [dry-run]" if d.dry_run else ""), actions if d.outcome == "fired" else "-", d.detail)


def print_table(decisions: Iterable[Decision], out: TextIO) -> tuple[int, int]:
    """The decision table, streamed: column widths come from the first rows (all of them in
    an incident-sized replay). Returns (decisions, fired)."""
    it = iter(decisions)
    head = list(itertools.islice(it, TABLE_SIZING_ROWS))
    rows = [TABLE_HEADER] + [_row(d) for d in head]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER) - 1)]
    n, fired = len(head), sum(d.outcome == "fired" for d in head)

    def write(r: tuple[str, ...]) -> None:
        out.write("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] + "\n")

    for r in rows:
        write(r)
    for d in it:
        n += 1
        fired += d.outcome == "fired"
        write(_row(d))
    return n, fired


class ReadMeter:
    """Bytes of the logs read so far: the process's ``rchar`` (/proc/self/io) since the
    replay began, against the files' sizes (a .gz counts its compressed bytes both ways).
    The readers open the files themselves, so their positions are not at hand; the few other
    reads of the process (the rules, a VE map) are small beside a log worth a progress line."""

    def __init__(self, logs: Sequence[str]) -> None:
        self.total = sum(_size(p) for p in logs)
        self._start = self._rchar()

    @staticmethod
    def _rchar() -> int:
        try:
            with open("/proc/self/io", "rb") as f:
                for line in f:
                    if line.startswith(b"rchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def done(self) -> int:
        n = max(0, self._rchar() - self._start)
        return min(n, self.total) if self.total else n


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size if path != "-" else 0
    except OSError:
        return 0


def run(rules: Sequence[str], logs: Sequence[str], *, expect: str | None = None, fmt: str = "table",
        ve_map: str | None = None, year: int | None = None, boot_time: float | None = None,
        only_fired: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        show_progress: bool = False) -> int:
    """``show_progress``: a progress line on stderr (bytes of the logs read, events/s) while
    the replay runs, when stdout and stderr are terminals (app/progress.py decides)."""
    ves = load_ve_map(ve_map) if ve_map else ()
    result = Replay(rules, logs, ves=ves, year=year, boot_time=boot_time, only_fired=only_fired)
    line = reporter("rules test", extra=lambda s: f"{result.events} events"
                    + (f", {result.events / s:.0f} events/s" if s > 0 else "")) if show_progress else None
    if line is not None:
        meter, drawn = ReadMeter(logs), line

        def tick(events: int) -> None:
            if drawn.due():
                drawn("", meter.done(), meter.total)
        result.progress = tick
        # Clearing is a TextIOBase with what print() uses, not a typing.TextIO
        out, err = Clearing(line, out), Clearing(line, err)  # type: ignore[assignment]
    try:
        return _run(result, expect, fmt, out, err)
    finally:
        if line is not None:
            line.close()


def _run(result: Replay, expect: str | None, fmt: str, out: TextIO, err: TextIO) -> int:
    got: list[str] = []  # canonical lines, kept only to compare with --expect

    def decisions() -> Iterator[Decision]:
        for d in result:
            if expect is not None:
                got.append(canonical_line(canonical(d)))
            yield d

    if fmt == "json":
        for d in decisions():
            out.write(json.dumps(canonical(d) | {"event_ids": list(d.event_ids)}, sort_keys=True) + "\n")
    else:
        n, fired = print_table(decisions(), out)
        out.write(f"\n{result.events} events, {n} decisions, {fired} fired\n")
    out.flush()
    for line in result.report.summary():
        err.write(f"fsnotifyd: {line}\n")
    if expect is None:
        return 0
    with open(expect, encoding="utf-8") as f:
        wanted = [json.loads(line) for line in f if line.strip()]
    want = canonical_lines({k: v for k, v in w.items() if k != "event_ids"} for w in wanted)
    if want == got:
        err.write(f"fsnotifyd: decisions match {expect} ({len(got)} decisions)\n")
        return 0
    err.write(f"fsnotifyd: decisions differ from {expect}:\n")
    err.writelines(line + "\n" for line in difflib.unified_diff(want, got, expect, "replay", lineterm=""))
    return 1
