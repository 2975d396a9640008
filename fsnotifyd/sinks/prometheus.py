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
        elif event.kind == "image.repacked":
            self._repacked(event, ve)
        elif event.kind in ("action.failed", "action.succeeded") and _is_repack(event):
            # A pass that ran counts through its image.repacked event; here the ones that did not.
            if event.kind == "action.failed":
                self.metrics.repack_runs.labels(ve, "failed").inc()
            elif event.details.get("dry_run"):
                self.metrics.repack_runs.labels(ve, "dry_run").inc()
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
        figures = d.get("figures")
        if isinstance(figures, dict):
            for key, field in _FIGURES.items():
                if _number(figures.get(key)):
                    self.metrics.fs_gauges.set(dev, ve, field, figures[key])

    def _repacked(self, event: Event, ve: str) -> None:
        d = event.details
        self.metrics.repack_runs.labels(ve, "succeeded").inc()
        if _number(d.get("clusters_freed")) and d["clusters_freed"] > 0:
            self.metrics.repack_clusters_freed.labels(ve).inc(d["clusters_freed"])
        if _number(d.get("bytes_moved")) and d["bytes_moved"] > 0:
            self.metrics.repack_moved_bytes.labels(ve).inc(d["bytes_moved"])
        if _number(d.get("seconds")) and d["seconds"] >= 0:
            self.metrics.repack_seconds.observe(d["seconds"])
        skipped = d.get("skipped")
        if isinstance(skipped, dict):
            for reason, n in skipped.items():
                if _number(n) and n > 0:
                    self.metrics.repack_skipped.labels(ve, str(reason)).inc(n)

    def close(self) -> None:
        pass


# fs.alloc details.figures key -> FsGauges field (the figures' swelling is not the BPF one).
_FIGURES = {"garbage": "garbage", "fragmentation": "fragmentation", "swelling": "image_swelling",
            "df_ratio": "df_ratio"}


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_repack(event: Event) -> bool:
    d = event.details
    params = d.get("params")
    return d.get("action") == "shrink" and isinstance(params, dict) and params.get("mode") == "repack"
