"""snapshot: a snapshot of a VE's image named after the incident, with a retention limit.

The name is ``auto:<name or rule>:<decision id prefix>``: the same job finds its own snapshot
after a restart (a crash between taking it and journaling it does not make a second one), and
``auto:`` marks the ones retention may merge away (oldest first, beyond ``keep``); snapshots a
person took are never touched.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from ..image import attach as att_mod
from ..image import descriptor as dd
from ..image import ops
from ..image.lock import exclusive
from ..image.stack import Stack
from .executor import Step
from .job import Job
from .target import Target, Targets

AUTO = "auto:"
DEFAULT_KEEP = 3


def _shots(image: str) -> list[dd.Shot]:
    return dd.load(os.path.join(image, dd.NAME)).snapshots()


def thaw(t: Target) -> None:
    """A run of this job that died between freezing and thawing the VE's filesystem left it
    frozen (its writers hang): thaw it. A filesystem that is not frozen refuses, harmlessly."""
    if t.mountpoint and os.path.ismount(t.mountpoint):
        subprocess.run(["fsfreeze", "-u", t.mountpoint], capture_output=True)


def take(t: Target, name: str, *, resumed: bool = False) -> str:
    """Snapshot ``t``'s image (the filesystem frozen around it when mounted); the GUID of an
    existing snapshot of that name instead, if there is one. ``resumed``: an earlier run of
    the job may have died with the filesystem frozen."""
    assert t.record is not None
    if resumed:
        thaw(t)
    for s in _shots(t.record.image):
        if s.name == name:
            return s.guid
    if t.attachment is not None:
        return att_mod.snapshot(t.attachment, name=name)
    with exclusive(t.record.image, "snapshot"), Stack.open(t.record.image) as stack:
        return ops.snapshot(stack, t.record.image, name=name)


def drop(t: Target, guid: str) -> None:
    """Merge snapshot ``guid`` into its child (its data stays in the disk, the snapshot goes).
    Nothing to do when it is gone already (a run that died after the merge, before its journal)."""
    assert t.record is not None
    if guid not in {s.guid for s in _shots(t.record.image)}:
        return
    if t.attachment is not None:
        att_mod.merge(t.attachment, guid)
    else:
        with exclusive(t.record.image, "merge"):
            ops.merge(t.record.image, guid)


def run(job: Job, step: Step, targets: Targets) -> dict[str, Any]:
    t = targets.resolve(job.ve)
    t.need_image("snapshot")
    assert t.record is not None
    name = f"{AUTO}{job.params.get('name') or job.rule}:{job.decision[:8]}"
    if not step.done("snapshot"):
        step.finish("snapshot", guid=take(t, name, resumed=job.attempts > 1), name=name)
    keep = int(job.params.get("keep", DEFAULT_KEEP))
    merged: list[str] = list(job.data.get("merged", []))
    autos = sorted((s for s in _shots(t.record.image) if s.name and s.name.startswith(AUTO)),
                   key=lambda s: s.created or 0)
    for s in autos[:max(0, len(autos) - keep)]:
        drop(t, s.guid)
        merged.append(s.guid)
        step.finish(f"merged {s.guid}", merged=merged)
    return {"guid": job.data["guid"], "name": name, "merged": merged, "kept": min(len(autos), keep)}
