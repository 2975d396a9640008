"""The sources, each supervised on its own, and the bounded queue they feed.

A source that cannot run on this host is reported down with its reason and the daemon goes on
with the rest; one that fails is retried with backoff. Start-up waits until every source is
either up or down with a reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ..config import SourceConfig
from ..errors import SourceUnavailable
from ..events import Observation
from ..inventory import Inventory, Placement
from ..metrics import Metrics
from ..typing import Source

log = structlog.get_logger("fsnotifyd")

READY_TIMEOUT = 10.0  # seconds start-up waits for every source to be up or down


@dataclass
class SourceStatus:
    up: bool = False
    reason: str | None = None
    hint: str | None = None
    observations: int = 0
    restarts: int = 0


class Bus:
    """The bounded queue between sources and the correlator; overflow is counted, not hidden."""

    def __init__(self, size: int, metrics: Metrics, statuses: dict[str, SourceStatus]) -> None:
        # None is a wake-up at shutdown, not an observation.
        self.queue: asyncio.Queue[Observation | None] = asyncio.Queue(maxsize=size)
        self.metrics = metrics
        self.statuses = statuses
        self.dropped = 0

    def sender(self, name: str) -> Callable[[Observation], None]:
        status = self.statuses[name]
        counter = self.metrics.observations.labels(name)
        debug = log.is_enabled_for(10) if hasattr(log, "is_enabled_for") else False

        def send(obs: Observation) -> None:
            if debug:
                log.debug("observation", source=obs.source, kind=obs.kind,
                          device=obs.device and obs.device.name, function=obs.kernel.function,
                          errno=obs.kernel.errno, count=obs.count, errors_total=obs.errors_total)
            status.observations += 1
            counter.inc()
            if obs.kind == "events.lost":
                self.metrics.lost.labels(obs.source, str(obs.details.get("reason", "unknown"))).inc(obs.count)
            try:
                self.queue.put_nowait(obs)
            except asyncio.QueueFull:
                self.dropped += 1
                self.metrics.lost.labels(name, "queue_full").inc()

        return send


class Supervisor:
    """Opens the registry's sources and runs each in its own task; their states are ``statuses``."""

    def __init__(self, metrics: Metrics, statuses: dict[str, SourceStatus], sources: dict[str, Source],
                 queue_size: int) -> None:
        self.metrics = metrics
        self.statuses = statuses
        self.sources = sources
        self.bus = Bus(queue_size, metrics, statuses)
        self.ready_waiters: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, registry: Mapping[str, Callable[[SourceConfig, Inventory], Any]],
              configs: Mapping[str, SourceConfig], inventory: Inventory) -> None:
        for name, factory in registry.items():
            scfg = configs.get(name)
            if scfg is not None and not scfg.enabled:
                continue
            self.statuses[name] = SourceStatus(reason="starting")
            try:
                self.sources[name] = factory(scfg or SourceConfig(), inventory)
            except (ImportError, SourceUnavailable) as e:
                self.statuses[name].reason = f"cannot load: {e}"
        self.ready_waiters = {name: asyncio.Event() for name in self.statuses}
        for name, status in self.statuses.items():
            if name not in self.sources:
                self._source_down(name, status.reason or "unavailable")
        self.tasks = [asyncio.create_task(self._supervise(n, s), name=f"source:{n}")
                      for n, s in self.sources.items()]

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every source is up or down with a reason; past ``timeout`` says which are not."""
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.ready_waiters.values())), timeout)
        except TimeoutError:
            log.warning("daemon.slow_start", waiting=[n for n, e in self.ready_waiters.items() if not e.is_set()])

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _supervise(self, name: str, source: Source) -> None:
        status = self.statuses[name]
        send = self.bus.sender(name)
        backoff = 1.0
        while True:
            def ready() -> None:
                status.up, status.reason, status.hint = True, None, None
                self.metrics.source_up.labels(name).set(1)
                log.info("source.up", source=name)
                send(Observation(source=name, kind="source.up", time=time.time(), details={"source": name}))
                self.ready_waiters[name].set()

            try:
                await source.run(send, ready)
                reason = "source ended"
            except SourceUnavailable as e:
                self._source_down(name, e.reason, e.hint)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of one source must not stop the rest
                reason = f"failed: {e!r}"
                log.exception("source.failed", source=name)
            self._source_down(name, reason)
            status.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _source_down(self, name: str, reason: str, hint: str | None = None) -> None:
        status = self.statuses[name]
        status.up, status.reason, status.hint = False, reason, hint
        self.metrics.source_up.labels(name).set(0)
        log.warning("source.down", source=name, reason=reason, hint=hint)
        self.bus.sender(name)(Observation(
            source=name, kind="source.down", time=time.time(),
            details={"source": name, "reason": reason, **({"hint": hint} if hint else {})},
        ))
        self.ready_waiters[name].set()

    def expected_sources(self, kind: str, placement: Placement | None) -> frozenset[str]:
        """Which running sources will report this kind of fact on this device."""
        up = {n for n, s in self.statuses.items() if s.up}
        if "bpf_errors" in up:
            up.add("bpf")  # the source's observations carry the interface's name
        want: set[str] = set()
        if kind == "fs.error" and (placement is None or placement.fs in (None, "ext4")):
            want.add("bpf")  # the tracepoint fires for every ext4 error, unthrottled
        if kind in ("fs.error", "fs.warning", "fs.shutdown"):
            want.add("kmsg")
        if kind == "fs.error" and placement is not None and placement.device.devnum is not None:
            fan = self.sources.get("fanotify")
            if fan is not None and placement.device.devnum in getattr(fan, "marked", {}):
                want.add("fanotify")
        if kind == "fs.readonly":
            want |= {"kmsg", "mountinfo"}
        if kind == "fs.writable":
            want.add("mountinfo")
        return frozenset(want & up)
