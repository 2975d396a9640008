"""The rules engine: events in, decisions out, in event time.

For each event, the enabled rules that can match its kind are tried in file order. A rule
whose match holds counts the event's kernel facts (its ``count``) towards its threshold, kept
per VE (or per device); once the threshold is met within the window, and the rule is not
cooling down for that VE, it fires: a ``fired`` decision with its actions. A match that does not
fire is still a decision (``threshold`` or ``cooldown``), so a replay shows why nothing
happened. A rule that fires with ``continue: false`` hides the event from the rules after it.

Time is the events' own time, never the wall clock, so a replay of a recorded incident decides
exactly as the daemon did. Memory is bounded: a window keeps at most ``threshold.count``
entries, and at most ``max_keys`` (rule, VE) states are kept (least recently used dropped).
Recovery events clear state: ``fs.writable`` ends a read-only condition, a device that goes
away ends everything about it, and a rule's ``reset_on`` kinds end its own.

The per-event path itself (candidates, matches, windows, cooldowns, decisions) is
:mod:`.decide`, run by its C twin ``_decide`` when built (:mod:`.native`); this module owns
the rest: compiling, recovery, persistence and the decision's event form.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from ..events import Device, Event, Kernel, fact_id
from . import decide, native
from .compiler import Compiled, LabelsOf, compile_rules
from .decide import COOLDOWN, FIRED, MAX_FACTS, THRESHOLD, CompiledRule
from .schema import RECOVERY, Action, RuleSet

__all__ = ["Engine", "EngineStats", "Decision", "decision_event", "event_time", "FIRED", "THRESHOLD", "COOLDOWN"]
STATE_VERSION = 1


def event_time(e: Mapping[str, Any]) -> float:
    t = e.get("time")
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, str):
        try:
            return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return 0.0


class Decision(NamedTuple):
    # A NamedTuple, not a frozen dataclass: immutable all the same, and built several times
    # per event in a replay, where a frozen dataclass's per-field __setattr__ is the cost.
    time: float
    rule: str
    outcome: str  # fired | threshold | cooldown
    ve: str | None
    device: str | None
    key: str  # what the rule's state is kept per: "ve:101" or "dev:loop3"
    actions: tuple[Action, ...]
    dry_run: bool
    event_ids: tuple[str, ...]  # the events that made it (the window, for thresholds)
    # The numbers behind ``detail``, kept raw: formatting text for every suppressed match
    # would cost more than deciding.
    total: int = 0
    need: int = 0
    within: float = 0.0
    cooling_left: float = 0.0

    @property
    def detail(self) -> str:
        parts = []
        if self.need:
            parts.append(f"{self.total}/{self.need} within {_fmt(self.within)}")
        if self.outcome == COOLDOWN:
            parts.append(f"cooling down until +{_fmt(self.cooling_left)}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "rule": self.rule,
            "outcome": self.outcome,
            "ve": self.ve,
            "device": self.device,
            "actions": [a.to_dict() for a in self.actions],
            "dry_run": self.dry_run,
            "event_ids": list(self.event_ids),
            "detail": self.detail,
        }


def decision_event(d: Decision, source: Mapping[str, Any], host: str) -> Event:
    """A fired decision as a ``rule.matched`` event, on the device and VE of its trigger."""
    dev = source.get("device") if isinstance(source.get("device"), dict) else None
    trigger = source.get("id")
    return Event(
        # One rule, one triggering event, one decision: the same trigger seen again after a
        # restart makes the same decision (and the executor knows its jobs).
        **({"id": fact_id("rule.matched", d.rule, trigger)} if trigger else {}),
        kind="rule.matched",
        time=d.time,
        host=host,
        severity="warning",
        device=None if dev is None else Device(dev.get("major"), dev.get("minor"), dev.get("name")),
        fs=source.get("fs"),
        mount=source.get("mount"),
        ve=d.ve,
        kernel=Kernel(),
        sources=("rules",),
        details={"rule": d.rule, "actions": [a.to_dict() for a in d.actions], "dry_run": d.dry_run,
                 "event_ids": list(d.event_ids), "trigger_kind": source.get("kind"), "detail": d.detail},
    )


@dataclass
class EngineStats:
    events: int = 0
    matched: int = 0
    fired: int = 0
    suppressed_threshold: int = 0
    suppressed_cooldown: int = 0
    cleared: int = 0
    evicted: int = 0


class Engine:
    def __init__(self, ruleset: RuleSet, *, labels_of: LabelsOf = lambda ve: {}, max_keys: int = 100_000,
                 explain: bool = True, impl: ModuleType | None = None) -> None:
        """``explain=False`` returns only fired decisions (suppressed ones are still counted in
        ``stats``): a month of log replays without building millions of suppressed rows.
        ``impl``: the per-event path, :mod:`.decide` or the C ``_decide`` (default: the C one
        when built, see :mod:`.native`)."""
        self.ruleset = ruleset
        self.explain = explain
        self.impl = impl or native.impl
        self.compiled: Compiled = compile_rules(ruleset, labels_of, self.impl)
        self.max_keys = max_keys
        # (rule, key) -> [total, [(time, count, event id), ...]] and (rule, key) -> last fired
        self._windows: dict[tuple[str, str], list] = {}
        self._cooldowns: dict[tuple[str, str], float] = {}
        self._resets: dict[str, list[CompiledRule]] = {}
        for cr in self.compiled.rules:
            for kind in cr.rule.reset_on:
                self._resets.setdefault(kind, []).append(cr)
        recovery = frozenset(RECOVERY) | frozenset(self._resets) | {"dev.change"}
        self._recovering: dict[str, tuple[str, ...]] = {}
        self._core = self.impl.Core(self.compiled.fast, self.compiled.candidates, recovery, self._recover,
                                    self._windows, self._cooldowns, Decision, event_time, max_keys, explain)
        # The hot path is the core's own method: no Python frame of ours per event.
        self.process: Callable[..., list[Decision]] = self._core.process
        self.process_timed: Callable[[Iterable[tuple]], list[Decision]] = self._core.process_timed

    @property
    def native(self) -> bool:
        return self.impl is not decide

    @property
    def stats(self) -> EngineStats:
        c = self._core
        return EngineStats(c.events, c.matched, c.fired, c.suppressed_threshold, c.suppressed_cooldown,
                           c.cleared, c.evicted)

    @property
    def dirty(self) -> bool:
        """State changed since the daemon last saved it (it resets this after saving)."""
        return bool(self._core.dirty)

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self._core.dirty = value

    def process_all(self, events: Iterable[Mapping[str, Any]]) -> Iterable[Decision]:
        for e in events:
            yield from self.process(e)

    def _new_window(self, skey: tuple[str, str]) -> list:
        w = self._windows[skey] = [0, []]
        self._evict_oldest(self._windows)
        return w

    def _evict_oldest(self, d: dict) -> None:
        if len(d) > self.max_keys:
            d.pop(next(iter(d)))
            self._core.evicted += 1

    # -- recovery ----------------------------------------------------------------------------
    def _recover(self, kind: str, event: Mapping[str, Any]) -> None:
        if kind == "dev.change":
            details = event.get("details") or {}
            if not (isinstance(details, dict) and details.get("what") == "detach"):
                return
            kind = "dev.remove"  # a detached loop device is gone as far as rules care
        ve = event.get("ve")
        dev = event.get("device")
        device = dev.get("name") if isinstance(dev, dict) else None
        keys = {f"dev:{device}"} | ({f"ve:{ve}"} if ve is not None else set())
        names = self._recovering.get(kind)
        if names is None:  # the rules a kind clears, found once per kind
            watched = RECOVERY.get(kind, frozenset())
            rules = [cr.rule for cr in self.compiled.rules
                     if "*" in watched or watched & set(cr.rule.match.kinds)]
            rules += [cr.rule for cr in self._resets.get(kind, ())]
            names = self._recovering[kind] = tuple(dict.fromkeys(r.name for r in rules))
        for name in names:
            for key in keys:
                hit = self._windows.pop((name, key), None) is not None
                hit |= self._cooldowns.pop((name, key), None) is not None
                if hit:
                    self._core.cleared += 1
                    self.dirty = True

    # -- persistence -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Windows and cooldowns, to outlive a restart (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "windows": [[r, k, [list(e) for e in w[1]]] for (r, k), w in self._windows.items() if w[1]],
            "cooldowns": [[r, k, t] for (r, k), t in self._cooldowns.items()],
        }

    def restore(self, state: Mapping[str, Any]) -> int:
        """Load saved state; entries of rules that no longer exist (or changed their threshold
        to a smaller count) are dropped. Returns how many entries were restored."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            return 0
        rules = {cr.rule.name: cr.rule for cr in self.compiled.rules}
        n = 0
        for item in state.get("windows") or []:
            try:
                name, key, entries = item
                rule = rules.get(name)
                if rule is None or rule.threshold is None:
                    continue
                w = self._windows.get((name, key)) or self._new_window((name, key))
                for t, c, eid in entries[-rule.threshold.count:]:
                    c = min(int(c), MAX_FACTS)
                    w[1].append((float(t), c, str(eid)))
                    w[0] += c
                n += 1
            except (TypeError, ValueError):
                continue
        for item in state.get("cooldowns") or []:
            try:
                name, key, t = item
                if name in rules and rules[name].cooldown > 0:
                    self._cooldowns.pop((name, key), None)
                    self._cooldowns[(name, key)] = float(t)
                    self._evict_oldest(self._cooldowns)
                    n += 1
            except (TypeError, ValueError):
                continue
        return n


def _fmt(seconds: float) -> str:
    """A duration as people write it: 10m, 1h, 59m58s, 9.9s."""
    if seconds < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"
