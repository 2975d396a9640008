"""One event per kernel fact: merging the views of kmsg, fanotify, sysfs and the mount table.

How facts are told apart:

* A filesystem error reaches the daemon as a kmsg line (function, line, inode, comm, text) and a
  fanotify record (errno, inode, a coalesced ``error_count``) within microseconds, and changes
  the filesystem's sysfs ``errors_count``. Observations for one device are collected in a
  *group* that closes as soon as every source expected to see the error has (so the common
  case publishes without waiting), or when a short window ends (a rate-limited kmsg line never
  comes). A second observation from a source already in the group is a second fact: the group
  closes and a new one starts.
* Counts come from the kernel's own counter where there is one: when a group closes, the
  filesystem's ``errors_count`` is read and the event's ``count`` is its rise since the last
  value accounted for (kept across restarts by the ledger). The published counts of a
  filesystem therefore add up to the kernel's ``errors_count`` delta however much kmsg was
  rate limited or fanotify coalesced. A group that finds nothing new to count (its error was
  already counted by the previous event) is published only if it brings new details.
* State kinds (read-only, writable, shut down) merge every report of the same transition on the
  same mount; a repeat of an already published state is a confirmation, not an event.
* A source that was expected but missed a group (kmsg throttled by ext4's rate limit) is not
  waited for on that device for a while, so a throttled source delays one event, not all.
* Block I/O errors are aggregated per device over a short window (first details, count, last
  time): a failing disk prints a line per request.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..events import DEFAULT_SEVERITY, STATE_KINDS, Device, Event, Kernel, Observation, fact_id, hostname
from ..inventory import Inventory, Placement
from ..typing import ErrorCounters, StateStore

Publish = Callable[[Event], None]
Expected = Callable[[str, Placement | None], frozenset[str]]

GROUPED = frozenset({"fs.error", "fs.warning", "blk.io_error"}) | STATE_KINDS


def _no_expectation(kind: str, placement: Placement | None) -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True, slots=True)
class CorrelatorSettings:
    window: float = 0.02  # fs.error / fs.warning: wait this long for the other sources
    state_window: float = 1.0  # read-only and shutdown: the mount table is polled
    io_window: float = 0.1  # blk.io_error aggregation
    # A source that missed a fact on a device (kmsg under ext4's rate limit, 10 lines per 5 s
    # by default) is not waited for on that device for this long, so throttling costs one
    # window of latency, not one per error.
    miss_cooldown: float = 5.0
    recheck: float = 0.002


@dataclass
class _Group:
    kind: str
    key: str
    first: Observation
    placement: Placement | None
    deadline: float
    sources: list[str] = field(default_factory=list)
    kernel: Kernel = field(default_factory=Kernel)
    fanotify_count: int = 0
    lines: int = 0  # observations from event sources (not counter reports)
    last_time: float = 0.0
    first_time: float | None = None  # earliest time a source stamped (kmsg: the kernel's own)
    details: dict[str, Any] = field(default_factory=dict)
    counter_report: Observation | None = None
    waiting_for: frozenset[str] = frozenset()
    rechecked: bool = False

    def add(self, obs: Observation) -> None:
        if obs.source not in self.sources:
            self.sources.append(obs.source)
        if obs.errors_total is not None and obs.source == "sysfs":
            self.counter_report = obs
            return
        self.lines += obs.count if self.kind == "blk.io_error" else 1
        self.kernel = self.kernel.merged(obs.kernel)
        if obs.source == "fanotify":
            self.fanotify_count += max(obs.count, 1)
        self.last_time = max(self.last_time, obs.time)
        self.first_time = obs.time if self.first_time is None else min(self.first_time, obs.time)
        for k, v in obs.details.items():
            self.details.setdefault(k, v)

    def event_sources(self) -> set[str]:
        return {s for s in self.sources if not (s == "sysfs" and self.counter_report is not None)}


@dataclass
class _RateLimit:
    """A model of ext4's per-filesystem kmsg rate limit for errors (``___ratelimit``).

    The kernel prints at most ``burst`` error lines per ``interval`` starting at the first line
    after the previous interval ended; the rest are only counted. Mirroring it lets the
    correlator stop waiting for kmsg lines that will not come, without a missed window first.
    Our interval is cut short by a margin: near the boundary it is cheaper to wait one window
    for a line that does not come than to publish before a line that does.
    """

    burst: int = 10
    interval: float = 5.0
    begin: float | None = None
    printed: int = 0
    margin: float = 0.05

    def line(self, now: float) -> None:
        if self.begin is None or now > self.begin + self.interval - self.margin:
            self.begin, self.printed = now, 0
        self.printed += 1

    def throttled(self, now: float) -> bool:
        return (
            self.interval > 0
            and self.begin is not None
            and now <= self.begin + self.interval - self.margin
            and self.printed >= self.burst
        )


@dataclass
class CorrelatorStats:
    published: int = 0
    merged: int = 0
    already_counted: int = 0
    duplicate_state: int = 0


class Correlator:
    def __init__(
        self,
        *,
        inventory: Inventory,
        publish: Publish,
        counters: ErrorCounters | None = None,
        ledger: StateStore | None = None,
        expected: Expected = _no_expectation,
        settings: CorrelatorSettings = CorrelatorSettings(),
        host: str | None = None,
        clock: Callable[[], float] = _time.monotonic,
    ) -> None:
        self.inventory = inventory
        self.publish = publish
        self.counters = counters
        self.ledger = ledger
        self.expected = expected
        self.settings = settings
        self.host = host or hostname()
        self.clock = clock
        self.stats = CorrelatorStats()
        self._groups: dict[tuple[str, str], _Group] = {}
        # device key -> (kind, mount_seq) of the last published state event
        self._state: dict[str, tuple[str, int | None]] = {}
        # device key -> (function, line) of the last published fs.error, to tell new details
        self._last_error: dict[str, tuple[str | None, int | None]] = {}
        # (device key, source) -> until when that source is not waited for on that device
        self._missing: dict[tuple[str, str], float] = {}
        self._ratelimits: dict[str, _RateLimit] = {}
        self._held: list[_Group] = []  # closed groups waiting to re-read the counter

    # -- input -------------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if obs.kind not in GROUPED:
            placement = self.inventory.place(obs.device, obs.mount)
            self._emit(obs.kind, obs, placement, list(dict.fromkeys([obs.source])), obs.kernel,
                       count=obs.count, details=dict(obs.details))
            return
        placement = self.inventory.place(obs.device, obs.mount)
        key = self._device_key(obs, placement)
        gkey = (obs.kind, key)
        now = self.clock()
        group = self._groups.get(gkey)
        if group is not None and self._is_new_fact(group, obs):
            self._close(gkey)
            group = None
        if group is None:
            group = _Group(obs.kind, key, obs, placement, now + self._window(obs.kind))
            self._groups[gkey] = group
        else:
            self.stats.merged += 1
        group.add(obs)
        scope = self._scope(key, placement)
        self._missing.pop((scope, obs.source), None)
        if obs.source == "kmsg" and obs.kind == "fs.error":
            self._ratelimit(key, scope).line(now)
        if not group.lines:
            # A periodic counter report alone is no new fact: it waits for nobody (and marks
            # nobody as missing); it only gives views of a fresh error a window to join it.
            if self._nothing_new(obs):
                self._close(gkey)
            return
        if obs.kind == "blk.io_error":
            return  # aggregated over its window, whoever reported it
        expected = self._expected(obs.kind, key, placement, now)
        group.waiting_for = expected - group.event_sources()
        if expected and not group.waiting_for:
            self._close(gkey)

    def _nothing_new(self, report: Observation) -> bool:
        if self.ledger is None or report.fs_key is None or report.errors_total is None:
            return False
        return self.ledger.get(report.fs_key) == report.errors_total

    def waiting_for(self) -> set[str]:
        """Sources that open groups still wait for (the daemon may ask them to read now)."""
        out: set[str] = set()
        for g in self._groups.values():
            out |= g.waiting_for
        return out

    @staticmethod
    def _scope(key: str, placement: Placement | None) -> str:
        # What a source missed or how much kmsg printed belongs to one mount of a filesystem:
        # loop names are reused, and a new filesystem on loop0 starts with a clean slate.
        return f"{key}#{placement.mount_seq if placement else None}"

    def _expected(self, kind: str, key: str, placement: Placement | None, now: float) -> frozenset[str]:
        expected = self.expected(kind, placement)
        scope = self._scope(key, placement)
        if kind == "fs.error" and "kmsg" in expected:
            rl = self._ratelimits.get(scope)
            if rl is not None and rl.throttled(now):
                expected = expected - {"kmsg"}
        if self._missing:
            expected = frozenset(s for s in expected if self._missing.get((scope, s), 0.0) <= now)
        return expected

    def _ratelimit(self, device_name: str, scope: str) -> _RateLimit:
        rl = self._ratelimits.get(scope)
        if rl is None:
            if len(self._ratelimits) > 4096:
                self._ratelimits.clear()
            limits = getattr(self.counters, "ratelimit", lambda name: None)(device_name)
            rl = self._ratelimits[scope] = _RateLimit(*limits) if limits else _RateLimit()
        return rl

    def expire(self) -> None:
        now = self.clock()
        for gkey in [k for k, g in self._groups.items() if g.deadline <= now]:
            group = self._groups[gkey]
            missed = group.waiting_for if group.lines else frozenset()
            for source in missed - group.event_sources():
                self._missing[(self._scope(group.key, group.placement), source)] = now + self.settings.miss_cooldown
            self._close(gkey)
        if self._held:
            due = [g for g in self._held if g.deadline <= now]
            self._held = [g for g in self._held if g.deadline > now]
            for g in due:
                self._close_error(g)
        if len(self._missing) > 4096:
            self._missing = {k: v for k, v in self._missing.items() if v > now}

    def next_deadline(self) -> float | None:
        return min((g.deadline for g in [*self._groups.values(), *self._held]), default=None)

    def flush(self) -> None:
        """Close every open group (shutdown, end of a replay)."""
        for gkey in list(self._groups):
            self._close(gkey)
        held, self._held = self._held, []
        for g in held:
            g.rechecked = True
            self._close_error(g)

    # -- grouping ----------------------------------------------------------------------------
    def _window(self, kind: str) -> float:
        if kind in STATE_KINDS:
            return self.settings.state_window
        if kind == "blk.io_error":
            return self.settings.io_window
        return self.settings.window

    @staticmethod
    def _device_key(obs: Observation, placement: Placement | None) -> str:
        dev = placement.device if placement else obs.device
        if dev is not None and dev.name:
            return dev.name
        if dev is not None and dev.devnum:
            return "%d:%d" % dev.devnum
        return "fsid:%s" % obs.details.get("fsid", "?")

    def _is_new_fact(self, group: _Group, obs: Observation) -> bool:
        if obs.kind in STATE_KINDS or obs.kind == "blk.io_error":
            return False  # reports of one transition / one failing request stream merge
        if obs.source == "sysfs" and obs.errors_total is not None:
            return False  # a counter report never starts a fact of its own inside a group
        return obs.source in group.sources

    # -- output ------------------------------------------------------------------------------
    def _close(self, gkey: tuple[str, str]) -> None:
        group = self._groups.pop(gkey, None)
        if group is None:
            return
        if group.kind in ("fs.error",):
            self._close_error(group)
        elif group.kind in STATE_KINDS:
            self._close_state(group)
        else:
            self._emit(group.kind, group.first, group.placement, group.sources, group.kernel,
                       count=max(group.lines, 1), last_time=group.last_time, details=group.details,
                       time=group.first_time)

    def _close_error(self, group: _Group) -> None:
        sources = [s for s in group.sources if s != "sysfs"]
        kernel = group.kernel
        details = dict(group.details)
        counter = None
        dev = group.placement.device if group.placement else group.first.device
        if self.counters is not None and dev is not None and dev.name:
            counter = self.counters.read(dev.name)
        if counter is None and group.counter_report is not None:
            # The filesystem went away between the report and now: trust the report.
            r = group.counter_report
            counter_total, fs_key, last = r.errors_total, r.fs_key, r.kernel
        elif counter is not None:
            counter_total, fs_key, last = counter.errors_total, counter.fs_key, counter.last_error
        else:
            counter_total, fs_key = None, None
        if counter_total is None or fs_key is None:
            count = max(group.fanotify_count, 1 if group.lines else 0)
            if count == 0:
                return
        else:
            base = self.ledger.get(fs_key) if self.ledger is not None else None
            if base is None or counter_total < base:
                # First sight of this filesystem, or its counter was reset (e2fsck): all that
                # it records now is unreported.
                base = 0
            count = counter_total - base
            if self.ledger is not None:
                self.ledger.set(fs_key, counter_total)
            details["errors_total"] = counter_total
            if count > 0:
                sources.append("sysfs")
                if not group.lines:
                    details["recorded"] = True  # seen only in the superblock's error record
                if kernel.function is None or (kernel.function, kernel.line) == (last.function, last.line):
                    kernel = kernel.merged(last)
            else:
                if not group.lines:
                    return  # a periodic counter report with nothing new
                if not group.rechecked:
                    # fanotify is notified before ext4 increments errors_count (both in
                    # __ext4_error, the counter last): on another CPU the error may not be
                    # counted yet. Look again shortly before calling it already counted.
                    group.rechecked = True
                    group.deadline = self.clock() + self.settings.recheck
                    group.waiting_for = frozenset()
                    self._held.append(group)
                    return
                if (kernel.function, kernel.line) == self._last_error.get(group.key) or kernel.function is None:
                    self.stats.already_counted += 1
                    return
                details["already_counted"] = True
        if group.counter_report is not None and "first_error" in group.counter_report.details:
            details.setdefault("first_error", group.counter_report.details["first_error"])
        self._last_error[group.key] = (kernel.function, kernel.line)
        first_time = group.first_time if group.lines and group.first_time is not None else \
            (group.counter_report or group.first).time
        # The error counted on this filesystem as number ``counter_total`` is one kernel fact for
        # good: seen again after a restart (the ledger not yet saved), it keeps its id.
        fact = fact_id("fs.error", fs_key, counter_total) if count > 0 and fs_key is not None and \
            counter_total is not None else None
        self._emit("fs.error", group.first, group.placement, sources or ["sysfs"], kernel,
                   count=count, last_time=max(group.last_time, first_time), details=details, time=first_time,
                   event_id=fact)

    def _close_state(self, group: _Group) -> None:
        mount = group.placement.mount_seq if group.placement else None
        prior = self._state.get(group.key)
        if prior == (group.kind, mount) or (
            prior is not None and prior[0] == group.kind and mount is None
        ):
            self.stats.duplicate_state += 1
            return
        if group.kind == "fs.writable" and prior is None:
            return  # nothing was reported read-only on this mount, so nothing recovered
        self._state[group.key] = (group.kind, mount)
        self._emit(group.kind, group.first, group.placement, group.sources, group.kernel,
                   count=1, last_time=group.last_time, details=group.details, time=group.first_time)

    def _emit(self, kind: str, first: Observation, placement: Placement | None,
              sources: Iterable[str], kernel: Kernel, *, count: int,
              last_time: float | None = None, details: dict[str, Any] | None = None,
              time: float | None = None, event_id: str | None = None) -> None:
        device: Device | None = placement.device if placement else first.device
        t = first.time if time is None else time
        event = Event(
            kind=kind,
            time=t,
            host=self.host,
            severity=first.severity or DEFAULT_SEVERITY.get(kind, "info"),
            device=device,
            fs=(placement.fs if placement and placement.fs else None) or first.fs,
            mount=(placement.mount if placement and placement.mount else None) or first.mount,
            ve=first.ve or (placement.ve if placement else None),
            kernel=kernel,
            sources=tuple(sources),
            count=count,
            first_time=t if last_time is not None else None,
            last_time=last_time,
            details=details or {},
            **({"id": event_id} if event_id else {}),
        )
        self.stats.published += 1
        self.publish(event)
