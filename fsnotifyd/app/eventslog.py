"""``fsnotifyd events log``: an incident, in one view, from the event journal.

Reads the JSONL journal the config names (``journal.path``) and its rotated files
(``events.jsonl.1`` … as :class:`~fsnotifyd.sinks.journal.JournalSink` leaves them, ``.gz``
too if something compressed them) through the replay reader, builds the incidents
(:mod:`fsnotifyd.timeline.model`) and prints them as text, JSON lines or an HTML page.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..config import load_config
from ..replay.reader import ReadReport, read_items
from ..timeline import html as html_page
from ..timeline import model, text
from ..timeline.when import parse_when

_ROTATED = re.compile(r"\.(\d+)(\.gz)?$")

DESCRIPTION = """One time-ordered line per event of the journal's incidents: the error, the decision,
snapshot, check, isolate, repair, release, with the time since the previous step of the same
incident and since its start. An incident is one VE's chain of events from a kernel error
through what the daemon decided and did, until the VE is released (or a repair started it
again). The journal is the config's journal.path with its rotated files."""

EPILOG = """examples:
  fsnotifyd events log --since 1h
  fsnotifyd events log --ve 101 --since 2026-12-02T06:00:00Z --until 2026-12-02T07:00:00Z
  fsnotifyd events log --json | jq .
  fsnotifyd events log --format html --output incident.html
"""


def journal_files(path: str) -> list[str]:
    """``path`` and its rotated files (``path.N``, ``path.N.gz``), oldest first."""
    folder, base = os.path.split(os.path.abspath(path))
    rotated: list[tuple[int, str]] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(base + "."):
            m = _ROTATED.fullmatch(name[len(base):])
            if m is not None:
                rotated.append((int(m.group(1)), os.path.join(folder, name)))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if os.path.exists(path):
        files.append(path)
    return files


def add_command(esub: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[..., None]) -> None:
    lg = esub.add_parser("log", help="incidents from the event journal, step by step (text, JSON or HTML)",
                         description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(lg, socket=False)
    lg.add_argument("--journal", metavar="PATH", help="this journal (and its rotated files) instead of the config's")
    lg.add_argument("--ve", action="append", metavar="ID", help="only this VE (repeatable; 'host' for no VE)")
    lg.add_argument("--since", metavar="WHEN", help="a duration back from now (1h, 30m) or an ISO time")
    lg.add_argument("--until", metavar="WHEN", help="as --since")
    lg.add_argument("--all", action="store_true", help="also events that are no part of an incident (source.up …)")
    lg.add_argument("--json", action="store_true", help="JSON lines (same as --format json)")
    lg.add_argument("--format", choices=["text", "json", "html"], default="text")
    lg.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    lg.set_defaults(func=cmd_log)


def cmd_log(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
    except ValueError as e:
        print(f"fsnotifyd: events log: {e}", file=sys.stderr)
        return 2
    path = args.journal
    if path is None:
        cfg = load_config(args.config)
        if cfg.journal_path is None:
            print(f"fsnotifyd: {cfg.file}: journal is off (journal: null): there is no journal to read",
                  file=sys.stderr)
            return 2
        path = cfg.journal_path
    files = journal_files(path)
    if not files:
        print(f"fsnotifyd: no journal at {path} (nor rotated files beside it)", file=sys.stderr)
        return 1
    report = ReadReport()
    try:
        items = ((t, e) for t, _, e in read_items(files, report=report))
        tl = model.build(items, ves=args.ve or (), since=since, until=until, everything=args.all)
    except OSError as e:
        print(f"fsnotifyd: cannot read the journal: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    for example in report.examples:
        print(f"fsnotifyd: skipped {example}", file=sys.stderr)
    if report.skipped > len(report.examples):
        print(f"fsnotifyd: skipped {report.skipped} lines in all", file=sys.stderr)
    fmt = "json" if args.json else args.format
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            _write(tl, fmt, out, files)
        print(f"{args.output}: {len(tl.lines)} events, {len(tl.incidents)} incident(s)", file=sys.stderr)
    else:
        _write(tl, fmt, sys.stdout, files)
    return 0


def _write(tl: model.Timeline, fmt: str, out: TextIO, files: list[str]) -> None:
    if fmt == "json":
        for line in text.render_json(tl):
            out.write(line + "\n")
    elif fmt == "html":
        rotated = f" and {len(files) - 1} rotated file(s)" if len(files) > 1 else ""
        out.write(html_page.render(tl, source=f"from {files[-1]}{rotated}"))
    else:
        out.write(text.render(tl))
