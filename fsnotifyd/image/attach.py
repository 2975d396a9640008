"""Attach an image as a block device and take it down again, in order, even after a crash.

An attached image is an exporter process (:mod:`.exporter`: the image's stack served as the
FUSE file ``<fuse_dir>/disk``), a loop device on that file (``--direct-io=on``) and, when
mounted, an ext4 mount of the loop device. ::

    att = attach("/vz/private/101/root.hdd", run_dir="/run/fsnotifyd/images")
    mount(att, "/vz/root/101")
    guid = snapshot(att)            # fsfreeze around the exporter's snapshot
    grow(att, 20 << 30)             # resize, losetup -c, resize2fs
    detach(att, run_dir=...)        # umount, losetup -d, stop the exporter, fusermount3 -u

Each attachment is recorded in ``<run_dir>/attached/<name>.json``, rewritten atomically before
each step that creates something (the exporter, the loop device, the mount), so
:func:`detach` can always find what to take down, from the record alone, whoever crashed.
Detach also looks for what a record may have missed (a loop device or an exporter created in
the instant before the record was written): loop devices whose backing file is this
attachment's ``disk``, exporters whose command line names this attachment's control socket.
It touches nothing else: a recorded loop device is detached only if it still points at our
file, a recorded pid is signalled only if its command line is our exporter's.

A stopped (SIGSTOP, or stuck) exporter blocks the VE's writers in D state forever. The
watchdog (:func:`watchdog_check`, :func:`run_watchdog`) asks each exporter for its status and,
without an answer in time, aborts its FUSE connection through fusectl, so the writers get EIO
(the filesystem sees I/O errors, as when the exporter crashes) instead of hanging.
Kernels since 6.14 also have ``fs.fuse.default_request_timeout`` (present on 6.18, 0 = off):
the kernel aborts a connection whose request is not answered in time (checked every 15 s:
with 15 s a stopped exporter's writer got EIO after ~30 s). It is global, read when a
connection starts, so :func:`attach` sets it only when asked (``request_timeout=``), for the
instant of the mount, and puts the old value back. It must exceed the longest control
operation: a write waiting behind a long merge counts as unanswered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ..errors import ImageError
from ..mountinfo import MountEntry, read_mountinfo
from ..statefile import write_json_atomic
from . import descriptor as desc_mod
from .progress import ProgressFn

log = structlog.get_logger("fsnotifyd.image.attach")

EXPORTER_MODULE = "fsnotifyd.app.exporter"  # the process's entry point (it sets up logging)
# What exporters started by an earlier version run: still ours after an upgrade (they serve
# running VEs' disks across daemon restarts).
EXPORTER_MODULES = (EXPORTER_MODULE, "fsnotifyd.image.exporter")
FUSECTL = "/sys/fs/fuse/connections"
REQUEST_TIMEOUT_SYSCTL = "/proc/sys/fs/fuse/default_request_timeout"


@dataclass
class Attached:
    image: str  # the image directory (absolute)
    fuse_dir: str  # the exporter's FUSE mount
    disk: str  # <fuse_dir>/disk: the virtual disk as a file
    loop: str  # /dev/loopN ("" until attached)
    control: str  # the exporter's control socket
    pid: int  # the exporter (0 until started)
    readonly: bool
    mountpoint: str | None = None
    upto: str | None = None

    @property
    def name(self) -> str:
        return attachment_name(self.image, self.upto)


# -- names and records ---------------------------------------------------------------------------

def attachment_name(image: str, upto: str | None = None) -> str:
    """A file name for one attachment: the image path flattened, ``@guid`` for a snapshot view,
    a hash when that is too long."""
    path = os.path.realpath(image)
    slug = path.strip("/").replace("/", "_") or "root"
    if upto is not None:
        slug += "@" + upto.strip("{}")
    if len(slug) > 60:
        h = hashlib.sha1(slug.encode()).hexdigest()[:12]
        slug = f"{os.path.basename(path)[:40]}-{h}"
    return slug


def _paths(run_dir: str, name: str) -> dict[str, str]:
    run_dir = os.path.abspath(run_dir)
    control = os.path.join(run_dir, "control", name + ".sock")
    if len(control.encode()) > 100:  # sun_path holds 108 bytes
        control = os.path.join(run_dir, "control", hashlib.sha1(name.encode()).hexdigest()[:16] + ".sock")
    fuse_dir = os.path.join(run_dir, "fuse", name)
    return {"record": os.path.join(run_dir, "attached", name + ".json"), "fuse_dir": fuse_dir,
            "disk": os.path.join(fuse_dir, "disk"), "control": control,
            "log": os.path.join(run_dir, "log", name + ".log")}


_FIELDS = {f.name for f in dataclasses.fields(Attached)}


def _save(att: Attached, run_dir: str, state: str) -> None:
    rec = dataclasses.asdict(att)
    rec.update(name=att.name, state=state, updated=time.time())
    write_json_atomic(_paths(run_dir, att.name)["record"], rec)


def _load(path: str) -> tuple[Attached, str] | None:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        att = Attached(**{k: v for k, v in rec.items() if k in _FIELDS})
        return att, str(rec.get("state", "?"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("attach.bad_record", path=path, error=str(e))
        return None


def attached(run_dir: str) -> list[Attached]:
    """Every attachment recorded in ``run_dir`` (including half-made ones a crash left)."""
    d = os.path.join(os.path.abspath(run_dir), "attached")
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        got = _load(os.path.join(d, n))
        if got is not None:
            out.append(got[0])
    return out


def attachment(run_dir: str, image: str, upto: str | None = None) -> Attached | None:
    """The recorded attachment of ``image`` itself (``upto`` None) or of its snapshot view
    ``upto``, looked up by its name: never another attachment of the same image (a VE and a
    snapshot view of its image are two attachments, two exporters, two loop devices)."""
    got = _load(_paths(run_dir, attachment_name(image, upto))["record"])
    return None if got is None else got[0]


# -- small system helpers ------------------------------------------------------------------------

def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


def _mounts() -> list[MountEntry]:
    return read_mountinfo()


def _fuse_mount(fuse_dir: str) -> MountEntry | None:
    found = None
    for m in _mounts():
        if m.mountpoint == fuse_dir and m.fstype.startswith("fuse"):
            found = m  # the last one is the one on top
    return found


def _loop_backing(loop: str) -> str | None:
    """The backing file of ``/dev/loopN`` (None: not set up)."""
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/backing_file", encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def _same_file(backing: str | None, disk: str) -> bool:
    return backing is not None and backing.removesuffix(" (deleted)") == disk


def _loops_on(disk: str) -> list[str]:
    """Loop devices whose backing file is ``disk`` (read from sysfs: no I/O to a dead FUSE)."""
    out: list[str] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for n in sorted(names):
        if n.startswith("loop") and _same_file(_loop_backing(n), disk):
            out.append("/dev/" + n)
    return out


def _loop_dev(loop: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/dev", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (None: gone; a zombie is reaped when it is our child)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return state


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, ptrace): any of its threads shows T (the thread in
    the middle of a write may still be in D for a moment)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/stat", encoding="ascii", errors="replace") as f:
                if f.read().rpartition(")")[2].split()[0] in ("T", "t"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def _is_our_exporter(pid: int, control: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(m.encode() in argv for m in EXPORTER_MODULES) and control.encode() in argv


def _exporters_for(control: str) -> list[int]:
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit() and _is_our_exporter(int(n), control):
            out.append(int(n))
    return out


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _proc_state(pid) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# -- control -------------------------------------------------------------------------------------

def control(att: Attached, request: dict[str, Any], timeout: float = 10,
            progress: ProgressFn | None = None) -> dict[str, Any]:
    """One request to the exporter, its answer. Raises :class:`ImageError` when it does not
    answer (refused, closed, timed out); an answer with ``ok: false`` is returned as is.
    ``progress`` gets the ``{"progress": [stage, done, total]}`` lines sent before the answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(att.control)
            s.sendall(json.dumps(request).encode() + b"\n")
            with s.makefile("rb") as f:
                while True:
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        raise ImageError(f"exporter closed the control connection ({request.get('op')})",
                                         file=att.control)
                    answer = json.loads(line)
                    step = answer.get("progress") if isinstance(answer, dict) and len(answer) == 1 else None
                    if step is None:
                        return answer
                    if progress is not None:
                        progress(str(step[0]), int(step[1]), int(step[2]))
    except TimeoutError:
        raise ImageError(f"exporter did not answer {request.get('op')!r} within {timeout} s",
                         file=att.control) from None
    except OSError as e:
        raise ImageError(f"exporter control: {e.strerror or e}", file=att.control) from None


def _ok(att: Attached, request: dict[str, Any], timeout: float = 60,
        progress: ProgressFn | None = None) -> dict[str, Any]:
    r = control(att, request, timeout, progress)
    if not r.get("ok"):
        raise ImageError(f"{request.get('op')}: {r.get('error')}", file=att.image)
    return r


# -- attach --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _request_timeout(run_dir: str, seconds: int | None) -> Iterator[None]:
    """``fs.fuse.default_request_timeout`` set to ``seconds`` while the body mounts FUSE, then
    put back (it is global: serialised between our attaches by a lock file)."""
    if seconds is None or not os.path.exists(REQUEST_TIMEOUT_SYSCTL):
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".sysctl.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(REQUEST_TIMEOUT_SYSCTL) as f:
            old = f.read().strip()
        with open(REQUEST_TIMEOUT_SYSCTL, "w") as f:
            f.write(str(int(seconds)))
        try:
            yield
        finally:
            with open(REQUEST_TIMEOUT_SYSCTL, "w") as f:
                f.write(old)


def attach(image_dir: str, *, run_dir: str, readonly: bool = False, upto: str | None = None,
           direct_io: bool = True, timeout: float = 10, request_timeout: int | None = None) -> Attached:
    """Start an exporter for the image (as of snapshot ``upto``: read-only) and put a loop
    device on its disk. Returns the attachment (recorded in ``run_dir``); on any failure what
    was made is taken down again and :class:`ImageError` says why."""
    image = os.path.realpath(image_dir)
    if not os.path.exists(os.path.join(image, desc_mod.NAME)):
        raise ImageError("not an image directory (no DiskDescriptor.xml)", file=image)
    readonly = readonly or upto is not None
    run_dir = os.path.abspath(run_dir)
    name = attachment_name(image, upto)
    p = _paths(run_dir, name)
    old = _load(p["record"])
    if old is not None:
        prev = old[0]
        if prev.pid and _proc_state(prev.pid) and _is_our_exporter(prev.pid, prev.control):
            raise ImageError(f"already attached (exporter pid {prev.pid}, {prev.loop or 'no loop'})", file=image)
        log.info("attach.stale_record", name=name)
        detach(prev, run_dir=run_dir)
    att = Attached(image=image, fuse_dir=p["fuse_dir"], disk=p["disk"], loop="", control=p["control"], pid=0,
                   readonly=readonly, upto=upto)
    os.makedirs(os.path.dirname(p["log"]), exist_ok=True)
    os.makedirs(os.path.dirname(p["control"]), exist_ok=True)
    os.makedirs(p["fuse_dir"], exist_ok=True)
    _save(att, run_dir, "starting")
    try:
        with _request_timeout(run_dir, request_timeout):
            _start_exporter(att, run_dir, p["log"], timeout)
            _save(att, run_dir, "exported")
            argv = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
            if readonly:
                argv.append("--read-only")
            att.loop = _run(*argv, att.disk).stdout.strip()
        _save(att, run_dir, "attached")
    except BaseException:
        with contextlib.suppress(Exception):
            detach(att, run_dir=run_dir)
        raise
    log.info("image.attached", image=image, loop=att.loop, pid=att.pid, readonly=readonly, upto=upto)
    return att


def _start_exporter(att: Attached, run_dir: str, log_path: str, timeout: float) -> None:
    argv = [sys.executable, "-m", EXPORTER_MODULE, "--image", att.image, "--fuse-dir", att.fuse_dir,
            "--control", att.control]
    if att.readonly:
        argv.append("--readonly")
    if att.upto is not None:
        argv += ["--upto", att.upto]
    env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3")
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_root, env.get("PYTHONPATH")) if x)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd="/", env=env,
                                start_new_session=True, close_fds=True)
    att.pid = proc.pid
    _save(att, run_dir, "starting")
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise ImageError(f"exporter exited with {rc} while starting: {_tail(log_path)}", file=att.image)
        try:
            if control(att, {"op": "status"}, timeout=max(0.1, deadline - time.monotonic())).get("ok"):
                return
        except ImageError:
            pass
        if time.monotonic() >= deadline:
            raise ImageError(f"exporter did not answer within {timeout} s: {_tail(log_path)}", file=att.image)
        time.sleep(0.02)


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"


# -- mount ---------------------------------------------------------------------------------------

def _mounts_of(loop: str) -> list[MountEntry]:
    dev = _loop_dev(loop)
    return [] if dev is None else [m for m in _mounts() if f"{m.major}:{m.minor}" == dev]


def mount(att: Attached, mountpoint: str, *, readonly: bool = False, options: tuple[str, ...] | list[str] = (),
          run_dir: str | None = None) -> None:
    """Mount the attached disk's ext4 at ``mountpoint``. A read-only attachment mounts with
    ``ro,noload`` (no journal replay on a device that cannot be written)."""
    if not att.loop:
        raise ImageError("not attached (no loop device)", file=att.image)
    mountpoint = os.path.abspath(mountpoint)
    opts = list(options)
    if att.readonly:
        opts = ["ro", "noload", *opts]
    elif readonly:
        opts = ["ro", *opts]
    att.mountpoint = mountpoint
    rd = run_dir or _run_dir_of(att)
    _save(att, rd, "mounting")
    os.makedirs(mountpoint, exist_ok=True)
    argv = ["mount", "-t", "ext4"] + (["-o", ",".join(opts)] if opts else []) + [att.loop, mountpoint]
    r = _run(*argv, check=False)
    if r.returncode != 0:
        att.mountpoint = None
        _save(att, rd, "attached")
        raise ImageError(f"mount failed: {r.stderr.strip()}", file=att.loop)
    _save(att, rd, "mounted")
    log.info("image.mounted", image=att.image, loop=att.loop, mountpoint=mountpoint, options=opts)


def umount(att: Attached, *, lazy: bool = False, run_dir: str | None = None) -> None:
    """Unmount every mount of the attachment's loop device (the recorded mountpoint and any
    bind mounts of it), the deepest first."""
    if att.loop and _same_file(_loop_backing(att.loop), att.disk):
        for m in reversed(_mounts_of(att.loop)):
            r = _run("umount", m.mountpoint, check=False)
            if r.returncode != 0:
                if not lazy:
                    raise ImageError(f"umount {m.mountpoint}: {r.stderr.strip()}", file=att.loop)
                _run("umount", "-l", m.mountpoint, check=False)
            log.info("image.unmounted", image=att.image, mountpoint=m.mountpoint)
    if att.mountpoint is not None:
        att.mountpoint = None
        with contextlib.suppress(OSError, ImageError):
            _save(att, run_dir or _run_dir_of(att), "attached")


def _run_dir_of(att: Attached) -> str:
    # <run_dir>/fuse/<name>
    return os.path.dirname(os.path.dirname(att.fuse_dir))


# -- detach --------------------------------------------------------------------------------------

def detach(image_dir_or_attached: str | Attached, *, run_dir: str, upto: str | None = None,
           lazy: bool = False) -> None:
    """Take an attachment down, in order: unmount, detach the loop device, stop the exporter
    (a stop request; SIGTERM then SIGKILL of that pid only), unmount FUSE, drop the record.
    Idempotent; works from the record after a crash of anything. ``lazy`` unmounts a busy
    filesystem lazily instead of failing."""
    run_dir = os.path.abspath(run_dir)
    if isinstance(image_dir_or_attached, Attached):
        name = image_dir_or_attached.name
    else:
        name = attachment_name(image_dir_or_attached, upto)
    p = _paths(run_dir, name)
    rec = _load(p["record"])
    if rec is not None:
        att = rec[0]
    elif isinstance(image_dir_or_attached, Attached):
        att = image_dir_or_attached
    else:
        att = Attached(image=os.path.realpath(image_dir_or_attached), fuse_dir=p["fuse_dir"], disk=p["disk"],
                       loop="", control=p["control"], pid=0, readonly=upto is not None, upto=upto)

    # 0. A stopped or stuck exporter would leave umount (and us) in D state: abort it first.
    pids = {pid for pid in ([att.pid] if att.pid else []) if _is_our_exporter(pid, att.control)}
    pids.update(_exporters_for(att.control))
    if _fuse_mount(att.fuse_dir) is not None and pids:
        stuck = any(_stopped(pid) for pid in pids)
        if not stuck:
            try:
                stuck = not control(att, {"op": "status"}, timeout=5).get("ok")
            except (ImageError, ValueError):
                stuck = True
        if stuck:
            abort_fuse(att)

    # 1. The filesystem, on every loop device that is (still) ours.
    loops = _loops_on(att.disk)
    if att.loop and att.loop not in loops and _same_file(_loop_backing(att.loop), att.disk):
        loops.append(att.loop)
    for loop in loops:
        umount(dataclasses.replace(att, loop=loop), lazy=lazy, run_dir=run_dir)

    # 2. The loop devices (LOOP_CLR_FD may finish later if someone holds the device: wait).
    for loop in loops:
        _run("losetup", "-d", loop, check=False)
    deadline = time.monotonic() + 10
    while any(_same_file(_loop_backing(lo), att.disk) for lo in loops):
        if time.monotonic() > deadline:
            raise ImageError(f"loop device still on {att.disk} after losetup -d", file=att.image)
        time.sleep(0.05)

    # 3. The exporter.
    for pid in pids:
        _stop_exporter(att, pid)

    # 4. The FUSE mount (the exporter unmounts it on a clean exit; not after a crash).
    if _fuse_mount(att.fuse_dir) is not None:
        r = _run("fusermount3", "-u", att.fuse_dir, check=False)
        if r.returncode != 0 and _fuse_mount(att.fuse_dir) is not None:
            _run("fusermount3", "-uz", att.fuse_dir, check=False)
        if _fuse_mount(att.fuse_dir) is not None:
            raise ImageError(f"FUSE mount {att.fuse_dir} would not go", file=att.image)

    # 5. What is left: the socket, the empty mount directory, the record.
    for path in (att.control,):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(att.fuse_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p["record"])
    log.info("image.detached", image=att.image, loop=att.loop or None, pid=att.pid or None)


def leftovers(image_dir: str, *, run_dir: str, upto: str | None = None,
              mountpoint: str | None = None) -> list[str]:
    """What of an attachment is still on the machine, one phrase each (empty: nothing), looked
    for as :func:`detach` does, without its record: mounts of loop devices on its disk (and
    anything mounted at ``mountpoint``), those loop devices, its exporter processes, its FUSE
    mount, its record. For checking after a detach that it really went."""
    p = _paths(os.path.abspath(run_dir), attachment_name(image_dir, upto))
    loops = _loops_on(p["disk"])
    mounts = [m for loop in loops for m in _mounts_of(loop)]
    if mountpoint is not None:
        mp = os.path.realpath(mountpoint)  # as the mount table names it
        mounts += [m for m in _mounts() if m.mountpoint == mp and m not in mounts]
    out = [f"{m.mountpoint} mounted ({m.source})" for m in mounts]
    out += [f"loop device {loop}" for loop in loops]
    out += [f"exporter pid {pid}" for pid in _exporters_for(p["control"])]
    if _fuse_mount(p["fuse_dir"]) is not None:
        out.append(f"FUSE mount {p['fuse_dir']}")
    if os.path.exists(p["record"]):
        out.append(f"attachment record {p['record']}")
    return out


def _stop_exporter(att: Attached, pid: int) -> None:
    state = _proc_state(pid)
    if state is None:
        return
    if not _stopped(pid):  # a stopped process cannot answer
        with contextlib.suppress(ImageError, ValueError):
            if control(att, {"op": "stop"}, timeout=3).get("ok") and _wait_gone(pid, 10):
                return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _is_our_exporter(pid, att.control):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)
        if _wait_gone(pid, wait):
            log.warning("image.exporter_signalled", pid=pid, signal=sig.name, image=att.image)
            return
    raise ImageError(f"exporter pid {pid} did not exit", file=att.image)


# -- operations on an attached image -----------------------------------------------------------

def _mounted(att: Attached) -> str | None:
    """The recorded mountpoint, if the loop device is mounted there now."""
    if att.mountpoint and att.loop:
        for m in _mounts_of(att.loop):
            if m.mountpoint == att.mountpoint:
                return m.mountpoint
    return None


def snapshot(att: Attached, name: str | None = None) -> str:
    """Snapshot the image; a mounted filesystem is frozen around it (consistent, no fsck on
    the snapshot). Returns the snapshot's GUID."""
    mp = _mounted(att)
    if mp is not None:
        _run("fsfreeze", "-f", mp)
    try:
        guid = _ok(att, {"op": "snapshot", "name": name})["guid"]
    finally:
        if mp is not None:
            _run("fsfreeze", "-u", mp)
    log.info("image.snapshot", image=att.image, guid=guid, frozen=mp is not None)
    return guid


CAP_SYS_RESOURCE = 24


def has_cap_sys_resource() -> bool:
    """Online ext4 resize (``EXT4_IOC_RESIZE_FS``) needs CAP_SYS_RESOURCE (some containers drop it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return False


def grow(att: Attached, size: int, *, resize_fs: bool = True) -> int:
    """Grow the virtual disk to ``size`` bytes online: the exporter resizes the image, the
    loop device re-reads the size, a mounted ext4 grows to fill it (``resize_fs``). Returns
    the new size."""
    mounted = _mounted(att) is not None and resize_fs
    if mounted and not has_cap_sys_resource():
        raise ImageError("an online resize2fs needs CAP_SYS_RESOURCE, which this process lacks: grow with "
                         "resize_fs=False, then umount and run resize2fs offline", file=att.image)
    new = _ok(att, {"op": "resize", "size": int(size)})["size"]
    os.stat(att.disk)  # the kernel asks the exporter for the new size (attr_timeout is 0)
    _run("losetup", "-c", att.loop)
    if mounted:
        _run("resize2fs", att.loop, timeout=600)
    log.info("image.grown", image=att.image, size=new)
    return new


def merge(att: Attached, guid: str) -> None:
    """Merge snapshot ``guid`` into its child while attached (the exporter holds the stack)."""
    _ok(att, {"op": "merge", "guid": guid}, timeout=3600)
    log.info("image.merged", image=att.image, guid=guid)


def compact(att: Attached, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Compact the attached image's top delta online (the VE's I/O pauses while it runs);
    ``progress("compact", moved, to move)`` as the exporter goes."""
    r = _ok(att, {"op": "compact", "progress": progress is not None}, timeout=3600, progress=progress)
    log.info("image.compacted", image=att.image, moved=r["moved"], released=r["released"])
    return {"moved": r["moved"], "released": r["released"]}


def set_readonly(att: Attached, value: bool, *, remount: bool = True) -> None:
    """Switch the attachment read-only (or back) live. With ``remount`` a mounted ext4 is
    remounted first (``ro``: writers get EROFS, the journal stays clean); the exporter then
    refuses writes (EROFS on the device: a fence even if the remount failed)."""
    mp = _mounted(att) if remount else None
    if value:
        if mp is not None:
            r = _run("mount", "-o", "remount,ro", mp, check=False)
            if r.returncode != 0:
                log.warning("image.remount_ro_failed", mountpoint=mp, error=r.stderr.strip())
        _ok(att, {"op": "readonly", "value": True})
    else:
        _ok(att, {"op": "readonly", "value": False})
        if mp is not None:
            _run("mount", "-o", "remount,rw", mp)
    log.info("image.readonly", image=att.image, value=value)


def status(att: Attached, timeout: float = 10) -> dict[str, Any]:
    return _ok(att, {"op": "status"}, timeout)


# -- watchdog ------------------------------------------------------------------------------------

def _fusectl_mounted() -> bool:
    return any(m.fstype == "fusectl" and m.mountpoint == FUSECTL for m in _mounts())


def abort_fuse(att: Attached) -> bool:
    """Abort the exporter's FUSE connection (fusectl): every request in flight and to come
    fails (the loop device, and so the VE's filesystem, sees I/O errors). When fusectl is not
    mounted it is mounted in a private mount namespace, so nothing is left mounted."""
    m = _fuse_mount(att.fuse_dir)
    if m is None:
        return False
    minor = m.minor
    if _fusectl_mounted():
        try:
            with open(f"{FUSECTL}/{minor}/abort", "w") as f:
                f.write("1")
        except OSError as e:
            raise ImageError(f"fusectl abort: {e.strerror}", file=f"{FUSECTL}/{minor}/abort") from e
    else:
        _run("unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t fusectl fusectl {FUSECTL} && echo 1 > {FUSECTL}/{minor}/abort")
    log.warning("image.fuse_aborted", image=att.image, connection=minor, pid=att.pid)
    return True


def watchdog_check(att: Attached, timeout: float = 5.0,
                   seen: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """True when the exporter answers ``status`` in time (``seen`` gets the answer); otherwise
    its FUSE connection is aborted (writers get EIO instead of hanging in D state) and False
    is returned."""
    try:
        st = control(att, {"op": "status"}, timeout)
        if st.get("ok"):
            if seen is not None:
                seen(st)
            return True
    except (ImageError, ValueError) as e:
        log.warning("image.exporter_unresponsive", image=att.image, pid=att.pid, error=str(e))
    abort_fuse(att)
    return False


def run_watchdog(run_dir: str, interval: float, stop_event: threading.Event, *, timeout: float = 5.0,
                 on_abort: Callable[[Attached], None] | None = None,
                 on_pass: Callable[[list[tuple[Attached, dict[str, Any] | None]]], None] | None = None) -> None:
    """Check every recorded attachment each ``interval`` seconds until ``stop_event`` is set.
    An aborted connection stays aborted: the attachment is checked again only after it is
    detached and attached anew (its FUSE mount is then another connection). ``on_pass`` gets,
    after each round, every attachment checked with its exporter's status (None: no answer)."""
    aborted: set[tuple[str, tuple[int, int]]] = set()
    while not stop_event.is_set():
        seen: list[tuple[Attached, dict[str, Any] | None]] = []
        for att in attached(run_dir):
            m = _fuse_mount(att.fuse_dir)
            if not att.loop or m is None:
                continue
            if (att.fuse_dir, m.devnum) in aborted:
                seen.append((att, None))  # still attached, still broken
                continue
            answer: list[dict[str, Any]] = []
            try:
                ok = watchdog_check(att, timeout, seen=answer.append)
            except (ImageError, OSError) as e:
                log.error("image.watchdog_failed", image=att.image, error=str(e))
                continue
            seen.append((att, answer[0] if answer else None))
            if not ok:
                aborted.add((att.fuse_dir, m.devnum))
                if on_abort is not None:
                    on_abort(att)
        if on_pass is not None:
            on_pass(seen)
        stop_event.wait(interval)


__all__ = ["Attached", "attach", "attached", "abort_fuse", "attachment", "attachment_name", "control", "detach", "grow",
           "has_cap_sys_resource", "leftovers", "merge", "mount",
           "run_watchdog", "set_readonly", "snapshot", "status", "umount", "watchdog_check"]
