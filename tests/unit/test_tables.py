"""The kind, severity, source and action tables are written once in code; what cannot be
derived from them (the handlers of actions, the source factories, the docs' tables) is checked
against them here, so a name added in one place fails a test. (The C core's opcode table is
checked against rules/decide.py when it is loaded, rules/native.py, and in test_rules_core.)"""

from __future__ import annotations

import re
from pathlib import Path

from fsnotifyd import config, events
from fsnotifyd.actions.handlers import handlers
from fsnotifyd.app import journalstream
from fsnotifyd.kernel.classify import KMSG_KINDS
from fsnotifyd.rules import loader, schema
from fsnotifyd.sinks import syslog
from fsnotifyd.sources.registry import REGISTRY

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _table_rows(doc: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``."""
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_kinds_are_the_keys_of_the_severity_table() -> None:
    assert events.KINDS == frozenset(events.DEFAULT_SEVERITY)
    assert set(events.DEFAULT_SEVERITY.values()) <= set(events.SEVERITIES)
    assert events.STATE_KINDS <= events.KINDS and KMSG_KINDS <= events.KINDS
    assert loader.RULE_KINDS == events.KINDS


def test_docs_list_every_kind_with_its_default_severity() -> None:
    documented: dict[str, str] = {}
    for cells in _table_rows("events.md", "| kind | severity |"):
        kinds = re.findall(r"`([a-z_.]+)`", cells[0])
        severities = [s.strip() for s in cells[1].split(",")]
        if len(severities) == len(kinds) > 1:  # "`source.up`, `source.down` | info, warning"
            documented.update(zip(kinds, severities, strict=True))
        else:
            documented.update((k, cells[1]) for k in kinds)
    assert set(documented) == set(events.KINDS)
    for kind, text in documented.items():
        if text == "as the rule says":  # notification: the notify action's severity (default below)
            continue
        # "error (hard limit) / warning (soft) / info": the default is one of the named ones
        named = re.findall(r"\b(debug|info|warning|error|critical)\b", text)
        assert events.DEFAULT_SEVERITY[kind] in named, (kind, text)
    assert events.DEFAULT_SEVERITY["notification"] == "warning"


def test_docs_list_the_severities_in_rank_order() -> None:
    cells = next(c for c in _table_rows("events.md", "| field |") if c[0] == "`severity`")
    assert re.findall(r"`(\w+)`", cells[2]) == list(events.SEVERITIES)


def test_one_severity_to_priority_table() -> None:
    # rank order and syslog(3) priority agree: a more severe event has a smaller priority
    priorities = [events.SEVERITY_PRIORITY[s] for s in events.SEVERITIES]
    assert priorities == sorted(priorities, reverse=True)
    assert syslog.PRIORITIES is events.SEVERITY_PRIORITY
    assert journalstream.PRIORITIES is events.SEVERITY_PRIORITY
    assert syslog.UNKNOWN_PRIORITY not in events.SEVERITY_PRIORITY.values()
    assert schema.ACTIONS["notify"]["severity"][1] == schema.NOTIFY_SEVERITIES
    assert set(schema.NOTIFY_SEVERITIES) < set(events.SEVERITIES)


def test_every_action_has_a_handler_and_a_docs_row() -> None:
    assert set(handlers(targets=None)) == set(schema.ACTIONS)  # type: ignore[arg-type]
    documented = [re.fullmatch(r"`(\w+)`", c[0]) for c in _table_rows("actions.md", "| action |")]
    assert [m.group(1) for m in documented if m] == list(schema.ACTIONS)


def test_every_source_has_a_factory_and_a_docs_row() -> None:
    assert tuple(REGISTRY) == config.SOURCES
    documented = [re.fullmatch(r"`(\w+)`", c[0]) for c in _table_rows("sources.md", "| source |")]
    assert [m.group(1) for m in documented if m] == list(config.SOURCES)



def test_the_timeline_names_only_known_kinds_severities_and_actions() -> None:
    # The timeline picks subsets of the tables (which kinds are errors, which severities get a
    # stroke, which actions are a step of their own): a renamed kind must not silently drop out.
    from fsnotifyd.timeline import html, model

    assert model.CHAIN_KINDS <= events.KINDS and model.JOB_KINDS <= events.KINDS
    assert set(html.SEVERITY_STROKE) <= set(events.SEVERITIES)
    assert set(model._ACTION_STEP) <= set(schema.ACTIONS)
