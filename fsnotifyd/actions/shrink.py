"""shrink: give a VE's unused space back to the host.

- ``trim``: ``fstrim`` the VE's filesystem; on an image the discards punch holes in its
  deltas (the host gets the space at once), then the image is compacted (clusters moved into
  the holes, the file cut; online through the exporter, the VE's I/O pausing meanwhile).
  Reports the bytes reclaimed (allocated blocks before/after) and the compaction's figures.
- ``balloon``: inflate the image manager's balloon to ``target`` (online; ``0`` deflates).
- ``resize``: offline: stop the VE, ``resize2fs -M`` plus ``margin`` (default 10%), cut the
  image, compact, start the VE.
- ``repack``: online, the VE running: move live data out of partly used image clusters
  (:mod:`fsnotifyd.image.repack`; ``budget_mib_s``, ``max_seconds``), trim, compact. Its result
  is the repack's own dict (mode, clusters_freed, bytes_moved, seconds, moved_files, skipped,
  before, after, released). A crash or restart mid-way resumes the job: the next pass deletes
  the donors left and maps afresh.
A VE from the config (not an image) can only be trimmed.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from ..image import attach as att_mod
from ..image import ops, repack, resize
from ..image.info import parse_size
from ..image.lock import exclusive
from ..image.stack import Stack
from ..ve import lifecycle
from .executor import ActionError, Step
from .job import Job
from .target import Target, Targets


def _allocated(t: Target) -> int | None:
    if t.record is None:
        return None
    total = 0
    for name in os.listdir(t.record.image):
        if name.startswith(ops.ROOT_FILE):
            total += os.stat(os.path.join(t.record.image, name)).st_blocks * 512
    return total


def run(job: Job, step: Step, targets: Targets) -> dict[str, Any]:
    mode = job.params.get("mode")
    t = targets.resolve(job.ve)
    if mode == "repack":
        return _repack(job, step, t)
    before = _allocated(t)
    if mode == "trim":
        result: dict[str, Any] = {"mode": mode}
        if t.mountpoint and os.path.ismount(t.mountpoint):
            if t.attachment is not None:
                att_mod.control(t.attachment, {"op": "flush"}, timeout=120)
            # Blocks freed in the journal's open transaction are not trimmed: commit it first.
            subprocess.run(["sync", "-f", t.mountpoint], capture_output=True, timeout=step.remaining())
            r = subprocess.run(["fstrim", "-v", t.mountpoint], capture_output=True, text=True,
                               timeout=step.remaining())
            if r.returncode != 0:
                raise ActionError(f"fstrim {t.mountpoint}: {r.stderr.strip()[:300]}")
            result["fstrim"] = r.stdout.strip()
            if t.attachment is not None:
                att_mod.control(t.attachment, {"op": "flush"}, timeout=120)
        elif t.record is None:
            raise ActionError(f"VE {t.id}: trim needs its filesystem mounted")
        if t.attachment is not None:
            result["compacted"] = att_mod.compact(t.attachment)
        elif t.record is not None:
            with exclusive(t.record.image, "compact"), Stack.open(t.record.image) as stack:
                c = ops.compact(stack.top)
            result["compacted"] = {"moved": c.moved, "released": c.released}
    elif mode == "balloon":
        att = t.need_image("shrink balloon")
        mp = t.need_mount("shrink balloon")
        target = job.params.get("target")
        if target is None:
            raise ActionError("shrink balloon needs 'target' (a size; 0 deflates)")
        size = parse_size(str(target))
        if size == 0:
            resize.deflate(mp)
            result = {"mode": mode, "deflated": True}
        else:
            assert att is not None
            b = resize.inflate(mp, att.loop, size, flush=lambda: att_mod.control(att, {"op": "flush"}, timeout=120))
            result = {"mode": mode, "balloon": b.size, "discarded": b.discarded}
    elif mode == "resize":
        t.need_image("shrink resize")
        assert t.record is not None
        if not step.done("stopped"):
            lifecycle.stop(targets.state_dir, t.id)
            step.finish("stopped")
        if not step.done("cut"):
            a = att_mod.attach(t.record.image, run_dir=targets.run_dir)
            try:
                minimum = resize.shrink_filesystem(a.loop, None)
                margin = _margin(job.params.get("margin"), minimum)
                new = resize.shrink_filesystem(a.loop, minimum + margin) if margin else minimum
            finally:
                att_mod.detach(a, run_dir=targets.run_dir)
            with exclusive(t.record.image, "shrink"):
                c = resize.cut_and_compact(t.record.image, new)
            step.finish("cut", size=new, released=c.released)
        lifecycle.start(targets.state_dir, t.id)
        result = {"mode": mode, "size": job.data["size"], "released": job.data["released"]}
    else:
        raise ActionError(f"unknown shrink mode {mode!r}")
    after = _allocated(t)
    if before is not None and after is not None:
        result["reclaimed_bytes"] = max(0, before - after)
    return result


def _margin(raw: Any, minimum: int) -> int:
    if raw is None:
        return minimum // 10
    text = str(raw).strip()
    if text.endswith("%"):
        return int(minimum * float(text[:-1]) / 100)
    return parse_size(text)


def _repack(job: Job, step: Step, t: Target) -> dict[str, Any]:
    att = t.need_image("shrink repack")
    t.need_mount("shrink repack")
    if att is None or not att.mountpoint:
        raise ActionError(f"VE {t.id}: shrink repack needs the VE running (its image attached and mounted)")
    if not step.done("repacked"):
        budget = job.params.get("budget_mib_s")
        limit = job.params.get("max_seconds")
        # Stop moving in time to trim and compact before the job's own timeout.
        room = max(1.0, step.remaining() * 0.8)
        opts = repack.Options(budget_mib_s=float(budget) if budget is not None else None,
                              max_seconds=min(float(limit), room) if limit is not None else room)
        try:
            r = repack.run(att, opts)
        except repack.RepackRefused as e:
            raise ActionError(f"VE {t.id}: {e}") from e
        step.finish("repacked", repack=r)
    return dict(job.data["repack"])
