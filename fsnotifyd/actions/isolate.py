"""isolate: stop a VE from doing more damage, reversibly (``fsnotifyd ve release``).

Modes:
- ``readonly``: remount the VE's filesystem read-only; when the remount fails (busy, or the
  kernel refuses), ``FS_IOC_SHUTDOWN`` with a log flush stops all I/O to it. On an image the
  exporter also refuses writes (a fence below the filesystem).
- ``freeze``: freeze the VE's cgroup (v2 ``cgroup.freeze``, else the v1 freezer); its tasks
  stop where they are, its filesystem stays as it is.
- ``block``: the image exporter refuses writes (EROFS on the device); the filesystem finds out
  at its next write.
- ``detach``: stop the VE: umount, loop detach, exporter exit (`fsnotifyd ve stop`).

What was done is recorded in ``<state-dir>/actions/isolated/<VE>.json`` (written before the
step, so a crash in between is undone by ``release`` too), and ``release`` undoes exactly that.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import time
from typing import Any

from ..events import Event, Kernel, rfc3339
from ..image import attach as att_mod
from ..ve import lifecycle
from .executor import ActionError, Step
from .job import Job
from .target import Target, Targets

FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
FS_GOING_FLAGS_LOGFLUSH = 0x1
FREEZE_WAIT_S = 10.0


def _record_path(targets: Targets, ve_id: str) -> str:
    return os.path.join(targets.state_dir, "actions", "isolated", f"{ve_id}.json")


def isolation(targets: Targets, ve_id: str) -> dict[str, Any] | None:
    try:
        with open(_record_path(targets, ve_id), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ActionError(f"unreadable isolation record {_record_path(targets, ve_id)}: {e}") from e


def _save(targets: Targets, ve_id: str, rec: dict[str, Any] | None) -> None:
    path = _record_path(targets, ve_id)
    if rec is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clear(targets: Targets, ve_id: str) -> None:
    """Forget an isolation that something else ended (a repair restarted the VE)."""
    _save(targets, ve_id, None)


def shutdown(mountpoint: str) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", FS_GOING_FLAGS_LOGFLUSH))
    finally:
        os.close(fd)


def _remount(mountpoint: str, how: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", "-o", f"remount,{how}", mountpoint], capture_output=True, text=True,
                          timeout=timeout)


def freeze_cgroup(path: str, frozen: bool, timeout: float = FREEZE_WAIT_S) -> str:
    """Freeze or thaw a cgroup; returns the interface used. Waits until the kernel says so."""
    v2 = os.path.join(path, "cgroup.freeze")
    if os.path.exists(v2):
        with open(v2, "w") as f:
            f.write("1" if frozen else "0")
        deadline = time.monotonic() + timeout
        want = f"frozen {1 if frozen else 0}"
        while time.monotonic() < deadline:
            with open(os.path.join(path, "cgroup.events")) as f:
                if want in f.read().splitlines():
                    return "cgroup.freeze"
            time.sleep(0.01)
        raise ActionError(f"cgroup {path} did not report '{want}' within {timeout:g} s")
    v1 = os.path.join(path, "freezer.state")
    if os.path.exists(v1):
        want = "FROZEN" if frozen else "THAWED"
        with open(v1, "w") as f:
            f.write(want)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # FREEZING until every task has stopped
            with open(v1) as f:
                if f.read().strip() == want:
                    return "freezer.state"
            time.sleep(0.01)
        raise ActionError(f"cgroup {path} did not reach {want} within {timeout:g} s")
    raise ActionError(f"{path} is neither a cgroup v2 directory nor a v1 freezer cgroup")


def run(job: Job, step: Step, targets: Targets) -> dict[str, Any]:
    mode = job.params.get("mode", "readonly")
    t = targets.resolve(job.ve)
    previous = isolation(targets, t.id)
    if previous is not None and previous.get("mode") == mode and step.done("isolated"):
        return previous
    rec = {"mode": mode, "ve": t.id, "job": job.id, "time": time.time(), "how": None}
    _save(targets, t.id, rec)  # first: a crash after the change still leaves what release undoes
    rec["how"] = _apply(mode, t, targets, step)
    _save(targets, t.id, rec)
    step.finish("isolated", how=rec["how"])
    return rec


def _apply(mode: str, t: Target, targets: Targets, step: Step) -> str:
    if mode == "readonly":
        mp = t.need_mount("isolate readonly")
        r = _remount(mp, "ro", step.remaining())
        how = "remount-ro"
        if r.returncode != 0:
            shutdown(mp)
            how = f"shutdown (remount failed: {r.stderr.strip()[:200]})"
        if t.attachment is not None:
            att_mod.set_readonly(t.attachment, True, remount=False)
            how += " + exporter read-only"
        return how
    if mode == "freeze":
        if not t.cgroup:
            raise ActionError(f"VE {t.id} has no cgroup in the config: isolate freeze needs one")
        return freeze_cgroup(t.cgroup, True)
    if mode == "block":
        att = t.need_image("isolate block")
        if att is None:
            raise ActionError(f"VE {t.id} is not running: nothing to block")
        att_mod.set_readonly(att, True, remount=False)
        return "exporter read-only"
    if mode == "detach":
        t.need_image("isolate detach")
        lifecycle.stop(targets.state_dir, t.id)
        return "stopped"
    raise ActionError(f"unknown isolate mode {mode!r}")


def release(targets: Targets, ve_id: str) -> dict[str, Any]:
    """Undo the isolation in force on ``ve_id`` (after a person has looked)."""
    rec = isolation(targets, ve_id)
    if rec is None:
        raise ActionError(f"VE {ve_id} is not isolated")
    t = targets.resolve(ve_id)
    mode, how = rec.get("mode"), rec.get("how") or ""
    if mode == "readonly":
        if how.startswith("shutdown") and t.managed:
            # A shut-down filesystem cannot be remounted: stop and start the VE (its start runs e2fsck -p).
            lifecycle.stop(targets.state_dir, t.id)
            lifecycle.start(targets.state_dir, t.id)
        else:
            if t.attachment is not None:
                att_mod.set_readonly(t.attachment, False, remount=False)
            mp = t.need_mount("release")
            r = _remount(mp, "rw", 60)
            if r.returncode != 0:
                hint = " (a shut-down filesystem needs umount, fsck, mount)" if how.startswith("shutdown") else ""
                raise ActionError(f"remount,rw {mp} failed: {r.stderr.strip()[:300]}{hint}")
    elif mode == "freeze":
        if not t.cgroup:
            raise ActionError(f"VE {t.id} has no cgroup in the config")
        freeze_cgroup(t.cgroup, False)
    elif mode == "block":
        if t.attachment is not None:
            att_mod.set_readonly(t.attachment, False, remount=False)
    elif mode == "detach":
        lifecycle.start(targets.state_dir, t.id)
    _save(targets, ve_id, None)
    return rec


def released_event(ve_id: str, rec: dict[str, Any], host: str) -> Event:
    """``ve.released``: the isolation ``rec`` (as :func:`release` returns it) was undone."""
    since = rec.get("time")
    return Event(kind="ve.released", time=time.time(), host=host, severity="info", device=None, fs=None,
                 mount=None, ve=ve_id, kernel=Kernel(), sources=("daemon",),
                 details={"mode": rec.get("mode"), "how": rec.get("how"), "job": rec.get("job"),
                          "isolated_since": rfc3339(since) if isinstance(since, (int, float)) else None})
