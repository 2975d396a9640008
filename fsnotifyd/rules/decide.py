"""The rules engine's per-event path, in Python: the reference for the C version (``_decide.c``).

For each event: the rules that can match its kind (``candidates``), those whose match holds,
then for each in file order its threshold window, its cooldown and a decision. The C module
does exactly these steps over the same state (the engine's ``windows`` and ``cooldowns``
dicts, in the shapes below), and ``tests/unit/test_rules_core.py`` holds the two to identical
decisions, state and counters. :mod:`fsnotifyd.rules.native` picks which one runs.

State shapes (shared with the C version, persistence and recovery):

* ``windows[(rule name, key)] = [total, [(time, count, event id), ...]]``, oldest first;
* ``cooldowns[(rule name, key)] = time the rule last fired``, least recently fired first;
* (the engine's own) ``streaks[(rule name, key)] = [since, last]`` of a ``sustained`` rule;

where ``key`` is ``"ve:<id>"`` or ``"dev:<name>"`` (events of no VE, or ``per: device``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Match program opcodes (a program is a tuple of (path tuple, opcode, constant)); the C
# module exports the same names in the same order as ``OPS`` and is refused if they differ.
OPS = ("equals", "ne", "in", "not_in", "regex", "prefix", "suffix", "contains",
       "gt", "ge", "lt", "le", "exists", "missing", "ve_in")
# A count beyond this many kernel facts is taken as this many: window totals stay within 64
# bits (at most 1,000,001 entries of 2**40) in both implementations.
MAX_FACTS = 1 << 40

FIRED, THRESHOLD, COOLDOWN = "fired", "threshold", "cooldown"
SUSTAINED, WINDOW = "sustained", "window"  # suppressed by the gate (engine.Engine._gate)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule (or a residual of one, found through an index) with its predicate; ``program``
    is the same test as data for the C version (None: it calls ``predicate``)."""

    index: int
    rule: Any  # schema.Rule
    predicate: Callable[[Mapping[str, Any]], bool]
    program: tuple | None = None


class Core:
    """The per-event decision loop; see the module docstring for the state it keeps."""

    def __init__(self, fast: dict, candidates: Callable, recovery: frozenset, recover: Callable,
                 windows: dict, cooldowns: dict, decision: type, event_time: Callable[[Any], float],
                 max_keys: int, explain: bool, gate: Callable | None = None) -> None:
        # ``fast`` is the C version's view of the candidate index; here ``candidates`` is it.
        self.candidates, self.recovery, self.recover = candidates, recovery, recover
        self.windows, self.cooldowns, self.decision = windows, cooldowns, decision
        self.event_time, self.max_keys, self.explain = event_time, max_keys, bool(explain)
        # Rules with ``sustained`` or ``window`` ask ``gate(rule, key, now, event, ve, device,
        # event id)`` before their threshold: None goes on; a decision (suppressed) is reported
        # when explaining; anything else stops the rule for this event silently.
        self.gate = gate
        self.dirty = False
        self.events = self.matched = self.fired = 0
        self.suppressed_threshold = self.suppressed_cooldown = self.evicted = self.cleared = 0

    def process(self, event: Mapping[str, Any], now: float | None = None) -> list:
        self.events += 1
        if event.__class__ is not dict:
            event = dict(event)
        kind = event.get("kind")
        if not isinstance(kind, str):
            return []
        if kind in self.recovery:
            self.recover(kind, event)
        matched = [cr for cr in self.candidates(kind, event) if cr.predicate(event)]
        if not matched:
            return []
        if now is None:
            now = self.event_time(event)
        ve = event.get("ve")
        dev = event.get("device")
        device = dev.get("name") if isinstance(dev, dict) else None
        dev_key = f"dev:{device}"
        ve_key = dev_key if ve is None else f"ve:{ve}"
        eid = str(event["id"]) if "id" in event else ""
        count = event.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            count = 1
        count = min(count, MAX_FACTS)
        out: list = []
        windows, cooldowns, Decision = self.windows, self.cooldowns, self.decision
        self.matched += len(matched)
        for i, cr in enumerate(matched):
            rule = cr.rule
            th = rule.threshold
            key = dev_key if th is not None and th.per == "device" else ve_key
            skey = (rule.name, key)
            ids: tuple[str, ...] = (eid,)
            total: int = 0
            need: int = 0
            within: float = 0.0
            if self.gate is not None and (rule.sustained is not None or rule.window is not None):
                g = self.gate(rule, key, now, event, ve, device, eid)
                if g is not None:
                    if self.explain and isinstance(g, tuple):
                        out.append(g)
                    continue
            if th is not None:
                w = windows.get(skey)
                if w is None:
                    w = windows[skey] = [0, []]
                    self._evict_oldest(windows)
                entries = w[1]
                if count:
                    entries.append((now, count, eid))
                    w[0] += count
                horizon = now - th.within
                while entries and entries[0][0] < horizon:
                    w[0] -= entries.pop(0)[1]
                # At most threshold.count entries, however long the storm (or the cooldown):
                # each stands for at least one fact, so the newest `count` still reach it.
                while len(entries) > th.count:
                    w[0] -= entries.pop(0)[1]
                total, need, within = w[0], th.count, th.within
                self.dirty = True
                if total < need:
                    self.suppressed_threshold += 1
                    if self.explain:
                        out.append(Decision(now, rule.name, THRESHOLD, ve, device, key, rule.actions,
                                            rule.dry_run, ids, total, need, within, 0.0))
                    continue
                ids = tuple([e[2] for e in entries])
            if rule.cooldown > 0:
                last = cooldowns.get(skey)
                if last is not None and now - last < rule.cooldown:
                    self.suppressed_cooldown += 1
                    if self.explain:
                        out.append(Decision(now, rule.name, COOLDOWN, ve, device, key, rule.actions,
                                            rule.dry_run, ids, total, need, within, last + rule.cooldown - now))
                    continue
                cooldowns.pop(skey, None)  # re-inserted: least recently fired first
                cooldowns[skey] = now
                self._evict_oldest(cooldowns)
                self.dirty = True
            if th is not None:
                windows.pop(skey, None)  # a fired threshold starts counting afresh
            self.fired += 1
            out.append(Decision(now, rule.name, FIRED, ve, device, key, rule.actions, rule.dry_run,
                                ids, total, need, within, 0.0))
            if not rule.continue_:
                self.matched -= len(matched) - 1 - i
                break
        return out

    def process_timed(self, items: Iterable[tuple]) -> list:
        out: list = []
        for item in items:
            out.extend(self.process(item[-1], item[0]))
        return out

    def _evict_oldest(self, d: dict) -> None:
        # Oldest first: a window is re-created after every firing and a cooldown re-inserted,
        # so insertion order is close to use order without a move-to-end on every event.
        if len(d) > self.max_keys:
            d.pop(next(iter(d)))
            self.evicted += 1
