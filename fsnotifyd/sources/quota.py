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
* :func:`decode` is pure (bytes in, observations and reasons out) and never raises on any
  input. A message whose netlink header is sane but whose content is wrong is skipped alone
  (``nlmsg_len`` says where the next one starts); a broken *header* (too short, ``nlmsg_len``
  below 16 or past the end of the datagram) poisons the rest of the datagram, because the
  boundary of the next message is then unknown. Each rejected message is counted once.
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
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import SourceUnavailable
from ..events import Device, Observation
from ..typing import Ready, Send

log = structlog.get_logger("fsnotifyd.quota")

# --- uapi constants (include/uapi/linux/quota.h, include/uapi/linux/netlink.h) -----------------
FAMILY = "VFS_DQUOT"
GROUP = "events"

QUOTA_NL_C_WARNING = 1

QUOTA_NL_A_QTYPE = 1  # u32: USRQUOTA 0, GRPQUOTA 1, PRJQUOTA 2
QUOTA_NL_A_EXCESS_ID = 2  # u64: the id whose quota was crossed
QUOTA_NL_A_WARNING = 3  # u32: QUOTA_NL_* warning code
QUOTA_NL_A_DEV_MAJOR = 4  # u32
QUOTA_NL_A_DEV_MINOR = 5  # u32
QUOTA_NL_A_CAUSED_ID = 6  # u64: the uid of the task that caused it
QUOTA_NL_A_PAD = 7  # alignment filler before a u64 (nla_put_u64_64bit)

ATTR_NAMES = {
    QUOTA_NL_A_QTYPE: "QTYPE",
    QUOTA_NL_A_EXCESS_ID: "EXCESS_ID",
    QUOTA_NL_A_WARNING: "WARNING",
    QUOTA_NL_A_DEV_MAJOR: "DEV_MAJOR",
    QUOTA_NL_A_DEV_MINOR: "DEV_MINOR",
    QUOTA_NL_A_CAUSED_ID: "CAUSED_ID",
    QUOTA_NL_A_PAD: "PAD",
}
# Payload format of each attribute we read (host byte order, as the kernel writes them).
_ATTR_FORMATS = {
    QUOTA_NL_A_QTYPE: "=I",
    QUOTA_NL_A_EXCESS_ID: "=Q",
    QUOTA_NL_A_WARNING: "=I",
    QUOTA_NL_A_DEV_MAJOR: "=I",
    QUOTA_NL_A_DEV_MINOR: "=I",
    QUOTA_NL_A_CAUSED_ID: "=Q",
}
REQUIRED = (QUOTA_NL_A_QTYPE, QUOTA_NL_A_EXCESS_ID, QUOTA_NL_A_WARNING,
            QUOTA_NL_A_DEV_MAJOR, QUOTA_NL_A_DEV_MINOR)

QUOTA_TYPES = ("user", "group", "project")  # USRQUOTA, GRPQUOTA, PRJQUOTA

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_HDRLEN = NLMSG_HDR.size  # 16
GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
GENL_HDRLEN = GENL_HDR.size  # 4
NLA_HDR = struct.Struct("=HH")  # nla_len, nla_type
NLA_HDRLEN = NLA_HDR.size  # 4
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF
NLMSG_TYPES = {1: "NLMSG_NOOP", 2: "NLMSG_ERROR", 3: "NLMSG_DONE", 4: "NLMSG_OVERRUN"}

MAJOR_MAX = (1 << 12) - 1  # the kernel's dev_t is 12 bits of major ...
MINOR_MAX = (1 << 20) - 1  # ... and 20 bits of minor (MINORBITS)

NETLINK_GENERIC = 16  # not exported by the socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

RECEIVE_BUFFER = 1 << 20  # warnings are rare and small; this absorbs a burst of ~1000
_RECV_SIZE = 1 << 16  # one datagram; the kernel's are ~84 bytes
_BATCH = 256  # datagrams handled per reader callback before yielding to the loop
_RESOLVE_TIMEOUT = 5.0


def _align4(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True, slots=True)
class WarningType:
    """What one ``QUOTA_NL_*`` code means (the kernel's comments in quota.h and dquot.c)."""

    code: int
    name: str
    resource: str | None  # "blocks" | "inodes"
    limit: str | None  # "hard" | "soft"
    grace_expired: bool
    below: bool
    severity: str
    phrase: str  # completes "<Type> <id> on <major>:<minor> ..."


# Severity: at a hard limit, or over a soft limit past its grace time, the allocation itself
# fails with EDQUOT (dquot.c check_bdq/check_idq), so the VE's writes are failing: "error".
# Over a soft limit within the grace time nothing fails yet: "warning". Back below a limit is
# good news: "info". NOWARN is never sent by the kernel (quota_send_warning is only called
# for a real warning) but is decodable: "info".
WARNINGS: dict[int, WarningType] = {w.code: w for w in (
    WarningType(0, "NOWARN", None, None, False, False, "info", "has no quota warning"),
    WarningType(1, "IHARDWARN", "inodes", "hard", False, False, "error",
                "reached its inode hard limit; creating files fails"),
    WarningType(2, "ISOFTLONGWARN", "inodes", "soft", True, False, "error",
                "is over its inode soft limit past the grace time; creating files fails"),
    WarningType(3, "ISOFTWARN", "inodes", "soft", False, False, "warning",
                "went over its inode soft limit; the grace time started"),
    WarningType(4, "BHARDWARN", "blocks", "hard", False, False, "error",
                "reached its block hard limit; writes fail"),
    WarningType(5, "BSOFTLONGWARN", "blocks", "soft", True, False, "error",
                "is over its block soft limit past the grace time; writes fail"),
    WarningType(6, "BSOFTWARN", "blocks", "soft", False, False, "warning",
                "went over its block soft limit; the grace time started"),
    WarningType(7, "IHARDBELOW", "inodes", "hard", False, True, "info",
                "is back below its inode hard limit"),
    WarningType(8, "ISOFTBELOW", "inodes", "soft", False, True, "info",
                "is back below its inode soft limit"),
    WarningType(9, "BHARDBELOW", "blocks", "hard", False, True, "info",
                "is back below its block hard limit"),
    WarningType(10, "BSOFTBELOW", "blocks", "soft", False, True, "info",
                "is back below its block soft limit"),
)}


class Malformed(ValueError):
    """One rejected message: ``reason`` says what was wrong, ``field`` names the field."""

    def __init__(self, reason: str, field: str) -> None:
        self.reason, self.field = reason, field
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class QuotaWarning:
    """The content of one ``QUOTA_NL_C_WARNING`` message, validated."""

    qtype: int
    excess_id: int
    warning: int
    major: int
    minor: int
    caused_id: int | None


@dataclass(slots=True)
class Decoded:
    """What one datagram held: ``messages`` netlink messages, each either an observation or a
    :class:`Malformed` reason."""

    observations: list[Observation] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    messages: int = 0


# --- decoding (pure) ----------------------------------------------------------------------------
def parse_attributes(msg: bytes, start: int, end: int) -> dict[int, int]:
    """The known attributes in ``msg[start:end]`` as type -> value; raises :class:`Malformed`."""
    values: dict[int, int] = {}
    off = start
    while end - off >= NLA_HDRLEN:
        nla_len, nla_type = NLA_HDR.unpack_from(msg, off)
        kind = nla_type & NLA_TYPE_MASK
        name = ATTR_NAMES.get(kind, f"type {kind}")
        if nla_len < NLA_HDRLEN:
            raise Malformed(f"attribute {name} at offset {off} has nla_len {nla_len}, "
                            f"shorter than its {NLA_HDRLEN}-byte header", name)
        if nla_len > end - off:
            raise Malformed(f"attribute {name} at offset {off} has nla_len {nla_len}, "
                            f"past the end of the message ({end - off} bytes left)", name)
        fmt = _ATTR_FORMATS.get(kind)
        if fmt is not None:  # PAD and attributes of later kernels are skipped
            flags = nla_type & ~NLA_TYPE_MASK
            if flags:
                raise Malformed(f"attribute {name} has flags 0x{flags:04x} "
                                "(nested/network byte order), expected none", name)
            size = struct.calcsize(fmt)
            if nla_len - NLA_HDRLEN != size:
                raise Malformed(f"attribute {name} has length {nla_len - NLA_HDRLEN}, "
                                f"expected {size}", name)
            if kind in values:
                raise Malformed(f"attribute {name} appears twice", name)
            values[kind] = struct.unpack_from(fmt, msg, off + NLA_HDRLEN)[0]
        off += _align4(nla_len)
    if 0 < end - off:
        # The kernel sizes messages in whole attributes; a 1..3 byte tail is not one.
        raise Malformed(f"{end - off} trailing bytes after the last attribute, "
                        f"too short for an attribute header", "attributes")
    return values


def parse_message(msg: bytes, family_id: int) -> QuotaWarning:
    """One whole netlink message (header included, ``len(msg) == nlmsg_len``).

    Raises :class:`Malformed` naming the field that is wrong.
    """
    length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(msg, 0)
    if mtype != family_id:
        what = f" ({NLMSG_TYPES[mtype]})" if mtype in NLMSG_TYPES else ""
        raise Malformed(f"message type 0x{mtype:x}{what}, expected family id 0x{family_id:x} "
                        f"({FAMILY})", "nlmsg_type")
    if length < NLMSG_HDRLEN + GENL_HDRLEN:
        raise Malformed(f"message of {length} bytes has no room for the {GENL_HDRLEN}-byte "
                        "genetlink header", "genlmsghdr")
    cmd, _version, _reserved = GENL_HDR.unpack_from(msg, NLMSG_HDRLEN)
    if cmd != QUOTA_NL_C_WARNING:
        raise Malformed(f"genetlink command {cmd}, expected {QUOTA_NL_C_WARNING} "
                        "(QUOTA_NL_C_WARNING)", "cmd")
    attrs = parse_attributes(msg, NLMSG_HDRLEN + GENL_HDRLEN, length)
    missing = [ATTR_NAMES[a] for a in REQUIRED if a not in attrs]
    if missing:
        raise Malformed(f"missing attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                        missing[0])
    qtype, warning = attrs[QUOTA_NL_A_QTYPE], attrs[QUOTA_NL_A_WARNING]
    major, minor = attrs[QUOTA_NL_A_DEV_MAJOR], attrs[QUOTA_NL_A_DEV_MINOR]
    if qtype >= len(QUOTA_TYPES):
        raise Malformed(f"attribute QTYPE is {qtype}, expected 0 (user), 1 (group) or 2 (project)",
                        "QTYPE")
    if warning not in WARNINGS:
        raise Malformed(f"attribute WARNING is {warning}, expected 0..{max(WARNINGS)}", "WARNING")
    if major > MAJOR_MAX:
        raise Malformed(f"attribute DEV_MAJOR is {major}, expected 0..{MAJOR_MAX}", "DEV_MAJOR")
    if minor > MINOR_MAX:
        raise Malformed(f"attribute DEV_MINOR is {minor}, expected 0..{MINOR_MAX}", "DEV_MINOR")
    return QuotaWarning(qtype=qtype, excess_id=attrs[QUOTA_NL_A_EXCESS_ID], warning=warning,
                        major=major, minor=minor, caused_id=attrs.get(QUOTA_NL_A_CAUSED_ID))


def observation(w: QuotaWarning, now: float) -> Observation:
    """The ``quota.warning`` observation for one validated warning."""
    wt = WARNINGS[w.warning]
    qtype = QUOTA_TYPES[w.qtype]
    text = f"{qtype.capitalize()} {w.excess_id} on {w.major}:{w.minor} {wt.phrase}."
    details: dict[str, Any] = {
        "quota_type": qtype,
        "id": w.excess_id,
        "caused_id": w.caused_id,
        "warning": {
            "code": wt.code,
            "name": wt.name,
            "resource": wt.resource,
            "limit": wt.limit,
            "grace_expired": wt.grace_expired,
            "below": wt.below,
            "text": text,
        },
    }
    return Observation(source="quota", kind="quota.warning", time=now,
                       device=Device(w.major, w.minor, None), severity=wt.severity,
                       details=details)


def decode(data: bytes, family_id: int, now: float) -> Decoded:
    """Every netlink message of one received datagram; never raises.

    A message with a sane header but bad content is rejected alone and the walk goes on to the
    next one; a bad header ends the walk (nothing after it can be delimited).
    """
    out = Decoded()
    if not data:
        out.messages = 1
        out.malformed.append(Malformed("empty datagram", "nlmsghdr"))
        return out
    off, end = 0, len(data)
    while off < end:
        left = end - off
        out.messages += 1
        if left < NLMSG_HDRLEN:
            out.malformed.append(Malformed(
                f"truncated netlink header: {left} bytes left, need {NLMSG_HDRLEN}", "nlmsghdr"))
            break
        length = NLMSG_HDR.unpack_from(data, off)[0]
        if length < NLMSG_HDRLEN:
            out.malformed.append(Malformed(
                f"nlmsg_len {length} is shorter than the {NLMSG_HDRLEN}-byte netlink header",
                "nlmsg_len"))
            break
        if length > left:
            out.malformed.append(Malformed(
                f"nlmsg_len {length} runs past the end of the datagram ({left} bytes left)",
                "nlmsg_len"))
            break
        try:
            out.observations.append(observation(parse_message(data[off:off + length], family_id), now))
        except Malformed as e:
            out.malformed.append(e)
        off += _align4(length)
    return out


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
