"""Counts published events into the daemon's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..events import Event
from ..metrics import Metrics


@dataclass
class MetricsSink:
    metrics: Metrics
    name: str = "metrics"

    def publish(self, event: Event) -> None:
        ve = event.ve or ""
        for source in event.sources:
            self.metrics.events.labels(event.kind, source, ve).inc()
        if event.kind == "fs.error" and event.count:
            dev = event.device.name if event.device and event.device.name else ""
            self.metrics.kernel_errors.labels(dev, ve).inc(event.count)
        if event.kind not in ("source.up", "source.down"):
            self.metrics.latency.observe(max(time.time() - event.time, 0.0))

    def close(self) -> None:
        pass
