"""Block device uevents (pyudev): ``dev.add`` / ``dev.change`` / ``dev.remove``.

Without udevd the monitor listens to the kernel's own uevents (``source="kernel"``); with udevd
running, ``source="udev"`` gives the same events after udev rules ran (and with udev's extra
properties). Conversion is a pure function of the uevent's properties (:meth:`UdevSource.observe`)
plus two sysfs reads (a loop device's backing file; the current loop bindings at start).

What the kernel sends for a loop device (measured on 6.18, kernel uevents, ``filter_by("block")``):

* ``LOOP_CTL_ADD`` / ``LOOP_CTL_REMOVE`` (e.g. ``losetup -f`` creating a node): ``add`` / ``remove``.
* attach (``losetup``, ``LOOP_CONFIGURE``): one ``change`` with no extra property; the loop's
  ``DISKSEQ`` is new, and ``/sys/block/loopN/loop/backing_file`` exists.
* resize (``losetup -c`` after growing the file): ``change`` with ``RESIZE=1``.
* detach (``losetup -d``): ``change`` with no extra property and the *same* ``DISKSEQ`` as the
  attach (capacity already 0, ``loop/`` already gone from sysfs), then ``change`` with
  ``DISK_MEDIA_CHANGE=1`` (same ``DISKSEQ``; the kernel bumps the device's diskseq right after).
  Partitions (if the kernel has a partition parser and ``-P`` was used) are removed after that.

So the two property-less changes are told apart by ``DISKSEQ``: the first for a (loop, diskseq)
is the attach, the second is the start of the detach. ``details["what"]`` is ``"attach"``,
``"detaching"`` (the first detach change), ``"detach"`` (``DISK_MEDIA_CHANGE=1`` on a loop),
``"resize"``, or ``"media_change"`` (``DISK_MEDIA_CHANGE`` on a non-loop disk). Loops bound when the
source starts are primed from sysfs, so their detach is not mistaken for an attach. On kernels
without ``DISKSEQ`` (< 5.15) the backing file's presence decides (racy if detach follows attach
before the event is read).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from ..errors import SourceUnavailable
from ..events import Device, Observation
from ..typing import Ready, Send

log = structlog.get_logger("fsnotifyd.udev")

KINDS = {"add": "dev.add", "remove": "dev.remove", "change": "dev.change"}
_LOOP = re.compile(r"loop\d+")
RECEIVE_BUFFER = 4 << 20
_BATCH = 256  # uevents handled per reader callback before yielding to the loop


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class UdevSource:
    """Kernel (or udev) uevents of the ``block`` subsystem as observations."""

    name = "udev"

    def __init__(self, source: str = "kernel", *, subsystem: str = "block",
                 sysfs: str | os.PathLike[str] = "/sys") -> None:
        self.source = source
        self.subsystem = subsystem
        self.sysfs = Path(sysfs)
        self.received = 0
        self.lost_overruns = 0
        # loop name -> DISKSEQ of its current attachment (whose attach change was seen).
        self._loop_seq: dict[str, int] = {}

    # -- sysfs --
    def backing_file(self, name: str) -> str | None:
        try:
            text = (self.sysfs / "block" / name / "loop" / "backing_file").read_text()
        except (OSError, UnicodeDecodeError):
            return None
        return text.rstrip("\n") or None

    def prime(self) -> None:
        """Record the loops bound now, so their later detach is recognised as one."""
        try:
            names = [p.name for p in (self.sysfs / "block").iterdir() if _LOOP.fullmatch(p.name)]
        except OSError:
            return
        for name in names:
            if self.backing_file(name) is None:
                continue
            try:
                seq = _int((self.sysfs / "block" / name / "diskseq").read_text().strip())
            except OSError:
                seq = None
            if seq is not None:
                self._loop_seq[name] = seq

    # -- conversion --
    def _loop_what(self, name: str, action: str, props: Mapping[str, str],
                   backing: str | None) -> str | None:
        if action != "change":
            if action == "remove":
                self._loop_seq.pop(name, None)
            return None
        if props.get("RESIZE") == "1":
            return "resize"
        if props.get("DISK_MEDIA_CHANGE") == "1":
            self._loop_seq.pop(name, None)
            return "detach"
        seq = _int(props.get("DISKSEQ"))
        if seq is None:
            return "attach" if backing else "detaching"
        if self._loop_seq.get(name) == seq:
            return "detaching"
        self._loop_seq[name] = seq
        return "attach"

    def observe(self, action: str | None, props: Mapping[str, str],
                now: float | None = None) -> Observation | None:
        """The observation for one uevent (its properties), or None if it is not one we map."""
        kind = KINDS.get(action or "")
        if kind is None:
            return None  # bind/unbind/move/online/offline: not device lifecycle
        devpath = props.get("DEVPATH", "")
        # The kernel's name is the last DEVPATH component (DEVNAME is the same, under /dev/).
        name = devpath.rpartition("/")[2] or props.get("DEVNAME", "").rpartition("/")[2] or None
        devtype = props.get("DEVTYPE")
        details: dict[str, Any] = {"action": action, "devtype": devtype}
        if props.get("RESIZE") == "1":
            details["resize"] = True
        if props.get("DISK_MEDIA_CHANGE") == "1":
            details["disk_media_change"] = True
        for key, out in (("DISKSEQ", "diskseq"), ("PARTN", "partn"), ("SEQNUM", "seqnum")):
            v = _int(props.get(key))
            if v is not None:
                details[out] = v
        if props.get("PARTNAME"):
            details["partname"] = props["PARTNAME"]
        if devtype == "partition" and devpath.count("/") >= 2:
            details["parent"] = devpath.rsplit("/", 2)[1]
        what: str | None = None
        if name and devtype == "disk" and _LOOP.fullmatch(name):
            backing = self.backing_file(name) if action != "remove" else None
            if backing is not None:
                details["backing_file"] = backing
            what = self._loop_what(name, action or "", props, backing)
        elif action == "change" and props.get("RESIZE") == "1":
            what = "resize"
        elif action == "change" and props.get("DISK_MEDIA_CHANGE") == "1":
            what = "media_change"
        if what is not None:
            details["what"] = what
        return Observation(
            source=self.name,
            kind=kind,
            time=time.time() if now is None else now,
            device=Device(_int(props.get("MAJOR")), _int(props.get("MINOR")), name),
            details=details,
        )

    # -- running --
    def _open(self) -> Any:
        try:
            import pyudev
        except ImportError as e:
            raise SourceUnavailable(f"pyudev not importable: {e}", "pip install pyudev") from e
        try:
            ctx = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(ctx, source=self.source)
            monitor.filter_by(self.subsystem)
            try:
                monitor.set_receive_buffer_size(RECEIVE_BUFFER)
            except OSError:
                pass  # needs CAP_NET_ADMIN; the default buffer still works
            monitor.start()
        except Exception as e:  # ImportError (no libudev), OSError (netlink), ValueError
            hint = ("is udevd running? use source='kernel' without it" if self.source == "udev"
                    else "needs libudev and a netlink socket (NETLINK_KOBJECT_UEVENT)")
            raise SourceUnavailable(f"uevent monitor ({self.source}) failed: "
                                    f"{type(e).__name__}: {e}", hint) from e
        return monitor

    def _drain(self, monitor: Any, send: Send) -> None:
        for _ in range(_BATCH):
            try:
                dev = monitor.poll(timeout=0)
            except OSError as e:
                if e.errno == _errno.ENOBUFS:
                    # The socket overflowed: uevents were dropped by the kernel.
                    self.lost_overruns += 1
                    send(Observation(source=self.name, kind="events.lost", time=time.time(),
                                     details={"reason": "uevent_overrun"}))
                    continue
                log.warning("udev.receive_failed", error=str(e))
                return
            if dev is None:
                return  # nothing queued (or a message libudev filtered out; we get called again)
            self.received += 1
            try:
                props = {k: dev.properties[k] for k in dev.properties}
                obs = self.observe(dev.action, props)
            except Exception:  # a malformed uevent must not stop the source
                log.exception("udev.convert_failed")
                continue
            if obs is not None:
                send(obs)

    async def run(self, send: Send, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        monitor = self._open()
        fd = monitor.fileno()
        added = False
        try:
            self.prime()
            loop.add_reader(fd, self._drain, monitor, send)
            added = True
            ready()
            await asyncio.Event().wait()
        finally:
            if added:
                loop.remove_reader(fd)
            # pyudev has no close(): dropping the last reference frees the libudev monitor and
            # closes its socket.
            del monitor
