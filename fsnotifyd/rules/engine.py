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
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, NamedTuple

from ..events import Device, Event, Kernel
from .compiler import Compiled, CompiledRule, LabelsOf, _always, compile_rules
from .schema import RECOVERY, Action, RuleSet

FIRED, THRESHOLD, COOLDOWN = "fired", "threshold", "cooldown"
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
    return Event(
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


@dataclass
class _Window:
    entries: collections.deque  # (time, count, event id)
    total: int = 0


class Engine:
    def __init__(self, ruleset: RuleSet, *, labels_of: LabelsOf = lambda ve: {}, max_keys: int = 100_000,
                 explain: bool = True) -> None:
        """``explain=False`` returns only fired decisions (suppressed ones are still counted in
        ``stats``): a month of log replays without building millions of suppressed rows."""
        self.ruleset = ruleset
        self.explain = explain
        self.compiled: Compiled = compile_rules(ruleset, labels_of)
        self.max_keys = max_keys
        self.stats = EngineStats()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._cooldowns: dict[tuple[str, str], float] = {}
        self.dirty = False
        self._resets: dict[str, list[CompiledRule]] = {}
        for cr in self.compiled.rules:
            for kind in cr.rule.reset_on:
                self._resets.setdefault(kind, []).append(cr)
        self._recovery_kinds = frozenset(RECOVERY) | frozenset(self._resets) | {"dev.change"}

    # -- processing --------------------------------------------------------------------------
    def process(self, event: Mapping[str, Any], now: float | None = None) -> list[Decision]:
        """Decide on one event; ``now`` is its time as epoch seconds when the caller already
        parsed it (else it is read from the event's ``time``)."""
        self.stats.events += 1
        kind = event.get("kind")
        if not isinstance(kind, str):
            return []
        if kind in self._recovery_kinds:
            self._recover(kind, event)
        candidates = self.compiled.candidates(kind, event)
        if not candidates:
            return []
        matched = [cr for cr in candidates if cr.predicate is _always or cr.predicate(event)]
        if not matched:
            return []
        # What every decision on this event shares, computed once.
        if now is None:
            now = event_time(event)
        ve = event.get("ve")
        dev = event.get("device")
        device = dev.get("name") if isinstance(dev, dict) else None
        dev_key = f"dev:{device}"
        ve_key = dev_key if ve is None else f"ve:{ve}"
        eid = str(event.get("id", ""))
        count = event.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            count = 1
        out: list[Decision] = []
        stats = self.stats
        stats.matched += len(matched)
        windows, cooldowns, explain = self._windows, self._cooldowns, self.explain
        # The per-rule decision, inlined: in a replay this loop runs several times per event.
        for cr in matched:
            rule = cr.rule
            th = rule.threshold
            key = dev_key if th is not None and th.per == "device" else ve_key
            skey = (rule.name, key)
            ids: tuple[str, ...] = (eid,)
            total = need = 0
            within = 0.0
            if th is not None:
                w = windows.get(skey)
                if w is None:
                    w = self._new_window(skey)
                entries = w.entries
                if count:
                    entries.append((now, count, eid))
                    w.total += count
                horizon = now - th.within
                while entries and entries[0][0] < horizon:
                    w.total -= entries.popleft()[1]
                # At most threshold.count entries, however long the storm (or the cooldown):
                # each stands for at least one fact, so the newest `count` still reach it.
                while len(entries) > th.count:
                    w.total -= entries.popleft()[1]
                total, need, within = w.total, th.count, th.within
                self.dirty = True
                if total < need:
                    stats.suppressed_threshold += 1
                    if explain:
                        out.append(Decision(now, rule.name, THRESHOLD, ve, device, key, rule.actions,
                                            rule.dry_run, ids, total, need, within))
                    continue
                ids = tuple([e[2] for e in entries])
            if rule.cooldown > 0:
                last = cooldowns.get(skey)
                if last is not None and now - last < rule.cooldown:
                    stats.suppressed_cooldown += 1
                    if explain:
                        out.append(Decision(now, rule.name, COOLDOWN, ve, device, key, rule.actions,
                                            rule.dry_run, ids, total, need, within, last + rule.cooldown - now))
                    continue
                self._touch(cooldowns, skey, now)
                self.dirty = True
            if th is not None:
                windows.pop(skey, None)  # a fired threshold starts counting afresh
            stats.fired += 1
            out.append(Decision(now, rule.name, FIRED, ve, device, key, rule.actions, rule.dry_run,
                                ids, total, need, within))
            if not rule.continue_:
                stats.matched -= len(matched) - 1 - matched.index(cr)
                break
        return out

    def process_all(self, events: Iterable[Mapping[str, Any]]) -> Iterable[Decision]:
        for e in events:
            yield from self.process(e)

    def _new_window(self, skey: tuple[str, str]) -> _Window:
        w = self._windows[skey] = _Window(collections.deque())
        if len(self._windows) > self.max_keys:
            # Oldest created first: a window is re-created after every firing, so creation
            # order is close to use order without paying for move-to-end on every event.
            self._windows.pop(next(iter(self._windows)))
            self.stats.evicted += 1
        return w

    def _touch(self, d: dict, skey: tuple[str, str], value: float) -> None:
        d.pop(skey, None)
        d[skey] = value
        if len(d) > self.max_keys:
            d.pop(next(iter(d)))
            self.stats.evicted += 1

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
        watched = RECOVERY.get(kind, frozenset())
        rules = [cr.rule for cr in self.compiled.rules
                 if "*" in watched or watched & set(cr.rule.match.kinds)]
        rules += [cr.rule for cr in self._resets.get(kind, ())]
        for rule in rules:
            for key in keys:
                hit = self._windows.pop((rule.name, key), None) is not None
                hit |= self._cooldowns.pop((rule.name, key), None) is not None
                if hit:
                    self.stats.cleared += 1
                    self.dirty = True

    # -- persistence -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Windows and cooldowns, to outlive a restart (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "windows": [[r, k, [list(e) for e in w.entries]] for (r, k), w in self._windows.items() if w.entries],
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
                    w.entries.append((float(t), int(c), str(eid)))
                    w.total += int(c)
                n += 1
            except (TypeError, ValueError):
                continue
        for item in state.get("cooldowns") or []:
            try:
                name, key, t = item
                if name in rules and rules[name].cooldown > 0:
                    self._touch(self._cooldowns, (name, key), float(t))
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
