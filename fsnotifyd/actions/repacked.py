"""A repack pass as its own event: ``image.repacked``.

The handler of ``shrink: {mode: repack}`` returns ``{"mode": "repack", "clusters_freed",
"bytes_moved", "seconds", "moved_files", "skipped": {reason: count}, "before": {figures},
"after": {figures}, "released"}``; the executor publishes it, besides the generic
``action.succeeded``, as one ``image.repacked`` event with those fields in ``details`` (as an
fsck publishes ``fsck.result``), so rules, alerts and metrics read a pass without digging in
``details.result`` of an action event.
"""

from __future__ import annotations

from typing import Any

from .job import Job

KIND = "image.repacked"
FIELDS = ("clusters_freed", "bytes_moved", "seconds", "moved_files", "skipped", "before", "after", "released")


def is_repack(job: Job) -> bool:
    return job.action == "shrink" and job.params.get("mode") == "repack"


def details(job: Job) -> dict[str, Any] | None:
    """The event's details for a pass that ran; None for anything else (a dry run did not)."""
    r = job.result
    if not is_repack(job) or job.dry_run or not isinstance(r, dict) or r.get("mode") != "repack":
        return None
    return {"mode": "repack", **{k: r.get(k) for k in FIELDS}}
