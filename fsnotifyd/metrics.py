"""Every metric fsnotifyd exports, in one registry owned by the daemon (no module globals)."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .version import __version__


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The daemon's own registry has none of the default one's collectors: add what every
        # exporter has (process_resident_memory_bytes, process_open_fds, process_start_time_seconds,
        # python_info, python_gc_*), so the usual process dashboards and alerts work here too.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "fsnotifyd_build_info", "Always 1; the labels say which fsnotifyd runs, on which Python and kernel",
            ["version", "python", "kernel"], registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), os.uname().release).set(1)
        # Once per event, not per source: a sum() over it is the number of events, however
        # many interfaces saw each. The per-source view has no VE label, to stay small.
        self.events = Counter(
            "fsnotifyd_events_total", "Published events (each once, whatever its count and sources)",
            ["kind", "severity", "ve"], registry=r,
        )
        self.source_events = Counter(
            "fsnotifyd_source_events_total",
            "Published events each source contributed to (an event seen by 4 sources adds 1 to each)",
            ["source", "kind"], registry=r,
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
        self.fs_gauges = FsGauges()
        r.register(self.fs_gauges)
        self.quota_warnings = Counter(
            "fsnotifyd_quota_warnings_total", "Quota warnings by kind (BHARDWARN, ISOFTWARN, ...)",
            ["warning", "ve"], registry=r,
        )
        self.fsck_results = Counter(
            "fsnotifyd_fsck_results_total",
            "fsck runs by result (clean; errors: found, or fixed by a repair; failed: nothing learnt, or errors left)",
            ["ve", "result"], registry=r,
        )
        # Repack passes (``shrink: {mode: repack}``), from the image.repacked events and the
        # repack jobs that failed.
        self.repack_runs = Counter(
            "fsnotifyd_repack_runs_total", "Repack passes by result (succeeded, failed, dry_run)",
            ["ve", "result"], registry=r,
        )
        self.repack_clusters_freed = Counter(
            "fsnotifyd_repack_clusters_freed_total", "Image clusters repack passes made free", ["ve"], registry=r,
        )
        self.repack_moved_bytes = Counter(
            "fsnotifyd_repack_moved_bytes_total", "Bytes of file data repack passes moved", ["ve"], registry=r,
        )
        self.repack_seconds = Histogram(
            "fsnotifyd_repack_seconds", "How long a repack pass took",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r,
        )
        self.repack_skipped = Counter(
            "fsnotifyd_repack_skipped_total",
            "What repack passes could not move, by reason (metadata, directory, inline, immutable, changing, ...)",
            ["ve", "reason"], registry=r,
        )
        self.sink_failures = Counter(
            "fsnotifyd_sink_failures_total", "Events a sink raised on (the other sinks still got them)",
            ["sink"], registry=r,
        )
        self.webhook_deliveries = Counter(
            "fsnotifyd_webhook_deliveries_total",
            "Webhook POSTs by outcome (delivered, retried, rejected: the endpoint refused the event for good)",
            ["sink", "outcome"], registry=r,
        )
        self.webhook_spool_events = Gauge(
            "fsnotifyd_webhook_spool_events", "Events in a webhook's spool, not yet delivered", ["sink"], registry=r,
        )
        self.webhook_spool_bytes = Gauge(
            "fsnotifyd_webhook_spool_bytes", "Bytes of a webhook's spool on disk", ["sink"], registry=r,
        )
        # Held in memory while the disk refuses the spool: lost if the daemon stops meanwhile.
        self.webhook_memory_events = Gauge(
            "fsnotifyd_webhook_memory_events",
            "Events a webhook holds in memory, not yet delivered, because the disk refused its spool",
            ["sink"], registry=r,
        )
        self.webhook_memory_bytes = Gauge(
            "fsnotifyd_webhook_memory_bytes", "Bytes of the events a webhook holds in memory", ["sink"], registry=r,
        )
        self.webhook_oldest_seconds = Gauge(
            "fsnotifyd_webhook_oldest_spooled_seconds",
            "Age of a webhook's oldest undelivered event, in its spool or in memory (0 when none)", ["sink"],
            registry=r,
        )
        self.control_requests = Counter(
            "fsnotifyd_control_requests_total",
            "Control socket requests by op and result (ok, error, refused: peer not allowed, "
            "busy: too many clients, bad: malformed)",
            ["op", "result"], registry=r,
        )
        self.latency = Histogram(
            "fsnotifyd_event_latency_seconds",
            "From the first observation of a fact to its publication",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 2, 5),
            registry=r,
        )
        self.journal_write_failures = Counter(
            "fsnotifyd_journal_write_failures_total",
            "Events a JSONL journal could not write (disk full, read-only, I/O error); the other sinks still got them",
            ["sink"], registry=r,
        )

    def bind_correlator(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the correlator's own counters, read at scrape time (no copy to keep in step)."""
        self.registry.register(_CorrelatorCollector(stats))


    def bind_mounted(self, mounted: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """The (device, VE) pairs mounted now: a filesystem's gauges are exported only while
        its VE has it mounted on that device (see ``FsGauges``)."""
        self.fs_gauges.mounted = mounted

    def bind_isolated(self, isolated: Callable[[], Iterable[str]]) -> None:
        """``fsnotifyd_ve_isolated``: 1 per VE under isolation, read from the action records at
        scrape time, so a release by the CLI shows at once."""
        self.registry.register(_IsolatedCollector(isolated))


    def bind_files(self, files: Callable[[], Iterable[Any]]) -> None:
        """``fsnotifyd_state_write_failing``: 1 per own file (state, journals) the disk refuses
        now, 0 once written again (``fsnotifyd.statefile.FileHealth.files``)."""
        self.registry.register(_FilesCollector(files))

    def bind_images(self, exporters: Callable[[], Iterable[tuple[str, str, Mapping[str, Any] | None]]]) -> None:
        """The image exporters' own figures, as the watchdog last read them (image, VE or "",
        status or None when the exporter did not answer): a scrape never waits for an exporter."""
        self.registry.register(_ImagesCollector(exporters))


class _ImagesCollector(Collector):
    # The exporter's status counters (since it started: a restarted exporter starts again at 0,
    # which Prometheus reads as a counter reset).
    COUNTERS = [
        ("fsnotifyd_image_io_requests_total", "Read and write requests an image's exporter served", "requests"),
        ("fsnotifyd_image_io_bytes_total", "Bytes an image's exporter read and wrote for its VE", "bytes"),
    ]

    def __init__(self, exporters: Callable[[], Iterable[tuple[str, str, Mapping[str, Any] | None]]]) -> None:
        self.exporters = exporters

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        requests = CounterMetricFamily(*self.COUNTERS[0][:2], labels=["image", "ve", "op"])
        nbytes = CounterMetricFamily(*self.COUNTERS[1][:2], labels=["image", "ve", "op"])
        errors = CounterMetricFamily("fsnotifyd_image_io_errors_total",
                                     "Requests an image's exporter answered with an error", labels=["image", "ve"])
        clusters = CounterMetricFamily("fsnotifyd_image_clusters_total",
                                       "Clusters an image's exporter allocated in the top delta or freed by discards",
                                       labels=["image", "ve", "op"])
        fallbacks = CounterMetricFamily("fsnotifyd_image_python_requests_total",
                                        "Requests the exporter's C data path handed to Python (first writes, "
                                        "deltas below, failed calls)", labels=["image", "ve"])
        healthy = GaugeMetricFamily("fsnotifyd_image_exporter_healthy",
                                    "1 when the image's exporter answered the watchdog and no request is stuck",
                                    labels=["image", "ve"])
        for image, ve, st in self.exporters():
            healthy.add_metric([image, ve], 1 if st is not None and st.get("healthy") else 0)
            if st is None:
                continue
            io = st.get("stats") or {}
            for op, n, b in (("read", "reads", "read_bytes"), ("write", "writes", "written_bytes")):
                requests.add_metric([image, ve, op], io.get(n, 0))
                nbytes.add_metric([image, ve, op], io.get(b, 0))
            requests.add_metric([image, ve, "discard"], io.get("discards", 0))
            clusters.add_metric([image, ve, "allocated"], io.get("allocated", 0))
            clusters.add_metric([image, ve, "discarded"], io.get("discarded", 0))
            errors.add_metric([image, ve], st.get("errors") or 0)
            if st.get("fast_path"):
                fallbacks.add_metric([image, ve], st["fast_path"].get("fallbacks", 0))
        yield from (requests, nbytes, errors, clusters, fallbacks, healthy)


class FsGauges(Collector):
    """A filesystem's last allocation figures (live regions, swelling, the thinness figures), by
    device and VE.

    They come from ``fs.alloc`` events, which stop when the filesystem is unmounted, and a loop
    device is reused by the next VE attached. A plain Gauge would keep the last value of a
    stopped or removed VE for the daemon's lifetime, and the swelling alert with it. So a
    scrape exports only the pairs that are mounted now, and forgets the others.
    """

    FIELDS = {
        "regions_live": ("fsnotifyd_alloc_regions_live", "Regions holding allocations and not discarded whole since"),
        "swelling": ("fsnotifyd_fs_swelling_ratio",
                     "Live regions over the regions the data in use needs (1 = compact; a thin image's growth factor)"),
        # The thinness figures (fs.alloc details.figures; fsnotifyd.image.thinness defines them).
        "garbage": ("fsnotifyd_image_garbage_ratio",
                    "Image clusters allocated over clusters holding live data (1 = the image keeps nothing freed)"),
        "fragmentation": ("fsnotifyd_image_fragmentation_ratio",
                          "Clusters holding live data over the clusters' worth of data in use (1 = packed)"),
        "image_swelling": (
            "fsnotifyd_image_swelling_ratio",
            "Image clusters allocated over the clusters' worth of data in use (garbage x fragmentation)"),
        "df_ratio": ("fsnotifyd_image_df_ratio", "Image bytes on the host over the bytes df shows used"),
    }

    def __init__(self) -> None:
        self.mounted: Callable[[], Iterable[tuple[str, str]]] | None = None  # unbound: keep all (replay, tests)
        self._values: dict[tuple[str, str], dict[str, float]] = {}
        self._lock = threading.Lock()  # events are set on the daemon's loop, scrapes read in the HTTP thread

    def set(self, device: str, ve: str, field: str, value: float) -> None:
        with self._lock:
            self._values.setdefault((device, ve), {})[field] = value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        live = set(self.mounted()) if self.mounted is not None else None
        with self._lock:
            if live is not None:
                self._values = {k: v for k, v in self._values.items() if k in live}
            values = sorted(self._values.items())
        for field, (name, help_text) in self.FIELDS.items():
            g = GaugeMetricFamily(name, help_text, labels=["device", "ve"])
            for labels, v in values:
                if field in v:
                    g.add_metric(list(labels), v[field])
            yield g

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registered at construction, before anything is mounted: describe by name only, so the
        # registry checks for clashes without calling ``mounted``.
        for name, help_text in self.FIELDS.values():
            yield GaugeMetricFamily(name, help_text, labels=["device", "ve"])


class _FilesCollector(Collector):
    def __init__(self, files: Callable[[], Iterable[Any]]) -> None:
        self.files = files

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("fsnotifyd_state_write_failing",
                              "1 while the disk refuses writes to one of the daemon's own files (state, journal); "
                              "its value is kept in memory and written again once the disk takes it",
                              labels=["file"])
        for f in sorted(self.files(), key=lambda f: f.path):
            g.add_metric([f.path], 0 if f.ok else 1)
        yield g


class _IsolatedCollector(Collector):
    def __init__(self, isolated: Callable[[], Iterable[str]]) -> None:
        self.isolated = isolated

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("fsnotifyd_ve_isolated", "1 while a VE is isolated by an action (until released)",
                              labels=["ve"])
        for ve in sorted(self.isolated()):
            g.add_metric([ve], 1)
        yield g


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
