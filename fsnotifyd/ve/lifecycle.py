"""A VE's life: create (image + record), start (check, attach, mount), stop (umount, detach).

Every step is idempotent and starts by cleaning up what a crash may have left, so
``fsnotifyd ve start`` brings a VE back after a reboot, a killed exporter or a killed CLI: a
stale attachment is detached, an image left in use is checked and repaired, the filesystem's
journal is replayed by the mount (and ``e2fsck -p`` runs first when the kernel recorded errors).

Neither says more than it did. A filesystem e2fsck could not repair (exit status 4 and up, see
:mod:`..image.e2fsck`) is neither resized nor mounted: ``start`` detaches the image and leaves
the VE stopped, the reason in its record. ``stop`` looks after the detach and says stopped only
when no mount, loop device or exporter of the VE is left.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import structlog

from ..errors import FsckFailed, FsnotifydError, ImageError
from ..image import attach as att_mod
from ..image import e2fsck, ops, repack, resize
from ..image.check import check
from ..image.lock import exclusive
from ..image.progress import ProgressFn
from .registry import Registry, VeRecord

log = structlog.get_logger("fsnotifyd.ve.lifecycle")


@dataclass(frozen=True, slots=True)
class Paths:
    state_dir: str

    @property
    def run_dir(self) -> str:
        return os.path.join(self.state_dir, "run")

    def image(self, ve_id: str) -> str:
        return os.path.join(self.state_dir, "images", ve_id)

    def root(self, ve_id: str) -> str:
        return os.path.join(self.state_dir, "root", ve_id)


def create(state_dir: str, ve_id: str, size: int, *, mountpoint: str | None = None, image: str | None = None,
           labels: dict[str, str] | None = None, profile: str = "thin", cluster: int | None = None,
           discard: bool = True) -> VeRecord:
    paths, reg = Paths(state_dir), Registry(state_dir)
    rec = VeRecord(ve_id, os.path.abspath(image or paths.image(ve_id)),
                   os.path.abspath(mountpoint or paths.root(ve_id)), dict(labels or {}), discard=discard)
    rec = reg.add(rec)  # claims the id, mount point and image first
    try:
        ops.create(rec.image, size, profile=profile, cluster=cluster or ops.DEFAULT_CLUSTER)
    except BaseException:
        reg.remove(ve_id)
        raise
    return rec


def _healthy(a: att_mod.Attached) -> bool:
    try:
        return bool(att_mod.control(a, {"op": "status"}, timeout=5).get("healthy"))
    except (OSError, ValueError, ImageError):
        return False


def _device_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def start(state_dir: str, ve_id: str, *, progress: ProgressFn | None = None) -> VeRecord:
    """Check the image, attach, e2fsck, fill a grown disk, mount. A start that fails leaves the
    VE detached and stopped with the reason in its record (``ve list``, ``ve show``) and in a
    ``ve.start_refused`` log event; the error raised says the same. ``progress`` hears the
    image check and e2fsck's passes (the CLI draws them on a terminal)."""
    paths, reg = Paths(state_dir), Registry(state_dir)
    with reg.ve_locked(ve_id):
        rec = reg.get(ve_id)
        try:
            a = _start(paths, rec, progress)
        except FsnotifydError as e:
            _refused(paths, reg, rec, e)
            raise
        return reg.update(ve_id, running=True, loop=a.loop, disk=a.disk, reason=None)


def _start(paths: Paths, rec: VeRecord, progress: ProgressFn | None = None) -> att_mod.Attached:
    # The VE's own attachment, by name: a snapshot view of its image is another one.
    a = att_mod.attachment(paths.run_dir, rec.image)
    if a is not None and _healthy(a) and a.mountpoint and os.path.ismount(a.mountpoint):
        return a  # running: a repack in progress owns any donor there
    if a is not None:  # left by a crash: take it apart before starting afresh
        att_mod.detach(a, run_dir=paths.run_dir)
    with exclusive(rec.image, "repair"):
        report = check(rec.image, repair=True, progress=progress)
    if not check(rec.image).clean:
        raise ImageError(f"image still has problems after repair: {report}", file=rec.image)
    a = att_mod.attach(rec.image, run_dir=paths.run_dir)
    try:
        # A filesystem the kernel marked with errors is repaired before it is mounted.
        _e2fsck(rec, a, "-p", progress=progress)
        # A disk grown while the filesystem could not follow (no CAP_SYS_RESOURCE for an
        # online resize, or grown detached): the filesystem fills it now, unmounted, after
        # a full check (resize2fs wants one, and must not move a broken filesystem).
        if resize.fs_size(a.loop) + (1 << 20) <= _device_size(a.loop):
            _e2fsck(rec, a, "-fy", progress=progress)
            r = subprocess.run(["resize2fs", a.loop], capture_output=True, text=True)
            if r.returncode != 0:
                raise ImageError(f"resize2fs {a.loop} failed: {r.stderr.strip()[:300]}", file=rec.image)
        os.makedirs(rec.mountpoint, exist_ok=True)
        att_mod.mount(a, rec.mountpoint, options=mount_options(rec))
        # A repack killed mid-way left its donors: they hold only blocks no file needs.
        repack.remove_donors(rec.mountpoint)
    except BaseException:
        att_mod.detach(a, run_dir=paths.run_dir)
        raise
    return a


def mount_options(rec: VeRecord) -> tuple[str, ...]:
    return ("discard",) if rec.discard else ()


def _e2fsck(rec: VeRecord, a: att_mod.Attached, *options: str, progress: ProgressFn | None = None) -> None:
    """A repair run on the VE's unmounted disk; a filesystem it could not repair stops the start."""
    r = e2fsck.run(a.loop, *options, progress=progress)
    if not r.repaired:
        raise FsckFailed(f"VE {rec.id} not started: {' '.join(r.command)} exited {r.exit_code} "
                         f"({', '.join(r.decoded)}): {r.tail()}. The filesystem was neither resized nor mounted "
                         f"and the image is detached; repair it by hand: `fsnotifyd image attach {rec.image}`, "
                         f"then `e2fsck -f` on the device it prints", command=r.command, exit_code=r.exit_code,
                         decoded=r.decoded, file=rec.image)


def _refused(paths: Paths, reg: Registry, rec: VeRecord, e: FsnotifydError) -> None:
    """Record why a start failed. Stopped, unless something of the VE is still up (a detach
    that failed too): the registry never says stopped while the VE is mounted."""
    left = att_mod.leftovers(rec.image, run_dir=paths.run_dir, mountpoint=rec.mountpoint)
    if isinstance(e, FsckFailed):
        # Without the device: that loop device went with the attachment.
        why = f"{' '.join(e.command[:-1])} exited {e.exit_code} ({', '.join(e.decoded)})"
        fsck = {"command": list(e.command), "exit_code": e.exit_code, "decoded": e.decoded}
    else:
        why, fsck = getattr(e, "message", None) or str(e), {}
    changes: dict[str, object] = {"running": bool(left), "reason": f"start refused: {why}"}
    if not left:
        changes.update(loop=None, disk=None)
    reg.update(rec.id, **changes)
    log.error("ve.start_refused", ve=rec.id, reason=why, left=left or None, **fsck)


def stop(state_dir: str, ve_id: str) -> VeRecord:
    """Unmount and detach the VE, then look: the registry says stopped only once nothing of it
    is left (no mount at its mount point, no loop device on its disk, no exporter). Otherwise
    :class:`ImageError` names what is still up, and the record says running, with the reason."""
    paths, reg = Paths(state_dir), Registry(state_dir)
    with reg.ve_locked(ve_id):
        rec = reg.get(ve_id)

        def still_up() -> list[str]:
            return att_mod.leftovers(rec.image, run_dir=paths.run_dir, mountpoint=rec.mountpoint)

        failure: ImageError | None = None
        left = still_up()
        if left:
            try:
                # By the attachment's name, with or without its record: what a crash left goes too.
                att_mod.detach(rec.image, run_dir=paths.run_dir)
            except ImageError as e:
                failure = e
            left = still_up()
        if left:
            why = (f"{failure.message}; " if failure else "") + "still up: " + ", ".join(left)
            reg.update(ve_id, running=True, reason=f"stop failed: {why}")
            log.error("ve.stop_failed", ve=ve_id, left=left, error=failure.message if failure else None)
            raise ImageError(f"VE {ve_id} is not stopped: {why}", file=rec.image)
        if failure is not None:  # a step failed, yet nothing is left: stopped all the same
            log.warning("ve.stop_incomplete", ve=ve_id, error=failure.message)
        # A stop of a stopped VE keeps the reason it is down (a refused start).
        return reg.update(ve_id, running=False, loop=None, disk=None, reason=None if rec.running else rec.reason)


def destroy(state_dir: str, ve_id: str, *, keep_image: bool = False) -> None:
    import shutil

    reg = Registry(state_dir)
    rec = stop(state_dir, ve_id)
    if not keep_image:
        shutil.rmtree(rec.image, ignore_errors=True)
    reg.remove(ve_id)
