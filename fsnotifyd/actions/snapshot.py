"""snapshot: a snapshot of a VE's image named after the incident, with a retention limit.

The name is ``auto:<name or rule>:<decision id prefix>``: the same job finds its own snapshot
after a restart (a crash between taking it and journaling it does not make a second one), and
``auto:`` marks the ones retention may merge away (oldest first, beyond ``keep``); snapshots a
person took are never touched.
"""

from __future__ import annotations

import os
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


def take(t: Target, name: str) -> str:
    """Snapshot ``t``'s image (the filesystem frozen around it when mounted); the GUID of an
    existing snapshot of that name instead, if there is one."""
    assert t.record is not None
    for s in _shots(t.record.image):
        if s.name == name:
            return s.guid
    if t.attachment is not None:
        return att_mod.snapshot(t.attachment, name=name)
    with exclusive(t.record.image, "snapshot"), Stack.open(t.record.image) as stack:
        return ops.snapshot(stack, t.record.image, name=name)


def drop(t: Target, guid: str) -> None:
    """Merge snapshot ``guid`` into its child (its data stays in the disk, the snapshot goes)."""
    assert t.record is not None
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
        step.finish("snapshot", guid=take(t, name), name=name)
    keep = int(job.params.get("keep", DEFAULT_KEEP))
    merged: list[str] = list(job.data.get("merged", []))
    autos = sorted((s for s in _shots(t.record.image) if s.name and s.name.startswith(AUTO)),
                   key=lambda s: s.created or 0)
    for s in autos[:max(0, len(autos) - keep)]:
        drop(t, s.guid)
        merged.append(s.guid)
        step.finish(f"merged {s.guid}", merged=merged)
    return {"guid": job.data["guid"], "name": name, "merged": merged, "kept": min(len(autos), keep)}
