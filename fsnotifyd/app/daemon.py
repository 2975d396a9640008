"""Start-up, the main loop and teardown of the daemon.

Start-up order: state and rules first (invalid rules stop the daemon before it touches
anything), sinks (so the first event has somewhere to go), then the sources, each supervised on
its own (:mod:`.supervisor`). The daemon reports itself ready once every source is either up or
down with a reason. What the control socket asks is answered in :mod:`.control`; the image
exporters' watchdog is :mod:`.imagewatch`. Every piece of runtime state is a field of
:class:`Daemon`, set by the start-up step named beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ..actions.executor import Executor
from ..actions.handlers import handlers
from ..actions.journal import JobJournal
from ..actions.target import Targets
from ..config import Config, parse_window, resolve_group
from ..correlator import Correlator, CorrelatorSettings
from ..errors import RuleError, RuleErrors
from ..events import Event, Observation
from ..image.attach import attached
from ..inventory import Inventory
from ..metrics import Metrics
from ..rules.engine import FIRED, Engine, decision_event
from ..rules.loader import load_rules
from ..rules.schema import RuleSet
from ..sinks.journal import JournalSink
from ..sinks.prometheus import MetricsSink
from ..sinks.socket import SocketSink
from ..sinks.stdout import StdoutSink
from ..sources.registry import REGISTRY
from ..sources.sysfs import Ext4Counters
from ..statefile import FileHealth, JsonStateStore, StateFile, read_json
from ..trust import untrusted_reason
from ..typing import Sink, Source
from ..ve.registry import Registry
from ..version import __version__
from .control import Control
from .imagewatch import ImageWatchdog
from .sdnotify import Notifier
from .supervisor import SourceStatus, Supervisor

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = structlog.get_logger("fsnotifyd")


def default_rules_path() -> str:
    from importlib import resources

    return str(resources.files("fsnotifyd").joinpath("rules", "default.yaml"))


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
    # The daemon's own files (state, journals) the disk refuses now: kept in memory, retried.
    files: FileHealth = field(default_factory=FileHealth)

    # -- runtime state -----------------------------------------------------------------------
    # Set by the start-up steps of ``run`` in this order; a field without a default is read
    # only after its step. None where the step may leave it unset (no metrics port, actions
    # off) or where it is read before its step (a SIGHUP, the rules' labels).
    closing: bool = field(default=False, init=False)
    announced_ready: bool = field(default=False, init=False)  # READY=1 sent: reloads are told to systemd
    control: Control = field(init=False, repr=False)  # __post_init__
    supervisor: Supervisor = field(init=False, repr=False)  # __post_init__; its tasks: open_sources
    image_watchdog: ImageWatchdog = field(init=False, repr=False)  # __post_init__; runs: start_image_watchdog
    ledger: JsonStateStore = field(init=False, repr=False)  # open_state
    rule_paths: list[str] = field(init=False, repr=False)  # load_rules
    engine: Engine = field(init=False, repr=False)  # load_rules; replaced by a reload
    rules_state_path: str = field(init=False, repr=False)  # load_rules
    rules_state_file: StateFile = field(init=False, repr=False)  # load_rules
    rules_status: dict[str, Any] | None = field(default=None, init=False, repr=False)  # load_rules
    inventory: Inventory | None = field(default=None, init=False, repr=False)  # build_inventory
    socket: SocketSink = field(init=False, repr=False)  # open_sinks
    metrics_server: WSGIServer | None = field(default=None, init=False, repr=False)  # start_metrics
    executor: Executor | None = field(default=None, init=False, repr=False)  # start_actions
    action_journal: JobJournal | None = field(default=None, init=False, repr=False)  # start_actions
    counters: Ext4Counters = field(init=False, repr=False)  # build_correlator
    correlator: Correlator = field(init=False, repr=False)  # build_correlator
    loop_tick: float = field(default=0.0, init=False, repr=False)  # correlate: its loop's last turn

    def __post_init__(self) -> None:
        self.control = Control(self)
        self.supervisor = Supervisor(self.metrics, self.statuses, self.sources, self.config.queue_size)
        self.image_watchdog = ImageWatchdog(self.config.state_dir, self.metrics,
                                            ves=lambda: self.inventory.ves if self.inventory is not None else [])

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
        self.engine = self.new_engine(self.load_trusted_rules())
        self.rules_state_path = os.path.join(self.config.state_dir, "rules-state.json")
        self.rules_state_file = StateFile(self.rules_state_path, self.files)
        saved, error = read_json(self.rules_state_path)
        if error:
            log.warning("state.corrupt", detail=error)
        restored = self.engine.restore(saved) if isinstance(saved, dict) else 0
        self.rules_status = {"files": self.rule_paths, "rules": len(self.engine.compiled.rules),
                             "restored_state": restored, "last_reload_error": None}
        log.info("rules.loaded", files=self.rule_paths, rules=len(self.engine.compiled.rules), restored_state=restored)

    def load_trusted_rules(self) -> RuleSet:
        """Rules decide what root does to VEs: a rules file others can write is refused."""
        if os.geteuid() == 0:
            errors = [RuleError(f"refusing rules file: {reason}; only root may be able to write it "
                                "(fix: chown root:root and chmod go-w)", file=path)
                      for path in self.rule_paths if (reason := untrusted_reason(path)) is not None]
            if errors:
                raise RuleErrors(errors)
        return load_rules(self.rule_paths)

    def new_engine(self, ruleset: RuleSet) -> Engine:
        return Engine(ruleset, labels_of=self._labels_of)

    def _labels_of(self, ve_id: str) -> dict[str, str]:
        # The inventory's VEs, not only the config's: VEs created with `fsnotifyd ve` come and
        # go while the daemon runs.
        for ve in (self.inventory.ves if self.inventory is not None else self.config.ves):
            if ve.id == ve_id:
                return dict(ve.labels)
        return {}

    def save_rules_state(self) -> bool:
        if self.engine.dirty and self.rules_state_file.write(self.engine.state()):
            self.engine.dirty = False
        return not self.engine.dirty

    def flush_state(self) -> None:
        """Write what changed; also what the disk refused before (it may take it now). Never
        raises for a refused write: the values stay in memory until it lands."""
        self.ledger.flush()
        self.save_rules_state()
        if self.action_journal is not None:
            self.action_journal.flush()

    def build_inventory(self) -> None:
        registry = Registry(self.config.state_dir)
        run_dir = os.path.join(self.config.state_dir, "run")
        # Which image a loop device serves (the attachment records): the thinness figures of
        # fs.alloc read that image's BAT.
        self.inventory = inventory = Inventory(ves=list(self.config.ves), provider=registry.ves,
                                               images=lambda: [(a.disk, a.image) for a in attached(run_dir)])
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
        self.socket = SocketSink(cfg.socket, status=self.control.status,
                                 ops={"reload": self.control.reload_rules, "release": self.control.release_ve},
                                 gid=resolve_group(cfg.control.group), max_request=cfg.control.max_request_bytes,
                                 max_clients=cfg.control.max_clients,
                                 count=lambda op, result: self.metrics.control_requests.labels(op, result).inc())
        await self.socket.start()
        self.sinks.append(self.socket)
        self.sinks.append(MetricsSink(self.metrics))

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
        assert self.inventory is not None, "build_inventory comes first"
        self.counters = Ext4Counters()
        self.correlator = Correlator(
            inventory=self.inventory,
            publish=self.publish,
            counters=self.counters,
            ledger=self.ledger,
            expected=self.supervisor.expected_sources,
            settings=CorrelatorSettings(cfg.window_ms / 1000, cfg.state_window_ms / 1000, cfg.io_window_ms / 1000),
        )
        self.metrics.bind_correlator(lambda: dataclasses.asdict(self.correlator.stats))

    def open_sources(self) -> None:
        assert self.inventory is not None, "build_inventory comes first"
        self.supervisor.start(self.registry, self.config.sources, self.inventory)

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
        if event.kind == "rule.matched" and self.executor is not None:
            self.executor.submit(as_dict)
        if depth > 1:
            return  # rule.matched events may trigger rules once, never in a loop
        for decision in self.engine.process(as_dict):
            self.metrics.decisions.labels(decision.rule, decision.outcome).inc()
            if decision.outcome == FIRED:
                self.publish(decision_event(decision, as_dict, event.host), depth=depth + 1)

    # -- main loop ---------------------------------------------------------------------------
    async def correlate(self) -> None:
        bus, corr = self.supervisor.bus, self.correlator
        q = bus.queue
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

        # Ends on the closing flag, not on cancellation: Python 3.11's wait_for can swallow a
        # cancel that lands as the queue hands over an item, which under a storm it always is.
        while not self.closing:
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
            if bus.dropped > reported_drops:
                corr.observe(Observation(source="daemon", kind="events.lost", time=time.time(),
                                         count=bus.dropped - reported_drops,
                                         details={"reason": "queue_full"}))
                reported_drops = bus.dropped
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
        await self.supervisor.wait_ready()
        log.info("daemon.ready", version=__version__, sources={n: s.up for n, s in self.statuses.items()})
        self.notifier.ready(self.control.status_line())
        self.announced_ready = True
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

    async def _notify_loop(self) -> None:
        """WATCHDOG=1 only while the correlator loop turns: a wedged daemon stops pinging and
        systemd restarts it. STATUS= whenever the status line changes."""
        period = min(self.notifier.watchdog_s / 2, 5.0) if self.notifier.watchdog_s else 5.0
        stale_after = max(period * 2, 3.0)  # the correlator wakes at least once a second
        last_status = ""
        while True:
            await asyncio.sleep(period)
            if self.notifier.watchdog_s:
                if time.monotonic() - self.loop_tick < stale_after:
                    self.notifier.watchdog()
                else:
                    log.error("daemon.watchdog_withheld",
                              since_s=round(time.monotonic() - self.loop_tick, 1))
            line = self.control.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line

    def start_actions(self) -> None:
        """The executor carries out fired decisions; unfinished jobs of the last run resume."""
        a = self.config.actions
        if not a.enabled:
            log.info("actions.disabled")
            return
        targets = Targets(self.config.state_dir, self.config.ves)
        table = handlers(targets)
        timeouts = {name: a.timeout_s for name in table} | {"fsck": a.fsck_timeout_s}
        self.action_journal = journal = JobJournal(os.path.join(self.config.state_dir, "actions", "journal.jsonl"),
                                                   health=self.files)
        # Action events go through the rules once (an fsck.result may escalate to a repair).
        self.executor = Executor(journal, table, lambda e: self.publish(e, depth=1),
                                 heavy_limit=a.concurrency, timeouts=timeouts, metrics=self.metrics,
                                 dry_run=a.dry_run,
                                 repair_window=parse_window(a.repair_window) if a.repair_window else None)
        resumed = self.executor.resume()
        log.info("actions.ready", resumed=len(resumed), concurrency=a.concurrency, dry_run=a.dry_run,
                 journal_problems=journal.problems[:5])

    def start_image_watchdog(self) -> None:
        self.image_watchdog.start()

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
        self.image_watchdog.stop()
        await self.supervisor.stop()
        # Observations already queued are facts the kernel reported: publish them before exit.
        self.closing = True
        queue = self.supervisor.bus.queue
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)  # wake the correlator up
        with contextlib.suppress(Exception):
            await correlating
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                self.correlator.observe(item)
        self.correlator.flush()
        if self.executor is not None and self.action_journal is not None:
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
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
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
