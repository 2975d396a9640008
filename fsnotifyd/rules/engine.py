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

import time as _time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import ModuleType
from typing import Any, NamedTuple

from ..events import Device, Event, Kernel, fact_id
from . import decide, native
from .compiler import Compiled, LabelsOf, compile_rules, match_predicate
from .decide import COOLDOWN, FIRED, MAX_FACTS, SUSTAINED, THRESHOLD, WINDOW, CompiledRule
from .schema import RECOVERY, Action, Match, Rule, RuleSet

__all__ = ["Engine", "EngineStats", "Decision", "decision_event", "event_time", "FIRED", "THRESHOLD", "COOLDOWN",
           "SUSTAINED", "WINDOW", "in_window"]
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
    outcome: str  # fired | threshold | cooldown | sustained | window
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
    # cooldown: seconds left; sustained: seconds still to hold (``within`` = the hold);
    # window: seconds until the window opens
    cooling_left: float = 0.0

    @property
    def detail(self) -> str:
        if self.outcome == SUSTAINED:
            return f"held {_fmt(self.within - self.cooling_left)} of {_fmt(self.within)}"
        if self.outcome == WINDOW:
            return f"outside its window, opens in +{_fmt(self.cooling_left)}"
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
    # One rule, one triggering event, one decision: the same trigger seen again after a
    # restart makes the same decision (and the executor knows its jobs).
    same_id: dict[str, Any] = {"id": fact_id("rule.matched", d.rule, trigger)} if trigger else {}
    return Event(
        **same_id,
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
    suppressed_sustained: int = 0
    suppressed_window: int = 0


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
        # (rule, key) -> [since, last]: how long a ``sustained`` rule's conditions have held
        self._streaks: dict[tuple[str, str], list[float]] = {}
        self._sustain_tests = {r.name: match_predicate(Match((), r.sustained.conditions), labels_of)
                               for r in ruleset.rules if r.enabled and r.sustained is not None}
        self.suppressed_sustained = self.suppressed_window = 0
        gated = any(r.sustained is not None or r.window is not None for r in ruleset.rules if r.enabled)
        self._resets: dict[str, list[CompiledRule]] = {}
        for cr in self.compiled.rules:
            for kind in cr.rule.reset_on:
                self._resets.setdefault(kind, []).append(cr)
        recovery = frozenset(RECOVERY) | frozenset(self._resets) | {"dev.change"}
        self._recovering: dict[str, tuple[str, ...]] = {}
        self._core = self.impl.Core(self.compiled.fast, self.compiled.candidates, recovery, self._recover,
                                    self._windows, self._cooldowns, Decision, event_time, max_keys, explain,
                                    self._gate if gated else None)
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
                           c.cleared, c.evicted, self.suppressed_sustained, self.suppressed_window)

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

    # -- sustained conditions and windows ------------------------------------------------------
    def _gate(self, rule: Rule, key: str, now: float, event: Mapping[str, Any], ve: Any, device: Any,
              eid: str) -> Any:
        """Before a gated rule's threshold (called by the core): None lets it go on; a
        ``sustained`` or ``window`` decision (or False when not explaining) stops it here, and
        False alone is an event on which its sustained conditions failed (no decision)."""
        s = rule.sustained
        if s is not None:
            skey = (rule.name, key)
            streak = self._streaks.get(skey)
            if not self._sustain_tests[rule.name](event):
                if streak is not None:
                    del self._streaks[skey]
                    self.dirty = True
                return False
            if streak is None or now - streak[1] > s.max_gap or now < streak[1]:
                # New, or broken by a silence (the VE stopped, the daemon was down): no evidence
                # that it held meanwhile. (An event older than the last is a log out of order.)
                streak = [now, now]
                self._streaks.pop(skey, None)
                self._streaks[skey] = streak
                self._evict_oldest(self._streaks)
            else:
                streak[1] = now
            self.dirty = True
            held = now - streak[0]
            if held < s.hold:
                self.suppressed_sustained += 1
                if not self.explain:
                    return False
                return Decision(now, rule.name, SUSTAINED, ve, device, key, rule.actions, rule.dry_run, (eid,),
                                0, 0, s.hold, s.hold - held)
        if rule.window is not None:
            wait = seconds_until_window(rule.window, now)
            if wait > 0:
                self.suppressed_window += 1
                if not self.explain:
                    return False
                return Decision(now, rule.name, WINDOW, ve, device, key, rule.actions, rule.dry_run, (eid,),
                                0, 0, 0.0, wait)
        return None

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
                hit |= self._streaks.pop((name, key), None) is not None
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
            "streaks": [[r, k, since, last] for (r, k), (since, last) in self._streaks.items()],
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
        for item in state.get("streaks") or []:
            try:
                name, key, since, last = item
                if name in rules and rules[name].sustained is not None:
                    self._streaks[(name, key)] = [float(since), float(last)]
                    self._evict_oldest(self._streaks)
                    n += 1
            except (TypeError, ValueError):
                continue
        return n


def seconds_until_window(window: tuple[int, int], now: float) -> float:
    """0 when the local time of ``now`` (epoch seconds) is inside ``window`` ((start, end)
    minutes after local midnight, wrapping past midnight when start > end), else the seconds
    until it opens."""
    t = _time.localtime(now)
    start, end = window
    minute = t.tm_hour * 60 + t.tm_min
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return 0.0
    return ((start - minute) % 1440) * 60.0 - t.tm_sec - (now % 1.0)


def in_window(window: tuple[int, int], now: float) -> bool:
    return seconds_until_window(window, now) == 0.0


def _fmt(seconds: float) -> str:
    """A duration as people write it: 10m, 1h, 59m58s, 9.9s."""
    if seconds < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"
