"""The rule model: what a loaded, checked rules file is (documented in ``docs/rules.md``).

These are plain frozen data; :mod:`fsnotifyd.rules.loader` builds them from YAML (with
file:line:column errors) and :mod:`fsnotifyd.rules.compiler` turns them into fast matchers.
Every object remembers where it came from (``Origin``) so later errors can point there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..events import SEVERITIES

# Condition operators on one event field. Values are checked by the loader:
#   equals: scalar | ne: scalar | in: [scalars] | not_in: [scalars] | in_list: <name of a list>
#   regex: <python re, full match> | prefix: str | suffix: str | contains: str
#   gt / ge / lt / le: number | exists: bool
OPERATORS = frozenset({"equals", "ne", "in", "not_in", "in_list", "regex", "prefix", "suffix",
                       "contains", "gt", "ge", "lt", "le", "exists"})

# A notification is for a person: every severity but debug.
NOTIFY_SEVERITIES = tuple(s for s in SEVERITIES if s != "debug")

# The one table of actions (actions/handlers.py has a handler for each name; a test checks it).
# Action name -> {parameter: (python type(s), allowed values or None, required)}
ACTIONS: dict[str, dict[str, tuple[tuple[type, ...], tuple[Any, ...] | None, bool]]] = {
    "isolate": {"mode": ((str,), ("readonly", "freeze", "block", "detach"), False)},
    "snapshot": {"name": ((str,), None, False), "keep": ((int,), None, False)},
    "fsck": {"mode": ((str,), ("check", "repair"), True), "priority": ((int,), None, False)},
    "shrink": {"mode": ((str,), ("trim", "balloon", "resize", "repack"), True),
               "target": ((str, int), None, False), "margin": ((str, int), None, False),
               "budget_mib_s": ((int, float), None, False), "max_seconds": ((int, float), None, False)},
    "notify": {"message": ((str,), None, False), "severity": ((str,), NOTIFY_SEVERITIES, False),
               "channel": ((str,), None, False)},
    "exec": {"command": ((list,), None, True), "timeout": ((str, int, float), None, False)},
}

# Kinds whose arrival clears the rule state (windows, cooldowns) kept for a VE or device:
# the condition those rules watch is over.
RECOVERY: dict[str, frozenset[str]] = {
    "fs.writable": frozenset({"fs.readonly"}),
    "dev.remove": frozenset({"*"}),
}


@dataclass(frozen=True, slots=True)
class Origin:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Condition:
    field: str  # dotted path into the event's JSON form: kernel.function, device.name, count
    op: str
    value: Any
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class VeSelector:
    ids: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # all must match the VE's labels


@dataclass(frozen=True, slots=True)
class Match:
    kinds: tuple[str, ...]  # exact kinds or prefixes ending in ".*"; empty = any kind
    conditions: tuple[Condition, ...] = ()
    ve: VeSelector | None = None


@dataclass(frozen=True, slots=True)
class Threshold:
    count: int  # at least this many kernel facts (sum of event counts)
    within: float  # seconds
    per: str = "ve"  # "ve" or "device"; "ve" falls back to the device for events of no VE


@dataclass(frozen=True, slots=True)
class Sustained:
    """The rule goes on only once ``conditions`` have held on every event its match selects
    (per VE, or device) for ``hold`` seconds; an event on which they fail, or a silence longer
    than ``max_gap``, starts the count again."""

    conditions: tuple[Condition, ...]
    hold: float  # seconds ("for")
    max_gap: float  # seconds between two events of the series before the streak is broken


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    params: tuple[tuple[str, Any], ...] = ()
    origin: Origin | None = None

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.params)}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match
    actions: tuple[Action, ...]
    description: str = ""
    enabled: bool = True
    threshold: Threshold | None = None
    cooldown: float = 0.0  # seconds; per VE (or device when the event has no VE)
    dry_run: bool = False
    continue_: bool = True  # False: once this rule fires, later rules do not see the event
    reset_on: tuple[str, ...] = ()  # extra kinds that clear this rule's state for a VE/device
    origin: Origin | None = None
    sustained: Sustained | None = None
    # (start, end) minutes after local midnight of the event's time (may wrap past midnight):
    # outside it the rule neither counts nor fires. None: any time.
    window: tuple[int, int] | None = None
    window_text: str | None = None  # as written, for decisions' detail


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    lists: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
