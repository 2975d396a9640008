"""The ``VFS_DQUOT`` generic netlink messages (``include/uapi/linux/quota.h``,
``fs/quota/netlink.c``): datagrams in, ``quota.warning`` observations and reasons out. Pure.

:func:`decode` never raises on any input: a message whose netlink header is sane but whose
content is wrong is rejected alone (:class:`Malformed` names the field); a broken header ends
the walk, because nothing after it can be delimited. Receiving is
:mod:`fsnotifyd.sources.quota`'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..events import Device, Observation

__all__ = ["FAMILY", "GROUP", "WARNINGS", "Decoded", "Malformed", "QuotaWarning", "WarningType", "decode",
           "observation", "parse_attributes", "parse_message"]

FAMILY = "VFS_DQUOT"  # the generic netlink family ...
GROUP = "events"  # ... and its multicast group (ids resolved at run time)

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
