"""Counts published events into the daemon's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..events import SEVERITIES, Event
from ..metrics import Metrics


@dataclass
class MetricsSink:
    metrics: Metrics
    name: str = "metrics"

    def publish(self, event: Event) -> None:
        ve = event.ve or ""
        # A severity outside the known five (a typo in a rule's notification) must not make a
        # new series per spelling.
        severity = event.severity if event.severity in SEVERITIES else "unknown"
        self.metrics.events.labels(event.kind, severity, ve).inc()
        for source in event.sources:
            self.metrics.source_events.labels(source, event.kind).inc()
        if event.kind == "fs.error" and event.count:
            dev = event.device.name if event.device and event.device.name else ""
            self.metrics.kernel_errors.labels(dev, ve).inc(event.count)
        if event.kind in ("fs.enospc", "fs.edquot"):
            self.metrics.space_failures.labels(event.kind[3:].upper(), ve).inc(event.count)
        elif event.kind == "fs.alloc":
            self._alloc(event, ve)
        elif event.kind == "quota.warning":
            w = event.details.get("warning")
            name = w.get("name") if isinstance(w, dict) else None
            self.metrics.quota_warnings.labels(str(name or "unknown"), ve).inc()
        elif event.kind == "fsck.result":
            self.metrics.fsck_results.labels(ve, str(event.details.get("result") or "unknown")).inc()
        if event.kind not in ("source.up", "source.down", "fs.alloc", "fs.enospc", "fs.edquot"):
            self.metrics.latency.observe(max(time.time() - event.time, 0.0))

    def _alloc(self, event: Event, ve: str) -> None:
        d = event.details
        dev = event.device.name if event.device and event.device.name else ""
        for op in ("allocated", "freed", "discarded"):
            n = d.get(f"blocks_{op}")
            if isinstance(n, int) and n > 0:
                self.metrics.alloc_blocks.labels(dev, ve, op).inc(n)
        if isinstance(d.get("regions_new"), int) and d["regions_new"] > 0:
            self.metrics.alloc_regions.labels(dev, ve).inc(d["regions_new"])
        if isinstance(d.get("regions_live"), int):
            self.metrics.fs_gauges.set(dev, ve, "regions_live", d["regions_live"])
        if isinstance(d.get("swelling"), (int, float)):
            self.metrics.fs_gauges.set(dev, ve, "swelling", d["swelling"])

    def close(self) -> None:
        pass
