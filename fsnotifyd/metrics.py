"""Every metric fsnotifyd exports, in one registry owned by the daemon (no module globals)."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "fsnotifyd_events_total", "Published events", ["kind", "source", "ve"], registry=r
        )
        self.kernel_errors = Counter(
            "fsnotifyd_kernel_errors_total",
            "Kernel filesystem errors accounted for (sum of fs.error counts)",
            ["device", "ve"],
            registry=r,
        )
        self.observations = Counter(
            "fsnotifyd_observations_total", "Raw observations received from sources", ["source"], registry=r
        )
        self.source_up = Gauge("fsnotifyd_source_up", "1 when the source is running", ["source"], registry=r)
        self.lost = Counter(
            "fsnotifyd_events_lost_total", "Kernel records or observations lost", ["source", "reason"], registry=r
        )
        self.decisions = Counter(
            "fsnotifyd_rule_decisions_total", "Rule decisions by outcome (fired, threshold, cooldown)",
            ["rule", "outcome"], registry=r,
        )
        self.rules_reloads = Counter(
            "fsnotifyd_rules_reloads_total", "Rule reloads by result", ["result"], registry=r
        )
        self.actions = Counter(
            "fsnotifyd_actions_total", "Action jobs finished, by action and outcome (succeeded, failed)",
            ["action", "outcome"], registry=r,
        )
        self.action_seconds = Histogram(
            "fsnotifyd_action_duration_seconds", "Time from an action job's start to its end", ["action"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600), registry=r,
        )
        self.space_failures = Counter(
            "fsnotifyd_space_failures_total",
            "Syscalls that failed with ENOSPC or EDQUOT (sum of fs.enospc / fs.edquot counts)",
            ["errno", "ve"], registry=r,
        )
        self.alloc_blocks = Counter(
            "fsnotifyd_alloc_blocks_total", "Filesystem blocks allocated, freed and discarded (BPF telemetry)",
            ["device", "ve", "op"], registry=r,
        )
        self.alloc_regions = Counter(
            "fsnotifyd_alloc_regions_touched_total",
            "Image-cluster sized regions that received their first allocation", ["device", "ve"], registry=r,
        )
        self.alloc_regions_live = Gauge(
            "fsnotifyd_alloc_regions_live", "Regions holding allocations and not discarded whole since",
            ["device", "ve"], registry=r,
        )
        self.swelling = Gauge(
            "fsnotifyd_fs_swelling_ratio",
            "Live regions over the regions the data in use needs (1 = compact; a thin image's growth factor)",
            ["device", "ve"], registry=r,
        )
        self.quota_warnings = Counter(
            "fsnotifyd_quota_warnings_total", "Quota warnings by kind (BHARDWARN, ISOFTWARN, ...)",
            ["warning", "ve"], registry=r,
        )
        self.latency = Histogram(
            "fsnotifyd_event_latency_seconds",
            "From the first observation of a fact to its publication",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 2, 5),
            registry=r,
        )

    def bind_correlator(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the correlator's own counters, read at scrape time (no copy to keep in step)."""
        self.registry.register(_CorrelatorCollector(stats))


class _CorrelatorCollector(Collector):
    HELP = {
        "merged": "Observations folded into an event another source already started",
        "already_counted": "Views of errors an earlier event already counted, with nothing new to add",
        "duplicate_state": "Repeated reports of a read-only/shutdown state already published",
    }

    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = self.stats()
        for name, help_text in self.HELP.items():
            yield CounterMetricFamily(f"fsnotifyd_correlator_{name}", help_text, value=values.get(name, 0))
