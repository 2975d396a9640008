"""Disk quota warnings from the kernel's generic netlink family ``VFS_DQUOT``: ``quota.warning``.

When a write or a file creation crosses a quota limit (or usage falls back below one), the
kernel's quota core (``fs/quota/netlink.c``, ``quota_send_warning``) multicasts one
``QUOTA_NL_C_WARNING`` message to the ``events`` group of the ``VFS_DQUOT`` family. It says
which quota (user, group or project, and its id), which warning, on which device
(``major:minor``), and which uid caused it. This source joins that group and turns each message
into one observation; the correlator places the device, so the event carries the mount and the
VE like every other event.

Design:

* The family id and the group id are allocated by the kernel at boot, so both are resolved at
  run time (``CTRL_CMD_GETFAMILY`` through pyroute2). A kernel without
  ``CONFIG_QUOTA_NETLINK_INTERFACE`` has no such family: the source is then *unavailable* (down
  with a reason and a hint), not failed, and the daemon goes on without it.
* pyroute2 is used only for that lookup. Reception is a plain ``AF_NETLINK`` socket on the
  daemon's own loop (``add_reader``) and the messages are decoded here by hand with
  :mod:`struct`: the wire format is small and fixed, and decoding it ourselves lets every
  malformed message be rejected with a reason that names the offending field, which a generic
  parser would either accept silently or reject without saying why.
* :func:`~fsnotifyd.kernel.quota.decode` (in :mod:`fsnotifyd.kernel.quota`) is pure (bytes in,
  observations and reasons out) and never raises on any input. A message whose netlink header
  is sane but whose content is wrong is skipped alone (``nlmsg_len`` says where the next one
  starts); a broken *header* (too short, ``nlmsg_len`` below 16 or past the end of the
  datagram) poisons the rest of the datagram, because the boundary of the next message is then
  unknown. Each rejected message is counted once.
* Unknown attribute types and the ``PAD`` attribute are skipped (newer kernels may add
  attributes; ``nla_put_u64_64bit`` inserts ``PAD`` before a u64 to align it). The genetlink
  version byte is not checked, for the same reason. Known attributes must have exactly their
  size, appear once and carry no nested/byte-order flag.
* Any process with ``CAP_NET_ADMIN`` may send to a netlink multicast group (the live tests do),
  so a warning is as trustworthy as root on this host; the source does not filter by sender.
* ``ENOBUFS`` from ``recv`` means the socket overflowed and the kernel dropped messages: that
  becomes an ``events.lost`` observation (``reason: netlink_overrun``), as for uevents. Any
  other receive error would repeat on every wake-up, so it ends :meth:`QuotaSource.run` and
  the daemon restarts the source with backoff.

Constants follow ``include/uapi/linux/quota.h``.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import socket
import time
from typing import Any

import structlog

from ..errors import SourceUnavailable
from ..events import Observation
from ..kernel.quota import FAMILY, GROUP, decode
from ..typing import Ready, Send

log = structlog.get_logger("fsnotifyd.quota")

# --- uapi constants (include/uapi/linux/quota.h, include/uapi/linux/netlink.h) -----------------
NETLINK_GENERIC = 16  # not exported by the socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

RECEIVE_BUFFER = 1 << 20  # warnings are rare and small; this absorbs a burst of ~1000
_RECV_SIZE = 1 << 16  # one datagram; the kernel's are ~84 bytes
_BATCH = 256  # datagrams handled per reader callback before yielding to the loop
_RESOLVE_TIMEOUT = 5.0


# --- the source ---------------------------------------------------------------------------------
async def resolve(family: str = FAMILY, group: str = GROUP) -> tuple[int, int]:
    """(family id, multicast group id) from the kernel's genetlink controller.

    Raises :class:`SourceUnavailable` when the family or the group does not exist here.
    """
    try:
        from pyroute2.netlink import GENL_ID_CTRL, ctrlmsg
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic import AsyncGenericNetlinkSocket
    except ImportError as e:
        raise SourceUnavailable(f"pyroute2 not importable: {e}", "pip install pyroute2") from e
    try:
        # The async socket runs on the daemon's own loop; the sync one would try to run a loop
        # of its own inside ours.
        ctl = AsyncGenericNetlinkSocket()
    except OSError as e:
        raise SourceUnavailable(f"cannot open a NETLINK_GENERIC socket: {e}",
                                "netlink may be blocked (seccomp, container policy)") from e
    # pyroute2 would log a missing family at error level itself; we report it as a reason.
    ctl.module_err_level = "debug"
    # discovery() without bind() leaves the reply undecoded unless the controller's message
    # class is registered first (bind() does this, but also wants a message class for us).
    ctl.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
    try:
        reply = await asyncio.wait_for(ctl.discovery(family), _RESOLVE_TIMEOUT)
    except NetlinkError as e:
        if e.code == _errno.ENOENT:
            raise SourceUnavailable(
                f"generic netlink family {family} is not registered",
                "the kernel was built without CONFIG_QUOTA_NETLINK_INTERFACE (or CONFIG_QUOTA)",
            ) from e
        raise SourceUnavailable(f"generic netlink lookup of {family} failed: {e}") from e
    except (OSError, TimeoutError) as e:
        raise SourceUnavailable(f"generic netlink lookup of {family} failed: {e!r}") from e
    finally:
        ctl.close()
    family_id = reply.get_attr("CTRL_ATTR_FAMILY_ID")
    groups = {g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"): g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
              for g in reply.get_attr("CTRL_ATTR_MCAST_GROUPS") or []}
    if not isinstance(family_id, int):
        raise SourceUnavailable(f"generic netlink family {family}: the reply has no family id")
    group_id = groups.get(group)
    if not isinstance(group_id, int):
        raise SourceUnavailable(
            f"generic netlink family {family} has no multicast group {group!r} "
            f"(groups: {', '.join(sorted(str(g) for g in groups)) or 'none'})",
            "this kernel's quota netlink interface differs from include/uapi/linux/quota.h")
    return family_id, group_id


class QuotaSource:
    """Quota warnings of the ``VFS_DQUOT`` generic netlink family as observations."""

    name = "quota"

    def __init__(self, *, family: str = FAMILY, group: str = GROUP,
                 receive_buffer: int = RECEIVE_BUFFER) -> None:
        self.family, self.group = family, group
        self.receive_buffer = receive_buffer
        self.family_id: int | None = None
        self.group_id: int | None = None
        self.received = 0  # netlink messages read (good and malformed)
        self.warnings = 0  # quota.warning observations sent
        self.malformed = 0
        self.last_malformed: str | None = None
        self.overruns = 0  # ENOBUFS: the kernel dropped messages for us
        self._buf = bytearray(_RECV_SIZE)
        self._failed: asyncio.Future[None] | None = None  # set by _drain on a receive error

    def status(self) -> dict[str, Any]:
        return {"received": self.received, "warnings": self.warnings, "malformed": self.malformed,
                "last_malformed": self.last_malformed, "overruns": self.overruns,
                "family_id": self.family_id, "group_id": self.group_id}

    def _open(self, group_id: int) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as e:
            raise SourceUnavailable(f"cannot open a NETLINK_GENERIC socket: {e}",
                                    "netlink may be blocked (seccomp, container policy)") from e
        try:
            sock.bind((0, 0))
            # Group ids above 31 do not fit the bind() bitmask; ADD_MEMBERSHIP takes any id.
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group_id)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise SourceUnavailable(f"cannot join {self.family} multicast group {self.group} "
                                    f"({group_id}): {e}") from e
        # A larger buffer rides out a burst while the loop is busy; FORCE needs CAP_NET_ADMIN
        # (past net.core.rmem_max), the plain option is capped by rmem_max but still helps.
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, self.receive_buffer)
                break
            except OSError:
                continue
        return sock

    def handle(self, data: bytes, send: Send, now: float | None = None) -> None:
        """Decode one datagram, count it, send what is good, log what is not."""
        res = decode(data, self.family_id if self.family_id is not None else -1,
                     time.time() if now is None else now)
        self.received += res.messages
        for bad in res.malformed:
            self.malformed += 1
            self.last_malformed = bad.reason
            log.warning("quota.malformed", field=bad.field, reason=bad.reason)
        for obs in res.observations:
            self.warnings += 1
            send(obs)

    def _drain(self, sock: socket.socket, send: Send) -> None:
        view = memoryview(self._buf)
        for _ in range(_BATCH):
            try:
                # MSG_TRUNC: the return value is the datagram's real size even if it was cut.
                n = sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == _errno.ENOBUFS:
                    # The socket overflowed: the kernel dropped warnings meant for us. What is
                    # still queued is intact, so keep reading.
                    self.overruns += 1
                    send(Observation(source=self.name, kind="events.lost", time=time.time(),
                                     details={"reason": "netlink_overrun"}))
                    continue
                # Anything else would repeat on every wake-up (the fd stays readable): end
                # run() with the error so the daemon restarts the source with backoff.
                log.warning("quota.receive_failed", error=str(e))
                if self._failed is not None and not self._failed.done():
                    self._failed.set_exception(e)
                return
            if n > len(self._buf):
                # Only a hand-made datagram can be this big; the cut message is reported as
                # running past the end, the whole ones before it still count.
                log.warning("quota.truncated", size=n, kept=len(self._buf))
            self.handle(bytes(view[:min(n, len(self._buf))]), send)

    async def run(self, send: Send, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        self.family_id, self.group_id = await resolve(self.family, self.group)
        sock = self._open(self.group_id)
        added = False
        self._failed = loop.create_future()
        try:
            loop.add_reader(sock.fileno(), self._drain, sock, send)
            added = True
            log.info("quota.listening", family=self.family, family_id=self.family_id,
                     group=self.group, group_id=self.group_id)
            ready()
            await self._failed  # never completes unless receiving fails; cancelled at shutdown
        finally:
            if added:
                loop.remove_reader(sock.fileno())
            sock.close()
