"""Start-up, the main loop and teardown of the daemon.

Start-up order: state and rules first (invalid rules stop the daemon before it touches
anything), sinks (so the first event has somewhere to go), then the sources, each supervised on its own: a source that cannot run on this host is reported down
with its reason and the daemon goes on with the rest; one that fails is retried with backoff.
The daemon reports itself ready once every source is either up or down with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from ..config import Config, SourceConfig, parse_window, resolve_group
from ..correlator import Correlator, CorrelatorSettings
from ..errors import RuleError, RuleErrors, SourceUnavailable
from ..events import Event, Observation
from ..inventory import Inventory, Placement
from ..metrics import Metrics
from ..version import __version__
from ..sinks.journal import JournalSink
from ..sinks.prometheus import MetricsSink
from ..sinks.socket import SocketSink
from ..sinks.stdout import StdoutSink
from ..sources.registry import REGISTRY
from ..sources.sysfs import Ext4Counters
from ..actions.executor import Executor
from ..actions.handlers import handlers
from ..actions.journal import JobJournal
from ..actions.target import Targets
from ..rules.engine import FIRED, Engine, decision_event
from ..rules.loader import load_rules
from ..statefile import FileHealth, JsonStateStore, StateFile, read_json
from ..trust import untrusted_reason
from ..typing import Sink, Source
from ..image.attach import attached, control, run_watchdog
from ..ve.registry import Registry
from .sdnotify import Notifier

WATCHDOG_INTERVAL = 2.0  # seconds between checks of every attached image's exporter
WATCHDOG_TIMEOUT = 5.0  # an exporter that does not answer its status in this long is hung

log = structlog.get_logger("fsnotifyd")


def default_rules_path() -> str:
    from importlib import resources

    return str(resources.files("fsnotifyd").joinpath("rules", "default.yaml"))


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


@dataclass
class Daemon:
    config: Config
    events_out: str | None = None
    on_ready: Callable[[], None] | None = None
    notifier: Notifier = field(default_factory=lambda: Notifier({}))  # the CLI passes the real environment
    metrics: Metrics = field(default_factory=Metrics)
    sinks: list[Sink] = field(default_factory=list)
    sources: dict[str, Source] = field(default_factory=dict)
    statuses: dict[str, SourceStatus] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    registry: dict[str, Any] = field(default_factory=lambda: dict(REGISTRY))
    _closing: bool = False
    _announced_ready: bool = False  # READY=1 sent: from then on a reload is told to systemd
    # The daemon's own files (state, journals) the disk refuses now: kept in memory, retried.
    files: FileHealth = field(default_factory=FileHealth)

    # -- steps -------------------------------------------------------------------------------
    def open_state(self) -> None:
        os.makedirs(self.config.state_dir, exist_ok=True)
        self.ledger = JsonStateStore(os.path.join(self.config.state_dir, "error-ledger.json"), self.files)
        if self.ledger.load_error:
            log.warning("state.corrupt", detail=self.ledger.load_error)
        self.metrics.bind_isolated(self._isolated_ves)
        self.metrics.bind_files(self.files.files)

    def _isolated_ves(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.config.state_dir, "actions", "isolated"))
        except OSError:
            return []
        return [n[:-5] for n in names if n.endswith(".json")]

    def load_rules(self) -> None:
        """Refuses to start on rules with errors (RuleErrors propagate to the CLI)."""
        self.rule_paths = list(self.config.rules) if self.config.rules is not None else [default_rules_path()]
        self.engine = self._new_engine(self._load_trusted_rules())
        self.rules_state_path = os.path.join(self.config.state_dir, "rules-state.json")
        self.rules_state_file = StateFile(self.rules_state_path, self.files)
        saved, error = read_json(self.rules_state_path)
        if error:
            log.warning("state.corrupt", detail=error)
        restored = self.engine.restore(saved) if isinstance(saved, dict) else 0
        self.rules_status: dict[str, Any] = {"files": self.rule_paths, "rules": len(self.engine.compiled.rules),
                                             "restored_state": restored, "last_reload_error": None}
        log.info("rules.loaded", files=self.rule_paths, rules=len(self.engine.compiled.rules), restored_state=restored)

    def _load_trusted_rules(self):
        """Rules decide what root does to VEs: a rules file others can write is refused."""
        if os.geteuid() == 0:
            errors = [RuleError(f"refusing rules file: {reason}; only root may be able to write it "
                                "(fix: chown root:root and chmod go-w)", file=path)
                      for path in self.rule_paths if (reason := untrusted_reason(path)) is not None]
            if errors:
                raise RuleErrors(errors)
        return load_rules(self.rule_paths)

    def _new_engine(self, ruleset) -> Engine:
        return Engine(ruleset, labels_of=self._labels_of)

    def _labels_of(self, ve_id: str) -> dict[str, str]:
        # The inventory's VEs, not only the config's: VEs created with `fsnotifyd ve` come and
        # go while the daemon runs.
        inventory = getattr(self, "inventory", None)
        for ve in (inventory.ves if inventory is not None else self.config.ves):
            if ve.id == ve_id:
                return dict(ve.labels)
        return {}

    def reload_rules(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """SIGHUP or ``fsnotifyd rules reload``: new rules, or the old ones kept and why.

        Told to systemd as RELOADING=1 ... READY=1 (READY also after a refused reload: the
        daemon runs on with the old rules), so ``systemctl reload`` covers the whole reload."""
        if getattr(self, "rules_status", None) is None:
            # SIGHUP before the first rules were loaded: those are read from the files anyway.
            return {"ok": False, "error": "the daemon is still starting; its rules are being loaded"}
        announce = self._announced_ready
        if announce:
            self.notifier.reloading()
        try:
            return self._reload_rules()
        finally:
            if announce:
                self.notifier.ready(self.status_line())

    def _reload_rules(self) -> dict[str, Any]:
        kept = len(self.engine.compiled.rules)
        try:
            engine = self._new_engine(self._load_trusted_rules())
        except RuleErrors as e:
            errors = [str(x) for x in e.errors]
        except Exception as e:  # noqa: BLE001 - a reload must not cost the daemon its rules
            log.exception("rules.reload_crashed")
            errors = [f"internal error while loading the rules: {e!r}"]
        else:
            engine.restore(self.engine.state())  # windows and cooldowns of rules that remain
            self.engine = engine
            self.rules_status.update(rules=len(engine.compiled.rules), last_reload_error=None)
            self.metrics.rules_reloads.labels("ok").inc()
            log.info("rules.reloaded", rules=len(engine.compiled.rules))
            return {"ok": True, "rules": len(engine.compiled.rules)}
        self.rules_status["last_reload_error"] = errors
        self.metrics.rules_reloads.labels("failed").inc()
        log.error("rules.reload_failed", errors=errors, kept=kept)
        # "errors" marks a refusal: the CLI exits 1 on it, 2 on any other failed request.
        return {"ok": False, "error": "rules not reloaded; the old rules stay in force", "errors": errors,
                "rules": kept}

    def save_rules_state(self) -> bool:
        if self.engine.dirty and self.rules_state_file.write(self.engine.state()):
            self.engine.dirty = False
        return not self.engine.dirty

    def flush_state(self) -> None:
        """Write what changed; also what the disk refused before (it may take it now). Never
        raises for a refused write: the values stay in memory until it lands."""
        self.ledger.flush()
        self.save_rules_state()
        if getattr(self, "executor", None) is not None:
            self.action_journal.flush()

    def build_inventory(self) -> None:
        registry = Registry(self.config.state_dir)
        run_dir = os.path.join(self.config.state_dir, "run")
        # Which image a loop device serves (the attachment records): the thinness figures of
        # fs.alloc read that image's BAT.
        self.inventory = Inventory(ves=list(self.config.ves), provider=registry.ves,
                                   images=lambda: [(a.disk, a.image) for a in attached(run_dir)])
        inventory = self.inventory
        self.metrics.bind_mounted(lambda: [(p.device.name or "", p.ve or "") for p in inventory.mounts()])

    async def open_sinks(self) -> None:
        cfg = self.config
        refused = self.metrics.journal_write_failures
        if cfg.journal_path:
            self.sinks.append(JournalSink(cfg.journal_path, cfg.journal_max_bytes, cfg.journal_keep, health=self.files,
                                          count_refused=refused.labels("journal").inc))
        if self.events_out:
            self.sinks.append(JournalSink(self.events_out, max_bytes=1 << 62, keep=1, name="events-out",
                                          health=self.files, count_refused=refused.labels("events-out").inc))
        if cfg.stdout:
            self.sinks.append(StdoutSink())
        if cfg.syslog.enabled:
            from ..sinks.syslog import SyslogSink

            self.sinks.append(SyslogSink(cfg.syslog, self.metrics))
        if cfg.webhooks:
            from ..sinks.webhook import WebhookSink
        for hook in cfg.webhooks:
            sink = WebhookSink(hook, os.path.join(cfg.state_dir, "spool", f"webhook-{hook.name}"),
                               self.metrics, host=os.uname().nodename, health=self.files)
            sink.start()
            self.sinks.append(sink)
        self.socket = SocketSink(cfg.socket, status=self.status,
                                 ops={"reload": self.reload_rules, "release": self.release_ve},
                                 gid=resolve_group(cfg.control.group), max_request=cfg.control.max_request_bytes,
                                 max_clients=cfg.control.max_clients,
                                 count=lambda op, result: self.metrics.control_requests.labels(op, result).inc())
        await self.socket.start()
        self.sinks.append(self.socket)
        self.sinks.append(MetricsSink(self.metrics))

    async def release_ve(self, request: dict[str, Any]) -> dict[str, Any]:
        """``fsnotifyd ve release``: undo an isolation, in a thread (it may stop/start a VE)."""
        from ..actions import isolate
        from ..actions.executor import ActionError

        try:
            rec = await asyncio.to_thread(isolate.release, Targets(self.config.state_dir, self.inventory.ves),
                                          request["ve"])
        except ActionError as e:
            return {"ok": False, "error": str(e)}
        log.info("ve.released", ve=request["ve"], mode=rec.get("mode"))
        # In the journal too: it ends the incident the isolation was part of (`events log`).
        self.publish(isolate.released_event(request["ve"], rec, os.uname().nodename), depth=1)
        return {"ok": True, "ve": request["ve"], "mode": rec.get("mode"), "how": rec.get("how")}

    def start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        from ..metrics_endpoint import start

        try:
            self.metrics_server, _ = start(self.config.metrics_address, self.config.metrics_port,
                                           self.metrics.registry, self.config.metrics_tls)
        except OSError as e:
            log.error("metrics.unavailable", address=self.config.metrics_address,
                      port=self.config.metrics_port, error=str(e))

    def build_correlator(self) -> None:
        cfg = self.config
        self.counters = Ext4Counters()
        self.correlator = Correlator(
            inventory=self.inventory,
            publish=self.publish,
            counters=self.counters,
            ledger=self.ledger,
            expected=self.expected_sources,
            settings=CorrelatorSettings(cfg.window_ms / 1000, cfg.state_window_ms / 1000, cfg.io_window_ms / 1000),
        )
        self.metrics.bind_correlator(lambda: dataclasses.asdict(self.correlator.stats))

    def open_sources(self) -> None:
        for name, factory in self.registry.items():
            scfg = self.config.sources.get(name)
            if scfg is not None and not scfg.enabled:
                continue
            self.statuses[name] = SourceStatus(reason="starting")
            try:
                self.sources[name] = factory(scfg or SourceConfig(), self.inventory)
            except (ImportError, SourceUnavailable) as e:
                self.statuses[name].reason = f"cannot load: {e}"
        self.bus = Bus(self.config.queue_size, self.metrics, self.statuses)
        self._ready_waiters = {name: asyncio.Event() for name in self.statuses}
        for name, status in self.statuses.items():
            if name not in self.sources:
                self._source_down(name, status.reason or "unavailable")
        self.tasks = [asyncio.create_task(self._supervise(n, s), name=f"source:{n}")
                      for n, s in self.sources.items()]

    # -- sources -----------------------------------------------------------------------------
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
                self._ready_waiters[name].set()

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
        self._ready_waiters[name].set()

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

    # -- publishing --------------------------------------------------------------------------
    def publish(self, event: Event, *, depth: int = 0) -> None:
        self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        for sink in self.sinks:
            try:
                sink.publish(event)
            except Exception:  # noqa: BLE001 - a broken sink must not cost the others the event
                self.metrics.sink_failures.labels(sink.name).inc()
                log.exception("sink.failed", sink=sink.name, event_id=event.id)
        as_dict = event.to_dict()
        if event.kind == "rule.matched" and getattr(self, "executor", None) is not None:
            self.executor.submit(as_dict)
        if depth > 1:
            return  # rule.matched events may trigger rules once, never in a loop
        for decision in self.engine.process(as_dict):
            self.metrics.decisions.labels(decision.rule, decision.outcome).inc()
            if decision.outcome == FIRED:
                self.publish(decision_event(decision, as_dict, event.host), depth=depth + 1)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "sources": {n: {"up": s.up, "reason": s.reason, "hint": s.hint,
                            "observations": s.observations, "restarts": s.restarts,
                            **self._source_detail(n)}
                        for n, s in self.statuses.items()},
            "ves": [{"id": v.id, "mounts": list(v.mounts), "devices": list(v.devices),
                     "images": list(v.images), "cgroup": v.cgroup} for v in self.inventory.ves],
            "mounts": [{"device": p.device.name, "devnum": "%d:%d" % p.device.devnum if p.device.devnum else None,
                        "mount": p.mount, "fs": p.fs, "ve": p.ve, "readonly": p.readonly,
                        "backing_file": p.backing_file} for p in self.inventory.mounts()],
            "events": dict(self.counts),
            "correlator": dataclasses.asdict(self.correlator.stats),
            "rules": {**self.rules_status, **dataclasses.asdict(self.engine.stats)},
            "images": {"exporters_aborted": getattr(self, "exporters_aborted", 0), "attached": self._images()},
            "lost": {"queue_full": self.bus.dropped},
            "sinks": {s.name: s.status() for s in self.sinks
                      if s is not self.socket and callable(getattr(s, "status", None))},
            "control": {"group": self.config.control.group, "refused": self.socket.refused,
                        "busy": self.socket.busy, "dropped_subscribers": self.socket.dropped_subscribers},
            "actions": self._actions(),
            "files": {f.path: f.as_dict() for f in self.files.files()},
        }

    def _actions(self) -> dict[str, Any]:
        if getattr(self, "executor", None) is None:
            return {"enabled": False}
        jobs = self.action_journal.recent(20)
        return {"enabled": True, "unfinished": len(self.action_journal.unfinished()),
                "recent": [{"id": j.id, "action": j.action, "ve": j.ve, "state": j.state, "error": j.error,
                            "steps": j.steps, "dry_run": j.dry_run} for j in jobs]}

    def _source_detail(self, name: str) -> dict[str, Any]:
        status = getattr(self.sources.get(name), "status", None)
        return {"detail": status()} if callable(status) else {}

    # -- main loop ---------------------------------------------------------------------------
    async def correlate(self) -> None:
        q, corr = self.bus.queue, self.correlator
        reported_drops = 0
        last_flush = time.monotonic()
        # kmsg readers are woken up to a tick after the record is stored; when a group waits
        # for a kmsg line, reading now usually finds it already there.
        read_kmsg = getattr(self.sources.get("kmsg"), "read_now", None)

        def drain() -> None:
            while not q.empty():
                item = q.get_nowait()
                if item is not None:
                    corr.observe(item)

        # Ends on the _closing flag, not on cancellation: Python 3.11's wait_for can swallow a
        # cancel that lands as the queue hands over an item, which under a storm it always is.
        while not self._closing:
            self.loop_tick = time.monotonic()
            deadline = corr.next_deadline()
            timeout = 1.0 if deadline is None else max(0.0, deadline - corr.clock())
            try:
                obs = await asyncio.wait_for(q.get(), min(timeout, 1.0))
                if obs is not None:
                    corr.observe(obs)
                drain()
                if read_kmsg is not None and "kmsg" in corr.waiting_for():
                    read_kmsg()
                    drain()
            except TimeoutError:
                pass
            corr.expire()
            if self.bus.dropped > reported_drops:
                corr.observe(Observation(source="daemon", kind="events.lost", time=time.time(),
                                         count=self.bus.dropped - reported_drops,
                                         details={"reason": "queue_full"}))
                reported_drops = self.bus.dropped
            if time.monotonic() - last_flush >= 1.0:
                self.flush_state()
                last_flush = time.monotonic()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self.open_state()
        self.load_rules()
        self.build_inventory()
        await self.open_sinks()
        self.start_metrics()
        self.start_actions()
        self.build_correlator()
        self.open_sources()
        self.start_image_watchdog()
        correlating = asyncio.create_task(self.correlate(), name="correlator")
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready_waiters.values())), 10)
        except TimeoutError:
            log.warning("daemon.slow_start", waiting=[n for n, e in self._ready_waiters.items() if not e.is_set()])
        log.info("daemon.ready", version=__version__, sources={n: s.up for n, s in self.statuses.items()})
        self.notifier.ready(self.status_line())
        self._announced_ready = True
        notifying = asyncio.create_task(self._notify_loop(), name="sd_notify") if self.notifier.enabled else None
        if self.on_ready:
            self.on_ready()
        try:
            if stop is None:
                await correlating
            else:
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({correlating, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if correlating.done():
                    correlating.result()  # a dead correlator is a bug: let it raise
        finally:
            if notifying is not None:
                notifying.cancel()
            self.notifier.stopping()
            await self.teardown(correlating)
            self.notifier.close()

    def status_line(self) -> str:
        """One line for ``systemctl status``: what is up, what flowed, what was lost."""
        up = [n for n, s in self.statuses.items() if s.up]
        down = [n for n, s in self.statuses.items() if not s.up]
        lost = sum(int(m.value) for m in self._lost_samples())
        text = f"{len(up)}/{len(self.statuses)} sources up; {sum(self.counts.values())} events; {lost} lost"
        text += f"; down: {', '.join(down)}" if down else ""
        if failing := self.files.failing():
            text += f"; cannot write {len(failing)} own file(s): {', '.join(sorted({f.errno or '' for f in failing}))}"
        if (getattr(self, "rules_status", None) or {}).get("last_reload_error"):
            text += "; rules reload failed, old rules kept"
        return text

    def _lost_samples(self):
        for family in self.metrics.lost.collect():
            yield from (x for x in family.samples if x.name.endswith("_total"))

    async def _notify_loop(self) -> None:
        """WATCHDOG=1 only while the correlator loop turns: a wedged daemon stops pinging and
        systemd restarts it. STATUS= whenever the status line changes."""
        period = min(self.notifier.watchdog_s / 2, 5.0) if self.notifier.watchdog_s else 5.0
        stale_after = max(period * 2, 3.0)  # the correlator wakes at least once a second
        last_status = ""
        while True:
            await asyncio.sleep(period)
            if self.notifier.watchdog_s:
                if time.monotonic() - getattr(self, "loop_tick", 0.0) < stale_after:
                    self.notifier.watchdog()
                else:
                    log.error("daemon.watchdog_withheld",
                              since_s=round(time.monotonic() - getattr(self, "loop_tick", 0.0), 1))
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line

    def start_actions(self) -> None:
        """The executor carries out fired decisions; unfinished jobs of the last run resume."""
        a = self.config.actions
        self.executor: Executor | None = None
        if not a.enabled:
            log.info("actions.disabled")
            return
        targets = Targets(self.config.state_dir, self.config.ves)
        table = handlers(targets)
        timeouts = {name: a.timeout_s for name in table} | {"fsck": a.fsck_timeout_s}
        self.action_journal = JobJournal(os.path.join(self.config.state_dir, "actions", "journal.jsonl"),
                                         health=self.files)
        # Action events go through the rules once (an fsck.result may escalate to a repair).
        self.executor = Executor(self.action_journal, table, lambda e: self.publish(e, depth=1),
                                 heavy_limit=a.concurrency, timeouts=timeouts, metrics=self.metrics,
                                 dry_run=a.dry_run,
                                 repair_window=parse_window(a.repair_window) if a.repair_window else None)
        resumed = self.executor.resume()
        log.info("actions.ready", resumed=len(resumed), concurrency=a.concurrency, dry_run=a.dry_run,
                 journal_problems=self.action_journal.problems[:5])

    def start_image_watchdog(self) -> None:
        """A hung image exporter must not hang its VE's writers forever: the watchdog aborts its
        FUSE connection; the VE's writers then get I/O errors, which the sources report."""
        self.exporters_aborted = 0
        self._exporters_seen: list[tuple[Any, dict[str, Any] | None]] = []
        self.metrics.bind_images(self._exporter_figures)
        self._watchdog_stop = threading.Event()
        run_dir = os.path.join(self.config.state_dir, "run")
        self._watchdog = threading.Thread(
            target=run_watchdog, args=(run_dir, WATCHDOG_INTERVAL, self._watchdog_stop),
            kwargs={"timeout": WATCHDOG_TIMEOUT, "on_abort": self._exporter_aborted,
                    "on_pass": self._exporters_checked},
            name="image-watchdog", daemon=True)
        self._watchdog.start()

    def _exporters_checked(self, seen: list[tuple[Any, dict[str, Any] | None]]) -> None:
        self._exporters_seen = seen  # replaced whole: a scrape reads one round or the next

    def _exporter_figures(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """(image, VE id or "", status) per exporter the watchdog checked last, for metrics."""
        inventory = getattr(self, "inventory", None)
        out = []
        for att, st in self._exporters_seen:
            ve = next((v.id for v in (inventory.ves if inventory else []) if att.disk in v.images), "")
            out.append((att.image, ve, st))
        return out

    def _images(self) -> list[dict[str, Any]]:
        """Every attached image with what its exporter reports (I/O counts, errors, health)."""
        out = []
        for att in attached(os.path.join(self.config.state_dir, "run")):
            try:
                st = control(att, {"op": "status"}, timeout=1.0)
            except Exception as e:  # a hung or dead exporter is exactly what status must show
                st = {"ok": False, "healthy": False, "error": str(e)}
            out.append({"image": att.image, "loop": att.loop, "mountpoint": att.mountpoint, "pid": att.pid,
                        "healthy": bool(st.get("healthy")), "readonly": st.get("readonly", att.readonly),
                        "errors": st.get("errors"), "stats": st.get("stats"), "error": st.get("error"),
                        "data_path": ("python" if st.get("fast_path") is None else "c") if st.get("ok") else None})
        return out

    def _exporter_aborted(self, att: Any) -> None:
        self.exporters_aborted += 1
        log.error("image.exporter_aborted", image=att.image, loop=att.loop, pid=att.pid,
                  reason=f"no answer within {WATCHDOG_TIMEOUT}s")

    def _stop_action_children(self, grace: float = 5.0) -> None:
        """Stop what running jobs started (e2fsck, resize2fs, exec programs). Under systemd's
        KillMode=process nothing else would, and a job resumed at the next start would then run
        a second e2fsck beside the first. Image exporters are children too, and must live on:
        they serve running VEs' disks."""
        import signal

        keep = {att.pid for att in attached(os.path.join(self.config.state_dir, "run"))}
        children = [pid for pid in _children(os.getpid()) if pid not in keep]
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while children and time.monotonic() < deadline:
            children = [pid for pid in children if _alive(pid)]
            time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if children:
            log.warning("actions.children_killed", pids=children)

    async def teardown(self, correlating: asyncio.Task) -> None:
        if getattr(self, "_watchdog_stop", None) is not None:
            self._watchdog_stop.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # Observations already queued are facts the kernel reported: publish them before exit.
        self._closing = True
        with contextlib.suppress(asyncio.QueueFull):
            self.bus.queue.put_nowait(None)  # wake the correlator up
        with contextlib.suppress(Exception):
            await correlating
        while not self.bus.queue.empty():
            item = self.bus.queue.get_nowait()
            if item is not None:
                self.correlator.observe(item)
        self.correlator.flush()
        if getattr(self, "executor", None) is not None:
            await self.executor.close()  # running jobs stay "running" in the journal: resumed at the next start
            # Closed first, so a handler thread that sees its program die below records nothing:
            # the job is left as it was, and resumed from its last finished step.
            self.action_journal.close()
            self._stop_action_children()
        # A disk that still refuses them is said, not raised: the daemon is stopping cleanly.
        if not self.ledger.flush():
            log.error("state.not_saved", path=self.ledger.path,
                      hint="the next start counts errors again from the value on disk: some are reported "
                           "twice, none is missed")
        if not self.save_rules_state():
            log.error("state.not_saved", path=self.rules_state_path,
                      hint="the next start has the rules' windows and cooldowns of the last write")
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()
        server = getattr(self, "metrics_server", None)
        if server is not None:
            server.shutdown()
        log.info("daemon.stopped")


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc; zombies are already gone)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "(comm)", which may hold spaces
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"
