"""What the control socket can ask the running daemon: status, a rules reload, a VE's release.

The socket sink (``sinks/socket.py``) checks who asks and what; these answer. The client side
(the CLI's requests) is :mod:`.controlclient`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog

from ..actions.target import Targets
from ..errors import RuleErrors

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

    from .daemon import Daemon

log = structlog.get_logger("fsnotifyd")


class Control:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        d = self.d
        bus, inventory = d.supervisor.bus, d.inventory
        assert inventory is not None, "the socket opens after the inventory is built"
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - d.started, 1),
            "sources": {n: {"up": s.up, "reason": s.reason, "hint": s.hint,
                            "observations": s.observations, "restarts": s.restarts,
                            **self._source_detail(n)}
                        for n, s in d.statuses.items()},
            "ves": [{"id": v.id, "mounts": list(v.mounts), "devices": list(v.devices),
                     "images": list(v.images), "cgroup": v.cgroup} for v in inventory.ves],
            "mounts": [{"device": p.device.name,
                        "devnum": "{}:{}".format(*p.device.devnum) if p.device.devnum else None,
                        "mount": p.mount, "fs": p.fs, "ve": p.ve, "readonly": p.readonly,
                        "backing_file": p.backing_file} for p in inventory.mounts()],
            "events": dict(d.counts),
            "correlator": dataclasses.asdict(d.correlator.stats),
            "rules": {**(d.rules_status or {}), **dataclasses.asdict(d.engine.stats)},
            "images": {"exporters_aborted": d.image_watchdog.aborted, "attached": d.image_watchdog.images()},
            "lost": {"queue_full": bus.dropped},
            # Only some sinks have a status (spools, delivery counts): optional by design.
            "sinks": {s.name: status() for s in d.sinks
                      if s is not d.socket and callable(status := getattr(s, "status", None))},
            "control": {"group": d.config.control.group, "refused": d.socket.refused,
                        "busy": d.socket.busy, "dropped_subscribers": d.socket.dropped_subscribers},
            "actions": self._actions(),
            "files": {f.path: f.as_dict() for f in d.files.files()},
        }

    def _actions(self) -> dict[str, Any]:
        d = self.d
        if d.executor is None or d.action_journal is None:
            return {"enabled": False}
        jobs = d.action_journal.recent(20)
        return {"enabled": True, "unfinished": len(d.action_journal.unfinished()),
                "recent": [{"id": j.id, "action": j.action, "ve": j.ve, "state": j.state, "error": j.error,
                            "steps": j.steps, "dry_run": j.dry_run} for j in jobs]}

    def _source_detail(self, name: str) -> dict[str, Any]:
        # Only some sources have details (fanotify's marks, bpf's maps): optional by design.
        status = getattr(self.d.sources.get(name), "status", None)
        return {"detail": status()} if callable(status) else {}

    def status_line(self) -> str:
        """One line for ``systemctl status``: what is up, what flowed, what was lost."""
        d = self.d
        up = [n for n, s in d.statuses.items() if s.up]
        down = [n for n, s in d.statuses.items() if not s.up]
        lost = sum(int(m.value) for m in self._lost_samples())
        text = f"{len(up)}/{len(d.statuses)} sources up; {sum(d.counts.values())} events; {lost} lost"
        text += f"; down: {', '.join(down)}" if down else ""
        if failing := d.files.failing():
            text += f"; cannot write {len(failing)} own file(s): {', '.join(sorted({f.errno or '' for f in failing}))}"
        if (d.rules_status or {}).get("last_reload_error"):
            text += "; rules reload failed, old rules kept"
        return text

    def _lost_samples(self) -> Iterator[Sample]:
        for family in self.d.metrics.lost.collect():
            yield from (x for x in family.samples if x.name.endswith("_total"))

    # -- rules reload ------------------------------------------------------------------------
    def reload_rules(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """SIGHUP or ``fsnotifyd rules reload``: new rules, or the old ones kept and why.

        Told to systemd as RELOADING=1 ... READY=1 (READY also after a refused reload: the
        daemon runs on with the old rules), so ``systemctl reload`` covers the whole reload."""
        d = self.d
        if d.rules_status is None:
            # SIGHUP before the first rules were loaded: those are read from the files anyway.
            return {"ok": False, "error": "the daemon is still starting; its rules are being loaded"}
        announce = d.announced_ready
        if announce:
            d.notifier.reloading()
        try:
            return self._reload_rules(d.rules_status)
        finally:
            if announce:
                d.notifier.ready(self.status_line())

    def _reload_rules(self, rules_status: dict[str, Any]) -> dict[str, Any]:
        d = self.d
        kept = len(d.engine.compiled.rules)
        try:
            engine = d.new_engine(d.load_trusted_rules())
        except RuleErrors as e:
            errors = [str(x) for x in e.errors]
        except Exception as e:  # noqa: BLE001 - a reload must not cost the daemon its rules
            log.exception("rules.reload_crashed")
            errors = [f"internal error while loading the rules: {e!r}"]
        else:
            engine.restore(d.engine.state())  # windows and cooldowns of rules that remain
            d.engine = engine
            rules_status.update(rules=len(engine.compiled.rules), last_reload_error=None)
            d.metrics.rules_reloads.labels("ok").inc()
            log.info("rules.reloaded", rules=len(engine.compiled.rules))
            return {"ok": True, "rules": len(engine.compiled.rules)}
        rules_status["last_reload_error"] = errors
        d.metrics.rules_reloads.labels("failed").inc()
        log.error("rules.reload_failed", errors=errors, kept=kept)
        # "errors" marks a refusal: the CLI exits 1 on it, 2 on any other failed request.
        return {"ok": False, "error": "rules not reloaded; the old rules stay in force", "errors": errors,
                "rules": kept}

    # -- VE release --------------------------------------------------------------------------
    async def release_ve(self, request: dict[str, Any]) -> dict[str, Any]:
        """``fsnotifyd ve release``: undo an isolation, in a thread (it may stop/start a VE)."""
        from ..actions import isolate
        from ..actions.executor import ActionError

        d = self.d
        ves = d.inventory.ves if d.inventory is not None else []
        try:
            rec = await asyncio.to_thread(isolate.release, Targets(d.config.state_dir, ves), request["ve"])
        except ActionError as e:
            return {"ok": False, "error": str(e)}
        log.info("ve.released", ve=request["ve"], mode=rec.get("mode"))
        # In the journal too: it ends the incident the isolation was part of (`events log`).
        d.publish(isolate.released_event(request["ve"], rec, os.uname().nodename), depth=1)
        return {"ok": True, "ve": request["ve"], "mode": rec.get("mode"), "how": rec.get("how")}
