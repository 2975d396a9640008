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
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence, TextIO

from ..inventory import VE
from ..replay.reader import ReadReport, load_ve_map, read_timed_events
from ..rules.engine import Decision, Engine
from ..rules.loader import load_rules


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def canonical_lines(decisions: Iterable[dict[str, Any]]) -> list[str]:
    return [json.dumps(d, sort_keys=True, separators=(",", ":")) for d in decisions]


@dataclass
class RulesTestResult:
    decisions: list[Decision]
    events: int
    report: ReadReport


def replay(rules: Sequence[str], logs: Sequence[str], *, ves: Sequence[VE] = (), year: int | None = None,
           boot_time: float | None = None, only_fired: bool = False) -> RulesTestResult:
    ruleset = load_rules(rules)
    labels = {ve.id: dict(ve.labels) for ve in ves}
    engine = Engine(ruleset, labels_of=lambda ve: labels.get(ve, {}), explain=not only_fired)
    report = ReadReport()
    decisions: list[Decision] = []
    n = 0
    for t, event in read_timed_events(logs, ves=ves, year=year, boot_time=boot_time, report=report):
        n += 1
        decisions.extend(engine.process(event, t))
    return RulesTestResult(decisions, n, report)


def print_table(decisions: Sequence[Decision], out: TextIO) -> None:
    rows = [("TIME", "VE", "RULE", "OUTCOME", "ACTIONS", "DETAIL")]
    for d in decisions:
        actions = ", ".join(
            a.name + ("(" + ", ".join(f"{k}={v}" for k, v in a.params) + ")" if a.params else "") for a in d.actions
        )
        outcome = d.outcome if d.outcome == "fired" else f"suppressed: {d.outcome}"
        rows.append((_iso(d.time), d.ve or f"({d.device or '-'})", d.rule,
                     outcome + (" [dry-run]" if d.dry_run else ""), actions if d.outcome == "fired" else "-", d.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] + "\n")


def run(rules: Sequence[str], logs: Sequence[str], *, expect: str | None = None, fmt: str = "table",
        ve_map: str | None = None, year: int | None = None, boot_time: float | None = None,
        only_fired: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    ves = load_ve_map(ve_map) if ve_map else ()
    result = replay(rules, logs, ves=ves, year=year, boot_time=boot_time, only_fired=only_fired)
    if fmt == "json":
        for d in result.decisions:
            out.write(json.dumps(canonical(d) | {"event_ids": list(d.event_ids)}, sort_keys=True) + "\n")
    else:
        print_table(result.decisions, out)
        fired = sum(d.outcome == "fired" for d in result.decisions)
        out.write(f"\n{result.events} events, {len(result.decisions)} decisions, {fired} fired\n")
    out.flush()
    for line in result.report.summary():
        err.write(f"fsnotifyd: {line}\n")
    if expect is None:
        return 0
    with open(expect, encoding="utf-8") as f:
        wanted = [json.loads(line) for line in f if line.strip()]
    want = canonical_lines({k: v for k, v in w.items() if k != "event_ids"} for w in wanted)
    got = canonical_lines(canonical(d) for d in result.decisions)
    if want == got:
        err.write(f"fsnotifyd: decisions match {expect} ({len(got)} decisions)\n")
        return 0
    err.write(f"fsnotifyd: decisions differ from {expect}:\n")
    err.writelines(line + "\n" for line in difflib.unified_diff(want, got, expect, "replay", lineterm=""))
    return 1
