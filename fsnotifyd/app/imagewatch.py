"""The image watchdog: a hung image exporter must not hang its VE's writers forever.

A thread checks every attached image's exporter; one that does not answer in time has its FUSE
connection aborted, and the VE's writers then get I/O errors, which the sources report. What
the last round saw feeds the image metrics; ``status`` asks each exporter itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from ..image.attach import Attached, attached, control, run_watchdog
from ..inventory import VE
from ..metrics import Metrics

WATCHDOG_INTERVAL = 2.0  # seconds between checks of every attached image's exporter
WATCHDOG_TIMEOUT = 5.0  # an exporter that does not answer its status in this long is hung

log = structlog.get_logger("fsnotifyd")


class ImageWatchdog:
    def __init__(self, state_dir: str, metrics: Metrics, ves: Callable[[], Iterable[VE]]) -> None:
        self.run_dir = os.path.join(state_dir, "run")
        self.metrics = metrics
        self.ves = ves  # the inventory's VEs, which come and go while the daemon runs
        self.aborted = 0
        self._seen: list[tuple[Attached, dict[str, Any] | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.metrics.bind_images(self._figures)
        self._thread = threading.Thread(
            target=run_watchdog, args=(self.run_dir, WATCHDOG_INTERVAL, self._stop),
            kwargs={"timeout": WATCHDOG_TIMEOUT, "on_abort": self._exporter_aborted,
                    "on_pass": self._checked},
            name="image-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _checked(self, seen: list[tuple[Attached, dict[str, Any] | None]]) -> None:
        self._seen = seen  # replaced whole: a scrape reads one round or the next

    def _figures(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """(image, VE id or "", status) per exporter the watchdog checked last, for metrics."""
        ves = list(self.ves())
        out = []
        for att, st in self._seen:
            ve = next((v.id for v in ves if att.disk in v.images), "")
            out.append((att.image, ve, st))
        return out

    def _exporter_aborted(self, att: Attached) -> None:
        self.aborted += 1
        log.error("image.exporter_aborted", image=att.image, loop=att.loop, pid=att.pid,
                  reason=f"no answer within {WATCHDOG_TIMEOUT}s")

    def images(self) -> list[dict[str, Any]]:
        """Every attached image with what its exporter reports (I/O counts, errors, health)."""
        out = []
        for att in attached(self.run_dir):
            try:
                st = control(att, {"op": "status"}, timeout=1.0)
            except Exception as e:  # a hung or dead exporter is exactly what status must show
                st = {"ok": False, "healthy": False, "error": str(e)}
            out.append({"image": att.image, "loop": att.loop, "mountpoint": att.mountpoint, "pid": att.pid,
                        "healthy": bool(st.get("healthy")), "readonly": st.get("readonly", att.readonly),
                        "errors": st.get("errors"), "stats": st.get("stats"), "error": st.get("error"),
                        "data_path": ("python" if st.get("fast_path") is None else "c") if st.get("ok") else None})
        return out
