"""fsck: ``check`` a VE's filesystem while it runs, or ``repair`` it offline.

``check`` (e2scrub style): snapshot the image, attach the snapshot read-only as a second
exporter and loop device, run ``e2fsck -fn`` on it, take it down, merge the snapshot away.
The VE keeps running; what is checked is the filesystem as of the snapshot (frozen around it,
so consistent). ``repair``: stop the VE, snapshot the image (the corrupted state is kept for
forensics), attach it without mounting, ``e2fsck -fy``, then start the VE again; if the
repair fails the VE stays stopped. Each emits ``fsck.result``: ``clean``, ``errors`` (found,
or found and fixed) or ``failed``, with e2fsck's exit code decoded and a summary of its output.
A VE that is not an fsnotifyd image can be checked only while its device is not mounted.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from ..image import attach as att_mod
from ..image.e2fsck import decode, outcome
from ..ve import lifecycle
from . import isolate
from . import snapshot as snap
from .executor import ActionError, Step
from .job import Job
from .target import Targets


def e2fsck(device: str, repair: bool, timeout: float) -> dict[str, Any]:
    argv = ["e2fsck", "-f", "-y" if repair else "-n", device]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ActionError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from e
    out = (r.stdout + r.stderr).splitlines()
    problems = [ln for ln in out if ln.rstrip().endswith(("Fix? no", "Fix? yes", "Clear? no", "Clear? yes",
                                                         "Fix<y>? yes", "Fix<y>? no"))]
    return {"command": argv, "exit_code": r.returncode, "result": outcome(r.returncode, repair),
            "incomplete": bool(r.returncode & 8),
            "decoded": decode(r.returncode), "problems": len(problems), "first_problems": problems[:10],
            "summary": [ln for ln in out if ln.strip()][-3:]}


def _e2fsck_attached(image: str, run_dir: str, upto: str | None, timeout: float) -> dict[str, Any]:
    """Check snapshot ``upto`` read-only, or (``upto`` None) repair the image, attached for
    this alone. An attachment an earlier run of the job left (it died in here) goes first."""
    repair = upto is None
    att_mod.detach(image, run_dir=run_dir, upto=upto)
    a = att_mod.attach(image, run_dir=run_dir, readonly=not repair, upto=upto)
    try:
        return e2fsck(a.loop, repair, timeout)
    finally:
        att_mod.detach(a, run_dir=run_dir)


def run(job: Job, step: Step, targets: Targets) -> dict[str, Any]:
    mode = job.params.get("mode", "check")
    t = targets.resolve(job.ve)
    if t.record is None:
        return _unmanaged(job, step, t)
    name = f"fsck-{mode}:{job.decision[:8]}"
    if mode == "check":
        if not step.done("snapshot"):
            step.finish("snapshot", guid=snap.take(t, name, resumed=job.attempts > 1), name=name)
        guid = job.data["guid"]
        if not step.done("checked"):
            step.finish("checked", fsck=_e2fsck_attached(t.record.image, targets.run_dir, guid, step.remaining()))
        result = job.data["fsck"]
        if not step.done("snapshot dropped"):
            # The snapshot existed for the check only; it goes unless the check found errors
            # (then it is the evidence).
            if result["result"] == "clean":
                snap.drop(targets.resolve(job.ve), guid)
            step.finish("snapshot dropped")
    elif mode == "repair":
        if not step.done("stopped"):
            lifecycle.stop(targets.state_dir, t.id)
            step.finish("stopped")
        if not step.done("snapshot"):  # offline (an isolated exporter refuses a snapshot)
            step.finish("snapshot", guid=snap.take(targets.resolve(job.ve), name), name=name)
        guid = job.data["guid"]
        if not step.done("repaired"):
            step.finish("repaired", fsck=_e2fsck_attached(t.record.image, targets.run_dir, None, step.remaining()))
        result = job.data["fsck"]
        if result["result"] != "failed" and not step.done("restarted"):
            lifecycle.start(targets.state_dir, t.id)
            isolate.clear(targets, t.id)  # the VE is back, read-write: no isolation left to release
            step.finish("restarted")
    else:
        raise ActionError(f"unknown fsck mode {mode!r}")
    return _report(step, {"mode": mode, "snapshot": guid, **job.data["fsck"]})


def _unmanaged(job: Job, step: Step, t: Any) -> dict[str, Any]:
    mode = job.params.get("mode", "check")
    if not t.device:
        raise ActionError(f"VE {t.id} has no device in the config: fsck needs one")
    if t.mountpoint and os.path.ismount(t.mountpoint):
        raise ActionError(f"VE {t.id} is not an fsnotifyd image and {t.mountpoint} is mounted: "
                          f"fsck needs it unmounted (no snapshot to check instead)")
    return _report(step, {"mode": mode, **e2fsck(t.device, mode == "repair", step.remaining())})


def _report(step: Step, report: dict[str, Any]) -> dict[str, Any]:
    """Emit the finding as ``fsck.result``; a failed e2fsck fails the job."""
    step.emit("fsck.result", "info" if report["result"] == "clean" else "error", report)
    if report["result"] == "failed":
        raise ActionError(f"e2fsck failed: {', '.join(report['decoded'])}")
    return report
