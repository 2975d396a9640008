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
  filesystem's ``errors_count`` is read and its rise since the last value accounted for (kept
  across restarts by the ledger) is the event's ``count``. The published counts of a
  filesystem therefore add up to the kernel's ``errors_count`` delta however much kmsg was
  rate limited or fanotify coalesced.
* ext4 counts an error after notifying it, sometimes a tick or two later (7 ms measured). A
  group whose error is not counted yet waits for the rise (re-reading, backing off, for at
  most ``counter_lag``); a rise is shared oldest view first, so each error's count stays with
  the event carrying its details. A rise larger than its views (the counter ran ahead of the
  views of later errors) is a *surplus*: views arriving soon after find their error already
  counted and are published at once, with ``count`` 0, only if they bring new details.
* State kinds (read-only, writable, shut down) merge every report of the same transition on the
  same mount; a repeat of an already published state is a confirmation, not an event.
* A source that was expected but missed a group (kmsg throttled by ext4's rate limit) is not
  waited for on that device for a while, so a throttled source delays one event, not all.
* Block I/O errors are aggregated per device over a short window (first details, count, last
  time): a failing disk prints a line per request.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
    recheck: float = 0.002  # first re-read of a counter that has not counted a view's error
    # How far apart ext4's errors_count and the views of one error can be (7 ms measured; the
    # count comes after the notification): a view waits this long at most for its error to be
    # counted, and a surplus counted ahead of views is matched to views that come this soon.
    # 50 ms: seven times the worst lag measured, and short enough that a held view does not
    # outlive what the rules do next (isolate, repair) by much.
    counter_lag: float = 0.05


@dataclass(eq=False)  # held groups are found in lists by identity
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
    opened: float = 0.0
    fs_key: str | None = None  # the filesystem whose counter a held group waits on
    hold_until: float | None = None
    step: float = 0.0  # the next re-read interval while held (doubles)

    def seen(self) -> int:
        """How many errors this group's views stand for (fanotify coalesces; others see one)."""
        return max(self.fanotify_count, 1) if self.lines else 0

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
        # device key -> (function, line, sources, clock) of the last event that counted errors:
        # a view of that error from another source, arriving late, is recognised by it.
        self._last_counted: dict[str, tuple[str | None, int | None, frozenset[str], float]] = {}
        # (device key, source) -> until when that source is not waited for on that device
        self._missing: dict[tuple[str, str], float] = {}
        self._ratelimits: dict[str, _RateLimit] = {}
        self._held: list[_Group] = []  # closed groups waiting for the counter, oldest first
        # fs key -> (errors counted ahead of their views, clock at that read); a key is present
        # once this correlator has read that filesystem's counter.
        self._surplus: dict[str, tuple[int, float]] = {}

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
            group = _Group(obs.kind, key, obs, placement, now + self._window(obs.kind), opened=now)
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
        for g in [g for g in self._held if g.deadline <= now]:
            if g in self._held:  # not settled meanwhile by a read for an earlier one
                self._recheck(g, final=False)
        if len(self._missing) > 4096:
            self._missing = {k: v for k, v in self._missing.items() if v > now}

    def next_deadline(self) -> float | None:
        return min((g.deadline for g in [*self._groups.values(), *self._held]), default=None)

    def flush(self) -> None:
        """Close every open group (shutdown, end of a replay)."""
        for gkey in list(self._groups):
            self._close(gkey)
        while self._held:
            self._recheck(self._held[0], final=True)

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
            return f"{dev.devnum[0]}:{dev.devnum[1]}"
        return f"fsid:{obs.details.get('fsid', '?')}"

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

    def _read_counter(self, group: _Group) -> tuple[int, str, Kernel] | None:
        dev = group.placement.device if group.placement else group.first.device
        counter = self.counters.read(dev.name) if self.counters is not None and dev is not None and dev.name \
            else None
        if counter is not None:
            return counter.errors_total, counter.fs_key, counter.last_error
        r = group.counter_report
        if r is not None and r.errors_total is not None and r.fs_key is not None:
            return r.errors_total, r.fs_key, r.kernel  # the filesystem went away: trust the report
        return None

    def _close_error(self, group: _Group) -> None:
        reading = self._read_counter(group)
        if reading is None:
            count = max(group.fanotify_count, 1 if group.lines else 0)
            if count:
                self._publish_error(group, count, None, None, None)
            return
        held = [h for h in self._held if h.fs_key == reading[1]]
        self._settle(reading, [*held, group], final=False)

    def _recheck(self, group: _Group, *, final: bool) -> None:
        reading = self._read_counter(group)
        if reading is None or reading[1] != group.fs_key:
            # Unmounted (a repair detaching it, say), or another filesystem on the device now:
            # no rise to wait for here. Not counted from the views either: ext4 writes its count
            # into the superblock at umount, so an error it had not counted yet is reported
            # from there when the filesystem is back, and a view held across a repair must not
            # come out after it as a fresh error (the repaired VE's rules would fire on it).
            self._held.remove(group)
            self._uncounted(group, None, None)
            return
        self._settle(reading, [h for h in self._held if h.fs_key == group.fs_key], final=final)

    def _settle(self, reading: tuple[int, str, Kernel], queue: list[_Group], *, final: bool) -> None:
        """Share a counter's rise among the groups waiting for it, oldest first.

        Each older group takes what its views saw and the newest the rest (errors no view
        reported: throttled kmsg, coalesced fanotify, or later errors whose views are still on
        their way). Groups left with nothing wait for the next rise, unless a recent surplus
        says their error was counted already.
        """
        total, fs_key, last = reading
        now = self.clock()
        base = self.ledger.get(fs_key) if self.ledger is not None else None
        # A first read of this filesystem, or a counter reset (e2fsck), counts history: none of
        # it can be matched to views arriving now.
        history = base is None or total < base or fs_key not in self._surplus
        if base is None or total < base:
            base = 0  # all that the counter records now is unreported
        if history:
            if len(self._surplus) > 4096:
                self._surplus.clear()
            self._surplus[fs_key] = (0, now)
        surplus, surplus_time = self._surplus[fs_key]
        left, accounted = total - base, base
        for i, g in enumerate(queue):
            if g in self._held:
                self._held.remove(g)
            newest = i == len(queue) - 1
            share = left if newest else min(left, g.seen())
            left -= share
            accounted += share
            if share > 0:
                if not history and share > g.seen():
                    surplus, surplus_time = surplus + share - g.seen(), now
                # The superblock's last-error record is the newest counted error's.
                self._publish_error(g, share, accounted, fs_key, last if newest else None)
            elif not g.lines:
                pass  # a periodic counter report with nothing new
            elif surplus > 0 and g.opened <= surplus_time + self.settings.counter_lag:
                surplus -= min(surplus, g.seen())
                self._uncounted(g, fs_key, total)
            elif self._late_view(g):
                self._uncounted(g, fs_key, total)
            elif not final and (g.hold_until is None or now < g.hold_until):
                self._hold(g, fs_key, now)
            else:
                self._uncounted(g, fs_key, total)
        self._surplus[fs_key] = (surplus, surplus_time)
        if self.ledger is not None:
            self.ledger.set(fs_key, total)

    def _hold(self, group: _Group, fs_key: str, now: float) -> None:
        if group.hold_until is None:
            group.fs_key, group.hold_until, group.step = fs_key, now + self.settings.counter_lag, \
                self.settings.recheck
            group.deadline = now
        if group.deadline <= now:
            group.deadline = min(now + group.step, group.hold_until)
            group.step *= 2
        group.waiting_for = frozenset()
        self._held.append(group)

    def _late_view(self, group: _Group) -> bool:
        """The group is the last counted error seen again by sources that event lacked (kmsg
        later than the window), soon after: counted already. A view from a source that event had
        is a new error, even at the same function and line (a burst of one error site)."""
        last = self._last_counted.get(group.key)
        if last is None:
            return False
        function, line, sources, when = last
        return ((group.kernel.function, group.kernel.line) == (function, line)
                and not (set(group.sources) - {"sysfs"}) & sources
                and group.opened <= when + self.settings.counter_lag)

    def _uncounted(self, group: _Group, fs_key: str | None, total: int | None) -> None:
        """A view whose error the counter counted with an earlier event (or never will)."""
        if (group.kernel.function, group.kernel.line) == self._last_error.get(group.key) or \
                group.kernel.function is None:
            self.stats.already_counted += 1
            return
        self._publish_error(group, 0, total, fs_key, None)

    def _publish_error(self, group: _Group, count: int, counter_total: int | None, fs_key: str | None,
                       last: Kernel | None) -> None:
        sources = [s for s in group.sources if s != "sysfs"]
        kernel = group.kernel
        details = dict(group.details)
        if counter_total is not None:
            details["errors_total"] = counter_total
            if count > 0:
                sources.append("sysfs")
                if not group.lines:
                    details["recorded"] = True  # seen only in the superblock's error record
                if last is not None and (kernel.function is None or
                                         (kernel.function, kernel.line) == (last.function, last.line)):
                    kernel = kernel.merged(last)
            else:
                details["already_counted"] = True
        if group.counter_report is not None and "first_error" in group.counter_report.details:
            details.setdefault("first_error", group.counter_report.details["first_error"])
        self._last_error[group.key] = (kernel.function, kernel.line)
        if count > 0:
            self._last_counted[group.key] = (kernel.function, kernel.line, frozenset(sources) - {"sysfs"},
                                             self.clock())
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
